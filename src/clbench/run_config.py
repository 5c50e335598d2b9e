"""A run's settings: the RunConfig dataclass, where its values come from, and which of them make a run's identity.

Pure: building a RunConfig imports no torch and loads no model, so sweeps, tuning and leaderboards can reason about
runs cheaply. Precedence, each layer overriding the one before (``load_run_config``): built-in defaults < hardware
profile < run YAML < command-line flags.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from clbench.config import ConfigError, build, fields_where, load_yaml, setting
from clbench.configs_dir import hardware_profile


@dataclass
class RunConfig:
    """Everything about a run except the method's own knobs (those live in the method's config dataclass).

    Each field is a key of the run YAML and a ``clbench run`` option (``--data-dir`` for ``data_dir``; a bool field
    whose default is true is the flag ``--no-<name>``, any other bool field the flag ``--<name>``). Its ``setting``
    holds the ``--help`` text and its role in the run's identity (``identity=``/``scores=``; see clbench.config).
    """

    method: str = setting("lora", "method name (see `clbench list`)")
    benchmark: str = setting("trace-mini", "benchmark name (see `clbench list`)")
    order: int = setting(1, "task order (TRACE numbers them 1 and 2)")
    seed: int = setting(0, "seed of everything random in the run (Lightning's seed_everything)")
    model: str = setting("bundled", "'bundled' (SmolLM2-135M, offline), 'tiny' (random, for smoke tests), a local "
                                    "folder or a hub id")
    data_dir: str | None = setting(None, "benchmark data folder <Task>/{train,eval,test}.json (default: "
                                         "trace-mini's bundled data; trace: $CLBENCH_TRACE_DIR)")
    out: str | None = setting(None, "run folder (default: <results-dir>/<bench>/<method>/<model>/"
                                    "order<N>-seed<S>-<config hash>)", identity="never")
    results_dir: str = setting("runs", "parent of the default run folders: user runs go to an ignored runs/, the "
                                       "committed reference runs live in results/runs (make results)",
                               identity="never")
    batch_size: int = setting(8, "micro-batch size per device (--micro-batch-size is an alias)",
                              aliases=("--micro-batch-size",))
    eval_batch_size: int = setting(16, "generation batch size per device")
    accumulate_grad_batches: int = setting(1, "micro-batches per optimizer step")
    epochs: int | None = setting(None, "epochs per task (default: the benchmark's per-task epochs)")
    max_steps_per_task: int | None = setting(None, "stop each task's training after N optimizer steps")
    num_tasks: int | None = setting(None, "only the first N tasks of the order")
    limit_train: int | None = setting(None, "at most N training records per task")
    limit_eval: int | None = setting(None, "at most N eval records per task")
    limit_test: int | None = setting(None, "at most N test records per task")
    max_prompt_len: int | None = setting(None, "prompt tokens kept, the last ones (default: the benchmark's)")
    max_answer_len: int | None = setting(None, "answer tokens trained on, the first ones (default: the benchmark's)")
    max_new_tokens: int | None = setting(None, "override every task's generation budget")
    accelerator: str = setting("auto", "Lightning accelerator: auto, cpu, gpu, ...")
    devices: int = setting(1, "devices (processes) per node")
    num_nodes: int = setting(1, "nodes (multi-node DDP/FSDP)")
    strategy: str = setting("auto", "Lightning strategy: auto, ddp, fsdp, deepspeed_stage_2...")
    precision: str = setting("32-true", "Lightning precision: 32-true (the reference mode: the same answers on "
                                        "another CPU, docs/uncertainty.md) or bf16-mixed (faster on bf16 CPUs/GPUs)")
    gradient_clip_val: float | None = setting(1.0, "clip the gradient norm to this (YAML null: no clipping)")
    zero_shot: bool = setting(True, "score every task before training, row R[0,:] (--no-zero-shot skips it; FWT is "
                                    "then undefined)")
    oracle_task_id: bool = setting(False, "give the true task id at test time")
    progress: bool = setting(True, "progress bars while training and evaluating (--no-progress hides them)",
                             identity="never")
    stop_after: int | None = setting(None, "train at most N tasks in this sitting; rerun to resume",
                                     identity="never")
    frozen_dtype: str | None = setting(None, "bf16|fp16: store frozen Linear weights in the autocast dtype "
                                             "(bit-identical outputs under bf16-mixed / 16-mixed, half their memory, "
                                             "no per-step weight cast; default: fp32 master weights everywhere)",
                                       identity="if_set")
    score_split: str | None = setting(None, "the split every row of R is scored on: test (unset, every reported "
                                            "run) or eval, for tuning (`clbench tune`), which then never reads a test "
                                            "record, not even for the data manifest", identity="if_set")
    eval_rows: str | None = setting(None, "which entries of R each row evaluates: full (every task after every "
                                          "task, the forgetting curves; default) or needed (only those OP/BWT/FWT "
                                          "read, cl_metrics.needed_columns: rows 0 and T whole, R[j-1,j] and "
                                          "R[j,j]; the rest stays NaN; 30 of 72 task evaluations on 8 tasks)",
                                    identity="if_set", scores=False)
    general: str | None = setting(None, "general-ability suite scored by lm-eval before the first and after the "
                                        "last task (clbench.general): general-mini (bundled, offline), trace-general, "
                                        "or lm-eval task names a,b,c", identity="if_set", scores=False)
    general_every_task: bool | None = setting(None, "also score --general after every task", identity="if_set",
                                              scores=False)

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


# Which fields make a run's identity is said once, in each field's ``setting`` above; these are read from there.
# Fields that never change what a run computes; excluded from the run's identity (folder hash, resume check).
NOT_IDENTITY = fields_where(RunConfig, identity="never")
# Fields that are part of a run's identity but leave its scores (R, OP/BWT/FWT) unchanged: seeds that differ only
# here average into one leaderboard row ("needed" leaves unneeded entries of R empty; general adds general.csv)
NOT_SCORES = fields_where(RunConfig, scores=False)
# Options added after run folders were published: left out of a run's identity while unset (config_identity)
IDENTITY_IF_SET = fields_where(RunConfig, identity="if_set")

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
