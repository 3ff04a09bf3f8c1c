"""Data-parallel training with ``MoERouter`` on two gloo processes (SPEC §15, §16).

With ``process_group=`` every rank's ``expert_bias`` after each training call equals the SPEC §16
update written here by hand from both ranks' logits together (routed counts and ``T`` summed):
with uneven batch sizes and a rank with ``T = 0``, under ``DistributedDataParallel`` with gradient
accumulation (``broadcast_buffers`` on and off), and after a checkpoint saved by rank 0 and loaded
by both. Eval mode calls no collective; a group the rank is not in is refused; the content-blind
methods route each rank's batch with ``seed + step`` (SPEC §15), ``step`` equal on every rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch not installed: gpu_phase_router.torch not exercised")

from _dp_worker import CAPS, RATE, E, K  # noqa: E402

from gpu_phase_router import route  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "_dp_worker.py"
pytestmark = pytest.mark.torch


def f32(x: float) -> float:
    return float(np.float32(x))


def oracle_update(bias: list[float], batches: list[list[list[float]]]) -> list[float]:
    """SPEC §16: the biased top-k of every rank's rows, counted together, one sign step."""
    routed, n_tok = [0] * E, 0
    for rows in batches:
        for row in rows:
            v = [max(f32(f32(x) + f32(b)), -3.4028234663852886e38) for x, b in zip(row, bias, strict=True)]
            for e in sorted(range(E), key=lambda e: (-v[e], e))[:K]:
                routed[e] += 1
            n_tok += 1
    share = [c / sum(CAPS) for c in CAPS]
    out = []
    for e in range(E):
        target = (K * n_tok) * share[e]
        sign = (target > routed[e]) - (target < routed[e])
        out.append(f32(f32(bias[e]) + f32(RATE) * sign))
    return out


def oracle_biases(per_rank_logits: list[list[list[list[float]]]]) -> list[list[float]]:
    """The bias after each training call, from zeros."""
    bias, out = [0.0] * E, []
    for batches in zip(*per_rank_logits, strict=True):
        bias = oracle_update(bias, list(batches))
        out.append(bias)
    return out


def own_biases(logits: list[list[list[float]]]) -> list[list[float]]:
    return oracle_biases([logits])


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, gloo):
    store = tmp_path_factory.mktemp("dp") / "store"
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(rank), str(store)],
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    outs = []
    try:
        for rank, proc in enumerate(procs):
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, f"rank {rank} failed:\n{err[-3000:]}"
            outs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return outs


@pytest.mark.subprocess
def test_uneven_batches_and_an_empty_rank_keep_equal_biases(ranks):
    got = [r["uneven"] for r in ranks]
    assert [len(b) for b in got[1]["logits"]][3] == 0 and len(got[1]["logits"][9]) == 5
    expected = oracle_biases([g["logits"] for g in got])
    assert got[0]["bias"] == expected
    assert got[1]["bias"] == expected
    assert got[0]["step"] == got[1]["step"] == 10
    # the ranks' own updates differ, so the sum is what is tested
    assert own_biases(got[0]["logits"]) != own_biases(got[1]["logits"])


@pytest.mark.subprocess
@pytest.mark.parametrize("which", [0, 1], ids=["broadcast_buffers", "no_broadcast_buffers"])
def test_ddp_with_gradient_accumulation_keeps_equal_biases(ranks, which):
    got = [r["ddp"][which] for r in ranks]
    expected = oracle_biases([g["logits"] for g in got])  # one update per forward, 3 per optimizer step
    assert got[0]["bias"] == expected
    assert got[1]["bias"] == expected
    assert got[0]["step"] == got[1]["step"] == 12
    assert got[0]["gate"] == got[1]["gate"]  # DDP kept the weights equal, so the logits are the model's
    assert own_biases(got[0]["logits"]) != own_biases(got[1]["logits"])


@pytest.mark.subprocess
def test_checkpoint_from_rank_0_resumes_both_ranks_exactly(ranks):
    for r in ranks:
        assert r["resume"]["resumed"] == r["resume"]["whole"]
        assert r["resume"]["step"] == 8
    assert ranks[0]["resume"]["whole"] == ranks[1]["resume"]["whole"]


@pytest.mark.subprocess
def test_eval_alone_calls_no_collective_and_leaves_the_bias(ranks):
    got = [r["eval_alone"] for r in ranks]
    expected = oracle_biases([g["logits"] for g in got])[-1]
    assert got[0]["bias"] == got[1]["bias"] == expected
    assert got[0]["step"] == got[1]["step"] == 2


@pytest.mark.subprocess
def test_a_group_without_this_rank_is_refused(ranks):
    assert ranks[0]["not_member"] is None
    assert "process_group" in ranks[1]["not_member"] and "not a member" in ranks[1]["not_member"]


@pytest.mark.subprocess
def test_content_blind_ranks_route_with_the_same_step(ranks):
    """SPEC §15: each rank routes its own batch with ``route(ones(T), cap, k, seed + step)``; the
    step is the same on every rank, so ranks with the same ``T`` get the same routes."""
    for r in ranks:
        got = r["phase"]
        assert got["step"] == 3
        for step, (n, experts) in enumerate(zip(got["sizes"], got["experts"], strict=True)):
            expected = route(np.ones(n), np.array(CAPS), k=K, seed=3 + step, method="phase")
            assert experts == np.asarray(expected).tolist()
    assert ranks[0]["phase"]["experts"][:2] == ranks[1]["phase"]["experts"][:2]
