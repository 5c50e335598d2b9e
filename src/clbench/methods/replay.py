"""Experience replay on top of sequential LoRA: a fixed sample of every earlier task's training data is mixed in.

While training task t (0-based) the model fits ::

    D_t ∪ ⋃_{i<t} M_i,     M_i = a seeded sample of round(ρ · |D_i|) records of task i's TRAINING split (at least 1)

with one LoRA adapter carried through all tasks (as ``lora``) and the usual LM loss on the union (the harness's data
loader shuffles it). M_i is drawn once per task from (seed, i) and is the same at every later stage: a replay memory
that stores a fraction ρ (default 10%) of each finished task, not a fresh draw per stage. Only training splits are
ever read; eval and test records never enter the memory.

Reference point: TRACE's replay baseline mixes stored earlier-task data into later tasks; the size of the memory
varies across papers, so ρ is a knob.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch

from clbench.benchmark import Task
from clbench.registry import register_method

from .lora import LoRA, LoRAMethodConfig


@dataclass
class ReplayConfig(LoRAMethodConfig):
    """Replay knobs: the LoRA shape plus the memory size and its sampling seed."""

    replay_fraction: float = 0.1  # ρ: share of each earlier task's training split kept in the memory
    replay_seed: int | None = None  # seed of the memory draw; None = the run's seed

    def __post_init__(self) -> None:
        if not 0.0 <= self.replay_fraction <= 1.0:
            raise ValueError(f"replay_fraction must be in [0, 1], got {self.replay_fraction}")


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

    def train_examples(self, t: int, tasks: list[Task]) -> list[dict[str, Any]]:
        """Task t's training split followed by M_0, …, M_{t-1} (never an eval or test record)."""
        mixed = list(tasks[t].train)
        for i in range(t):
            mixed.extend(self.memory(i, tasks[i]))
        return mixed
