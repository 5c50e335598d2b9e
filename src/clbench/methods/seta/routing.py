"""SETA's unified gate: one gate for the whole model, one output per expert, grown by one output per task.

    q(x)  = mean of the frozen token embeddings over the prompt tokens (BOS excluded; ``_prompts.query_mask``/``pool``)
    z_e   = W_e · LN(q) + c_e                       LN: layer norm without affine (the gate sees a unit-scale query)
    g_e   = σ(z_e) · open_e                         e = 0: the shared expert; e = 1 + t: task t's unique expert

One routing decision per example (not per token): the prompt decides, and every token of the example, every SETA
layer and every generated token use the same g (computed once before ``generate``). Outputs are independent sigmoids,
not a softmax: with a softmax, opening a new output takes mass from every old one on every input, which is the
forgetting the previous implementation built in. ``open_e`` is 0 until the task of output e begins (gating
expansion); a new unique output opens at z = c = ``INACTIVE_LOGIT`` (g ≈ 0.018), and its sub-blocks are zero, so
opening it changes no output at all.

Protection (routing-aware regularisation): rows of earlier tasks' unique outputs are frozen after their task (their
g on any input never changes again, because q comes from frozen embeddings); the rows that train in task t (the
shared output and task t's own) are held on stored gate inputs of earlier tasks::

    routing   = λ_r · mean_{j < t, i ≤ n_j} Σ_{e open} KL( Bern(g_e^prev(q_{j,i})) ‖ Bern(g_e(q_{j,i})) )
    gate_open = λ_o · mean_{x ∈ batch} −log g_{1+t}(q(x))          (task t's own output opens on task t's inputs)

g^prev: the gate after the previous task (the new output was closed then, so its target on old inputs is 0). The
stored inputs q_{j,i} are the queries of up to ``memory_size`` training prompts of task j (d floats each; no text
is kept). The drift of task j's routing, reported after every later task, is

    drift_j = mean_i Σ_e | g_e(q_{j,i}) − g_e^{end of task j}(q_{j,i}) |          (L1 over all gate outputs)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

INACTIVE_LOGIT = -4.0  # a unique output opens at σ(−4) ≈ 0.018: inactive, yet trainable (σ' ≠ 0)


def bernoulli_kl(p: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(Bern(p) ‖ Bern(σ(logits))) elementwise, stable (via BCE-with-logits minus the entropy of p); 0 iff equal."""
    p = p.float().clamp(0.0, 1.0)
    bce = F.binary_cross_entropy_with_logits(logits.float(), p, reduction="none")
    entropy = -(torch.special.xlogy(p, p) + torch.special.xlogy(1 - p, 1 - p))
    return bce - entropy


class SETAGate(nn.Module):
    """The unified gate over 1 + T outputs (0: shared expert, 1 + t: task t's unique expert) and its memory.

    ``weight``/``bias`` are what the optimiser holds; ``weight_store``/``bias_store`` the authoritative rows (see
    :class:`~clbench.methods.seta.layer.SETALinear` for why two copies); ``train_rows`` marks the rows of this task.
    Memory buffers: ``memory_q`` (T, n, d) stored queries, ``memory_n`` (T,) how many, ``memory_ref`` (T, n, 1 + T)
    the gate on them at the end of their own task, ``memory_prev`` (T, n, 1 + T) at the end of the latest task.
    """

    def __init__(self, d: int, num_tasks: int, memory_size: int):
        super().__init__()
        n_out = 1 + num_tasks
        self.num_tasks = num_tasks
        self.weight = nn.Parameter(torch.zeros(n_out, d))
        self.bias = nn.Parameter(torch.zeros(n_out))
        self.register_buffer("weight_store", torch.zeros(n_out, d))
        bias = torch.full((n_out,), INACTIVE_LOGIT)
        bias[0] = 0.0  # the shared expert serves every task: it starts half open and the LM loss moves it
        self.register_buffer("bias_store", bias)
        self.register_buffer("train_rows", torch.zeros(n_out, dtype=torch.bool))
        self.register_buffer("memory_q", torch.zeros(num_tasks, memory_size, d))
        self.register_buffer("memory_n", torch.zeros(num_tasks, dtype=torch.long))
        self.register_buffer("memory_ref", torch.zeros(num_tasks, memory_size, n_out))
        self.register_buffer("memory_prev", torch.zeros(num_tasks, memory_size, n_out))
        self.n_open = 1  # outputs 0 .. n_open-1 are open (set by begin_task, replayed on resume)
        self.live = False

    # ---- rows -----------------------------------------------------------------------------------------------------
    def open_task(self, t: int) -> None:
        """Gating expansion for task t: open output 1 + t; rows 0 and 1 + t train from their stored values."""
        self.n_open = t + 2
        with torch.no_grad():
            self.weight.copy_(self.weight_store)
            self.bias.copy_(self.bias_store)
            self.train_rows.zero_()
            self.train_rows[0] = True
            self.train_rows[1 + t] = True
        self.live = True

    def commit(self) -> None:
        """Store the trained rows and freeze the gate (buffers only: safe after DDP spawn)."""
        with torch.no_grad():
            self.weight_store.copy_(torch.where(self.train_rows[:, None], self.weight, self.weight_store))
            self.bias_store.copy_(torch.where(self.train_rows, self.bias, self.bias_store))
            self.train_rows.zero_()
        self.live = False

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W, c) as the forward uses them: trainable rows from the Parameters, the rest from the store."""
        if not self.live:
            return self.weight_store, self.bias_store
        return (torch.where(self.train_rows[:, None], self.weight, self.weight_store),
                torch.where(self.train_rows, self.bias, self.bias_store))

    # ---- outputs --------------------------------------------------------------------------------------------------
    def logits(self, q: torch.Tensor) -> torch.Tensor:
        """z = W LN(q) + c: (n, 1 + T), fp32 (closed outputs included; :meth:`forward` masks them)."""
        W, c = self.rows()
        return F.linear(F.layer_norm(q.float(), q.shape[-1:]), W.float(), c.float())

    def open_mask(self, device: torch.device) -> torch.Tensor:
        """(1 + T,) float: 1 for open outputs, 0 for the outputs of tasks not begun."""
        return (torch.arange(self.num_tasks + 1, device=device) < self.n_open).float()

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        """g = σ(z) for open outputs, exact 0 for closed ones: (n, 1 + T)."""
        return torch.sigmoid(self.logits(q)) * self.open_mask(q.device)

    # ---- memory ---------------------------------------------------------------------------------------------------
    def stored(self, j: int) -> torch.Tensor:
        """The stored queries of task j: (n_j, d)."""
        return self.memory_q[j, : int(self.memory_n[j])]

    def remember(self, t: int, q: torch.Tensor) -> None:
        """After task t (gate committed): keep task t's queries and its reference routing; refresh g^prev of all."""
        n = min(q.shape[0], self.memory_q.shape[1])
        with torch.no_grad():
            self.memory_q[t, :n] = q[:n].to(self.memory_q)
            self.memory_n[t] = n
            self.memory_ref[t, :n] = self(self.stored(t))
            for j in range(t + 1):
                self.memory_prev[j, : int(self.memory_n[j])] = self(self.stored(j))

    def drift_penalty(self, t: int) -> torch.Tensor:
        """mean over stored inputs of tasks < t of Σ_{open e} KL(Bern(g^prev_e) ‖ Bern(g_e)) (without λ_r)."""
        qs = [self.stored(j) for j in range(t) if int(self.memory_n[j]) > 0]
        if not qs:
            return self.bias.new_zeros(())
        prev = torch.cat([self.memory_prev[j, : int(self.memory_n[j])] for j in range(t) if int(self.memory_n[j])])
        kl = bernoulli_kl(prev[:, : self.n_open], self.logits(torch.cat(qs))[:, : self.n_open])
        return kl.sum(-1).mean()

    def drift(self, j: int) -> float:
        """drift_j = mean over task j's stored inputs of Σ_e |g_e − g_e^{end of task j}| (NaN without memory)."""
        n = int(self.memory_n[j])
        if n == 0:
            return float("nan")
        with torch.no_grad():
            return float((self(self.stored(j)) - self.memory_ref[j, :n]).abs().sum(-1).mean())


__all__ = ["INACTIVE_LOGIT", "SETAGate", "bernoulli_kl"]
