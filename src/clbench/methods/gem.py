"""Gradient episodic memory on the LoRA adapter: GEM (Lopez-Paz & Ranzato, 2017) and A-GEM (Chaudhry et al., 2019).

One LoRA adapter is trained through all tasks (as ``lora``). Each finished task k keeps an episodic memory M_k: a
seeded sample of ``memory_per_task`` records of its TRAINING split (the same at every later stage, re-derived from the
task list, so nothing has to be checkpointed). While training task t, after backward (the accumulated, DDP-averaged
gradient g of the adapter parameters), the update direction is replaced before the optimiser step:

GEM (Lopez-Paz & Ranzato, Eq. 6-7 and the dual QP of Eq. 10-13)::

    g_k = ∇_θ ℓ(f_θ, M_k)  for every k < t                       (recomputed at the current θ at every step)
    if g·g_k ≥ 0 for all k:   g̃ = g
    else:                     v* = argmin_{v ≥ γ} ½ vᵀ G Gᵀ v + (G g)ᵀ v,   g̃ = Gᵀ v* + g

    where G = [g_0; …; g_{t-1}] (rows); the paper's small constant γ ≥ 0 (``margin``, 0.5 as in its experiments)
    biases the projection towards backward transfer; at the optimum G g̃ = μ ≥ 0 (the multipliers of v ≥ γ), i.e.
    no memory loss rises to first order (a relative ε I is added to G Gᵀ only if it is singular, see project_gem).

A-GEM (Chaudhry et al., Eq. 11), one constraint on the average memory loss::

    g_ref = ∇_θ ℓ(f_θ, B),  B = ``ref_batch_size`` records drawn from ⋃_{k<t} M_k at each step
    g̃ = g − (g·g_ref / g_ref·g_ref) g_ref   if g·g_ref < 0,   else g

The surgery runs in Lightning's ``on_before_optimizer_step``: after the backward of the last accumulated micro-batch
(under DDP after the gradient all-reduce, under 16-mixed after unscaling) and BEFORE gradient clipping (Lightning
2.6's ``Precision._after_closure``: hooks first, then ``_clip_gradients``); clipping only rescales g̃, which keeps
every sign constraint. Memory gradients are computed in eval mode (no dropout: every DDP rank computes the same g_k
from the full memory, so all ranks take the same step without another all-reduce) under the run's autocast.

TRACE (model/Regular/GEM.py) differs: it has no episodic memory; each task's "memory gradient" is the gradient of its
LAST training batch, stored once, and the QP is solved separately per parameter tensor (layer-wise constraints), with
qpth. We follow the paper (a memory, gradients recomputed per step, one QP over all adapter parameters).
"""

from __future__ import annotations

import abc
import contextlib
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import quadprog
import torch
from torch import nn

from clbench.benchmark import Collator, Task
from clbench.registry import register_method

from .lora import LoRA, LoRAMethodConfig

_INPUTS = ("input_ids", "attention_mask", "labels")


# ---- pure projection math (tested with hand-made gradients)
def project_gem(g: torch.Tensor, G: torch.Tensor, margin: float = 0.5, eps: float = 1e-3) -> torch.Tensor:
    """GEM's projection of the flat gradient ``g`` [n] given memory gradients ``G`` [k, n] (dual QP, Eq. 10-13).

    Returns ``g`` itself when no constraint is violated (g·g_k ≥ 0 for every k). Otherwise solves
    ``min_{v ≥ margin} ½ vᵀ P v + (G g)ᵀ v`` with quadprog in float64 and returns ``Gᵀ v + g`` in g's dtype.
    P = G Gᵀ exactly when it is positive definite (memory gradients linearly independent, the usual case for a few
    vectors in a space of ~10⁵ adapter values): then G g̃ = μ ≥ 0, the paper's constraints hold exactly. Only when
    quadprog finds P singular is ε' I added, ε' = ``eps`` × mean diagonal of G Gᵀ (relative, so it means the same at
    every gradient scale); then G g̃ = μ − ε' v, a small relaxation. GEM's own code always adds an absolute 1e-3,
    which makes every active constraint slightly violated (G g̃ = −ε v) and swamps G Gᵀ when gradients are small.
    """
    if G.numel() == 0:
        return g
    dots = G @ g
    if bool((dots >= 0).all()):
        return g
    M = G.double()
    P = (M @ M.T).cpu().numpy()
    P = 0.5 * (P + P.T)
    k = P.shape[0]
    q = -(M @ g.double()).cpu().numpy()  # quadprog minimises ½ xᵀPx − qᵀx subject to Cᵀx ≥ b, so q = −G g
    C, b = np.eye(k), np.full(k, float(margin))
    try:
        v = quadprog.solve_qp(P, q, C, b)[0]
    except ValueError:  # "matrix G is not positive definite": dependent memory gradients
        v = quadprog.solve_qp(P + np.eye(k) * eps * max(float(np.mean(np.diag(P))), 1e-30), q, C, b)[0]
    return (torch.from_numpy(v).to(M) @ M + g.double()).to(g.dtype)


def project_agem(g: torch.Tensor, g_ref: torch.Tensor) -> torch.Tensor:
    """A-GEM's projection (Chaudhry et al., 2019, Eq. 11): remove the component of ``g`` along ``g_ref`` if they
    conflict (g·g_ref < 0), so that the result has g̃·g_ref = 0; else return ``g`` unchanged."""
    dot = torch.dot(g, g_ref)
    if dot >= 0:
        return g
    return g - (dot / torch.dot(g_ref, g_ref).clamp_min(torch.finfo(g.dtype).tiny)) * g_ref


# ---- flat gradients
def flat_grad(params: list[nn.Parameter]) -> torch.Tensor:
    """The ``.grad`` of ``params`` as one float32 vector (zeros for a parameter that got no gradient)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params])


def write_flat_grad(params: list[nn.Parameter], vec: torch.Tensor) -> None:
    """Write the flat vector ``vec`` back into the ``.grad`` of ``params`` (inverse of :func:`flat_grad`)."""
    offset = 0
    for p in params:
        n = p.numel()
        piece = vec[offset : offset + n].view_as(p).to(p.dtype)
        if p.grad is None:
            p.grad = piece.clone()
        else:
            p.grad.copy_(piece)
        offset += n


def loss_gradient(method: Any, records: list[dict[str, Any]], collate: Any, params: list[nn.Parameter],
                  batch_size: int) -> torch.Tensor:
    """Flat gradient of the LM loss on ``records``: the mean NLL over all their answer tokens (the harness's LM loss
    on one batch of them), computed in chunks of ``batch_size`` records without changing the result.

    Eval mode (no dropout), the run's autocast when a trainer is attached, ``autograd.grad`` so nothing is
    accumulated into ``.grad`` (and no DDP gradient hook fires).
    """
    device = params[0].device
    total = torch.zeros(sum(p.numel() for p in params), device=device)
    tokens = 0
    trainer = getattr(method, "_trainer", None)  # the run's autocast (bf16-mixed...) applies to memory too
    was_training = method.training
    method.eval()
    try:
        with torch.enable_grad():
            for start in range(0, len(records), batch_size):
                batch = {k: v.to(device) for k, v in collate(records[start : start + batch_size]).items()
                         if k in _INPUTS}
                n = int((batch["labels"][:, 1:] != -100).sum())  # tokens HF's shifted loss averages over
                if n == 0:
                    continue
                autocast = trainer.precision_plugin.forward_context() if trainer else contextlib.nullcontext()
                with autocast:
                    loss = method.model(**batch).loss * n  # token SUM: chunks then add up to the whole memory
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                total += torch.cat([(gr if gr is not None else torch.zeros_like(p)).reshape(-1).float()
                                    for gr, p in zip(grads, params, strict=True)])
                tokens += n
    finally:
        method.train(was_training)
    return total / max(tokens, 1)


# ---- configs
@dataclass(kw_only=True)
class EpisodicMemoryConfig(LoRAMethodConfig):
    """Knobs shared by GEM and A-GEM: the LoRA shape plus the episodic memory."""

    memory_per_task: int  # records of each finished task's training split kept in its memory M_k
    memory_batch_size: int  # records per forward when computing a memory gradient (memory use only)
    memory_seed: int | None  # seed of the memory draw; None = the run's seed

    def __post_init__(self) -> None:
        if self.memory_per_task < 1:
            raise ValueError(f"memory_per_task must be >= 1, got {self.memory_per_task}")
        if self.memory_batch_size < 1:
            raise ValueError(f"memory_batch_size must be >= 1, got {self.memory_batch_size}")


@dataclass(kw_only=True)
class GEMConfig(EpisodicMemoryConfig):
    """GEM knobs: the memory plus the QP's margin γ and relative regulariser ε."""

    margin: float  # γ ≥ 0 of the paper (v ≥ γ in the dual QP); 0.5 as in GEM's experiments and TRACE
    qp_eps: float  # ε added to G Gᵀ's diagonal (relative to its mean) only when G Gᵀ is singular

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.margin < 0:
            raise ValueError(f"margin must be >= 0, got {self.margin}")
        if self.qp_eps < 0:
            raise ValueError(f"qp_eps must be >= 0, got {self.qp_eps}")


@dataclass(kw_only=True)
class AGEMConfig(EpisodicMemoryConfig):
    """A-GEM knobs: the memory plus the size of the reference batch drawn from it at each step."""

    ref_batch_size: int  # records of ⋃_{k<t} M_k whose loss gradient is g_ref at each step

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ref_batch_size < 1:
            raise ValueError(f"ref_batch_size must be >= 1, got {self.ref_batch_size}")


# ---- methods
class EpisodicGradientMethod(LoRA, abc.ABC):
    """LoRA plus per-task episodic memories whose gradients constrain the update (base of GEM and A-GEM)."""

    config_class = EpisodicMemoryConfig

    def __init__(self, model: nn.Module, tokenizer: Any, cfg: EpisodicMemoryConfig, num_tasks: int):
        super().__init__(model, tokenizer, cfg, num_tasks)
        # as replay: the harness seeds torch with the run seed right before building the method
        self.memory_seed = cfg.memory_seed if cfg.memory_seed is not None else torch.initial_seed()
        self.memories: list[list[dict[str, Any]]] = []  # M_0..M_{t-1}, re-derived in train_examples (resume-safe)
        self.memory_collate: Any = None

    def memory(self, k: int, task: Task) -> list[dict[str, Any]]:
        """M_k: a seeded sample of task k's training records, a function of (seed, k, task name) only."""
        rng = random.Random(f"{self.memory_seed}:{k}:{task.name}")
        n = min(self.cfg.memory_per_task, len(task.train))
        return [task.train[i] for i in sorted(rng.sample(range(len(task.train)), n))]

    def train_examples(self, t: int, tasks: list[Task]) -> list[dict[str, Any]]:
        """Task t's training split (the memories are NOT mixed in: they only constrain the update)."""
        self.memories = [self.memory(k, tasks[k]) for k in range(t)]
        return super().train_examples(t, tasks)

    def on_train_start(self) -> None:
        """Tokenise memories exactly as the training batches (the training loader's collate function)."""
        super().on_train_start()
        loader = self.trainer.train_dataloader
        self.memory_collate = getattr(loader, "collate_fn", None)

    def _collate(self) -> Any:
        return self.memory_collate or Collator(self.tokenizer, train=True)

    @abc.abstractmethod
    def project(self, g: torch.Tensor, params: list[nn.Parameter]) -> torch.Tensor:
        """The constrained update direction for flat gradient ``g``; subclasses implement it."""

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        """Replace the accumulated adapter gradient by its projection (before Lightning clips it)."""
        if not self.memories:
            return
        params = self.trainable_parameters()
        g = flat_grad(params)
        projected = self.project(g, params)
        if projected is not g:
            write_flat_grad(params, projected)
        if self._trainer is not None:  # share of steps whose gradient conflicted with the memory
            self.log("train/projected", float(projected is not g), batch_size=1)


@register_method("gem")
class GEM(EpisodicGradientMethod):
    """LoRA plus GEM: the update may not raise any earlier task's memory loss (one QP over the adapter)."""

    config_class = GEMConfig

    def memory_gradients(self, params: list[nn.Parameter]) -> torch.Tensor:
        """G [t, n]: the flat LM-loss gradient of each earlier task's memory at the current parameters."""
        collate = self._collate()
        return torch.stack([loss_gradient(self, m, collate, params, self.cfg.memory_batch_size)
                            for m in self.memories])

    def project(self, g: torch.Tensor, params: list[nn.Parameter]) -> torch.Tensor:
        """:func:`project_gem` of ``g`` against the memory gradients."""
        return project_gem(g, self.memory_gradients(params), self.cfg.margin, self.cfg.qp_eps)


@register_method("agem")
class AGEM(EpisodicGradientMethod):
    """LoRA plus A-GEM: one constraint, the gradient of a random batch from all earlier memories."""

    config_class = AGEMConfig

    def reference_batch(self) -> list[dict[str, Any]]:
        """``ref_batch_size`` records of ⋃ M_k, drawn from (seed, task, step): the same on every rank and on resume."""
        pool = [r for m in self.memories for r in m]
        step = self.trainer.global_step if self._trainer is not None else 0
        rng = random.Random(f"{self.memory_seed}:agem:{self.current_task}:{step}")
        return rng.sample(pool, min(self.cfg.ref_batch_size, len(pool)))

    def project(self, g: torch.Tensor, params: list[nn.Parameter]) -> torch.Tensor:
        """:func:`project_agem` of ``g`` against the reference gradient."""
        g_ref = loss_gradient(self, self.reference_batch(), self._collate(), params, self.cfg.memory_batch_size)
        return project_agem(g, g_ref)
