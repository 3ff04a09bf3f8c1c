"""Inputs as training code and notebooks pass them: torch bfloat16/float16, mixed libraries,
NumPy masked arrays, ragged nested lists. Each is accepted with the same result as float64
NumPy input, or rejected with an error that names the argument."""

from __future__ import annotations

import numpy as np
import pytest

import gpu_phase_router as gpr
from gpu_phase_router import blocks

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

W = np.array([1.0, 0.5, 2.0, 0.0, 3.0, 1.5, 0.25, 1.0] * 16)  # exactly representable in bfloat16
CAPS = np.array([1.0, 0.0, 4.0, 2.0, 0.5, 8.0, 1.0, 1.0])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("method", ["phase", "systematic", "hash", "weighted_hash"])
def test_low_precision_torch_inputs(dtype, method):
    dt = getattr(torch, dtype)
    w = np.ones(128) if method == "systematic" else W
    want = gpr.route(w, CAPS, k=3, seed=5, method=method)
    got = gpr.route(torch.tensor(w, dtype=dt), torch.tensor(CAPS, dtype=dt), k=3, seed=5, method=method)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.int32
    np.testing.assert_array_equal(got.numpy(), want)


@pytest.mark.parametrize("caps", [CAPS, CAPS.tolist(), CAPS.astype(np.float32)], ids=["numpy", "list", "float32"])
def test_torch_weights_with_host_capacities(caps):
    want = gpr.route(W, CAPS, k=2, seed=1)
    got = gpr.route(torch.tensor(W, dtype=torch.bfloat16), caps, k=2, seed=1)
    assert isinstance(got, torch.Tensor)
    np.testing.assert_array_equal(got.numpy(), want)
    got = gpr.route(W.tolist(), torch.tensor(CAPS, dtype=torch.bfloat16), k=2, seed=1)
    assert isinstance(got, torch.Tensor)
    np.testing.assert_array_equal(got.numpy(), want)


def test_bfloat16_elsewhere():
    caps16 = torch.tensor(CAPS, dtype=torch.bfloat16)
    np.testing.assert_array_equal(gpr.make_hard_caps(caps16, 128, 2).numpy(), gpr.make_hard_caps(CAPS, 128, 2))
    mean = blocks.weight_mean(W)
    assert blocks.weight_mean(torch.tensor(W, dtype=torch.bfloat16)) == mean
    got = blocks.route_block(
        torch.tensor(W[:40], dtype=torch.bfloat16),
        caps16,
        n_src=128,
        row0=0,
        k=2,
        seed=3,
        weight_mean=mean,
        degree_prefix=0,
    )
    np.testing.assert_array_equal(got.numpy(), gpr.route(W, CAPS, k=2, seed=3)[:40])


def test_torch_views_with_lazy_negation_are_plain_data():
    """``conj().imag`` of a complex tensor is a real view with torch's negative bit set, which NumPy
    and DLPack cannot read directly: it routes as the same values do."""
    neg = torch.tensor(-W, dtype=torch.float32).mul(1j).conj().imag  # = W, negative bit set
    assert neg.is_neg()
    np.testing.assert_array_equal(gpr.route(neg, CAPS, k=2, seed=1).numpy(), gpr.route(W, CAPS, k=2, seed=1))


@pytest.mark.parametrize("where", ["source_weights", "target_capacities"])
def test_sparse_tensors_are_rejected_naming_the_argument(where):
    kwargs = {"source_weights": torch.ones(8), "target_capacities": torch.ones(8)}
    kwargs[where] = kwargs[where].to_sparse()
    with pytest.raises(TypeError, match=f"{where}.*dense"):
        gpr.route(**kwargs, k=2)


@pytest.mark.parametrize("where", ["source_weights", "target_capacities"])
def test_tensors_on_other_devices_are_rejected_naming_the_argument(where):
    """A tensor on a device other than the CPU or CUDA (``meta`` here; ``mps`` on a Mac) raises
    ``TypeError`` naming the argument, as every other invalid input does."""
    kwargs = {"source_weights": np.ones(8), "target_capacities": np.ones(8)}
    kwargs[where] = torch.ones(8, device="meta")
    with pytest.raises(TypeError, match=f"{where}.*device meta"):
        gpr.route(**kwargs, k=2)


def test_torch_objects_that_are_not_tensors_are_sequences():
    """torch's tuple types (``torch.Size``, the ``(values, indices)`` pair of ``topk`` / ``max``)
    are Python sequences, not tensors: read as such, or rejected naming the argument."""
    np.testing.assert_array_equal(
        gpr.route(torch.Size([1, 2, 3]), CAPS, k=2, seed=1), gpr.route([1.0, 2.0, 3.0], CAPS, k=2, seed=1)
    )
    pair = torch.tensor(CAPS).topk(4)
    with pytest.raises(ValueError, match="target_capacities must be 1-D"):
        gpr.route(np.ones(8), pair, k=2)
    with pytest.raises(ValueError, match="routes must be 2-D"):
        gpr.compute_loads(torch.Size([2]), 8)


def test_bfloat16_counts_name_the_argument():
    with pytest.raises(TypeError, match="source_degrees"):
        gpr.route_counts(torch.ones(4, dtype=torch.bfloat16), torch.ones(4, dtype=torch.int64), k=1, seed=0)


@pytest.mark.parametrize("where", ["source_weights", "target_capacities"])
def test_masked_arrays_are_rejected_naming_the_argument(where):
    masked = np.ma.masked_array(np.ones(8), mask=[True, False] * 4)
    kwargs = {"source_weights": np.ones(8), "target_capacities": np.ones(8), where: masked}
    with pytest.raises(ValueError, match=f"{where}.*masked"):
        gpr.route(**kwargs, k=2)
    # a masked array with nothing masked is plain data
    kwargs[where] = np.ma.masked_array(np.ones(8), mask=False)
    np.testing.assert_array_equal(gpr.route(**kwargs, k=2), gpr.route(np.ones(8), np.ones(8), k=2))


def test_masked_elsewhere():
    masked = np.ma.masked_array(np.ones(8), mask=[True] + [False] * 7)
    with pytest.raises(ValueError, match="rel_caps.*masked"):
        gpr.make_hard_caps(masked, 10, 2)
    with pytest.raises(ValueError, match="source_weights.*masked"):
        blocks.route_block(masked, np.ones(4), n_src=8, row0=0, k=1, seed=0, weight_mean=1.0, degree_prefix=0)
    with pytest.raises(ValueError, match="source_degrees.*masked"):
        gpr.route_counts(np.ma.masked_array([1, 2], mask=[0, 1]), [1, 2], k=1, seed=0)


RAGGED = [[1, 2], [3]]


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: gpr.route(RAGGED, np.ones(8), k=2), "source_weights"),
        (lambda: gpr.route(None, RAGGED, k=1), "target_capacities"),
        (lambda: gpr.route_counts(RAGGED, [1, 2], k=1, seed=0), "source_degrees"),
        (
            lambda: blocks.route_block(
                RAGGED, [1.0, 2.0], n_src=5, row0=0, k=1, seed=0, weight_mean=1.0, degree_prefix=0
            ),
            "source_weights",
        ),
        (
            lambda: blocks.route_block([1.0], RAGGED, n_src=5, row0=0, k=1, seed=0, weight_mean=1.0, degree_prefix=0),
            "target_capacities",
        ),
        (lambda: gpr.make_hard_caps(RAGGED, 5, 1), "rel_caps"),
        (lambda: gpr.enforce_capacity(RAGGED, [1, 2]), "routes"),
        (lambda: gpr.enforce_capacity([[0, 1]], RAGGED), "hard_caps"),
        (lambda: gpr.compute_loads(RAGGED, 4), "routes"),
        (lambda: blocks.weight_mean(RAGGED), "source_weights"),
    ],
)
def test_ragged_lists_name_the_argument(call, name):
    with pytest.raises((ValueError, TypeError), match=name):
        call()
