"""Run folders: atomic writes, resume bookkeeping, and reading finished runs back.

A run folder holds ``config.yaml`` (resolved), ``progress.json`` (one record per finished row of R: scores, timings,
parameter counts), ``R.csv``, ``metrics.json``, ``predictions/after-<row>/<Task>.json``, ``state/`` (the method's
checkpoint, never committed) and ``DONE``, written last. Every file is written to a temp file and renamed, so a crash
never leaves a half-written result.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from filelock import FileLock, Timeout

DONE = "DONE"


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file in the same folder and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    """JSON version of :func:`atomic_write_text` (UTF-8, indented, NaN written as null)."""
    atomic_write_text(path, json.dumps(_nan_to_none(obj), indent=1, ensure_ascii=False) + "\n")


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and np.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return obj


class RunConflictError(RuntimeError):
    """The run folder already holds a run made with a different config, is busy, or cannot be resumed."""


class RunBusyError(RunConflictError):
    """Another process holds the run folder's lock."""


LOCK = ".lock"
OWNER = ".owner.json"


class RunStore:
    """Reads and writes one run folder."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    # ---- exclusive use ----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the folder's exclusive lock for the block; RunBusyError (naming the holder) if another process has it.

        ``filelock`` takes an OS lock (flock on POSIX), so a process that dies releases it: a crashed run never leaves
        a stale lock behind. The holder's pid, host and start time go into ``.owner.json`` so the refusal can name it.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.root / LOCK), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise RunBusyError(f"{self.root} is busy: another clbench process writes to it ({self._holder()}); "
                               f"wait for it to finish or pass another --out") from None
        try:
            atomic_write_json(self.root / OWNER, {"pid": os.getpid(), "host": socket.gethostname(),
                                                  "since": time.strftime("%Y-%m-%d %H:%M:%S")})
            yield
        finally:
            (self.root / OWNER).unlink(missing_ok=True)
            lock.release()

    def _holder(self) -> str:
        try:
            owner = json.loads((self.root / OWNER).read_text())
            return f"pid {owner['pid']} on {owner['host']} since {owner['since']}"
        except (OSError, ValueError, KeyError):
            return "holder unknown"

    # ---- config -----------------------------------------------------------------------------------------------
    def claim(self, resolved: dict[str, Any], write: bool = True) -> bool:
        """Write ``config.yaml`` for a new run (rank 0 only: ``write``), or check it matches for a resume.

        Returns True when resuming.
        """
        path = self.root / "config.yaml"
        if path.is_file():
            self.check_same_config(resolved)
            return bool(self.rows())
        if write:
            atomic_write_text(path, yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True))
        return False

    def check_same_config(self, resolved: dict[str, Any]) -> None:
        """Raise RunConflictError when the folder holds a run whose identity differs from ``resolved``'s."""
        path = self.root / "config.yaml"
        if not path.is_file():
            return
        old = yaml.safe_load(path.read_text()) or {}
        diff = _first_difference(old.get("identity", {}), resolved.get("identity", {}))
        if diff:
            raise RunConflictError(
                f"{self.root} holds a run with a different config ({diff}); pass another --out or delete it")

    # ---- rows of R --------------------------------------------------------------------------------------------
    def rows(self) -> dict[int, dict[str, Any]]:
        """Finished rows of R by row index (0 = zero-shot, i = after the i-th task)."""
        path = self.root / "progress.json"
        if not path.is_file():
            return {}
        return {int(k): v for k, v in json.loads(path.read_text())["rows"].items()}

    def add_row(self, row: int, record: dict[str, Any], task_names: list[str]) -> None:
        """Record a finished row, then rewrite R.csv from all rows (both atomically)."""
        rows = self.rows()
        rows[row] = record
        atomic_write_json(self.root / "progress.json", {"rows": {str(k): rows[k] for k in sorted(rows)}})
        atomic_write_text(self.root / "R.csv", matrix_frame(rows, task_names).to_csv(float_format="%.4f"))
        # extra per-task metrics a method reports (e.g. MoSEs' task_id_accuracy) get a matrix of their own
        for name in sorted({m for rec in rows.values() for m in rec.get("extra_scores", {})}):
            extra = {i: {"scores": rec.get("extra_scores", {}).get(name, {})} for i, rec in rows.items()}
            atomic_write_text(self.root / f"{name}.csv", matrix_frame(extra, task_names).to_csv(float_format="%.4f"))

    # ---- general-ability rows (--general) ---------------------------------------------------------------------
    def general_rows(self) -> dict[int, dict[str, Any]]:
        """Stored general-ability stages by index (0 = before the first task, i = after the i-th task)."""
        path = self.root / "general.json"
        if not path.is_file():
            return {}
        return {int(k): v for k, v in json.loads(path.read_text())["rows"].items()}

    def add_general_row(self, stage: int, record: dict[str, Any]) -> None:
        """Record one stage's lm-eval scores (``label``, ``benchmarks``, ``scores``, ...) in ``general.json``, then
        rewrite ``general.csv`` (rows = stages, columns = benchmark/metric), both atomically."""
        rows = self.general_rows()
        rows[stage] = record
        atomic_write_json(self.root / "general.json", {"rows": {str(k): rows[k] for k in sorted(rows)}})
        frame = pd.DataFrame([rows[k]["scores"] for k in sorted(rows)], index=[rows[k]["label"] for k in sorted(rows)])
        frame.index.name = "stage"
        atomic_write_text(self.root / "general.csv", frame.to_csv(float_format="%.4f"))

    def record_row(self, row: int, record: dict[str, Any], task_names: list[str],
                   predictions: dict[str, list[dict[str, str]]], state: dict[str, torch.Tensor] | None = None) -> None:
        """Store row ``row`` of R: its predictions, then the method's checkpoint ``state`` (when given), then the row
        itself, then the older checkpoints are pruned.

        The order makes every crash resumable: a row on disk always has its predictions and its checkpoint (resume
        loads the checkpoint of the last recorded row), and until the row is recorded the previous row's checkpoint
        is still there.
        """
        for name, records in predictions.items():
            self.write_predictions(row, name, records)
        if state is not None:
            self.save_state(row, state)
        self.add_row(row, record, task_names)
        if state is not None:
            self.prune_states(row)

    def predictions_path(self, row: int, task: str) -> Path:
        """``predictions/after-<row>/<Task>.json``."""
        return self.root / "predictions" / f"after-{row}" / f"{task}.json"

    def write_predictions(self, row: int, task: str, records: list[dict[str, str]]) -> None:
        """:meth:`predictions_path`: list of {"prompt","answer","prediction"}."""
        atomic_write_json(self.predictions_path(row, task), records)

    def read_predictions(self, row: int, task: str) -> list[dict[str, str]]:
        """What :meth:`write_predictions` wrote (OSError when absent, ValueError when not JSON)."""
        return json.loads(self.predictions_path(row, task).read_text(encoding="utf-8"))

    # ---- method state -----------------------------------------------------------------------------------------
    def save_state(self, row: int, state: dict[str, torch.Tensor]) -> None:
        """Checkpoint the method after row ``row``; older checkpoints are removed once the new one is in place."""
        folder = self.root / "state"
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"after-{row}.pt"
        tmp = folder / f".after-{row}.pt.tmp"
        torch.save(state, tmp)
        os.replace(tmp, target)

    def prune_states(self, keep_row: int) -> None:
        """Delete checkpoints other than ``after-<keep_row>.pt`` (called after the row is recorded)."""
        for old in (self.root / "state").glob("after-*.pt"):
            if old.name != f"after-{keep_row}.pt":
                old.unlink(missing_ok=True)

    def load_state(self, row: int) -> dict[str, torch.Tensor]:
        """The checkpoint written after row ``row``."""
        path = self.root / "state" / f"after-{row}.pt"
        if not path.is_file():
            raise RunConflictError(f"{path} is missing, so the run cannot resume after row {row} "
                                   f"(delete {self.root} to start over)")
        return torch.load(path, map_location="cpu", weights_only=True)

    # ---- finishing --------------------------------------------------------------------------------------------
    def finish(self, metrics: dict[str, Any]) -> None:
        """Write ``metrics.json`` and then ``DONE`` (a folder without DONE is an unfinished run)."""
        atomic_write_json(self.root / "metrics.json", metrics)
        atomic_write_text(self.root / DONE, "")

    @property
    def finished(self) -> bool:
        """True when DONE exists."""
        return (self.root / DONE).is_file()


def matrix_frame(rows: dict[int, dict[str, Any]], task_names: list[str]) -> pd.DataFrame:
    """R as a DataFrame: index ``zero-shot`` / ``after-i:<Task>``, columns in task order, NaN where not evaluated."""
    index = ["zero-shot"] + [f"after-{i + 1}:{name}" for i, name in enumerate(task_names)]
    R = np.full((len(task_names) + 1, len(task_names)), np.nan)
    for row, record in rows.items():
        for j, name in enumerate(task_names):
            R[row, j] = record["scores"].get(name, np.nan)
    return pd.DataFrame(R, index=index, columns=task_names)


def _first_difference(old: Any, new: Any, prefix: str = "") -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            diff = _first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
            if diff:
                return diff
        return ""
    return "" if old == new else f"{prefix.rstrip('.')}: {old!r} != {new!r}"
