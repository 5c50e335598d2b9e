"""The continual-learning loop: one Lightning fit per task, every task evaluated after each, resumable.

::

    R[0, :] = evaluate every task zero-shot            (skipped with zero_shot=False)
    for t, task in order:                              (tasks whose row is on disk are skipped: resume)
        method.begin_task(t, task); Trainer.fit(method, task data); method.end_task(t, task)
        R[t+1, :] = evaluate every task's test split   (task-agnostic: no task id unless the method is task-aware)
        checkpoint the method state, then record row t+1 (atomic writes)
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback, RichProgressBar
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only
from rich.console import Console
from torch.utils.data import DataLoader

from clbench import cl_metrics, registry
from clbench.benchmark import Benchmark, Collator, Task, _split_manifest, manifest_digest
from clbench.config import ConfigError, build, config_identity
from clbench.configs_dir import method_defaults
from clbench.general import general_summary
from clbench.method import CLMethod
from clbench.models import load_model
from clbench.provenance import git_commit, hardware, peak_memory_mb, versions
from clbench.results import RunStore
from clbench.run_config import (  # noqa: F401  (RunConfig, load_run_config, FROZEN_DTYPES: re-exported for callers)
    EVAL_ROWS,
    FROZEN_DTYPES,
    NOT_IDENTITY,
    SCORE_SPLITS,
    RunConfig,
    frozen_torch_dtype,
    load_run_config,
)
from clbench.sampling import GlobalBatchSampler, ShardSampler
from clbench.scores import score

console = Console(stderr=True)


def is_rank_zero() -> bool:
    """True in the process that writes results (Lightning sets the rank from the launcher's environment)."""
    return rank_zero_only.rank == 0


def say(*args: Any, rule: bool = False) -> None:
    """Print on rank 0 only, so multi-process runs do not repeat every line."""
    if is_rank_zero():
        (console.rule if rule else console.print)(*args)


class ThroughputMeter(Callback):
    """Train tokens/s and seconds per optimiser step (first step excluded).

    A step is timed from the start of its first micro-batch to the end of the micro-batch after which the optimiser
    stepped (``trainer.global_step`` moved), so with ``accumulate_grad_batches: K`` one step covers K micro-batches,
    as "seconds per optimiser step" promises.
    """

    def __init__(self) -> None:
        self.tokens = 0
        self.seconds = 0.0
        self.steps = 0
        self._t0: float | None = None
        self._window_tokens = 0
        self._global_step = 0
        self._first_seconds = 0.0
        self._first_tokens = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._global_step = trainer.global_step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._t0 is None:
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._window_tokens += int(batch["attention_mask"].sum()) * trainer.world_size
        if trainer.global_step == self._global_step or self._t0 is None:
            return  # still accumulating: the optimiser has not stepped yet
        self._global_step = trainer.global_step
        elapsed, tokens = time.perf_counter() - self._t0, self._window_tokens
        self._t0, self._window_tokens = None, 0
        if self.steps == 0:  # warm-up step (allocator, autocast caches) is kept apart
            self._first_seconds, self._first_tokens = elapsed, tokens
        else:
            self.seconds += elapsed
            self.tokens += tokens
        self.steps += 1

    def summary(self) -> dict[str, float]:
        """tokens/s and s/step over the measured steps (falls back to the single step when only one ran)."""
        seconds, tokens, steps = self.seconds, self.tokens, self.steps - 1
        if steps <= 0:
            seconds, tokens, steps = self._first_seconds, self._first_tokens, max(self.steps, 1)
        return {
            "steps": self.steps,
            "tokens_per_s": tokens / seconds if seconds else float("nan"),
            "step_time_s": seconds / steps if steps else float("nan"),
        }


def _quiet_lightning() -> None:
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*The number of training batches.*")
    warnings.filterwarnings("ignore", message=r".*predict_dataloader.*")
    warnings.filterwarnings("ignore", message=r".*is a wrapper around.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)


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
    on_cpu = cfg.accelerator == "cpu" or (cfg.accelerator == "auto" and not torch.cuda.is_available())
    if on_cpu and (name.startswith("fsdp") or name.startswith("deepspeed")):
        raise ConfigError(f"strategy '{name}' needs CUDA GPUs; on CPU use --strategy ddp (gloo)")


def show_finished(run_dir: Path) -> None:
    """Print a finished run's R matrix and headline metrics (what a rerun of a finished command shows)."""
    if not is_rank_zero():
        return
    from rich.table import Table

    frame = pd.read_csv(run_dir / "R.csv", index_col=0)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    table = Table(title=f"R (rows: after each task; {run_dir})", title_justify="left")
    table.add_column("")
    for name in frame.columns:
        table.add_column(name, justify="right")
    for label, row in frame.iterrows():
        table.add_row(str(label), *("" if pd.isna(v) else f"{v:.3f}" for v in row))
    console.print(table)
    line = "  ".join(f"{k} {metrics[k]:.4f}" if isinstance(metrics.get(k), float) else f"{k} n/a"
                     for k in ("OP", "BWT", "FWT"))
    say(f"[green]already finished[/] (delete the folder or pass another --out to run again): {line}")


class Harness:
    """Runs one method over one benchmark order; see the module docstring for the loop."""

    def __init__(self, cfg: RunConfig, method_overrides: dict[str, Any] | None = None, command: str | None = None):
        self.cfg = cfg
        self.command = command or " ".join(["clbench", *sys.argv[1:]])
        self.method_cls: type[CLMethod] = registry.get_method(cfg.method)
        defaults = method_defaults(cfg.method)
        self.method_cfg = build(self.method_cls.config_class, {**defaults, **(method_overrides or {})},
                                where=f"method '{cfg.method}' config")
        if cfg.oracle_task_id and not (self.method_cls.supports_oracle_task_id or self.method_cls.task_aware):
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
        factory = registry.get_benchmark(cfg.benchmark)
        self.benchmark: Benchmark = factory(data_dir=cfg.data_dir, limit_train=cfg.limit_train,
                                            limit_eval=cfg.limit_eval, limit_test=cfg.limit_test)
        self.tasks: list[Task] = self.benchmark.ordered(cfg.order)[: cfg.num_tasks or None]
        self.task_names = [t.name for t in self.tasks]
        self.manifest = self._manifest()
        self.resolved = self._resolve()
        self.run_dir = Path(cfg.out) if cfg.out else self._default_dir()
        self.store = RunStore(self.run_dir)

    def _scored(self, task: Task) -> list[dict[str, str]]:
        """The records a row of R scores: the test split, or the eval split under ``score_split: eval``."""
        return task.eval if self.cfg.score_split == "eval" else task.test

    def _manifest(self) -> dict[str, Any]:
        if self.cfg.score_split != "eval":
            return self.benchmark.manifest()
        # tuning must not read test records at all, so its manifest covers train and eval only
        return {name: {split: _split_manifest(getattr(task, split)) for split in ("train", "eval")}
                for name, task in self.benchmark.tasks.items()}

    # ---- config ----------------------------------------------------------------------------------------------
    def _resolve(self) -> dict[str, Any]:
        run = {k: v for k, v in config_identity(self.cfg).items() if k not in NOT_IDENTITY}
        run["max_prompt_len"] = self.cfg.max_prompt_len or self.benchmark.max_prompt_len
        run["max_answer_len"] = self.cfg.max_answer_len or self.benchmark.max_answer_len
        identity = {
            "run": run,
            "method": config_identity(self.method_cfg),
            "tasks": [dataclasses.asdict(t.spec) for t in self.tasks],
            "data_manifest_digest": manifest_digest(self.manifest),
        }
        return {"identity": identity, "data_manifest": self.manifest}

    def _default_dir(self) -> Path:
        digest = hashlib.sha256(json.dumps(self.resolved["identity"], sort_keys=True).encode()).hexdigest()[:8]
        model_slug = Path(self.cfg.model).name.replace("/", "_") or "model"
        name = f"order{self.cfg.order}-seed{self.cfg.seed}-{digest}"
        return Path(self.cfg.results_dir) / self.cfg.benchmark / self.cfg.method / model_slug / name

    # ---- loop ------------------------------------------------------------------------------------------------
    def run(self) -> Path:
        """Train through the order (resuming after the last finished task) and write the run folder.

        Rank 0 holds the folder's exclusive lock for the whole run, so a second process started on the same folder
        fails at once with one line naming the holder instead of writing beside it.
        """
        _quiet_lightning()
        self.store.check_same_config(self.resolved)
        if not self.store.finished:
            with self.store.locked() if is_rank_zero() else contextlib.nullcontext():
                if not self.store.finished:  # another process may have finished it while we checked
                    return self._run_unlocked()
        show_finished(self.run_dir)
        return self.run_dir

    def _run_unlocked(self) -> Path:
        cfg = self.cfg
        loaded = load_model(cfg.model)
        self.tokenizer = loaded.tokenizer
        L.seed_everything(cfg.seed, verbose=False)
        method = self.method_cls(loaded.model, loaded.tokenizer, self.method_cfg, num_tasks=len(self.tasks))
        resuming = self.store.claim(self.resolved, write=is_rank_zero())
        rows = self.store.rows()
        stages = [len(self.tasks) - 1] if method.joint_training else list(range(len(self.tasks)))
        done_stages = [t for t in stages if t + 1 in rows]
        if done_stages:
            self._restore(method, stages, done_stages[-1])
        if resuming:
            say(f"[yellow]resuming[/] {self.run_dir}: {len(done_stages)} of {len(stages)} tasks done")
        else:
            say(f"[bold]clbench run[/] {cfg.method} on {cfg.benchmark} order {cfg.order} seed {cfg.seed}"
                f" -> {self.run_dir}")

        if cfg.zero_shot and 0 not in rows:
            self._evaluate(method, row=0, label="zero-shot")
        # general ability before any training; after a resume, the last finished stage's if it was not stored
        self._general(method, done_stages[-1] + 1 if done_stages else 0)
        trained_now = 0
        for t in stages:
            if t + 1 in rows:
                continue
            if cfg.stop_after is not None and trained_now >= cfg.stop_after:
                say(f"[yellow]stopping after {trained_now} task(s) as asked[/]; rerun the same command to resume")
                return self.run_dir
            trained_now += 1
            task = self.tasks[t]
            say(f"task {t + 1}/{len(self.tasks)}: {task.name}", rule=True)
            started = time.perf_counter()
            L.seed_everything(self.task_seed(t), verbose=False)
            method.begin_task(t, task)
            self._store_frozen(method)
            train_stats = self._fit(method, t)
            train_seconds = time.perf_counter() - started
            self._evaluate(method, row=t + 1, label=f"after {task.name}",
                           extra={"train": train_stats, "train_seconds": train_seconds,
                                  "params": method.param_report()},
                           state=method.checkpoint_state())
            self._general(method, t + 1)
        if is_rank_zero():
            metrics = self.metrics(method)
            method.write_artifacts(self.run_dir)
            self.store.finish(metrics)
            say(f"[green]done[/] OP {metrics['OP']:.4f}  BWT {metrics['BWT']:.4f}  FWT {metrics['FWT']:.4f}"
                f"  -> {self.run_dir}")
        return self.run_dir

    def task_seed(self, t: int) -> int:
        """The seed set before task ``t``'s begin_task and its training order (the same in a resumed run)."""
        return self.cfg.seed * 1000 + t

    def _restore(self, method: CLMethod, stages: list[int], last_done: int) -> None:
        for t in stages:
            if t > last_done:
                break
            L.seed_everything(self.task_seed(t), verbose=False)
            method.begin_task(t, self.tasks[t])
            self._store_frozen(method)
        method.load_checkpoint_state(self.store.load_state(last_done + 1))

    def _general(self, method: CLMethod, stage: int) -> None:
        """Score the general-ability suite at ``stage`` (0 = before the first task, i = after row i of R) when
        ``--general`` asks for that stage and it is not stored yet (resume never re-evaluates); rank 0 only, on the
        run's accelerator and under its autocast, as R is scored."""
        cfg = self.cfg
        last = len(self.tasks)
        wanted = cfg.general and (stage in (0, last) or (cfg.general_every_task and 0 < stage < last))
        if not wanted or not is_rank_zero() or stage in self.store.general_rows():
            return
        from clbench.general import evaluate_general

        label = "before" if stage == 0 else f"after-{stage}:{self.task_names[stage - 1]}"
        use_gpu = torch.cuda.is_available() and cfg.accelerator in ("auto", "gpu", "cuda")
        home = next(method.parameters()).device
        method.to(torch.device("cuda") if use_gpu else torch.device("cpu"))
        try:
            with self._trainer(logger=False).precision_plugin.forward_context():
                result = evaluate_general(method, self.tokenizer, cfg.general)
        finally:
            method.to(home)
        self.store.add_general_row(stage, {"label": label, "benchmarks": result.benchmarks, "scores": result.scores,
                                           "seconds": result.seconds, "lm_eval": result.lm_eval_version,
                                           "settings": result.settings})
        line = "  ".join(f"{k} {v:.3f}" for k, v in result.benchmarks.items())
        say(f"[magenta]general {label}[/] ({result.seconds:.0f} s): {line}")

    def _store_frozen(self, method: CLMethod) -> None:
        dtype = frozen_torch_dtype(self.cfg.frozen_dtype, self.cfg.precision)
        if dtype is not None:
            method.store_frozen_linears(dtype)

    def _strategy(self) -> str:
        # Methods whose active experts change per batch leave some trainable parameters without a gradient in a
        # step; DDP must then look for unused parameters or it stops with an error.
        if self.cfg.strategy == "ddp" and self.method_cls.ddp_find_unused_parameters:
            return f"{self.cfg.strategy}_find_unused_parameters_true"
        return self.cfg.strategy

    def _trainer(self, **kwargs: Any) -> L.Trainer:
        cfg = self.cfg
        callbacks = kwargs.pop("callbacks", [])
        if cfg.progress:
            callbacks.append(RichProgressBar(leave=False))
        return L.Trainer(
            accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes, strategy=self._strategy(),
            precision=cfg.precision,
            enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=cfg.progress,
            use_distributed_sampler=False,  # clbench.sampling shards data so N processes match one process
            callbacks=callbacks, **kwargs,
        )

    def _fit(self, method: CLMethod, t: int) -> dict[str, Any]:
        cfg = self.cfg
        task = self.tasks[t]
        examples = method.train_examples(t, self.tasks)
        collate = Collator(self.tokenizer, self.resolved["identity"]["run"]["max_prompt_len"],
                           self.resolved["identity"]["run"]["max_answer_len"], train=True)
        meter = ThroughputMeter()
        epochs = cfg.epochs or task.spec.epochs

        def fit(records: list[dict[str, Any]], seed: int, max_epochs: int, log_name: str) -> tuple[Any, Any]:
            sampler = GlobalBatchSampler(len(records), cfg.batch_size, seed=seed)
            loader = DataLoader(records, batch_size=cfg.batch_size, sampler=sampler, collate_fn=collate)
            trainer = self._trainer(
                max_epochs=max_epochs, max_steps=cfg.max_steps_per_task or -1, callbacks=[meter],
                logger=CSVLogger(self.run_dir, name="logs", version=log_name), log_every_n_steps=5,
                accumulate_grad_batches=cfg.accumulate_grad_batches, gradient_clip_val=cfg.gradient_clip_val,
            )
            trainer.fit(method, train_dataloaders=loader)
            return trainer, loader

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        trainer, loader = fit(examples, self.task_seed(t), epochs, f"task-{t + 1}")
        # an optional second pass of one epoch (TRACE's replay schedule revisits earlier tasks after each task)
        second = method.second_pass_examples(t, self.tasks)
        if second:
            fit(second, self.task_seed(t) + 500, 1, f"task-{t + 1}-second-pass")
        # with frozen weights in bf16/fp16, end_task's own forwards (Fisher, importance, keys) must run under the
        # run's autocast too, as training did; fp32 runs keep their exact behaviour
        context = trainer.precision_plugin.forward_context() if self.cfg.frozen_dtype else contextlib.nullcontext()
        with context:
            method.end_task(t, task, train_loader=loader)
        return {**meter.summary(), "examples": len(examples), "epochs": epochs,
                **({"second_pass_examples": len(second)} if second else {})}

    def _evaluate(self, method: CLMethod, row: int, label: str, extra: dict[str, Any] | None = None,
                  state: dict[str, torch.Tensor] | None = None) -> None:
        cfg = self.cfg
        collate = Collator(self.tokenizer, self.resolved["identity"]["run"]["max_prompt_len"], train=False)
        give_task_id = method.task_aware or cfg.oracle_task_id
        trainer = self._trainer(logger=False)
        scores, timings = {}, {}
        extra_scores: dict[str, dict[str, float]] = {}
        eval_seconds = 0.0
        predictions: dict[str, list[dict[str, str]]] = {}
        needed = (set(cl_metrics.needed_columns(row, len(self.tasks))) if cfg.eval_rows == "needed"
                  else set(range(len(self.tasks))))
        for j, task in enumerate(self.tasks):
            if j not in needed:  # --eval-rows needed: R[row, j] stays NaN (no metric reads it)
                continue
            max_new = cfg.max_new_tokens or task.spec.max_new_tokens
            records = [{"prompt": r["prompt"], "index": i, **({"task_id": j} if give_task_id else {})}
                       for i, r in enumerate(self._scored(task))]
            # similar token counts share a batch (less padding); the index restores the file order afterwards.
            # Tokens, not characters: Chinese and code prompts have other tokens per character (trace-mini's test
            # splits at batch 16: 3.6% padded prompt tokens by token count, 9.3% by characters)
            n_tokens = {r["index"]: len(self.tokenizer(r["prompt"], add_special_tokens=False)["input_ids"])
                        for r in records}
            records.sort(key=lambda r: n_tokens[r["index"]])

            def collate_eval(batch: list[dict[str, Any]], _max_new: int = max_new) -> dict[str, Any]:
                out = collate(batch)
                out["max_new_tokens"] = _max_new
                return out

            loader = DataLoader(records, batch_size=cfg.eval_batch_size, collate_fn=collate_eval,
                                sampler=ShardSampler(len(records)))
            started = time.perf_counter()
            trainer.predict(method, dataloaders=loader, return_predictions=False)
            elapsed = time.perf_counter() - started
            eval_seconds += elapsed
            timings[task.name] = 1000 * elapsed / len(records)
            preds = method.collected_predictions()
            answers = [r["answer"] for r in self._scored(task)]
            prompts = [r["prompt"] for r in self._scored(task)]
            scores[task.name] = score(task.spec.metric, preds, answers, prompts)
            for metric, value in method.evaluation_report(j, task).items():
                extra_scores.setdefault(metric, {})[task.name] = value
            predictions[task.name] = [{"prompt": p, "answer": a, "prediction": y}
                                      for p, a, y in zip(prompts, answers, preds, strict=True)]
        record = {"label": label, "scores": scores, "extra_scores": extra_scores,
                  "inference_ms_per_example": timings, "eval_seconds": eval_seconds,
                  "peak_memory_mb": peak_memory_mb(), **(extra or {})}
        if is_rank_zero():
            for name, recs in predictions.items():
                self.store.write_predictions(row, name, recs)
            if state is not None:
                self.store.save_state(row, state)
            self.store.add_row(row, record, self.task_names)
            if state is not None:
                self.store.prune_states(row)
        line = "  ".join(f"{k} {v:.3f}" for k, v in scores.items())
        say(f"[cyan]{label}[/]: {line}")

    # ---- summary ---------------------------------------------------------------------------------------------
    def metrics(self, method: CLMethod) -> dict[str, Any]:
        """metrics.json: OP/BWT/FWT, R, parameter growth, speed, memory, provenance."""
        rows = self.store.rows()
        T = len(self.tasks)
        R = np.full((T + 1, T), np.nan)
        for i, rec in rows.items():
            R[i] = [rec["scores"].get(n, np.nan) for n in self.task_names]
        trained = [rows[i] for i in sorted(rows) if i > 0]
        inference = [np.mean(list(rec["inference_ms_per_example"].values())) for rec in rows.values()]
        return {
            "method": self.cfg.method, "benchmark": self.cfg.benchmark, "order": self.cfg.order,
            "seed": self.cfg.seed, "model": self.cfg.model, "tasks": self.task_names,
            "task_aware": bool(method.task_aware or self.cfg.oracle_task_id),
            "joint_training": bool(method.joint_training),
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
            "data_manifest_digest": self.resolved["identity"]["data_manifest_digest"],
            "score_split": self.cfg.score_split or "test",
            "method_config": config_identity(self.method_cfg),
            "versions": versions(), "git_commit": git_commit(), "command": self.command,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x{os.cpu_count()}",
            "hardware": hardware(),  # CPU model/ISA, threads, GPU: numerics differ across these (provenance.py)
            # --general: per-benchmark delta (last stage - before) and its mean, read from the stored general rows
            **({"general": general_summary(self.store.general_rows())} if self.cfg.general else {}),
        }
