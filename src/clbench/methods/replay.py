"""Experience replay on top of sequential LoRA: a fixed sample of every earlier task's training data is mixed in.

While training task t (0-based) the model fits ::

    D_t ∪ ⋃_{i<t} M_i,     M_i = a seeded sample of round(ρ · |D_i|) records of task i's TRAINING split (at least 1)

with one LoRA adapter carried through all tasks (as ``lora``) and the usual LM loss on the union (the harness's data
loader shuffles it). M_i is drawn once per task from (seed, i) and is the same at every later stage: a replay memory
that stores a fraction ρ (default 10%) of each finished task, not a fresh draw per stage. Only training splits are
ever read; eval and test records never enter the memory.

TRACE's replay (``training/replay.py`` @462e39f) schedules it differently, offered as ``schedule: trace``: task t
trains on D_t alone, then one extra epoch runs over the FIRST ⌊ρ · |D_i|⌋ training records of every earlier task
i < t (plus a general instruction set, LIMA, which we do not ship: it is left out). Our default, ``schedule: mixed``,
mixes a random ρ-sample into task t's own batches, which is the rehearsal of Chaudhry et al. (2019) and most CL papers.
The two differ in when earlier tasks are seen (interleaved vs a block after the task) and in which records (random vs
the file's first ones), so their numbers differ; pick ``trace`` to compare with TRACE's tables.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch

from clbench.benchmark import Task
from clbench.registry import register_method

from .lora import LoRA, LoRAMethodConfig


@dataclass(kw_only=True)
class ReplayConfig(LoRAMethodConfig):
    """Replay knobs: the LoRA shape plus the memory size and its sampling seed."""

    replay_fraction: float  # ρ: share of each earlier task's training split kept in the memory
    replay_seed: int | None  # seed of the memory draw; None = the run's seed
    # "mixed": memories shuffled into task t's batches; "trace": TRACE's schedule, a separate 1-epoch pass over the
    # first ⌊ρ·n⌋ records of each earlier task after task t (see the module docstring)
    schedule: str

    def __post_init__(self) -> None:
        if not 0.0 <= self.replay_fraction <= 1.0:
            raise ValueError(f"replay_fraction must be in [0, 1], got {self.replay_fraction}")
        if self.schedule not in ("mixed", "trace"):
            raise ValueError(f"schedule must be 'mixed' or 'trace', got {self.schedule!r}")


@register_method("replay")
class Replay(LoRA):
    """LoRA plus a replay memory of a fraction of every earlier task's training data (default 10%)."""

    config_class = ReplayConfig

    def __init__(self, model: torch.nn.Module, tokenizer: Any, cfg: ReplayConfig, num_tasks: int):
        super().__init__(model, tokenizer, cfg, num_tasks)
        # The harness seeds torch with the run's seed right before building the method (in a fresh and in a resumed
        # run alike), so this is the run seed and the memory differs between seeds of a multi-seed comparison.
        self.replay_seed = cfg.replay_seed if cfg.replay_seed is not None else torch.initial_seed()

    def memory_size(self, n_train: int) -> int:
        """round(ρ · n_train) records, at least one when ρ > 0 (a tiny task still gets replayed)."""
        fraction = self.cfg.replay_fraction
        return 0 if fraction == 0 else min(n_train, max(1, round(fraction * n_train)))

    def memory(self, i: int, task: Task) -> list[dict[str, Any]]:
        """M_i, the replayed records of task ``i``: a function of (seed, i, task name), the same at every stage."""
        rng = random.Random(f"{self.replay_seed}:{i}:{task.name}")  # str seeds are hashed deterministically
        picked = sorted(rng.sample(range(len(task.train)), self.memory_size(len(task.train))))
        return [task.train[k] for k in picked]

    def trace_memory(self, task: Task) -> list[dict[str, Any]]:
        """TRACE's memory of a task: its first ⌊ρ · n⌋ training records (``utils/data/data_utils.py``)."""
        return task.train[: int(len(task.train) * self.cfg.replay_fraction)]

    def train_examples(self, t: int, tasks: list[Task]) -> list[dict[str, Any]]:
        """Task t's training split followed by M_0, …, M_{t-1} (never an eval or test record); TRACE's schedule
        trains task t alone here and replays in :meth:`second_pass_examples`."""
        mixed = list(tasks[t].train)
        if self.cfg.schedule == "mixed":
            for i in range(t):
                mixed.extend(self.memory(i, tasks[i]))
        return mixed

    def second_pass_examples(self, t: int, tasks: list[Task]) -> list[dict[str, Any]]:
        """``schedule: trace``: one epoch over the TRACE memories of tasks 0..t-1 after task t; else nothing."""
        if self.cfg.schedule != "trace":
            return []
        return [record for i in range(t) for record in self.trace_memory(tasks[i])]
