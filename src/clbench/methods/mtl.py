"""Multi-task learning: the joint-training upper reference (not a continual-learning method).

One LoRA adapter (Hu et al., 2022, Eq. 3; ``y = W0 x + s B A x``) is trained once on the union of every task's
training split, shuffled together::

    min_θ  Σ_{t=1}^{T} Σ_{(x, y) ∈ D_t} ℓ(x, y; θ)

``joint_training = True`` makes the harness run a single stage (t = T−1) whose ``train_examples`` returns all tasks,
so R has the zero-shot row and one trained row (the rows in between are empty and BWT / FWT are undefined: only OP
is meant to be compared). ``metrics.json`` records ``"joint_training": true`` and the leaderboard flags the row.

Our reading where TRACE is silent on details: the epoch count of the single stage is the harness's (``--epochs`` or
the last task's epochs from the benchmark); every task's examples are weighted by their count (no re-balancing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from clbench.benchmark import Task
from clbench.registry import register_method

from .lora import LoRA, LoRAMethodConfig


@dataclass
class MTLConfig(LoRAMethodConfig):
    """MTL knobs: the LoRA shape (no other knobs)."""


@register_method("mtl")
class MTL(LoRA):
    """Multi-task upper reference: one LoRA trained once on all tasks' training data mixed."""

    config_class = MTLConfig
    joint_training = True

    def train_examples(self, t: int, tasks: list[Task]) -> list[dict[str, Any]]:
        """Every task's training split, concatenated (the harness's loader shuffles them together)."""
        return [record for task in tasks for record in task.train]
