"""SETA: unique and shared LoRA experts behind one unified gate, protected by elastic anchoring and a routing-aware
regulariser (Siddika, Hossen, Mallick, Jannesari, 2026, "Split-on-Share: Mixture of Sparse Experts for Task-Agnostic
Continual Learning", arXiv 2601.17616). No public code exists; this module is OUR reading of the paper's description
(docs/methods/seta.md says which parts are ours).

Every target linear (default ``q_proj``/``v_proj`` of every layer) holds T unique experts (one per task, expert t is
trained only during task t and frozen after it), K shared experts (trained through all tasks) and one gate
W_g ∈ R^{(T+K)×d_in} over all of them. While training task t, and at test time after task t::

    R_t  = {unique experts 0..t} ∪ {shared experts}                   (unique experts of later tasks are masked out)
    g(x) = softmax_{e ∈ R_t}(W_g x)                                    (task-agnostic: no task id at test time)
    y    = W0 x + s Σ_{e ∈ R_t} g_e(x) B_e A_e x,          s = alpha / rank

From the second task on the loss adds two terms (each logged on its own)::

    anchor  = λ_a Σ_{shared θ} Ω (θ − θ*)²                                  (elastic anchoring of shared weights)
    routing = λ_r mean_{layers, real tokens x of the batch} KL(g_old(x) ‖ g(x))  (routing-aware regularisation)

After task t (``end_task``, which gets the task's training loader):

    Ω_t = (1/N_b) Σ_b (∂L_b/∂θ)²     squared gradients of the LM loss of each of N_b ≤ ``importance_max_batches``
                                    training batches, for every shared weight θ, then divided by their mean over all
                                    shared weights (``importance_norm: mean``; ``max`` or ``none`` on request)
    Ω  ← Ω + Ω_t,   θ* ← θ,   W_g^old ← W_g                                  (buffers: checkpointed, resume-safe)

g_old is the gate snapshot W_g^old from the end of the previous task, over the experts routable then (R_{t−1}); g is
the live gate, renormalised over R_{t−1} (``routing_kl_support: old``, default: the new task's unique expert may take
mass, the relative routing among the old experts is protected) or over R_t (``all``: mass moved to the new expert is
penalised too). All T unique experts are pre-allocated at construction (resume = construct, replay ``begin_task``,
load the state); :meth:`SETA.param_report` counts only the ones tasks have used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clbench.benchmark import Task
from clbench.config import ConfigError
from clbench.method import CLMethod, MethodConfig
from clbench.registry import register_method

from ._experts import ExpertLinear, Router, inject, num_layers
from ._importance import mean_squared_gradients, training_device

_NORMS = ("none", "mean", "max")
_SUPPORTS = ("old", "all")


@dataclass
class SETAConfig(MethodConfig):
    """SETA knobs (defaults in configs/methods/seta.yaml; docs/methods/seta.md explains each)."""

    rank: int = 4  # rank of every expert (unique and shared)
    alpha: float = 16.0  # scaling s = alpha / rank
    num_shared: int = 2  # K, shared experts per target linear
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    layers: list[int] | None = None  # transformer layers with SETA layers; None = all
    anchor_weight: float = 0.1  # λ_a of the elastic anchoring λ_a Σ Ω (θ − θ*)²
    routing_weight: float = 1.0  # λ_r of the routing-aware term λ_r KL(g_old ‖ g)
    importance_max_batches: int = 16  # training batches per task for Ω_t (0 = the whole loader)
    importance_norm: str = "mean"  # Ω_t / its mean ("mean") or max ("max") over all shared weights; "none": raw
    routing_kl_support: str = "old"  # g renormalised over the old routable experts ("old") or all routable ("all")

    def __post_init__(self) -> None:
        if self.rank < 1 or self.num_shared < 0:
            raise ValueError(f"rank must be >= 1 and num_shared >= 0, got {self.rank} and {self.num_shared}")
        if self.anchor_weight < 0 or self.routing_weight < 0:
            raise ValueError("anchor_weight and routing_weight must be >= 0")
        if self.importance_max_batches < 0:
            raise ValueError(f"importance_max_batches must be >= 0, got {self.importance_max_batches}")
        if self.importance_norm not in _NORMS:
            raise ValueError(f"importance_norm must be one of {_NORMS}, got {self.importance_norm!r}")
        if self.routing_kl_support not in _SUPPORTS:
            raise ValueError(f"routing_kl_support must be one of {_SUPPORTS}, got {self.routing_kl_support!r}")


class SETAGate(Router):
    """The unified gate of one layer: W_g ∈ R^{(T+K)×d_in} (rows 0..T−1 unique experts, T..T+K−1 shared) and the
    snapshot ``old_weight`` from the end of the previous task (a buffer, so it is checkpointed).

    ``forward(x) -> (None, g)``: g (batch, tokens, T+K) = softmax of W_g x over the routable experts (the first
    ``n_unique`` unique experts and every shared one), exact zeros elsewhere. ``n_unique`` is set by the method's
    ``begin_task`` (replayed on resume). While ``record`` is on and the module trains, the detached input of the last
    forward is kept in ``last_x`` for the routing term (consumed by the method).
    """

    def __init__(self, d_in: int, num_tasks: int, num_shared: int):
        super().__init__()
        self.num_tasks = num_tasks
        self.num_shared = num_shared
        # zero init: uniform routing at the start, and the rows of future tasks stay exactly zero until they are used
        self.weight = nn.Parameter(torch.zeros(num_tasks + num_shared, d_in))
        self.register_buffer("old_weight", torch.zeros(num_tasks + num_shared, d_in))
        self.n_unique = 0
        self.record = False
        self.last_x: torch.Tensor | None = None
        self._mask_cache: tuple[tuple[int, torch.device], torch.Tensor] | None = None

    def routable(self, n_unique: int) -> list[int]:
        """Rows of R: unique experts 0..n_unique−1, then every shared expert."""
        return [*range(n_unique), *range(self.num_tasks, self.num_tasks + self.num_shared)]

    def forward(self, x: torch.Tensor) -> tuple[None, torch.Tensor]:
        """(None, g(x)) with g the softmax over the routable experts (fp32), zero for the masked ones."""
        if self.record and self.training:
            self.last_x = x.detach()  # the routing term trains the gate only, not the layers below it
        logits = F.linear(x.to(self.weight.dtype), self.weight).float()
        return None, logits.masked_fill(self._masked(logits.device), float("-inf")).softmax(-1)

    def _masked(self, device: torch.device) -> torch.Tensor:
        # cached: generation calls every layer once per new token, and the set changes only at begin_task
        key = (self.n_unique, device)
        if self._mask_cache is None or self._mask_cache[0] != key:
            masked = torch.ones(self.num_tasks + self.num_shared, dtype=torch.bool)
            masked[self.routable(self.n_unique)] = False
            self._mask_cache = (key, masked.to(device))
        return self._mask_cache[1]

    def log_probs(self, x: torch.Tensor, rows: list[int], old: bool = False) -> torch.Tensor:
        """log softmax over ``rows`` of the live (or snapshot) gate: (batch, tokens, len(rows)), fp32."""
        weight = self.old_weight if old else self.weight
        return F.linear(x.to(weight.dtype), weight[rows]).float().log_softmax(-1)


class SETALinear(ExpertLinear):
    """A frozen linear with T unique experts, K shared experts and the unified gate.

    The shared experts are :class:`ExpertLinear`'s pool (``A`` (K, r, d_in), ``B`` (K, d_out, r)); the unique experts
    are one Parameter each (``unique_A[t]``, ``unique_B[t]``), so a finished task's expert is frozen by
    ``requires_grad = False`` and no optimiser (momentum, weight decay) ever holds it. Per layer the anchoring state
    lives beside the weights it anchors: ``omega_A``/``omega_B`` (Ω) and ``anchor_A``/``anchor_B`` (θ*), buffers.
    """

    def __init__(self, base: nn.Linear, num_tasks: int, num_shared: int, rank: int, alpha: float):
        super().__init__(base, num_shared, rank, alpha, router=SETAGate(base.in_features, num_tasks, num_shared))
        self.num_tasks = num_tasks
        self.num_shared = num_shared

        def a_init() -> nn.Parameter:  # peft's LoRA init, as ExpertLinear: kaiming-uniform A, zero B
            a = torch.empty(rank, base.in_features)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            return nn.Parameter(a)

        self.unique_A = nn.ParameterList([a_init() for _ in range(num_tasks)])
        self.unique_B = nn.ParameterList([nn.Parameter(torch.zeros(base.out_features, rank))
                                          for _ in range(num_tasks)])
        for name in ("omega_A", "anchor_A"):
            self.register_buffer(name, torch.zeros_like(self.A, dtype=torch.float32))
        for name in ("omega_B", "anchor_B"):
            self.register_buffer(name, torch.zeros_like(self.B, dtype=torch.float32))

    def experts(self, n_unique: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (n+K, r, d_in), B (n+K, d_out, r)) of the routable experts, in :meth:`SETAGate.routable` order."""
        if n_unique == 0:
            return self.A, self.B
        A = torch.cat([torch.stack(list(self.unique_A[:n_unique])), self.A])
        B = torch.cat([torch.stack(list(self.unique_B[:n_unique])), self.B])
        return A, B

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """W0 x + s Σ_{e ∈ R} g_e(x) B_e A_e x, computing only the routable experts (masked ones have g = 0)."""
        out = self.base(x)
        _, gates = self.router(x)
        n = self.router.n_unique
        if n + self.num_shared == 0:
            return out
        A, B = self.experts(n)
        w = torch.cat([gates[..., :n], gates[..., self.num_tasks :]], -1).to(A.dtype)  # routable columns, in order
        h = torch.einsum("btd,erd->bter", x.to(A.dtype), A) * w.unsqueeze(-1)
        return out + (self.scaling * torch.einsum("bter,eor->bto", h, B)).to(out.dtype)

    def shared_params(self) -> list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]]:
        """(θ, Ω, θ*) for the two shared tensors of this layer."""
        return [(self.A, self.omega_A, self.anchor_A), (self.B, self.omega_B, self.anchor_B)]

    def anchor_penalty(self) -> torch.Tensor:
        """Σ Ω (θ − θ*)² over this layer's shared experts (without λ_a)."""
        return sum((omega * (p.float() - anchor).pow(2)).sum() for p, omega, anchor in self.shared_params())


@register_method("seta")
class SETA(CLMethod):
    """SETA (our reading of Siddika et al., 2026): unique + shared LoRA experts, unified gate, anchoring, routing KL."""

    config_class = SETAConfig

    def __init__(self, model: nn.Module, tokenizer: Any, cfg: SETAConfig, num_tasks: int):
        super().__init__(model, tokenizer, cfg, num_tasks)
        n_layers = num_layers(model)
        layers = list(cfg.layers) if cfg.layers is not None else None
        if layers is not None and (not layers or any(not 0 <= i < n_layers for i in layers)):
            raise ConfigError(f"layers must be indices in 0..{n_layers - 1}, got {cfg.layers}")
        self._seta_layers: dict[str, SETALinear] = inject(
            model, list(cfg.target_modules),
            lambda name, linear: SETALinear(linear, num_tasks, cfg.num_shared, cfg.rank, cfg.alpha), layers)
        for layer in self._seta_layers.values():
            layer.router.record = cfg.routing_weight > 0
        # finished tasks: tells the regulariser whether Ω, θ* and the gate snapshot exist (a buffer: resume-safe)
        self.register_buffer("tasks_done", torch.zeros((), dtype=torch.long))

    def seta_layers(self) -> list[SETALinear]:
        """Every SETA layer, in model order."""
        return list(self._seta_layers.values())

    # ---- task hooks ---------------------------------------------------------------------------------------------
    def begin_task(self, t: int, task: Task) -> None:
        """Task t's unique expert, the shared experts and the gate train; unique experts 0..t become routable."""
        if not 0 <= t < self.num_tasks:
            raise RuntimeError(f"seta pre-allocated {self.num_tasks} unique experts per layer; task {t} has none")
        super().begin_task(t, task)
        for p in self.parameters():
            p.requires_grad_(False)
        for layer in self.seta_layers():
            layer.router.n_unique = t + 1
            for p in (layer.unique_A[t], layer.unique_B[t], layer.A, layer.B, layer.router.weight):
                p.requires_grad_(True)

    def end_task(self, t: int, task: Task, train_loader: Any = None) -> None:
        """Ω ← Ω + Ω_t (if λ_a > 0), θ* ← shared weights, W_g^old ← W_g; task t's unique expert is frozen from the
        next ``begin_task`` on (it sets requires_grad from scratch)."""
        for layer in self.seta_layers():
            layer.router.last_x = None
        if self.cfg.anchor_weight > 0 and self.cfg.num_shared > 0:
            if train_loader is None:
                raise RuntimeError("seta needs the task's training loader in end_task to estimate the importance Ω")
            home = self.device
            self.to(training_device(self))
            try:
                new = self.estimate_importance(train_loader)
            finally:
                self.to(home)
            with torch.no_grad():
                for layer, parts in zip(self.seta_layers(), new, strict=True):
                    for (_, omega, _), part in zip(layer.shared_params(), parts, strict=True):
                        omega.add_(part.to(omega.device))
        with torch.no_grad():
            for layer in self.seta_layers():
                for p, _, anchor in layer.shared_params():
                    anchor.copy_(p.detach().float())
                layer.router.old_weight.copy_(layer.router.weight.detach())
            self.tasks_done.fill_(t + 1)
        self.zero_grad(set_to_none=True)  # Lightning leaves the last step's gradients on the now-frozen expert

    # ---- importance ---------------------------------------------------------------------------------------------
    def estimate_importance(self, loader: Any) -> list[list[torch.Tensor]]:
        """Ω_t per layer, [Ω_A, Ω_B]: mean over batches of the squared batch gradient of the LM loss w.r.t. the
        shared experts, over at most ``importance_max_batches`` batches (under DDP each rank reads its own shard and
        the sums are pooled), in eval mode (deterministic), then normalised as ``importance_norm`` says."""
        targets = [p for layer in self.seta_layers() for p, _, _ in layer.shared_params()]
        omegas = mean_squared_gradients(self, self.model, targets, loader, self.cfg.importance_max_batches,
                                        per_example=False)
        if self.cfg.importance_norm != "none":
            flat = torch.cat([o.flatten() for o in omegas])
            scale = flat.mean() if self.cfg.importance_norm == "mean" else flat.max()
            if scale > 0:
                omegas = [o / scale for o in omegas]
        return [omegas[2 * i : 2 * i + 2] for i in range(len(self.seta_layers()))]

    # ---- loss ---------------------------------------------------------------------------------------------------
    def anchor_penalty(self) -> torch.Tensor:
        """λ_a Σ Ω (θ − θ*)² over every shared expert of every layer (0 before a task is finished)."""
        return self.cfg.anchor_weight * sum(layer.anchor_penalty() for layer in self.seta_layers())

    def routing_penalty(self, mask: torch.Tensor | None = None) -> torch.Tensor:
        """λ_r · mean over layers of the token-mean KL(g_old(x) ‖ g(x)) on the inputs of the last training forward.

        g_old: the snapshot gate over the experts routable when it was taken (R_{t−1}); g: the live gate, renormalised
        over R_{t−1} (support ``old``) or over the current routable set R_t (``all``). mask (batch, tokens): real
        tokens (padding is excluded from the mean).
        """
        n_old = int(self.tasks_done)
        terms = []
        for layer in self.seta_layers():
            gate = layer.router
            x, gate.last_x = gate.last_x, None  # consume: the next forward records afresh
            if x is None:
                continue
            old_rows = gate.routable(n_old)
            log_old = gate.log_probs(x, old_rows, old=True)
            if self.cfg.routing_kl_support == "old":
                log_new = gate.log_probs(x, old_rows)
            else:  # the current rows are the old unique experts, the new one(s), then the shared ones
                log_all = gate.log_probs(x, gate.routable(gate.n_unique))
                log_new = torch.cat([log_all[..., :n_old], log_all[..., gate.n_unique:]], -1)
            kl = (log_old.exp() * (log_old - log_new)).sum(-1)  # (batch, tokens)
            if mask is not None and mask.shape == kl.shape:
                m = mask.to(kl.dtype)
                terms.append((kl * m).sum() / m.sum().clamp(min=1.0))
            else:
                terms.append(kl.mean())
        if not terms:
            return torch.zeros((), device=self.device)
        return self.cfg.routing_weight * torch.stack(terms).mean()

    def regularizer(self, batch: dict[str, torch.Tensor], out: Any) -> dict[str, torch.Tensor]:
        """``anchor`` (λ_a > 0) and ``routing`` (λ_r > 0); both 0 during the first task (nothing to protect yet)."""
        terms: dict[str, torch.Tensor] = {}
        first = int(self.tasks_done) == 0
        if self.cfg.anchor_weight > 0 and self.cfg.num_shared > 0:
            terms["anchor"] = torch.zeros((), device=self.device) if first else self.anchor_penalty()
        if self.cfg.routing_weight > 0:
            if first:
                for layer in self.seta_layers():
                    layer.router.last_x = None
                terms["routing"] = torch.zeros((), device=self.device)
            else:
                terms["routing"] = self.routing_penalty(batch.get("attention_mask"))
        return terms

    # ---- bookkeeping --------------------------------------------------------------------------------------------
    def param_report(self) -> dict[str, int]:
        """Parameter counts for the growth curve (the pre-allocated unique experts of future tasks do not count).

        ``added``: per layer the unique experts of tasks 0..t (t = latest task begun), the K shared experts and the
        gate rows of those experts ((t+1+K) × d_in); ``trainable``: what task t's optimiser moves (its unique expert,
        the shared experts, those gate rows); ``frozen``: the unique experts of tasks before t; ``total``: base +
        added. Training-only buffers (Ω, θ*, gate snapshot) are not model parameters and are not counted.
        """
        n = max(0, min(self.current_task + 1, self.num_tasks))
        added = trainable = frozen = 0
        for layer in self.seta_layers():
            per_expert = layer.expert_params(0)
            gate_rows = (n + layer.num_shared) * layer.in_features
            added += (n + layer.num_shared) * per_expert + gate_rows
            frozen += max(n - 1, 0) * per_expert
            if n:
                trainable += (1 + layer.num_shared) * per_expert + gate_rows
        return {"trainable": trainable, "added": added, "frozen": frozen, "total": self.base_param_count + added}


__all__ = ["SETA", "SETAConfig", "SETAGate", "SETALinear"]
