"""MoSEs: Mixtures of SubExperts (Kang, 2025, "Mixtures of SubExperts for Large Language Continual Learning",
arXiv 2511.06237). No public code exists; this is our reading (docs/methods/moses.md says which parts are ours).

Each MoSE layer (a target linear, default ``q_proj``/``v_proj`` of the upper half of the layers) holds a pool of N
rank-r_s LoRA sub-experts (A_e, B_e). Task t (0-based) learns, per layer::

    m_t  = top-k(u_t)  over {experts owned by tasks < t} ∪ {b_t fresh slots}        (straight-through estimator)
    g(x) = softmax_{e ∈ m_t}(W_r^t x / τ)                                             (token router, per task)
    y    = W0 x + s Σ_{e ∈ m_t} g_e(x) B_e A_e x,          s = alpha / r_s

Experts owned by earlier tasks are reused frozen; at most b_t = max(b, k − #owned) of the selected experts are new
(the budget: with b < k later tasks must reuse, so parameters grow sublinearly in T). After the task m_t is stored in a
buffer, the selected fresh slots become task t's experts and are frozen for good, as are W_r^t, u_t and the key k_t.

Task-agnostic inference: q(x) = mean over the prompt tokens (BOS excluded) of the frozen model's hidden state after
the key layer (default: the layer just below the first MoSE layer, read by a forward hook in the same pass). Training
adds the pull constraint λ_p (1 − cos(q(x), k_t)); at test time each example takes the task of its nearest key
τ(x) = argmax_t cos(q(x), k_t) and goes through m_τ and W_r^τ. With ``--oracle-task-id`` the true task is used instead.
"""

from __future__ import annotations

import contextlib
import csv
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clbench.benchmark import IGNORE_INDEX, Task
from clbench.config import ConfigError
from clbench.method import CLMethod, MethodConfig
from clbench.registry import register_method

from ._experts import ExpertLinear, Router, inject, layer_index, num_layers
from ._moses_usage import plot_expert_usage

_DECODER_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)$")


@dataclass
class MoSEsConfig(MethodConfig):
    """MoSEs knobs (defaults in configs/methods/moses.yaml; docs/methods/moses.md explains each)."""

    # 3e-3, not LoRA's 1e-3: with experts in half the layers, 1e-3 left C-STANCE at 0.33 after 50 steps (0.75 at 3e-3)
    lr: float = 3e-3  # learning rate of the task's new sub-experts (A_e, B_e)
    num_experts: int = 32  # N, sub-experts in the pool of every MoSE layer
    top_k: int = 4  # k, sub-experts per task per layer (the mask size)
    rank: int = 2  # r_s, rank of every sub-expert
    alpha: float = 16.0  # scaling s = alpha / r_s
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    layers: list[int] | None = None  # transformer layers with MoSE layers; None = the upper half
    budget: int = 2  # b, most new sub-experts a task may add per layer (task 0 takes k)
    temperature: float = 1.0  # τ of the token router softmax
    key_layer: int | None = None  # hidden state after this layer is the query; None = first MoSE layer - 1
    pull_weight: float = 0.5  # λ_p, weight of the pull constraint 1 - cos(q(x), k_t) (L2P: 0.5)
    key_init: str = "first_batch"  # "first_batch": k_t starts at its first batch's mean query; "random"
    new_expert_score: float = 0.1  # head start of the fresh slots' mask scores, so a task starts with its budget
    prompt_length: int = 0  # L, L2P-style task prompt: L vectors in front of the routed task's input; 0 = off
    router_lr: float = 3e-3  # learning rate of the task's router W_r^t
    score_lr: float = 1e-2  # learning rate of the task's mask scores u_t
    key_lr: float = 1e-2  # learning rate of the task's key k_t (and of its prompt P_t, as L2P trains both alike)

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in 1..num_experts ({self.num_experts}), got {self.top_k}")
        if not 0 <= self.budget <= self.top_k:
            raise ValueError(f"budget must be in 0..top_k ({self.top_k}), got {self.budget}")
        if self.rank < 1 or self.temperature <= 0 or self.pull_weight < 0:
            raise ValueError("rank must be >= 1, temperature > 0 and pull_weight >= 0")
        if self.key_init not in ("first_batch", "random"):
            raise ValueError(f"key_init must be 'first_batch' or 'random', got {self.key_init!r}")
        if self.prompt_length < 0:
            raise ValueError(f"prompt_length must be >= 0, got {self.prompt_length}")


class RoutingContext:
    """Routing state of the forward pass in flight, shared by the key-layer hook and every MoSE layer.

    Plain Python on purpose: it is derived per forward (never checkpointed). ``version`` grows with every routing
    decision so MoSE layers can cache their per-example expert tables for all decoding steps of one ``generate``.
    """

    def __init__(self) -> None:
        self.version = 0
        self.reset()

    def reset(self) -> None:
        """Forget the current forward's routing (the version counter keeps growing)."""
        self.active = False
        self.query_mask: torch.Tensor | None = None  # (batch, tokens): tokens averaged into q(x)
        self.forced: torch.Tensor | None = None  # (batch,) task ids given (training task or oracle)
        self.train_task: int | None = None  # set while training: the layers take the mask-learning path
        self.task_ids: torch.Tensor | None = None  # (batch,) decided task per example; -1 = no adapter
        self.key_choice: torch.Tensor | None = None  # (batch,) nearest-key task (reported even under the oracle)
        self.query: torch.Tensor | None = None  # (batch, d) q(x)


class MoSERouter(Router):
    """Per-task token routers W_r^t (N × d_in each), mask scores u_t (N) and fixed masks m_t of one MoSE layer.

    ``forward(x)`` is the reference inference routing for finished tasks (the Router contract of ``_experts``):
    indices = m_τ (batch, k) and weights g = softmax(W_r^τ[m_τ] x / τ) (batch, tokens, k), τ = the example's task.
    """

    def __init__(self, d_in: int, num_experts: int, top_k: int, num_tasks: int, temperature: float,
                 ctx: RoutingContext):
        super().__init__()
        self.top_k = top_k
        self.temperature = temperature
        self.ctx = ctx
        # one Parameter per task, so a finished task's router is frozen by requires_grad, not by gradient surgery;
        # zero init = uniform gates at the start of a task
        self.weight = nn.ParameterList([nn.Parameter(torch.zeros(num_experts, d_in)) for _ in range(num_tasks)])
        self.scores = nn.ParameterList([nn.Parameter(1e-2 * torch.randn(num_experts)) for _ in range(num_tasks)])
        self.register_buffer("masks", torch.full((num_tasks, top_k), -1, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices, weights) for the examples' decided tasks; rows routed to no task get all-zero weights."""
        ids = self.ctx.task_ids
        valid = ids >= 0
        tasks = ids.clamp(min=0)
        if (self.masks[tasks[valid]] < 0).any():
            raise RuntimeError("the reference router covers finished tasks only (their mask is fixed)")
        indices = self.masks[tasks].clamp(min=0)  # (batch, k)
        rows = torch.stack([self.weight[int(t)][indices[b]] for b, t in enumerate(tasks.tolist())])  # (b, k, d)
        logits = torch.einsum("btd,bkd->btk", x.to(rows.dtype), rows) / self.temperature
        return indices, logits.softmax(-1) * valid[:, None, None]


class MoSELinear(ExpertLinear):
    """A frozen linear with a MoSE pool: y = W0 x + s Σ_{e ∈ m_τ} g_e(x) B_e A_e x for each example's task τ.

    The pool (``A``, ``B`` of :class:`ExpertLinear`) is never trained in place: the current task's fresh experts
    live in the slots ``A_new``/``B_new`` (copied into the pool at :meth:`fix_mask`), so an earlier task's experts
    are frozen by ``requires_grad = False`` and no optimiser (weight decay, momentum) can touch them.
    """

    def __init__(self, base: nn.Linear, num_experts: int, rank: int, alpha: float, top_k: int, num_tasks: int,
                 temperature: float, ctx: RoutingContext, head_start: float = 0.0):
        router = MoSERouter(base.in_features, num_experts, top_k, num_tasks, temperature, ctx)
        super().__init__(base, num_experts, rank, alpha, router=router)
        self.A.requires_grad_(False)
        self.B.requires_grad_(False)
        self.top_k = top_k
        self.ctx = ctx
        self.head_start = head_start
        self.A_new = nn.Parameter(torch.zeros(top_k, rank, base.in_features))
        self.B_new = nn.Parameter(torch.zeros(top_k, base.out_features, rank))
        self.register_buffer("owner", torch.full((num_experts,), -1, dtype=torch.long))  # task owning each expert
        self.register_buffer("slots", torch.full((top_k,), -1, dtype=torch.long))  # pool rows of the fresh slots
        # per task: candidates and fresh slots it had (what its optimiser could move; kept for param_report)
        self.register_buffer("n_candidates", torch.zeros(num_tasks, dtype=torch.long))
        self.register_buffer("n_slots", torch.zeros(num_tasks, dtype=torch.long))
        self._table: tuple[int, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    # ---- task life cycle ------------------------------------------------------------------------------------------
    def reserve(self, t: int, budget: int) -> None:
        """Reserve b_t = max(b, k − #owned) unused pool rows as task t's fresh slots (fewer if the pool runs dry)."""
        unused = (self.owner < 0).nonzero().squeeze(1)
        n_owned = self.num_experts - unused.numel()
        n_new = min(max(budget, self.top_k - n_owned), unused.numel())
        if n_owned + n_new < self.top_k:  # only possible if N < k, which the config refuses
            raise RuntimeError(f"pool of {self.num_experts} experts cannot fill a mask of {self.top_k}")
        with torch.no_grad():
            self.slots.fill_(-1)
            self.slots[:n_new] = unused[:n_new]
            # a fresh slot starts as the pool row it will become: that row's LoRA init (kaiming A, zero B)
            self.A_new.zero_()
            self.B_new.zero_()
            self.A_new[:n_new] = self.A[unused[:n_new]]
            self.n_candidates[t] = n_owned + n_new
            self.n_slots[t] = n_new

    def trained_params(self, t: int) -> int:
        """Parameters task t's optimiser can move in this layer: its fresh slots, and the router rows and scores of
        its candidates. (The pre-allocated tensors are larger: rows outside the candidates never get a gradient.)"""
        return int(self.n_slots[t]) * self.expert_params(0) + int(self.n_candidates[t]) * (self.in_features + 1)

    def candidates(self) -> tuple[torch.Tensor, int]:
        """Pool rows task t may select: every owned expert, then the fresh slots; and how many are owned."""
        owned = (self.owner >= 0).nonzero().squeeze(1)
        return torch.cat([owned, self.slots[self.slots >= 0]]), owned.numel()

    def selection_scores(self, t: int, cand: torch.Tensor, n_owned: int) -> torch.Tensor:
        """u_t of the candidates plus the fresh slots' head start (a constant: the STE gradient is unchanged)."""
        u = self.router.scores[t][cand]
        bonus = torch.zeros_like(u.detach())
        bonus[n_owned:] = self.head_start
        return u + bonus

    def select(self, t: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        """m_t as positions among :meth:`candidates` (top-k of u_t), with the candidates and the owned count."""
        cand, n_owned = self.candidates()
        return self.selection_scores(t, cand, n_owned).topk(self.top_k).indices, n_owned, cand

    def fix_mask(self, t: int) -> None:
        """End of task t: store m_t; the selected fresh slots become task t's experts (copied into the pool)."""
        pos, n_owned, cand = self.select(t)
        with torch.no_grad():
            chosen = cand[pos]
            self.router.masks[t] = chosen.sort().values
            for j in range(int((self.slots >= 0).sum())):
                row = int(self.slots[j])
                if bool((chosen == row).any()):
                    self.A[row] = self.A_new[j]
                    self.B[row] = self.B_new[j]
                    self.owner[row] = t
            self.slots.fill_(-1)
        self._table = None

    def task_table(self, t: int, finished: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A_sel (k, r, d_in), B_sel (k, d_out, r), W_sel (k, d_in)) of task t's mask (its current selection while
        task t is still training)."""
        if finished:
            idx = self.router.masks[t]
            return self.A[idx], self.B[idx], self.router.weight[t][idx]
        pos, n_owned, cand = self.select(t)
        n_new = cand.numel() - n_owned
        A = torch.cat([self.A[cand[:n_owned]], self.A_new[:n_new]])[pos]
        B = torch.cat([self.B[cand[:n_owned]], self.B_new[:n_new]])[pos]
        return A, B, self.router.weight[t][cand[pos]]

    # ---- forward ------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """W0 x plus the routed sub-experts of each example's task (see the class docstring)."""
        out = self.base(x)
        ctx = self.ctx
        if not ctx.active or ctx.task_ids is None:
            raise RuntimeError("MoSE layer called outside a routed forward: call the method (forward/generate), "
                               "not its model, so the key layer can pick each example's task first")
        delta = self._train_delta(x, ctx.train_task) if ctx.train_task is not None else self._infer_delta(x)
        return out if delta is None else out + delta.to(out.dtype)

    def _train_delta(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """Training path of task t (every row is task t): all candidates computed so the STE reaches their scores.

        With hard mask m = top-k(u) (value) and m + u − sg(u) (gradient, straight-through as in WSN), each candidate's
        weight is w_e = m_e exp(l_e − LSE_{j ∈ m} l_j), l = W_r^t x / τ: the softmax over the mask for selected experts,
        0 for the others, whose scores still get ∂L/∂m_e = exp(l_e − LSE) ⟨∂L/∂y, s B_e A_e x⟩.
        """
        cand, n_owned = self.candidates()
        n_c, n_new = cand.numel(), cand.numel() - n_owned
        A = torch.cat([self.A[cand[:n_owned]], self.A_new[:n_new]])  # (n_c, r, d_in): owned frozen, slots trained
        B = torch.cat([self.B[cand[:n_owned]], self.B_new[:n_new]])  # (n_c, d_out, r)
        u = self.selection_scores(t, cand, n_owned)
        hard = torch.zeros_like(u).index_fill_(0, u.topk(self.top_k).indices, 1.0)
        m = hard + u - u.detach()
        # one matmul for all down-projections and the router logits
        down = torch.cat([A.reshape(n_c * self.rank, -1), self.router.weight[t][cand]])
        z = F.linear(x.to(down.dtype), down)
        h, logits = z.split([n_c * self.rank, n_c], dim=-1)
        logits = logits.float() / self.router.temperature
        lse = logits.masked_fill(hard == 0, float("-inf")).logsumexp(-1, keepdim=True)
        w = (logits - lse).clamp(max=30.0).exp() * m  # clamp: an unselected expert's exp must not overflow to inf·0
        h = (h.unflatten(-1, (n_c, self.rank)) * w.unsqueeze(-1).to(h.dtype)).flatten(-2)
        up = B.transpose(1, 2).reshape(n_c * self.rank, -1)  # rows ordered (expert, rank) like h
        return self.scaling * (h @ up.to(h.dtype))

    def _infer_delta(self, x: torch.Tensor) -> torch.Tensor | None:
        """Inference path: only each example's k selected experts (k·r_s + k columns per example, whatever N is)."""
        ctx = self.ctx
        if self._table is None or self._table[0] != ctx.version:
            self._table = (ctx.version, *self._build_table(ctx.task_ids))
        _, down, up, valid = self._table
        if down.numel() == 0:  # no example has a task (zero-shot): the base model
            return None
        k, r = self.top_k, self.rank
        z = torch.bmm(x.to(down.dtype), down)  # (b, tokens, k·r + k)
        h, logits = z.split([k * r, k], dim=-1)
        g = (logits.float() / self.router.temperature).softmax(-1) * valid
        h = (h.unflatten(-1, (k, r)) * g.unsqueeze(-1).to(h.dtype)).flatten(-2)
        return self.scaling * torch.bmm(h, up.to(h.dtype))

    def _build_table(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-example fused tables for one routing decision (reused by every decoding step of a generate call).

        down (b, d_in, k·r + k) = [A_e rows of m_τ ; W_r^τ rows of m_τ]ᵀ, up (b, k·r, d_out), valid (b, 1, 1).
        """
        valid = ids >= 0
        if not bool(valid.any()):
            return torch.empty(0), torch.empty(0), torch.empty(0)
        finished = self.router.masks[:, 0] >= 0
        tasks = ids[valid].unique().tolist()
        tables = [self.task_table(t, finished=bool(finished[t])) for t in tasks]
        k, r = self.top_k, self.rank
        down = torch.stack([torch.cat([A.reshape(k * r, -1), W]).T for A, B, W in tables])  # (n_tasks, d_in, kr+k)
        up = torch.stack([B.transpose(1, 2).reshape(k * r, -1) for A, B, W in tables])  # (n_tasks, kr, d_out)
        where = torch.zeros_like(ids)
        for i, t in enumerate(tasks):
            where[ids == t] = i
        down, up = down[where].detach(), up[where].detach()
        device_type = down.device.type
        if torch.is_autocast_enabled(device_type):
            # cast once per routing decision, not at every decoding step (autocast caches casts of leaf parameters
            # only, and these tables are not leaves)
            dtype = torch.get_autocast_dtype(device_type)
            down, up = down.to(dtype), up.to(dtype)
        return down, up, valid.to(torch.float32)[:, None, None]


class _StopForward(Exception):
    """Raised by a hook to end a forward pass early (the prompt-free query needs only the layers below the key)."""


def _pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q(x): mean of the hidden states over the masked tokens (float32, detached)."""
    weights = mask.to(torch.float32).unsqueeze(-1)
    return (hidden.detach().float() * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def _find_layer_module(model: nn.Module, index: int) -> nn.Module:
    """The decoder layer ``...layers.<index>`` (its output is the residual stream), or the token embeddings (-1)."""
    if index < 0:
        return model.get_input_embeddings()
    for name, module in model.named_modules():
        match = _DECODER_LAYER.search(name)
        if match and int(match.group(1)) == index:
            return module
    raise ConfigError(f"key_layer {index}: the model has no module named '...layers.{index}'")


@register_method("moses")
class MoSEs(CLMethod):
    """MoSEs (Kang, 2025): per-task sparse masks over a pool of LoRA sub-experts, chosen by prompt keys at test."""

    config_class = MoSEsConfig
    supports_oracle_task_id = True

    def __init__(self, model: nn.Module, tokenizer: Any, cfg: MoSEsConfig, num_tasks: int):
        super().__init__(model, tokenizer, cfg, num_tasks)
        n_layers = num_layers(model)
        layers = list(cfg.layers) if cfg.layers is not None else list(range(n_layers // 2, n_layers))
        if not layers or any(not 0 <= i < n_layers for i in layers):
            raise ConfigError(f"layers must be indices in 0..{n_layers - 1}, got {cfg.layers}")
        self.key_layer = cfg.key_layer if cfg.key_layer is not None else min(layers) - 1
        if not -1 <= self.key_layer < min(layers):
            # the query must not depend on the routing it decides (and must come from the frozen model)
            raise ConfigError(f"key_layer must be in -1..{min(layers) - 1} (below the first MoSE layer "
                              f"{min(layers)}; -1 = token embeddings), got {self.key_layer}")
        self.ctx = RoutingContext()
        self._mose_layers: dict[str, MoSELinear] = inject(
            model, list(cfg.target_modules),
            lambda name, linear: MoSELinear(linear, cfg.num_experts, cfg.rank, cfg.alpha, cfg.top_k, num_tasks,
                                            cfg.temperature, self.ctx, cfg.new_expert_score),
            layers)
        d_key = model.get_input_embeddings().embedding_dim
        self.keys = nn.ParameterList([nn.Parameter(0.02 * torch.randn(d_key)) for _ in range(num_tasks)])
        # L2P-style task prompts P_t (L × d), started at L random vocabulary embeddings (Lester et al., 2021)
        embeddings = model.get_input_embeddings().weight.detach()
        self.prompts = nn.ParameterList([
            nn.Parameter(embeddings[torch.randint(0, embeddings.shape[0], (cfg.prompt_length,))].clone().float())
            for _ in range(num_tasks if cfg.prompt_length > 0 else 0)])
        self.register_buffer("task_done", torch.zeros(num_tasks, dtype=torch.bool))
        self.register_buffer("key_ready", torch.zeros(num_tasks, dtype=torch.bool))
        self._key_hook = _find_layer_module(model, self.key_layer).register_forward_hook(self._on_key_layer)
        self._task_names: dict[int, str] = {}
        self._last_query: torch.Tensor | None = None
        self._last_choice: torch.Tensor | None = None
        self._chosen: list[tuple[int, int]] = []

    # ---- task hooks ---------------------------------------------------------------------------------------------
    def begin_task(self, t: int, task: Task) -> None:
        """Reserve task t's fresh slots in every layer; only its slots, router, scores and key train."""
        super().begin_task(t, task)
        self._task_names[t] = task.name
        for p in self.parameters():
            p.requires_grad_(False)
        for layer in self._mose_layers.values():
            layer.reserve(t, self.cfg.budget)
            for p in (layer.A_new, layer.B_new, layer.router.weight[t], layer.router.scores[t]):
                p.requires_grad_(True)
        self.keys[t].requires_grad_(True)
        if self.cfg.prompt_length > 0:
            self.prompts[t].requires_grad_(True)

    def end_task(self, t: int, task: Task, train_loader: Any = None) -> None:
        """Fix m_t, hand the selected fresh slots to task t (frozen from now on), and mark the task finished."""
        for layer in self._mose_layers.values():
            layer.fix_mask(t)
        self.task_done[t] = True
        self.zero_grad(set_to_none=True)  # Lightning leaves the last step's gradients on the now-frozen parameters

    # ---- routing ------------------------------------------------------------------------------------------------
    def active_tasks(self) -> torch.Tensor:
        """Tasks an example may be routed to: the finished ones plus the task being trained (bool, per task)."""
        active = self.task_done.clone()
        if 0 <= self.current_task < self.num_tasks:
            active[self.current_task] = True
        return active

    def nearest_task(self, query: torch.Tensor) -> torch.Tensor:
        """τ(x) = argmax over active tasks of cos(q(x), k_t); -1 where no task is active."""
        active = self.active_tasks()
        if not bool(active.any()):
            return torch.full((query.shape[0],), -1, dtype=torch.long, device=query.device)
        keys = torch.stack(list(self.keys)).detach().float()
        cos = F.normalize(query.float(), dim=-1) @ F.normalize(keys, dim=-1).T
        return cos.masked_fill(~active.to(cos.device), float("-inf")).argmax(-1)

    def _query_mask(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # The prompt tokens, BOS excluded: BOS is an attention sink with massive activations (SmolLM2 layer 14: norm
        # ~25000 vs ~150 for other tokens), so averaging it in makes every task's query the same vector (cos 0.999).
        mask = batch.get("prompt_mask", batch["attention_mask"]).bool()
        bos = getattr(self.tokenizer, "bos_token_id", None)
        if bos is None:
            return mask
        no_bos = mask & (batch["input_ids"] != bos)
        return torch.where(no_bos.any(-1, keepdim=True), no_bos, mask)

    @contextlib.contextmanager
    def _routing(self, batch: dict[str, torch.Tensor], forced: torch.Tensor | None,
                 train_task: int | None = None) -> Iterator[RoutingContext]:
        ctx = self.ctx
        ctx.reset()
        ctx.active = True
        ctx.query_mask = self._query_mask(batch)
        ctx.forced = forced
        ctx.train_task = train_task
        try:
            yield ctx
        finally:
            self._last_query, self._last_choice = ctx.query, ctx.key_choice
            ctx.reset()

    def _on_key_layer(self, module: nn.Module, args: Any, output: Any) -> None:
        """Forward hook on the key layer: q(x), then each example's task, before any MoSE layer runs.

        Fires once per forward; during generation only the prefill step decides, decoding steps reuse the decision.
        """
        ctx = self.ctx
        if not ctx.active or ctx.task_ids is not None:
            return
        hidden = output[0] if isinstance(output, tuple) else output
        mask = ctx.query_mask
        if mask.shape != hidden.shape[:2]:
            raise RuntimeError(f"prompt mask {tuple(mask.shape)} does not match the hidden states "
                               f"{tuple(hidden.shape[:2])} at the key layer")
        self._decide(ctx, _pool(hidden, mask))

    def _decide(self, ctx: RoutingContext, query: torch.Tensor) -> None:
        """Record q(x), the nearest key's task and the task each example takes (forced id if given, else the key)."""
        ctx.query = query
        ctx.key_choice = self.nearest_task(query)
        ctx.task_ids = ctx.forced if ctx.forced is not None else ctx.key_choice
        ctx.version += 1

    # ---- task prompts (prompt_length > 0) -------------------------------------------------------------------------
    @torch.no_grad()
    def _prompt_free_query(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """q(x) from the frozen layers up to the key layer, run on the input alone.

        With prompts, the task must be known before its prompt enters the input, so (as in L2P) the query comes
        from a separate pass without any prompt, stopped at the key layer: about key_layer/L_model of a forward,
        once per training step and once per ``generate`` call. Without prompts the main pass's hook computes the
        same q(x).
        """
        captured: dict[str, torch.Tensor] = {}

        def stop(module: nn.Module, args: Any, output: Any) -> None:
            captured["hidden"] = output[0] if isinstance(output, tuple) else output
            raise _StopForward

        handle = _find_layer_module(self.model, self.key_layer).register_forward_hook(stop)
        try:
            self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        except _StopForward:
            pass
        finally:
            handle.remove()
        return _pool(captured["hidden"], self._query_mask(batch))

    def _prompted(self, batch: dict[str, torch.Tensor], task_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Model inputs with P_τ(x) in front of each example (inputs_embeds); attention mask and labels extended.

        An example with no task (τ = -1) gets its prompt positions masked out, so it sees the base model."""
        embeds = self.model.get_input_embeddings()(batch["input_ids"])
        n, length = embeds.shape[0], self.cfg.prompt_length
        has_task = (task_ids >= 0).to(embeds.device)
        prefix = torch.stack(list(self.prompts))[task_ids.clamp(min=0)].to(embeds.dtype)
        prefix = prefix * has_task[:, None, None].to(embeds.dtype)
        mask = batch["attention_mask"]
        inputs = {"inputs_embeds": torch.cat([prefix, embeds], 1),
                  "attention_mask": torch.cat([has_task[:, None].expand(n, length).to(mask.dtype), mask], 1)}
        if batch.get("labels") is not None:
            labels = batch["labels"]
            inputs["labels"] = torch.cat([torch.full((n, length), IGNORE_INDEX, dtype=labels.dtype,
                                                     device=labels.device), labels], 1)
        return inputs

    def _prompted_forward(self, batch: dict[str, torch.Tensor], ctx: RoutingContext) -> Any:
        """Forward with task prompts: decide from the prompt-free query, then run the prompted input."""
        self._decide(ctx, self._prompt_free_query(batch))
        out = self.model(**self._prompted(batch, ctx.task_ids), use_cache=False)
        out["logits"] = out.logits[:, self.cfg.prompt_length:]  # one logit row per input token, as without prompts
        return out

    def _oracle_ids(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        if "task_id" not in batch:
            return None
        ids = batch["task_id"].to(self.task_done.device)
        # a task not trained yet has no mask: its examples get the base model (as per-task-lora's untrained adapters)
        return torch.where(self.active_tasks()[ids.clamp(0, self.num_tasks - 1)], ids, torch.full_like(ids, -1))

    # ---- training -----------------------------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        """LM forward. Training: every row is the current task; eval: oracle ``task_id`` if given, else nearest key."""
        if self.training:
            t = self.current_task
            if t < 0:
                raise RuntimeError("begin_task must be called before training MoSEs")
            forced = torch.full((batch["input_ids"].shape[0],), t, dtype=torch.long, device=batch["input_ids"].device)
            with self._routing(batch, forced, train_task=t) as ctx:
                if self.cfg.prompt_length > 0:
                    out = self._prompted_forward(batch, ctx)
                else:
                    out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                     labels=batch.get("labels"), use_cache=False)
            if self.cfg.key_init == "first_batch" and not bool(self.key_ready[t]):
                self._init_key(t, self._last_query)
            return out
        with self._routing(batch, self._oracle_ids(batch)) as ctx:
            if self.cfg.prompt_length > 0:
                return self._prompted_forward(batch, ctx)
            return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              labels=batch.get("labels"), use_cache=False)

    def on_train_start(self) -> None:
        """Force train mode: Lightning keeps whatever mode the module was left in, and in eval mode ``forward``
        routes like inference (frozen per-example tables), so the task's slots, router and scores would not learn."""
        super().on_train_start()
        self.train()

    @torch.no_grad()
    def _init_key(self, t: int, query: torch.Tensor) -> None:
        # Our reading: L2P draws keys at random. LLM hidden states point along a few massive dimensions, and Adam moves
        # every coordinate by ~lr per step, so a random key needs thousands of steps to align; starting k_t at its
        # first batch's mean query (averaged over ranks so DDP replicas agree) leaves the pull only the fine-tuning.
        mean = query.float().mean(0)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(mean)
            mean /= torch.distributed.get_world_size()
        self.keys[t].copy_(mean.to(self.keys[t].dtype))
        self.key_ready[t] = True

    def regularizer(self, batch: dict[str, torch.Tensor], out: Any) -> dict[str, torch.Tensor]:
        """Pull constraint λ_p · mean_x (1 − cos(q(x), k_t)); q is from the frozen layers, so only k_t learns."""
        key = self.keys[self.current_task]
        cos = F.cosine_similarity(self._last_query.to(key.dtype), key.unsqueeze(0), dim=-1)
        return {"pull": self.cfg.pull_weight * (1.0 - cos).mean()}

    def configure_optimizers(self) -> Any:
        """AdamW with one group per part: sub-experts (lr), routers (router_lr), mask scores and keys (no decay)."""
        cfg = self.cfg
        experts = [p for layer in self._mose_layers.values() for p in (layer.A_new, layer.B_new) if p.requires_grad]
        routers = [p for layer in self._mose_layers.values() for p in layer.router.weight if p.requires_grad]
        scores = [p for layer in self._mose_layers.values() for p in layer.router.scores if p.requires_grad]
        keys = [p for p in (*self.keys, *self.prompts) if p.requires_grad]
        groups = [{"params": experts, "lr": cfg.lr}, {"params": routers, "lr": cfg.router_lr},
                  {"params": scores, "lr": cfg.score_lr, "weight_decay": 0.0},
                  {"params": keys, "lr": cfg.key_lr, "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        if not groups:
            raise RuntimeError(f"moses has no trainable parameters for task {self.current_task}")
        opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        if cfg.warmup_steps <= 0:
            return opt
        warm = cfg.warmup_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---- inference ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, batch: dict[str, torch.Tensor], max_new_tokens: int) -> torch.Tensor:
        """Greedy generation; the prefill pass picks each example's task (oracle id or nearest key) at the key layer."""
        with self._routing(batch, self._oracle_ids(batch)) as ctx:
            if self.cfg.prompt_length == 0:
                return super().generate(batch, max_new_tokens)
            self._decide(ctx, self._prompt_free_query(batch))
            # with only inputs_embeds, generate returns just the new tokens
            return self.model.generate(**self._prompted(batch, ctx.task_ids), max_new_tokens=max_new_tokens,
                                       do_sample=False, pad_token_id=self.tokenizer.pad_token_id,
                                       eos_token_id=self.tokenizer.eos_token_id)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> list[str]:
        """Generate, and remember which task each example's key chose (for ``task_id_accuracy``)."""
        texts = super().predict_step(batch, batch_idx, dataloader_idx)
        chosen = self._last_choice.tolist() if self._last_choice is not None else [-1] * len(texts)
        self._chosen.extend(zip(batch["index"].tolist(), chosen, strict=True))
        return texts

    def on_predict_epoch_start(self) -> None:
        """Fresh prediction and task-choice buffers."""
        super().on_predict_epoch_start()
        self._chosen = []

    def on_predict_epoch_end(self) -> None:
        """Gather predictions (base class) and the key choices of every rank, in example order."""
        super().on_predict_epoch_end()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, self._chosen)
            merged = {i: c for part in gathered for i, c in part}
        else:
            merged = dict(self._chosen)
        self._chosen = sorted(merged.items())

    def evaluation_report(self, j: int, task: Task) -> dict[str, float]:
        """``task_id_accuracy``: share of task j's test examples whose nearest key was task j's.

        Reported under ``--oracle-task-id`` too (routing then uses the true id; the number says what keys would do).
        Omitted (NaN in the matrix) for tasks not trained yet, which no key can choose.
        """
        if not bool(self.task_done[j]) or not self._chosen:
            return {}
        return {"task_id_accuracy": sum(c == j for _, c in self._chosen) / len(self._chosen)}

    # ---- bookkeeping --------------------------------------------------------------------------------------------
    def _task_params(self, t: int) -> dict[str, int]:
        """What finished task t added: its new experts, its router rows and mask (k per layer) and its key."""
        new = reused = added = 0
        for layer in self._mose_layers.values():
            mask = layer.router.masks[t]
            n_new = int((layer.owner[mask] == t).sum())
            new += n_new
            reused += layer.top_k - n_new
            # a finished task needs only the router rows of its mask (k × d_in) and the k mask indices
            added += n_new * layer.expert_params(0) + layer.top_k * (layer.in_features + 1)
        prompt = self.prompts[t].numel() if self.cfg.prompt_length > 0 else 0
        return {"new_experts": new, "reused_experts": reused, "added": added + self.keys[t].numel() + prompt}

    def param_report(self) -> dict[str, int]:
        """Parameter counts for the growth curve.

        ``trainable``: what the latest task's optimiser can move (its fresh slots, the router rows and scores of its
        candidates, its key; not the pre-allocated rows that never get a gradient); ``frozen``: what the finished
        tasks added and froze: owned experts, k router rows + k mask indices per layer and task, keys; ``added``:
        ``frozen`` plus the running task's trainables while a task is in progress (never the untouched
        pre-allocated pool); ``total``: base + added, what a deployment stores.
        """
        t = self.current_task
        trainable = 0
        if 0 <= t < self.num_tasks:
            trainable = sum(layer.trained_params(t) for layer in self._mose_layers.values()) + self.keys[t].numel()
            trainable += self.prompts[t].numel() if self.cfg.prompt_length > 0 else 0
        frozen = sum(self._task_params(i)["added"] for i in range(self.num_tasks) if bool(self.task_done[i]))
        running = 0 <= t < self.num_tasks and not bool(self.task_done[t])
        added = frozen + (trainable if running else 0)
        return {"trainable": trainable, "added": added, "frozen": frozen, "total": self.base_param_count + added}

    def write_artifacts(self, run_dir: Path) -> None:
        """``expert_usage.csv`` (task, layer, expert, new_or_reused, owner), its figure ``expert_usage.png`` and
        ``param_growth.csv`` (per task)."""
        run_dir = Path(run_dir)
        done = [t for t in range(self.num_tasks) if bool(self.task_done[t])]
        with open(run_dir / "expert_usage.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["task_index", "task", "layer", "layer_index", "module", "expert", "new_or_reused",
                             "owner_task"])
            for t in done:
                for name, layer in self._mose_layers.items():
                    for e in layer.router.masks[t].tolist():
                        owner = int(layer.owner[e])
                        writer.writerow([t, self._task_names.get(t, str(t)), name, layer_index(name),
                                         name.rsplit(".", 1)[-1], e, "new" if owner == t else "reused", owner])
        with open(run_dir / "param_growth.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["task_index", "task", "new_experts", "reused_experts", "added_params",
                             "cumulative_added_params", "experts_owned"])
            total = owned = 0
            for t in done:
                part = self._task_params(t)
                total += part["added"]
                owned += part["new_experts"]
                writer.writerow([t, self._task_names.get(t, str(t)), part["new_experts"], part["reused_experts"],
                                 part["added"], total, owned])
        if done:
            plot_expert_usage(run_dir / "expert_usage.csv", run_dir / "expert_usage.png")


__all__ = ["MoSEs", "MoSEsConfig", "MoSELinear", "MoSERouter", "RoutingContext"]
