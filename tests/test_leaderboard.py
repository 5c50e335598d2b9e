"""The leaderboard a user compares methods with: seeds averaged right, incomparable runs kept apart, bad folders named.

Run folders are written by hand (:func:`write_run`), so no model is needed and every test takes milliseconds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from clbench import cl_metrics
from clbench.cli import app
from clbench.leaderboard import SkippedRunWarning, build_leaderboard, load_runs
from clbench.report import build_sections
from clbench.results import matrix_frame

TASKS3 = ["C-STANCE", "FOMC", "MeetingBank"]


def make_R(final: list[float], diag: list[float] | None = None, zero: float = 0.1) -> np.ndarray:
    """A (T+1, T) matrix: zero-shot row ``zero``, R[i, i-1] = diag, later rows decay linearly to ``final``.

    The last task is scored once after training, so its diagonal is its final score.
    """
    T = len(final)
    diag = [*(diag or [0.9] * T)[: T - 1], final[-1]]
    R = np.full((T + 1, T), zero)
    for j in range(T):
        for i in range(j + 1, T + 1):  # after training task j: diag, then linear towards the final score
            frac = (i - (j + 1)) / max(T - (j + 1), 1)
            R[i, j] = diag[j] + frac * (final[j] - diag[j])
        for i in range(1, j + 1):  # before task j is trained: a little above zero-shot (forward transfer)
            R[i, j] = zero + 0.05
    return R


def write_run(root: Path, method: str = "lora", seed: int = 0, *, order: int = 1, model: str = "tiny",
              benchmark: str = "trace-mini", tasks: list[str] | None = None, R: np.ndarray | None = None,
              done: bool = True, task_aware: bool = False, joint: bool = False, added: list[int] | None = None,
              digest: str = "d1g35t00", method_config: dict[str, Any] | None = None, device: str = "cpu x2",
              infer_ms: float = 20.0, step_s: float = 0.5, wall: float = 60.0,
              hardware: dict[str, Any] | None = None) -> Path:
    """Write a run folder the way the harness does (config.yaml, progress.json, R.csv, metrics.json, DONE).

    ``added``: parameters added after each trained row (one entry per row of R that is not all NaN).
    ``hardware``: metrics.json's ``hardware`` dict (left out, as in folders older than that field, when None).
    """
    tasks = list(tasks or TASKS3)
    T = len(tasks)
    R = make_R([0.5] * T) if R is None else np.asarray(R, dtype=float)
    added = added or [1000 * (t + 1) for t in range(T)]
    folder = root / f"{benchmark}-{model}-{method}-o{order}-s{seed}"
    folder.mkdir(parents=True)
    method_config = {"r": 8, "lr": 1e-3} if method_config is None else method_config
    identity = {"run": {"method": method, "benchmark": benchmark, "order": order, "seed": seed, "model": model,
                        "num_tasks": T, "max_steps_per_task": 3, "precision": "32-true", "data_dir": "/x"},
                "method": method_config, "tasks": [{"name": t} for t in tasks], "data_manifest_digest": digest}
    (folder / "config.yaml").write_text(yaml.safe_dump({"identity": identity}))
    rows: dict[str, Any] = {}
    trained_rows = [i for i in range(1, T + 1) if not np.isnan(R[i]).all()]  # joint training: the last row only
    for i in range(T + 1):
        if np.isnan(R[i]).all():
            continue
        rec = {"label": "zero-shot" if i == 0 else f"after {tasks[i - 1]}",
               "scores": {t: float(R[i, j]) for j, t in enumerate(tasks)}, "extra_scores": {},
               "inference_ms_per_example": {t: infer_ms for t in tasks}, "eval_seconds": 1.0, "peak_memory_mb": 500.0}
        if i > 0:
            train = {"tokens_per_s": 1000.0, "step_time_s": step_s, "steps": 3, "examples": 12, "epochs": 1}
            params = {"trainable": 1000, "added": added[trained_rows.index(i)], "total": 10**6}
            rec.update(train=train, train_seconds=wall / T, params=params)
        rows[str(i)] = rec
    (folder / "progress.json").write_text(json.dumps({"rows": rows}))
    (folder / "R.csv").write_text(matrix_frame({int(k): v for k, v in rows.items()}, tasks).to_csv())
    if not done:
        return folder
    trained = [r for k, r in rows.items() if k != "0"]
    metrics = {
        "method": method, "benchmark": benchmark, "order": order, "seed": seed, "model": model, "tasks": tasks,
        "task_aware": task_aware, "joint_training": joint,
        "OP": cl_metrics.overall_performance(R), "BWT": cl_metrics.backward_transfer(R),
        "FWT": cl_metrics.forward_transfer(R), "R": [[None if math.isnan(v) else v for v in row] for row in R],
        "params": [{"after": r["label"], **r["params"]} for r in trained],
        "train_tokens_per_s": 1000.0, "train_step_time_s": step_s, "inference_ms_per_example": infer_ms,
        "peak_memory_mb": 500.0, "train_wall_time_s": wall * 0.8, "wall_time_s": wall,
        "data_manifest_digest": digest, "method_config": method_config,
        "versions": {"clbench": "0.1.0", "torch": "2.13"}, "git_commit": "abc1234",
        "command": f"clbench run --method {method} --seed {seed} --order {order} --model {model}", "device": device,
    }
    if hardware is not None:
        metrics["hardware"] = hardware
    metrics = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "DONE").write_text("")
    return folder


def _only(table, **where):
    rows = table
    for k, v in where.items():
        rows = rows[rows[k] == v]
    assert len(rows) == 1, rows
    return rows.iloc[0]


def test_seeds_are_grouped_with_mean_and_sample_std(tmp_path):
    """If this fails, a user sees a wrong OP/BWT/FWT mean or std in the leaderboard, or three seeds of one method
    split over three rows (or mixed with another method)."""
    finals = {0: [0.5, 0.6, 0.7], 1: [0.6, 0.6, 0.9], 2: [0.4, 0.6, 0.8]}
    Rs = {s: make_R(f, diag=[0.9, 0.8, 0.7]) for s, f in finals.items()}
    for s, R in Rs.items():
        write_run(tmp_path, "lora", s, R=R)
    write_run(tmp_path, "seqft", 0, R=make_R([0.2, 0.3, 0.9]))
    table = build_leaderboard([tmp_path])
    assert len(table) == 2
    lora = _only(table, method="lora")
    assert lora["n_seeds"] == 3 and lora["seeds"] == "0 1 2"
    for metric, fn in (("OP", cl_metrics.overall_performance), ("BWT", cl_metrics.backward_transfer),
                       ("FWT", cl_metrics.forward_transfer)):
        values = [fn(R) for R in Rs.values()]
        assert lora[f"{metric}_mean"] == pytest.approx(np.mean(values))
        assert lora[f"{metric}_std"] == pytest.approx(np.std(values, ddof=1))
    # by hand: seed OPs 0.6, 0.7, 0.6 -> mean 0.6333, sample std 0.0577
    assert lora["OP_mean"] == pytest.approx(0.633333, abs=1e-6) and lora["OP_std"] == pytest.approx(0.057735, abs=1e-6)
    seqft = _only(table, method="seqft")
    assert seqft["n_seeds"] == 1 and math.isnan(seqft["OP_std"])  # one seed: no std to claim
    assert seqft["added_params"] == 3000 and lora["train_step_time_s"] == pytest.approx(0.5)
    assert lora["clbench_version"] == "0.1.0" and lora["git_commit"] == "abc1234"
    assert "--seed 0" in lora["command"] and "--seed 2" in lora["command"]
    assert list(table["method"]) == ["lora", "seqft"]  # best OP first within a benchmark/model/order


def test_models_data_and_task_counts_are_never_averaged(tmp_path):
    """If this fails, the leaderboard silently averages a run on one model (or data, or task count, or learning
    rate) with a run on another, and the user reads a number that no experiment produced."""
    write_run(tmp_path / "a", "lora", 0, model="tiny", R=make_R([0.2] * 3))
    write_run(tmp_path / "b", "lora", 1, model="bundled", R=make_R([0.8] * 3))
    write_run(tmp_path / "c", "lora", 2, model="tiny", digest="0therdat", R=make_R([0.6] * 3))
    write_run(tmp_path / "d", "lora", 3, model="tiny", tasks=TASKS3[:2], R=make_R([0.4] * 2))
    write_run(tmp_path / "e", "lora", 4, model="tiny", method_config={"r": 8, "lr": 1e-4}, R=make_R([0.3] * 3))
    table = build_leaderboard([tmp_path])
    assert len(table) == 5 and (table["n_seeds"] == 1).all()
    assert sorted(table["OP_mean"].round(3)) == [0.2, 0.3, 0.4, 0.6, 0.8]
    assert table["setup"].nunique() == 2  # the lr=1e-4 run is its own experiment


def test_a_second_setting_of_a_method_is_named_by_the_knobs_it_changes(tmp_path):
    """If this fails, an ablation or a pre-tuning row of a method shows up in the leaderboard, the report and the
    README as "moses @3f2a9c1d", and the reader cannot tell which row is the default and what the others change."""
    default = {"lr": 0.0065, "experts_per_input": 4, "prompt_length": 32}
    for seed in (0, 1, 2):
        write_run(tmp_path / "default", "moses", seed, method_config=default)
    write_run(tmp_path / "sparse", "moses", 0, method_config={**default, "experts_per_input": 2})
    write_run(tmp_path / "old", "moses", 0, method_config={"lr": 0.003, "experts_per_input": 2, "prompt_length": 8})
    write_run(tmp_path / "lora", "lora", 0)
    table = build_leaderboard([tmp_path])
    notes = {(r["method"], r["n_seeds"], r["setup_note"]) for _, r in table.iterrows()}
    assert notes == {("moses", 3, ""), ("moses", 1, "experts_per_input=2"),
                     ("moses", 1, "experts_per_input=2 lr=0.003 prompt_length=8"), ("lora", 1, "")}
    result = CliRunner().invoke(app, ["leaderboard", str(tmp_path), "--out", str(tmp_path / "lb.csv")])
    assert result.exit_code == 0, result.output
    assert "moses [experts_per_input=2]" in result.output and "@" not in result.output
    labels = {e.label for section in build_sections(load_runs([tmp_path])) for e in section.entries}
    assert labels == {"moses", "moses [experts_per_input=2]", "moses [experts_per_input=2 lr=0.003 prompt_length=8]",
                      "lora"}


def test_unfinished_run_is_excluded_and_named(tmp_path):
    """If this fails, a crashed or still-running run's partial numbers enter the leaderboard, or it vanishes without
    the user being told which folder was left out."""
    write_run(tmp_path, "lora", 0)
    half = write_run(tmp_path, "lora", 1, done=False, R=make_R([0.9] * 3))
    with pytest.warns(SkippedRunWarning, match="unfinished") as caught:
        table = build_leaderboard([tmp_path])
    assert any(str(half) in str(w.message) for w in caught)
    assert _only(table, method="lora")["n_seeds"] == 1
    result = CliRunner().invoke(app, ["leaderboard", str(tmp_path), "--out", str(tmp_path / "lb.csv")])
    assert result.exit_code == 0, result.output
    warning_lines = [ln for ln in result.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warning_lines) == 1 and str(half) in warning_lines[0] and "3 of 3 tasks done" in warning_lines[0]


@pytest.mark.parametrize("damage", ["bad-json", "missing-keys", "not-an-object", "wrong-R-shape", "bad-params",
                                    "bad-config-yaml"])
def test_corrupt_run_folder_is_warned_about_and_skipped(tmp_path, damage):
    """If this fails, one damaged folder among many (hand-edited, truncated copy) crashes `clbench leaderboard`
    with a traceback instead of a one-line warning naming it, and no leaderboard is produced."""
    write_run(tmp_path, "lora", 0)
    bad = write_run(tmp_path, "seqft", 0)
    path = bad / "metrics.json"
    metrics = json.loads(path.read_text())
    if damage == "bad-json":
        path.write_text(path.read_text()[:40])
    elif damage == "missing-keys":
        path.write_text(json.dumps({k: v for k, v in metrics.items() if k not in ("R", "tasks")}))
    elif damage == "not-an-object":
        path.write_text("[1, 2]")
    elif damage == "wrong-R-shape":
        path.write_text(json.dumps({**metrics, "R": metrics["R"][:2]}))
    elif damage == "bad-params":
        path.write_text(json.dumps({**metrics, "params": [3, 4]}))
    else:
        (bad / "config.yaml").write_text("identity: [unclosed")
    with pytest.warns(SkippedRunWarning, match="corrupt"):
        table = build_leaderboard([tmp_path], bwt_conventions=["clipped"])
    assert list(table["method"]) == ["lora"]
    result = CliRunner().invoke(app, ["leaderboard", str(tmp_path), "--out", str(tmp_path / "lb.csv")])
    assert result.exit_code == 0, result.output
    warning_lines = [ln for ln in result.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warning_lines) == 1 and str(bad) in warning_lines[0]
    assert "Traceback" not in result.output


def test_order_spread_and_other_bwt_conventions(tmp_path):
    """If this fails, the order-sensitivity column or the `--bwt-convention` columns show wrong numbers (or the
    option is ignored), and a user comparing with TreeLoRA-style or max-drop numbers is misled."""
    R1, R2 = make_R([0.5, 0.6, 0.7]), make_R([0.2, 0.3, 0.4])
    write_run(tmp_path, "lora", 0, order=1, R=R1)
    write_run(tmp_path, "lora", 0, order=2, R=R2, tasks=list(reversed(TASKS3)))
    write_run(tmp_path, "seqft", 0, order=1)
    table = build_leaderboard([tmp_path], bwt_conventions=["clipped,max-drop"])
    o1, o2 = _only(table, method="lora", order=1), _only(table, method="lora", order=2)
    assert o1["OP_order_spread"] == pytest.approx(0.3) and o2["OP_order_spread"] == pytest.approx(0.3)
    assert math.isnan(_only(table, method="seqft")["OP_order_spread"])  # only one order ran
    assert o1["BWT[clipped]_mean"] == pytest.approx(cl_metrics.bwt_clipped(R1))
    assert o1["BWT[max-drop]_mean"] == pytest.approx(cl_metrics.forgetting_max_drop(R1))
    out = tmp_path / "lb.csv"
    result = CliRunner().invoke(app, ["leaderboard", str(tmp_path), "--out", str(out), "--bwt-convention",
                                      "max-drop"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "BWT (max-drop)" in result.stdout and "BWT[max-drop]_mean" in out.read_text()
    bad = CliRunner().invoke(app, ["leaderboard", str(tmp_path), "--out", str(out), "--bwt-convention", "clip"])
    assert bad.exit_code == 2 and "unknown BWT convention 'clip'" in bad.output


def test_duplicate_seed_counts_once(tmp_path):
    """If this fails, a run folder copied twice counts as two seeds, and the leaderboard shows a too-small std and a
    wrong n."""
    write_run(tmp_path / "a", "lora", 0, R=make_R([0.5] * 3))
    write_run(tmp_path / "b", "lora", 0, R=make_R([0.5] * 3))
    write_run(tmp_path / "b", "lora", 1, R=make_R([0.7] * 3))
    with pytest.warns(SkippedRunWarning, match="duplicate of seed 0"):
        table = build_leaderboard([tmp_path])
    assert _only(table, method="lora")["n_seeds"] == 2


AMX_CPU = {"cpu_model": "Intel Xeon Platinum 8480+", "machine": "x86_64", "torch_cpu_capability": "AVX512",
           "isa": {"amx_bf16": True, "amx_tile": True, "avx512_bf16": True, "avx512f": True, "avx2": True,
                   "fma": True}, "torch_threads": 2, "gpus": []}
AVX2_CPU = {"cpu_model": "AMD EPYC 7B12", "machine": "x86_64", "torch_cpu_capability": "AVX2",
            "isa": {"amx_bf16": False, "amx_tile": False, "avx512_bf16": False, "avx512f": False, "avx2": True,
                    "fma": True}, "torch_threads": 2, "gpus": []}


def test_rows_of_different_hardware_classes_are_not_averaged(tmp_path):
    """If this fails, seeds run on CPUs with different bf16 kernels (AMX vs AVX2: OP 0.605 vs 0.476 for one seed)
    are averaged into one row whose mean no machine produces, or old folders without recorded hardware are mixed
    in with known ones, and the printed tables do not say which hardware a row is from."""
    write_run(tmp_path / "a", "lora", 0, R=make_R([0.6] * 3), hardware=AMX_CPU)
    write_run(tmp_path / "a", "lora", 1, R=make_R([0.62] * 3), hardware={**AMX_CPU, "torch_threads": 1})
    write_run(tmp_path / "b", "lora", 2, R=make_R([0.45] * 3), hardware=AVX2_CPU)
    write_run(tmp_path / "c", "lora", 3, R=make_R([0.5] * 3))
    table = build_leaderboard([tmp_path])
    assert len(table) == 3
    amx = _only(table, hardware_class="cpu:avx512+avx512_bf16+amx")
    assert amx["n_seeds"] == 2 and amx["OP_mean"] == pytest.approx(0.61)  # thread count: recorded, not a class
    assert amx["cpu_model"] == "Intel Xeon Platinum 8480+" and amx["torch_threads"] == "2 | 1"
    assert _only(table, hardware_class="cpu:avx2")["OP_mean"] == pytest.approx(0.45)
    assert _only(table, hardware_class="unknown")["OP_mean"] == pytest.approx(0.5)
    result = CliRunner().invoke(app, ["leaderboard", str(tmp_path), "--out", str(tmp_path / "lb.csv")],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for cls in ("hardware cpu:avx512+avx512_bf16+amx", "hardware cpu:avx2", "hardware unknown"):
        assert cls in result.stdout
    assert "hardware_class" in (tmp_path / "lb.csv").read_text().splitlines()[0]


def test_leaderboard_has_interval_columns(tmp_path):
    """If this fails, `clbench leaderboard` no longer writes the 95 % interval, its flags or the lora comparison to
    the CSV, or prints the old ± std as if it were the whole uncertainty."""
    for seed in range(2):
        write_run(tmp_path, "lora", seed, R=make_R([0.5 + 0.1 * seed] * 3))
    write_run(tmp_path, "seqft", 0, R=make_R([0.2] * 3))
    table = build_leaderboard([tmp_path])
    for m in ("OP", "BWT", "FWT"):
        for col in ("ci_low", "ci_high", "vs_lora_low", "vs_lora_high", "vs_lora_p"):
            assert f"{m}_{col}" in table.columns
    lora, seqft = _only(table, method="lora"), _only(table, method="seqft")
    assert lora["OP_ci_low"] < lora["OP_mean"] < lora["OP_ci_high"]  # seeds only: these folders have no predictions
    assert "no-test-var" in lora["ci_flags"] and "pooled" in seqft["ci_flags"] and seqft["vs_lora"].startswith("OP")
    result = CliRunner().invoke(app, ["leaderboard", str(tmp_path), "--out", str(tmp_path / "lb.csv")],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert f"{100 * lora['OP_mean']:.1f} [{100 * lora['OP_ci_low']:.1f}, {100 * lora['OP_ci_high']:.1f}]" \
        in result.stdout
    assert "pooled: 1 seed" in result.stdout


def test_tuning_trials_scored_on_eval_never_enter_the_leaderboard(tmp_path):
    """If this fails, `clbench leaderboard runs/` mixes `clbench tune` trials (scored on the eval split, short
    protocol) into the results as if they were test scores."""
    write_run(tmp_path, seed=0)
    trial = write_run(tmp_path, seed=1)
    metrics = json.loads((trial / "metrics.json").read_text())
    (trial / "metrics.json").write_text(json.dumps({**metrics, "score_split": "eval"}))
    table = build_leaderboard([tmp_path])
    assert len(table) == 1 and table.loc[0, "n_seeds"] == 1
