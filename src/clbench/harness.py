"""The continual-learning loop: one Lightning fit per task, every task evaluated after each, resumable.

::

    R[0, :] = evaluate every task zero-shot            (skipped with zero_shot=False)
    for t, task in order:                              (tasks whose row is on disk are skipped: resume)
        method.begin_task(t, task); Trainer.fit(method, task data); method.finish_task(t, task)  (runs end_task)
        R[t+1, :] = evaluate every task's test split   (task-agnostic: no task id unless the method is task-aware)
        checkpoint the method state, then record row t+1 (atomic writes)

Each step has its own module: the plan of the run (method, checks, tasks, identity, folder, seeds) in
:mod:`clbench.run_plan`, the loaders in :mod:`clbench.datamodule`, the Trainers in :mod:`clbench.trainer_factory`, a
row of R in :mod:`clbench.evaluation`, the run folder and its write order in :mod:`clbench.results`, metrics.json in
:mod:`clbench.run_metrics`. This module is the loop, run on every rank; only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
import torch
from lightning.pytorch.utilities import rank_zero_only
from rich.console import Console

from clbench.datamodule import LoaderSettings, TaskDataModule
from clbench.evaluation import evaluate_row
from clbench.method import CLMethod
from clbench.models import load_model
from clbench.provenance import slow_precision_warning
from clbench.results import RunStore
from clbench.run_config import (  # noqa: F401  (RunConfig, load_run_config, FROZEN_DTYPES: re-exported for callers)
    FROZEN_DTYPES,
    RunConfig,
    frozen_torch_dtype,
    load_run_config,
)
from clbench.run_metrics import run_metrics
from clbench.run_plan import RunPlan, runs_on_cpu
from clbench.trainer_factory import ThroughputMeter, fit_trainer, make_trainer, quiet_lightning

console = Console(stderr=True)


def is_rank_zero() -> bool:
    """True in the process that writes results (Lightning sets the rank from the launcher's environment)."""
    return rank_zero_only.rank == 0


def say(*args: Any, rule: bool = False) -> None:
    """Print on rank 0 only, so multi-process runs do not repeat every line."""
    if is_rank_zero():
        (console.rule if rule else console.print)(*args)


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
        self.plan = plan = RunPlan.build(cfg, method_overrides)  # every check, before any model loads
        # what callers read without running: sweep plans folders and task counts, tests build the method as a run
        self.method_cls, self.method_cfg, self.tasks = plan.method_cls, plan.method_cfg, plan.tasks
        self.resolved, self.run_dir, self.task_seed = plan.resolved, plan.run_dir, plan.task_seed
        self.store = RunStore(self.run_dir)

    def run(self) -> Path:
        """Train through the order (resuming after the last finished task) and write the run folder.

        Rank 0 holds the folder's exclusive lock for the whole run, so a second process started on the same folder
        fails at once with one line naming the holder instead of writing beside it.
        """
        quiet_lightning()
        self.store.check_same_config(self.resolved)
        if not self.store.finished:
            with self.store.locked() if is_rank_zero() else contextlib.nullcontext():
                if not self.store.finished:  # another process may have finished it while we checked
                    return self._run_unlocked()
        show_finished(self.run_dir)
        return self.run_dir

    def _run_unlocked(self) -> Path:
        cfg, plan, store = self.cfg, self.plan, self.store
        loaded = load_model(cfg.model)
        loaders = LoaderSettings(loaded.tokenizer, plan.max_prompt_len, plan.max_answer_len, cfg.batch_size,
                                 cfg.eval_batch_size)
        L.seed_everything(cfg.seed, verbose=False)
        method = plan.method_cls(loaded.model, loaded.tokenizer, plan.method_cfg, num_tasks=len(plan.tasks))
        resuming = store.claim(self.resolved, write=is_rank_zero())
        rows = store.rows()
        stages = plan.stages()
        done_stages = [t for t in stages if t + 1 in rows]
        if done_stages:
            self._restore(method, stages, done_stages[-1])
        if resuming:
            say(f"[yellow]resuming[/] {self.run_dir}: {len(done_stages)} of {len(stages)} tasks done")
        else:
            say(f"[bold]clbench run[/] {cfg.method} on {cfg.benchmark} order {cfg.order} seed {cfg.seed}"
                f" -> {self.run_dir}")
        warning = slow_precision_warning(cfg.precision, runs_on_cpu(cfg))
        if warning:
            say(f"[yellow]warning[/]: {warning}")

        if cfg.zero_shot and 0 not in rows:
            self._evaluate(method, loaders, row=0, label="zero-shot")
        # general ability before any training; after a resume, the last finished stage's if it was not stored
        self._general(method, loaders, done_stages[-1] + 1 if done_stages else 0)
        trained_now = 0
        for t in stages:
            if t + 1 in rows:
                continue
            if cfg.stop_after is not None and trained_now >= cfg.stop_after:
                say(f"[yellow]stopping after {trained_now} task(s) as asked[/]; rerun the same command to resume")
                return self.run_dir
            trained_now += 1
            task = plan.tasks[t]
            say(f"task {t + 1}/{len(plan.tasks)}: {task.name}", rule=True)
            started = time.perf_counter()
            self._begin(method, t)
            train_stats = self._fit(method, loaders, t)
            train_seconds = time.perf_counter() - started
            self._evaluate(method, loaders, row=t + 1, label=f"after {task.name}",
                           extra={"train": train_stats, "train_seconds": train_seconds,
                                  "params": method.param_report()},
                           state=method.checkpoint_state())
            self._general(method, loaders, t + 1)
        if is_rank_zero():
            metrics = run_metrics(plan, store.rows(), store.general_rows(), self.command)
            method.write_artifacts(self.run_dir)
            store.finish(metrics)
            say(f"[green]done[/] OP {metrics['OP']:.4f}  BWT {metrics['BWT']:.4f}  FWT {metrics['FWT']:.4f}"
                f"  -> {self.run_dir}")
        return self.run_dir

    def _begin(self, method: CLMethod, t: int) -> None:
        """Task t's seed, begin_task and (``--frozen-dtype``) the frozen weights' dtype: the same in a fresh run and
        in the replay of a resume."""
        L.seed_everything(self.plan.task_seed(t), verbose=False)
        method.begin_task(t, self.plan.tasks[t])
        dtype = frozen_torch_dtype(self.cfg.frozen_dtype, self.cfg.precision)
        if dtype is not None:
            method.store_frozen_linears(dtype)

    def _restore(self, method: CLMethod, stages: list[int], last_done: int) -> None:
        for t in stages:
            if t > last_done:
                break
            self._begin(method, t)
        method.load_checkpoint_state(self.store.load_state(last_done + 1))

    def _fit(self, method: CLMethod, loaders: LoaderSettings, t: int) -> dict[str, Any]:
        plan, task = self.plan, self.plan.tasks[t]
        examples = method.train_examples(t, plan.tasks)
        meter = ThroughputMeter()
        epochs = plan.epochs(task)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        data = TaskDataModule(loaders, train=examples, seed=plan.task_seed(t))
        trainer = fit_trainer(self.cfg, plan.method_cls, self.run_dir, epochs, f"task-{t + 1}", meter)
        trainer.fit(method, datamodule=data)
        # an optional second pass of one epoch (TRACE's replay schedule revisits earlier tasks after each task)
        second = method.second_pass_examples(t, plan.tasks)
        if second:
            fit_trainer(self.cfg, plan.method_cls, self.run_dir, 1, f"task-{t + 1}-second-pass", meter).fit(
                method, datamodule=TaskDataModule(loaders, train=second, seed=plan.second_pass_seed(t)))
        # with frozen weights in bf16/fp16, end_task's own forwards (Fisher, importance, keys) must run under the
        # run's autocast too, as training did; fp32 runs keep their exact behaviour
        context = trainer.precision_plugin.forward_context() if self.cfg.frozen_dtype else contextlib.nullcontext()
        method.finish_task(t, task, train_loader=data.train_loader, forward_context=context)
        return {**meter.summary(), "examples": len(examples), "epochs": epochs,
                **({"second_pass_examples": len(second)} if second else {})}

    def _evaluate(self, method: CLMethod, loaders: LoaderSettings, row: int, label: str,
                  extra: dict[str, Any] | None = None, state: dict[str, torch.Tensor] | None = None) -> None:
        plan = self.plan
        result = evaluate_row(make_trainer(self.cfg, plan.method_cls, logger=False), method, plan.tasks,
                              columns=plan.columns(row), split=plan.score_split, loaders=loaders,
                              gives_task_id=plan.gives_task_id, max_new_tokens=self.cfg.max_new_tokens)
        if is_rank_zero():
            self.store.record_row(row, result.record(label, extra), plan.task_names, result.predictions, state)
        say(f"[cyan]{label}[/]: " + "  ".join(f"{k} {v:.3f}" for k, v in result.scores.items()))

    def _general(self, method: CLMethod, loaders: LoaderSettings, stage: int) -> None:
        """Score the general-ability suite at ``stage`` (0 = before the first task, i = after row i of R) when
        ``--general`` asks for that stage and it is not stored yet (resume never re-evaluates); rank 0 only, on the
        run's accelerator and under its autocast, as R is scored."""
        label = self.plan.general_label(stage)
        if label is None or not is_rank_zero() or stage in self.store.general_rows():
            return
        from clbench.general import evaluate_general

        use_gpu = not runs_on_cpu(self.cfg) and torch.cuda.is_available()  # the same rule the Trainer follows
        home = next(method.parameters()).device
        method.to(torch.device("cuda") if use_gpu else torch.device("cpu"))
        try:
            with make_trainer(self.cfg, self.plan.method_cls, logger=False).precision_plugin.forward_context():
                result = evaluate_general(method, loaders.tokenizer, self.cfg.general,
                                          progress=self.cfg.progress)
        finally:
            method.to(home)
        self.store.add_general_row(stage, {"label": label, "benchmarks": result.benchmarks, "scores": result.scores,
                                           "seconds": result.seconds, "lm_eval": result.lm_eval_version,
                                           "settings": result.settings, "examples": result.examples})
        line = "  ".join(f"{k} {v:.3f}" for k, v in result.benchmarks.items())
        say(f"[magenta]general {label}[/] ({result.seconds:.0f} s): {line}")
