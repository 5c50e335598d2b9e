"""Orthogonal Gradient Descent on the LoRA adapter (Farajtabar et al., 2020, AISTATS, Algorithm 1).

One LoRA adapter is trained through all tasks (as ``lora``). After task k (``end_task``), for ``memory_per_task``
seeded training examples x of task k, a direction is stored::

    d(x) = ∇_θ f_y(x; θ)            "gtl" (default, the paper's OGD-GTL): gradient of the ground-truth logits, here
                                    the sum over x's answer tokens of the logit of the reference token
    d(x) = ∇_θ ℓ(x; θ)              "loss": gradient of x's mean answer NLL (closer to TRACE, which stores loss
                                    gradients)

and Gram-Schmidt-orthonormalised against every stored direction (S ← S ∪ {(d − Σ_{s∈S} (d·s) s)/‖…‖}; a direction
whose residual is below 1e-6 of its norm is dropped as already spanned). While training later tasks the gradient g of
the adapter parameters is replaced by (Eq. 4 of the paper)::

    g̃ = g − Σ_{s∈S} (g·s) s

in ``on_before_optimizer_step`` (after backward and the DDP all-reduce, before Lightning's gradient clipping, which
only rescales g̃). The paper steps with plain SGD, θ ← θ − η g̃, so the update itself is orthogonal to S: that is
``optimizer: sgd`` (no momentum, weight decay must be 0), the default, as the issue asks of every baseline: the
original paper first. ``optimizer: adamw`` is TRACE's choice (its DeepSpeed AdamW steps on the projected gradient):
only the gradient is orthogonal there, Adam's per-coordinate scaling moves the update off S^⊥. Plain SGD on a LoRA
adapter needs a much larger step than AdamW; the default lr 0.1 is not calibrated on the bundled model (``clbench
tune`` searches 1e-2..1).

State: S lives in one buffer ``ogd_basis`` [rows, n_params] (float32) grown in ``begin_task`` to (t+1)·m rows, so a
resumed run (which replays ``begin_task``) has the checkpoint's shape; unused rows are zero and project nothing. The
basis is the same on every DDP rank (every rank computes it from the same seeded examples), so DDP is told not to
broadcast it at each forward. Memory: rows × n_params × 4 bytes, e.g. 8 tasks × 150 × ~0.46 M adapter values
(SmolLM2-135M, r 8 on q/v) ≈ 2.2 GB, held in memory and in the checkpoint.

TRACE (model/Regular/OGD.py) differs: it stores the BATCH loss gradient of every step of the last epoch (its
``max_memories = 150`` cap is commented out), orthonormalises in bf16, and projects per tensor inside gradient hooks
that assume the hooks fire in reverse ``named_parameters`` order. We follow the paper: per-example directions, at most
m per task, fp32 Gram-Schmidt, one projection of the whole flat gradient.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from clbench.benchmark import Task
from clbench.registry import register_method

from .gem import flat_grad, write_flat_grad
from .lora import LoRA, LoRAMethodConfig

DIRECTIONS = ("gtl", "loss")
OPTIMIZERS = ("sgd", "adamw")


def project_orthogonal(g: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """g − Bᵀ(B g) for a basis ``B`` [k, n] with orthonormal (or zero) rows: the part of ``g`` orthogonal to span(B).

    Applied twice ("twice is enough", Giraud et al., 2005) so float32 round-off of a long sum does not leave a
    component of order 1e-7·‖g‖ along the basis.
    """
    if basis.numel() == 0:
        return g
    for _ in range(2):
        g = g - basis.T @ (basis @ g)
    return g


def add_to_basis(basis: torch.Tensor, used: int, directions: torch.Tensor, tol: float = 1e-6) -> int:
    """Gram-Schmidt the rows of ``directions`` into ``basis[used:]`` in place; return the new number of used rows.

    A direction whose residual after projection is below ``tol`` × its norm adds nothing and is skipped; so is any
    direction once the basis is full.
    """
    for d in directions:
        if used >= basis.shape[0]:
            break
        norm = d.norm()
        if norm == 0:
            continue
        r = project_orthogonal(d, basis[:used])
        r_norm = r.norm()
        if r_norm <= tol * norm:
            continue
        basis[used] = r / r_norm
        used += 1
    return used


@dataclass(kw_only=True)
class OGDConfig(LoRAMethodConfig):
    """OGD knobs: the LoRA shape, the directions stored per task and the optimiser that steps on g̃."""

    memory_per_task: int  # m: directions stored per finished task (TRACE: max_memories = 150)
    ogd_direction: str  # "gtl" = ∇ of ground-truth logits (paper's OGD-GTL), "loss" = ∇ of the example's NLL
    optimizer: str  # "sgd" = paper (the update ⟂ directions), "adamw" = TRACE (only the gradient is ⟂)
    memory_seed: int | None  # seed of the example draw; None = the run's seed

    def __post_init__(self) -> None:
        if self.memory_per_task < 1:
            raise ValueError(f"memory_per_task must be >= 1, got {self.memory_per_task}")
        if self.ogd_direction not in DIRECTIONS:
            raise ValueError(f"ogd_direction must be one of {list(DIRECTIONS)}, got '{self.ogd_direction}'")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, got '{self.optimizer}'")
        if self.optimizer == "sgd" and self.weight_decay != 0:
            raise ValueError("weight_decay must be 0 with optimizer sgd (decay would move θ off the orthogonal step)")


@register_method("ogd")
class OGD(LoRA):
    """LoRA plus OGD: gradients projected orthogonally to stored per-example directions of earlier tasks."""

    config_class = OGDConfig
    end_task_on_training_device = True  # one backward per stored direction

    def __init__(self, model: nn.Module, tokenizer: Any, cfg: OGDConfig, num_tasks: int):
        super().__init__(model, tokenizer, cfg, num_tasks)
        self.ogd_names = [n for n, _ in self.model.named_parameters() if "lora_" in n]
        self.n_params = sum(p.numel() for n, p in self.model.named_parameters() if n in set(self.ogd_names))
        self.register_buffer("ogd_basis", torch.zeros(0, self.n_params))
        self.register_buffer("ogd_used", torch.zeros((), dtype=torch.long))
        self.memory_seed = cfg.memory_seed if cfg.memory_seed is not None else torch.initial_seed()
        # identical on every rank by construction: no need for DDP to broadcast it before each forward
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self, ["ogd_basis"])

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The adapter parameters in the basis' coordinate order."""
        params = dict(self.model.named_parameters())
        return [params[n] for n in self.ogd_names]

    def begin_task(self, t: int, task: Task) -> None:
        """Grow the basis to (t+1)·m rows (room for task t's directions), keeping the stored ones."""
        super().begin_task(t, task)
        rows = (t + 1) * self.cfg.memory_per_task
        if self.ogd_basis.shape[0] < rows:
            grown = torch.zeros(rows, self.n_params, dtype=self.ogd_basis.dtype, device=self.ogd_basis.device)
            grown[: self.ogd_basis.shape[0]] = self.ogd_basis
            self.ogd_basis = grown  # re-assigning a registered buffer name keeps it a buffer

    def build_optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        """Plain SGD (the paper) or the harness's AdamW (TRACE); the base class adds the warm-up."""
        if self.cfg.optimizer == "adamw":
            return super().build_optimizer(groups)
        return torch.optim.SGD(groups, lr=self.cfg.lr)

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        """g ← g − Σ (g·s) s over the stored directions (before Lightning clips the gradient)."""
        used = int(self.ogd_used)
        if used == 0:
            return
        params = self.adapter_parameters()
        write_flat_grad(params, project_orthogonal(flat_grad(params), self.ogd_basis[:used]))

    # ---- directions ---------------------------------------------------------------------------------------------
    def examples(self, k: int, task: Task) -> list[dict[str, Any]]:
        """The m training records of task k whose directions are stored (seeded by (seed, k, task name))."""
        rng = random.Random(f"{self.memory_seed}:ogd:{k}:{task.name}")
        n = min(self.cfg.memory_per_task, len(task.train))
        return [task.train[i] for i in sorted(rng.sample(range(len(task.train)), n))]

    def direction(self, batch: dict[str, torch.Tensor], params: list[nn.Parameter]) -> torch.Tensor | None:
        """d(x) for a one-example training batch (None when its answer was truncated away)."""
        labels = batch["labels"]
        if not (labels != -100).any():
            return None
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
        if self.cfg.ogd_direction == "loss":
            target = out.loss
        else:  # sum of the reference tokens' logits at the positions that predict them (labels shift by one)
            logits, shifted = out.logits[:, :-1], labels[:, 1:]
            keep = shifted != -100
            target = logits[keep].gather(-1, shifted[keep].unsqueeze(-1)).sum()
        grads = torch.autograd.grad(target, params, allow_unused=True)
        return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                          for g, p in zip(grads, params, strict=True)])

    def end_task(self, t: int, task: Task, train_loader: Any = None) -> None:
        """Store task t's directions in the basis (eval mode: no dropout, the same on every rank); on the training
        device."""
        if t == self.num_tasks - 1:
            return  # no later task would be projected against them
        collate = getattr(train_loader, "collate_fn", None)
        if collate is None:
            from clbench.benchmark import Collator

            collate = Collator(self.tokenizer, train=True)
        params = self.adapter_parameters()
        needed = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(True)
        was_training = self.training
        self.eval()
        try:
            used = int(self.ogd_used)
            for record in self.examples(t, task):  # one at a time: m full-size directions need not coexist
                batch = {k: v.to(self.device) for k, v in collate([record]).items()}
                with torch.enable_grad():
                    d = self.direction(batch, params)
                if d is not None:
                    with torch.no_grad():
                        used = add_to_basis(self.ogd_basis, used, d.unsqueeze(0))
            self.ogd_used.fill_(used)
        finally:
            self.train(was_training)
            for p, flag in zip(params, needed, strict=True):
                p.requires_grad_(flag)
