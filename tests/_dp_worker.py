"""One rank of the data-parallel tests (tests/test_data_parallel.py).

    python tests/_dp_worker.py RANK STORE_FILE

Two gloo ranks train ``MoERouter`` routers with ``process_group=`` and print one JSON line: the
logits each training call saw and the bias after it, so the test can redo the bias updates from
SPEC §16 by hand. Scenarios: uneven batch sizes (a rank with ``T = 0``, an uneven last batch), a
model under ``DistributedDataParallel`` with gradient accumulation (``broadcast_buffers`` on and
off), a checkpoint saved by rank 0 and loaded by both, a rank evaluating alone, a group the rank is
not in, and the content-blind ``method="phase"``.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from gpu_phase_router.torch import MoERouter

E, K, CAPS, RATE = 4, 2, [2.0, 1.0, 1.0, 0.5], 0.125
SKEW = torch.tensor([1.5, 0.0, 0.0, -1.0])


def router(rank: int) -> MoERouter:
    return MoERouter(E, K, CAPS, bias_rate=RATE, process_group=dist.group.WORLD)


def uneven(rank: int) -> dict[str, Any]:
    """Rank 0 routes 24 tokens a step; rank 1 17, none at step 3 and 5 at the last step."""
    gen = torch.Generator().manual_seed(100 + rank)
    r = router(rank)
    logits, bias = [], []
    for step in range(10):
        n = 24 if rank == 0 else {3: 0, 9: 5}.get(step, 17)
        x = torch.randn(n, E, generator=gen) + SKEW * (rank + 1)
        r(x)
        logits.append(x.tolist())
        bias.append(r.expert_bias.tolist())
    return {"logits": logits, "bias": bias, "step": r.step}


class Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = torch.nn.Linear(6, E)
        self.w = torch.nn.Parameter(torch.randn(E, 6, 6) * 0.3)
        self.router = MoERouter(E, K, CAPS, bias_rate=RATE, process_group=dist.group.WORLD)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.gate(x)
        plan = self.router(logits)
        y = torch.einsum("ecd,edf->ecf", plan.dispatch(x), self.w)
        return plan.combine(y), logits


def ddp(rank: int, broadcast_buffers: bool) -> dict[str, Any]:
    """DDP, 3 forwards per optimizer step (the first two under ``no_sync``); rank 1 has ``T = 0``
    in one of them and other batch sizes than rank 0 throughout."""
    torch.manual_seed(1234 + rank)  # other weights per rank: DDP starts every rank from rank 0's
    model = torch.nn.parallel.DistributedDataParallel(Model(), broadcast_buffers=broadcast_buffers)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(7 + rank)
    logits, bias = [], []
    for it in range(4):
        for micro in range(3):
            n = 0 if (rank == 1 and it == 1 and micro == 1) else (9 if rank == 0 else 6 + micro)
            x = torch.randn(n, 6, generator=gen)
            if micro < 2:
                with model.no_sync():
                    y, z = model(x)
                    y.square().sum().backward()
            else:
                y, z = model(x)
                y.square().sum().backward()
            logits.append(z.detach().tolist())
            bias.append(model.module.router.expert_bias.tolist())
        opt.step()
        opt.zero_grad()
    return {"logits": logits, "bias": bias, "step": model.module.router.step, "gate": model.module.gate.weight.tolist()}


def resume(rank: int, store: str) -> dict[str, Any]:
    """8 calls in one go against 5, a checkpoint saved by rank 0 and loaded by both, 3 more."""

    def run(r: MoERouter, n: int, gen: torch.Generator) -> list[list[float]]:
        out = []
        for _ in range(n):
            r(torch.randn(11 + 5 * rank, E, generator=gen) + SKEW)
            out.append(r.expert_bias.tolist())
        return out

    whole = run(router(rank), 8, torch.Generator().manual_seed(5 + rank))
    gen = torch.Generator().manual_seed(5 + rank)
    first = router(rank)
    run(first, 5, gen)
    path = store + ".ckpt"
    if rank == 0:
        torch.save(first.state_dict(), path)
    dist.barrier()
    second = router(rank)
    second.load_state_dict(torch.load(path))
    rest = run(second, 3, gen)
    return {"whole": whole[5:], "resumed": rest, "step": second.step}


def eval_alone(rank: int) -> dict[str, Any]:
    """Rank 0 evaluates alone between two training calls (a collective there would hang)."""
    gen = torch.Generator().manual_seed(40 + rank)
    r = router(rank)
    logits = []
    for _ in range(2):
        x = torch.randn(8, E, generator=gen) + SKEW * rank
        r(x)
        logits.append(x.tolist())
        if rank == 0 and len(logits) == 1:
            r.eval()
            for _ in range(3):
                r(torch.randn(8, E, generator=gen))
            r.train()
    return {"logits": logits, "bias": r.expert_bias.tolist(), "step": r.step}


def not_member(rank: int) -> str | None:
    group = dist.new_group([0])  # every rank calls new_group; rank 1 gets no group
    try:
        MoERouter(E, K, process_group=group)
    except ValueError as exc:
        return str(exc)
    return None


def phase(rank: int) -> dict[str, Any]:
    r = MoERouter(E, K, CAPS, method="phase", seed=3)
    gen = torch.Generator().manual_seed(rank)
    sizes = [13, 13, 7 + rank]
    experts = [r(torch.randn(n, E, generator=gen)).experts.tolist() for n in sizes]
    return {"sizes": sizes, "experts": experts, "step": r.step}


def main() -> None:
    rank, store = int(sys.argv[1]), sys.argv[2]
    # a collective that the other rank never joins raises after the timeout instead of hanging
    dist.init_process_group(
        "gloo", init_method="file://" + store, rank=rank, world_size=2, timeout=timedelta(seconds=30)
    )
    out = {
        "uneven": uneven(rank),
        "ddp": [ddp(rank, True), ddp(rank, False)],
        "resume": resume(rank, store),
        "eval_alone": eval_alone(rank),
        "not_member": not_member(rank),
        "phase": phase(rank),
    }
    print(json.dumps(out), flush=True)
    dist.destroy_process_group()
    os._exit(0)  # skip interpreter finalisation: torch's gloo threads can abort it


if __name__ == "__main__":
    main()
