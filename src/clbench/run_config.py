"""A run's settings: the RunConfig dataclass, where its values come from, and which of them make a run's identity.

Pure: building a RunConfig imports no torch and loads no model, so sweeps, tuning and leaderboards can reason about
runs cheaply. Precedence, each layer overriding the one before (``load_run_config``): built-in defaults < hardware
profile < run YAML < command-line flags.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from clbench.config import ConfigError, build, load_yaml
from clbench.configs_dir import hardware_profile


@dataclass
class RunConfig:
    """Everything about a run except the method's own knobs (those live in the method's config dataclass)."""

    method: str = "lora"
    benchmark: str = "trace-mini"
    order: int = 1
    seed: int = 0
    model: str = "bundled"
    data_dir: str | None = None
    out: str | None = None
    # user runs go to an ignored runs/ folder; the committed reference runs live in results/runs (make results)
    results_dir: str = "runs"
    batch_size: int = 8
    eval_batch_size: int = 16
    accumulate_grad_batches: int = 1
    epochs: int | None = None
    max_steps_per_task: int | None = None
    num_tasks: int | None = None
    limit_train: int | None = None
    limit_eval: int | None = None
    limit_test: int | None = None
    max_prompt_len: int | None = None
    max_answer_len: int | None = None
    max_new_tokens: int | None = None
    accelerator: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "bf16-mixed"
    gradient_clip_val: float | None = 1.0
    zero_shot: bool = True
    oracle_task_id: bool = False
    progress: bool = True
    stop_after: int | None = None
    # "bf16"/"fp16": store frozen Linear weights in the autocast dtype (bit-identical outputs under bf16-mixed /
    # 16-mixed, half their memory, no per-step weight cast); None keeps fp32 master weights everywhere
    frozen_dtype: str | None = None
    # the split every row of R is scored on: None = test (every reported run); "eval" = the eval split, for tuning
    # (`clbench tune`), which then never reads a test record, not even for the data manifest
    score_split: str | None = None
    # which entries of R each row evaluates: None/"full" = every task after every task (the forgetting curves);
    # "needed" = only those OP/BWT/FWT read (cl_metrics.needed_columns: rows 0 and T whole, R[j-1,j] and R[j,j]),
    # the others stay NaN; 30 of 72 task evaluations on 8 tasks
    eval_rows: str | None = None
    # general-ability suite scored by lm-eval before the first and after the last task (clbench.general): a named
    # suite (general-mini, trace-general) or lm-eval task names; general_every_task also scores after each task
    general: str | None = None
    general_every_task: bool | None = None

    # options added after run folders were published: left out of a run's identity while unset
    identity_if_set: ClassVar[tuple[str, ...]] = ("frozen_dtype", "score_split", "eval_rows", "general",
                                                  "general_every_task")

    def __post_init__(self) -> None:
        """Refuse values Lightning or the loop would only reject with a traceback later (one line each)."""
        positive = ("order", "batch_size", "eval_batch_size", "accumulate_grad_batches", "devices", "num_nodes")
        at_least_one = ("epochs", "max_steps_per_task", "num_tasks", "max_prompt_len", "max_answer_len",
                        "max_new_tokens", "limit_train", "limit_eval", "limit_test")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in at_least_one:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 (or unset), got {value}")
        if self.stop_after is not None and self.stop_after < 0:
            raise ValueError(f"stop_after must be >= 0, got {self.stop_after}")
        if self.gradient_clip_val is not None and self.gradient_clip_val <= 0:
            raise ValueError(f"gradient_clip_val must be > 0 (or unset), got {self.gradient_clip_val}")
        if self.general_every_task and not self.general:
            raise ValueError("general_every_task needs general (a suite name or lm-eval task names)")
        if self.eval_rows == "full":  # the default spelled out: same run, same folder as leaving it unset
            self.eval_rows = None


SCORE_SPLITS = (None, "eval")
EVAL_ROWS = (None, "full", "needed")

# --frozen-dtype NAME -> (torch dtype name, the --precision that autocasts to it)
FROZEN_DTYPES = {"bf16": ("bfloat16", "bf16-mixed"), "fp16": ("float16", "16-mixed")}

def frozen_torch_dtype(name: str | None, precision: str) -> Any:
    """Torch dtype for ``--frozen-dtype NAME`` (None when unset); ConfigError unless ``precision`` autocasts to it."""
    if name is None:
        return None
    if name not in FROZEN_DTYPES:
        raise ConfigError(f"frozen_dtype '{name}' is not one of {sorted(FROZEN_DTYPES)}")
    dtype_name, needed = FROZEN_DTYPES[name]
    if precision != needed:
        raise ConfigError(f"--frozen-dtype {name} needs --precision {needed} (frozen weights are only read through "
                          f"autocast), not {precision}")
    import torch  # here, so that building a RunConfig (sweep plans, leaderboards) never imports torch

    return getattr(torch, dtype_name)


# Fields that never change what a run computes; excluded from the run's identity (folder hash, resume check).
NOT_IDENTITY = frozenset({"out", "results_dir", "progress", "stop_after"})
# Fields that are part of a run's identity but leave its scores (R, OP/BWT/FWT) unchanged: seeds that differ only
# here average into one leaderboard row ("needed" leaves unneeded entries of R empty; general adds general.csv)
NOT_SCORES = frozenset({"eval_rows", "general", "general_every_task"})


def load_run_config(path: str | None, overrides: dict[str, Any],
                    hardware: str | None = None) -> tuple[RunConfig, dict[str, Any]]:
    """Build the RunConfig from its layers, each overriding the one before:

    built-in defaults (RunConfig) < hardware profile (``--hardware`` or the YAML's ``hardware:`` key) < the run YAML
    (``--config``: run keys at top level, method knobs under ``method_config:``) < explicit command-line flags
    (``overrides``; None means "not given"). Returns the config and the YAML's method knobs.
    """
    data = load_yaml(path) if path else {}
    method_cfg = data.pop("method_config", {}) or {}
    if not isinstance(method_cfg, dict):
        raise ConfigError(f"{path}: method_config must be a mapping")
    yaml_profile = data.pop("hardware", None)
    profile_name = hardware or yaml_profile
    merged = dict(hardware_profile(profile_name)) if profile_name else {}
    merged.update(data)
    merged.update({k: v for k, v in overrides.items() if v is not None})
    return build(RunConfig, merged, where=f"run config{f' {path}' if path else ''}"), method_cfg
