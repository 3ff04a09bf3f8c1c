"""One rank of tests/test_expert_parallel.py::test_expert_parallel_checks (2 gloo ranks).

Prints ``ok <name>`` for each check that holds on this rank: second-order gradients through the
exchange equal the single-process layer's, ranks whose placements or (after a first call) batch
sizes disagree get a ValueError instead of a hang, and integer expert outputs a TypeError.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from gpu_phase_router.torch import ExpertParallel, MoERouter


def _randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _layer(router, w, x, ep):
    plan = router(num_tokens=x.shape[0], weight_dtype=torch.float64)
    if ep is None:  # every expert here: the single-process packed layer
        buf = plan.dispatch(x, layout="packed")
        return plan.combine(torch.cat([torch.tanh(r @ w[e]) for e, r in enumerate(plan.expert_rows(buf))]), "packed")
    buf, handle = ep.dispatch(plan, x)
    rows = zip(handle.experts, handle.expert_rows(buf), strict=True)
    return ep.combine(handle, torch.cat([torch.tanh(r @ w[e]) for e, r in rows]))


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    router = MoERouter(3, 2, method="systematic").eval()
    w = _randn(7, 3, 2, 2)
    penalties = []
    for ep in (None, ExpertParallel()):
        x = _randn(rank, 4, 2).requires_grad_()
        loss = (_layer(router, w, x, ep) + x**3).square().sum()
        (gx,) = torch.autograd.grad(loss, x, create_graph=True)
        (hx,) = torch.autograd.grad(gx.square().sum(), x)  # a gradient penalty: second order
        penalties.append(hx)
    torch.testing.assert_close(penalties[1], penalties[0], rtol=1e-10, atol=1e-10)
    print("ok second_order", flush=True)

    placed = ExpertParallel(None, [0, 1, 1] if rank == 0 else [1, 0, 1])
    try:
        placed.dispatch(router(num_tokens=4), _randn(rank, 4, 2))
    except ValueError as exc:
        assert "expert_ranks" in str(exc), exc
        print("ok placement", flush=True)

    ep = ExpertParallel()
    ep.dispatch(router(num_tokens=8), _randn(rank, 8, 2))  # caps of T = 8 seen (and cached) by both
    n_tok = 8 if rank == 0 else 6  # a short last batch on one rank
    try:
        ep.dispatch(router(num_tokens=n_tok), _randn(rank, n_tok, 2))
    except ValueError as exc:
        assert "hard caps" in str(exc), exc
        print("ok batch_sizes", flush=True)

    plan = router(num_tokens=4)
    buf, handle = ep.dispatch(plan, _randn(rank, 4, 2))
    try:
        ep.combine(handle, buf.round().long())
    except TypeError as exc:
        assert "y must have a floating dtype" in str(exc), exc
        print("ok integer_y", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)  # skip interpreter finalisation: torch's gloo threads can abort it ("terminate called ...")
