"""Per-task LoRA with the oracle task id: the no-forgetting reference (task-aware, not a CL method in the strict sense).

Task t trains its own adapter (A_t, B_t) (Hu et al., 2022, Eq. 3) and nothing else; at test time an example of task j
goes through adapter j only::

    y = W0 x + s B_j A_j x,     j = batch["task_id"] of the example (the oracle task id)

Earlier adapters are frozen after their task, so scores on a finished task never change (BWT = 0 up to
nondeterminism of the hardware). An adapter whose task has not been trained yet has B = 0: tasks not yet trained are
answered by the base model, so FWT measures nothing here. ``metrics.json`` records ``"task_aware": true`` and the
leaderboard flags the row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from clbench.benchmark import Task
from clbench.registry import register_method

from ._peft_tasks import TaskAdapters
from .lora import LoRAMethodConfig


@dataclass
class PerTaskLoRAConfig(LoRAMethodConfig):
    """Per-task LoRA knobs: the LoRA shape of every task's adapter (no other knobs)."""


@register_method("per-task-lora")
class PerTaskLoRA(TaskAdapters):
    """A separate LoRA per task, chosen by the oracle task id at test time (no-forgetting reference)."""

    config_class = PerTaskLoRAConfig
    task_aware = True

    def begin_task(self, t: int, task: Task) -> None:
        """Only task t's adapter is active and trainable (requires_grad set from scratch)."""
        super().begin_task(t, task)
        self.activate([t], train=t)

    def _restore_training_state(self) -> None:
        # generation switches adapters; put back what begin_task set so a later fit trains the right one
        if self.current_task >= 0:
            self.activate([self.current_task], train=self.current_task)
        else:
            self.activate([0], train=None)

    def served_lm(self) -> nn.Module:
        """For ``--general``: the adapter of the last task trained (adapter 0, still zero, before the first). A
        general-ability query belongs to no task, and this reference cannot answer without a task id; the model
        that served the newest task is what continual training has produced."""
        from clbench.general import ServedLM

        return ServedLM(self, task_id=max(self.current_task, 0))

    @torch.no_grad()
    def generate(self, batch: dict[str, torch.Tensor], max_new_tokens: int) -> torch.Tensor:
        """Greedy generation where each example uses its own task's adapter.

        The batch is split by ``task_id`` (the harness sends one task per loader, but a mixed batch is handled the
        same way); each group is generated with only its adapter active and the rows go back to their places.
        Groups are trimmed of the left-padding columns they do not need, so an example's output does not depend on
        which other tasks share its batch.
        """
        if "task_id" not in batch:
            raise RuntimeError("per-task-lora is task-aware: the batch must carry task_id")
        task_ids = batch["task_id"]
        pieces: list[tuple[torch.Tensor, torch.Tensor]] = []
        try:
            for j in torch.unique(task_ids).tolist():
                if not 0 <= j < self.num_tasks:
                    raise ValueError(f"task_id {j} out of range: the run has {self.num_tasks} tasks")
                rows = (task_ids == j).nonzero().squeeze(1)
                mask = batch["attention_mask"][rows]
                start = int(mask.any(0).nonzero()[0])  # left padding shared by every row of the group
                group = {"input_ids": batch["input_ids"][rows, start:], "attention_mask": mask[:, start:]}
                self.activate([j], train=None)
                pieces.append((rows, super().generate(group, max_new_tokens)))
        finally:
            self._restore_training_state()
        width = max(new.shape[1] for _, new in pieces)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        out = torch.full((task_ids.shape[0], width), pad, dtype=pieces[0][1].dtype, device=pieces[0][1].device)
        for rows, new in pieces:
            out[rows, : new.shape[1]] = new
        return out
