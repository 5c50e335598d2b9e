"""O-LoRA: a new LoRA per task, earlier ones frozen, the new A kept orthogonal to the old ones.

Wang et al., 2023, "Orthogonal Subspace Learning for Language Model Continual Learning" (EMNLP Findings,
arXiv 2310.14152). For a target linear with frozen weight W0, while training task t (0-based, as the harness counts)::

    y    = W0 x + s Σ_{i≤t} B_i A_i x                                   (adapters 0..t summed; i < t frozen)
    loss = LM loss + λ1 Σ_{i<t} Σ_{j,k} |(A_i A_tᵀ)[j,k]| + λ2 ‖(A_t, B_t)‖²

summed over every target layer. ``A_i A_tᵀ`` (r × r) holds the inner products of the rows of the two down-projections;
it is zero exactly when the subspaces they read from x are orthogonal. The paper's L_orth squares the entries of
O_{i,t} = A_iᵀ A_t (its notation has A as d × r); its official code and TRACE's copy of it sum absolute values, as we
do (λ1 = 0.5, λ2 = 0 are TRACE's defaults). Inference is task-agnostic: all learned adapters stay summed.

TRACE's ``model/Regular/O_LoRA.py`` reads parameters named ``loranew_A``, which stock peft never creates; TRACE's
``training/main.py`` builds its O-LoRA models with its own peft copy (``utils.my_peft``), whose LoRA layer creates
``loranew_A/B``, so in TRACE's pipeline the term is live (not zero). It differs from ours on task 1 only: TRACE's
frozen first ``lora_A`` is random (its ``lora_B`` zero), and the penalty already applies against it.
``tests/test_olora.py`` checks that our term is non-zero for non-orthogonal A and trains only A_t.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from clbench.benchmark import Task
from clbench.registry import register_method

from ._peft_tasks import TaskAdapters
from .lora import LoRAMethodConfig


@dataclass(kw_only=True)
class OLoRAConfig(LoRAMethodConfig):
    """O-LoRA knobs: the LoRA shape of every task's adapter plus the two loss weights."""

    lambda_orth: float  # λ1, weight of Σ |A_i A_tᵀ| (TRACE: lamda_1 = 0.5)
    lambda_l2: float  # λ2, weight of ‖(A_t, B_t)‖² (TRACE: lamda_2 = 0)

    def __post_init__(self) -> None:
        if self.lambda_orth < 0 or self.lambda_l2 < 0:
            raise ValueError("lambda_orth and lambda_l2 must be >= 0")


@register_method("olora")
class OLoRA(TaskAdapters):
    """O-LoRA (Wang et al., 2023): one LoRA per task, earlier ones frozen, orthogonality loss on the A matrices."""

    config_class = OLoRAConfig

    def begin_task(self, t: int, task: Task) -> None:
        """Sum adapters 0..t; only task t's (A_t, B_t) trains (requires_grad set from scratch)."""
        super().begin_task(t, task)
        self.activate(list(range(t + 1)), train=t)

    def orthogonality_loss(self, t: int | None = None) -> torch.Tensor:
        """Σ_layers Σ_{i<t} Σ_{j,k} |A_i A_tᵀ|[j,k] (un-weighted); 0 for the first task.

        Gradients reach only A_t: earlier A_i are frozen (requires_grad False), so they act as constants.
        """
        t = self.current_task if t is None else t
        layers = self.lora_layers()
        device = layers[0].lora_A[self.adapter_name(0)].weight.device
        total = torch.zeros((), device=device)
        if t <= 0:
            return total
        # fp32 outside autocast: cheap next to the LM forward, and a sum of |·| over t·r² entries per layer loses
        # precision in bf16 (8 mantissa bits) as the overlaps shrink towards 0
        with torch.autocast(device_type=device.type, enabled=False):
            for layer in layers:
                new = layer.lora_A[self.adapter_name(t)].weight.float()  # (r, d_in)
                # every earlier A stacked, so all i < t take one (t·r × r) product: (t·r, d_in)
                old = torch.cat([layer.lora_A[self.adapter_name(i)].weight.float() for i in range(t)])
                total = total + (old @ new.T).abs().sum()
        return total

    def l2_loss(self, t: int | None = None) -> torch.Tensor:
        """‖(A_t, B_t)‖²: sum of squares of task t's adapter weights over every target layer (un-weighted)."""
        t = self.current_task if t is None else t
        return sum(p.float().pow(2).sum() for p in self.adapter_parameters(t).values())

    def regularizer(self, batch: dict[str, torch.Tensor], out: Any) -> dict[str, torch.Tensor]:
        """``orth`` = λ1 · :meth:`orthogonality_loss` (from task 2 on) and ``l2`` = λ2 · :meth:`l2_loss` (if λ2 > 0)."""
        cfg: OLoRAConfig = self.cfg
        terms: dict[str, torch.Tensor] = {}
        if self.current_task > 0 and cfg.lambda_orth > 0:
            terms["orth"] = cfg.lambda_orth * self.orthogonality_loss()
        if cfg.lambda_l2 > 0:
            terms["l2"] = cfg.lambda_l2 * self.l2_loss()
        return terms
