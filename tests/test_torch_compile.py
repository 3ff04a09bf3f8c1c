"""torch.compile of a model containing MoERouter (SPEC §15): compiled plans and training equal
eager ones, no recompilation per step, meta tensors, and the registered custom op."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch", reason="torch not installed: gpu_phase_router.torch not exercised")

from gpu_phase_router.torch import MoERouter  # noqa: E402

pytestmark = pytest.mark.torch

METHODS = ["phase", "systematic", "weighted_hash", "hash", "topk"]
T, E, K, D = 48, 6, 2, 8
CAPS = [2.0, 1.0, 1.0, 1.0, 0.5, 0.5]


class MoELayer(torch.nn.Module):
    """Gate → MoERouter → dispatch → per-expert linear map → combine; returns (out, plan parts)."""

    def __init__(self, method: str, seed: int = 2**64 - 2) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.gate = torch.nn.Linear(D, E)
        with torch.no_grad():
            self.gate.weight.copy_(torch.randn(E, D, generator=gen) * 0.3)
            self.gate.bias.zero_()
        self.router = MoERouter(E, K, CAPS, method=method, seed=seed, capacity_factor=1.0)
        self.w = torch.nn.Parameter(torch.randn(E, D, D, generator=gen) * 0.2)

    def forward(self, x: torch.Tensor):
        plan = self.router(self.gate(x))
        y = plan.combine(torch.bmm(plan.dispatch(x), self.w))
        return y, plan.experts, plan.slot, plan.tokens_per_expert


def _train(model, steps: int, data: list[torch.Tensor]):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    record = []
    for i in range(steps):
        y, experts, slot, loads = model(data[i])
        loss = (y - data[i]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        record.append((experts.clone(), slot.clone(), loads.clone(), loss.detach().clone()))
    return record


def _data(steps: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(T, D, generator=gen) for _ in range(steps)]


@pytest.mark.parametrize("method", METHODS)
def test_compiled_training_equals_eager(method):
    """aot_eager, fullgraph=True: every method (the content-blind ones through the custom op)."""
    torch._dynamo.reset()
    eager = MoELayer(method)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
    data = _data(3)
    want = _train(eager, 3, data)
    got = _train(compiled, 3, data)
    for (e0, s0, l0, loss0), (e1, s1, l1, loss1) in zip(want, got, strict=True):
        assert torch.equal(e0, e1) and torch.equal(s0, s1) and torch.equal(l0, l1)
        torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-6)
    for p0, p1 in zip(eager.parameters(), compiled_model.parameters(), strict=True):
        torch.testing.assert_close(p1, p0, rtol=1e-5, atol=1e-6)
    assert eager.router.step == compiled_model.router.step == 3
    if method != "topk":  # successive steps route with successive seeds
        assert not torch.equal(want[0][0], want[1][0])


@pytest.mark.parametrize("method", ["phase", "topk"])
def test_compiled_training_does_not_recompile_per_step(method):
    torch._dynamo.reset()
    model = torch.compile(MoELayer(method), backend="aot_eager", fullgraph=True)
    data = _data(6)
    _train(model, 1, data)  # the first call compiles
    with torch._dynamo.config.patch(error_on_recompile=True):
        _train(model, 5, data[1:])
    # evaluation between steps: one more graph for eval mode, then both are reused
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for _ in range(3):
        model.eval()
        with torch.no_grad():
            model(data[0])
        model.train()
        _train(model, 1, data)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - frames <= 1
    assert model.router.step == 9  # eval calls do not advance the step


def test_compiled_eval_calls_do_not_advance_step():
    torch._dynamo.reset()
    layer = MoELayer("hash")
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    layer.eval()
    x = _data(1)[0]
    first = compiled(x)[1]
    second = compiled(x)[1]
    assert layer.router.step == 0 and torch.equal(first, second)


def test_inductor_backend():
    """The default backend (Inductor, C++ code generation on CPU) on one small model."""
    torch._dynamo.reset()
    eager = MoELayer("phase")
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model)
    data = _data(2)
    for (e0, s0, _, loss0), (e1, s1, _, loss1) in zip(_train(eager, 2, data), _train(compiled, 2, data), strict=True):
        assert torch.equal(e0, e1) and torch.equal(s0, s1)
        torch.testing.assert_close(loss1, loss0, rtol=1e-4, atol=1e-5)


def test_custom_op_passes_opcheck():
    """The registered op's schema, fake implementation and dispatch agree (torch.library.opcheck)."""
    op = torch.ops.gpu_phase_router.uniform_routes.default
    args = (torch.empty(0), torch.tensor(3), "phase", 20, [1.0, 2.0, 1.0], 2, 7, 1, None)
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
    got = op(*args)
    want = MoERouter(3, 2, [1.0, 2.0, 1.0], method="phase").routes(20, (7 + (1 << 32) + 3))
    assert got.dtype == torch.int64 and torch.equal(got, want)


@pytest.mark.parametrize("method", METHODS)
def test_meta_tensor_gives_meta_plan(method):
    router = MoERouter(E, K, CAPS, method=method)
    logits = torch.empty(T, E, device="meta")
    plan = router(logits)
    assert plan.experts.device.type == "meta" and plan.experts.shape == (T, K)
    assert plan.slot.shape == (T, K) and plan.weights.shape == (T, K) and plan.weights.device.type == "meta"
    assert plan.tokens_per_expert.shape == (E,)
    buf = plan.dispatch(torch.empty(T, D, device="meta"))
    assert buf.shape == (E, plan.buffer_size, D) and buf.device.type == "meta"
    assert plan.combine(buf).shape == (T, D)
    if method != "topk":
        plan = router(num_tokens=T, device="meta")
        assert plan.experts.device.type == "meta" and plan.experts.shape == (T, K)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["phase", "topk"])
def test_cuda_compiled_training_equals_eager(method):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if method != "topk":
        pytest.importorskip("cupy", reason="the CUDA backend needs CuPy")
    torch._dynamo.reset()
    eager = MoELayer(method).cuda()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    data = [x.cuda() for x in _data(3)]
    for (e0, s0, _, loss0), (e1, s1, _, loss1) in zip(_train(eager, 3, data), _train(compiled, 3, data), strict=True):
        if method != "topk":
            assert torch.equal(e0, e1) and torch.equal(s0, s1)
        torch.testing.assert_close(loss1, loss0, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("dynamic,fullgraph", [(False, True), (None, False)])
def test_compiled_batch_size_changes(dynamic, fullgraph):
    """The hard caps depend on T: a new batch size compiles once more (dynamic=False keeps
    fullgraph=True possible; the default dynamic=None falls back around the caps)."""
    torch._dynamo.reset()
    eager = MoELayer("phase")
    compiled = torch.compile(copy.deepcopy(eager), backend="aot_eager", dynamic=dynamic, fullgraph=fullgraph)
    gen = torch.Generator().manual_seed(2)
    for n_tok in (T, T // 2, T + 8, T // 2):
        x = torch.randn(n_tok, D, generator=gen)
        y0, e0, s0, _ = eager(x)
        y1, e1, s1, _ = compiled(x)
        assert torch.equal(e0, e1) and torch.equal(s0, s1)
        torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["topk", "phase"])
def test_default_compile_makes_one_graph(method):
    """Without fullgraph=True (how most models are compiled) the router adds no graph break: host
    values (shares, caps, packed offsets) stay Python constants instead of traced NumPy calls."""
    torch._dynamo.reset()
    explained = torch._dynamo.explain(MoELayer(method))(_data(1)[0])
    assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]
    assert explained.graph_count == 1
