"""ExpertParallel (SPEC §15, expert-parallel exchange): 2 and 4 gloo processes give the
single-process packed layer's outputs and gradients; the torchrun example runs; errors; CUDA/NCCL
without a host read."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="torch not installed: gpu_phase_router.torch not exercised")

from _ep_worker import CONFIGS, expert, inputs, router  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "_ep_worker.py"
CHECKS_WORKER = Path(__file__).resolve().parent / "_ep_checks_worker.py"
pytestmark = pytest.mark.torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(world: int, argv: list[str], timeout: float = 240) -> list[str]:
    """Run ``argv`` as ``world`` gloo ranks (the environment torchrun sets); their stdout."""
    port = _free_port()
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        procs.append(
            subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    outs = []
    try:
        for rank, proc in enumerate(procs):
            out, err = proc.communicate(timeout=timeout)
            assert proc.returncode == 0, f"rank {rank} failed:\n{err[-3000:]}"
            outs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return outs


def _reference(cfg, world):
    """The single-process packed layer on every rank's tokens: plans, outputs, gradients."""
    data = [inputs(cfg, r) for r in range(world)]
    w1 = data[0]["w1"].clone().requires_grad_()
    w2 = data[0]["w2"].clone().requires_grad_()
    plans, outs, loss = [], [], 0
    for r in range(world):
        data[r]["x"].requires_grad_()
        data[r]["logits"].requires_grad_()
        plan = router(cfg, r)(data[r]["logits"])
        buf = plan.dispatch(data[r]["x"], layout="packed")
        y = torch.cat([expert(rows, w1[e], w2[e]) for e, rows in enumerate(plan.expert_rows(buf))])
        out = plan.combine(y, layout="packed")
        loss = loss + (out * data[r]["target"]).sum()
        plans.append((plan, buf.detach()))
        outs.append(out.detach())
    loss.backward()
    return data, plans, outs, w1.grad, w2.grad


@pytest.mark.subprocess
@pytest.mark.parametrize("world", sorted(CONFIGS))
def test_gloo_ranks_equal_single_process(world, tmp_path):
    _launch(world, [sys.executable, str(WORKER), str(tmp_path)])
    for cfg in CONFIGS[world]:
        n_exp = len(cfg["caps"])
        placement = cfg["ranks"] or [e * world // n_exp for e in range(n_exp)]
        data, plans, outs, w1_grad, w2_grad = _reference(cfg, world)
        caps = router(cfg, 0).hard_caps(cfg["T"]).tolist()
        offsets = plans[0][0].offsets
        seen = set()
        for r in range(world):
            got = torch.load(tmp_path / f"rank{r}_{cfg['name']}.pt")
            mine = [e for e in range(n_exp) if placement[e] == r]
            assert list(got["experts"]) == mine, cfg["name"]
            seen.update(mine)
            # integer parts: the local buffer is SPEC's row layout of the source ranks' packed rows
            local = [0]
            for e in mine:
                local.append(local[-1] + world * caps[e])
            assert list(got["offsets"]) == local
            expected_buf = torch.zeros(local[-1], got["buf"].shape[1], dtype=torch.float64)
            for i, e in enumerate(mine):
                for src in range(world):
                    rows = plans[src][1][offsets[e] : offsets[e] + caps[e]]
                    expected_buf[local[i] + src * caps[e] : local[i] + (src + 1) * caps[e]] = rows
            assert torch.equal(got["buf"], expected_buf), cfg["name"]
            # floats, to rounding: outputs and gradients of x, the logits and the rank's experts
            tol = {"rtol": 1e-10, "atol": 1e-10}
            assert torch.allclose(got["out"], outs[r], **tol), cfg["name"]
            assert torch.allclose(got["x_grad"], data[r]["x"].grad, **tol), cfg["name"]
            assert torch.allclose(got["logits_grad"], data[r]["logits"].grad, **tol), cfg["name"]
            if mine:
                assert torch.allclose(got["w1_grad"], w1_grad[mine], **tol), cfg["name"]
                assert torch.allclose(got["w2_grad"], w2_grad[mine], **tol), cfg["name"]
        assert seen == set(range(n_exp))
        assert any(bool(plans[r][0].kept.logical_not().any()) for r in range(world)) or cfg["method"] != "hash"


@pytest.mark.subprocess
def test_example_runs_on_two_gloo_ranks():
    """examples/expert_parallel.py under the environment torchrun gives it (2 ranks, gloo)."""
    outs = _launch(2, [sys.executable, str(ROOT / "examples" / "expert_parallel.py"), "--steps", "3"])
    lines = [line for out in outs for line in out.splitlines() if line.startswith("rank ")]
    assert len(lines) == 2 and "experts [0, 1, 2, 3]" in lines[0] and "experts [4, 5, 6, 7]" in lines[1]
    losses = [float(line.rsplit("loss ", 1)[1]) for line in lines]
    assert all(0 < v < 10 for v in losses)


def test_errors_name_the_argument(monkeypatch):
    import torch.distributed as dist

    from gpu_phase_router.torch import ExpertParallel, MoERouter

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(ValueError, match="group"):
        ExpertParallel()
    port = _free_port()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        for bad in ([0, 1], [-1], [[0]], [0.5]):
            with pytest.raises(ValueError, match="expert_ranks"):
                ExpertParallel(None, bad)
        ep = ExpertParallel(None, [0, 0, 0])
        plan = MoERouter(4, 2, method="phase")(num_tokens=8)
        with pytest.raises(ValueError, match="expert_ranks"):
            ep.dispatch(plan, torch.randn(8, 3))
        ep = ExpertParallel()
        with pytest.raises(TypeError, match="plan"):
            ep.dispatch("plan", torch.randn(8, 3))
        with pytest.raises(ValueError, match="x must be"):
            ep.dispatch(plan, torch.randn(7, 3))
        buf, handle = ep.dispatch(plan, torch.randn(8, 3))
        assert buf.shape == (plan.packed_size, 3)  # one rank: the packed buffer itself
        with pytest.raises(ValueError, match="y must be"):
            ep.combine(handle, torch.randn(plan.packed_size + 1, 3))
        with pytest.raises(TypeError, match="handle"):
            ep.combine(plan, buf)
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
def test_nccl_dispatch_and_combine_without_sync():
    """One-rank NCCL group on a GPU: router, dispatch, experts, combine and backward with torch's
    sync debug mode set to error (after a first call that caches the caps and checks the ranks)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    pytest.importorskip("cupy", reason="the CUDA backend needs CuPy")
    import torch.distributed as dist

    from gpu_phase_router.torch import ExpertParallel, MoERouter

    if not dist.is_nccl_available() or dist.is_initialized():
        pytest.skip("NCCL not available, or a process group already exists")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        caps = [8.0] + [2.0] * 3 + [1.0] * 12
        router = MoERouter(16, 2, caps, method="systematic", seed=4)
        ep = ExpertParallel(None, [0] * 16)
        w = torch.randn(16, 64, 64, device="cuda", requires_grad=True)
        logits = torch.randn(4096, 16, device="cuda", requires_grad=True)
        x = torch.randn(4096, 64, device="cuda", requires_grad=True)

        def step():
            plan = router(logits)
            buf, handle = ep.dispatch(plan, x)
            y = torch.cat([rows @ w[i] for i, rows in enumerate(handle.expert_rows(buf))])
            out = ep.combine(handle, y)
            out.sum().backward()
            return plan, out

        step()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            plan, out = step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        ref = plan.combine(
            torch.cat([r @ w[e] for e, r in enumerate(plan.expert_rows(plan.dispatch(x, "packed")))]), "packed"
        )
        assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4)
    finally:
        dist.destroy_process_group()


@pytest.mark.subprocess
def test_expert_parallel_checks():
    """Two gloo ranks: second-order gradients through the exchange equal the single-process layer's;
    disagreeing placements, and batch sizes that differ after a first call, raise ValueError on
    every rank (a hang until the timeout before); integer expert outputs raise TypeError."""
    outs = _launch(2, [sys.executable, str(CHECKS_WORKER)], timeout=120)
    for rank, out in enumerate(outs):
        got = {line.split()[1] for line in out.splitlines() if line.startswith("ok ")}
        assert got == {"second_order", "placement", "batch_sizes", "integer_y"}, (rank, out)
