"""The (key, column) order of SPEC §5 where keys are equal, on the selection helpers themselves.

End to end, keys within a row are distinct (SplitMix64 of distinct columns), so the column
tie-break is never reached there; these tests drive the CPU helpers and the CUDA bottom-k and warp
merge (through a small probe kernel under the SIMT emulator) with equal keys directly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from simt import build
from simt.emulated_backend import EmulatedLauncher

from gpu_phase_router.backends import cpu
from gpu_phase_router.backends.cuda import kernel_paths, kernel_prelude

PROBE = Path(__file__).resolve().parent / "simt" / "order_probe.cu"
SENT = 0xFFFFFFFF


def smallest(keys, cols, k):
    """SPEC §5 by sorting: the k smallest (key, col) pairs, ascending."""
    return sorted(zip((int(x) for x in keys), (int(c) for c in cols), strict=True))[:k]


CASES = [
    ([7] * 10, [9, 3, 8, 1, 6, 0, 5, 2, 7, 4]),  # all keys equal: columns decide alone
    ([5, 5, 2, 5, 2, 9, 2, 5], [4, 1, 7, 0, 3, 2, 5, 6]),  # ties at two key values
    ([1, 1], [8, 3]),
    ([3, 3, 3, 1], [2, 1, 0, 5]),
]


def test_less_breaks_key_ties_by_column():
    assert cpu._less(np.uint64(5), 1, np.uint64(5), 2)
    assert not cpu._less(np.uint64(5), 2, np.uint64(5), 1)
    assert not cpu._less(np.uint64(5), 2, np.uint64(5), 2)
    assert cpu._less(np.uint64(4), 9, np.uint64(5), 0)


@pytest.mark.parametrize("keys, cols", CASES)
@pytest.mark.parametrize("k", [1, 3, 5])
def test_offer_sorted_keeps_smallest_pairs_with_ties(keys, cols, k):
    kk = np.zeros(k, dtype=np.uint64)
    cc = np.zeros(k, dtype=np.int64)
    size = 0
    for key, col in zip(keys, cols, strict=True):
        size = cpu._offer_sorted(kk, cc, size, k, np.uint64(key), np.int64(col))
    want = smallest(keys, cols, k)
    assert list(zip(kk[:size].tolist(), cc[:size].tolist(), strict=True)) == want


@pytest.mark.parametrize("keys, cols", CASES)
@pytest.mark.parametrize("k", [1, 3, 5])
def test_heap_offer_and_emission_with_ties(keys, cols, k):
    kk = np.zeros(k, dtype=np.uint64)
    cc = np.zeros(k, dtype=np.int64)
    size = 0
    for key, col in zip(keys, cols, strict=True):
        size = cpu._offer(kk, cc, size, k, np.uint64(key), np.int64(col))
    out = np.zeros(k + 2, dtype=np.int32)
    cpu._emit_sorted(kk, cc, size, out)
    want = [c for _, c in smallest(keys, cols, k)]
    assert out.tolist() == want + [-1] * (k + 2 - len(want))


@pytest.fixture(scope="module")
def probe():
    try:
        lib = build.load([*kernel_paths(), PROBE], prelude=kernel_prelude())
    except build.CompilerMissing as exc:
        pytest.skip(str(exc))
    return EmulatedLauncher(lib=lib)


@pytest.mark.parametrize("keys, cols", CASES)
def test_cuda_topk_offer_with_ties(probe, keys, cols):
    out_k = np.zeros(4, dtype=np.uint64)
    out_c = np.zeros(4, dtype=np.uint32)
    probe(
        "probe_topk",
        (1, 1, 1),
        (32, 1, 1),
        (np.array(keys, dtype=np.uint64), np.array(cols, dtype=np.uint32), np.int32(len(keys)), out_k, out_c),
    )
    want = smallest(keys, cols, 4)
    want += [(2**64 - 1, SENT)] * (4 - len(want))
    assert list(zip(out_k.tolist(), out_c.tolist(), strict=True)) == want


@pytest.mark.parametrize("pattern", ["equal", "two-values", "lane-reversed"])
def test_cuda_warp_merge_with_ties(probe, pattern):
    per_lane = 3
    n = 32 * per_lane
    rng = np.random.default_rng(len(pattern))
    cols = rng.permutation(n).astype(np.uint32)
    if pattern == "equal":
        keys = np.full(n, 12345, dtype=np.uint64)
    elif pattern == "two-values":
        keys = rng.choice(np.array([10, 11], dtype=np.uint64), n)
    else:  # small columns on high lanes, so lane order and column order disagree
        cols = np.arange(n)[::-1].astype(np.uint32)
        keys = np.full(n, 7, dtype=np.uint64)
    out_k = np.zeros(4, dtype=np.uint64)
    out_c = np.zeros(4, dtype=np.uint32)
    probe("probe_warp_merge", (1, 1, 1), (32, 1, 1), (keys, cols, np.int32(per_lane), out_k, out_c))
    assert list(zip(out_k.tolist(), out_c.tolist(), strict=True)) == smallest(keys, cols, 4)
