"""LoRA trained sequentially: one peft adapter carried through every task (Hu et al., 2022, Eq. 3).

For a target linear with frozen weight W0: ``y = W0 x + (alpha / r) B A x``, A ∈ R^{r×d_in}, B ∈ R^{d_out×r}, B = 0 at
start. The same (A, B) is trained on task after task, so nothing protects earlier tasks: the forgetting baseline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from peft import LoraConfig, get_peft_model

from clbench.method import CLMethod, MethodConfig
from clbench.registry import register_method


@dataclass(kw_only=True)
class LoRAMethodConfig(MethodConfig):
    """LoRA knobs (peft's names)."""

    # TRACE's adapter for its LoRA, O-LoRA and OGD baselines: LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1)
    # (training/main.py @462e39f). One default everywhere, so a trace-mini number and a TRACE number use one adapter.
    r: int
    alpha: int
    dropout: float
    target_modules: list[str]
    layers: list[int] | None  # decoder layers to adapt (peft's layers_to_transform); None = all
    # added after the published runs (which all adapt every layer); unset, it keeps their folders' identity
    identity_if_set: ClassVar[tuple[str, ...]] = ("layers",)

    def peft_config(self) -> LoraConfig:
        """The peft ``LoraConfig`` these knobs describe (one place, so every LoRA-based method reads them alike)."""
        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=list(self.target_modules), task_type="CAUSAL_LM",
                          layers_to_transform=list(self.layers) if self.layers is not None else None)


@register_method("lora")
class LoRA(CLMethod):
    """One LoRA adapter (peft) on the target modules, trained through all tasks."""

    config_class = LoRAMethodConfig

    def __init__(self, model, tokenizer, cfg: LoRAMethodConfig, num_tasks: int):
        super().__init__(model, tokenizer, cfg, num_tasks)
        self.model = get_peft_model(model, cfg.peft_config())

    def begin_task(self, t, task) -> None:
        """Only the adapter trains (set from scratch, as the contract asks)."""
        super().begin_task(t, task)
        for name, param in self.model.named_parameters():
            param.requires_grad_("lora_" in name)
