"""The ± a user reads on every leaderboard row: 95 % intervals over seeds and test examples, and "vs lora" marks.

Run folders are hand-made (:func:`write_examples_run`: every task an exact-match task whose per-example right/wrong
matrix we choose), so the right answer is known and no model is needed.
"""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import yaml
from scipy import stats
from test_leaderboard import TASKS3, write_run

from clbench import cl_metrics, intervals
from clbench.leaderboard import build_leaderboard, example_matrices, load_run
from clbench.scores import example_scores, score


def write_examples_run(root, method: str, seed: int, correct: list[np.ndarray], **kw):
    """A run folder whose predictions are right (``"A"``) where ``correct[j][i, k]`` is 1 and wrong (``"B"``) where
    it is 0 (NaN: row not evaluated); R is their mean, every task scored by exact-match accuracy."""
    correct = [np.asarray(c, dtype=float) for c in correct]
    R = np.stack([c.mean(axis=1) for c in correct], axis=-1)
    folder = write_run(root, method, seed, R=R, tasks=TASKS3, **kw)
    config = yaml.safe_load((folder / "config.yaml").read_text())
    for task in config["identity"]["tasks"]:
        task["metric"] = "accuracy"
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    for j, task in enumerate(TASKS3):
        for i in np.flatnonzero(~np.isnan(R[:, j])):
            recs = [{"prompt": f"q{k}", "answer": "A", "prediction": "A" if ok else "B"}
                    for k, ok in enumerate(correct[j][i])]
            path = folder / "predictions" / f"after-{i}" / f"{task}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(recs))
    return folder


def random_correct(rng: np.random.Generator, p: float, n: int = 24, T: int = 3) -> list[np.ndarray]:
    """Per-task (T+1, n) right/wrong matrices, each example right with probability ``p``."""
    return [(rng.random((T + 1, n)) < p).astype(float) for _ in range(T)]


def _row(table, **where):
    rows = table
    for k, v in where.items():
        rows = rows[rows[k] == v]
    assert len(rows) == 1, rows
    return rows.iloc[0]


def test_example_scores_average_to_the_task_score_for_every_scorer():
    """If this fails, the bootstrap resamples per-example scores that do not add up to the task's score in R, and
    every interval is centred on the wrong number (SARI included: HF's SARI is a mean of sentence SARIs)."""
    rnd = random.Random(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", ".", "A", "B", "x = 1", "<NUM_LIT>", "<EOL>", ""]

    def text(k: int) -> str:
        return " ".join(rnd.choice(words) for _ in range(rnd.randint(0, k)))

    for metric in ("accuracy", "first_char_accuracy", "rouge_l", "edit_similarity", "sari"):
        for _ in range(5):
            n = rnd.randint(1, 30)
            answers = [rnd.choice(["A", "B", text(8), ""]) for _ in range(n)]
            preds = [a if rnd.random() < 0.4 else rnd.choice(["A", "B", text(8), ""]) for a in answers]
            prompts = [text(20) for _ in range(n)]
            x = example_scores(metric, preds, answers, prompts)
            assert len(x) == n and all(0.0 <= v <= 1.0 for v in x)
            assert np.mean(x) == pytest.approx(score(metric, preds, answers, prompts), abs=1e-12), metric
    assert example_scores("accuracy", [], [], []) == []
    with pytest.raises(ValueError, match="unknown metric"):
        example_scores("bleu", ["a"], ["a"], ["p"])


def test_vectorised_metrics_equal_the_scalar_definitions():
    """If this fails, bootstrap replicates of OP/BWT/FWT use a formula that differs from the one in metrics.json."""
    rng = np.random.default_rng(1)
    stack = rng.random((4, 5, 9, 8))
    stack[1, 2, 0, 3] = np.nan  # a zero-shot gap: FWT undefined, as in forward_transfer
    out = cl_metrics.summarize_stack(stack)
    for a in range(4):
        for b in range(5):
            for m, value in cl_metrics.summarize(stack[a, b]).items():
                assert out[m][a, b] == pytest.approx(value, nan_ok=True), (m, a, b)
    assert math.isnan(out["FWT"][1, 2])


def test_example_bootstrap_matches_the_known_binomial_spread(tmp_path):
    """If this fails, the test-sample part of every interval is wrong: for exact-match tasks the bootstrap variance of
    OP must be the plug-in binomial variance (1/T²) Σ_j p_j (1 − p_j) / n_j, and rows of R must share one draw."""
    rng = np.random.default_rng(2)
    correct = random_correct(rng, 0.6, n=40)
    folder = write_examples_run(tmp_path, "lora", 0, correct)
    run = load_run(folder)
    examples = example_matrices(run)
    assert examples is not None and all(np.array_equal(x, c) for x, c in zip(examples, correct, strict=True))
    devs = intervals.run_deviations(examples, TASKS3)
    T, n = 3, 40
    p = np.array([c[T].mean() for c in correct])
    expected = np.sqrt((p * (1 - p) / n).sum()) / T
    assert devs["OP"].std() == pytest.approx(expected, rel=0.06)
    # by hand: replicate b of OP is the mean over tasks of the weighted last row, with the task's fixed draw
    w = [intervals.resample_weights(t, n) for t in TASKS3]
    by_hand = np.mean([w[j] @ correct[j][T] for j in range(T)], axis=0) - p.mean()
    assert np.allclose(devs["OP"], by_hand)
    # the same draw rescores every row: a BWT term R[T, j] − R[j+1, j] of two identical rows never moves
    same = [np.vstack([c[:-1], c[-2:-1]]) if j == 1 else c for j, c in enumerate(correct)]  # R[3, 1] == R[2, 1]
    bwt_terms = intervals.resampled_R(same, w)
    assert np.array_equal(bwt_terms[:, 3, 1], bwt_terms[:, 2, 1])
    # fixed seed: the same folder gives the same interval twice, different tasks get different draws
    assert np.array_equal(intervals.resample_weights("FOMC", n), intervals.resample_weights("FOMC", n))
    assert not np.array_equal(w[0], w[1]) and np.allclose(w[0].sum(axis=1), 1.0)
    a, b = build_leaderboard([tmp_path]), build_leaderboard([tmp_path])
    assert a["OP_ci_low"].iloc[0] == b["OP_ci_low"].iloc[0] and a["OP_ci_high"].iloc[0] == b["OP_ci_high"].iloc[0]


def test_seeds_are_combined_with_a_t_interval_and_share_the_example_draws(tmp_path):
    """If this fails, a 3-seed row's interval ignores seed-to-seed spread (or claims the normal 1.96 instead of
    Student's t with 2 df), or averaging seeds tested on the same examples wrongly shrinks the test-sample noise."""
    # no test-sample term: the seed term alone is mean ± t(0.975, S − 1) · sd / √S
    values = [0.40, 0.52, 0.47]
    reps = intervals.row_replicates(values, None, intervals.seed_spread(values), np.random.default_rng(0))
    half = stats.t.ppf(0.975, df=2) * np.std(values, ddof=1) / np.sqrt(3)
    low, high = intervals.percentile_interval(reps)
    assert low == pytest.approx(np.mean(values) - half, rel=0.05)
    assert high == pytest.approx(np.mean(values) + half, rel=0.05)
    # through run folders: three seeds that differ get a wider interval than their shared test-sample term
    rng = np.random.default_rng(7)
    for seed in range(3):
        write_examples_run(tmp_path / "a", "lora", seed, random_correct(rng, 0.3 + 0.2 * seed))
    row = build_leaderboard([tmp_path / "a"]).iloc[0]
    assert row["n_seeds"] == 3 and row["ci_flags"] == "" and row["OP_ci_low"] < row["OP_mean"] < row["OP_ci_high"]
    assert 0.0 <= row["OP_ci_low"] and row["OP_ci_high"] <= 1.0  # never outside the metric's range
    # three identical seeds: the seed term vanishes and the test term is exactly one run's (shared draws)
    correct = random_correct(np.random.default_rng(3), 0.5)
    for seed in range(3):
        write_examples_run(tmp_path / "b", "lora", seed, correct)
    write_examples_run(tmp_path / "c", "lora", 0, correct)
    three = build_leaderboard([tmp_path / "b"]).iloc[0]
    lo, hi = intervals.percentile_interval(intervals.run_deviations(correct, TASKS3)["OP"])
    assert three["OP_ci_low"] == pytest.approx(three["OP_mean"] + lo)
    assert three["OP_ci_high"] == pytest.approx(three["OP_mean"] + hi)
    assert three["OP_ci_high"] > three["OP_ci_low"]


def test_single_seed_row_is_wider_or_flagged_never_zero_width(tmp_path):
    """If this fails, a method run once shows an interval as tight as if seeds did not matter, without saying so,
    or a [x, x] interval that claims certainty nobody measured."""
    rng = np.random.default_rng(4)
    for seed in range(3):
        write_examples_run(tmp_path / "pool", "lora", seed, random_correct(rng, 0.5))
    single = random_correct(rng, 0.7)
    write_examples_run(tmp_path / "pool", "replay", 0, single)
    table = build_leaderboard([tmp_path / "pool"])
    replay = _row(table, method="replay")
    test_only = intervals.percentile_interval(intervals.run_deviations(single, TASKS3)["OP"])
    assert replay["n_seeds"] == 1 and "pooled" in replay["ci_flags"] and "pooled" in replay["ci_note"]
    assert replay["OP_ci_high"] - replay["OP_ci_low"] > test_only[1] - test_only[0]
    # alone in its section: only test sampling is covered, and the row says so
    write_examples_run(tmp_path / "alone", "replay", 0, single)
    alone = build_leaderboard([tmp_path / "alone"]).iloc[0]
    assert "no-seed-var" in alone["ci_flags"] and alone["OP_ci_high"] - alone["OP_ci_low"] > 0
    # alone and every example the same: no interval at all rather than a zero-width one
    write_examples_run(tmp_path / "flat", "replay", 0, [np.ones((4, 24))] * 3)
    flat = build_leaderboard([tmp_path / "flat"]).iloc[0]
    assert flat["OP_mean"] == 1.0 and math.isnan(flat["OP_ci_low"]) and math.isnan(flat["OP_ci_high"])
    assert "no-seed-var" in flat["ci_flags"]
    # a folder without predictions (older runs): flagged, not silently narrow
    write_run(tmp_path / "old", "lora", 0)
    old = build_leaderboard([tmp_path / "old"]).iloc[0]
    assert "no-test-var" in old["ci_flags"] and "no-seed-var" in old["ci_flags"] and math.isnan(old["OP_ci_low"])


def test_vs_lora_marks_distinguishable_rows_only(tmp_path):
    """If this fails, the leaderboard ranks a method above lora on a difference that test-sample and seed noise
    explain (or hides a real one), because the comparison is not paired on the test examples."""
    rng = np.random.default_rng(5)
    for seed in range(3):
        base = random_correct(rng, 0.5)
        write_examples_run(tmp_path / "seeds", "lora", seed, base)
        better = [c.copy() for c in base]
        for c in better:
            c[3] = 1.0  # every final answer right: a gain far beyond seed and test noise
        write_examples_run(tmp_path / "seeds", "moses", seed, better)
    table = build_leaderboard([tmp_path / "seeds"])
    moses, lora = _row(table, method="moses"), _row(table, method="lora")
    assert moses["vs_lora"].startswith("OP +") and moses["OP_vs_lora_low"] > 0 and moses["OP_vs_lora_p"] < 0.05
    assert lora["vs_lora"] == "" and math.isnan(lora["OP_vs_lora_p"])
    # one example more right than lora on the same test set: not distinguishable, and thanks to the pairing the
    # difference's interval is a fraction of either row's own
    base = random_correct(rng, 0.5)
    close = [c.copy() for c in base]
    close[1][3, np.flatnonzero(close[1][3] == 0)[:1]] = 1.0
    write_examples_run(tmp_path / "one", "lora", 0, base)
    write_examples_run(tmp_path / "one", "seqft", 0, close)
    table = build_leaderboard([tmp_path / "one"])
    seqft, lora = _row(table, method="seqft"), _row(table, method="lora")
    assert seqft["vs_lora"].startswith("OP ≈") and seqft["OP_vs_lora_low"] <= 0 < seqft["OP_vs_lora_high"]
    width = seqft["OP_vs_lora_high"] - seqft["OP_vs_lora_low"]
    assert 0 < width < 0.3 * (lora["OP_ci_high"] - lora["OP_ci_low"])


def test_paired_difference_and_marks():
    """If this fails, the p-value or the ≈/+/− mark disagree with the interval they are printed beside."""
    rng = np.random.default_rng(6)
    a = rng.normal(0.3, 0.1, intervals.N_BOOT)
    low, high, p = intervals.paired_difference(a, a - 0.3)
    assert low == pytest.approx(0.3) and high == pytest.approx(0.3) and p == pytest.approx(2 / (intervals.N_BOOT + 1))
    low, high, p = intervals.paired_difference(a, np.full_like(a, 0.3))
    assert low < 0 < high and p > 0.5 and intervals.difference_mark(low, high) == "≈"
    assert intervals.difference_mark(0.1, 0.2) == "+" and intervals.difference_mark(-0.2, -0.1) == "−"
    assert intervals.difference_mark(float("nan"), 1.0) == "?"
    assert intervals.pooled_spread([(0.1, 2), None, (0.2, 2)]) == pytest.approx((math.sqrt(0.025), 4))
    assert intervals.pooled_spread([None]) is None and intervals.seed_spread([0.5]) is None


# ---- the general-ability delta (--general) -----------------------------------------------------------------------


def add_general(folder, before: dict[str, dict[str, list[float]]], after: dict[str, dict[str, list[float]]],
                weighting: str = "pooled", examples: bool = True):
    """Give a hand-made run folder a --general result: general.json's two stages with per-example scores (``before``
    / ``after``: benchmark -> subtask -> scores) and metrics.json's summary, as the harness writes them."""
    from clbench.general import examples_value, general_summary

    rows = {}
    for stage, label, scores in ((0, "before", before), (3, "after-3:C", after)):
        entries = {b: {"weighting": weighting, "units": units} for b, units in scores.items()}
        rows[stage] = {"label": label, "benchmarks": {b: examples_value(e) for b, e in entries.items()},
                       "scores": {}, "seconds": 1.0, **({"examples": entries} if examples else {})}
    (folder / "general.json").write_text(json.dumps({"rows": {str(k): v for k, v in rows.items()}}))
    metrics = json.loads((folder / "metrics.json").read_text())
    metrics["general"] = general_summary(rows)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def _flip(scores: np.ndarray, k: int) -> list[float]:
    """The 0/1 ``scores`` with their first ``k`` ones set to 0 (k examples lost)."""
    out = scores.copy()
    out[np.flatnonzero(out == 1)[:k]] = 0.0
    return out.tolist()


def test_general_delta_interval_is_the_paired_bootstrap_of_per_example_differences(tmp_path):
    """If this fails, the mean general-ability delta shows no interval (or one that ignores which examples were
    tested, or forgets the pairing of the two stages), so a loss of one or two examples out of 50 reads as real."""
    rng = np.random.default_rng(11)
    piqa, arith = (rng.random(50) < 0.6).astype(float), (rng.random(40) < 0.5).astype(float)
    before = {"piqa": {"piqa": piqa.tolist()}, "arith": {"arith": arith.tolist()}}
    after = {"piqa": {"piqa": _flip(piqa, 10)}, "arith": {"arith": arith.tolist()}}
    folder = add_general(write_examples_run(tmp_path / "one", "lora", 0, random_correct(rng, 0.5)), before, after)
    run = load_run(folder)
    from clbench.leaderboard import general_units

    units = general_units(run)
    assert [u.name for u in units] == ["piqa/piqa", "arith/arith"] and [u.weight for u in units] == [0.5, 0.5]
    devs = intervals.general_deviations(units)
    # plug-in bootstrap spread of (1/2) mean_k d_k over piqa's 50 paired differences (arith's are all 0)
    d = np.asarray(after["piqa"]["piqa"]) - piqa
    assert devs.std() == pytest.approx(0.5 * d.std() / np.sqrt(50), rel=0.06)
    row = build_leaderboard([tmp_path / "one"]).iloc[0]
    assert row["general_delta"] == pytest.approx(-10 / 50 / 2)
    assert row["general_delta_ci_low"] < row["general_delta"] < row["general_delta_ci_high"] < 0  # 10 lost: real
    assert "general-no-test-var" not in row["ci_flags"]
    # a tag (unweighted mean of its subtasks' means): the weights follow, and still reproduce the delta
    sub_a, sub_b = (rng.random(30) < 0.5).astype(float), (rng.random(10) < 0.5).astype(float)
    tag = add_general(write_examples_run(tmp_path / "tag", "lora", 0, random_correct(rng, 0.5)),
                      {"tydiqa": {"a": sub_a.tolist(), "b": sub_b.tolist()}},
                      {"tydiqa": {"a": _flip(sub_a, 3), "b": _flip(sub_b, 1)}}, weighting="mean")
    units = general_units(load_run(tag))
    assert [u.weight for u in units] == [0.5, 0.5]
    assert sum(u.weight * u.delta.mean() for u in units) == pytest.approx(load_run(tag)["general"]["delta_mean"])


def test_general_delta_seeds_pairs_and_flags(tmp_path):
    """If this fails, a general delta averaged over seeds is not combined with their spread, a method that keeps its
    general ability is not told apart from lora losing it, or a row without per-example scores claims an interval
    that covers test sampling."""
    rng = np.random.default_rng(12)
    base = (rng.random(60) < 0.6).astype(float)
    for seed in range(3):
        correct = random_correct(rng, 0.5)
        add_general(write_examples_run(tmp_path / "g", "lora", seed, correct), {"boolq": {"boolq": base.tolist()}},
                    {"boolq": {"boolq": _flip(base, 12 + 2 * seed)}})
        add_general(write_examples_run(tmp_path / "g", "replay", seed, correct), {"boolq": {"boolq": base.tolist()}},
                    {"boolq": {"boolq": base.tolist()}})
    table = build_leaderboard([tmp_path / "g"])
    lora, replay = _row(table, method="lora"), _row(table, method="replay")
    assert lora["general_delta_ci_high"] < 0 and lora["ci_flags"] == ""
    # replay's delta is exactly 0 on every seed and example: its own interval collapses to [0, 0] (3 identical
    # seeds), and the paired difference from lora lies above 0
    assert replay["general_delta"] == 0.0 and replay["vs_lora"].endswith("general +")
    assert replay["general_delta_vs_lora_low"] > 0 and replay["general_delta_vs_lora_p"] < 0.05
    # one seed alone in its section: nothing to pool the general seed spread from, and the row says so
    single = build_leaderboard([next((tmp_path / "g").glob("*lora-o1-s0"))]).iloc[0]
    assert "no-seed-var" in single["ci_flags"]
    # an older folder whose general.json has no per-example scores: flagged, covering its seed spread only
    for seed in range(2):
        add_general(write_examples_run(tmp_path / "old", "lora", seed, random_correct(rng, 0.5)),
                    {"boolq": {"boolq": base.tolist()}}, {"boolq": {"boolq": _flip(base, 5 * seed + 3)}},
                    examples=False)
    old = build_leaderboard([tmp_path / "old"]).iloc[0]
    assert old["ci_flags"].split() == ["general-no-test-var"]  # R's predictions are there: only the general term
    assert old["general_delta_ci_low"] < old["general_delta"] < old["general_delta_ci_high"]
    # a row without --general has no general columns to fill and no general mark
    write_examples_run(tmp_path / "none", "lora", 0, random_correct(rng, 0.5))
    plain = build_leaderboard([tmp_path / "none"]).iloc[0]
    assert "general" not in plain["vs_lora"] and "general" not in plain["ci_flags"]


def test_benchmark_examples_reproduce_lm_evals_value_or_are_dropped():
    """If this fails, the general delta's test term resamples scores that do not add up to the benchmark value
    lm-eval reported (a group pooled, a tag averaged, another filter's samples mixed in) instead of leaving it out."""
    from clbench.general import benchmark_examples

    def samples(name, scores, filt="none", metric="acc"):
        return [{"doc_id": k, "filter": filt, metric: s} for k, s in reversed(list(enumerate(scores)))]

    group = {"a": samples("a", [1, 0, 1, 1]), "b": samples("b", [0, 0])}
    pooled = benchmark_examples("acc,none", 3 / 6, group)
    assert pooled == {"weighting": "pooled", "units": {"a": [1.0, 0.0, 1.0, 1.0], "b": [0.0, 0.0]}}  # by doc_id
    assert benchmark_examples("acc,none", (0.75 + 0.0) / 2, group)["weighting"] == "mean"
    assert benchmark_examples("acc,none", 0.9, group) is None  # neither reproduces it (a non-mean metric)
    both = {"t": samples("t", [1, 1], "strict") + samples("t", [0, 0], "flexible")}
    assert benchmark_examples("acc,strict", 1.0, both) == {"weighting": "pooled", "units": {"t": [1.0, 1.0]}}
    tuples = {"t": [{"doc_id": 0, "filter": "none", "acc": (1, 0)}]}
    assert benchmark_examples("acc,none", 1.0, tuples) is None
