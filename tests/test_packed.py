"""The packed layout of SPEC §15 (``layout="packed"``) against a plain loop oracle: offsets, row
positions, dispatch, combine, gradients, per-expert compute (loop and ``torch._grouped_mm``)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="torch not installed: gpu_phase_router.torch not exercised")

from gpu_phase_router.torch import MoERouter, RoutingPlan  # noqa: E402

pytestmark = pytest.mark.torch


# --- the oracle: SPEC §15 "Packed layout" as loops -------------------------------------------------------


def oracle_offsets(capacity: list[int]) -> list[int]:
    out = [0]
    for c in capacity:
        out.append(out[-1] + c)
    return out


def oracle_slots(experts: list[list[int]], capacity: list[int]) -> list[list[int]]:
    seen = [0] * len(capacity)
    slot = [[-1] * len(row) for row in experts]
    for t, row in enumerate(experts):
        for s, e in enumerate(row):
            if e >= 0:
                if seen[e] < capacity[e]:
                    slot[t][s] = seen[e]
                seen[e] += 1
    return slot


def oracle_packed_dispatch(experts, capacity, x: list[list[float]]) -> list[list[float]]:
    offsets, slot = oracle_offsets(capacity), oracle_slots(experts, capacity)
    out = [[0.0] * len(x[0]) for _ in range(offsets[-1])]
    for t, row in enumerate(experts):
        for s, e in enumerate(row):
            if slot[t][s] >= 0:
                out[offsets[e] + slot[t][s]] = list(x[t])
    return out


def oracle_packed_combine(experts, capacity, weights, y: list[list[float]]) -> list[list[float]]:
    offsets, slot = oracle_offsets(capacity), oracle_slots(experts, capacity)
    out = []
    for t, row in enumerate(experts):
        acc = [0.0] * len(y[0])
        for s, e in enumerate(row):
            if slot[t][s] >= 0:
                acc = [a + weights[t][s] * v for a, v in zip(acc, y[offsets[e] + slot[t][s]], strict=True)]
        out.append(acc)
    return out


# --- SPEC §15 test vector ---------------------------------------------------------------------------------


def test_spec_vector_packed():
    experts = torch.tensor([[0, 1], [1, 0], [1, 2], [0, -1], [2, 1]])
    plan = RoutingPlan.from_experts(experts, [3, 2, 2])
    assert plan.offsets == (0, 3, 5, 7) and plan.packed_size == 7
    assert plan.offsets_tensor.dtype == torch.int64 and plan.offsets_tensor.tolist() == [0, 3, 5, 7]
    x = torch.arange(5, dtype=torch.float64)[:, None] + 1  # token t's row is t + 1
    buf = plan.dispatch(x, layout="packed")
    assert buf.shape == (7, 1)
    assert (buf[:, 0] - 1).tolist() == [0, 1, 3, 0, 1, 2, 4]  # token of each row
    rows = torch.arange(7, dtype=torch.float64)[:, None]
    out = plan.combine(rows, layout="packed")  # weights 1/2 per kept slot: out[t] = (row(t,0) + row(t,1)) / 2
    row_of = [[0, 3], [4, 1], [-1, 5], [2, -1], [6, -1]]
    expected = [sum(r for r in pair if r >= 0) / 2 for pair in row_of]
    assert out[:, 0].tolist() == expected


# --- plan == oracle ---------------------------------------------------------------------------------------


CASES = [
    ("phase", 37, [1.0, 1.0, 0.5, 0.5], 2, 1.0),
    ("hash", 50, [1.0, 2.0, 0.0, 0.5, 0.5, 1.0], 3, 0.75),  # drops, duplicates and a zero-capacity expert
    ("systematic", 64, [8.0, 1, 1, 2, 1, 1, 2, 1], 2, 1.25),
    ("weighted_hash", 13, [1.0, 0.5, 0.25], 1, 2.0),
]


@pytest.mark.parametrize("method,n_tok,caps,k,h", CASES)
def test_packed_dispatch_combine_equal_oracle(method, n_tok, caps, k, h):
    router = MoERouter(len(caps), k, caps, method=method, capacity_factor=h, seed=3)
    gen = torch.Generator().manual_seed(n_tok)
    logits = torch.randn(n_tok, len(caps), generator=gen, dtype=torch.float64)
    plan = router(logits)
    capacity = router.hard_caps(n_tok).tolist()
    experts = plan.experts.tolist()
    assert list(plan.offsets) == oracle_offsets(capacity)
    assert plan.offsets_tensor.tolist() == oracle_offsets(capacity)
    x = torch.randn(n_tok, 3, generator=gen, dtype=torch.float64)
    buf = plan.dispatch(x, layout="packed")
    assert buf.tolist() == oracle_packed_dispatch(experts, capacity, x.tolist())
    y = torch.randn(plan.packed_size, 2, generator=gen, dtype=torch.float64)
    expected = torch.tensor(
        oracle_packed_combine(experts, capacity, plan.weights.tolist(), y.tolist()), dtype=torch.float64
    )
    assert torch.allclose(plan.combine(y, layout="packed"), expected, rtol=1e-12, atol=1e-12)
    # the padded layout holds the same rows, padded with zeros to C
    padded = plan.dispatch(x)
    for e, (a, b) in enumerate(zip(plan.offsets[:-1], plan.offsets[1:], strict=True)):
        assert torch.equal(padded[e, : b - a], buf[a:b])
        assert not padded[e, b - a :].any()
    assert plan.packed_size <= plan.num_experts * plan.buffer_size


def test_packed_gradcheck():
    router = MoERouter(5, 2, [1, 1, 2, 0.5, 0], method="hash", capacity_factor=0.75, seed=2)
    experts = router.routes(12, seed=2)
    caps = router.hard_caps(12)
    logits = torch.randn(12, 5, dtype=torch.float64, requires_grad=True)
    plan = RoutingPlan.from_experts(experts, caps, logits)
    assert (~plan.kept).any() and plan.offsets[-1] > 0, "the case must drop slots"
    x = torch.randn(12, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(plan.packed_size, 3, dtype=torch.float64, requires_grad=True)

    def dispatch(x_):
        return plan.dispatch(x_, layout="packed")

    def layer(lg, x_, y_):
        p = RoutingPlan.from_experts(experts, caps, lg)
        return p.combine(y_ * p.dispatch(x_, layout="packed").sum(dim=1, keepdim=True), layout="packed")

    assert torch.autograd.gradcheck(dispatch, (x,))
    assert torch.autograd.gradcheck(layer, (logits, x, y))


def test_expert_rows_and_grouped_mm_equal_loop():
    router = MoERouter(6, 2, [4.0, 1, 1, 2, 0, 1], method="systematic", seed=1)
    x = torch.randn(96, 8)
    plan = router(num_tokens=96)
    buf = plan.dispatch(x, layout="packed")
    rows = plan.expert_rows(buf)
    assert [r.shape[0] for r in rows] == router.hard_caps(96).tolist()
    assert all(r.data_ptr() == buf[a:].data_ptr() for r, a in zip(rows, plan.offsets, strict=False) if r.numel())
    w = torch.randn(6, 8, 16)
    looped = torch.cat([r @ w[e] for e, r in enumerate(rows)])
    by_slices = torch.cat(
        [buf[a:b] @ w[e] for e, (a, b) in enumerate(zip(plan.offsets[:-1], plan.offsets[1:], strict=True))]
    )
    assert torch.equal(looped, by_slices)
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no torch._grouped_mm")
    grouped = torch._grouped_mm(buf, w, offs=plan.offsets_tensor[1:].to(torch.int32))
    assert torch.allclose(grouped, looped, rtol=1e-5, atol=1e-5)


def test_router_offsets_are_host_values_without_a_read():
    router = MoERouter(4, 2, [1.0, 1.0, 0.5, 0.5], method="phase")
    plan = router(num_tokens=40)
    assert isinstance(plan.offsets, tuple) and all(type(v) is int for v in plan.offsets)
    assert list(plan.offsets) == oracle_offsets(router.hard_caps(40).tolist())


def test_layout_errors_name_the_argument():
    plan = RoutingPlan.from_experts(torch.tensor([[0, 1], [1, 0]]), [2, 1])
    x = torch.randn(2, 3)
    for bad in ("dense", None, 1):
        with pytest.raises(ValueError, match="layout"):
            plan.dispatch(x, layout=bad)
        with pytest.raises(ValueError, match="layout"):
            plan.combine(torch.randn(3, 3), layout=bad)
    with pytest.raises(ValueError, match="y must be"):
        plan.combine(torch.randn(2, 2, 3), layout="packed")
    with pytest.raises(ValueError, match="y must be"):
        plan.combine(torch.randn(4, 3), layout="packed")
    with pytest.raises(ValueError, match="y must be"):
        plan.combine(torch.randn(3, 3))  # the padded default wants [E, C, d]
    with pytest.raises(ValueError, match="buf"):
        plan.expert_rows(torch.randn(4, 3))
    with pytest.raises(ValueError, match="capacity"):  # hard caps are whole numbers
        RoutingPlan.from_experts(torch.tensor([[0]]), [1.5])
    with pytest.raises(ValueError, match="capacity"):
        RoutingPlan.from_experts(torch.tensor([[0]]), [-1])


@pytest.mark.gpu
def test_cuda_packed_without_sync():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    pytest.importorskip("cupy", reason="the CUDA backend needs CuPy")
    router = MoERouter(16, 2, [8.0] + [2.0] * 3 + [1.0] * 12, method="systematic", seed=4)
    logits = torch.randn(4096, 16, device="cuda", requires_grad=True)
    expected = MoERouter(16, 2, [8.0] + [2.0] * 3 + [1.0] * 12, method="systematic", seed=4)(logits.detach().cpu())
    router(logits)  # first call for this batch size: caches the hard caps on the device
    router.step = 0
    x = torch.randn(4096, 64, device="cuda", requires_grad=True)
    w = torch.randn(16, 64, 64, device="cuda", requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        plan = router(logits)
        buf = plan.dispatch(x, layout="packed")
        y = torch.cat([r @ w[e] for e, r in enumerate(plan.expert_rows(buf))])
        plan.combine(y, layout="packed").sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert plan.offsets == expected.offsets
    w_cpu = w.detach().cpu()
    rows = expected.expert_rows(expected.dispatch(x.detach().cpu(), "packed"))
    ref = expected.combine(torch.cat([r @ w_cpu[e] for e, r in enumerate(rows)]), layout="packed")
    out = plan.combine(y, layout="packed")
    assert torch.allclose(out.detach().cpu(), ref, rtol=1e-3, atol=1e-3)
    assert x.grad is not None and w.grad is not None and logits.grad is not None


@pytest.mark.gpu
def test_cuda_grouped_mm_on_packed_buffer_equals_loop():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no torch._grouped_mm")
    plan = MoERouter(8, 2, [4.0, 2, 1, 1, 1, 1, 2, 0.5], method="phase")(num_tokens=2048, device="cuda")
    x = torch.randn(2048, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(8, 128, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    buf = plan.dispatch(x, layout="packed")
    grouped = torch._grouped_mm(buf, w, offs=plan.offsets_tensor[1:].to(torch.int32))
    looped = torch.cat([r @ a for r, a in zip(plan.expert_rows(buf), w.unbind(0), strict=True)])
    assert torch.allclose(grouped.float(), looped.float(), rtol=2e-2, atol=2e-1)
    grouped.backward(torch.ones_like(grouped))
    assert x.grad is not None and w.grad is not None
