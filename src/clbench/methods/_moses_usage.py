"""The expert-usage figure MoSEs writes beside ``expert_usage.csv``: which task routes to which sub-experts."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


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
