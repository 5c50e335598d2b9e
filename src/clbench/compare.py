"""``clbench compare``: how far apart runs of one protocol are, entry by entry and answer by answer.

The question it answers is the reproducibility issue's: the same command on another CPU, with another thread count
or precision, or with another seed — how much do R, OP/BWT/FWT and the individual answers move? For a reference run
and each other run it gives:

- what differs between them: the identity fields that are not equal (seed, precision, ...), the hardware class
  (:func:`clbench.provenance.hardware_class`) and the torch thread count, which is not part of the identity;
- OP, BWT, FWT of the run and their differences from the reference;
- ``max_abs_dR`` / ``mean_abs_dR``: the largest and the mean |R_other[i, j] − R_ref[i, j]| over the entries both
  runs evaluated (the zero-shot row included);
- ``answers_changed``: the share of (row, task, example) predictions whose text differs, over the rows both runs
  wrote predictions for. Two runs can have equal scores and different answers; this says how much of the
  agreement is luck.

Runs must share their task list (same benchmark, order and ``--num-tasks``), else comparing entries is meaningless:
that is a one-line error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from clbench.config import ConfigError
from clbench.leaderboard import load_run
from clbench.provenance import hardware_class
from clbench.results import RunStore

COLUMNS = ["run", "differs", "OP", "BWT", "FWT", "dOP", "dBWT", "dFWT", "max_abs_dR", "mean_abs_dR",
           "answers_changed", "answers_compared"]


def _identity(run_dir: Path) -> dict[str, Any]:
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
    identity = resolved.get("identity") or {}
    return {**(identity.get("run") or {}), **{f"method.{k}": v for k, v in (identity.get("method") or {}).items()}}


def _differences(ref: dict[str, Any], other: dict[str, Any]) -> str:
    """``key=value`` for every identity field, hardware class and thread count where ``other`` differs from ``ref``."""
    a, b = _identity(Path(ref["run_dir"])), _identity(Path(other["run_dir"]))
    parts = [f"{k}={b.get(k)}" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
    hw_a, hw_b = ref.get("hardware") or {}, other.get("hardware") or {}
    if hardware_class(hw_a) != hardware_class(hw_b):
        parts.append(f"hardware={hardware_class(hw_b)}")
    if hw_a.get("torch_threads") != hw_b.get("torch_threads"):
        parts.append(f"threads={hw_b.get('torch_threads')}")
    return " ".join(parts) or "nothing"


def _predictions(run_dir: Path, row: int, task: str) -> list[str] | None:
    try:
        return [r["prediction"] for r in RunStore(run_dir).read_predictions(row, task)]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def answer_changes(ref: dict[str, Any], other: dict[str, Any]) -> tuple[int, int]:
    """(changed, compared): predictions whose text differs, over every (row, task) both runs hold predictions for
    with the same number of examples."""
    changed = compared = 0
    for i in range(min(len(ref["R"]), len(other["R"]))):
        for task in ref["tasks"]:
            a = _predictions(Path(ref["run_dir"]), i, task)
            b = _predictions(Path(other["run_dir"]), i, task)
            if a is None or b is None or len(a) != len(b):
                continue
            compared += len(a)
            changed += sum(x != y for x, y in zip(a, b, strict=True))
    return changed, compared


def _load(run_dir: str | Path) -> dict[str, Any]:
    run = load_run(Path(run_dir))
    if run is None:
        raise ConfigError(f"not a finished run folder (no DONE or unreadable metrics.json): {run_dir}")
    return run


def compare_runs(reference: str | Path, others: list[str | Path]) -> pd.DataFrame:
    """One row for the reference (its own scores, differences 0) and one per other run, columns :data:`COLUMNS`."""
    ref = _load(reference)
    rows = []
    for run in [ref, *(_load(path) for path in others)]:
        if run["tasks"] != ref["tasks"]:
            raise ConfigError(f"{run['run_dir']} has tasks {run['tasks']}, the reference {ref['tasks']}: "
                              "compare runs of one benchmark, order and --num-tasks")
        R_ref, R = np.asarray(ref["R"], dtype=float), np.asarray(run["R"], dtype=float)
        n = min(len(R_ref), len(R))
        diff = np.abs(R[:n] - R_ref[:n])
        both = ~np.isnan(diff)
        changed, compared = answer_changes(ref, run)
        rows.append({
            "run": str(run["run_dir"]), "differs": "reference" if run is ref else _differences(ref, run),
            **{k: run.get(k, np.nan) for k in ("OP", "BWT", "FWT")},
            **{f"d{k}": run.get(k, np.nan) - ref.get(k, np.nan) for k in ("OP", "BWT", "FWT")},
            "max_abs_dR": float(diff[both].max()) if both.any() else np.nan,
            "mean_abs_dR": float(diff[both].mean()) if both.any() else np.nan,
            "answers_changed": changed / compared if compared else np.nan, "answers_compared": compared,
        })
    return pd.DataFrame(rows, columns=COLUMNS)


def print_comparison(table: pd.DataFrame, console: Any = None) -> None:
    """A rich table of :func:`compare_runs`, run folders shortened to their names."""
    from clbench.bench_tables import print_table

    rows = [{**row, "run": Path(row["run"]).name} for row in table.to_dict("records")]
    heads = [("run", "run", None), ("differs", "differs", None), ("OP", "OP", ".3f"), ("ΔOP", "dOP", "+.3f"),
             ("BWT", "BWT", ".3f"), ("ΔBWT", "dBWT", "+.3f"), ("FWT", "FWT", ".3f"), ("ΔFWT", "dFWT", "+.3f"),
             ("max |ΔR|", "max_abs_dR", ".3f"), ("mean |ΔR|", "mean_abs_dR", ".4f"),
             ("answers changed", "answers_changed", ".1%"), ("of", "answers_compared", ",d")]
    print_table(rows, heads, "clbench compare · differences from the first run",
                "ΔR over the entries both runs evaluated; answers: predictions whose text differs", console, width=170)
