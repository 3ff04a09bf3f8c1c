"""One rank of the expert-parallel tests (tests/test_expert_parallel.py).

    RANK=r WORLD_SIZE=w MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tests/_ep_worker.py OUT_DIR

Runs every configuration of ``CONFIGS[w]`` through ``ExpertParallel`` on a gloo group and saves
this rank's outputs and gradients to ``OUT_DIR/rank{r}_{name}.pt``; the test compares them with the
single-process packed layer. ``inputs`` is shared with the test, so both see the same tokens.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from typing import Any

import torch

CONFIGS: dict[int, list[dict[str, Any]]] = {
    2: [
        {"name": "even", "caps": [1, 1, 0.5, 0.5], "k": 2, "T": 24, "method": "systematic", "h": 1.0, "ranks": None},
        # drops, duplicate experts in a row, a zero-capacity expert, a non-contiguous placement
        {"name": "uneven", "caps": [2, 1, 0, 1, 0.5, 1], "k": 3, "T": 20, "method": "hash", "h": 0.75,
         "ranks": [1, 0, 1, 1, 0, 1]},
        {"name": "one_rank", "caps": [1, 2, 1], "k": 1, "T": 9, "method": "phase", "h": 1.25, "ranks": [1, 1, 1]},
    ],
    4: [
        {"name": "even", "caps": [1.0] * 8, "k": 2, "T": 16, "method": "weighted_hash", "h": 1.0, "ranks": None},
        {"name": "uneven", "caps": [8, 1, 2, 1, 1, 2], "k": 2, "T": 18, "method": "hash", "h": 0.9,
         "ranks": [3, 3, 0, 1, 3, 0]},  # rank 2 holds no expert
    ],
}  # fmt: skip
D, HIDDEN = 5, 7


def inputs(cfg: dict[str, Any], rank: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s tokens, logits and target, and the (shared) expert weights, float64."""
    n_exp, n_tok = len(cfg["caps"]), cfg["T"]

    def randn(seed: int, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    return {
        "x": randn(2000 + rank, n_tok, D),
        "logits": randn(1000 + rank, n_tok, n_exp),
        "target": randn(4000 + rank, n_tok, D),
        "w1": randn(3, n_exp, D, HIDDEN),
        "w2": randn(4, n_exp, HIDDEN, D),
    }


def router(cfg: dict[str, Any], rank: int) -> Any:
    from gpu_phase_router.torch import MoERouter

    n_exp = len(cfg["caps"])
    return MoERouter(n_exp, cfg["k"], cfg["caps"], method=cfg["method"], capacity_factor=cfg["h"], seed=10 + rank)


def expert(rows: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.gelu(rows @ w1) @ w2


def run(out_dir: str) -> None:
    import torch.distributed as dist

    from gpu_phase_router.torch import ExpertParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    for cfg in CONFIGS[world]:
        data = inputs(cfg, rank)
        x = data["x"].requires_grad_()
        logits = data["logits"].requires_grad_()
        ep = ExpertParallel(None, cfg["ranks"])
        plan = router(cfg, rank)(logits)
        buf, handle = ep.dispatch(plan, x)
        mine = list(handle.experts)
        w1 = data["w1"][mine].requires_grad_()
        w2 = data["w2"][mine].requires_grad_()
        parts = [expert(rows, w1[i], w2[i]) for i, rows in enumerate(handle.expert_rows(buf))]
        y = torch.cat(parts) if parts else buf.new_zeros(0, D)  # a rank without experts: no rows
        out = ep.combine(handle, y)
        (out * data["target"]).sum().backward()
        torch.save(
            {
                "experts": handle.experts,
                "offsets": handle.offsets,
                "buf": buf.detach(),
                "out": out.detach(),
                "x_grad": x.grad,
                "logits_grad": logits.grad,
                "w1_grad": w1.grad,
                "w2_grad": w2.grad,
            },
            f"{out_dir}/rank{rank}_{cfg['name']}.pt",
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    run(sys.argv[1])
    sys.stdout.flush()
    os._exit(0)  # skip interpreter finalisation: torch's gloo threads can abort it ("terminate called ...")
