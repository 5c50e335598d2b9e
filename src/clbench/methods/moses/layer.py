"""The MoSE layer: a frozen linear with a pool of rank-r_s LoRA sub-experts, per-task routers, mask scores and masks.

Per example b routed to task τ (its mask m_τ: the k experts the task may use, its own and the ones it borrows)::

    s_b   = W_r^τ[m_τ] x̄_b / temp                    x̄_b: mean of this layer's input over b's prompt tokens
    S_b   = top-k_x(s_b)                              the sparse per-input choice ("activates only the most relevant")
    g(x)  = softmax_{e ∈ S_b}(W_r^τ x / temp)         token gates within the choice
    y     = W0 x + s Σ_{e ∈ S_b} g_e(x) B_e A_e x     s = alpha / r_s

With k_x = k every example uses its whole mask (the per-task routing of the first version, kept as an ablation).
The layer never looks up who decided τ: each call gets a :class:`LayerRoute` (task per example, prompt-token mask,
training task), handed over by ``routing.bound`` for exactly one model call because the transformer calls
``q_proj(x)`` with ``x`` alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .._experts import ExpertLinear


@dataclass
class LayerRoute:
    """What one model call tells every MoSE layer.

    ``task_ids`` (batch,): each example's task, -1 = base model (filled by the key-layer hook before any MoSE layer
    runs); ``token_mask`` (batch, tokens): the tokens averaged into x̄ (prompt tokens, BOS and task-prompt slots
    excluded); ``train_task``: the task being trained (its rows take the mask-learning path), None at inference.
    ``tables`` and ``choices`` are filled by the layers at the first (prefill) step and reused by every decoding step
    of the same call: fused per-example expert tables, and the pool rows S_b each example activated (-1: none).
    """

    token_mask: torch.Tensor
    task_ids: torch.Tensor | None = None
    train_task: int | None = None
    tables: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    choices: dict[int, torch.Tensor] = field(default_factory=dict)


def mean_over_tokens(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x̄ = Σ_i mask_i x_i / Σ_i mask_i (batch, d), float32 (the router's per-example input)."""
    w = mask.to(torch.float32).unsqueeze(-1)
    return (x.float() * w).sum(1) / w.sum(1).clamp(min=1.0)


class MoSELinear(ExpertLinear):
    """A frozen linear with a MoSE pool; see the module docstring for the formula.

    The pool (``A``, ``B``) is never trained in place: the current task's fresh experts live in the slots
    ``A_new``/``B_new`` (copied into the pool at :meth:`fix_mask`), so an earlier task's experts are frozen by
    ``requires_grad = False`` and no optimiser (weight decay, momentum) can touch them. Routers ``router_weight[t]``
    (N × d_in, zero init = uniform gates) and mask scores ``scores[t]`` (N) are one Parameter per task, frozen by
    requires_grad when the task ends; masks are a buffer. All state is allocated here (resume, DDP spawn).
    """

    def __init__(self, base: nn.Linear, num_experts: int, rank: int, alpha: float, top_k: int, experts_per_input: int,
                 num_tasks: int, temperature: float, head_start: float = 0.0):
        super().__init__(base, num_experts, rank, alpha, router=None)
        self.A.requires_grad_(False)
        self.B.requires_grad_(False)
        self.top_k = top_k
        self.experts_per_input = experts_per_input
        self.temperature = temperature
        self.head_start = head_start
        self.route: LayerRoute | None = None  # set by routing.bound for one model call, None otherwise
        self.router_weight = nn.ParameterList([nn.Parameter(torch.zeros(num_experts, base.in_features))
                                               for _ in range(num_tasks)])
        self.scores = nn.ParameterList([nn.Parameter(1e-2 * torch.randn(num_experts)) for _ in range(num_tasks)])
        self.register_buffer("masks", torch.full((num_tasks, top_k), -1, dtype=torch.long))
        self.A_new = nn.Parameter(torch.zeros(top_k, rank, base.in_features))
        self.B_new = nn.Parameter(torch.zeros(top_k, base.out_features, rank))
        self.register_buffer("owner", torch.full((num_experts,), -1, dtype=torch.long))  # task owning each expert
        self.register_buffer("slots", torch.full((top_k,), -1, dtype=torch.long))  # pool rows of the fresh slots
        # per task: candidates and fresh slots it had (what its optimiser could move; kept for param_report)
        self.register_buffer("n_candidates", torch.zeros(num_tasks, dtype=torch.long))
        self.register_buffer("n_slots", torch.zeros(num_tasks, dtype=torch.long))

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
        """Pool rows the running task may select: every owned expert, then the fresh slots; and how many are owned."""
        owned = (self.owner >= 0).nonzero().squeeze(1)
        return torch.cat([owned, self.slots[self.slots >= 0]]), owned.numel()

    def selection_scores(self, t: int, cand: torch.Tensor, n_owned: int) -> torch.Tensor:
        """u_t of the candidates plus the fresh slots' head start (a constant: the STE gradient is unchanged)."""
        u = self.scores[t][cand]
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
            self.masks[t] = chosen.sort().values
            for j in range(int((self.slots >= 0).sum())):
                row = int(self.slots[j])
                if bool((chosen == row).any()):
                    self.A[row] = self.A_new[j]
                    self.B[row] = self.B_new[j]
                    self.owner[row] = t
            self.slots.fill_(-1)

    def task_table(self, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A (k, r, d_in), B (k, d_out, r), W_r rows (k, d_in), pool rows (k,)) of task t's mask: the stored m_t
        once the task is finished, its current selection while it is still training (fresh slots have pool row
        ids too: the rows they will be copied into)."""
        if int(self.masks[t, 0]) >= 0:
            idx = self.masks[t]
            return self.A[idx], self.B[idx], self.router_weight[t][idx], idx
        pos, n_owned, cand = self.select(t)
        n_new = cand.numel() - n_owned
        A = torch.cat([self.A[cand[:n_owned]], self.A_new[:n_new]])[pos]
        B = torch.cat([self.B[cand[:n_owned]], self.B_new[:n_new]])[pos]
        return A, B, self.router_weight[t][cand[pos]], cand[pos]

    # ---- forward ------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """W0 x plus the routed sub-experts of each example's task (see the module docstring)."""
        out = self.base(x)
        route = self.route
        if route is None or route.task_ids is None:
            raise RuntimeError("MoSE layer called outside a routed forward: call the method (forward/generate), "
                               "not its model, so the key layer can pick each example's task first")
        delta = self.train_delta(x, route) if route.train_task is not None else self.infer_delta(x, route)
        return out if delta is None else out + delta.to(out.dtype)

    def train_delta(self, x: torch.Tensor, route: LayerRoute) -> torch.Tensor:
        """Training path of task t (every row is task t): all candidates computed so the STE reaches their scores.

        Hard mask m = top-k(u) (value) with m + u − sg(u) (gradient, straight-through as in WSN). Per example the
        choice S_b = top-k_x of the mask's mean logits s_b (a hard 0/1 choice). Each candidate's weight per token is
        w_e = m_e · c_e · exp(l_e − LSE_{j ∈ S_b} l_j), l = W_r^t x / temp, with c_e = 1 for e ∈ S_b and for
        experts outside the mask (value 0 there, since m_e = 0, but their score gets ∂L/∂u_e = exp(l_e − LSE)
        ⟨∂L/∂y, s B_e A_e x⟩: how much the expert would help), and c_e = 0 for mask experts this input did not
        choose: they get no gradient from this input, neither their A, B nor their gate.
        """
        t = route.train_task
        cand, n_owned = self.candidates()
        n_c, n_new = cand.numel(), cand.numel() - n_owned
        A = torch.cat([self.A[cand[:n_owned]], self.A_new[:n_new]])  # (n_c, r, d_in): owned frozen, slots trained
        B = torch.cat([self.B[cand[:n_owned]], self.B_new[:n_new]])  # (n_c, d_out, r)
        u = self.selection_scores(t, cand, n_owned)
        hard = torch.zeros_like(u).index_fill_(0, u.topk(self.top_k).indices, 1.0)
        m = hard + u - u.detach()
        # one matmul for all down-projections and the router logits
        down = torch.cat([A.reshape(n_c * self.rank, -1), self.router_weight[t][cand]])
        z = F.linear(x.to(down.dtype), down)
        h, logits = z.split([n_c * self.rank, n_c], dim=-1)
        logits = logits.float() / self.temperature
        chosen = self.choose(logits.detach(), route.token_mask, hard.bool())  # (b, n_c) bool: S_b
        lse = logits.masked_fill(~chosen[:, None, :], float("-inf")).logsumexp(-1, keepdim=True)
        keep = (chosen | ~hard.bool()[None, :]).to(logits.dtype)[:, None, :]
        w = (logits - lse).clamp(max=30.0).exp() * m * keep  # clamp: an unchosen expert's exp must not overflow
        h = (h.unflatten(-1, (n_c, self.rank)) * w.unsqueeze(-1).to(h.dtype)).flatten(-2)
        up = B.transpose(1, 2).reshape(n_c * self.rank, -1)  # rows ordered (expert, rank) like h
        return self.scaling * (h @ up.to(h.dtype))

    def choose(self, logits: torch.Tensor, token_mask: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """S_b as a (batch, n) bool: the k_x experts of ``allowed`` (n,) with the highest mean logit over each
        example's prompt tokens (logits (batch, tokens, n)). Ties break by position (torch.topk)."""
        s = mean_over_tokens(logits, token_mask).masked_fill(~allowed[None, :], float("-inf"))
        k = min(self.experts_per_input, int(allowed.sum()))
        return torch.zeros_like(s, dtype=torch.bool).scatter_(1, s.topk(k, dim=-1).indices, True)

    def infer_delta(self, x: torch.Tensor, route: LayerRoute) -> torch.Tensor | None:
        """Inference path: only each example's k_x chosen experts (k_x·r_s + k_x columns per example, whatever N
        and k are). Tables are built at the call's first step (the prefill) and reused by its decoding steps."""
        key = id(self)
        if key not in route.tables:
            route.tables[key], route.choices[key] = self.build_tables(x, route)
        down, up, valid = route.tables[key]
        if down.numel() == 0:  # no example has a task (zero-shot): the base model
            return None
        k, r = self.experts_per_input, self.rank
        z = torch.bmm(x.to(down.dtype), down)  # (b, tokens, k_x·r + k_x)
        h, logits = z.split([k * r, k], dim=-1)
        g = (logits.float() / self.temperature).softmax(-1) * valid
        h = (h.unflatten(-1, (k, r)) * g.unsqueeze(-1).to(h.dtype)).flatten(-2)
        return self.scaling * torch.bmm(h, up.to(h.dtype))

    @torch.no_grad()
    def build_tables(self, x: torch.Tensor, route: LayerRoute
                     ) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        """Per-example fused tables for one routing decision, and the pool rows each example chose.

        down (b, d_in, k_x·r + k_x) = [A_e rows ; W_r^τ rows]ᵀ of S_b, up (b, k_x·r, d_out), valid (b, 1, 1);
        choices (b, k_x) pool rows (-1 for examples without a task). The router scores only the k mask rows.
        """
        ids = route.task_ids
        b, k, r = ids.shape[0], self.experts_per_input, self.rank
        choices = torch.full((b, k), -1, dtype=torch.long, device=ids.device)
        valid = ids >= 0
        if not bool(valid.any()):
            return (torch.empty(0), torch.empty(0), torch.empty(0)), choices
        x_bar = mean_over_tokens(x, route.token_mask)  # (b, d_in)
        down = torch.zeros(b, self.in_features, k * r + k, device=x.device)
        up = torch.zeros(b, k * r, self.out_features, device=x.device)
        for t in ids[valid].unique().tolist():
            rows = (ids == t).nonzero().squeeze(1)
            A, B, W, pool_rows = self.task_table(t)
            s = (x_bar[rows] @ W.float().T) / self.temperature  # (rows, k): scores of the mask's experts
            pos = s.topk(k, dim=-1).indices  # (rows, k_x)
            choices[rows] = pool_rows[pos]
            down[rows] = torch.cat([A[pos].flatten(1, 2), W[pos]], 1).transpose(1, 2).float()
            up[rows] = B[pos].transpose(2, 3).flatten(1, 2).float()
        device_type = down.device.type
        if torch.is_autocast_enabled(device_type):
            # cast once per routing decision, not at every decoding step (autocast caches casts of leaf parameters
            # only, and these tables are not leaves)
            dtype = torch.get_autocast_dtype(device_type)
            down, up = down.to(dtype), up.to(dtype)
        return (down, up, valid.to(torch.float32)[:, None, None]), choices
