"""One row of R: the method generates for every asked task's scored split and each task is scored.

:func:`evaluate_row` returns a :class:`RowResult` and writes nothing: the store records it (predictions, state, row:
:meth:`clbench.results.RunStore.record_row`) and only on rank 0, which the harness decides.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import lightning as L

from clbench.benchmark import Task
from clbench.datamodule import LoaderSettings, TaskDataModule
from clbench.provenance import peak_memory_mb
from clbench.scores import score

if TYPE_CHECKING:
    from clbench.method import CLMethod


@dataclass
class RowResult:
    """What one row's evaluation measured, by task name; tasks it skipped are absent (NaN in R)."""

    scores: dict[str, float]
    extra_scores: dict[str, dict[str, float]]  # metric -> task -> value (a method's evaluation_report)
    inference_ms_per_example: dict[str, float]
    eval_seconds: float
    predictions: dict[str, list[dict[str, str]]]  # task -> [{"prompt", "answer", "prediction"}] in file order
    peak_memory_mb: float  # peak memory of the process up to the end of this row

    def record(self, label: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """The row's record in ``progress.json`` (``extra``: training stats of the task just trained)."""
        return {"label": label, "scores": self.scores, "extra_scores": self.extra_scores,
                "inference_ms_per_example": self.inference_ms_per_example, "eval_seconds": self.eval_seconds,
                "peak_memory_mb": self.peak_memory_mb, **(extra or {})}


def evaluate_row(trainer: L.Trainer, method: CLMethod, tasks: list[Task], *, columns: set[int], split: str,
                 loaders: LoaderSettings, gives_task_id: bool, max_new_tokens: int | None) -> RowResult:
    """Generate for and score ``split`` ("test" or "eval") of each task whose index is in ``columns``.

    Batches carry ``task_id`` only when ``gives_task_id`` (task-aware methods, ``--oracle-task-id``); every task
    generates ``max_new_tokens`` tokens at most, or its own budget when that is None.
    """
    scores: dict[str, float] = {}
    timings: dict[str, float] = {}
    extra_scores: dict[str, dict[str, float]] = {}
    predictions: dict[str, list[dict[str, str]]] = {}
    eval_seconds = 0.0
    for j, task in enumerate(tasks):
        if j not in columns:  # --eval-rows needed: R[row, j] stays NaN (no metric reads it)
            continue
        records = getattr(task, split)
        data = TaskDataModule(loaders, predict=records, max_new_tokens=max_new_tokens or task.spec.max_new_tokens,
                              task_id=j if gives_task_id else None)
        started = time.perf_counter()
        trainer.predict(method, datamodule=data, return_predictions=False)
        elapsed = time.perf_counter() - started
        eval_seconds += elapsed
        timings[task.name] = 1000 * elapsed / len(records)
        preds = method.collected_predictions()
        answers = [r["answer"] for r in records]
        prompts = [r["prompt"] for r in records]
        scores[task.name] = score(task.spec.metric, preds, answers, prompts)
        for metric, value in method.evaluation_report(j, task).items():
            extra_scores.setdefault(metric, {})[task.name] = value
        predictions[task.name] = [{"prompt": p, "answer": a, "prediction": y}
                                  for p, a, y in zip(prompts, answers, preds, strict=True)]
    return RowResult(scores, extra_scores, timings, eval_seconds, predictions, peak_memory_mb())
