"""A SETA layer: a frozen linear plus a budget of M rank-1 sub-blocks, each free, shared, or one task's unique one.

    y = W0 x + s Σ_m w_m(x) b_m a_m^T x,     a_m ∈ R^{d_in} (kaiming-uniform), b_m ∈ R^{d_out} (zero at init)

w_m(x) = g_{group(m)}(x), the unified gate's output for the expert the sub-block belongs to (the shared expert, or
task t's unique expert), and 0 for free sub-blocks. The M sub-blocks are computed together as two thin matmuls
(x → M values → d_out): no Python loop over experts or sub-blocks.

Split-on-Share, at the start of each task t (from the squared gradients of the task's first training batch):

    s_m = Σ_{θ ∈ {a_m, b_m}} E_x[(∂L/∂θ)²]           gradient sensitivity of sub-block m (squared gradient, not |g·w|:
                                                    free sub-blocks have b_m = 0, so g·w would be 0 for all of them)
    ŝ_m = s_m / max_{m' ∈ group} s_{m'}             within its group (free or shared), so the two are never compared
    relevant(m) ⇔ ŝ_m ≥ τ,   τ = threshold, or (dynamic, default) τ_t = mean_{m' ∈ group} ŝ_{m'}
    unique(t)  = the ≤ unique_blocks most sensitive relevant free sub-blocks        (frozen for good after task t)
    shared     = (first task only) the next shared_blocks most sensitive free sub-blocks (seeds the shared expert)
    update(t)  = the relevant shared sub-blocks                           (the only shared ones task t may move)

Why two copies of the sub-blocks: ``A``/``B`` (Parameters, what the optimiser holds) and ``A_store``/``B_store``
(buffers, the authoritative values). The forward uses the Parameter rows only where ``trainable`` is set; every other
row comes from the store, which only :meth:`SETALinear.commit` writes. So AdamW's weight decay and momentum can never
move a frozen sub-block, and a finished task's unique sub-blocks stay bitwise unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .._experts import ExpertLinear

FREE = -1  # owner of a sub-block no task has taken
SHARED = -2  # owner of a sub-block of the shared expert


class RoutingContext:
    """The per-example gate outputs of the current forward, set by the method and read by every SETA layer.

    ``gates``: (batch, 1 + G) with column 0 = 0 (the "no expert" column of free sub-blocks), column 1 + e = output e
    of the unified gate. None outside the method's forward / generate (a layer then refuses to run).
    """

    def __init__(self) -> None:
        self.gates: torch.Tensor | None = None


@dataclass
class Split:
    """Task t's Split-on-Share decision for one layer (boolean masks over the M sub-blocks)."""

    unique: torch.Tensor  # free sub-blocks that become task t's unique expert
    new_shared: torch.Tensor  # free sub-blocks that become shared (first task only)
    update: torch.Tensor  # existing shared sub-blocks task t may move


def block_sensitivity(sq_grad_A: torch.Tensor, sq_grad_B: torch.Tensor) -> torch.Tensor:
    """s_m = Σ over sub-block m's parameters of E[g²].

    ``sq_grad_A`` (M, 1, d_in) and ``sq_grad_B`` (M, d_out, 1): mean squared gradients of A and B → (M,).
    """
    return sq_grad_A.flatten(1).sum(1) + sq_grad_B.flatten(1).sum(1)


def relevant(sensitivity: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """ŝ = s / max s ≥ τ (τ = ``threshold``, or the mean of ŝ when None: the dynamic default). All-zero s: all True
    (then the most sensitive ones are picked in index order)."""
    top = sensitivity.max() if sensitivity.numel() else sensitivity.new_zeros(())
    if sensitivity.numel() == 0 or top <= 0:
        return torch.ones_like(sensitivity, dtype=torch.bool)
    scaled = sensitivity / top
    tau = scaled.mean() if threshold is None else torch.tensor(threshold, dtype=scaled.dtype)
    return scaled >= tau


def _by_sensitivity(sensitivity: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Indices of the sub-blocks in ``mask``, most sensitive first (ties: lower index first, deterministic)."""
    idx = mask.nonzero().flatten()
    order = torch.sort(sensitivity[idx], descending=True, stable=True).indices
    return idx[order]


def split_on_share(sensitivity: torch.Tensor, owner: torch.Tensor, unique_blocks: int, shared_blocks: int,
                   threshold: float | None) -> Split:
    """Task t's split for one layer from the sensitivities (M,) and the owners (M,) (FREE, SHARED or a task index)."""
    free, shared = owner == FREE, owner == SHARED
    s = sensitivity.detach().float().cpu()
    free, shared = free.cpu(), shared.cpu()
    unique = torch.zeros_like(free)
    new_shared = torch.zeros_like(free)
    update = torch.zeros_like(free)
    free_idx = _by_sensitivity(s, free)
    keep = relevant(s[free_idx], threshold)  # same order as free_idx
    unique[free_idx[keep][:unique_blocks]] = True
    if not shared.any() and shared_blocks > 0:  # the first task seeds the shared expert
        rest = free_idx[~unique[free_idx]]
        new_shared[rest[:shared_blocks]] = True
    elif shared.any():
        shared_idx = _by_sensitivity(s, shared)
        update[shared_idx[relevant(s[shared_idx], threshold)]] = True
    device = owner.device
    return Split(unique.to(device), new_shared.to(device), update.to(device))


class SETALinear(ExpertLinear):
    """A frozen ``nn.Linear`` with M rank-1 sub-blocks (``ExpertLinear`` with M experts of rank 1, no router).

    Buffers (all checkpointed): ``A_store``/``B_store`` (authoritative sub-block values), ``owner`` (M,) (FREE,
    SHARED, or the task that owns it uniquely), ``group`` (M,) (gate output that weights it; -1 = none),
    ``trainable`` (M,) (rows the optimiser may move in this task), ``trained_by`` (T, M), ``sensitivity`` (T, M)
    (s_m measured at the start of each task), ``omega_*`` (Ω, importance of shared weights to earlier tasks) and
    ``anchor_*`` (θ*, the shared weights after the latest task).
    """

    def __init__(self, base: nn.Linear, num_blocks: int, num_tasks: int, scaling: float, context: RoutingContext):
        super().__init__(base, num_blocks, rank=1, alpha=scaling)  # s = alpha / rank = scaling
        self.context = context
        self.register_buffer("A_store", self.A.detach().clone())
        self.register_buffer("B_store", self.B.detach().clone())
        self.register_buffer("owner", torch.full((num_blocks,), FREE, dtype=torch.long))
        self.register_buffer("group", torch.full((num_blocks,), -1, dtype=torch.long))
        self.register_buffer("trainable", torch.zeros(num_blocks, dtype=torch.bool))
        self.register_buffer("trained_by", torch.zeros(num_tasks, num_blocks, dtype=torch.bool))
        self.register_buffer("sensitivity", torch.zeros(num_tasks, num_blocks))
        for name in ("omega_A", "anchor_A"):
            self.register_buffer(name, torch.zeros_like(self.A))
        for name in ("omega_B", "anchor_B"):
            self.register_buffer(name, torch.zeros_like(self.B))
        self.live = False  # whether ``trainable`` rows come from the Parameters (set while a task trains)

    @property
    def block_params(self) -> int:
        """Parameters of one sub-block (a_m and b_m)."""
        return self.in_features + self.out_features

    # ---- the two copies -----------------------------------------------------------------------------------------
    def effective(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (M, 1, d_in), B (M, d_out, 1)) as the forward uses them: Parameter rows where trainable, else stored."""
        if not self.live:
            return self.A_store, self.B_store
        return (torch.where(self.trainable[:, None, None], self.A, self.A_store),
                torch.where(self.trainable[:, None, None], self.B, self.B_store))

    def go_live(self, rows: torch.Tensor) -> None:
        """Let the optimiser move ``rows`` from now on, starting from the stored values (outputs do not change)."""
        with torch.no_grad():
            self.A.copy_(self.A_store)
            self.B.copy_(self.B_store)
            self.trainable.copy_(rows)
        self.live = True

    def commit(self) -> None:
        """Store the trained rows and freeze everything (uses buffers only, so it also works after DDP spawn)."""
        with torch.no_grad():
            rows = self.trainable[:, None, None]
            self.A_store.copy_(torch.where(rows, self.A, self.A_store))
            self.B_store.copy_(torch.where(rows, self.B, self.B_store))
            self.trainable.zero_()
        self.live = False

    # ---- split ---------------------------------------------------------------------------------------------------
    def open_candidates(self, t: int) -> None:
        """Before the sensitivity probe of task t: free sub-blocks are weighted by task t's gate output (they are its
        candidates; b_m = 0 so outputs do not change) and every free or shared sub-block gets gradients."""
        with torch.no_grad():
            self.group[self.owner == FREE] = 1 + t
        self.go_live((self.owner == FREE) | (self.owner == SHARED))

    def apply_split(self, t: int, split: Split) -> None:
        """Record task t's split: owners, gate groups, which rows train now."""
        with torch.no_grad():
            self.owner[split.unique] = t
            self.owner[split.new_shared] = SHARED
            self.group.copy_(torch.where(self.owner == SHARED, 0,
                                         torch.where(self.owner >= 0, 1 + self.owner, -1)))
            rows = split.unique | split.new_shared | split.update
            self.trained_by[t] = rows
        self.go_live(rows)

    # ---- forward / penalty ---------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """W0 x + s (w(x) ⊙ (x A^T)) B^T with w = the gate outputs of each sub-block's expert (per example)."""
        out = self.base(x)
        gates = self.context.gates
        if gates is None:
            raise RuntimeError("a SETA layer ran without routing: call the SETA method (forward/generate), not its "
                               "model directly")
        A, B = self.effective()
        m = self.num_experts
        w = gates.index_select(1, self.group + 1)  # (batch, M): one weight per sub-block and example
        h = torch.nn.functional.linear(x.to(A.dtype), A.view(m, -1))  # (batch, tokens, M)
        h = h * w.unsqueeze(1).to(h.dtype)
        return out + (self.scaling * (h @ B.view(m, -1).to(h.dtype))).to(out.dtype)

    def anchor_penalty(self) -> torch.Tensor:
        """Σ Ω (θ − θ*)² over this layer's sub-blocks (Ω is 0 outside the shared expert); without λ_a."""
        A, B = self.effective()
        return ((self.omega_A * (A - self.anchor_A).pow(2)).sum()
                + (self.omega_B * (B - self.anchor_B).pow(2)).sum())

    def blocks_in_use(self, upto_task: int) -> int:
        """Sub-blocks of the shared expert plus the unique ones of tasks 0..upto_task."""
        return int(((self.owner == SHARED) | ((self.owner >= 0) & (self.owner <= upto_task))).sum())


__all__ = ["FREE", "SHARED", "RoutingContext", "SETALinear", "Split", "block_sensitivity", "relevant",
           "split_on_share"]
