"""LoRA trained sequentially: one peft adapter carried through every task (Hu et al., 2022, Eq. 3).

For a target linear with frozen weight W0: ``y = W0 x + (alpha / r) B A x``, A ∈ R^{r×d_in}, B ∈ R^{d_out×r}, B = 0 at
start. The same (A, B) is trained on task after task, so nothing protects earlier tasks: the forgetting baseline.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from peft import LoraConfig, get_peft_model

from clbench.method import CLMethod, MethodConfig
from clbench.registry import register_method


@dataclass
class LoRAMethodConfig(MethodConfig):
    """LoRA knobs (peft's names)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


@register_method("lora")
class LoRA(CLMethod):
    """One LoRA adapter (peft) on the target modules, trained through all tasks."""

    config_class = LoRAMethodConfig

    def __init__(self, model, tokenizer, cfg: LoRAMethodConfig, num_tasks: int):
        super().__init__(model, tokenizer, cfg, num_tasks)
        peft_cfg = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                              target_modules=list(cfg.target_modules), task_type="CAUSAL_LM")
        self.model = get_peft_model(model, peft_cfg)

    def begin_task(self, t, task) -> None:
        """Only the adapter trains (set from scratch, as the contract asks)."""
        super().begin_task(t, task)
        for name, param in self.model.named_parameters():
            param.requires_grad_("lora_" in name)
