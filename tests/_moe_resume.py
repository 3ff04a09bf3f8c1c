"""A small MoE training run for the resume test: run as a script, it loads a checkpoint into a
model built with another seed and continues (``python _moe_resume.py CKPT STEPS OUT``)."""

from __future__ import annotations

import sys

import torch

from gpu_phase_router.torch import MoERouter

T, E, K, D = 40, 5, 2, 6


class MoELayer(torch.nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.gate = torch.nn.Linear(D, E)
        self.router = MoERouter(E, K, [2.0, 1.0, 1.0, 0.5, 0.5], method="phase", seed=seed, capacity_factor=1.0)
        self.w = torch.nn.Parameter(torch.randn(E, D, D) * 0.2)

    def forward(self, x: torch.Tensor):
        plan = self.router(self.gate(x))
        return plan.combine(torch.bmm(plan.dispatch(x), self.w)), plan


def batch(step: int) -> torch.Tensor:
    return torch.randn(T, D, generator=torch.Generator().manual_seed(100 + step))


def train(model: MoELayer, opt: torch.optim.Optimizer, first: int, steps: int, evaluate: bool) -> list[list[int]]:
    """Train ``steps`` steps from step ``first``; with ``evaluate``, an eval forward before each."""
    experts = []
    for i in range(first, first + steps):
        if evaluate:
            model.eval()
            with torch.no_grad():
                model(batch(1000 + i))
            model.train()
        y, plan = model(batch(i))
        loss = (y - batch(i)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        experts.append(plan.experts.flatten().tolist())
    return experts


def make(seed: int) -> tuple[MoELayer, torch.optim.Optimizer]:
    model = MoELayer(seed)
    return model, torch.optim.Adam(model.parameters(), lr=0.01)


if __name__ == "__main__":
    ckpt, steps, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    model, opt = make(seed=0)  # the checkpoint restores the seed
    state = torch.load(ckpt)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    experts = train(model, opt, state["done"], steps, evaluate=True)
    torch.save({"experts": experts, "params": [p.detach() for p in model.parameters()]}, out)
