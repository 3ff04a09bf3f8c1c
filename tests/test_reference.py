"""Internal consistency of the reference: fused candidate rule vs materialised matrices, Feistel."""

import itertools
import random

import pytest

from gpu_phase_router import _keys, _reference


@pytest.mark.parametrize("n_src, n_tgt", [(1, 1), (1, 7), (7, 1), (8, 8), (13, 5), (5, 13), (64, 64), (65, 31)])
def test_fused_candidates_equal_materialised(n_src, n_tgt):
    rng = random.Random(n_src * 1000 + n_tgt)
    for trial in range(8):
        d = [rng.choice([0, n_tgt, rng.randint(0, n_tgt)]) for _ in range(n_src)]
        c = [rng.choice([0, n_src, rng.randint(0, n_src)]) for _ in range(n_tgt)]
        perm_s, perm_t = _reference.derived_permutations(n_src, n_tgt, trial)
        fused = _reference.candidate_sets(d, c, perm_s, perm_t)
        dense = _reference.candidate_sets_materialised(d, c, perm_s, perm_t)
        assert [sorted(s) for s in fused] == dense
        assert all(len(set(s)) == len(s) for s in fused)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 15, 16, 17, 100, 257])
def test_feistel_is_bijection_and_inverse(n):
    for seed, stream in itertools.product([0, 3, 2**64 - 1], [1, 2]):
        key = _keys.stream(seed, stream)
        perm = [_keys.feistel(x, n, key) for x in range(n)]
        assert sorted(perm) == list(range(n))
        assert [_keys.feistel_inverse(y, n, key) for y in perm] == list(range(n))


def test_selection_depends_only_on_the_set():
    rng = random.Random(5)
    cands = rng.sample(range(1000), 50)
    shuffled = cands[:]
    rng.shuffle(shuffled)
    for k in (1, 3, 50, 60):
        a = _reference.select(cands, 7, k, 11)
        assert a == _reference.select(shuffled, 7, k, 11)
        assert len(a) == k and a.count(-1) == max(0, k - 50)


def test_selection_is_uniform():
    """Each of 6 candidates is picked with probability k/6 over many rows (chi-square-ish bound)."""
    counts = [0] * 6
    rows = 3000
    for j in range(rows):
        for col in _reference.select(list(range(6)), j, 2, 99):
            counts[col] += 1
    expected = rows * 2 / 6
    assert all(abs(c - expected) < 5 * expected**0.5 for c in counts), counts


def test_tree_sum_order():
    # adjacent pairs are added first: (1e16 + 1.0) + (-1e16 + 1.0) rounds to 0.0 ...
    assert _reference.tree_sum([1e16, 1.0, -1e16, 1.0]) == 0.0
    # ... while (1e16 + -1e16) + (1.0 + 1.0) is exact
    assert _reference.tree_sum([1e16, -1e16, 1.0, 1.0]) == 2.0
    assert _reference.tree_sum([3.0]) == 3.0
    assert _reference.tree_sum([1.0, 2.0, 3.0]) == 6.0


def test_tree_sum_spec_example():
    """SPEC §7: tree_sum pads with zeros to a power of two and adds adjacent pairs level by level."""
    import numpy as np

    from gpu_phase_router import _tree

    v = [1e16, 1.0, 1.0, 1.0]
    left_to_right = 0.0
    for x in v:
        left_to_right += x
    assert left_to_right == 1e16
    assert _reference.tree_sum(v) == 1e16 + 2 == 10000000000000002.0
    assert _tree.tree_sum(np, np.array(v)) == 10000000000000002.0
    assert _reference.tree_sum([1e16, 1.0, 1.0]) == (1e16 + 1.0) + (1.0 + 0.0) == 1e16
    assert _reference.tree_sum([2.5]) == 2.5
