"""The training benchmarks' own pieces: the standard-library text and its splits, the no-caps
reference router, the router table, the goal checks and the measured router variants
(benchmarks/bench_training.py, benchmarks/bench_char_lm.py, benchmarks/bench_bias_variants.py)."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import bench_bias_variants as bv  # noqa: E402
import bench_char_lm as lm  # noqa: E402
import bench_training as bt  # noqa: E402

from gpu_phase_router.torch import learned  # noqa: E402

# --- the text -------------------------------------------------------------------------------------------

FILES = {
    "b.py": "import os\n" * 40,
    "a.py": "def f(x):\n    return x\n" * 30,
    "email/__init__.py": "EMAILTOPIC = 'header'\n" * 20,
    "email/mime/text.py": "MIMEPART = 1\n" * 20,
    "emailx.py": "NOTTOPIC = 2\n" * 20,  # shares the prefix, is not in the package
    "pkg/z.py": "class Z:\n    pass\n" * 30,
    "test/t.py": "SKIPPED_TEST = 1\n",
    "pkg/tests/u.py": "SKIPPED_TESTS = 1\n",
    "site-packages/s.py": "SKIPPED_SITE = 1\n",
    "encodings/cp.py": "SKIPPED_CODEC = 1\n",
    "pkg/notes.txt": "not python\n",
}


@pytest.fixture
def library(tmp_path: Path) -> str:
    for rel, text in FILES.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    lm.load_corpus.cache_clear()
    return str(tmp_path)


def decode(ids: np.ndarray) -> str:
    inverse = {int(v): chr(c) for c, v in enumerate(lm._LUT) if v}
    return "".join(inverse.get(int(i), "?") for i in ids)


def test_files_sorted_without_skipped_folders(library: str) -> None:
    files = lm.stdlib_files(library)
    assert files == sorted(files)
    assert files == ["a.py", "b.py", "email/__init__.py", "email/mime/text.py", "emailx.py", "pkg/z.py"]


def test_encode_ids() -> None:
    assert lm.encode("A \n\t~\u00e9").tolist() == [34, 1, 96, 97, 95, 0]
    assert lm.VOCAB == 98


def test_topic_split_excluded_from_training(library: str) -> None:
    corpus = lm.load_corpus(library, topic="email", block=64, holdout=0.2)
    assert corpus.topic_files == ("email/__init__.py", "email/mime/text.py")
    assert "emailx.py" in corpus.train_files
    train, topic = decode(corpus.train), decode(corpus.topic)
    assert "EMAILTOPIC" in topic and "MIMEPART" in topic
    assert "EMAILTOPIC" not in train and "MIMEPART" not in train
    assert "NOTTOPIC" in train and "SKIPPED" not in train + topic
    # the files in sorted order, joined by newlines
    assert train.startswith(FILES["a.py"] + "\n" + FILES["b.py"])


def test_random_split_blocks_disjoint_and_windows_inside(library: str) -> None:
    corpus = lm.load_corpus(library, topic="email", block=64, holdout=0.2)
    n_blocks = corpus.train.shape[0] // 64
    both = np.concatenate([corpus.blocks, corpus.heldout])
    assert sorted(both.tolist()) == [64 * i for i in range(n_blocks)]
    assert corpus.heldout.shape[0] == round(0.2 * n_blocks)
    starts = lm.train_starts(corpus, 500, 16, np.random.default_rng(1))
    block_of = starts // 64
    assert set(block_of.tolist()) <= set((corpus.blocks // 64).tolist())
    assert np.all(starts + 17 <= (block_of + 1) * 64)  # the window and its target stay in the block
    x, y = lm.train_batch(corpus, 8, 16, np.random.default_rng(2))
    assert x.shape == y.shape == (8, 16) and torch.equal(x[:, 1:], y[:, :-1])


def test_corpus_deterministic(library: str) -> None:
    first = lm.load_corpus(library, topic="email", block=64, holdout=0.2)
    lm.load_corpus.cache_clear()
    again = lm.load_corpus(library, topic="email", block=64, holdout=0.2)
    assert first is not again
    for name in ("train", "blocks", "heldout", "topic"):
        assert np.array_equal(getattr(first, name), getattr(again, name))
    other = lm.load_corpus(library, topic="email", block=64, holdout=0.2, seed=1)
    assert not np.array_equal(first.heldout, other.heldout)


def test_eval_windows(library: str) -> None:
    corpus = lm.load_corpus(library, topic="email", block=64, holdout=0.2)
    x, y = lm.eval_windows(corpus, "topic", 5, 16)
    assert x.shape == (5, 16) and int(x[0, 0]) == int(corpus.topic[0])
    assert int(y[-1, -1]) == int(corpus.topic[-1])  # evenly spread up to the end of the topic text
    x, _ = lm.eval_windows(corpus, "random", 3, 16)
    firsts = {int(corpus.train[s]) for s in corpus.heldout}
    assert {int(v) for v in x[:, 0]} <= firsts
    with pytest.raises(ValueError, match="split"):
        lm.eval_windows(corpus, "other", 3, 16)


def test_corpus_bad_arguments(library: str) -> None:
    with pytest.raises(ValueError, match="topic"):
        lm.load_corpus(library, topic="nosuchpackage")
    with pytest.raises(ValueError, match="holdout"):
        lm.load_corpus(library, holdout=1.0)
    with pytest.raises(ValueError, match="root"):
        lm.stdlib_files(Path(library) / "a.py")


def test_real_standard_library_has_the_topic() -> None:
    files = lm.stdlib_files()
    assert any(lm.in_topic(f, lm.TOPIC) for f in files)
    assert not any(f.startswith(("test/", "site-packages/")) for f in files)


# --- routers --------------------------------------------------------------------------------------------


def test_nocaps_serves_every_slot() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(300, 6, generator=gen)
    logits[:, 0] += 5.0  # every token wants expert 0: far above any fair cap
    router = bt.NoCapsTopK(6, 2)
    plan = router(logits)
    assert bool(plan.kept.all())
    assert int(plan.tokens_per_expert.sum()) == 600 and int(plan.tokens_per_expert[0]) == 300
    top = torch.topk(logits, 2, dim=1)
    assert torch.equal(plan.experts, top.indices)
    assert torch.allclose(plan.weights, torch.softmax(top.values, dim=1), atol=1e-6)
    x = torch.randn(300, 4, generator=gen)
    assert torch.allclose(plan.combine(plan.dispatch(x)), x, atol=1e-5)  # weights sum to 1, all kept


def test_router_table() -> None:
    assert bt.router_options("systematic") == {"method": "systematic"}
    capped = bt.router_options("topk")
    assert capped is not None and capped["method"] == "topk"
    offered, missing = bt.supported(bt.ROUTERS)
    assert "nocaps" in offered and "topk" in offered and set(offered) | set(missing) == set(bt.ROUTERS)
    if "balance" in inspect.signature(bt.MoERouter.__init__).parameters:  # SPEC §16 options
        assert missing == [] and all(lm.router_supported(n) for n in lm.ROUTERS)
        assert bt.router_options("bias_reroute") == {"method": "topk", "balance": "bias", "overflow": "reroute"}
        router = bt.make_router("topk", bt.Config(), 0)
        assert (router.balance, router.overflow) == (None, "drop")
    assert isinstance(bt.make_router("nocaps", bt.Config(), 0), bt.NoCapsTopK)
    with pytest.raises(ValueError, match="profile"):
        bt.profile_config("other")
    strong = bt.profile_config("strong")
    assert strong.num_experts == 16 and sorted(strong.caps().tolist())[-1] == 8.0


def test_training_run_reports_served_and_loads() -> None:
    cfg = bt.Config(steps=3, tokens=64, seeds=[0], routers=["nocaps", "systematic", "bias_reroute"], eval_tokens=64)
    res = bt.run(cfg, log=None)
    rows = {r["router"]: r for r in bt.summary(res)}
    assert rows["nocaps"]["served_pct"] == 100.0 and rows["nocaps"]["ratio"] == 1.0
    assert rows["systematic"]["served_pct"] == 100.0 and rows["systematic"]["load_max"] <= 1.0
    # the capacity bias after the last step: three sign steps of 1e-2 from zero, for the bias router only
    assert res["runs"]["nocaps"][0]["expert_bias"] is None and res["runs"]["systematic"][0]["expert_bias"] is None
    bias = np.array(res["runs"]["bias_reroute"][0]["expert_bias"])
    assert bias.shape == (8,) and np.all(np.abs(bias) <= 0.03 + 1e-6) and np.any(bias != 0.0)


def _fake(losses: dict[str, float], served: float = 1.0, load_max: float = 1.0) -> dict:
    run = {
        "capacity": [2, 1],
        "routed_per_step": [1, 1],
        "kept_per_step": [1, 1],
        "mean_drop": 1 - served,
        "served_mean": served,
        "served_min": served,
        "load_max": load_max,
        "mean_no_expert": 0.0,
        "eval_loss": 0.0,
        "ms_per_step": 1.0,
        "loss": [1.0] * 6,
        "drop": [0.5, 0.5, 0.0, 0.0, 0.0, 0.0],  # served 100 % over the last third
    }
    return {"capacities": [1.0, 0.5], "runs": {n: [run | {"final_loss": v}] for n, v in losses.items()}}


def test_goals_met_and_missed() -> None:
    good = bt.goals({"half": _fake({"nocaps": 1.0, "bias_reroute": 1.05})})
    assert [g["met"] for g in good] == [True, True, True]
    bad = bt.goals({"half": _fake({"nocaps": 1.0, "bias_reroute": 1.2}, served=0.99, load_max=1.01)})
    assert [g["met"] for g in bad] == [False, False, False]
    strong = bt.goals({"strong": _fake({"nocaps": 1.0, "bias_reroute": 2.0, "topk": 9.0})})
    assert [g["met"] for g in strong] == [True, True, False]  # 2.0 / 9.0 > 0.2
    assert bt.goals({"half": _fake({"nocaps": 1.0})})[0]["met"] is False
    assert "; 100.000 %)" in good[0]["value"]  # the last third of the steps


# --- the character model ----------------------------------------------------------------------------------


def test_char_lm_tiny_run(library: str) -> None:
    corpus = lm.load_corpus(library, topic="email", block=64, holdout=0.2)
    cfg = lm.Config(d_model=16, heads=2, hidden=16, context=16, batch=4, steps=2, seeds=[0], eval_windows=8, block=64)
    res = lm.train_one(cfg, "nocaps", 0, corpus)
    assert res["served_min"] == 1.0 and len(res["loss"]) == 2
    ev = res["eval"]["train"]
    for split in ("random", "topic"):
        assert ev[split]["served_min"] == 1.0 and 0 < ev[split]["bits"] < 10
    assert np.asarray(res["load_max"]).shape == (cfg.layers, 8)
    sysres = lm.train_one(cfg, "systematic", 0, corpus)
    assert sysres["served_min"] == 1.0 and np.max(sysres["load_max"]) <= 1.0


def _lm_runs(bits: dict[int, float], topic_shift: float = 0.1) -> list[dict]:
    """Runs of one router: eval bits per seed (training factor and no caps alike)."""
    return [
        {"seed": s, "eval": {f: {"random": {"bits": b}, "topic": {"bits": b + topic_shift}} for f in ("train", "inf")}}
        for s, b in bits.items()
    ]


def test_seeds_table_pairs_seeds_and_groups_them() -> None:
    config = {"eval_factors": [None, float("inf")]}
    ref = {s: 3.0 + 0.01 * s for s in range(6)}
    deltas = [0.03, 0.00, 0.03, -0.01, 0.01, 0.06]  # groups of 3: +0.02, +0.02; mean +0.02
    router = {s: ref[s] + d for s, d in enumerate(deltas)}
    results = {"half": {"config": config, "runs": {"nocaps": _lm_runs(ref), "default": _lm_runs(router)}}}
    lines = lm.seeds_table(results).splitlines()
    assert len(lines) == 2 + 4  # header, rule, 2 factors x 2 splits
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[:6] == ["half", "default", "train", "random", "6", "+0.0200"]
    assert cells[7] == "+0.020 / +0.020"
    assert cells[8] == "-0.010 / +0.060"
    lo, hi = (float(v) for v in cells[6].split(" to "))
    assert -0.01 <= lo < 0.02 < hi <= 0.06
    # the reference from another run, paired by seed (this run has seeds 3-5 only, no nocaps)
    part = {"half": {"config": config, "runs": {"default": [r for r in _lm_runs(router) if r["seed"] >= 3]}}}
    assert lm.seeds_table(part).count("\n") == 1  # no reference: header only
    line = lm.seeds_table(part, reference=results).splitlines()[2]
    assert "| 3 | +0.0200 |" in line and "-0.010 / +0.060" in line
    # a router not scored with a factor (expert choice has no uncapped eval: None) has no rows for it
    choice = _lm_runs(router)
    for r in choice:
        r["eval"]["inf"] = None
    results["half"]["runs"]["expert_choice"] = choice
    rows = lm.seeds_table(results).splitlines()[2:]
    assert len(rows) == 4 + 2
    assert [r.split("|")[3].strip() for r in rows if "| expert_choice |" in r] == ["train", "train"]


# --- the router variants --------------------------------------------------------------------------------


def test_all_propose_places_both_unplaced_slots_in_one_round() -> None:
    # 4 experts, cap 1 each; t0 keeps experts 0 and 1 (higher scores), t1 loses both slots
    logits = torch.tensor([[5.0, 4.0, 0.0, 0.0], [3.0, 2.0, 1.0, 0.0]])
    capacity = torch.ones(4, dtype=torch.int64)
    _, experts, placed = bv._learned_topk_all(logits, None, 2, capacity, 1)
    assert experts.tolist() == [[0, 1], [2, 3]] and bool(placed.all())
    # SPEC §16: one proposal per token and round, so one round places only t1's first slot
    _, experts, placed = learned.learned_topk(logits, None, 2, capacity, 1)
    assert experts.tolist() == [[0, 1], [2, 1]] and placed.tolist() == [[True, True], [True, False]]


def test_all_propose_matches_spec_at_k1_and_keeps_caps() -> None:
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        logits = torch.randint(-2, 3, (40, 5), generator=gen).float()
        capacity = torch.randint(0, 12, (5,), generator=gen)
        bias = torch.randn(5, generator=gen)
        for k in (1, 2, 3):
            mine = bv._learned_topk_all(logits, bias, k, capacity, 3)
            if k == 1:  # one slot per token: the same rule as SPEC §16
                spec = learned.learned_topk(logits, bias, 1, capacity, 3)
                assert all(torch.equal(a, b) for a, b in zip(mine, spec, strict=True))
            _, experts, placed = mine
            kept = experts[placed]
            assert bool((torch.bincount(kept, minlength=5) <= capacity).all())
            for row, ok in zip(experts, placed, strict=True):
                assert len(set(row[ok].tolist())) == int(ok.sum())  # never one expert twice


def test_variant_patches_are_undone() -> None:
    names = ("learned_topk", "topk_plan", "update_bias", "_plan", "_round", "select_and_cap")
    before = tuple(getattr(learned, n) for n in names)
    with pytest.raises(RuntimeError), bv.patched("valve") as opts:
        assert opts == {} and learned.update_bias is not before[2]
        raise RuntimeError
    with bv.patched("rate3e-2") as opts:
        assert opts == {"bias_rate": 3e-2}
    for variant in ("full_softmax_weights", "biased_weights", "unbiased_proposals", "first_unbiased"):
        with bv.patched(variant):
            assert tuple(getattr(learned, n) for n in names) != before
    assert tuple(getattr(learned, n) for n in names) == before


def test_target_variants_step_towards_their_targets() -> None:
    """100 slots counted 51 / 25 / 24 at shares 1/2, 1/4, 1/4: the default's targets 50 / 25 / 25
    give steps -, 0, +; shares ``s^1.1`` renormalised (0.517, 0.241, 0.241: targets 51.7 / 24.1 /
    24.1) give +, -, +; ``s^0.9`` (0.483, 0.259, 0.259) -, +, +. The valves aim at 0.9 / 0.75 of
    caps 60 / 30 / 20 (54 / 27 / 18 and 45 / 22.5 / 15) and never rise above 0."""
    selected = torch.tensor([0] * 51 + [1] * 25 + [2] * 24).reshape(50, 2)
    share = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    steps = {}
    for variant in ("default", "share_pow1.1", "share_pow0.9"):
        with bv.patched(variant):
            bias = torch.zeros(3)
            learned.update_bias(bias, selected, share, 0.5)
            steps[variant] = bias.tolist()
    assert steps == {"default": [-0.5, 0.0, 0.5], "share_pow1.1": [0.5, -0.5, 0.5], "share_pow0.9": [-0.5, 0.5, 0.5]}
    bv._CAPACITY["capacity"] = torch.tensor([60, 30, 20])
    for variant, expected in (("valve90", [0.0, -0.25, -0.25]), ("valve75", [-0.25, -0.75, -0.25])):
        with bv.patched(variant):
            bias = torch.tensor([0.0, -0.5, 0.0])
            learned.update_bias(bias, selected, share, 0.25)
            assert bias.tolist() == expected, variant


def test_fill_variants_aim_the_others_at_a_share_of_their_caps() -> None:
    """100 slots, shares 1/2, 1/4, 1/4, caps 60 / 30 / 30: ``fill0.6`` aims experts 1 and 2 at 0.6 * 30 =
    18 and expert 0 at the other 64; ``fill0.65`` at 19.5 and 61. Counted 62 / 19 / 19, the steps are
    +, -, - and -, +, +. Two largest experts (shares 0.4, 0.4, 0.2, caps 48 / 48 / 24) split what expert 2
    (0.6 * 24 = 14.4) leaves, 42.8 each: counted 43 / 42 / 15, -, +, -."""
    cases = [
        ([62, 19, 19], [0.5, 0.25, 0.25], [60, 30, 30], {"fill0.6": [1, -1, -1], "fill0.65": [-1, 1, 1]}),
        ([43, 42, 15], [0.4, 0.4, 0.2], [48, 48, 24], {"fill0.6": [-1, 1, -1]}),
    ]
    for counts, share, caps, expected in cases:
        selected = torch.cat([torch.full((n,), e) for e, n in enumerate(counts)]).reshape(50, 2)
        bv._CAPACITY["capacity"] = torch.tensor(caps)
        for variant, signs in expected.items():
            with bv.patched(variant):
                bias = torch.zeros(3)
                learned.update_bias(bias, selected, torch.tensor(share, dtype=torch.float64), 0.5)
            assert bias.tolist() == [0.5 * v for v in signs], variant


def test_unbiased_proposals_reroute_by_the_unbiased_logit() -> None:
    """Expert 1 is selected (largest biased value) but has no room; of the others, expert 2 has the
    larger biased value and expert 0 the larger logit."""
    logits = torch.tensor([[3.0, 1.0, 2.0]])
    bias = torch.tensor([0.0, 5.0, 2.0])
    capacity = torch.tensor([1, 0, 1])
    _, experts, placed = learned.learned_topk(logits, bias, 1, capacity, 1)
    assert experts.tolist() == [[2]] and placed.tolist() == [[True]]
    with bv.patched("unbiased_proposals"):
        _, experts, placed = learned.learned_topk(logits, bias, 1, capacity, 1)
    assert experts.tolist() == [[0]] and placed.tolist() == [[True]]


def test_first_unbiased_keeps_each_tokens_best_expert() -> None:
    """The bias (large on expert 2) takes both slots of the default's selection; with
    ``first_unbiased`` the first slot is the token's best logit (expert 0, or the lower index on a
    tie) and only the second follows the bias; caps still rank by the unbiased logit."""
    logits = torch.tensor([[3.0, 2.0, 0.0, 1.0], [1.0, 1.0, 0.5, 0.2]])
    bias = torch.tensor([0.0, 0.0, 5.0, 4.0])
    capacity = torch.tensor([2, 2, 1, 2])
    selected, _, placed = learned.learned_topk(logits, bias, 2, capacity, 0)
    assert selected.tolist() == [[2, 3], [2, 3]]
    with bv.patched("first_unbiased"):
        selected, experts, placed = learned.learned_topk(logits, bias, 2, capacity, 0)
        one = learned.learned_topk(logits[:, :3], bias[:3], 1, capacity[:3], 0)[0]
    assert selected.tolist() == [[0, 2], [0, 2]] and torch.equal(experts, selected)
    assert placed.tolist() == [[True, False], [True, True]]  # expert 2 keeps one slot: the higher logit
    assert one.tolist() == [[0], [0]]  # k = 1: the unbiased argmax alone


def test_weight_variants_give_the_weights_they_name() -> None:
    from gpu_phase_router.torch import MoERouter

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.5, 3.0, 1.0]])
    router = MoERouter(4, 2, [1.0, 1.0, 1.0, 1.0], capacity_factor=2.0).eval()
    with torch.no_grad():
        router.expert_bias.copy_(torch.tensor([0.0, 1.0, -0.5, 0.25]))
    plan = router(logits)
    chosen = logits.gather(1, plan.experts)
    torch.testing.assert_close(plan.weights, torch.softmax(chosen, dim=1))  # the default: renormalised
    with bv.patched("full_softmax_weights"):
        full = router(logits)
    assert torch.equal(full.experts, plan.experts)
    torch.testing.assert_close(full.weights, torch.softmax(logits, dim=1).gather(1, plan.experts))
    with bv.patched("biased_weights"):
        biased = router(logits)
    assert torch.equal(biased.experts, plan.experts)
    biased_chosen = (logits + router.expert_bias).gather(1, plan.experts)
    torch.testing.assert_close(biased.weights, torch.softmax(biased_chosen, dim=1))


def test_ratio_interval_pairs_seeds() -> None:
    ref = np.array([1.0, 2.0, 4.0, 8.0])
    mean, lo, hi, median = bv.ratio_interval(2.0 * ref, ref)
    assert (mean, lo, hi, median) == pytest.approx((2.0, 2.0, 2.0, 2.0))  # every seed 2x: no spread
    losses = np.array([1.0, 2.0, 4.0, 16.0])  # the per-seed ratios 1, 1, 1, 2
    mean, lo, hi, median = bv.ratio_interval(losses, ref)
    assert mean == pytest.approx(23.0 / 15.0) and median == pytest.approx(1.0)
    assert 1.0 <= lo <= mean <= hi <= 2.0
    assert bv.ratio_interval(losses[::-1], ref)[3] != pytest.approx(1.0)  # pairs by seed, not by rank


def test_variant_table_gives_the_interval_column() -> None:
    runs = {
        name: [dict(final_loss=f * v, eval_loss=f, served_mean=1.0, served_min=0.99) for v in (1.0, 3.0)]
        for name, f in (("nocaps", 1.0), ("default", 3.0))
    }
    text = bv.table({"runs": runs})
    assert "| default | 100.00 % (99.00 %) | 6.0000 | 3.00 [3.00, 3.00] | 3.00 | 3.0000 |" in text
    runs["short"] = runs["default"][:1]  # seeds that do not pair: no ratio
    assert "| short | 100.00 % (99.00 %) | 3.0000 | – | – | 3.0000 |" in bv.table({"runs": runs})


# --- the cluster oracles (diagnostics of the strong profile) --------------------------------------------


def _units(table: dict, expert: int) -> float:
    return sum(hi - lo for pieces in table.values() for e, lo, hi in pieces if e == expert)


@pytest.mark.parametrize("variant", sorted(bv.ORACLES))
def test_cluster_oracle_tables_cover_every_slot_within_the_caps(variant: str) -> None:
    """Strong profile, 8 clusters, k = 2: 16 units of 1/16 of the slots. Each cluster's slot is cut
    into pieces [0, a), [a, b), ..., [z, 1) with no gap; a cluster's two slots name different
    experts; the 8x expert gets its units, each 2x expert one, each 1x expert (16 - units - 3) / 12;
    and no expert is planned above its hard cap, 1.25 * 16 * cap / sum(cap) units."""
    caps = bt.profile_config("strong").caps()
    layout, big_units = bv.ORACLES[variant]
    table = bv.oracle_table(caps, 8, layout, big_units)
    assert sorted(table) == [(c, s) for c in range(8) for s in range(2)]
    for (cluster, slot), pieces in table.items():
        edges = [lo for _, lo, _ in pieces] + [pieces[-1][2]]
        assert edges[0] == 0.0 and edges[-1] == pytest.approx(1.0), (cluster, slot)
        assert all(hi == lo2 for (_, _, hi), (_, lo2, _) in zip(pieces, pieces[1:], strict=False)), (cluster, slot)
    for cluster in range(8):
        assert not {e for e, _, _ in table[cluster, 0]} & {e for e, _, _ in table[cluster, 1]}, cluster
    units = {e: _units(table, e) for e in range(16)}
    assert units[int(np.argmax(caps))] == pytest.approx(big_units)
    for e in np.flatnonzero(caps == 2.0):
        assert units[int(e)] == pytest.approx(1.0)
    for e in np.flatnonzero(caps == 1.0):
        assert units[int(e)] == pytest.approx((16 - big_units - 3) / 12)
    for e in range(16):
        assert units[e] <= 1.25 * 16 * caps[e] / caps.sum() + 1e-9, e
    if layout == "whole":  # the 8x expert takes whole first slots
        assert sum(len(p) == 1 and p[0][0] == int(np.argmax(caps)) for p in table.values()) == big_units


def test_cluster_oracle_routes_by_cluster_and_keeps_the_caps() -> None:
    """A batch of one cluster overfills its experts: the plan never exceeds a cap, the tokens that fit
    go where the table says, and the rest move to experts the token does not use yet."""
    cfg = bt.profile_config("strong")
    oracle = bv.ClusterOracle(cfg, seed=0, layout="whole", big_units=5.0)
    big = int(np.argmax(cfg.caps()))
    g = torch.Generator().manual_seed(1)
    x = oracle.centres[0] + torch.randn(1000, cfg.d_in, generator=g)  # cluster 0: first slot -> the 8x expert
    oracle.inputs = x
    plan = oracle(torch.zeros(1000, cfg.num_experts))
    caps = bt.reference_caps(cfg, 1000)
    assert (plan.tokens_per_expert.numpy() <= caps).all()
    first = plan.experts[:, 0]
    assert (first[: caps[big]] == big).all() and (first[caps[big] :] != big).all()
    assert (plan.experts[:, 0] != plan.experts[:, 1]).all()
    mixed = torch.cat([oracle.centres[c] + torch.randn(40, cfg.d_in, generator=g) for c in range(8)])
    oracle.inputs = mixed
    plan = oracle(torch.zeros(320, cfg.num_experts))
    for c in range(8):  # no cap binds at 40 tokens per cluster: every token goes where the table says
        expected = {e for e, _, _ in oracle.table[c, 0]} | {e for e, _, _ in oracle.table[c, 1]}
        assert set(plan.experts[40 * c : 40 * (c + 1)].flatten().tolist()) <= expected, c
    assert bool(plan.kept.all())
    ones = [int(e) for e in np.flatnonzero(cfg.caps() == 1.0)]  # first slots to one 1x expert (cap 30 of
    oracle.table = {(c, 0): [(ones[0], 0.0, 1.0)] for c in range(8)}  # 320 slots), the second slots of
    oracle.table |= {(c, 1): [(big if c < 4 else ones[1], 0.0, 1.0)] for c in range(8)}  # clusters 0-3 to the 8x
    oracle.inputs = mixed  # expert (160 of 246): it has the most room, but the first overflowing tokens use it
    plan = oracle(torch.zeros(320, cfg.num_experts))
    assert (plan.experts[:160, 1] == big).all() and (plan.experts[:, 0] != plan.experts[:, 1]).all()
    assert (plan.tokens_per_expert.numpy() <= bt.reference_caps(cfg, 320)).all() and bool(plan.kept.all())
    oracle.inputs = None
    with pytest.raises(RuntimeError, match="inputs"):
        oracle(torch.zeros(320, cfg.num_experts))


def test_cluster_oracles_refuse_other_profiles_and_the_char_lm() -> None:
    with pytest.raises(ValueError, match="strong profile"):
        bv.ClusterOracle(bt.profile_config("half"), seed=0, layout="whole", big_units=5.0)
    with pytest.raises(ValueError, match="not run on the char LM"):
        bv.run_char_lm(["cluster_oracle5"], out="unused")


def test_variant_list_leaves_out_what_the_task_does_not_run(capsys: pytest.CaptureFixture[str]) -> None:
    """The default variant list runs the cluster oracles at the strong profile with k = 2 only, and
    the char LM none of the baselines, ``bias_nocaps`` or the oracles; asking for them is an error
    that names ``--variants``, before any training."""
    assert bv.not_run("training", "strong", None) == {} and bv.not_run("training", "strong", 2) == {}
    assert set(bv.not_run("training", "half", None)) == set(bv.ORACLES) == set(bv.not_run("training", "strong", 1))
    assert set(bv.not_run("char_lm", "strong", None)) == {*bv.BASELINES, "bias_nocaps", *bv.ORACLES}
    for argv in (
        ["--profile", "half", "--variants", "nocaps", "cluster_oracle6"],
        ["--k", "1", "--variants", "cluster_oracle_fragmented"],
        ["--task", "char_lm", "--variants", "topk"],
    ):
        with pytest.raises(SystemExit):
            bv.main(argv)
        assert "argument --variants" in capsys.readouterr().err
