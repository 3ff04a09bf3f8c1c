"""Activation checkpointing of layers with a MoERouter (SPEC §15, *Recomputation*): with
``context_fn=checkpoint_context`` the recomputed plan is the forward's and the state advances once,
under every schedule of forwards and backwards; without it a training call in a backward raises."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="torch not installed: gpu_phase_router.torch not exercised")

from torch.utils.checkpoint import checkpoint  # noqa: E402

from gpu_phase_router.torch import MoERouter, checkpoint_context  # noqa: E402

pytestmark = pytest.mark.torch

T, E, D = 32, 8, 4
OPTIONS = [
    {"method": "phase"},
    {"method": "systematic"},
    {"method": "hash"},
    {"bias_rate": 0.5},  # a bias that moves a lot per call: a second update would change the selection
    {"balance": "aux"},
    {"method": "expert_choice"},
]


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "gate": torch.randn(D, E, generator=g, dtype=torch.float64),
        "w": torch.randn(E, D, D, generator=g, dtype=torch.float64),
        "xs": torch.randn(3, T, D, generator=g, dtype=torch.float64),
    }


def _layer(router: MoERouter, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    plan = router(x @ p["gate"])
    out = plan.combine(torch.einsum("ecd,edf->ecf", plan.dispatch(x), p["w"]))
    return out if plan.aux_loss is None else out + plan.aux_loss


def _ckpt(fn, *args):
    return checkpoint(fn, *args, use_reentrant=False, context_fn=checkpoint_context)


def _run(options, schedule: str, ckpt: bool):
    """Run ``schedule`` with or without checkpointing; return the input gradients, step and bias."""
    p = _weights()
    router = MoERouter(E, 2, [1.0] * 4 + [0.5] * 4, capacity_factor=1.0, seed=3, **options)
    xs = [x.clone().requires_grad_() for x in p["xs"]]

    def forward(i):
        if ckpt:
            return checkpoint(_layer, router, xs[i], p, use_reentrant=False, context_fn=checkpoint_context)
        return _layer(router, xs[i], p)

    if schedule == "one":
        forward(0).square().sum().backward()
    elif schedule == "accumulate":  # forwards of three micro-batches, then one backward
        sum(forward(i).square().sum() for i in range(3)).backward()
    elif schedule == "interleaved":  # pipeline order: F0 F1 B0 F2 B1 B2
        y0, y1 = forward(0), forward(1)
        y0.square().sum().backward()
        y2 = forward(2)
        y1.square().sum().backward()
        y2.square().sum().backward()
    elif schedule == "retain_graph":  # the recomputation context runs twice
        loss = forward(0).square().sum()
        loss.backward(retain_graph=True)
        loss.backward()
    grads = [x.grad for x in xs]
    return grads, router.step, router.expert_bias.clone()


@pytest.mark.parametrize("schedule", ["one", "accumulate", "interleaved", "retain_graph"])
@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_checkpointed_layer_equals_the_plain_one(options, schedule):
    plain_grads, plain_step, plain_bias = _run(options, schedule, ckpt=False)
    grads, step, bias = _run(options, schedule, ckpt=True)
    assert step == plain_step and torch.equal(bias, plain_bias)  # the state advanced once per forward
    for got, want in zip(grads, plain_grads, strict=True):
        assert (got is None) == (want is None)
        if want is not None:
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_the_test_detects_a_second_update():
    """Checkpointing without the context and without the backward check would differ: a router
    whose state advanced once more routes the recomputation differently."""
    p = _weights()
    first = MoERouter(E, 2, method="phase", seed=3)
    advanced = MoERouter(E, 2, method="phase", seed=3)
    advanced.step = 1
    x = p["xs"][0]
    assert not torch.equal(first(x @ p["gate"]).experts, advanced(x @ p["gate"]).experts)


def test_nested_checkpoints_replay_each_call_once():
    p = _weights()

    def outer(router, x):
        return _ckpt(_layer, router, x, p).tanh()

    results = []
    for ckpt in (False, True):
        router = MoERouter(E, 2, method="phase", seed=3)
        x = p["xs"][0].clone().requires_grad_()
        y = (
            checkpoint(outer, router, x, use_reentrant=False, context_fn=checkpoint_context)
            if ckpt
            else outer(router, x)
        )
        y.square().sum().backward()
        results.append((x.grad, router.step))
    assert results[0][1] == results[1][1] == 1
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)


def test_two_routers_in_one_checkpointed_function():
    p = _weights()

    def block(r1, r2, x):
        return _layer(r2, _layer(r1, x, p), p)

    results = []
    for ckpt in (False, True):
        r1, r2 = MoERouter(E, 2, method="phase", seed=1), MoERouter(E, 2, bias_rate=0.5)
        x = p["xs"][0].clone().requires_grad_()
        y = (
            checkpoint(block, r1, r2, x, use_reentrant=False, context_fn=checkpoint_context)
            if ckpt
            else block(r1, r2, x)
        )
        y.square().sum().backward()
        results.append((x.grad, r1.step, r2.step, r2.expert_bias.clone()))
    assert results[0][1:3] == results[1][1:3] == (1, 1) and torch.equal(results[0][3], results[1][3])
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)


def test_recomputation_that_calls_the_routers_differently_raises():
    p = _weights()
    routers = [MoERouter(E, 2, method="phase"), MoERouter(E, 2, method="hash")]
    order = [0, 1]

    def block(x):
        for i in list(order):
            x = _layer(routers[i], x, p)
        return x

    y = checkpoint(block, p["xs"][0].clone().requires_grad_(), use_reentrant=False, context_fn=checkpoint_context)
    order.reverse()
    with pytest.raises(RuntimeError, match="another order"):
        y.square().sum().backward()


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_training_call_in_a_backward_without_the_context_raises(use_reentrant):
    p = _weights()
    router = MoERouter(E, 2, method="phase")
    x = p["xs"][0].clone().requires_grad_()
    y = checkpoint(_layer, router, x, p, use_reentrant=use_reentrant)
    with pytest.raises(RuntimeError, match="checkpoint_context"):
        y.square().sum().backward()


@pytest.mark.parametrize("switch", ["eval", "train"])
def test_mode_switched_before_the_backward(switch):
    """The recomputation routes in the forward's mode: with the context a router switched to eval
    (or to train) between forward and backward gives the plain gradients; without it the call in the
    backward raises (it would route in the new mode)."""
    p = _weights()
    grads = []
    for ckpt in (False, True):
        router = MoERouter(E, 2, method="phase", eval_capacity_factor=4.0)
        router.train(switch == "eval")
        x = p["xs"][0].clone().requires_grad_()
        loss = (_ckpt(_layer, router, x, p) if ckpt else _layer(router, x, p)).square().sum()
        router.train(switch != "eval")
        loss.backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)
    router = MoERouter(E, 2, method="phase").train(switch == "eval")
    loss = checkpoint(_layer, router, p["xs"][0].clone().requires_grad_(), p, use_reentrant=False).sum()
    router.train(switch != "eval")
    with pytest.raises(RuntimeError, match="checkpoint_context"):
        loss.backward()


def test_compiled_checkpointed_router_never_gives_silently_wrong_gradients():
    """Under torch.compile a checkpointed router either raises (the eager recomputation's error) or
    gives the eager gradients: a compiled recomputation used to read the step after its increment."""
    p = _weights()
    x = p["xs"][0]
    router = MoERouter(E, 2, method="phase", seed=3)
    xx = x.clone().requires_grad_()
    _layer(router, xx, p).square().sum().backward()
    want = xx.grad
    torch._dynamo.reset()
    compiled = torch.compile(lambda r, y: checkpoint(_layer, r, y, p, use_reentrant=False), backend="aot_eager")
    router = MoERouter(E, 2, method="phase", seed=3)
    xx = x.clone().requires_grad_()
    try:
        compiled(router, xx).square().sum().backward()
    except RuntimeError as exc:
        assert "checkpoint_context" in str(exc)
    else:
        torch.testing.assert_close(xx.grad, want, rtol=0, atol=0)
    assert router.step == 1
