"""gpu_phase_router.torch edge inputs and exact resume (SPEC §15): eval calls keep the step, seed
and step in state_dict (resume in a fresh process), T = 0, non-finite logits, dtype/device
arguments, and the checks of RoutingPlan.from_experts and combine."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch not installed: gpu_phase_router.torch not exercised")

from _garbage import garbage_of_ours  # noqa: E402

from gpu_phase_router.capacity import make_hard_caps  # noqa: E402
from gpu_phase_router.torch import MoERouter, RoutingPlan  # noqa: E402

pytestmark = pytest.mark.torch

METHODS = ["phase", "systematic", "weighted_hash", "hash", "topk"]
HERE = Path(__file__).parent


# --- step, state_dict, resume ------------------------------------------------------------------------------


def test_eval_calls_do_not_advance_step():
    router = MoERouter(8, 2, method="hash", seed=5)
    first = router(num_tokens=64).experts
    router.eval()
    evals = [router(num_tokens=64).experts for _ in range(3)]
    assert router.step == 1 and all(torch.equal(e, evals[0]) for e in evals)
    router.train()
    fresh = MoERouter(8, 2, method="hash", seed=5)
    fresh(num_tokens=64)
    assert torch.equal(router(num_tokens=64).experts, fresh(num_tokens=64).experts)
    assert not torch.equal(first, evals[0])  # eval routes with the next training step's seed


def test_seed_and_step_in_state_dict():
    a = MoERouter(8, 2, method="phase", seed=2**64 - 1)
    for _ in range(3):
        a(num_tokens=50)
    state = a.state_dict()
    b = MoERouter(8, 2, method="phase", seed=0)
    b.load_state_dict(state)
    assert b.seed == 2**64 - 1 and b.step == 3
    assert torch.equal(b(num_tokens=50).experts, a(num_tokens=50).experts)


@pytest.mark.subprocess
def test_resume_in_fresh_process_equals_uninterrupted_run(tmp_path):
    """N steps with evaluation in between, save, continue in a fresh process from a model built
    with another seed: same plans and parameters as a run that never stopped nor evaluated."""
    sys.path.insert(0, str(HERE))
    try:
        import _moe_resume as run
    finally:
        sys.path.remove(str(HERE))
    n_first, n_more = 3, 3
    model, opt = run.make(seed=1234)
    want = run.train(model, opt, 0, n_first + n_more, evaluate=False)
    want_params = [p.detach().clone() for p in model.parameters()]

    model, opt = run.make(seed=1234)
    got = run.train(model, opt, 0, n_first, evaluate=True)
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "done": n_first}, ckpt)
    out = tmp_path / "out.pt"
    subprocess.run(
        [sys.executable, str(HERE / "_moe_resume.py"), str(ckpt), str(n_more), str(out)], check=True, timeout=300
    )
    resumed = torch.load(out)
    assert got + resumed["experts"] == want
    for p_got, p_want in zip(resumed["params"], want_params, strict=True):
        assert torch.equal(p_got, p_want)


@pytest.mark.parametrize(
    "options", [{"method": m} for m in METHODS] + [{"balance": "aux"}, {"method": "expert_choice"}], ids=str
)
def test_a_training_step_leaves_no_reference_cycles(options):
    """Forward, dispatch, combine and backward free their tensors by reference counting alone."""
    router = MoERouter(8, 2, [1.0] * 4 + [0.5] * 4, seed=2, **options)

    def step():
        logits = torch.randn(64, 8, requires_grad=True)
        plan = router(logits)
        loss = plan.combine(plan.dispatch(torch.randn(64, 4)) * 2).sum()
        if plan.aux_loss is not None:
            loss = loss + plan.aux_loss
        loss.backward()

    step()
    assert garbage_of_ours(step) == []


# --- T = 0 ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_empty_batch_gives_empty_plan(method):
    router = MoERouter(4, 2, [1, 2, 1, 1], method=method)
    logits = torch.zeros(0, 4, requires_grad=True)
    plan = router(logits)
    assert plan.experts.shape == (0, 2) and plan.slot.shape == (0, 2) and plan.weights.shape == (0, 2)
    assert plan.tokens_per_expert.tolist() == [0, 0, 0, 0]
    assert plan.capacity.tolist() == [1, 1, 1, 1] and plan.buffer_size == 1  # SPEC §15 caps at T = 0
    x = torch.zeros(0, 3, requires_grad=True)
    buf = plan.dispatch(x)
    assert buf.shape == (4, 1, 3) and not buf.any()
    out = plan.combine(buf * 2)
    assert out.shape == (0, 3)
    out.sum().backward()
    assert x.grad.shape == (0, 3)
    if method != "topk":
        assert router(num_tokens=0).experts.shape == (0, 2)


def test_empty_batch_losses_and_drop_rate_are_zero():
    """SPEC §16: aux and z losses of T = 0 are 0, not a mean over nothing (NaN), and stay attached."""
    router = MoERouter(4, 2, balance="aux")
    logits = torch.zeros(0, 4, requires_grad=True)
    plan = router(logits)
    assert plan.aux_loss.item() == 0.0 and plan.z_loss.item() == 0.0
    (plan.aux_loss + plan.z_loss).backward()
    assert logits.grad.shape == (0, 4)
    assert plan.drop_rate().item() == 0.0
    assert MoERouter(4, 2, method="expert_choice")(torch.zeros(0, 4)).drop_rate().item() == 0.0


def test_expert_choice_drop_rate_counts_the_requested_slots():
    """An expert-choice plan has one slot column per expert; drop_rate counts each token's kept
    experts up to the router's k: ``1 - sum_t min(kept_t, k) / (T * k)``."""
    router = MoERouter(2, 1, method="expert_choice", capacity_factor=1.0)
    assert router(torch.tensor([[5.0, 0.0], [0.0, 5.0]])).drop_rate().item() == 0.0  # one expert each
    both = router(torch.tensor([[5.0, 5.0], [0.0, 0.0]]))  # both experts take token 0
    assert both.tokens_per_expert.tolist() == [1, 1] and both.drop_rate().item() == 0.5
    logits = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    plan = MoERouter(8, 2, method="expert_choice")(logits)
    want = 1 - plan.kept.sum(dim=1).clamp(max=2).sum().item() / (64 * 2)
    assert plan.drop_rate().item() == pytest.approx(want, abs=1e-7)


def test_from_experts_empty():
    plan = RoutingPlan.from_experts(torch.zeros(0, 3, dtype=torch.int64), [2, 1])
    assert plan.slot.shape == (0, 3) and plan.dispatch(torch.zeros(0, 4)).shape == (2, 2, 4)


# --- non-finite logits ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_logits_raise_with_validate(bad):
    router = MoERouter(4, 2, validate=True, method="topk")
    logits = torch.zeros(3, 4)
    logits[1, 2] = bad
    with pytest.raises(ValueError, match="logits"):
        router(logits)


@pytest.mark.parametrize("method", ["topk", "phase"])
def test_nonfinite_logits_without_validation_give_weights_in_unit_interval(method):
    nan, inf = float("nan"), float("inf")
    rows = [[nan, 0, 0, 0], [inf, 0, 0, 0], [-inf, 0, 0, 0], [nan, nan, nan, nan], [inf, inf, 0, 0], [-inf] * 4]
    router = MoERouter(4, 2, method=method, capacity_factor=4.0)
    logits = torch.tensor(rows, requires_grad=True)
    plan = router(logits)
    w = plan.weights
    assert torch.isfinite(w).all() and (w >= 0).all() and (w <= 1).all()
    sums = w.sum(1)
    assert torch.all(((sums - 1).abs() < 1e-6) | (sums == 0))
    plan.combine(plan.dispatch(torch.ones(6, 2))).sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_nonfinite_gate_weights_follow_the_softmax_limit():
    """NaN and -inf count as -inf (weight 0); +inf slots share their row equally."""
    nan, inf = float("nan"), float("inf")
    experts = torch.tensor([[0, 1], [0, 1], [0, 1], [0, 1], [0, 1]])
    logits = torch.tensor([[nan, 1.0], [inf, 1.0], [-inf, 1.0], [inf, inf], [nan, -inf]])
    plan = RoutingPlan.from_experts(experts, [5, 5], logits)
    assert plan.weights.tolist() == [[0, 1], [1, 0], [0, 1], [0.5, 0.5], [0, 0]]


def _reference_gate_weights(logits: list[float], experts: list[int], kept: list[bool]) -> list[float]:
    """SPEC §15 weights of one row, plainly: the softmax over the kept chosen logits, in float64;
    NaN counts as -inf, +inf slots share the row equally, a row with no kept finite slot is 0."""
    vals = []
    for e, keep in zip(experts, kept, strict=True):
        v = logits[e] if keep else -math.inf
        vals.append(-math.inf if math.isnan(v) else v)
    if math.inf in vals:
        return [1.0 / vals.count(math.inf) if v == math.inf else 0.0 for v in vals]
    top = max(vals)
    if top == -math.inf:
        return [0.0] * len(vals)
    expo = [math.exp(v - top) for v in vals]
    return [x / sum(expo) for x in expo]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_gate_weights_against_a_plain_reference_with_nonfinite_logits(dtype):
    gen = torch.Generator().manual_seed(5)
    n_tok, n_exp, k = 300, 6, 3
    logits = torch.randn(n_tok, n_exp, generator=gen) * 4
    r = torch.rand(n_tok, n_exp, generator=gen)
    logits[r < 0.1] = float("nan")
    logits[(r >= 0.1) & (r < 0.2)] = float("inf")
    logits[(r >= 0.2) & (r < 0.3)] = float("-inf")
    logits = logits.to(dtype)
    experts = torch.stack([torch.randperm(n_exp, generator=gen)[:k] for _ in range(n_tok)])
    experts[torch.rand(n_tok, k, generator=gen) < 0.1] = -1
    kept = (torch.rand(n_tok, k, generator=gen) < 0.8) & (experts >= 0)
    capacity = [n_tok * k] * n_exp
    plan = RoutingPlan.from_experts(torch.where(kept, experts, -1), capacity, logits.clone().requires_grad_(True))
    rows = logits.to(torch.float64).tolist()
    want = [_reference_gate_weights(rows[t], experts[t].tolist(), kept[t].tolist()) for t in range(n_tok)]
    tol = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 1e-2}[dtype]
    assert plan.weights.dtype == dtype
    got = plan.weights.detach().to(torch.float64)
    np.testing.assert_allclose(got.numpy(), np.array(want), rtol=tol, atol=tol)
    assert {1.0, 0.5} <= set(got.flatten().tolist())  # rows with one and with two +inf slots were drawn


def test_gate_weights_gradient_is_finite_and_matches_the_softmax_on_finite_rows():
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(64, 5, generator=gen, dtype=torch.float64)
    logits[::4, 0] = float("inf")
    logits[1::4, 1] = float("nan")
    logits[2::4, :] = float("-inf")
    experts = torch.stack([torch.randperm(5, generator=gen)[:3] for _ in range(64)])
    leaf = logits.clone().requires_grad_(True)
    plan = RoutingPlan.from_experts(experts, [64 * 3] * 5, leaf)
    upstream = torch.randn(64, 3, generator=gen, dtype=torch.float64)
    (plan.weights * upstream).sum().backward()
    assert torch.isfinite(leaf.grad).all()
    chosen_logits = logits.gather(1, experts)
    finite = torch.isfinite(chosen_logits).all(dim=1)  # the plain softmax over the chosen logits
    assert finite.sum() >= 16
    ref = logits[finite].detach().clone().requires_grad_(True)
    (torch.softmax(ref.gather(1, experts[finite]), dim=1) * upstream[finite]).sum().backward()
    torch.testing.assert_close(leaf.grad[finite], ref.grad, rtol=1e-12, atol=1e-12)
    constant = (chosen_logits == float("inf")).any(dim=1) | (chosen_logits == float("-inf")).all(dim=1)
    assert constant.sum() >= 16 and (leaf.grad[constant] == 0).all()  # a +inf limit, or no finite slot


# --- dtype / device arguments ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [torch.int64, torch.bool, "float32", np.float32, 3])
def test_weight_dtype_must_be_a_floating_torch_dtype(bad):
    router = MoERouter(4, 2)
    with pytest.raises(TypeError, match="weight_dtype"):
        router(num_tokens=16, weight_dtype=bad)
    with pytest.raises(TypeError, match="weight_dtype"):
        RoutingPlan.from_experts(torch.zeros(4, 2, dtype=torch.int64), [8, 8, 8, 8], weight_dtype=bad)
    assert router.step == 0


@pytest.mark.parametrize(
    "kwargs,exc,name",
    [
        ({"eval_capacity_factor": 1e300}, ValueError, "eval_capacity_factor"),
        ({"density": 0.3}, ValueError, "density"),
        ({"method": "expert_choice", "density": 0.3}, ValueError, "density"),
        ({"process_group": "world"}, TypeError, "process_group"),
        ({"process_group": -100}, ValueError, "not a member"),  # dist.GroupMember.NON_GROUP_MEMBER
    ],
)
def test_router_options_are_checked_at_construction(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        MoERouter(4, 2, **kwargs)


def test_weight_dtype_with_logits_raises():
    """The weights take the logits' dtype; a weight_dtype beside logits would be ignored."""
    with pytest.raises(TypeError, match="weight_dtype"):
        MoERouter(4, 2)(torch.zeros(8, 4), weight_dtype=torch.float64)
    with pytest.raises(TypeError, match="weight_dtype"):
        RoutingPlan.from_experts(torch.zeros(8, 1, dtype=torch.int64), [8, 8, 8, 8], torch.zeros(8, 4),
                                 weight_dtype=torch.float64)  # fmt: skip


def test_extra_state_without_step_names_it():
    router = MoERouter(4, 2, method="hash")
    state = router.state_dict()
    state["_extra_state"] = {"seed": 3}
    with pytest.raises(ValueError, match="step"):
        router.load_state_dict(state)


ALL_OPTIONS = [{"method": m} for m in METHODS] + [{"balance": "aux"}, {"method": "expert_choice"}]


@pytest.mark.parametrize("options", ALL_OPTIONS, ids=str)
def test_plans_do_not_depend_on_torch_s_default_dtype(options):
    """Rerouting built a float64 mask under set_default_dtype(float64) and failed in index_put."""
    logits = torch.randn(300, 8, generator=torch.Generator().manual_seed(4))
    want = MoERouter(8, 2, [1.0] * 4 + [0.5] * 4, **options)(logits)
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = MoERouter(8, 2, [1.0] * 4 + [0.5] * 4, **options)(logits)
    finally:
        torch.set_default_dtype(saved)
    assert torch.equal(got.experts, want.experts) and torch.equal(got.slot, want.slot)
    assert got.weights.dtype == want.weights.dtype == torch.float32


@pytest.mark.parametrize("method", ["phase", "topk"])
def test_a_compiled_training_call_under_inference_mode_leaves_a_usable_router(method):
    """A compiled call replaces the step counter; under inference_mode the new one is an inference
    tensor, which later eager calls, ``step =`` and ``load_state_dict`` updated in place and failed."""
    router = MoERouter(8, 2, method=method)
    compiled = torch.compile(router, backend="eager")
    logits = torch.randn(64, 8)
    with torch.inference_mode():
        compiled(logits)
    router(logits)
    assert router.step == 2
    router.load_state_dict(MoERouter(8, 2, method=method).state_dict())
    router.step = 7
    router(logits)
    assert router.step == 8


def test_capacities_whose_sum_overflows_raise():
    """Their shares would be 0 and every cap 1 (SPEC §7/§9: an overflowing sum is invalid input)."""
    with pytest.raises(ValueError, match="capacities.*overflows"):
        MoERouter(2, 1, [1e308, 1e308])


@pytest.mark.parametrize("convert", ["bfloat16", "half", "double", "to_bfloat16"])
def test_expert_bias_stays_float32_when_the_module_is_converted(convert):
    """SPEC §16: the bias is a float32 buffer; in bfloat16 a 1e-2 step rounds away once |b| >= 4."""
    router = MoERouter(2, 1, overflow="drop")
    router = router.to(torch.bfloat16) if convert == "to_bfloat16" else getattr(router, convert)()
    assert router.expert_bias.dtype == torch.float32 and "expert_bias" in router.state_dict()
    logits = torch.tensor([[10.0, 0.0]] * 8, dtype=torch.bfloat16)
    for _ in range(500):
        router(logits)
    assert router.expert_bias.dtype == torch.float32
    assert router.expert_bias.tolist() == pytest.approx([-5.0, 5.0], abs=1e-4)  # 500 steps of 1e-2


@pytest.mark.parametrize("assign", [False, True])
def test_expert_bias_stays_float32_when_loaded_from_a_reduced_precision_state(assign):
    """SPEC §16: ``b`` is float32. A checkpoint whose floats were cast to bfloat16 loaded with
    ``assign=True`` (meta-device init) would otherwise make the buffer bfloat16, where a ``1e-2``
    step from 4 rounds away."""
    state = MoERouter(2, 1).state_dict()
    state["expert_bias"] = torch.tensor([-4.0, 4.0], dtype=torch.bfloat16)
    if assign:
        with torch.device("meta"):
            router = MoERouter(2, 1, overflow="drop")
    else:
        router = MoERouter(2, 1, overflow="drop")
    router.load_state_dict(state, assign=assign)
    assert router.expert_bias.dtype == torch.float32 and router.expert_bias.tolist() == [-4.0, 4.0]
    router(torch.tensor([[10.0, 0.0]] * 8))  # expert 0 over its share, expert 1 under
    assert router.expert_bias.tolist() == [np.float32(-4.0) - np.float32(0.01), np.float32(4.0) + np.float32(0.01)]


def test_weight_dtype_is_honoured():
    plan = MoERouter(4, 2, method="phase")(num_tokens=16, weight_dtype=torch.float64)
    assert plan.weights.dtype == torch.float64


@pytest.mark.parametrize("bad,exc", [("nope", ValueError), ("cuda:x", ValueError), (1.5, TypeError), (True, TypeError)])
def test_device_argument_is_checked(bad, exc):
    with pytest.raises(exc, match="device"):
        MoERouter(4, 2, method="phase")(num_tokens=16, device=bad)


# --- RoutingPlan.from_experts and combine (issue items 1-3, 5) ------------------------------------------------


@pytest.mark.parametrize(
    "logits,exc",
    [
        (torch.zeros(5, 3, dtype=torch.int64), TypeError),
        (torch.zeros(5, 3, dtype=torch.bool), TypeError),
        (np.zeros((5, 3)), TypeError),
        ([[0.0] * 3] * 5, TypeError),
        (torch.zeros(5, 4), ValueError),
    ],
    ids=["int64", "bool", "numpy", "list", "shape"],
)
def test_from_experts_checks_logits(logits, exc):
    experts = torch.tensor([[0, 1], [1, 0], [1, 2], [0, -1], [2, 1]])
    with pytest.raises(exc, match="logits"):
        RoutingPlan.from_experts(experts, [3, 2, 2], logits)


@pytest.mark.parametrize(
    "capacity", [np.array([2**64 - 1, 2, 2], dtype=np.uint64), [2**62, 2, 2], torch.tensor([2**62, 2, 2])]
)
def test_from_experts_caps_whose_buffer_positions_pass_int64_raise(capacity):
    with pytest.raises(ValueError, match="capacity"):
        RoutingPlan.from_experts(torch.tensor([[0, 1], [1, 0]]), capacity)


def test_buffer_size_below_largest_cap_raises():
    with pytest.raises(ValueError, match="buffer_size"):
        RoutingPlan.from_experts(torch.zeros(4, 1, dtype=torch.int64), [4, 4], buffer_size=2)
    plan = RoutingPlan.from_experts(torch.zeros(4, 1, dtype=torch.int64), [4, 4], buffer_size=6)
    assert plan.slot.flatten().tolist() == [0, 1, 2, 3] and plan.buffer_size == 6


@pytest.mark.parametrize(
    "capacity,exc",
    [
        ([-1, 2], ValueError),
        ([1.5, 2.7], ValueError),
        ([1.0, float("nan")], ValueError),
        (torch.tensor([1.5, 2.0]), ValueError),
        (torch.tensor([-1, 2]), ValueError),
        (np.ma.masked_array([1, 2], mask=[0, 1]), ValueError),
        ([True, False], TypeError),
        (["1", "2"], TypeError),
    ],
)
def test_from_experts_capacity_checked(capacity, exc):
    with pytest.raises(exc, match="capacity"):
        RoutingPlan.from_experts(torch.zeros(4, 1, dtype=torch.int64), capacity)


def test_from_experts_accepts_whole_float_capacity():
    plan = RoutingPlan.from_experts(torch.zeros(4, 1, dtype=torch.int64), [2.0, 3.0])
    assert plan.capacity.tolist() == [2, 3] and plan.slot.flatten().tolist() == [0, 1, -1, -1]


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_combine_rejects_integer_outputs(dtype):
    plan = RoutingPlan.from_experts(torch.tensor([[0], [1]]), [1, 1])
    with pytest.raises(TypeError, match="y must have a floating dtype"):
        plan.combine(torch.ones(2, 1, 3, dtype=dtype))


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_dispatch_and_combine_on_another_device_name_the_argument(layout):
    """A plan's dispatch and combine take tensors on the plan's device (the meta device stands in
    for a CUDA tensor against a CPU plan): a ValueError naming x / y, not torch's index error or
    a result on the wrong device."""
    plan = MoERouter(4, 2)(torch.randn(6, 4))
    rows = (4, plan.buffer_size, 3) if layout == "padded" else (plan.packed_size, 3)
    with pytest.raises(ValueError, match=r"x must be on the plan's device \(cpu\).*meta"):
        plan.dispatch(torch.ones(6, 3, device="meta"), layout)
    with pytest.raises(ValueError, match=r"y must be on the plan's device \(cpu\).*meta"):
        plan.combine(torch.ones(*rows, device="meta"), layout)


# --- MoERouter capacities and caps (issue items 4, 6) -------------------------------------------------------


def test_masked_capacities_rejected():
    with pytest.raises(ValueError, match="capacities"):
        MoERouter(4, 2, np.ma.masked_array([1, 2, 1, 1], mask=[0, 1, 0, 0]))
    plain = MoERouter(4, 2, np.ma.masked_array([1, 2, 1, 1], mask=[0, 0, 0, 0]))
    assert plain.capacities.tolist() == [1, 2, 1, 1]


def test_hard_caps_beyond_int64_raise():
    with pytest.raises(ValueError, match="capacity_factor"):
        MoERouter(4, 2, capacity_factor=1e300)
    router = MoERouter(4, 2, method="phase", capacity_factor=1e17)  # 5e16 slots per expert at T = 1: fits int64
    with pytest.raises(ValueError, match="capacity_factor"):
        router(num_tokens=1000)  # 5e19 > 2^63
    with pytest.raises(ValueError, match="capacity_factor"):
        router.hard_caps(1000)
    assert router.step == 0


@pytest.mark.parametrize("n_tok,h", [(1, 1.0), (37, 1.25), (1000, 3.0), (5, 1.1)])
def test_router_caps_are_the_capacity_rule(n_tok, h):
    caps = [3.0, 1.0, 0.0, 0.7, 2.5]
    router = MoERouter(5, 2, caps, capacity_factor=h)
    assert router.hard_caps(n_tok).tolist() == make_hard_caps(np.array(caps), n_tok, 2, h).tolist()
    total = sum(caps)  # a plain oracle of SPEC §15 (small sums: the order does not matter here)
    want = [0 if c == 0 else max(1, math.ceil(c / total * n_tok * 2 * h)) for c in caps]
    assert router.hard_caps(n_tok).tolist() == want


# --- big-model initialisation: construction on the meta device ------------------------------------------


@pytest.mark.parametrize("method", ["topk", "phase", "expert_choice"])
def test_router_built_on_the_meta_device_materialises_as_a_fresh_router(method):
    """``with torch.device("meta")`` then ``to_empty`` (FSDP / big-model init): the step counter
    stays a host integer and the bias starts at zero (SPEC §16: zeros at construction), not at
    whatever the uninitialised memory held."""
    with torch.device("meta"):
        router = MoERouter(4, 2, method=method, seed=3)
    assert router.step == 0 and "step=0" in repr(router)
    router.to_empty(device="cpu")
    fresh = MoERouter(4, 2, method=method, seed=3)
    assert router.expert_bias.device.type == "cpu" and router.expert_bias.tolist() == [0.0] * 4
    assert router.state_dict()["_extra_state"] == {"seed": 3, "step": 0}
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        logits = torch.randn(24, 4, generator=gen) + torch.tensor([2.0, 0.0, 0.0, 0.0])
        a, b = router(logits), fresh(logits)
        assert torch.equal(a.experts, b.experts) and torch.equal(a.slot, b.slot)
    assert router.step == 3 and torch.equal(router.expert_bias, fresh.expert_bias)


def test_reset_parameters_restores_the_state_at_construction():
    """The hook FSDP and ``to_empty`` recipes call on every module that has it."""
    router = MoERouter(4, 2, seed=7)
    logits = torch.tensor([[3.0, 0.0, 0.0, 0.0]] * 16)
    for _ in range(4):
        router(logits)
    assert router.step == 4 and router.expert_bias.abs().sum() > 0
    router.reset_parameters()
    assert router.step == 0 and router.seed == 7 and router.expert_bias.tolist() == [0.0] * 4
    assert router.expert_bias.dtype == torch.float32


# --- torch.func transforms -----------------------------------------------------------------------------


@pytest.mark.parametrize("options", [{}, {"balance": "aux"}, {"method": "expert_choice"}, {"method": "phase"}])
def test_eval_router_under_torch_func_grad_matches_autograd(options):
    """``torch.func.grad`` over ``functional_call`` (per-sample gradients, meta-learning) with the
    router in eval mode (no state update): the same gradients as ``torch.autograd``."""
    gen = torch.Generator().manual_seed(0)
    gate = torch.nn.Linear(8, 4)
    router = MoERouter(4, 2, capacity_factor=0.75, **options).eval()  # caps bind: rerouting runs
    x = torch.randn(16, 8, generator=gen)
    params = {name: p.detach().clone() for name, p in gate.named_parameters()}

    def loss(params):
        plan = router(torch.func.functional_call(gate, params, (x,)))
        out = plan.combine(plan.dispatch(x) * 2.0).pow(2).sum()
        return out if plan.aux_loss is None else out + plan.aux_loss + plan.z_loss

    grads = torch.func.grad(loss)(params)
    leaves = {name: p.clone().requires_grad_() for name, p in params.items()}
    reference = torch.autograd.grad(loss(leaves), list(leaves.values()))
    for name, ref in zip(leaves, reference, strict=True):
        assert ref.abs().sum() > 0
        torch.testing.assert_close(grads[name], ref)


def test_content_blind_routes_on_a_device_without_kernels_come_from_the_cpu(monkeypatch):
    """On a device that is neither the CPU nor CUDA (Apple ``mps``, ``xpu``; faked here, as this
    machine has none) the content-blind routes, which depend on T and the seed alone, are the CPU
    backend's, copied to that device — not a request for CuPy."""
    from types import SimpleNamespace

    import gpu_phase_router as gpr
    from gpu_phase_router.methods import cached_uniform_spec, run_uniform
    from gpu_phase_router.torch import _ops

    anchor = SimpleNamespace(device=SimpleNamespace(type="mps"))
    moved = []
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *args, **kwargs: moved.append(args) or self)
    spec = cached_uniform_spec("phase", 64, (1.0,) * 4 + (0.5,) * 4, 2, None)
    got = _ops._routes_on_stream(anchor, "phase", spec, 5)
    assert moved == [(anchor.device,)]
    np.testing.assert_array_equal(got.numpy(), gpr.route(np.ones(64), [1.0] * 4 + [0.5] * 4, k=2, seed=5))
    np.testing.assert_array_equal(got.numpy(), run_uniform("phase", "cpu", spec, 5))
