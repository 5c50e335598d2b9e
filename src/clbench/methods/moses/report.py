"""MoSEs' run-folder artifacts: ``expert_usage.csv`` (+ its figure) and ``param_growth.csv``, from the layers' masks
and owners. Reads only buffers of the layers it is given; imports nothing else of the package."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from .._experts import layer_index


def plot_expert_usage(usage_csv: str | Path, png: str | Path) -> Path:
    """Two panels from ``expert_usage.csv`` (one row per task × MoSE layer × selected expert):

    (a) per task, how many of its selected expert slots (summed over all MoSE layers) are new and how many reused
        from earlier tasks: the sublinear growth at a glance;
    (b, c, ...) a task × expert-index map of how many MoSE layers route the task to that expert, per target module: a
        column lit in several rows is an expert shared by those tasks.
    """
    import matplotlib

    matplotlib.use("Agg")  # headless: run folders are written on servers
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    usage = pd.read_csv(usage_csv)
    most = int(usage.groupby(["module", "task", "expert"]).size().max())
    tasks = usage.drop_duplicates("task_index").sort_values("task_index")["task"].tolist()
    modules = sorted(usage["module"].unique())
    counts = usage.groupby(["task", "new_or_reused"]).size().unstack(fill_value=0).reindex(tasks, fill_value=0)
    width = 1.0 + len(modules)
    fig, axes = plt.subplots(1, 1 + len(modules), figsize=(3.2 * width, 0.45 * len(tasks) + 2.0),
                             gridspec_kw={"width_ratios": [1.0] + [1.6] * len(modules)}, constrained_layout=True)
    ax = axes[0]
    left = [0] * len(tasks)
    for kind, colour in (("new", "#d95f02"), ("reused", "#1b9e77")):
        values = counts[kind].tolist() if kind in counts else [0] * len(tasks)
        ax.barh(range(len(tasks)), values, left=left, color=colour, label=kind)
        left = [a + b for a, b in zip(left, values, strict=True)]
    ax.set_yticks(range(len(tasks)), tasks)
    ax.invert_yaxis()
    ax.set_xlabel("selected expert slots (all MoSE layers)")
    ax.set_title("(a) new vs reused", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    n_experts = int(usage["expert"].max()) + 1
    image = None
    for panel, (ax, module) in enumerate(zip(axes[1:], modules, strict=True), start=1):
        part = usage[usage["module"] == module]
        grid = part.groupby(["task", "expert"]).size().unstack(fill_value=0)
        grid = grid.reindex(index=tasks, columns=range(n_experts), fill_value=0)
        image = ax.imshow(grid.to_numpy(), aspect="auto", cmap=plt.get_cmap("viridis", most + 1), vmin=-0.5,
                          vmax=most + 0.5)
        ax.set_yticks(range(len(tasks)), tasks)
        ax.set_xlabel("sub-expert index")
        ax.set_title(f"({'abcdefgh'[panel]}) {module}: layers using each expert", fontsize=10)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if image is not None:
        fig.colorbar(image, ax=axes[1:], label="MoSE layers", shrink=0.9, ticks=range(most + 1))
    out = Path(png)
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out


def task_params(layers: dict[str, Any], t: int, key_numel: int, prompt_numel: int) -> dict[str, int]:
    """What finished task t added: its new experts, k router rows + k mask indices per layer, its key and prompt."""
    new = reused = added = 0
    for layer in layers.values():
        mask = layer.masks[t]
        n_new = int((layer.owner[mask] == t).sum())
        new += n_new
        reused += layer.top_k - n_new
        added += n_new * layer.expert_params(0) + layer.top_k * (layer.in_features + 1)
    return {"new_experts": new, "reused_experts": reused, "added": added + key_numel + prompt_numel}


def write_usage(run_dir: Path, layers: dict[str, Any], done: Sequence[int], names: dict[int, str]) -> None:
    """``expert_usage.csv``: one row per (finished task, layer, expert of its mask): task_index, task, layer,
    layer_index, module, expert, new_or_reused, owner_task; and its figure ``expert_usage.png``."""
    with open(run_dir / "expert_usage.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["task_index", "task", "layer", "layer_index", "module", "expert", "new_or_reused",
                         "owner_task"])
        for t in done:
            for name, layer in layers.items():
                for e in layer.masks[t].tolist():
                    owner = int(layer.owner[e])
                    writer.writerow([t, names.get(t, str(t)), name, layer_index(name), name.rsplit(".", 1)[-1], e,
                                     "new" if owner == t else "reused", owner])
    if done:
        plot_expert_usage(run_dir / "expert_usage.csv", run_dir / "expert_usage.png")


def write_growth(run_dir: Path, parts: dict[int, dict[str, int]], names: dict[int, str]) -> None:
    """``param_growth.csv``: per finished task, new and reused experts, parameters added, cumulative total and the
    experts owned so far (``parts`` from :func:`task_params`, in task order)."""
    with open(run_dir / "param_growth.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["task_index", "task", "new_experts", "reused_experts", "added_params",
                         "cumulative_added_params", "experts_owned"])
        total = owned = 0
        for t, part in parts.items():
            total += part["added"]
            owned += part["new_experts"]
            writer.writerow([t, names.get(t, str(t)), part["new_experts"], part["reused_experts"], part["added"],
                             total, owned])
