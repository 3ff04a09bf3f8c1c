"""gpu_phase_router.torch (SPEC §15): the MoE training plan against a plain loop oracle, dtypes,
gradients, capacity, determinism per step, resume, errors, and imports."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch", reason="torch not installed: gpu_phase_router.torch not exercised")

import gpu_phase_router as gpr  # noqa: E402
from gpu_phase_router.torch import MoERouter, RoutingPlan, router_methods  # noqa: E402

pytestmark = pytest.mark.torch

METHODS = ["phase", "systematic", "weighted_hash", "hash"]


# --- the oracle: SPEC §15 written as loops ---------------------------------------------------------


def oracle_caps(caps: list[float], n_tok: int, k: int, h: float) -> list[int]:
    total = sum(caps)  # the test capacities are small binary fractions: every sum order is exact
    return [0 if c == 0 else max(1, math.ceil(c / total * n_tok * k * h)) for c in caps]


def oracle_plan(experts: list[list[int]], capacity: list[int], logits: list[list[float]] | None):
    n_tok, k = len(experts), len(experts[0])
    seen = [0] * len(capacity)
    slot = [[-1] * k for _ in range(n_tok)]
    for t in range(n_tok):
        for s in range(k):
            e = experts[t][s]
            if e < 0:
                continue
            if seen[e] < capacity[e]:
                slot[t][s] = seen[e]
            seen[e] += 1
    loads = [min(seen[e], capacity[e]) for e in range(len(capacity))]
    weights = []
    for t in range(n_tok):
        kept = [s for s in range(k) if slot[t][s] >= 0]
        if logits is None:
            weights.append([1.0 / k if s in kept else 0.0 for s in range(k)])
            continue
        z = sum(math.exp(v) for v in logits[t])
        p = [math.exp(v) / z for v in logits[t]]
        norm = sum(p[experts[t][s]] for s in kept)
        weights.append([p[experts[t][s]] / norm if s in kept else 0.0 for s in range(k)])
    return slot, loads, weights


def oracle_dispatch(experts, slot, n_exp, cap, x):
    out = [[[0.0] * len(x[0]) for _ in range(cap)] for _ in range(n_exp)]
    for t, row in enumerate(experts):
        for s, e in enumerate(row):
            if slot[t][s] >= 0:
                out[e][slot[t][s]] = list(x[t])
    return out


def oracle_combine(experts, slot, weights, y):
    d = len(y[0][0])
    out = []
    for t, row in enumerate(experts):
        acc = [0.0] * d
        for s, e in enumerate(row):
            if slot[t][s] >= 0:
                acc = [a + weights[t][s] * v for a, v in zip(acc, y[e][slot[t][s]], strict=True)]
        out.append(acc)
    return out


# --- SPEC §15 test vector ------------------------------------------------------------------------------


def test_spec_vector():
    experts = torch.tensor([[0, 1], [1, 0], [1, 2], [0, -1], [2, 1]])
    router = MoERouter(3, 2, [2, 1, 1], capacity_factor=0.5)
    caps = router.hard_caps(5)
    assert caps.tolist() == [3, 2, 2]
    plan = RoutingPlan.from_experts(experts, caps)
    assert plan.buffer_size == 3
    assert plan.slot.tolist() == [[0, 0], [1, 1], [-1, 0], [2, -1], [1, -1]]
    assert plan.tokens_per_expert.tolist() == [3, 2, 2]
    assert plan.weights.tolist() == [[0.5, 0.5], [0.5, 0.5], [0, 0.5], [0.5, 0], [0.5, 0]]
    logits = torch.zeros(5, 3, dtype=torch.float64)
    logits[0, 0] = math.log(3)
    plan = RoutingPlan.from_experts(experts, caps, logits)
    expected = [[0.75, 0.25], [0.5, 0.5], [0, 1], [1, 0], [1, 0]]
    assert torch.allclose(plan.weights, torch.tensor(expected, dtype=torch.float64), atol=1e-15)


# --- plan == oracle ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n_tok,n_exp,k,h", [(37, 4, 2, 1.0), (64, 8, 2, 0.5), (50, 6, 3, 1.25), (13, 5, 1, 2.0)])
def test_plan_equals_oracle(method, n_tok, n_exp, k, h):
    caps = [1.0] * (n_exp // 2) + [0.5] * (n_exp - n_exp // 2)
    router = MoERouter(n_exp, k, caps, method=method, capacity_factor=h, seed=5)
    router.step = 3
    gen = torch.Generator().manual_seed(n_tok)
    logits = torch.randn(n_tok, n_exp, generator=gen, dtype=torch.float64)
    plan = router(logits)
    assert router.step == 4
    expected_routes = gpr.route(np.ones(n_tok), caps, k=k, seed=8, method=method, backend="cpu")
    assert plan.experts.dtype == torch.int64
    assert plan.experts.tolist() == expected_routes.tolist()
    capacity = oracle_caps(caps, n_tok, k, h)
    assert plan.capacity.tolist() == capacity
    assert plan.buffer_size == max(capacity)
    slot, loads, weights = oracle_plan(plan.experts.tolist(), capacity, logits.tolist())
    assert plan.slot.tolist() == slot
    assert plan.tokens_per_expert.tolist() == loads
    assert np.allclose(plan.weights.detach().numpy(), weights, rtol=1e-12, atol=1e-15)
    # the kept slots are SPEC §12's enforcement of the same routes
    enforced = gpr.enforce_capacity(expected_routes, np.asarray(capacity))
    assert (plan.slot >= 0).numpy().tolist() == (enforced >= 0).tolist()

    x = torch.randn(n_tok, 3, generator=gen, dtype=torch.float64)
    buf = plan.dispatch(x)
    assert buf.shape == (n_exp, max(capacity), 3)
    assert np.allclose(buf.numpy(), oracle_dispatch(plan.experts.tolist(), slot, n_exp, max(capacity), x.tolist()))
    y = torch.randn(n_exp, max(capacity), 3, generator=gen, dtype=torch.float64)
    out = plan.combine(y)
    assert np.allclose(out.detach().numpy(), oracle_combine(plan.experts.tolist(), slot, weights, y.tolist()))


def test_plan_with_drops_and_duplicates_equals_oracle():
    """Random routes with -1 slots and repeated experts in a row, tight caps: many drops."""
    rng = np.random.default_rng(3)
    experts = rng.integers(-1, 5, size=(40, 3))
    capacity = [3, 0, 5, 1, 8]
    logits = torch.from_numpy(rng.normal(size=(40, 5)))
    plan = RoutingPlan.from_experts(torch.from_numpy(experts), capacity, logits)
    slot, loads, weights = oracle_plan(experts.tolist(), capacity, logits.tolist())
    assert plan.slot.tolist() == slot
    assert plan.tokens_per_expert.tolist() == loads
    assert np.allclose(plan.weights.numpy(), weights, rtol=1e-12, atol=1e-15)
    x = torch.from_numpy(rng.normal(size=(40, 2)))
    buf = plan.dispatch(x)
    assert np.allclose(buf.numpy(), oracle_dispatch(experts.tolist(), slot, 5, 8, x.tolist()))
    y = torch.from_numpy(rng.normal(size=(5, 8, 2)))
    assert np.allclose(plan.combine(y).numpy(), oracle_combine(experts.tolist(), slot, weights, y.tolist()))
    rows_without = [t for t in range(40) if all(s < 0 for s in slot[t])]
    assert rows_without, "the case must contain a row with no kept slot"
    assert plan.weights[rows_without].abs().sum() == 0  # zeros, no NaN


def test_num_tokens_only_call():
    router = MoERouter(8, 2, method="systematic", seed=1)
    plan = router(num_tokens=100)
    assert router.step == 1
    assert plan.experts.tolist() == gpr.route(np.ones(100), np.ones(8), k=2, seed=1, method="systematic").tolist()
    slot, loads, weights = oracle_plan(plan.experts.tolist(), oracle_caps([1.0] * 8, 100, 2, 1.25), None)
    assert plan.slot.tolist() == slot and plan.tokens_per_expert.tolist() == loads
    assert plan.weights.dtype == torch.float32 and plan.weights.tolist() == weights
    plan64 = router(num_tokens=100, weight_dtype=torch.float64)
    assert plan64.weights.dtype == torch.float64


def test_topk_baseline():
    """balance=None, overflow="drop": torch.topk's experts; each expert keeps its highest-logit
    slots (SPEC §16; the full rule is checked against a loop oracle in test_learned_router)."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(30, 6, generator=gen)
    router = MoERouter(
        6, 2, [1, 1, 1, 0.5, 0.5, 0.5], method="topk", balance=None, overflow="drop", capacity_factor=1.0
    )
    plan = router(logits)
    assert plan.experts.tolist() == torch.topk(logits, 2, dim=1).indices.tolist()
    caps = oracle_caps([1, 1, 1, 0.5, 0.5, 0.5], 30, 2, 1.0)
    assert plan.capacity.tolist() == caps
    for e in range(6):
        chosen = [(float(logits[t, e]), t, s) for t in range(30) for s in range(2) if plan.experts[t, s] == e]
        keep = sorted(chosen, reverse=True)[: caps[e]]
        kept = {(t, s) for _, t, s in keep}
        assert {(t, s) for _, t, s in chosen if plan.slot[t, s] >= 0} == kept
        # slot positions: row-major order among the kept slots (SPEC §15 on the kept routes)
        assert [int(plan.slot[t, s]) for t, s in sorted(kept)] == list(range(len(kept)))
        assert int(plan.tokens_per_expert[e]) == len(kept)
    assert (~plan.kept).any(), "the case must drop slots"
    with pytest.raises(ValueError, match="topk"):
        router(num_tokens=30)


# --- dtypes, shapes, gradients ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_dtypes_and_shapes(dtype):
    router = MoERouter(8, 2, method="weighted_hash")
    logits = torch.randn(64, 8).to(dtype).requires_grad_()
    plan = router(logits)
    assert plan.experts.shape == plan.slot.shape == plan.weights.shape == (64, 2)
    assert plan.experts.dtype == plan.slot.dtype == plan.capacity.dtype == torch.int64
    assert plan.tokens_per_expert.dtype == torch.int64 and plan.capacity.shape == (8,)
    assert plan.weights.dtype == dtype
    x = torch.randn(64, 16).to(dtype).requires_grad_()
    buf = plan.dispatch(x)
    assert buf.shape == (8, plan.buffer_size, 16) and buf.dtype == dtype
    out = plan.combine(buf * 2)
    assert out.shape == (64, 16) and out.dtype == dtype
    out.float().sum().backward()
    assert logits.grad is not None and x.grad is not None and x.grad.dtype == dtype
    kept_rows = plan.kept.any(dim=1)
    # weights of a row sum to 1 when any slot is kept, so combine(2 * dispatch(x)) = 2 x there
    tol = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-5
    assert torch.allclose(out[kept_rows].float(), 2 * x[kept_rows].float(), atol=tol * 8, rtol=tol)


def test_gradcheck_weights_and_combine():
    router = MoERouter(5, 2, [1, 1, 2, 0.5, 0.5], method="hash", capacity_factor=0.75, seed=2)
    logits = torch.randn(12, 5, dtype=torch.float64, requires_grad=True)
    experts = router.routes(12, seed=2)
    caps = router.hard_caps(12)
    plan = RoutingPlan.from_experts(experts, caps, logits)
    assert (~plan.kept).any(), "the case must drop slots"

    def weights_of(lg):
        return RoutingPlan.from_experts(experts, caps, lg).weights

    def layer(lg, x, y):
        p = RoutingPlan.from_experts(experts, caps, lg)
        return p.combine(y * p.dispatch(x).sum(dim=2, keepdim=True))

    x = torch.randn(12, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(5, plan.buffer_size, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(weights_of, (logits,))
    assert torch.autograd.gradcheck(layer, (logits, x, y))


def test_gradients_reach_logits_and_dropped_slots_contribute_zero():
    router = MoERouter(4, 2, [1, 1, 0.5, 0.5], method="hash", capacity_factor=0.5, seed=0)
    logits = torch.randn(40, 4, requires_grad=True)
    plan = router(logits)
    dropped = ~plan.kept
    assert dropped.any()
    assert (plan.weights[dropped] == 0).all()
    # every kept buffer entry is a token's row; nothing else in the buffer
    x = torch.arange(40, dtype=torch.float32)[:, None] + 1
    buf = plan.dispatch(x)
    assert int((buf != 0).sum()) == int(plan.kept.sum()) == int(plan.tokens_per_expert.sum())
    # combine ignores a dropped slot's expert entirely: poisoning every unused buffer entry changes nothing
    y = torch.randn(4, plan.buffer_size, 1)
    used = torch.zeros(4, plan.buffer_size, dtype=torch.bool)
    used[plan.experts[plan.kept], plan.slot[plan.kept]] = True
    poisoned = torch.where(used[..., None], y, torch.full_like(y, 1e6))
    assert torch.equal(plan.combine(y), plan.combine(poisoned))
    loss = (plan.combine(y) ** 2).sum()
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    # rows with a single kept slot have weight 1 there: no gradient reaches their logits
    single = plan.kept.sum(dim=1) == 1
    assert single.any()
    assert torch.all(logits.grad[single] == 0)


def test_capacity_respected_everywhere():
    for method in METHODS:
        router = MoERouter(16, 4, [2.0] * 8 + [1.0] * 8, method=method, capacity_factor=1.0, seed=9)
        for _ in range(3):
            plan = router(num_tokens=300)
            assert (plan.tokens_per_expert <= plan.capacity).all()
            counts = torch.bincount(plan.experts[plan.kept], minlength=16)
            assert torch.equal(counts, plan.tokens_per_expert)
            pairs = set(zip(plan.experts[plan.kept].tolist(), plan.slot[plan.kept].tolist(), strict=True))
            assert len(pairs) == int(plan.kept.sum())  # no two kept slots share a buffer entry
            assert (plan.slot < plan.capacity[plan.experts.clamp(min=0)]).all()


# --- determinism, resume --------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_determinism_per_step_and_resume(method):
    a = MoERouter(8, 2, method=method, seed=11)
    b = MoERouter(8, 2, method=method, seed=11)
    runs_a = [a(num_tokens=256).experts for _ in range(3)]
    runs_b = [b(num_tokens=256).experts for _ in range(3)]
    for ra, rb in zip(runs_a, runs_b, strict=True):
        assert torch.equal(ra, rb)
    assert not torch.equal(runs_a[0], runs_a[1])  # a new seed per step
    # step n routes with seed + n
    assert runs_a[2].tolist() == gpr.route(np.ones(256), np.ones(8), k=2, seed=13, method=method).tolist()
    # resume by setting step
    c = MoERouter(8, 2, method=method, seed=11)
    c.step = 1
    assert torch.equal(c(num_tokens=256).experts, runs_a[1]) and c.step == 2
    # resume from a state_dict
    d = MoERouter(8, 2, method=method, seed=11)
    d.load_state_dict(a.state_dict())
    assert d.step == 3
    assert torch.equal(d(num_tokens=256).experts, a(num_tokens=256).experts)


def test_seed_wraps_modulo_2_64():
    router = MoERouter(4, 1, method="hash", seed=2**64 - 1)
    router(num_tokens=10)
    plan = router(num_tokens=10)
    assert plan.experts.tolist() == gpr.route(np.ones(10), np.ones(4), k=1, seed=0, method="hash").tolist()


def test_no_parameters_and_module_behaviour():
    router = MoERouter(4, 2)
    assert list(router.parameters()) == [] and "step" not in dict(router.named_buffers())
    assert "num_experts=4" in repr(router)
    assert set(METHODS) <= set(router_methods()) and "topk" in router_methods()


# --- errors ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,exc,word",
    [
        ({"num_experts": 0, "k": 1}, ValueError, "num_experts"),
        ({"num_experts": 4.0, "k": 1}, TypeError, "num_experts"),
        ({"num_experts": 4, "k": 5}, ValueError, "k"),
        ({"num_experts": 4, "k": 0}, ValueError, "k"),
        ({"num_experts": 4, "k": 2, "capacity_factor": 0}, ValueError, "capacity_factor"),
        ({"num_experts": 4, "k": 2, "capacity_factor": -1.0}, ValueError, "capacity_factor"),
        ({"num_experts": 4, "k": 2, "capacity_factor": float("nan")}, ValueError, "capacity_factor"),
        ({"num_experts": 4, "k": 2, "capacity_factor": "1"}, TypeError, "capacity_factor"),
        ({"num_experts": 4, "k": 2, "capacities": [1, 1, 1]}, ValueError, "capacities"),
        ({"num_experts": 4, "k": 2, "capacities": [1, -1, 1, 1]}, ValueError, "capacities"),
        ({"num_experts": 4, "k": 2, "capacities": [0, 0, 0, 0]}, ValueError, "capacities"),
        ({"num_experts": 4, "k": 2, "capacities": [1, float("nan"), 1, 1]}, ValueError, "capacities"),
        ({"num_experts": 4, "k": 2, "method": "nope"}, ValueError, "method"),
        ({"num_experts": 4, "k": 2, "seed": -1}, ValueError, "seed"),
        ({"num_experts": 4, "k": 2, "density": 1.5}, ValueError, "density"),
    ],
)
def test_constructor_errors_name_the_argument(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        MoERouter(**kwargs)


def test_call_errors_name_the_argument():
    router = MoERouter(4, 2, method="phase")
    with pytest.raises(ValueError, match="logits"):
        router(torch.zeros(8))
    with pytest.raises(ValueError, match="logits.*E = num_experts = 4"):
        router(torch.zeros(8, 5))
    with pytest.raises(TypeError, match="logits"):
        router(torch.zeros(8, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="logits"):
        router(np.zeros((8, 4)))
    with pytest.raises(TypeError, match="num_tokens"):
        router()
    with pytest.raises(ValueError, match="num_tokens"):
        router(num_tokens=-1)
    with pytest.raises(TypeError, match="either logits or num_tokens"):
        router(torch.zeros(8, 4), num_tokens=8)
    with pytest.raises(ValueError, match="step"):
        router.step = -1
    plan = router(num_tokens=8)
    with pytest.raises(ValueError, match="x must be"):
        plan.dispatch(torch.zeros(7, 3))
    with pytest.raises(ValueError, match="y must be"):
        plan.combine(torch.zeros(4, plan.buffer_size + 1, 3))
    assert router.step == 1  # failed calls do not advance the step
    checked = MoERouter(4, 2, validate=True)
    with pytest.raises(ValueError, match="logits must be finite"):
        checked(torch.tensor([[0.0, float("nan"), 0.0, 0.0]]))


def test_from_experts_errors():
    with pytest.raises(ValueError, match="experts must lie in"):
        RoutingPlan.from_experts(torch.tensor([[0, 3]]), [1, 1, 1])
    with pytest.raises(ValueError, match="experts must lie in"):
        RoutingPlan.from_experts(torch.tensor([[0, -2]]), [1, 1, 1])
    with pytest.raises(TypeError, match="experts must hold integers"):
        RoutingPlan.from_experts(torch.zeros(2, 2), [1, 1])
    with pytest.raises(ValueError, match="capacity must be 1-D"):
        RoutingPlan.from_experts(torch.zeros(2, 2, dtype=torch.int64), [[1, 1]])
    with pytest.raises(ValueError, match="logits must have shape"):
        RoutingPlan.from_experts(torch.zeros(2, 2, dtype=torch.int64), [1, 1], torch.zeros(2, 3))


@settings(max_examples=60, deadline=None)
@given(
    n_tok=st.integers(1, 30),
    k=st.integers(1, 4),
    caps=st.lists(st.integers(0, 6), min_size=1, max_size=6),
    data=st.data(),
)
def test_plan_equals_oracle_hypothesis(n_tok, k, caps, data):
    n_exp = len(caps)
    experts = data.draw(
        st.lists(st.lists(st.integers(-1, n_exp - 1), min_size=k, max_size=k), min_size=n_tok, max_size=n_tok)
    )
    logits = data.draw(
        st.lists(st.lists(st.floats(-5, 5), min_size=n_exp, max_size=n_exp), min_size=n_tok, max_size=n_tok)
    )
    plan = RoutingPlan.from_experts(torch.tensor(experts), caps, torch.tensor(logits, dtype=torch.float64))
    slot, loads, weights = oracle_plan(experts, caps, logits)
    assert plan.slot.tolist() == slot
    assert plan.tokens_per_expert.tolist() == loads
    assert plan.buffer_size == max(1, max(caps))
    assert np.allclose(plan.weights.numpy(), weights, rtol=1e-12, atol=1e-15)


# --- imports ---------------------------------------------------------------------------------------------


@pytest.mark.subprocess
def test_package_import_does_not_import_torch():
    code = (
        "import sys, gpu_phase_router\n"
        "assert 'torch' not in sys.modules and 'gpu_phase_router.torch' not in sys.modules, sorted(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.subprocess
def test_missing_torch_says_how_to_install():
    code = (
        "import sys\nsys.modules['torch'] = None\n"
        "try:\n    import gpu_phase_router.torch\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert "pip install 'gpu_phase_router[torch]'" in out


# --- no host read-back in forward ------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["phase", "topk", "expert_choice"])
def test_forward_reads_nothing_back(monkeypatch, method):
    """After the first call for a batch size (which caches its hard caps), forward, dispatch and
    combine call none of the Python-level tensor methods that copy device data to the host (the
    learned rounds take their fixed-shape path, the one CUDA runs)."""
    from gpu_phase_router.torch import learned

    monkeypatch.setattr(learned, "COMPACT_ON_CPU", False)
    monkeypatch.setattr(learned, "NUMPY_ARGMAX_ON_CPU", False)  # CPU-only: .numpy() there is no read-back
    router = MoERouter(8, 2, [1.0] * 4 + [0.5] * 4, method=method)
    logits = torch.randn(64, 8, requires_grad=True)
    router(logits)

    host_int = torch.Tensor.__int__

    def forbidden(self, *args, **kwargs):
        if self is router._step_counter:  # the step lives on the host by design (read with no sync)
            return host_int(self)
        raise AssertionError("host read-back in forward")

    for name in ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    monkeypatch.setattr(torch, "nonzero", forbidden)
    monkeypatch.setattr(torch, "masked_select", forbidden)
    plan = router(logits)
    out = plan.combine(plan.dispatch(torch.randn(64, 4)).mul(2))
    out.sum().backward()
    monkeypatch.undo()
    assert plan.experts.shape[0] == 64 and logits.grad is not None


#: ATen operators that read device data back to the host on CUDA whatever their arguments (their output
#: size or a Python value depends on the data)
_SYNCING_OPS = {
    "_local_scalar_dense",  # .item(), bool(), int(), float()
    "is_nonzero",
    "item",
    "equal",
    "nonzero",
    "masked_select",
    "bincount",
    "unique",
    "_unique",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
}


def _syncing(func, args, kwargs) -> bool:
    """Whether the ATen call ``func(*args, **kwargs)`` would synchronise with the host on CUDA."""
    name = func._schema.name.split("::")[-1]
    if name in _SYNCING_OPS:
        return True
    if name in ("index", "index_put", "index_put_", "_index_put_impl_"):  # a boolean mask index is a nonzero
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)
    if name == "repeat_interleave" and isinstance(args[0], torch.Tensor) and args[0].dtype != torch.bool:
        return kwargs.get("output_size", args[-1] if len(args) > 2 else None) is None  # sums the repeats
    if name == "one_hot":
        return (args[1] if len(args) > 1 else kwargs.get("num_classes", -1)) == -1  # reads the largest class
    return False


def _aten_syncs(fn) -> list[str]:
    """The ATen operators of ``fn()`` (forward and backward, through every Python layer) that
    :func:`_syncing` flags."""
    from torch.utils._python_dispatch import TorchDispatchMode

    found: list[str] = []

    class Detect(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if _syncing(func, args, kwargs):
                found.append(str(func))
            return func(*args, **kwargs)

    with Detect():
        fn()
    return found


def test_aten_sync_detector_flags_syncing_operations():
    """The detector below can fail: each of these reads device data back on CUDA."""
    x = torch.randn(16)
    assert _aten_syncs(lambda: x[x > 0])
    assert _aten_syncs(lambda: bool(x.sum() > 0))
    assert _aten_syncs(lambda: torch.bincount(torch.arange(4)))
    assert _aten_syncs(lambda: torch.nn.functional.one_hot(torch.arange(4)))
    assert _aten_syncs(lambda: torch.repeat_interleave(torch.arange(3), torch.tensor([1, 2, 3])))
    assert not _aten_syncs(lambda: torch.repeat_interleave(torch.arange(3), torch.tensor([1, 2, 3]), output_size=6))
    assert not _aten_syncs(lambda: x[torch.tensor([1, 2])].sum() + torch.where(x > 0, x, 0))


@pytest.mark.parametrize(
    "method,options",
    [
        ("topk", {}),
        ("topk", {"balance": "aux"}),
        ("topk", {"balance": None, "overflow": "drop"}),
        ("topk", {"overflow": "drop", "reroute_rounds": 2}),
        ("expert_choice", {}),
        *[(m, {}) for m in METHODS],
    ],
)
def test_forward_has_no_syncing_aten_operation(monkeypatch, method, options):
    """The fixed-shape path that CUDA runs, seen at the ATen level (below the Python methods of the
    test above, so an ``x[mask]`` or a ``bincount`` in any layer counts): after the first call for a
    batch size, forward, dispatch, combine, the aux loss and backward use no operator that
    synchronises on CUDA. The content-blind methods' routing kernel is one custom operator."""
    from gpu_phase_router.torch import learned

    monkeypatch.setattr(learned, "COMPACT_ON_CPU", False)
    monkeypatch.setattr(learned, "NUMPY_ARGMAX_ON_CPU", False)
    router = MoERouter(8, 2, [1.0] * 4 + [0.5] * 4, method=method, **options)
    logits = torch.randn(64, 8, requires_grad=True)
    router(logits)

    def step():
        plan = router(logits)
        out = plan.combine(plan.dispatch(torch.randn(64, 4)).mul(2))
        loss = out.sum() + (plan.aux_loss + plan.z_loss if plan.aux_loss is not None else 0)
        loss.backward()

    assert _aten_syncs(step) == []
    assert logits.grad is not None


@pytest.mark.gpu
@pytest.mark.parametrize("method", METHODS + ["topk", "expert_choice"])
def test_cuda_plan_equals_cpu_plan_without_sync(method):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    pytest.importorskip("cupy", reason="the CUDA backend needs CuPy")
    caps = [1.0] * 8 + [0.5] * 8
    cpu_router = MoERouter(16, 2, caps, method=method, seed=4)
    gpu_router = MoERouter(16, 2, caps, method=method, seed=4)
    logits = torch.randn(4096, 16, dtype=torch.float64)
    dev_logits = logits.cuda().to(torch.bfloat16).requires_grad_()
    expected = cpu_router(dev_logits.detach().cpu())  # the learned routes read the (bfloat16) logits
    gpu_router.cuda()
    gpu_router(dev_logits)  # first call for this batch size: caches the hard caps on the device
    gpu_router.step = 0
    gpu_router.expert_bias.zero_()  # undo the first call's bias update
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        plan = gpu_router(dev_logits)
        x = torch.randn(4096, 32, device="cuda", dtype=torch.bfloat16)
        out = plan.combine(plan.dispatch(x))
        out.float().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(plan.experts.cpu(), expected.experts)  # SPEC §16: ties broken the same way everywhere
    assert torch.equal(plan.slot.cpu(), expected.slot)
    assert torch.equal(plan.tokens_per_expert.cpu(), expected.tokens_per_expert)
    assert torch.equal(gpu_router.expert_bias.cpu(), cpu_router.expert_bias)
    assert plan.weights.dtype == torch.bfloat16 and dev_logits.grad is not None
