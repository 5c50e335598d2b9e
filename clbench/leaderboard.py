"""Aggregate run folders into one leaderboard row per method × benchmark × order × model × data (mean ± std over seeds).

Runs on different models, data manifests or task lists are never averaged together. Unfinished runs (no DONE) and
corrupt folders are skipped with a one-line warning naming them.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from clbench import cl_metrics
from clbench.results import DONE

GROUP_KEYS = ["method", "benchmark", "order", "model", "n_tasks", "data_manifest_digest"]


def find_run_dirs(paths: list[str | Path]) -> list[Path]:
    """Every folder under ``paths`` that holds a run (a config.yaml)."""
    found: set[Path] = set()
    for path in map(Path, paths):
        if (path / "config.yaml").is_file():
            found.add(path)
        elif path.is_dir():
            found.update(p.parent for p in path.rglob("config.yaml"))
    return sorted(found)


def load_run(run_dir: Path) -> dict[str, Any] | None:
    """metrics.json of a finished run, or None with a warning (unfinished or corrupt)."""
    if not (run_dir / DONE).is_file():
        warnings.warn(f"skipping unfinished run (no DONE): {run_dir}", stacklevel=2)
        return None
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
        metrics["R"] = np.array(metrics["R"], dtype=float)
        for key in ("method", "benchmark", "order", "model", "seed", "tasks"):
            metrics[key]  # noqa: B018 - presence check
    except (OSError, ValueError, KeyError, TypeError) as err:
        warnings.warn(f"skipping corrupt run folder {run_dir}: {type(err).__name__}: {err}", stacklevel=2)
        return None
    metrics["run_dir"] = str(run_dir)
    return metrics


def _row(run: dict[str, Any], conventions: list[str]) -> dict[str, Any]:
    R = run["R"]
    params = run.get("params") or [{}]
    row = {
        "method": run["method"], "benchmark": run["benchmark"], "order": run["order"], "model": run["model"],
        "n_tasks": len(run["tasks"]), "data_manifest_digest": run.get("data_manifest_digest", ""),
        "seed": run["seed"], "OP": run.get("OP"), "BWT": run.get("BWT"), "FWT": run.get("FWT"),
        "added_params": params[-1].get("added"), "trainable_params": params[-1].get("trainable"),
        "train_step_time_s": run.get("train_step_time_s"), "train_tokens_per_s": run.get("train_tokens_per_s"),
        "inference_ms_per_example": run.get("inference_ms_per_example"), "peak_memory_mb": run.get("peak_memory_mb"),
        "task_aware": bool(run.get("task_aware")), "joint_training": bool(run.get("joint_training")),
        "clbench_version": run.get("versions", {}).get("clbench"), "git_commit": run.get("git_commit"),
        "command": run.get("command"),
    }
    for name in conventions:
        if name not in cl_metrics.BWT_CONVENTIONS:
            from clbench.config import ConfigError

            raise ConfigError(f"unknown BWT convention '{name}' (known: {', '.join(cl_metrics.BWT_CONVENTIONS)})")
        row[f"BWT[{name}]"] = cl_metrics.BWT_CONVENTIONS[name](R)
    return row


def build_leaderboard(paths: list[str | Path], bwt_conventions: list[str] | None = None) -> pd.DataFrame:
    """One row per group with ``<metric>_mean``, ``<metric>_std``, ``n_seeds`` and provenance columns."""
    conventions = [c for c in (bwt_conventions or []) if c != "trace"]
    runs = [r for r in map(load_run, find_run_dirs(paths)) if r is not None]
    if not runs:
        return pd.DataFrame(columns=[*GROUP_KEYS, "n_seeds"])
    frame = pd.DataFrame([_row(r, conventions) for r in runs])
    metrics = ["OP", "BWT", "FWT", *[f"BWT[{c}]" for c in conventions]]
    costs = ["added_params", "trainable_params", "train_step_time_s", "train_tokens_per_s",
             "inference_ms_per_example", "peak_memory_mb"]
    out = []
    for key, group in frame.groupby(GROUP_KEYS, dropna=False, sort=True):
        row = dict(zip(GROUP_KEYS, key, strict=True))
        row["n_seeds"] = len(group)
        row["seeds"] = " ".join(str(s) for s in sorted(group["seed"]))
        for m in metrics:
            values = pd.to_numeric(group[m], errors="coerce")
            row[f"{m}_mean"] = values.mean()
            row[f"{m}_std"] = values.std(ddof=0) if len(values) > 1 else 0.0
        for c in costs:
            row[c] = pd.to_numeric(group[c], errors="coerce").mean()
        for flag in ("task_aware", "joint_training"):
            row[flag] = bool(group[flag].any())
        for prov in ("clbench_version", "git_commit", "command"):
            row[prov] = group[prov].iloc[0]
        out.append(row)
    table = pd.DataFrame(out)
    # order sensitivity: spread of OP across task orders of the same method/benchmark/model/data
    spread_keys = ["method", "benchmark", "model", "n_tasks", "data_manifest_digest"]
    table["OP_order_spread"] = table.groupby(spread_keys, dropna=False)["OP_mean"].transform(
        lambda s: s.max() - s.min() if len(s) > 1 else np.nan)
    return table.sort_values(["benchmark", "model", "order", "OP_mean"], ascending=[True, True, True, False])


def print_leaderboard(table: pd.DataFrame) -> None:
    """A rich table of the leaderboard (OP/BWT/FWT as mean ± std)."""
    from rich.console import Console
    from rich.table import Table

    view = Table(title="clbench leaderboard")
    for col in ("method", "benchmark", "order", "model", "seeds", "OP", "BWT", "FWT", "added params",
                "step s", "infer ms/ex", "flags"):
        view.add_column(col)
    for _, r in table.iterrows():
        flags = " ".join(f for f, on in (("task-aware", r.get("task_aware")), ("joint", r.get("joint_training"))) if on)

        def pm(m: str, row: Any = r) -> str:
            mean = row.get(f"{m}_mean")
            return "n/a" if mean is None or pd.isna(mean) else f"{mean:.3f} ± {row.get(f'{m}_std', 0):.3f}"

        view.add_row(str(r["method"]), str(r["benchmark"]), str(r["order"]), str(r["model"]), str(r["n_seeds"]),
                     pm("OP"), pm("BWT"), pm("FWT"), f"{r['added_params']:,.0f}" if pd.notna(r["added_params"]) else "",
                     f"{r['train_step_time_s']:.2f}" if pd.notna(r["train_step_time_s"]) else "",
                     f"{r['inference_ms_per_example']:.0f}" if pd.notna(r["inference_ms_per_example"]) else "", flags)
    Console().print(view)
