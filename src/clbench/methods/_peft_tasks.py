"""One peft LoRA adapter per task inside one model, shared by ``olora`` and ``per-task-lora``.

All ``num_tasks`` adapters are created up front (named ``task0`` … ``task{T-1}``, 0-based like the harness's ``t``)
so that the parameter set never changes during a run: resume is then "construct, replay ``begin_task`` for the
finished tasks, load the checkpoint", and every adapter has the same initial values in a fresh and a resumed run
(they are drawn right after the harness seeds the run).

For a target linear with frozen weight W0 and the set S of *active* adapters, peft computes

    y = W0 x + Σ_{i ∈ S} s B_i A_i x,      s = alpha / r,  A_i ∈ R^{r×d_in},  B_i ∈ R^{d_out×r} (B_i = 0 at start)

Adapters outside S are skipped by peft's layer loop, so they contribute nothing. An adapter whose task has not been
trained yet has B = 0 and is exactly the base model.

Trap this module handles (verified with peft 0.21): ``set_adapter`` / ``enable_adapter_layers`` switch
``requires_grad`` back on for the adapters they activate. :meth:`TaskAdapters.activate` therefore activates with
``inference_mode=True`` (everything frozen) and only then unfreezes the one adapter that should train.
"""

from __future__ import annotations

from typing import Any

from peft import get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from clbench.method import CLMethod

from .lora import LoRAMethodConfig


class TaskAdapters(CLMethod):
    """Base class: ``num_tasks`` named peft LoRA adapters on the target modules; subclasses choose which are active.

    Not registered (no ``@register_method``): it is a building block, not a method.
    """

    config_class = LoRAMethodConfig

    @staticmethod
    def adapter_name(t: int) -> str:
        """peft adapter name of task ``t`` (0-based)."""
        return f"task{t}"

    def __init__(self, model: nn.Module, tokenizer: Any, cfg: LoRAMethodConfig, num_tasks: int):
        super().__init__(model, tokenizer, cfg, num_tasks)
        lora = cfg.peft_config()
        self.model = get_peft_model(model, lora, adapter_name=self.adapter_name(0))
        for t in range(1, num_tasks):
            self.model.add_adapter(self.adapter_name(t), lora)
        # Before any task (the zero-shot row) only task 0's adapter is active, and its B = 0: the base model.
        self.activate([0], train=None)

    # ---- adapters ---------------------------------------------------------------------------------------------
    def activate(self, tasks: list[int], train: int | None) -> None:
        """Make the adapters of ``tasks`` active (summed in every target layer) and only ``train``'s trainable.

        Sets ``requires_grad`` for every parameter from scratch, as the contract's ``begin_task`` needs.
        """
        self.model.base_model.set_adapter([self.adapter_name(t) for t in tasks], inference_mode=True)
        # set_adapter touched only adapter weights; freeze everything else too, then unfreeze one adapter.
        trainable = set(self.adapter_parameters(train)) if train is not None else set()
        for name, param in self.model.named_parameters():
            param.requires_grad_(name in trainable)

    def active_tasks(self) -> list[int]:
        """Task indices of the adapters peft currently sums (read back from the first LoRA layer)."""
        layer = self.lora_layers()[0]
        return sorted(int(name.removeprefix("task")) for name in layer.active_adapters)

    def adapter_parameters(self, t: int) -> dict[str, nn.Parameter]:
        """Every LoRA weight (A and B, every target layer) of task ``t``'s adapter, by parameter name."""
        tag = f".{self.adapter_name(t)}."  # the dots keep task1 from matching task10
        return {n: p for n, p in self.model.named_parameters() if "lora_" in n and tag in n}

    def lora_layers(self) -> list[LoraLayer]:
        """The peft LoRA layers (one per target linear)."""
        return [m for m in self.model.modules() if isinstance(m, LoraLayer)]

    # ---- bookkeeping ------------------------------------------------------------------------------------------
    def param_report(self) -> dict[str, int]:
        """As the base class, but ``added`` counts only the adapters of tasks begun so far (1 per task) and
        ``total`` is base + added (what a deployment stores).

        The adapters of later tasks exist from the start (see the module docstring) but are inactive and B = 0.
        """
        report = super().param_report()
        per_adapter = sum(p.numel() for p in self.adapter_parameters(0).values())
        report["added"] = per_adapter * max(self.current_task + 1, 0)
        report["total"] = self.base_param_count + report["added"]
        return report
