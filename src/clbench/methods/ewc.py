"""Elastic weight consolidation on the LoRA adapter (Kirkpatrick et al., 2017, PNAS, Eq. 3).

One LoRA adapter is trained through all tasks (as ``lora``); from the second task on the loss gets ::

    loss = LM loss + (λ/2) Σ_k F_k (θ_k − θ*_k)²

over the adapter parameters θ (every A and B). After task t (``end_task``):

    F_t  = (1/N) Σ_{n=1}^{N} (∂ ℓ_n / ∂θ)²      diagonal empirical Fisher: per-example squared gradients of the LM loss
                                                ℓ_n (mean NLL of example n's answer tokens), over N training examples
                                                from at most ``fisher_max_batches`` batches of task t's training loader
    F    ← γ F + F_t                            accumulated over tasks: a plain SUM for γ = 1 (default); γ < 1 is
                                                "online EWC" (Schwarz et al., 2018) that lets old Fisher terms decay
    θ*   ← θ after task t                       one anchor, the latest parameters

The sum of per-task Fisher matrices with the latest anchor is the Laplace approximation of the posterior after all
tasks (Huszár, 2018, "Note on the quadratic penalties in elastic weight consolidation"); Kirkpatrick et al. instead
keep one penalty per task with its own anchor. TRACE's EWC (model/Regular/EWC.py) uses λ = 400 (our default) and
accumulates the squared *batch* gradients seen during training; we use per-example gradients after training, which
is the empirical Fisher's definition and does not depend on the batch size. F and θ* live in buffers, so they are in
the checkpoint and survive a resume.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from clbench.benchmark import Task
from clbench.registry import register_method

from ._importance import mean_squared_gradients
from .lora import LoRA, LoRAMethodConfig


@dataclass(kw_only=True)
class EWCConfig(LoRAMethodConfig):
    """EWC knobs: the LoRA shape plus the penalty weight and how the Fisher is estimated and accumulated."""

    ewc_lambda: float  # λ in (λ/2) Σ F (θ − θ*)² (TRACE: lambda_ewc = 400)
    fisher_max_batches: int  # training batches per task for the Fisher pass (0 = the whole loader)
    fisher_decay: float  # γ in F ← γ F + F_t: 1 = sum over tasks, < 1 = online EWC

    def __post_init__(self) -> None:
        if self.ewc_lambda < 0:
            raise ValueError(f"ewc_lambda must be >= 0, got {self.ewc_lambda}")
        if self.fisher_max_batches < 0:
            raise ValueError(f"fisher_max_batches must be >= 0, got {self.fisher_max_batches}")
        if not 0.0 <= self.fisher_decay <= 1.0:
            raise ValueError(f"fisher_decay must be in [0, 1], got {self.fisher_decay}")


def _buffer_key(param_name: str) -> str:
    return param_name.replace(".", "__")  # buffer names may not contain dots


@register_method("ewc")
class EWC(LoRA):
    """LoRA plus the EWC penalty (λ/2) Σ F (θ − θ*)² with a diagonal Fisher accumulated over tasks."""

    config_class = EWCConfig
    end_task_on_training_device = True  # the Fisher pass is a backward per example

    def __init__(self, model: nn.Module, tokenizer: Any, cfg: EWCConfig, num_tasks: int):
        super().__init__(model, tokenizer, cfg, num_tasks)
        self.ewc_names = [n for n, _ in self.model.named_parameters() if "lora_" in n]
        # Registered now, zero, so that a resumed run can load them (load_checkpoint_state refuses unknown names).
        self.ewc_fisher = nn.Module()
        self.ewc_anchor = nn.Module()
        params = dict(self.model.named_parameters())
        for name in self.ewc_names:
            zeros = torch.zeros_like(params[name], dtype=torch.float32)
            self.ewc_fisher.register_buffer(_buffer_key(name), zeros.clone())
            self.ewc_anchor.register_buffer(_buffer_key(name), zeros.clone())
        self.register_buffer("ewc_tasks_done", torch.zeros((), dtype=torch.long))

    # ---- state --------------------------------------------------------------------------------------------------
    def fisher(self) -> dict[str, torch.Tensor]:
        """The accumulated diagonal Fisher F by adapter parameter name."""
        return {n: getattr(self.ewc_fisher, _buffer_key(n)) for n in self.ewc_names}

    def anchor(self) -> dict[str, torch.Tensor]:
        """The anchor θ* (adapter parameters after the last finished task) by parameter name."""
        return {n: getattr(self.ewc_anchor, _buffer_key(n)) for n in self.ewc_names}

    # ---- loss ---------------------------------------------------------------------------------------------------
    def penalty(self) -> torch.Tensor:
        """(λ/2) Σ_k F_k (θ_k − θ*_k)² over every adapter parameter (0 before the first task is finished)."""
        params = dict(self.model.named_parameters())
        fisher, anchor = self.fisher(), self.anchor()
        total = sum((fisher[n] * (params[n].float() - anchor[n]).pow(2)).sum() for n in self.ewc_names)
        return 0.5 * self.cfg.ewc_lambda * total

    def regularizer(self, batch: dict[str, torch.Tensor], out: Any) -> dict[str, torch.Tensor]:
        """``ewc`` = :meth:`penalty`, from the second task on."""
        if int(self.ewc_tasks_done) == 0 or self.cfg.ewc_lambda == 0:
            return {}
        return {"ewc": self.penalty()}

    # ---- Fisher -------------------------------------------------------------------------------------------------
    def estimate_fisher(self, loader: Any) -> dict[str, torch.Tensor]:
        """F_t = mean over examples of the squared per-example gradient of the LM loss, for each adapter parameter.

        Reads at most ``fisher_max_batches`` batches of ``loader`` (collated training batches: input_ids,
        attention_mask, labels; under DDP per rank, pooled over ranks); dropout is off (eval mode) so the estimate is
        deterministic.
        """
        params = dict(self.model.named_parameters())
        targets = [params[n] for n in self.ewc_names]
        means = mean_squared_gradients(self, self.model, targets, loader, self.cfg.fisher_max_batches, per_example=True)
        return dict(zip(self.ewc_names, means, strict=True))

    def end_task(self, t: int, task: Task, train_loader: Any = None) -> None:
        """F ← γ F + F_t and θ* ← θ, written into the buffers (so they are checkpointed); on the training device."""
        if train_loader is None:
            raise RuntimeError("EWC needs the task's training loader in end_task to estimate the Fisher")
        params = dict(self.model.named_parameters())
        for name in self.ewc_names:  # the adapter trains in every task, but set it explicitly: autograd.grad needs it
            params[name].requires_grad_(True)
        new = self.estimate_fisher(train_loader)
        fisher, anchor = self.fisher(), self.anchor()
        with torch.no_grad():
            for name in self.ewc_names:
                fisher[name].mul_(self.cfg.fisher_decay).add_(new[name])
                anchor[name].copy_(params[name].detach().float())
            self.ewc_tasks_done += 1
