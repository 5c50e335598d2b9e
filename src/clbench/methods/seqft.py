"""SeqFT: full fine-tuning of every base weight, task after task (the classic lower bound for forgetting)."""

from __future__ import annotations

from dataclasses import dataclass

from clbench.method import CLMethod, MethodConfig
from clbench.registry import register_method


@dataclass(kw_only=True)
class SeqFTConfig(MethodConfig):
    """Full fine-tuning has only the common knobs (its smaller lr is in configs/methods/seqft.yaml)."""


@register_method("seqft")
class SeqFT(CLMethod):
    """All base weights trainable for every task: θ_t = argmin L_t(θ) starting from θ_{t-1}."""

    config_class = SeqFTConfig

    def begin_task(self, t, task) -> None:
        """Every base weight trains."""
        super().begin_task(t, task)
        for param in self.model.parameters():
            param.requires_grad_(True)
