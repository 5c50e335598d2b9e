"""What a run will do, decided before any model loads: method and knobs, the refusals, tasks, data, identity, seeds.

:meth:`RunPlan.build` resolves the method class and its config (YAML defaults < overrides), refuses every
combination that cannot work, loads the benchmark's task order and its data manifest, and fixes the run's identity
and folder. It reads the data files and the method's YAML but loads no model and builds no Trainer, so
``clbench sweep`` plans a grid, ``clbench tune`` checks a trial and the tests rebuild committed identities cheaply.

The identity (what ``config.yaml`` stores, what resume compares, what the folder hash covers) is a plain function of
its inputs, :func:`run_identity`, and the folder name one of the identity, :func:`folder_digest` and
:func:`default_run_dir`: every committed run folder's name depends on them byte for byte
(``tests/test_run_identity.py``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clbench import cl_metrics, registry
from clbench.benchmark import Benchmark, Task, TaskSpec, _split_manifest, manifest_digest
from clbench.config import ConfigError, config_identity
from clbench.run_config import EVAL_ROWS, NOT_IDENTITY, SCORE_SPLITS, RunConfig, frozen_torch_dtype

if TYPE_CHECKING:
    from clbench.method import CLMethod


def resolve_method(name: str, overrides: dict[str, Any] | None = None, where: str | None = None
                   ) -> tuple[type[CLMethod], Any]:
    """Method ``name``'s class and its config: ``configs/methods/<name>.yaml`` < ``overrides`` (unknown keys are an
    error naming the nearest valid one; ``where`` says what the config belongs to in that error)."""
    method_cls = registry.get_method(name)  # first: an unknown method is named as such, not as a bad knob
    return method_cls, method_cls.default_config(overrides, where)


def runs_on_cpu(cfg: RunConfig) -> bool:
    """Whether the run's accelerator is the CPU (``auto`` without CUDA included)."""
    import torch

    return cfg.accelerator == "cpu" or (cfg.accelerator == "auto" and not torch.cuda.is_available())


def check_strategy(cfg: RunConfig) -> None:
    """Refuse strategy/hardware combinations that cannot work, before any model is loaded (no hang, one line)."""
    import importlib.util

    from lightning.pytorch.strategies import StrategyRegistry

    name = cfg.strategy
    if name != "auto" and name not in StrategyRegistry.available_strategies():
        raise ConfigError(f"unknown strategy '{name}' (Lightning knows: {', '.join(StrategyRegistry)})")
    if name.startswith(("ddp_spawn", "ddp_fork", "ddp_notebook")):
        # these launchers run fit/predict in child processes and hand only the state dict back, so the parent,
        # which writes R and the predictions, would never see them
        raise ConfigError(f"strategy '{name}' is not supported: use --strategy ddp (Lightning's subprocess launcher)")
    if name.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(f"strategy '{name}' needs the deepspeed package: pip install deepspeed")
    if runs_on_cpu(cfg) and (name.startswith("fsdp") or name.startswith("deepspeed")):
        raise ConfigError(f"strategy '{name}' needs CUDA GPUs; on CPU use --strategy ddp (gloo)")


def check_run(cfg: RunConfig, method_cls: type[CLMethod]) -> None:
    """Every refusal that needs no data and no model, one ConfigError line each, in the order a user meets them."""
    if cfg.oracle_task_id and not (method_cls.supports_oracle_task_id or method_cls.task_aware):
        raise ConfigError(f"method '{cfg.method}' cannot use --oracle-task-id (it has no per-task routing)")
    check_strategy(cfg)
    frozen_torch_dtype(cfg.frozen_dtype, cfg.precision)  # fail before any model is loaded
    if cfg.general:
        from clbench.general import check_suite

        check_suite(cfg.general)  # an unknown lm-eval task name fails here, before any training
    if cfg.score_split not in SCORE_SPLITS:
        raise ConfigError(f"score_split '{cfg.score_split}' is not one of {SCORE_SPLITS[1:]} (unset = test)")
    if cfg.eval_rows not in EVAL_ROWS:
        raise ConfigError(f"eval_rows '{cfg.eval_rows}' is not one of {EVAL_ROWS[1:]} (unset = full)")


def data_manifest(benchmark: Benchmark, score_split: str | None) -> dict[str, Any]:
    """Record count and content hash per task and split: every split, or train and eval only under
    ``score_split: eval`` (tuning must not read a test record at all, not even to hash it)."""
    if score_split != "eval":
        return benchmark.manifest()
    return {name: {split: _split_manifest(getattr(task, split)) for split in ("train", "eval")}
            for name, task in benchmark.tasks.items()}


def run_identity(cfg: RunConfig, method_identity: dict[str, Any], specs: Sequence[TaskSpec],
                 manifest: dict[str, Any], default_lens: tuple[int, int]) -> dict[str, Any]:
    """The identity of a run: what it computes, and nothing about where it writes or how it shows progress.

    ``method_identity`` is ``config_identity(method config)``; ``default_lens`` the benchmark's (max_prompt_len,
    max_answer_len), stored resolved so that spelling a default out is the same run. Key order is config.yaml's.
    """
    run = {k: v for k, v in config_identity(cfg).items() if k not in NOT_IDENTITY}
    run["max_prompt_len"] = cfg.max_prompt_len or default_lens[0]
    run["max_answer_len"] = cfg.max_answer_len or default_lens[1]
    return {
        "run": run,
        "method": method_identity,
        "tasks": [dataclasses.asdict(spec) for spec in specs],
        "data_manifest_digest": manifest_digest(manifest),
    }


def folder_digest(identity: dict[str, Any]) -> str:
    """The 8 hex digits that end a default run folder's name: sha256 of the identity as sorted JSON."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]


def default_run_dir(cfg: RunConfig, identity: dict[str, Any]) -> Path:
    """``<results_dir>/<benchmark>/<method>/<model>/order<N>-seed<S>-<digest>`` (the folder when ``out`` is unset)."""
    model_slug = Path(cfg.model).name.replace("/", "_") or "model"
    name = f"order{cfg.order}-seed{cfg.seed}-{folder_digest(identity)}"
    return Path(cfg.results_dir) / cfg.benchmark / cfg.method / model_slug / name


@dataclass
class RunPlan:
    """One run, resolved and checked: build it with :meth:`build`."""

    cfg: RunConfig
    method_cls: type[CLMethod]
    method_cfg: Any
    benchmark: Benchmark
    tasks: list[Task]
    resolved: dict[str, Any]  # config.yaml: {"identity": run_identity(...), "data_manifest": ...}
    run_dir: Path

    @classmethod
    def build(cls, cfg: RunConfig, method_overrides: dict[str, Any] | None = None) -> RunPlan:
        """Resolve and check ``cfg`` with the method knobs ``method_overrides`` (ConfigError/DataError, one line)."""
        method_cls, method_cfg = resolve_method(cfg.method, method_overrides)
        check_run(cfg, method_cls)
        factory = registry.get_benchmark(cfg.benchmark)
        benchmark: Benchmark = factory(data_dir=cfg.data_dir, limit_train=cfg.limit_train,
                                       limit_eval=cfg.limit_eval, limit_test=cfg.limit_test)
        tasks = benchmark.ordered(cfg.order)[: cfg.num_tasks or None]
        manifest = data_manifest(benchmark, cfg.score_split)
        identity = run_identity(cfg, config_identity(method_cfg), [t.spec for t in tasks], manifest,
                                (benchmark.max_prompt_len, benchmark.max_answer_len))
        run_dir = Path(cfg.out) if cfg.out else default_run_dir(cfg, identity)
        return cls(cfg, method_cls, method_cfg, benchmark, tasks, {"identity": identity, "data_manifest": manifest},
                   run_dir)

    @property
    def identity(self) -> dict[str, Any]:
        """The run's identity (see :func:`run_identity`)."""
        return self.resolved["identity"]

    @property
    def task_names(self) -> list[str]:
        """The tasks' names in order: the columns of R."""
        return [t.name for t in self.tasks]

    @property
    def max_prompt_len(self) -> int:
        """Prompt tokens kept (the run's setting, else the benchmark's)."""
        return self.identity["run"]["max_prompt_len"]

    @property
    def max_answer_len(self) -> int:
        """Answer tokens trained on (the run's setting, else the benchmark's)."""
        return self.identity["run"]["max_answer_len"]

    @property
    def gives_task_id(self) -> bool:
        """Whether evaluation batches carry ``task_id``: only for task-aware methods or under ``--oracle-task-id``."""
        return bool(self.method_cls.task_aware or self.cfg.oracle_task_id)

    @property
    def score_split(self) -> str:
        """The split each row of R is scored on: ``test``, or ``eval`` under ``score_split: eval``."""
        return "eval" if self.cfg.score_split == "eval" else "test"

    def stages(self) -> list[int]:
        """The task indices trained, in order: every task, or only the last one for a joint-training method (which
        trains on all tasks at once)."""
        return [len(self.tasks) - 1] if self.method_cls.joint_training else list(range(len(self.tasks)))

    def task_seed(self, t: int) -> int:
        """The seed set before task ``t``'s begin_task and its training order (the same in a resumed run)."""
        return self.cfg.seed * 1000 + t

    def second_pass_seed(self, t: int) -> int:
        """The training order's seed of task ``t``'s optional second pass (another order than its first pass)."""
        return self.task_seed(t) + 500

    def epochs(self, task: Task) -> int:
        """Epochs task ``task`` trains for: the run's setting, else the benchmark's for that task."""
        return self.cfg.epochs or task.spec.epochs

    def columns(self, row: int) -> set[int]:
        """The tasks row ``row`` of R evaluates: all, or under ``eval_rows: needed`` only those OP/BWT/FWT read (the
        others stay NaN)."""
        if self.cfg.eval_rows == "needed":
            return set(cl_metrics.needed_columns(row, len(self.tasks)))
        return set(range(len(self.tasks)))

    def general_label(self, stage: int) -> str | None:
        """The label of general-ability stage ``stage`` (0 = before the first task, i = after row i of R) when
        ``--general`` asks for that stage, else None."""
        cfg, last = self.cfg, len(self.tasks)
        if not (cfg.general and (stage in (0, last) or (cfg.general_every_task and 0 < stage < last))):
            return None
        return "before" if stage == 0 else f"after-{stage}:{self.task_names[stage - 1]}"
