"""What SETA writes beside R: gate metrics per task (``evaluation_report`` → ``gate_*.csv`` matrices), parameter
growth (``param_growth.csv``) and the sub-block usage map (``block_usage.csv`` + ``block_usage.png``)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import torch

from .._experts import layer_index
from .layer import SHARED
from .routing import SETAGate


def gate_report(gate: SETAGate, j: int, done: int, test_gates: torch.Tensor | None) -> dict[str, float]:
    """Routing metrics of learned task j after ``done`` tasks.

    ``gate_drift``: L1 change of the gate on task j's stored inputs since the end of task j (:meth:`SETAGate.drift`);
    ``gate_own``: mean g_{1+j} over task j's test prompts; ``gate_leak``: mean over task j's test prompts of
    max_{j < i < done} g_{1+i} (how much a later task's unique expert reaches task j; 0 for the latest task).
    """
    out = {"gate_drift": gate.drift(j)}
    if test_gates is not None and len(test_gates):
        out["gate_own"] = float(test_gates[:, 1 + j].mean())
        later = test_gates[:, 2 + j : 1 + done]
        out["gate_leak"] = float(later.max(-1).values.mean()) if later.shape[1] else 0.0
    return out


def task_growth(method: Any, t: int) -> dict[str, int]:
    """What task t added: new unique sub-blocks, new shared ones (first task), shared ones it updated, parameters
    (sub-blocks + its gate row, + the shared gate row for the first task) and what it trained in all."""
    d = method.gate.weight.shape[1] + 1
    unique = new_shared = updated = trained = added = 0
    for layer in method.seta_layers():
        shared = layer.owner == SHARED
        u = int((layer.owner == t).sum())
        ns = int(shared.sum()) if t == 0 else 0
        unique += u
        new_shared += ns
        updated += int((layer.trained_by[t] & shared).sum())
        trained += int(layer.trained_by[t].sum()) * layer.block_params
        added += (u + ns) * layer.block_params
    added += d * (2 if t == 0 else 1)
    return {"new_unique_blocks": unique, "new_shared_blocks": new_shared, "shared_blocks_updated": updated,
            "added_params": added, "trained_params": trained + d * (2 if t == 0 else 1)}


def write_param_growth(method: Any, path: Path, names: list[str]) -> Path:
    """``param_growth.csv``: one row per finished task; ``independent_cumulative_params`` is what it would cost if
    every task kept its own copy of every sub-block (and gate row) it trained: the line SETA's growth stays under."""
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["task_index", "task", "new_unique_blocks", "new_shared_blocks", "shared_blocks_updated",
                         "added_params", "cumulative_added_params", "independent_cumulative_params"])
        total = independent = 0
        for t, name in enumerate(names):
            g = task_growth(method, t)
            total += g["added_params"]
            independent += g["trained_params"]
            writer.writerow([t, name, g["new_unique_blocks"], g["new_shared_blocks"], g["shared_blocks_updated"],
                             g["added_params"], total, independent])
    return path


def write_block_usage(method: Any, run_dir: Path, names: list[str]) -> Path:
    """``block_usage.csv``: one row per (task, layer, sub-block) the task trained, with its role (``unique``,
    ``shared-new``, ``shared-update``) and its sensitivity s_m at the start of the task; then the figure."""
    path = run_dir / "block_usage.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["task_index", "task", "layer", "layer_index", "module", "block", "role", "sensitivity"])
        for t, name in enumerate(names):
            for lname, layer in method.named_seta_layers().items():
                for m in layer.trained_by[t].nonzero().flatten().tolist():
                    owner = int(layer.owner[m])
                    role = "unique" if owner == t else ("shared-new" if t == 0 else "shared-update")
                    writer.writerow([t, name, lname, layer_index(lname), lname.rsplit(".", 1)[-1], m, role,
                                     f"{float(layer.sensitivity[t, m]):.6g}"])
    if names:
        plot_block_usage(path, run_dir / "block_usage.png")
    return path


def plot_block_usage(usage_csv: Path, png: Path) -> Path:
    """(a) per task, sub-block slots (all layers) that became its unique expert vs shared ones it trained; (b, ...)
    per target module, a task × sub-block map of how many layers the task trained that sub-block in."""
    import matplotlib

    matplotlib.use("Agg")  # headless: run folders are written on servers
    import matplotlib.pyplot as plt
    import pandas as pd

    usage = pd.read_csv(usage_csv)
    tasks = usage.drop_duplicates("task_index").sort_values("task_index")["task"].tolist()
    modules = sorted(usage["module"].unique())
    fig, axes = plt.subplots(1, 1 + len(modules), figsize=(3.4 * (1 + len(modules)), 0.45 * len(tasks) + 2.0),
                             constrained_layout=True, squeeze=False)
    axes = axes[0]
    counts = usage.assign(kind=usage["role"].where(usage["role"] == "unique", "shared")).groupby(
        ["task", "kind"]).size().unstack(fill_value=0).reindex(tasks, fill_value=0)
    left = [0] * len(tasks)
    for kind, colour in (("unique", "#d95f02"), ("shared", "#1b9e77")):
        values = counts[kind].tolist() if kind in counts else [0] * len(tasks)
        axes[0].barh(range(len(tasks)), values, left=left, color=colour, label=kind)
        left = [a + b for a, b in zip(left, values, strict=True)]
    axes[0].set_yticks(range(len(tasks)), tasks)
    axes[0].invert_yaxis()
    axes[0].set_xlabel("sub-blocks trained (all layers)")
    axes[0].set_title("(a) unique vs shared", fontsize=10)
    axes[0].legend(loc="lower right", fontsize=8)
    n_blocks = int(usage["block"].max()) + 1
    for panel, (ax, module) in enumerate(zip(axes[1:], modules, strict=True), start=1):
        grid = usage[usage["module"] == module].groupby(["task", "block"]).size().unstack(fill_value=0)
        grid = grid.reindex(index=tasks, columns=range(n_blocks), fill_value=0)
        image = ax.imshow(grid.to_numpy(), aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(tasks)), tasks)
        ax.set_xlabel("sub-block index")
        ax.set_title(f"({'abcdefgh'[panel]}) {module}: layers training each sub-block", fontsize=10)
        fig.colorbar(image, ax=ax, shrink=0.9)
    fig.savefig(png, dpi=130)
    plt.close(fig)
    return png


__all__ = ["gate_report", "plot_block_usage", "task_growth", "write_block_usage", "write_param_growth"]
