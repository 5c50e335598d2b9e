"""``clbench gap``: where one method's distance to another comes from, task by task.

OP compares methods by one number; a researcher who sees MoSEs below per-task LoRA or replay asks next whether it
*learned* a task less well or *kept* it less well. For a method A, a reference B (same report section, same task
order; scores are means over each row's seeds) and every task j (training position j of T, R as in
:mod:`clbench.cl_metrics`):

- ``learned`` = R[j, j], the score right after training task j, and ``d_learned`` = R_A[j, j] − R_B[j, j];
- ``final`` = R[T, j], the score after the last task, and ``d_final`` = R_A[T, j] − R_B[T, j];
- ``d_forgetting`` = d_final − d_learned = (R_A[T, j] − R_A[j, j]) − (R_B[T, j] − R_B[j, j]): the part of the final
  gap that opened after task j was learned (negative: A forgot more, or B gained more later).

The ``mean`` row averages over the T tasks, so ``d_final`` there is exactly OP_A − OP_B, split into a learning and
a forgetting part (the last task has no forgetting part). ``task_id`` is A's ``task_id_accuracy`` for task j after
the last task when its runs report one (MoSEs' keys): the share of task j's test examples routed to task j's own
experts. A low value there says the forgetting part is misrouting, not drift of the experts themselves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from clbench.config import ConfigError
from clbench.report import Entry, Section, build_sections, md_table

DEFAULT_REFERENCES = ("per-task-lora", "replay")
# the per-task numbers (fractions; shown ×100), in the order every table prints them
SCORE_COLUMNS = ["learned", "learned_ref", "d_learned", "final", "final_ref", "d_final", "d_forgetting", "task_id"]
SCORE_HEADERS = ["learned", "ref", "Δ", "final", "ref", "Δ", "Δ later", "task-id"]
COLUMNS = ["section", "order", "method", "reference", "seeds", "task", *SCORE_COLUMNS]
TASK_ID_FILE = "task_id_accuracy.csv"  # written by the harness for a method that reports task_id_accuracy


def _final_task_id(entry: Entry) -> dict[str, float]:
    """Mean over the entry's seeds of the last row of ``task_id_accuracy.csv``, by task; {} when no run has it."""
    rows = []
    for run in entry.runs:
        path = Path(run["run_dir"]) / TASK_ID_FILE
        if path.is_file():
            rows.append(pd.read_csv(path, index_col=0).iloc[-1])
    return pd.concat(rows, axis=1).mean(axis=1).to_dict() if rows else {}


def pair_gap(section: Section, entry: Entry, reference: Entry) -> pd.DataFrame:
    """Per-task rows (plus a ``mean`` row) of ``entry``'s gap to ``reference``; both must share their task order."""
    if entry.tasks != reference.tasks:
        raise ConfigError(f"{entry.label} and {reference.label} have different task sequences; cannot pair them")
    R_a, R_b = entry.R_stats()[0], reference.R_stats()[0]
    T = len(entry.tasks)
    task_id = _final_task_id(entry)
    rows = []
    for j, task in enumerate(entry.tasks):
        learned, learned_ref, final, final_ref = R_a[j + 1, j], R_b[j + 1, j], R_a[T, j], R_b[T, j]
        rows.append({"task": task, "learned": learned, "learned_ref": learned_ref, "d_learned": learned - learned_ref,
                     "final": final, "final_ref": final_ref, "d_final": final - final_ref,
                     "d_forgetting": (final - learned) - (final_ref - learned_ref),
                     "task_id": task_id.get(task, np.nan)})
    frame = pd.DataFrame(rows)
    mean = frame.drop(columns="task").mean(axis=0, skipna=True).to_dict()
    frame = pd.concat([frame, pd.DataFrame([{"task": "mean", **mean}])], ignore_index=True)
    seeds = f"{len(entry.runs)} vs {len(reference.runs)}"
    for name, value in reversed([("section", section.title), ("order", entry.order), ("method", entry.label),
                                 ("reference", reference.label), ("seeds", seeds)]):
        frame.insert(0, name, value)
    return frame[COLUMNS]


def gap_table(runs: list[dict[str, Any]], method: str, references: list[str] | None = None) -> pd.DataFrame:
    """Every (``method`` row, reference row) pair of the same section and order, as :func:`pair_gap` rows.

    One-line :class:`ConfigError` when no row of ``method`` exists, or none of the references shares a section and
    order with it (e.g. they were run on another hardware class: those are never compared).
    """
    references = list(references or DEFAULT_REFERENCES)
    sections = build_sections(runs)
    frames = []
    found = False
    for section in sections:
        for entry in (e for e in section.entries if e.method == method):
            found = True
            for ref in (e for e in section.entries if e.method in references and e.order == entry.order):
                frames.append(pair_gap(section, entry, ref))
    if not found:
        known = sorted({e.method for s in sections for e in s.entries})
        raise ConfigError(f"no finished run of method '{method}' (methods found: {', '.join(known) or 'none'})")
    if not frames:
        raise ConfigError(f"no run of {', '.join(references)} shares a section and task order with '{method}'")
    return pd.concat(frames, ignore_index=True)


def format_score(column: str, value: Any) -> str:
    """A per-task number ×100 to one decimal, signed for the differences (``d_*``); ``–`` when missing."""
    if value is None or pd.isna(value):
        return "–"
    return f"{value * 100:+.1f}" if column.startswith("d_") else f"{value * 100:.1f}"


def gap_markdown(table: pd.DataFrame) -> str:
    """One markdown table per (section, order, method, reference); scores ×100."""
    md = ["# Where the gap comes from", "",
          "Scores ×100, means over seeds. learned = R[j, j], final = R[T, j]; Δ = method − reference; "
          "Δ later = Δ final − Δ learned, the part of the gap that opened after the task was learned (forgetting, "
          "or the reference gaining later); task-id = share of the task's test examples the method routed to the "
          "task's own experts after the last task. The mean row's Δ final is the OP difference.", ""]
    for (section, order, method, ref, seeds), part in table.groupby(
            ["section", "order", "method", "reference", "seeds"], sort=False):
        rows = [[f"**{r['task']}**" if r["task"] == "mean" else r["task"],
                 *(format_score(c, r[c]) for c in SCORE_COLUMNS)] for _, r in part.iterrows()]
        md += [f"## {method} vs {ref} · order {order} · seeds {seeds}", "", f"{section}", "",
               md_table(["task", *SCORE_HEADERS], rows, ["---"] + ["---:"] * len(SCORE_COLUMNS)), ""]
    return "\n".join(md)
