"""Aggregate run folders into one leaderboard row per method × benchmark × order × model × data × hardware × setup.

Seeds of the same experiment become one row: OP, BWT, FWT as mean ± std (sample standard deviation, n − 1) with the
number of seeds, and a 95 % interval over seeds and test examples with a paired comparison against lora
(:mod:`clbench.intervals`, docs/uncertainty.md). Runs on different models, data manifests, task counts, hardware
classes (:func:`clbench.provenance.hardware_class`: bf16 kernels differ between CPUs; folders that did not record
their hardware are class ``unknown``) or method/run settings ("setup": everything in the run's identity except seed
and the grouping keys, e.g. LoRA rank, learning rate, steps) are never averaged together; a method's second setting
is named by the knobs it changes (:func:`setup_notes`). Unfinished runs (no DONE) and corrupt folders are skipped
with a one-line :class:`SkippedRunWarning` that names the folder.
"""

from __future__ import annotations

import hashlib
import json
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from clbench import cl_metrics, intervals
from clbench.provenance import hardware_class
from clbench.results import DONE, RunStore
from clbench.run_config import NOT_IDENTITY, NOT_SCORES
from clbench.scores import example_scores

GROUP_KEYS = ["method", "benchmark", "order", "model", "n_tasks", "data_manifest_digest", "hardware_class", "setup"]
# rows that may be compared with each other (one printed table, one report section); also the pool for seed spreads
SECTION_KEYS = ["benchmark", "model", "n_tasks", "data_manifest_digest", "hardware_class"]
REFERENCE_METHOD = "lora"  # every row is compared with lora's row of the same section and order
# the same experiment run in another task order: the order-sensitivity column compares these
ORDER_SPREAD_KEYS = [k for k in GROUP_KEYS if k != "order"]
COST_COLUMNS = ["added_params", "trainable_params", "train_step_time_s", "train_tokens_per_s",
                "inference_ms_per_example", "peak_memory_mb", "train_wall_time_s"]
REQUIRED_KEYS = ("method", "benchmark", "order", "model", "seed", "tasks", "R")
# run settings that do not change the scores (clbench.run_config says which), or that are grouping keys already
_NOT_SETUP = {*NOT_IDENTITY, *NOT_SCORES, "seed", "order", "method", "benchmark", "model", "num_tasks", "data_dir"}


class SkippedRunWarning(UserWarning):
    """A run folder left out of the leaderboard (unfinished, corrupt, or a duplicate seed)."""


def find_run_dirs(paths: list[str | Path]) -> list[Path]:
    """Every folder under ``paths`` that holds a run (a config.yaml); warns about paths that do not exist."""
    found: set[Path] = set()
    for path in map(Path, paths):
        if (path / "config.yaml").is_file():
            found.add(path)
        elif path.is_dir():
            found.update(p.parent for p in path.rglob("config.yaml"))
        else:
            warnings.warn(f"no such run folder: {path}", SkippedRunWarning, stacklevel=2)
    return sorted(found)


def _progress_note(run_dir: Path) -> str:
    """'k of T tasks done' for an unfinished run, best effort (the folder may be half-written or corrupt)."""
    try:
        rows = json.loads((run_dir / "progress.json").read_text())["rows"]
        tasks = yaml.safe_load((run_dir / "config.yaml").read_text())["identity"]["tasks"]
        return f"{sum(1 for k in rows if int(k) > 0)} of {len(tasks)} tasks done, "
    except Exception:  # noqa: BLE001 - only decorates the warning
        return ""


def _setup_values(run_dir: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    """The method config and the run settings that change results (LoRA rank, lr, steps, ...) of one run.

    Seeds of one experiment share them; two learning rates of the same method do not, so they are never averaged.
    """
    try:
        identity = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("identity", {})
        run = {k: v for k, v in (identity.get("run") or {}).items() if k not in _NOT_SETUP}
    except (yaml.YAMLError, AttributeError) as err:
        # without the run settings the seeds of this run cannot be matched to their experiment: treat as corrupt
        raise ValueError(f"config.yaml is unreadable ({type(err).__name__})") from None
    return {"run": run, "method_config": metrics.get("method_config") or {}}


def setup_digest(values: dict[str, Any]) -> str:
    """Short hash of :func:`_setup_values`: the ``setup`` grouping key."""
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _as_text(value: Any) -> str:
    """A knob value as a setup note shows it: floats in their shortest form, lists and mappings as JSON."""
    if isinstance(value, list | dict):
        return json.dumps(value, default=str)
    return format(value, "g") if isinstance(value, float) else str(value)


def _flat_setup(values: dict[str, Any]) -> dict[str, str]:
    """{knob: value as text}: method knobs by name, run settings as ``run.<name>`` (they are rarer and would clash)."""
    return {**{k: _as_text(v) for k, v in values["method_config"].items()},
            **{f"run.{k}": _as_text(v) for k, v in values["run"].items()}}


def setup_notes(rows: list[dict[str, Any]], values: list[dict[str, Any]]) -> list[str]:
    """A readable name for each leaderboard row's setup where its method ran with several settings in one section.

    ``rows``: leaderboard rows (their :data:`SECTION_KEYS`, ``method``, ``setup`` and ``n_seeds``); ``values``: each
    row's :func:`_setup_values`. Per section and method the setup with the most seeds over all orders (ties: the
    smaller digest) is the method's main one and gets ``""``; every other gets the knobs where it differs from that
    one, e.g. ``experts_per_input=2`` or ``lr=0.001 r=8``: it says what the row is an ablation or a pre-tuning run
    of, where a hash would have to be looked up.
    """
    keys = [(*(row[k] for k in SECTION_KEYS), row["method"]) for row in rows]
    groups: dict[tuple, dict[str, list]] = {}  # (section, method) -> {digest: [values, seeds]}
    for key, row, vals in zip(keys, rows, values, strict=True):
        groups.setdefault(key, {}).setdefault(row["setup"], [vals, 0])[1] += int(row["n_seeds"])
    notes = []
    for key, row in zip(keys, rows, strict=True):
        setups = groups[key]
        main_digest = min(setups, key=lambda d: (-setups[d][1], d))
        if row["setup"] == main_digest:
            notes.append("")
            continue
        main, flat = _flat_setup(setups[main_digest][0]), _flat_setup(setups[row["setup"]][0])
        diff = " ".join(f"{k}={flat.get(k, '(unset)')}" for k in sorted({*flat, *main}) if flat.get(k) != main.get(k))
        notes.append(diff or f"@{row['setup']}")  # folders without their settings: only the hash tells them apart
    return notes


def row_label(row: Any, marks: str = "") -> str:
    """``method`` (+ ``marks``), and ``[setup_note]`` for a second setting of the same method (see setup_notes)."""
    note = row.get("setup_note")  # NaN in a table read back from CSV
    return f"{row['method']}{marks}{f' [{note}]' if isinstance(note, str) and note else ''}"


def _validate(metrics: Any) -> dict[str, Any]:
    """Raise ValueError/KeyError/TypeError when metrics.json cannot be aggregated (the caller warns and skips)."""
    if not isinstance(metrics, dict):
        raise TypeError(f"metrics.json holds a {type(metrics).__name__}, not an object")
    missing = [k for k in REQUIRED_KEYS if k not in metrics]
    if missing:
        raise KeyError(f"metrics.json lacks {', '.join(missing)}")
    tasks = metrics["tasks"]
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise TypeError("'tasks' must be a non-empty list of task names")
    R = np.array([[np.nan if v is None else v for v in row] for row in metrics["R"]], dtype=float)
    if R.shape != (len(tasks) + 1, len(tasks)):
        raise ValueError(f"R has shape {R.shape}, expected {(len(tasks) + 1, len(tasks))} for {len(tasks)} tasks")
    metrics["R"] = R
    params = metrics.get("params") or []
    if not isinstance(params, list) or not all(isinstance(p, dict) for p in params):
        raise TypeError("'params' must be a list of objects")
    for key in ("versions", "method_config", "hardware"):
        if metrics.get(key) is not None and not isinstance(metrics[key], dict):
            raise TypeError(f"'{key}' must be an object")
    return metrics


def _load(run_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(metrics, None) for a finished, readable run; (None, reason) otherwise."""
    if not (run_dir / DONE).is_file():
        return None, f"skipping unfinished run ({_progress_note(run_dir)}no DONE): {run_dir}"
    try:
        metrics = _validate(json.loads((run_dir / "metrics.json").read_text(encoding="utf-8")))
        metrics["setup_values"] = _setup_values(run_dir, metrics)
        metrics["setup"] = setup_digest(metrics["setup_values"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        reason = err.args[0] if isinstance(err, KeyError) and err.args else err
        return None, f"skipping corrupt run folder {run_dir}: {type(err).__name__}: {reason}"
    metrics["run_dir"] = str(run_dir)
    return metrics, None


def load_run(run_dir: Path) -> dict[str, Any] | None:
    """metrics.json of a finished run (``R`` as an array, plus ``run_dir`` and ``setup``), or None with a warning."""
    metrics, problem = _load(Path(run_dir))
    if problem:
        warnings.warn(problem, SkippedRunWarning, stacklevel=2)
    return metrics


def load_runs(paths: list[str | Path]) -> list[dict[str, Any]]:
    """Every finished run under ``paths``; unfinished/corrupt folders and duplicate seeds are warned about and left out.

    A duplicate seed (the same experiment copied twice) would count twice and shrink the std, so only the first
    folder (by path) is kept. Tuning trials (``score_split: eval``, written by ``clbench tune``) are scored on the
    eval split and are never results: they are left out without a warning.
    """
    runs, seen = [], {}
    for run_dir in find_run_dirs(paths):
        metrics, problem = _load(run_dir)
        if problem:
            warnings.warn(problem, SkippedRunWarning, stacklevel=2)
            continue
        if metrics.get("score_split") == "eval":
            continue
        key = (*group_key(metrics), metrics["seed"])
        if key in seen:
            warnings.warn(f"skipping duplicate of seed {metrics['seed']} already in {seen[key]}: {run_dir}",
                          SkippedRunWarning, stacklevel=2)
            continue
        seen[key] = run_dir
        runs.append(metrics)
    return runs


def group_key(run: dict[str, Any]) -> tuple:
    """The values of :data:`GROUP_KEYS` for one loaded run (seeds of one experiment share it)."""
    values = {"n_tasks": len(run["tasks"]), "data_manifest_digest": run.get("data_manifest_digest") or "",
              "hardware_class": hardware_class(run.get("hardware"))}
    return tuple(values[k] if k in values else run.get(k) for k in GROUP_KEYS)


def check_conventions(bwt_conventions: list[str] | None) -> list[str]:
    """The extra BWT conventions asked for (``trace`` is always there), split on commas; unknown names are an error."""
    names = [n.strip() for c in (bwt_conventions or []) for n in c.split(",") if n.strip()]
    for name in names:
        if name not in cl_metrics.BWT_CONVENTIONS:
            from clbench.config import ConfigError

            raise ConfigError(f"unknown BWT convention '{name}' (known: {', '.join(cl_metrics.BWT_CONVENTIONS)})")
    return [n for n in dict.fromkeys(names) if n != "trace"]


def _row(run: dict[str, Any], conventions: list[str]) -> dict[str, Any]:
    R = run["R"]
    params = run.get("params") or [{}]
    row = dict(zip(GROUP_KEYS, group_key(run), strict=True))
    row.update({
        "seed": run["seed"], "OP": run.get("OP"), "BWT": run.get("BWT"), "FWT": run.get("FWT"),
        "added_params": params[-1].get("added"), "trainable_params": params[-1].get("trainable"),
        "train_step_time_s": run.get("train_step_time_s"), "train_tokens_per_s": run.get("train_tokens_per_s"),
        "inference_ms_per_example": run.get("inference_ms_per_example"), "peak_memory_mb": run.get("peak_memory_mb"),
        "train_wall_time_s": run.get("train_wall_time_s"), "wall_time_s": run.get("wall_time_s"),
        "task_aware": bool(run.get("task_aware")), "joint_training": bool(run.get("joint_training")),
        "clbench_version": (run.get("versions") or {}).get("clbench"), "git_commit": run.get("git_commit"),
        "command": run.get("command"), "run_dir": run["run_dir"],
        "cpu_model": (run.get("hardware") or {}).get("cpu_model"),
        # as text: a column with NaN for old folders would turn 2 into "2.0"
        "torch_threads": None if (t := (run.get("hardware") or {}).get("torch_threads")) is None else str(t),
    })
    for name in conventions:
        row[f"BWT[{name}]"] = cl_metrics.BWT_CONVENTIONS[name](R)
    row.update(general_columns(run))
    return row


def general_columns(run: dict[str, Any]) -> dict[str, float]:
    """``general_delta`` (mean general-ability delta, --general) and ``general_delta[<benchmark>]``; {} without."""
    general = run.get("general") or {}
    if not general.get("delta"):
        return {}
    out = {"general_delta": general.get("delta_mean")}
    out.update({f"general_delta[{name}]": value for name, value in general["delta"].items()})
    return {k: np.nan if v is None else float(v) for k, v in out.items()}


def general_units(run: dict[str, Any]) -> list[intervals.GeneralUnit] | None:
    """The paired per-example differences behind a run's mean general delta (:class:`clbench.intervals.GeneralUnit`
    per benchmark or subtask), from the per-example lm-eval scores general.json stores for the first and last stage.

    None when the run has no general delta, a stage lacks a benchmark's examples (runs from before they were
    stored), the two stages' examples differ in names or counts, or they do not reproduce ``delta_mean`` to 1e-6.
    """
    from clbench.general import unit_weights

    general = run.get("general") or {}
    if not general.get("delta"):
        return None
    try:
        rows = RunStore(Path(run["run_dir"])).general_rows()
        before, after = rows[0].get("examples") or {}, rows[max(rows)].get("examples") or {}
        names = list(general["benchmarks"])
        units: list[intervals.GeneralUnit] = []
        for name in names:
            first, last = before[name], after[name]
            if first["weighting"] != last["weighting"] or {k: len(v) for k, v in first["units"].items()} != {
                    k: len(v) for k, v in last["units"].items()}:
                return None
            for unit, share in unit_weights(first).items():
                delta = np.asarray(last["units"][unit], dtype=float) - np.asarray(first["units"][unit], dtype=float)
                units.append(intervals.GeneralUnit(f"{name}/{unit}", share / len(names), delta))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    total = sum(u.weight * float(u.delta.mean()) for u in units)  # Σ_u c_u mean_k d_uk must be the run's delta
    if max(rows) == 0 or not np.isclose(total, float(general.get("delta_mean", np.nan)), rtol=0, atol=1e-6):
        return None
    return units


def example_matrices(run: dict[str, Any]) -> list[np.ndarray] | None:
    """Per-example scores of a run, one (T+1, n_j) matrix per task (columns of R): x[i, k] = score of test example k
    of task j after row i (NaN rows where R has none), from ``predictions/after-<i>/<Task>.json`` scored with the
    metric its config.yaml names (:func:`clbench.scores.example_scores`).

    None when a row's predictions are missing or unreadable, or do not reproduce R (|mean_k x[i, k] − R[i, j]| >
    1e-9, e.g. a scorer changed since the run): the interval then leaves test sampling out and says so. Cached on
    the run dict (the report reads it again).
    """
    if "_examples" in run:
        return run["_examples"]
    run_dir, R, tasks = Path(run["run_dir"]), run["R"], run["tasks"]
    result: list[np.ndarray] | None = []
    try:
        identity = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("identity", {})
        metric = {t["name"]: t["metric"] for t in identity.get("tasks") or []}
        for j, task in enumerate(tasks):
            rows: dict[int, list[float]] = {}
            for i in np.flatnonzero(~np.isnan(R[:, j])):
                recs = RunStore(run_dir).read_predictions(int(i), task)
                rows[int(i)] = example_scores(metric[task], [r["prediction"] for r in recs],
                                              [r["answer"] for r in recs], [r["prompt"] for r in recs])
            sizes = {len(v) for v in rows.values()}
            if len(sizes) != 1 or 0 in sizes:
                raise ValueError(f"{task}: rows have {sorted(sizes)} examples")
            x = np.full((len(R), sizes.pop()), np.nan)
            for i, values in rows.items():
                x[i] = values
            if not np.allclose(x.mean(axis=1), R[:, j], rtol=0, atol=1e-9, equal_nan=True):
                raise ValueError(f"{task}: predictions do not reproduce R")
            result.append(x)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, yaml.YAMLError):
        result = None
    run["_examples"] = result
    return result


def _distinct(values: pd.Series, sep: str = " | ") -> str:
    """Distinct non-empty values in first-seen order (seeds normally share version and commit; if not, show all)."""
    return sep.join(dict.fromkeys(str(v) for v in values if v is not None and not pd.isna(v)))


def leaderboard_from_runs(runs: list[dict[str, Any]], bwt_conventions: list[str] | None = None) -> pd.DataFrame:
    """The leaderboard of already loaded runs (see :func:`build_leaderboard` for the columns)."""
    conventions = check_conventions(bwt_conventions)
    metrics = ["OP", "BWT", "FWT", *[f"BWT[{c}]" for c in conventions]]
    if not runs:
        return pd.DataFrame(columns=[*GROUP_KEYS, "n_seeds", "seeds", *[f"{m}_{s}" for m in metrics
                                                                          for s in ("mean", "std")],
                                     *[f"{m}_{s}" for m in intervals.METRICS for s in ("ci_low", "ci_high")],
                                     "ci_flags", "ci_note", f"vs_{REFERENCE_METHOD}", "setup_note"])
    frame = pd.DataFrame([_row(r, conventions) for r in runs])
    out, interval_inputs, setup_values = [], [], []
    for key, group in frame.groupby(GROUP_KEYS, dropna=False, sort=False):
        row = dict(zip(GROUP_KEYS, key, strict=True))
        row["n_seeds"] = len(group)
        row["seeds"] = " ".join(str(s) for s in sorted(group["seed"], key=str))
        for m in metrics:
            values = pd.to_numeric(group[m], errors="coerce")
            # skipna=False: a seed with an undefined metric makes the mean undefined instead of silently using
            # fewer seeds than n_seeds says
            row[f"{m}_mean"] = values.mean(skipna=False)
            row[f"{m}_std"] = values.std(ddof=1, skipna=False) if len(values) > 1 else np.nan
        for c in COST_COLUMNS:
            row[c] = pd.to_numeric(group[c], errors="coerce").mean()
        for c in (c for c in group.columns if c.startswith("general_delta")):  # mean over seeds that ran --general
            row[c] = pd.to_numeric(group[c], errors="coerce").mean()
        row["wall_time_s"] = pd.to_numeric(group["wall_time_s"], errors="coerce").sum(min_count=1)
        for flag in ("task_aware", "joint_training"):
            row[flag] = bool(group[flag].any())
        for prov in ("clbench_version", "git_commit"):
            row[prov] = _distinct(group[prov])
        row["command"] = _distinct(group["command"])  # one per seed (they differ in --seed/--out)
        row["run_dirs"] = " ".join(sorted(group["run_dir"]))
        row["cpu_model"] = _distinct(group["cpu_model"])
        row["torch_threads"] = _distinct(group["torch_threads"])
        out.append(row)
        members = [runs[i] for i in group.index]
        setup_values.append(members[0].get("setup_values") or {"run": {}, "method_config": {}})
        deltas = [general_columns(r).get("general_delta", np.nan) for r in members]
        with_general = [(r, d) for r, d in zip(members, deltas, strict=True) if not np.isnan(d)]
        interval_inputs.append(intervals.RowInput(
            key=json.dumps([str(v) for v in key]), section=tuple(row[k] for k in SECTION_KEYS), order=row["order"],
            method=str(row["method"]), tasks=list(members[0]["tasks"]),
            values={**{m: list(pd.to_numeric(group[m], errors="coerce")) for m in intervals.METRICS},
                    # the seeds that ran --general (the mean above is over them too)
                    intervals.GENERAL: [d for _, d in with_general]},
            examples=[example_matrices(r) for r in members],
            general_units=[general_units(r) for r, _ in with_general]))
    for row, extra in zip(out, intervals.leaderboard_intervals(interval_inputs, REFERENCE_METHOD), strict=True):
        row.update(extra)
    for row, note in zip(out, setup_notes(out, setup_values), strict=True):
        row["setup_note"] = note
    table = pd.DataFrame(out)
    # order sensitivity: max − min of mean OP across the task orders that ran for the same experiment (NaN when only
    # one order ran: no spread can be claimed from one order)
    table["OP_order_spread"] = table.groupby(ORDER_SPREAD_KEYS, dropna=False)["OP_mean"].transform(
        lambda s: s.max() - s.min() if s.notna().sum() > 1 else np.nan)
    table["_order"] = pd.to_numeric(table["order"], errors="coerce")
    table = table.sort_values(["benchmark", "model", "n_tasks", "hardware_class", "_order", "OP_mean"],
                              ascending=[True, True, True, True, True, False], na_position="last", kind="stable")
    return table.drop(columns="_order").reset_index(drop=True)


def build_leaderboard(paths: list[str | Path], bwt_conventions: list[str] | None = None) -> pd.DataFrame:
    """One row per experiment under ``paths``, seeds aggregated.

    Columns: the :data:`GROUP_KEYS`, ``n_seeds``, ``seeds``, ``<metric>_mean`` / ``<metric>_std`` for OP, BWT, FWT
    and ``BWT[<convention>]`` for each extra convention asked for (std NaN with one seed), ``OP_order_spread``, the
    cost means (:data:`COST_COLUMNS`; ``added_params`` is after the last task), ``wall_time_s`` (sum over seeds),
    ``task_aware``, ``joint_training``, ``clbench_version``, ``git_commit``, ``command``, ``run_dirs``,
    ``hardware_class`` (a grouping key), ``cpu_model`` and ``torch_threads`` (distinct values over seeds), and from
    :func:`clbench.intervals.leaderboard_intervals`: ``<m>_ci_low`` / ``<m>_ci_high`` (95 % interval over seeds and
    test examples) and ``<m>_vs_lora_low/high/p`` (paired difference from lora) for m = OP, BWT, FWT, ``ci_note``
    (what an interval does not cover) and ``vs_lora`` (e.g. ``OP + BWT ≈ FWT −``).
    """
    conventions = check_conventions(bwt_conventions)  # fail on a typo before reading any folder
    return leaderboard_from_runs(load_runs(paths), conventions)


def fmt_mean_std(mean: Any, std: Any, scale: float = 1.0, digits: int = 3) -> str:
    """``mean ± std`` (just ``mean`` when std is undefined, e.g. one seed; ``n/a`` when the mean is undefined)."""
    if mean is None or pd.isna(mean):
        return "n/a"
    text = f"{mean * scale:.{digits}f}"
    return text if std is None or pd.isna(std) else f"{text} ± {std * scale:.{digits}f}"


def fmt_interval(mean: Any, low: Any, high: Any, scale: float = 1.0, digits: int = 3) -> str:
    """``mean [low, high]``; ``mean [no CI]`` when the interval is undefined; ``n/a`` when the mean is undefined."""
    if mean is None or pd.isna(mean):
        return "n/a"
    text = f"{mean * scale:.{digits}f}"
    if low is None or high is None or pd.isna(low) or pd.isna(high):
        return f"{text} [no CI]"
    return f"{text} [{low * scale:.{digits}f}, {high * scale:.{digits}f}]"


def flags_text(row: Any) -> str:
    """'task-aware' / 'joint' markers of a leaderboard row (they are references, not comparable CL methods)."""
    return " ".join(f for f, on in (("task-aware", row.get("task_aware")), ("joint", row.get("joint_training")))
                    if on)


def print_leaderboard(table: pd.DataFrame, console: Any = None) -> None:
    """Rich tables of the leaderboard, one per benchmark × model × task count × data × hardware class (rows in one
    table compare).

    Scores ×100: OP/BWT/FWT (and the mean general-ability delta of runs with ``--general``) as mean [95 % interval
    over seeds and test examples], extra BWT conventions as mean ± std, the mark against lora (+ higher, − lower,
    ≈ not distinguishable; docs/uncertainty.md), order spread, costs, flags and what an interval leaves out;
    version, commit and command are in the CSV (too wide for a terminal).
    """
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    # piped or logged output has no terminal width; rich would squeeze the table into 80 columns and cut every name
    console = console or (Console() if sys.stdout.isatty() else Console(width=160))
    if table.empty:
        console.print("no finished runs")
        return
    conventions = [c[: -len("_mean")] for c in table.columns if c.startswith("BWT[") and c.endswith("_mean")]
    def num(value: Any, spec: str) -> str:
        return "" if value is None or pd.isna(value) else format(value, spec)

    for key, group in table.groupby(SECTION_KEYS, dropna=False, sort=False):
        bench, model, n_tasks, digest, hw_class = key
        # general-ability delta (--general): a column only where some row of the table has one
        general = "general_delta" in group and bool(group["general_delta"].notna().any())
        versions = " ".join(sorted({f"clbench {v}" for v in group["clbench_version"] if v} |
                                   {f"commit {c}" for c in group["git_commit"] if c}))
        view = Table(title=escape(f"{bench} · model {model} · {n_tasks} tasks · data {digest or '?'} · hardware "
                                  f"{hw_class}: scores ×100, mean [95 % CI] over seeds and test examples; vs lora: "
                                  f"OP BWT FWT{' general Δ' if general else ''} each + higher, − lower, "
                                  "≈ not distinguishable"),
                     caption=escape(versions) or None)
        # "BWT[max-drop]" would read as rich markup and vanish: label it "BWT (max-drop)"
        labels = [f"BWT ({c[4:-1]})" for c in conventions]
        # one task order: no order spread to show, and a column of blanks would only squeeze the others
        spread = group["OP_order_spread"].notna().any()
        for col in ("method", "order", "seeds", "OP", "BWT", "FWT", *labels, *(["general Δ"] if general else []),
                    "vs lora",
                    *(["OP order spread"] if spread else []), "added params", "step s", "infer ms/ex", "peak MB",
                    "flags"):
            view.add_column(escape(col), no_wrap=col in ("method", "OP", "BWT", "FWT", "general Δ", *labels))
        for _, r in group.iterrows():
            method = row_label(r)
            view.add_row(
                escape(method), escape(str(r["order"])), str(r["n_seeds"]),
                *(escape(fmt_interval(r.get(f"{m}_mean"), r.get(f"{m}_ci_low"), r.get(f"{m}_ci_high"), 100, 1))
                  for m in ("OP", "BWT", "FWT")),
                *(fmt_mean_std(r.get(f"{m}_mean"), r.get(f"{m}_std"), 100, 1) for m in conventions),
                *([escape(fmt_interval(r.get("general_delta"), r.get("general_delta_ci_low"),
                                       r.get("general_delta_ci_high"), 100, 1))] if general else []),
                # "OP + BWT ≈ FWT −" -> "+ ≈ −" (the header names the metrics)
                " ".join(str(r.get(f"vs_{REFERENCE_METHOD}") or "").split()[1::2]),
                *([num(r.get("OP_order_spread"), ".3f")] if spread else []),
                num(r.get("added_params"), ",.0f"), num(r.get("train_step_time_s"), ".2f"),
                num(r.get("inference_ms_per_example"), ".0f"), num(r.get("peak_memory_mb"), ",.0f"),
                escape(" ".join(t for t in (flags_text(r), str(r.get("ci_flags") or "")) if t)))
        console.print(view)
        used = {c for codes in group["ci_flags"].dropna() for c in str(codes).split()}
        for code in sorted(used):
            console.print(escape(f"  {code}: {intervals.NOTES[code]}"))


@contextmanager
def one_line_warnings(echo: Any = None) -> Iterator[None]:
    """Show every :class:`SkippedRunWarning` raised inside as one ``warning: ...`` line (stderr by default).

    Python's default warning display adds a file:line prefix and a source line, which buries the folder name.
    Other warnings pass through unchanged.
    """
    echo = echo or (lambda line: print(line, file=sys.stderr, flush=True))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SkippedRunWarning)
        yield
    for w in caught:
        if issubclass(w.category, SkippedRunWarning):
            echo(f"warning: {w.message}")
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
