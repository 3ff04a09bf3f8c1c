"""Expert parallelism: each rank routes its own tokens, experts live on different ranks.

    torchrun --nproc-per-node 2 examples/expert_parallel.py                  # CPU processes, gloo
    torchrun --nproc-per-node 1 examples/expert_parallel.py --backend nccl   # one process per GPU

8 experts, 4 of them at twice the capacity, placed as ExpertParallel's default (expert e on rank
e * world // E): with 2 ranks, rank 0 holds the large experts and receives twice the rows.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from gpu_phase_router.torch import ExpertParallel, MoERouter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu")
    if args.backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    n_exp, k, d, n_tok = 8, 2, 64, 1024
    torch.manual_seed(0)  # the same gate and expert weights on every rank
    router = MoERouter(n_exp, k, capacities=[2.0] * 4 + [1.0] * 4, method="systematic", seed=rank)
    ep = ExpertParallel()  # the world group; expert e on rank e * world // E
    mine = list(ep.local_experts(n_exp))
    gate = torch.nn.Linear(d, n_exp).to(device)
    w = torch.nn.Parameter((torch.randn(n_exp, d, d) / d**0.5)[mine].to(device))  # this rank's experts
    gen = torch.Generator(device).manual_seed(100 + rank)  # each rank its own tokens
    for _ in range(args.steps):
        x = torch.randn(n_tok, d, device=device, generator=gen)
        plan = router(gate(x))
        buf, handle = ep.dispatch(plan, x)  # [sum over my experts of world * cap, d], from every rank
        y = torch.cat([rows @ w[i] for i, rows in enumerate(handle.expert_rows(buf))])
        out = ep.combine(handle, y)  # [T, d] for this rank's tokens
        loss = (out - x.flip(1)).pow(2).mean() / world  # this rank's share of the global mean
        loss.backward()
        with torch.no_grad():
            for p in [*gate.parameters(), w]:  # plain SGD (any optimizer works the same way)
                assert p.grad is not None
                if p is not w:  # the gate is replicated: sum its gradient over ranks (DDP does this)
                    dist.all_reduce(p.grad)
                p -= 0.05 * p.grad
                p.grad = None
    print(f"rank {rank}/{world}: experts {mine}, {buf.shape[0]} local rows, loss {loss.item() * world:.4f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
