"""MoE-LoRA: a mixture of LoRA experts with a dense softmax router per layer, shared by all tasks.

Every target linear (default ``q_proj``/``v_proj`` of every layer) gets E LoRA experts of rank r/E and a router
W_g ∈ R^{E×d_in} (the LoRA-expert mixture of LoRAMoE, Dou et al., 2024, "LoRAMoE: Alleviate World
Knowledge Forgetting in Large Language Models via MoE-Style Plugin", ACL 2024, arXiv 2312.09979, Sec. 3; also
MoLoRA, Zadouri et al., ICLR 2024)::

    g(x) = softmax(W_g x)                                                      (dense: every expert, every token)
    y    = W0 x + s Σ_e g_e(x) B_e A_e x,         s = alpha / r_e,  r_e = r / E

With uniform gates (1/E) and s = alpha / r_e the update equals one rank-r LoRA with scaling alpha / r (the E experts
side by side), so ``lora`` and ``moe-lora`` start from the same effective step size.

Optional top-k (``top_k`` = k < E), per token: keep the k largest gates and renormalise,
g^k_e(x) = exp(l_e) / Σ_{j ∈ TopK(l)} exp(l_j) for e ∈ TopK(l), 0 otherwise (l = W_g x); an expert no token picked gets
exactly zero gradient.

Optional balance loss (``balance_weight`` = w > 0): LoRAMoE's localized balancing constraint (Dou et al., 2024,
Sec. 3) without expert/sample types (δ = 0, no type labels exist in a CL stream), i.e. the squared coefficient of
variation of the importance matrix, averaged over MoE layers::

    Z_{n,e} = mean_{real tokens i of example n} p_e(x_i),     p = softmax(W_g x) (dense, before top-k)
    L_bal   = w · mean_layers  Var(Z) / Mean(Z)²      (over all n·E entries; unbiased variance, as LoRAMoE's code)

LoRAMoE's code sums p over every padded position; we average over real tokens, which drops padding and keeps
examples of different lengths from adding variance, so L_bal is 0 exactly for uniform routing (every example spreads
its gate mass evenly) and positive otherwise. The dense probabilities keep it differentiable under top-k.

Nothing protects earlier tasks: experts and routers train through every task (the forgetting baseline of its kind).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clbench.benchmark import Task
from clbench.method import CLMethod, MethodConfig
from clbench.registry import register_method

from ._experts import ExpertLinear, Router, inject


@dataclass(kw_only=True)
class MoELoRAConfig(MethodConfig):
    """MoE-LoRA knobs (defaults in configs/methods/moe-lora.yaml; docs/methods/moe-lora.md explains each)."""

    r: int  # total rank r; each of the E experts has rank r / E
    num_experts: int  # E, LoRA experts per target linear
    alpha: float  # scaling s = alpha / (r / E)
    target_modules: list[str]
    layers: list[int] | None  # transformer layers with MoE-LoRA layers; None = all
    top_k: int  # k experts kept per token; 0 (or >= E) = dense routing
    balance_weight: float  # w of the LoRAMoE balance loss (CV² of expert importance); 0 = off

    def __post_init__(self) -> None:
        if self.num_experts < 1 or self.r < 1 or self.r % self.num_experts:
            raise ValueError(f"r ({self.r}) must be a positive multiple of num_experts ({self.num_experts})")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = dense), got {self.top_k}")
        if self.balance_weight < 0:
            raise ValueError(f"balance_weight must be >= 0, got {self.balance_weight}")


class SoftmaxRouter(Router):
    """g(x) = softmax(W_g x) per token, optionally restricted to the top k gates and renormalised.

    ``forward(x) -> (None, weights)``: None = all experts are computed; weights (batch, tokens, E) with exact zeros
    for the experts a token did not select. While ``record`` is on and the module is training, the dense
    probabilities of the last forward are kept in ``last_probs`` for the balance loss (consumed by the method).
    """

    def __init__(self, d_in: int, num_experts: int, top_k: int = 0):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k if 0 < top_k < num_experts else num_experts
        self.weight = nn.Parameter(torch.empty(num_experts, d_in))
        # nn.Linear's (and LoRAMoE's) init: random, so top-k ties do not pick the same experts for every token
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.record = False
        self.last_probs: torch.Tensor | None = None

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """l = W_g x in fp32 (batch, tokens, E): the softmax of a few logits is cheap and fp32 avoids ties in bf16."""
        return F.linear(x.to(self.weight.dtype), self.weight).float()

    def forward(self, x: torch.Tensor) -> tuple[None, torch.Tensor]:
        """(None, g(x)) with g the dense softmax, or the renormalised top-k of it (zeros elsewhere)."""
        logits = self.logits(x)
        probs = logits.softmax(-1)
        if self.record and self.training:
            self.last_probs = probs
        if self.top_k >= self.num_experts:
            return None, probs
        # softmax over the selected logits = the selected probabilities renormalised; -inf gives exact zeros, so the
        # unselected experts (and their logits) get no gradient through the mixture
        top = logits.topk(self.top_k, dim=-1).indices
        kept = torch.full_like(logits, float("-inf")).scatter(-1, top, logits.gather(-1, top))
        return None, kept.softmax(-1)


def balance_loss(probs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """LoRAMoE's balancing constraint with δ = 0: Var(Z) / Mean(Z)², Z_{n,e} = mean over real tokens i of p_{n,i,e}.

    probs: (batch, tokens, E) dense gate probabilities; mask: (batch, tokens), 1 for real tokens. 0 for uniform
    routing (every example spreads its mass evenly), > 0 otherwise; scale-free (CV²).
    """
    if mask is None:
        mask = probs.new_ones(probs.shape[:2])
    m = mask.to(probs.dtype).unsqueeze(-1)
    Z = ((probs * m).sum(1) / m.sum(1).clamp(min=1.0)).flatten()  # importance per (example, expert)
    if Z.numel() < 2:
        return probs.new_zeros(())
    return Z.var() / (Z.mean().pow(2) + 1e-10)


@register_method("moe-lora")
class MoELoRA(CLMethod):
    """E LoRA experts of rank r/E per target linear, mixed by a dense softmax router; all trained through all tasks."""

    config_class = MoELoRAConfig

    def __init__(self, model: nn.Module, tokenizer: Any, cfg: MoELoRAConfig, num_tasks: int):
        super().__init__(model, tokenizer, cfg, num_tasks)
        layers = list(cfg.layers) if cfg.layers is not None else None
        rank = cfg.r // cfg.num_experts
        self._moe_layers: dict[str, ExpertLinear] = inject(
            model, list(cfg.target_modules),
            lambda name, linear: ExpertLinear(linear, cfg.num_experts, rank, cfg.alpha,
                                              router=SoftmaxRouter(linear.in_features, cfg.num_experts, cfg.top_k)),
            layers)
        for layer in self._moe_layers.values():
            layer.router.record = cfg.balance_weight > 0  # no bookkeeping at all when the loss is off

    def routers(self) -> list[SoftmaxRouter]:
        """The router of every MoE-LoRA layer."""
        return [layer.router for layer in self._moe_layers.values()]

    def begin_task(self, t: int, task: Task) -> None:
        """Experts and routers train in every task (nothing else), set from scratch as the contract asks."""
        super().begin_task(t, task)
        self.freeze_all()
        for layer in self._moe_layers.values():
            for p in (layer.A, layer.B, layer.router.weight):
                p.requires_grad_(True)

    def end_task(self, t: int, task: Task, train_loader: Any = None) -> None:
        """Drop the last step's router probabilities (they hold a graph; DDP spawn cannot pickle them)."""
        for router in self.routers():
            router.last_probs = None

    def regularizer(self, batch: dict[str, torch.Tensor], out: Any) -> dict[str, torch.Tensor]:
        """``balance`` = w · mean over layers of :func:`balance_loss` on this batch's real tokens (only if w > 0)."""
        if self.cfg.balance_weight <= 0:
            return {}
        mask = batch.get("attention_mask")
        losses = []
        for router in self.routers():
            probs, router.last_probs = router.last_probs, None  # consume: the next forward records afresh
            if probs is not None:
                losses.append(balance_loss(probs, mask if mask is not None and mask.shape == probs.shape[:2]
                                           else None))
        if not losses:
            return {}
        return {"balance": self.cfg.balance_weight * torch.stack(losses).mean()}


__all__ = ["MoELoRA", "MoELoRAConfig", "SoftmaxRouter", "balance_loss"]
