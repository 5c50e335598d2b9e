"""``metrics.json`` of a finished run: OP/BWT/FWT and R, parameter growth, speed and memory, and where the numbers
came from (method config, data digest, versions, commit, command, hardware: :mod:`clbench.provenance`).

Built from the rows the store holds, so a resumed run reports all its rows, also those of earlier sittings.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from clbench import cl_metrics
from clbench.config import config_identity
from clbench.general import general_summary
from clbench.provenance import git_commit, hardware, versions
from clbench.results import matrix_frame
from clbench.run_plan import RunPlan


def run_metrics(plan: RunPlan, rows: dict[int, dict[str, Any]], general_rows: dict[int, dict[str, Any]],
                command: str) -> dict[str, Any]:
    """metrics.json: OP/BWT/FWT, R, parameter growth, speed, memory, provenance (``general_rows``: --general)."""
    cfg, names = plan.cfg, plan.task_names
    T = len(names)
    R = matrix_frame(rows, names).to_numpy()  # R as R.csv holds it: NaN where not evaluated
    trained = [rows[i] for i in sorted(rows) if i > 0]
    inference = [np.mean(list(rec["inference_ms_per_example"].values())) for rec in rows.values()]
    return {
        "method": cfg.method, "benchmark": cfg.benchmark, "order": cfg.order,
        "seed": cfg.seed, "model": cfg.model, "tasks": names,
        "task_aware": plan.gives_task_id,
        "joint_training": bool(plan.method_cls.joint_training),
        "OP": cl_metrics.overall_performance(R) if not np.isnan(R[T]).any() else float("nan"),
        "BWT": cl_metrics.backward_transfer(R), "FWT": cl_metrics.forward_transfer(R),
        "R": R.tolist(),
        "params": [{"after": rec["label"], **rec["params"]} for rec in trained],
        "train_tokens_per_s": float(np.mean([rec["train"]["tokens_per_s"] for rec in trained])),
        "train_step_time_s": float(np.mean([rec["train"]["step_time_s"] for rec in trained])),
        "inference_ms_per_example": float(np.mean(inference)),
        "peak_memory_mb": float(max(rec["peak_memory_mb"] for rec in rows.values())),
        "train_wall_time_s": float(sum(rec["train_seconds"] for rec in trained)),
        "wall_time_s": float(sum(rec.get("train_seconds", 0.0) + rec["eval_seconds"] for rec in rows.values())),
        "data_manifest_digest": plan.identity["data_manifest_digest"],
        "score_split": cfg.score_split or "test",
        "method_config": config_identity(plan.method_cfg),
        "versions": versions(), "git_commit": git_commit(), "command": command,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x{os.cpu_count()}",
        "hardware": hardware(),  # CPU model/ISA, threads, GPU: numerics differ across these (provenance.py)
        # --general: per-benchmark delta (last stage - before) and its mean, read from the stored general rows
        **({"general": general_summary(general_rows)} if cfg.general else {}),
    }
