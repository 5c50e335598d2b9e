"""``clbench report``: a self-contained markdown report with figures from finished run folders.

The report has one section per benchmark × model × task count × data manifest × hardware class (numbers from
different models, data or bf16 kernel families are never put side by side as if comparable). Each section holds

- (a) a TRACE-style leaderboard table: final per-task scores R[T, j], OP, BWT, FWT (×100, mean ± std over seeds),
  95 % intervals of OP, BWT and FWT over seeds and test examples and a mark against lora (:mod:`clbench.intervals`),
  and a cost table (added parameters, step time, inference latency, peak memory, order sensitivity);
- (b) an annotated accuracy-matrix heatmap per method and order;
- (c) OP vs added parameters (log x), (d) BWT per method with std error bars, (e) added parameters vs number of
  tasks, (f) forgetting curves (score of each task over training, one panel per task), (g) inference latency vs OP.

Then the runs used, the hardware they ran on, total wall time and the exact commands. Task-aware methods (oracle task
id, marked †) and joint training (not continual, marked ‡) are references, drawn hollow or hatched.
Figures are drawn with matplotlib's Agg canvas (headless) and never touch pyplot's global state.
"""

from __future__ import annotations

import math
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from clbench.intervals import GENERAL, NOTES, difference_mark
from clbench.leaderboard import (
    GROUP_KEYS,
    REFERENCE_METHOD,
    SECTION_KEYS,
    SkippedRunWarning,
    check_conventions,
    flags_text,
    fmt_mean_std,
    group_key,
    leaderboard_from_runs,
    load_runs,
    row_label,
)
from clbench.provenance import hardware_class

SCALE = 100.0  # scores are stored on a 0-1 scale; TRACE's tables print them ×100
DPI = 200  # ≥ 150 so that figures stay sharp when a paper scales them to a column
TASK_AWARE_MARK = "†"
JOINT_MARK = "‡"
MARKER_NOTE = (f"{TASK_AWARE_MARK} task-aware (oracle task id at test time) and {JOINT_MARK} joint training "
               "(all tasks at once, not continual) are reference points, not comparable continual-learning methods")
# fixed colours for the methods clbench ships, so a method keeps its colour across reports and papers; plugin methods
# take the remaining colours in name order
_KNOWN_COLOURS = {
    "seqft": "#7f7f7f", "lora": "#1f77b4", "replay": "#ff7f0e", "ewc": "#2ca02c", "olora": "#9467bd",
    "moe-lora": "#8c564b", "seta": "#e377c2", "moses": "#d62728", "mtl": "#bcbd22", "per-task-lora": "#17becf",
}
_EXTRA_COLOURS = ["#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d", "#31a354",
                  "#756bb1", "#636363"]
_ORDER_MARKERS = ["o", "s", "^", "D", "v", "P", "X"]
_ORDER_LINES = ["-", "--", ":", "-."]
_RC = {"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 8, "xtick.labelsize": 9,
       "ytick.labelsize": 9, "savefig.dpi": DPI, "savefig.bbox": "tight", "axes.grid": True, "grid.alpha": 0.3}


_CONVENTION_NOTES = {
    "clipped": "TreeLoRA's, (1/T) Σ min(R[T, j] − R[j, j], 0), only drops count (< 0 = forgetting)",
    "max-drop": "Chaudhry et al.'s average forgetting, mean over earlier tasks of the best score minus the final one "
                "(> 0 = forgetting)",
}


class NoRunsError(ValueError):
    """No finished run was found under the given paths (nothing to report)."""


# ---- data model ------------------------------------------------------------------------------------------------


@dataclass
class Entry:
    """One leaderboard row (an experiment: method × order × setup) with its seeds' runs; every figure draws these."""

    row: dict[str, Any]
    runs: list[dict[str, Any]]
    label: str

    @property
    def method(self) -> str:
        """The method's registry name."""
        return str(self.row["method"])

    @property
    def order(self) -> Any:
        """The task order number."""
        return self.row["order"]

    @property
    def tasks(self) -> list[str]:
        """Task names in this entry's training order (the columns of its R)."""
        return list(self.runs[0]["tasks"])

    @property
    def reference(self) -> bool:
        """True for task-aware or joint-training rows (drawn hollow / hatched)."""
        return bool(self.row.get("task_aware") or self.row.get("joint_training"))

    def R_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and sample std (NaN with one seed) of R over seeds, shape (T+1, T)."""
        stack = np.stack([r["R"] for r in self.runs])
        std = stack.std(axis=0, ddof=1) if len(stack) > 1 else np.full(stack.shape[1:], np.nan)
        return stack.mean(axis=0), std

    def added_params_curve(self) -> tuple[list[int], list[float]]:
        """(tasks learned, mean added parameters) after each trained stage.

        Joint training has one stage, after all T tasks; a CL method has one per task.
        """
        per_run = [[p.get("added") for p in (r.get("params") or [])] for r in self.runs]
        n = min(len(p) for p in per_run) if per_run else 0
        if n == 0:
            return [], []
        T = len(self.tasks)
        xs = list(range(T - n + 1, T + 1))  # the last n stages (a joint run's only stage is T)
        ys = [float(np.mean([np.nan if p[i] is None else p[i] for p in per_run])) for i in range(n)]
        return xs, ys


@dataclass
class Section:
    """Runs of one benchmark × model × task count × data manifest: comparable with each other, and only each other."""

    benchmark: str
    model: str
    n_tasks: int
    data_digest: str
    hardware_class: str
    entries: list[Entry]

    @property
    def title(self) -> str:
        """Heading text."""
        data = f", data {self.data_digest}" if self.data_digest else ""
        return f"{self.benchmark} · model {self.model} · {self.n_tasks} tasks{data} · hardware {self.hardware_class}"

    @property
    def slug(self) -> str:
        """File-system-safe name for the section's figure folder (runs without recorded hardware keep the old name)."""
        text = f"{self.benchmark}-{Path(str(self.model)).name}-{self.n_tasks}tasks-{self.data_digest}"
        if self.hardware_class != "unknown":
            text += f"-{self.hardware_class}"
        return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")

    @property
    def orders(self) -> list[Any]:
        """Task orders present, sorted."""
        return sorted({e.order for e in self.entries}, key=_order_sort)

    @property
    def task_columns(self) -> list[str]:
        """Task names in the first order's sequence (TRACE tables list tasks in order 1)."""
        first = [e for e in self.entries if e.order == self.orders[0]][0]
        names = list(first.tasks)
        for e in self.entries:  # other orders may (in principle) hold other task names
            names += [t for t in e.tasks if t not in names]
        return names


def _order_sort(order: Any) -> tuple[int, str]:
    try:
        return 0, f"{int(order):09d}"
    except (TypeError, ValueError):
        return 1, str(order)


def method_colours(methods: list[str]) -> dict[str, str]:
    """One colour per method, the same in every figure (fixed for clbench's own methods)."""
    colours = {m: _KNOWN_COLOURS[m] for m in methods if m in _KNOWN_COLOURS}
    extra = sorted(m for m in set(methods) if m not in _KNOWN_COLOURS)
    colours.update({m: _EXTRA_COLOURS[i % len(_EXTRA_COLOURS)] for i, m in enumerate(extra)})
    return colours


def _norm_key(key: tuple) -> tuple:
    """A group key comparable between a run's own values and the table's (pandas turns None into NaN, 1 into 1.0)."""
    out = []
    for v in key:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            out.append(None)
        elif isinstance(v, (int, float, np.integer, np.floating)) and float(v).is_integer():
            out.append(int(v))
        else:
            out.append(v.item() if isinstance(v, np.generic) else v)
    return tuple(out)


def build_sections(runs: list[dict[str, Any]], bwt_conventions: list[str] | None = None) -> list[Section]:
    """Group loaded runs into report sections with one :class:`Entry` per leaderboard row."""
    table = leaderboard_from_runs(runs, bwt_conventions)
    by_key: dict[tuple, list[dict[str, Any]]] = {}
    for run in runs:
        by_key.setdefault(_norm_key(group_key(run)), []).append(run)

    sections: dict[tuple, Section] = {}
    for _, row in table.iterrows():
        row_d = row.to_dict()
        members = sorted(by_key[_norm_key(tuple(row_d[k] for k in GROUP_KEYS))], key=lambda r: str(r["seed"]))
        skey = tuple(row_d[k] for k in SECTION_KEYS)
        section = sections.setdefault(skey, Section(*skey, entries=[]))
        section.entries.append(Entry(row_d, members, label=""))
    for section in sections.values():
        for e in section.entries:
            marks = (TASK_AWARE_MARK if e.row.get("task_aware") else "") + (JOINT_MARK if e.row.get("joint_training")
                                                                              else "")
            # a second setting of one method (an ablation, a pre-tuning run) is named by the knobs it changes
            e.label = row_label(e.row, marks)
    return sorted(sections.values(), key=lambda s: (str(s.benchmark), str(s.model), s.n_tasks, str(s.data_digest),
                                                    str(s.hardware_class)))


# ---- figures ---------------------------------------------------------------------------------------------------


def _figure(width: float, height: float) -> Any:
    """A Figure on the Agg canvas: headless, no pyplot state, so a report never opens a window or leaks figures."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, metadata={"Software": None})  # no version string: regenerated files diff cleanly
    return path


def _marker(section: Section, order: Any) -> str:
    return _ORDER_MARKERS[section.orders.index(order) % len(_ORDER_MARKERS)]


def _linestyle(section: Section, order: Any) -> str:
    return _ORDER_LINES[section.orders.index(order) % len(_ORDER_LINES)]


def _reference_legend_handles(section: Section, patch: bool = False) -> list[Any]:
    """Legend lines explaining the † / ‡ marks (only those that occur)."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = []
    for flag, text in (("task_aware", f"{TASK_AWARE_MARK} task-aware reference (oracle task id)"),
                       ("joint_training", f"{JOINT_MARK} joint-training reference (not continual)")):
        if any(e.row.get(flag) for e in section.entries):
            handles.append(Patch(facecolor="white", edgecolor="black", hatch="//", label=text) if patch else
                           Line2D([], [], marker="o", markerfacecolor="white", markeredgecolor="black",
                                  linestyle="none", label=text))
    return handles


def plot_heatmap(section: Section, e: Entry, path: Path) -> Path:
    """(b) R as an annotated heatmap: rows zero-shot + after each task, columns the tasks (×100, mean over seeds)."""
    import matplotlib
    from matplotlib.patches import Rectangle

    mean, std = e.R_stats()
    T = len(e.tasks)
    fig = _figure(1.0 * T + 3.2, 0.5 * (T + 1) + 1.9)
    ax = fig.add_subplot()
    ax.grid(False)
    shown = np.ma.masked_invalid(mean * SCALE)
    image = ax.imshow(shown, vmin=0, vmax=100, aspect="auto",
                      cmap=matplotlib.colormaps["viridis"].with_extremes(bad="#dddddd"))  # grey = not evaluated
    for i in range(T + 1):
        for j in range(T):
            if np.isnan(mean[i, j]):
                ax.text(j, i, "–", ha="center", va="center", fontsize=8, color="#555555")
                continue
            text = f"{mean[i, j] * SCALE:.1f}"
            if not np.isnan(std[i, j]):
                text += f"\n±{std[i, j] * SCALE:.1f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=7 if T > 6 else 8,
                    color="black" if mean[i, j] > 0.6 else "white")
    # outline R[j+1, j], the score right after training task j: BWT compares the last row to it (joint training
    # has no such rows)
    for j in range(0 if e.row.get("joint_training") else T):
        ax.add_patch(Rectangle((j - 0.5, j + 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.2))
    ax.set_xticks(range(T), e.tasks, rotation=35, ha="right")
    ax.set_yticks(range(T + 1), ["zero-shot"] + [f"after {i + 1}: {t}" for i, t in enumerate(e.tasks)])
    ax.set_xlabel("evaluated task")
    ax.set_ylabel("model state (tasks trained so far)")
    n = len(e.runs)
    seeds = f"mean ± std of {n} seeds" if n > 1 else "1 seed"
    boxes = "" if e.row.get("joint_training") else "; red box = just trained"
    ax.set_title(f"{e.label}: accuracy matrix R, order {e.order}\nscore ×100, {seeds}{boxes}")
    fig.colorbar(image, ax=ax, label="score ×100 (0-100)")
    return _save(fig, path)


def _human_count(value: float, _pos: Any = None) -> str:
    """1500 -> '1.5k', 2e6 -> '2M': tick labels a reader takes in at a glance."""
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= div:
            return f"{value / div:g}{suffix}"
    return f"{value:g}"


def _count_axis(ax: Any, values: list[float]) -> str:
    """Log x axis for parameter counts, ticks at 1-2-5 steps labelled 100k, 1M, ...; returns a note for the label.

    A method that adds nothing (seqft edits the base weights) has x = 0, which a log axis cannot show: then the axis
    is symlog with a short linear stretch at 0, so the method stays on the plot at a labelled 0.
    """
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    finite = [v for v in values if np.isfinite(v)]
    positive = [v for v in finite if v > 0]
    if not positive:
        return ""
    lo, hi = min(positive), max(positive)
    ticks = [m * 10**k for k in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1) for m in (1, 2, 5)]
    ticks = [t for t in ticks if lo / 2.5 <= t <= hi * 2.5]
    if len(finite) > len(positive):
        linthresh = 10 ** (math.floor(math.log10(lo)) - 1)
        ax.set_xscale("symlog", linthresh=linthresh, linscale=0.4)
        ticks = [0, *ticks]
        note = "log scale; 0 = none added"
        ax.set_xlim(-linthresh, hi * 2.5)  # a little room left of 0 so a marker there is not cut in half
    else:
        ax.set_xscale("log")
        note = "log scale"
        ax.set_xlim(lo / 2.5, hi * 2.5)
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(_human_count))
    ax.xaxis.set_minor_locator(NullLocator())
    return note


def _scatter_legend(ax: Any, section: Section, colours: dict[str, str], lines: bool = False) -> None:
    """One legend entry per method (its colour), one per order (its marker shape, and line style when ``lines``),
    then the † / ‡ notes, outside the axes so that no point is hidden."""
    from matplotlib.lines import Line2D

    seen: dict[str, Entry] = {}
    for e in section.entries:
        seen.setdefault(e.label, e)
    handles = [Line2D([], [], color=colours[e.method], marker="o", linestyle="none", markersize=7,
                      markerfacecolor="white" if e.reference else colours[e.method], label=label)
               for label, e in seen.items()]
    if len(section.orders) > 1:
        handles += [Line2D([], [], color="black", marker=_marker(section, o), markersize=7, markerfacecolor="none",
                           linestyle=_linestyle(section, o) if lines else "none", label=f"order {o}")
                    for o in section.orders]
    handles += _reference_legend_handles(section)
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)


def _scatter_op(ax: Any, section: Section, colours: dict[str, str], x_column: str) -> list[float]:
    """OP (×100, std error bars) of every entry against a cost column; returns the x values drawn."""
    xs = []
    for e in section.entries:
        x, y, err = e.row.get(x_column), e.row.get("OP_mean"), e.row.get("OP_std")
        if x is None or pd.isna(x) or y is None or pd.isna(y):
            continue
        xs.append(float(x))
        colour = colours[e.method]
        ax.errorbar([x], [y * SCALE], yerr=None if pd.isna(err) else [err * SCALE], color=colour,
                    marker=_marker(section, e.order), markersize=8, capsize=3, linestyle="none",
                    markerfacecolor="white" if e.reference else colour, markeredgewidth=1.5)
    ax.set_ylabel("OP: mean final score ×100")
    ax.margins(y=0.12)
    lo, hi = ax.get_ylim()
    if hi - lo < 10:  # near-identical OPs: show at least 10 points of range instead of magnifying noise
        mid = (hi + lo) / 2
        ax.set_ylim(max(mid - 5, -1), max(mid - 5, -1) + 10)
    _scatter_legend(ax, section, colours)
    return xs


def plot_op_vs_params(section: Section, colours: dict[str, str], path: Path) -> Path:
    """(c) OP (×100, ± std) against parameters added after the last task, log x: the efficiency trade-off."""
    fig = _figure(7.6, 4.4)
    ax = fig.add_subplot()
    xs = _scatter_op(ax, section, colours, "added_params")
    note = _count_axis(ax, xs)
    ax.set_xlabel(f"parameters added after the last task (count{', ' + note if note else ''})")
    ax.set_title(f"Overall performance vs added parameters\n{section.title}")
    return _save(fig, path)


def plot_bwt(section: Section, colours: dict[str, str], path: Path) -> Path:
    """(d) BWT (×100) per method as bars with std error bars over seeds; one bar per order; references hatched."""
    multi_order = len(section.orders) > 1
    entries = sorted(section.entries, key=lambda e: (e.reference, e.label, _order_sort(e.order)))
    fig = _figure(max(5.0, 0.7 * len(entries) + 0.5 * len({e.label for e in entries}) + 2.5), 4.4)
    ax = fig.add_subplot()
    positions, ticks, groups = [], [], {}
    x = 0.0
    for k, e in enumerate(entries):
        if k and entries[k - 1].label != e.label:
            x += 0.5  # a gap between methods groups one method's orders together
        positions.append(x)
        ticks.append(f"o{e.order}" if multi_order else e.label)
        groups.setdefault(e.label, []).append(x)
        mean, std = e.row.get("BWT_mean"), e.row.get("BWT_std")
        if mean is None or pd.isna(mean):  # joint training has no per-task rows, so no BWT
            ax.annotate("n/a", (x, 0), xytext=(0, -4), textcoords="offset points", ha="center", va="top",
                        fontsize=8)
        else:
            ax.bar(x, mean * SCALE, 0.8, yerr=None if pd.isna(std) else std * SCALE, capsize=3,
                   color=colours[e.method], edgecolor="black", linewidth=0.6, hatch="//" if e.reference else None,
                   alpha=0.6 if e.reference else 1.0)
        x += 1.0
    ax.axhline(0, color="black", linewidth=0.8)
    ax.margins(y=0.1)
    ax.grid(False, axis="x")
    if multi_order:
        # bars are labelled o1, o2, ...; the method name sits centred under its group of bars
        ax.set_xticks(positions, ticks)
        for label, xs in groups.items():
            ax.annotate(label, (float(np.mean(xs)), 0), xycoords=("data", "axes fraction"), xytext=(0, -22),
                        textcoords="offset points", ha="center", va="top", fontsize=9)
        ax.set_xlabel("method (o1, o2, ...: task order)", labelpad=22)
    else:
        crowded = len(entries) > 4
        ax.set_xticks(positions, ticks, rotation=25 if crowded else 0, ha="right" if crowded else "center")
        ax.set_xlabel("method")
    ax.set_ylabel("BWT ×100 (score points; < 0 = forgetting)")
    ax.set_title(f"Backward transfer (error bars: std over seeds)\n{section.title}")
    extra = _reference_legend_handles(section, patch=True)
    if extra:  # outside the axes: inside, it would cover a bar
        ax.legend(handles=extra, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    return _save(fig, path)


def plot_params_growth(section: Section, colours: dict[str, str], path: Path) -> Path:
    """(e) Added parameters after each task: a straight line through the origin is linear growth in T."""
    fig = _figure(6.4, 4.2)
    ax = fig.add_subplot()
    for e in section.entries:
        xs, ys = e.added_params_curve()
        if not xs:
            continue
        colour = colours[e.method]
        ax.plot(xs, ys, color=colour, linestyle=_linestyle(section, e.order), marker=_marker(section, e.order),
                markerfacecolor="white" if e.reference else colour, markersize=9 if e.reference else 6,
                zorder=3 if e.reference else 2)  # hollow references drawn larger on top so they are not hidden
    ax.set_xticks(range(1, section.n_tasks + 1))
    ax.set_xlim(0.5, section.n_tasks + 0.5)
    ax.set_ylim(bottom=0)
    from matplotlib.ticker import FuncFormatter

    ax.yaxis.set_major_formatter(FuncFormatter(_human_count))
    _scatter_legend(ax, section, colours, lines=True)
    ax.set_xlabel("number of tasks learned")
    ax.set_ylabel("parameters added beyond the base model (count)")
    ax.set_title(f"Parameter growth with the number of tasks\n{section.title}")
    return _save(fig, path)


def plot_forgetting(section: Section, order: Any, colours: dict[str, str], path: Path) -> Path:
    """(f) Score on each task after every training stage (one panel per task, one line per method)."""
    entries = [e for e in section.entries if e.order == order]
    tasks = entries[0].tasks
    T = len(tasks)
    ncols = min(4, T)
    nrows = math.ceil(T / ncols)
    fig = _figure(3.0 * ncols + 0.5, 2.5 * nrows + 1.2)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True)
    stages = np.arange(T + 1)
    for j, task in enumerate(tasks):
        ax = axes[j // ncols][j % ncols]
        for e in entries:
            mean, std = e.R_stats()
            col = e.tasks.index(task)
            m, s = mean[:, col] * SCALE, std[:, col] * SCALE
            ok = ~np.isnan(m)
            colour = colours[e.method]
            joint = bool(e.row.get("joint_training"))
            if joint:
                ok[:-1] = False  # its zero-shot row is every method's; its one trained stage is the end
            # joint training has no stages in between: a line would invent a trajectory, so markers only
            ax.plot(stages[ok], m[ok], color=colour, marker="*" if joint else "o", markersize=8 if joint else 3,
                    linestyle="none" if joint else ("--" if e.reference else "-"), label=e.label)
            band = ok & ~np.isnan(s)
            if band.any():
                ax.fill_between(stages[band], (m - s)[band], (m + s)[band], color=colour, alpha=0.15, linewidth=0)
        ax.axvline(j + 1, color="black", linestyle=":", linewidth=0.9)  # the stage where this task is trained
        ax.set_title(f"{task} (trained at {j + 1})", fontsize=9)
        ax.set_xticks(stages)
    for k in range(T, nrows * ncols):
        axes[k // ncols][k % ncols].set_visible(False)
    fig.supxlabel("tasks trained so far (0 = zero-shot; dotted line = this task's own training)")
    fig.supylabel("score ×100")
    fig.suptitle(f"Forgetting curves, order {order} (mean over seeds, band = ± std)\n{section.title}")
    handles, labels = axes[0][0].get_legend_handles_labels()
    from matplotlib.lines import Line2D

    extra = []
    if any(e.row.get("task_aware") for e in entries):
        extra.append(Line2D([], [], color="black", linestyle="--", label=f"{TASK_AWARE_MARK} task-aware reference"))
    if any(e.row.get("joint_training") for e in entries):
        extra.append(Line2D([], [], color="black", marker="*", linestyle="none",
                            label=f"{JOINT_MARK} joint training (final only)"))
    fig.legend(handles=handles + extra, labels=labels + [h.get_label() for h in extra], loc="outside right upper")
    return _save(fig, path)


def plot_latency_vs_op(section: Section, colours: dict[str, str], path: Path) -> Path:
    """(g) Inference latency (ms per test example) against OP: the cost of task-agnostic routing at test time."""
    fig = _figure(7.6, 4.4)
    ax = fig.add_subplot()
    xs = _scatter_op(ax, section, colours, "inference_ms_per_example")
    positive = [v for v in xs if v > 0]
    # a log axis only when latencies span more than a decade; otherwise a linear axis reads more easily
    note = ""
    if positive and len(positive) == len(xs) and max(positive) / min(positive) > 10:
        ax.set_xscale("log")
        note = ", log scale"
    else:
        ax.set_xlim(left=0, right=max(xs or [1]) * 1.15)
    ax.set_xlabel(f"inference latency (ms per test example, greedy generation{note})")
    ax.set_title(f"Inference latency vs overall performance\n{section.title}")
    return _save(fig, path)


def has_general(section: Section) -> bool:
    """True when any entry of the section ran --general (has a mean general-ability delta)."""
    return any(pd.notna(e.row.get("general_delta", np.nan)) for e in section.entries)


def plot_general_vs_op(section: Section, colours: dict[str, str], path: Path) -> Path:
    """(h) OP against the mean general-ability delta (--general, after the last task − before the first): TRACE's
    trade-off between learning the tasks and keeping general ability."""
    fig = _figure(7.6, 4.4)
    ax = fig.add_subplot()
    _scatter_op(ax, section, colours, "general_delta")
    ax.axvline(0.0, color="grey", linewidth=1, linestyle=":")
    ax.set_xlabel("mean general-ability delta (lm-eval scores on a 0-1 scale; < 0 = general ability lost)")
    ax.set_title(f"Overall performance vs general-ability delta\n{section.title}")
    return _save(fig, path)


# ---- markdown --------------------------------------------------------------------------------------------------


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def md_table(header: list[str], rows: list[list[Any]], align: list[str] | None = None) -> str:
    """A markdown table (cells with ``|`` or newlines escaped); ``align``: one ``---`` / ``---:`` per column."""
    align = align or ["---"] * len(header)
    lines = ["| " + " | ".join(map(_cell, header)) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(map(_cell, r)) + " |" for r in rows]
    return "\n".join(lines)


def _pm(mean: Any, std: Any) -> str:
    return fmt_mean_std(mean, std, scale=SCALE, digits=1)


# superscripts on an interval cell saying what it does not cover or borrows (codes of clbench.intervals.NOTES)
CI_MARKS = {"pooled": "ᵖ", "no-seed-var": "ˢ", "no-test-var": "ᵗ", "general-no-test-var": "ᵍ"}
CI_NOTE = ("95 % CI: interval over seeds and test examples (docs/uncertainty.md); "
           + "; ".join(f"{CI_MARKS[c]} {NOTES[c]}" for c in CI_MARKS)
           + f". vs {REFERENCE_METHOD}: paired difference from {REFERENCE_METHOD} in the same order, + higher (better "
           "for all three), − lower, ≈ not distinguishable (its 95 % interval contains 0)")


def _ci(row: dict[str, Any], metric: str) -> str:
    """``[low, high]`` ×100 of a row's metric with its marks; ``no CI`` / ``n/a`` when undefined."""
    mean, low, high = (row.get(f"{metric}_{k}") for k in ("mean", "ci_low", "ci_high"))
    if mean is None or pd.isna(mean):
        return "n/a"
    # a test-sampling flag belongs to its own metric: R's to OP/BWT/FWT, the general delta's to the general delta
    other = "no-test-var" if metric == GENERAL else "general-no-test-var"
    marks = "".join(CI_MARKS.get(c, "") for c in str(row.get("ci_flags") or "").split() if c != other)
    if low is None or high is None or pd.isna(low) or pd.isna(high):
        return f"no CI{marks}"
    return f"[{low * SCALE:.1f}, {high * SCALE:.1f}]{marks}"


def leaderboard_markdown(section: Section, conventions: list[str]) -> str:
    """(a) TRACE-style table: per-task final score R[T, j], OP, BWT, FWT (×100, mean ± std over seeds), then the
    95 % intervals of OP, BWT, FWT (:mod:`clbench.intervals`) and the mark against lora (see :data:`CI_NOTE`).

    The best OP of each order among the continual-learning methods (references excluded) is bold.
    """
    tasks = section.task_columns
    multi_order = len(section.orders) > 1
    header = ["Method", *(["Order"] if multi_order else []), "Seeds", *tasks, "OP", "BWT", "FWT",
              *[f"BWT ({c})" for c in conventions], "OP 95 % CI", "BWT 95 % CI", "FWT 95 % CI",
              f"vs {REFERENCE_METHOD}"]
    best: dict[Any, float] = {}
    for e in section.entries:
        op = e.row.get("OP_mean")
        if not e.reference and op is not None and not pd.isna(op):
            best[e.order] = max(best.get(e.order, -np.inf), op)
    rows = []
    # CL methods first by OP, then the references, as in TRACE's tables
    for e in sorted(section.entries, key=lambda e: (_order_sort(e.order), e.reference,
                                                    -(e.row.get("OP_mean") if pd.notna(e.row.get("OP_mean"))
                                                      else -np.inf))):
        finals = np.stack([r["R"][-1] for r in e.runs])
        per_task = []
        for task in tasks:
            if task not in e.tasks:
                per_task.append("")
                continue
            col = finals[:, e.tasks.index(task)]
            per_task.append(_pm(col.mean(), col.std(ddof=1) if len(col) > 1 else np.nan))
        op = _pm(e.row.get("OP_mean"), e.row.get("OP_std"))
        if not e.reference and best.get(e.order) == e.row.get("OP_mean"):
            op = f"**{op}**"
        rows.append([e.label, *([e.order] if multi_order else []), e.row["n_seeds"], *per_task, op,
                     _pm(e.row.get("BWT_mean"), e.row.get("BWT_std")), _pm(e.row.get("FWT_mean"), e.row.get("FWT_std")),
                     *[_pm(e.row.get(f"BWT[{c}]_mean"), e.row.get(f"BWT[{c}]_std")) for c in conventions],
                     *[_ci(e.row, m) for m in ("OP", "BWT", "FWT")],
                     e.row.get(f"vs_{REFERENCE_METHOD}") or ("—" if e.method == REFERENCE_METHOD else "")])
    align = ["---"] + ["---:"] * (len(header) - 1)
    return md_table(header, rows, align)


def general_markdown(section: Section) -> str:
    """General-ability retention (--general): per benchmark the delta after the last task − before the first
    (×100, mean over the seeds that ran the suite), the mean delta with its 95 % interval over seeds and test
    examples (:mod:`clbench.intervals`), and its paired mark against lora (see :data:`CI_NOTE`)."""
    entries = [e for e in section.entries if pd.notna(e.row.get("general_delta", np.nan))]
    benchmarks = list(dict.fromkeys(c[len("general_delta["):-1] for e in entries for c in e.row
                                    if c.startswith("general_delta[") and pd.notna(e.row[c])))
    header = ["Method", *(["Order"] if len(section.orders) > 1 else []), "Seeds", *benchmarks, "Mean Δ",
              "Mean Δ 95 % CI", f"vs {REFERENCE_METHOD}"]
    rows = []
    for e in sorted(entries, key=lambda e: (_order_sort(e.order), -e.row["general_delta"])):
        seeds = sum(pd.notna((r.get("general") or {}).get("delta_mean", np.nan)) for r in e.runs)
        low, high = (e.row.get(f"{GENERAL}_vs_{REFERENCE_METHOD}_{k}", np.nan) for k in ("low", "high"))
        mark = "" if e.method == REFERENCE_METHOD or pd.isna(low) and pd.isna(high) else difference_mark(low, high)
        rows.append([e.label, *([e.order] if len(section.orders) > 1 else []), seeds,
                     *[_num(e.row.get(f"general_delta[{b}]", np.nan) * SCALE, "+.1f") for b in benchmarks],
                     f"{e.row['general_delta'] * SCALE:+.1f}", _ci(e.row, "general_delta"),
                     mark or ("—" if e.method == REFERENCE_METHOD else "")])
    return md_table(header, rows, ["---"] + ["---:"] * (len(header) - 1))


def _num(value: Any, spec: str) -> str:
    return "" if value is None or pd.isna(value) else format(value, spec)


def cost_markdown(section: Section) -> str:
    """Costs and order sensitivity per experiment (means over seeds)."""
    header = ["Method", "Order", "Seeds", "Added params", "Trainable params", "Train step (s)", "Train tokens/s",
              "Inference (ms/example)", "Peak memory (MB)", "OP order spread ×100", "Train wall time (s)", "Flags"]
    rows = [[e.label, e.order, e.row["n_seeds"], _num(e.row.get("added_params"), ",.0f"),
             _num(e.row.get("trainable_params"), ",.0f"), _num(e.row.get("train_step_time_s"), ".3f"),
             _num(e.row.get("train_tokens_per_s"), ",.0f"), _num(e.row.get("inference_ms_per_example"), ".1f"),
             _num(e.row.get("peak_memory_mb"), ",.0f"),
             _num(e.row.get("OP_order_spread") * SCALE if pd.notna(e.row.get("OP_order_spread")) else None, ".1f"),
             _num(e.row.get("train_wall_time_s"), ".1f"), flags_text(e.row)]
            for e in sorted(section.entries, key=lambda e: (_order_sort(e.order), e.reference, e.label))]
    return md_table(header, rows, ["---"] + ["---:"] * (len(header) - 2) + ["---"])


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s"


def _relative(path: str | Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def write_report(paths: list[str | Path], out: str | Path, bwt_conventions: list[str] | None = None,
                 benchmark: str | None = None, model: str | None = None) -> Path:
    """Write ``<out>/report.md`` and its figures under ``<out>/figures/``; returns the report's path.

    ``benchmark`` / ``model`` keep only the runs of that benchmark / model (by default every group gets a section).

    Unfinished or corrupt run folders are left out with a :class:`SkippedRunWarning` each and listed in the report.
    Raises :class:`NoRunsError` when no finished run is found. Old PNGs under ``<out>/figures/`` are removed first so
    that a regenerated report never shows figures of runs that are gone.
    """
    conventions = check_conventions(bwt_conventions)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SkippedRunWarning)
        runs = load_runs(paths)
    runs = [r for r in runs if (benchmark is None or r["benchmark"] == benchmark)
            and (model is None or str(r["model"]) == model)]
    skipped = [str(w.message) for w in caught if issubclass(w.category, SkippedRunWarning)]
    for w in caught:  # hand them on to the caller (the CLI prints each as one line)
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if not runs:
        which = " ".join(f"{k} {v}" for k, v in (("benchmark", benchmark), ("model", model)) if v)
        raise NoRunsError(f"no finished runs{' of ' + which if which else ''} under {', '.join(map(str, paths))}")

    import matplotlib

    out = Path(out)
    figures = out / "figures"
    if figures.is_dir():
        for old in figures.rglob("*.png"):
            old.unlink()
    sections = build_sections(runs, conventions)
    colours = method_colours([e.method for s in sections for e in s.entries])

    def link(path: Path, caption: str) -> str:
        return f"![{caption}]({path.relative_to(out).as_posix()})\n\n*{caption}*\n"

    md = ["# clbench report", ""]
    md += [f"{len(runs)} finished run{'s' if len(runs) != 1 else ''} in {len(sections)} "
           f"section{'s' if len(sections) != 1 else ''} (one per benchmark × model × task count × data; numbers are "
           "only comparable inside a section). Scores are ×100 (0-100). Where a method ran with more than one seed, "
           "values are mean ± sample standard deviation (n − 1) over seeds; the Seeds column gives n. "
           "OP, BWT and FWT follow TRACE (Wang et al. 2023): OP = mean final score, BWT = mean change of each earlier "
           "task from right after it was trained to the end (< 0 = forgetting), FWT = mean gain of each task before "
           "it is trained over zero-shot.", ""]
    md += [f"Marks: {MARKER_NOTE}; in figures they are drawn hollow, dashed or hatched.", ""]
    if conventions:
        md += ["Other BWT conventions shown: " + "; ".join(f"{c}: {_CONVENTION_NOTES.get(c, '')}".rstrip(": ")
                                                          for c in conventions) + ".", ""]
    md += ["## Contents", ""] + [f"- [{s.title}](#section-{i + 1})" for i, s in enumerate(sections)] + [""]

    with matplotlib.rc_context(_RC):
        for i, section in enumerate(sections):
            fig_dir = figures / section.slug
            md += [f'<a id="section-{i + 1}"></a>', "", f"## {section.title}", ""]
            md += ["### Leaderboard (TRACE style)", "",
                   "Final score on each task after the last task (R[T, j]), then OP, BWT, FWT (mean ± std over "
                   f"seeds, TRACE's style: seed spread only). {CI_NOTE}. Bold: best mean OP of the continual-learning "
                   "methods in each order (a point estimate: it ranks two rows apart only where their intervals "
                   "do).", "",
                   leaderboard_markdown(section, conventions), ""]
            md += ["### Cost", "", "Added parameters are after the last task; step time, latency and memory are means "
                   "over seeds (take speed ratios from `clbench bench`, which times all methods on the same "
                   "batches). OP order spread = max − min OP over the task orders that ran.", "",
                   cost_markdown(section), ""]
            if has_general(section):
                md += ["### General-ability retention", "",
                       "lm-eval score after the last task minus before the first, per benchmark of the --general "
                       "suite (×100, > 0 = gained); the mean Δ's interval and mark as above (examples paired "
                       "between the two stages).", "", general_markdown(section), ""]
            md += ["### Figures", ""]
            md.append(link(plot_op_vs_params(section, colours, fig_dir / "op_vs_added_params.png"),
                           "OP vs parameters added after the last task (log x); up and left is better."))
            md.append(link(plot_bwt(section, colours, fig_dir / "bwt.png"),
                           "Backward transfer per method, error bars = std over seeds; below 0 = forgetting."))
            md.append(link(plot_params_growth(section, colours, fig_dir / "params_vs_tasks.png"),
                           "Added parameters after each task: a straight line from the origin is linear growth; "
                           "a flattening curve is sublinear."))
            for order in section.orders:
                md.append(link(plot_forgetting(section, order, colours, fig_dir / f"forgetting_order{order}.png"),
                               f"Order {order}: score on each task after every training stage (forgetting curves)."))
            md.append(link(plot_latency_vs_op(section, colours, fig_dir / "latency_vs_op.png"),
                           "Inference latency (ms per test example) vs OP; up and left is better."))
            if has_general(section):
                md.append(link(plot_general_vs_op(section, colours, fig_dir / "general_vs_op.png"),
                               "OP vs mean general-ability delta (--general suite, after the last task minus before "
                               "the first); up and right is better."))
            md += ["### Accuracy matrices", ""]
            for e in section.entries:
                slug = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{e.method}-order{e.order}-{e.row['setup']}")
                md.append(link(plot_heatmap(section, e, fig_dir / f"heatmap_{slug}.png"),
                               f"{e.label}, order {e.order}: R (rows: zero-shot and after each task; "
                               "columns: tasks)."))

    md += _provenance(runs, skipped)
    path = out / "report.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(md) + "\n", encoding="utf-8")
    return path


def _provenance(runs: list[dict[str, Any]], skipped: list[str]) -> list[str]:
    """Runs used, hardware, total wall time, commands, and the folders left out."""
    md = ["## Runs used", ""]
    ordered = sorted(runs, key=lambda r: (str(r["benchmark"]), str(r["model"]), str(r["method"]),
                                          _order_sort(r["order"]), str(r["seed"])))
    rows = [[f"`{_relative(r['run_dir'])}`", r["method"], r["benchmark"], r["order"], r["seed"], r["model"],
             r.get("device") or "", hardware_class(r.get("hardware")), _num(r.get("wall_time_s"), ".1f"),
             (r.get("versions") or {}).get("clbench", ""), r.get("git_commit") or ""] for r in ordered]
    md += [md_table(["Run folder", "Method", "Benchmark", "Order", "Seed", "Model", "Device", "Hardware class",
                      "Wall time (s)", "clbench", "Commit"], rows), ""]
    devices = Counter(str(r.get("device") or "unknown") for r in runs)
    md += ["## Hardware", ""] + [f"- {d}: {n} run{'s' if n > 1 else ''}" for d, n in sorted(devices.items())] + [""]
    # the class is what sections are split by; the CPU model and thread count say which machine within it
    classes = Counter((hardware_class(r.get("hardware")), (r.get("hardware") or {}).get("cpu_model"),
                       (r.get("hardware") or {}).get("torch_threads")) for r in runs)
    md += ["Hardware classes (runs of different classes are never averaged or compared; `unknown` = the run did "
           "not record its hardware):", ""]
    for (cls, cpu, threads), n in sorted(classes.items(), key=str):
        detail = ", ".join(t for t in (cpu and str(cpu), threads and f"{threads} threads") if t)
        md.append(f"- {cls}{f' ({detail})' if detail else ''}: {n} run{'s' if n > 1 else ''}")
    md.append("")
    wall = sum(float(r.get("wall_time_s") or 0.0) for r in runs)
    train = sum(float(r.get("train_wall_time_s") or 0.0) for r in runs)
    md += ["## Total wall time", "", f"{_duration(wall)} over {len(runs)} runs (of which training {_duration(train)}; "
           "the rest is evaluation).", ""]
    md += ["## Commands", "", "```bash"]
    for r in ordered:
        md += [f"# {_relative(r['run_dir'])}", str(r.get("command") or "(command not recorded)")]
    md += ["```", ""]
    if skipped:
        md += ["## Runs left out", ""] + [f"- {s}" for s in skipped] + [""]
    return md
