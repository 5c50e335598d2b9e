"""What ``clbench bench`` and ``clbench bench-overhead`` share once their rows exist: medians and ratios that are
NaN rather than an error on empty input, the CSV + JSON pair they write, and the rich table they print."""

from __future__ import annotations

import math
import statistics
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


def median(values: Iterable[float]) -> float:
    """Median, NaN for no values (a contender that never ran a step shows an empty cell, not a crash)."""
    values = list(values)
    return statistics.median(values) if values else math.nan


def ratio(a: float, b: float) -> float:
    """``a / b``, NaN when either is missing or ``b`` is 0."""
    return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan


def write_results(results: dict[str, Any], out: str | Path, columns: Sequence[str], stem_prefix: str = "",
                  float_format: str = "%.4f") -> tuple[Path, Path]:
    """``<out>/<name or prefix+timestamp>.csv`` (``results["rows"]`` in ``columns``) and ``.json`` (everything),
    both written atomically."""
    import pandas as pd

    from clbench.results import atomic_write_json, atomic_write_text

    out = Path(out)
    stem = results["name"] or stem_prefix + results["timestamp"].replace(":", "").replace("-", "")
    frame = pd.DataFrame(results["rows"], columns=list(columns))
    csv_path, json_path = out / f"{stem}.csv", out / f"{stem}.json"
    atomic_write_text(csv_path, frame.to_csv(index=False, float_format=float_format))
    atomic_write_json(json_path, results)
    return csv_path, json_path


def print_table(rows: list[dict[str, Any]], heads: Sequence[tuple[str, str, str | None]], title: str, caption: str,
                console: Any = None, width: int = 140) -> None:
    """One rich table: ``heads`` are ``(label, row key, format spec or None for str)``; the first column is left
    aligned, NaN cells are empty."""
    from rich.console import Console
    from rich.table import Table

    # piped output defaults to 80 columns, which folds every header
    console = console or Console(width=None if sys.stdout.isatty() else width)
    table = Table(title=title, caption=caption)
    for i, (label, _, _) in enumerate(heads):
        table.add_column(label, justify="left" if i == 0 else "right", no_wrap=True)
    for row in rows:
        cells = []
        for _, key, spec in heads:
            value = row[key]
            if spec is None:
                cells.append(str(value))
            elif isinstance(value, float) and math.isnan(value):
                cells.append("")
            else:
                cells.append(format(value, spec))
        table.add_row(*cells)
    console.print(table)
