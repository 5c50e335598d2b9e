"""L2P: Learning to Prompt (Wang et al., 2022, "Learning to Prompt for Continual Learning", CVPR 2022,
arXiv 2112.08654), on a frozen decoder LLM. TRACE's version: ``model/Dynamic_network/L2P.py`` (BeyonderXX/TRACE
@462e39f).

A pool of M prompts P_1..P_M (L vectors each) with keys k_1..k_M is shared by all tasks. Each example picks the N
prompts whose keys are nearest its query and reads them in front of its input (the paper's Eqs. 3-5)::

    q(x)   = mean over the prompt tokens (BOS excluded) of the frozen model's hidden state h_ℓ(x), prompt-free pass
    K_x    = top-N_i cos(q(x), k_i)                                  (the paper's γ = 1 − cos, smallest N)
    x_p    = [P_{s_1} ; ... ; P_{s_N} ; E(x)]                        s_1..s_N = K_x, nearest first
    loss   = LM loss(x_p) + λ · mean_x Σ_{i ∈ K_x} (1 − cos(q(x), k_i))          (Eq. 5: the pull term)

Nothing here reads a task id, in training or at test: the pool and keys train on every task alike, and the same
selection rule runs on every example (task-agnostic). The query needs its own pass without prompts (the prompts
depend on it), stopped at layer ℓ; ``query_layer`` picks ℓ (default: the last layer, the paper's q(x) = f(x) of the
whole frozen model; -1: the token embeddings, TRACE's cheap choice).

Where we differ from TRACE's L2P.py (docs/methods/l2p.md has the list): keys are learned parameters that the pull
term moves (TRACE fixes k_i at the mean of P_i's initial vectors and lets the pull gradient reach the prompts:
``key_init=trace``), the query averages the example's own prompt tokens (TRACE's averages every position of the
padded batch, pads included, so an example's choice depends on its batch mates), and generation is greedy (TRACE
samples at temperature 0.1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from clbench.benchmark import Task
from clbench.method import CLMethod, MethodConfig
from clbench.registry import register_method

from ._experts import num_layers
from ._prompts import (
    check_hidden_layer,
    generate_with_prefix,
    hidden_at_layer,
    key_cosines,
    mask_positions,
    pool,
    prefixed_forward,
    pull_loss,
    query_mask,
    vocab_prompt_init,
)

KEY_INITS = ("uniform", "trace")


@dataclass(kw_only=True)
class L2PConfig(MethodConfig):
    """L2P knobs (defaults in configs/methods/l2p.yaml)."""

    pool_size: int  # M, prompts (and keys) in the pool (the paper and TRACE: 10)
    prompt_length: int  # L_p, vectors per prompt (the paper and TRACE: 5)
    top_k: int  # N, prompts each example reads (the paper: 5; TRACE: 3)
    pull_weight: float  # λ of the pull term (TRACE: 0.5)
    query_layer: int | None  # h_ℓ for q(x): None = last layer (the paper), -1 = token embeddings (TRACE)
    key_init: str  # uniform: learned keys ~ U(-1, 1) (the paper's code); trace: TRACE's fixed keys

    def __post_init__(self) -> None:
        if self.pool_size < 1 or self.prompt_length < 1:
            raise ValueError(f"pool_size and prompt_length must be >= 1, got {self.pool_size}, {self.prompt_length}")
        if not 1 <= self.top_k <= self.pool_size:
            raise ValueError(f"top_k must be in 1..pool_size ({self.pool_size}), got {self.top_k}")
        if self.pull_weight < 0:
            raise ValueError(f"pull_weight must be >= 0, got {self.pull_weight}")
        if self.key_init not in KEY_INITS:
            raise ValueError(f"key_init must be one of {', '.join(KEY_INITS)}, got {self.key_init!r}")


@register_method("l2p")
class L2P(CLMethod):
    """A shared prompt pool with keys; each example reads the N prompts whose keys are nearest its query."""

    config_class = L2PConfig

    def __init__(self, model: nn.Module, tokenizer: Any, cfg: L2PConfig, num_tasks: int):
        super().__init__(model, tokenizer, cfg, num_tasks)
        n_layers = num_layers(model)
        self.query_layer = n_layers - 1 if cfg.query_layer is None else cfg.query_layer
        check_hidden_layer("query_layer", self.query_layer, n_layers, "-1 = token embeddings")
        embeddings = model.get_input_embeddings()
        dim = embeddings.embedding_dim
        # the pool as one (M, L, d) tensor: a row no example selected gets a zero gradient (no DDP unused-parameter
        # case); prompts start at random vocabulary embeddings (TRACE's "uniform" prompt_init does the same)
        self.prompt_pool = nn.Parameter(torch.stack([vocab_prompt_init(embeddings, cfg.prompt_length)
                                                     for _ in range(cfg.pool_size)]))
        # keys: learned, U(-1, 1) as the paper's code initialises them. With key_init=trace they are not used; the
        # values are the mean of the initial prompts instead (a buffer, fixed, as TRACE's prompt_key)
        self.prompt_keys = nn.Parameter(torch.empty(cfg.pool_size, dim).uniform_(-1.0, 1.0))
        self.register_buffer("trace_keys", self.prompt_pool.detach().mean(1).clone())
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # (q, idx) of the forward in flight

    # ---- task hooks ---------------------------------------------------------------------------------------------
    def begin_task(self, t: int, task: Task) -> None:
        """The whole pool (and its keys) trains on every task; the task index chooses nothing."""
        super().begin_task(t, task)
        self.freeze_all()
        self.prompt_pool.requires_grad_(True)
        self.prompt_keys.requires_grad_(self.cfg.key_init == "uniform")

    # ---- selection ----------------------------------------------------------------------------------------------
    def keys(self) -> torch.Tensor:
        """k_1..k_M. With ``key_init=trace``: TRACE's fixed values (mean of the initial prompts) carrying the gradient
        of mean(P_i) (value sg-fixed, gradient to the prompts), which is what TRACE's ``prompt_key`` does."""
        if self.cfg.key_init == "uniform":
            return self.prompt_keys
        live = self.prompt_pool.mean(1)
        return self.trace_keys + (live - live.detach())

    @torch.no_grad()
    def query(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """q(x): mean of h_ℓ over the example's prompt tokens (BOS excluded) from a prompt-free pass of the frozen model
        stopped at layer ℓ. Positions come from the attention mask, so left and right padding give the same query."""
        mask = batch["attention_mask"]
        hidden = hidden_at_layer(self.model, self.query_layer, batch["input_ids"], mask,
                                 position_ids=mask_positions(mask))
        return pool(hidden, query_mask(batch, getattr(self.tokenizer, "bos_token_id", None)))

    def select(self, query: torch.Tensor) -> torch.Tensor:
        """K_x: the ``top_k`` pool indices with the largest cos(q(x), k_i), nearest first: (batch, N)."""
        return key_cosines(query, self.keys()).topk(self.cfg.top_k, dim=-1).indices

    def _prefix(self, idx: torch.Tensor) -> torch.Tensor:
        """[P_{s_1} ; ... ; P_{s_N}] per example: (batch, N·L, d)."""
        return self.prompt_pool[idx].flatten(1, 2)

    # ---- training and inference ---------------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        """LM forward with each example's selected prompts in front (logits cut back to the input tokens)."""
        q = self.query(batch)
        idx = self.select(q)
        self._last = (q, idx)
        return prefixed_forward(self.model, batch, self._prefix(idx))

    def regularizer(self, batch: dict[str, torch.Tensor], out: Any) -> dict[str, torch.Tensor]:
        """Pull term λ · mean_x Σ_{i ∈ K_x} (1 − cos(q(x), k_i)) (Eq. 5); q is frozen, so the keys learn."""
        q, idx = self._last
        n = idx.shape[1]
        chosen = self.keys()[idx].flatten(0, 1)  # (batch·N, d)
        # pull_loss averages over its rows; × N turns the mean over (example, key) pairs into Σ over K_x per example
        return {"pull": self.cfg.pull_weight * n * pull_loss(q.repeat_interleave(n, dim=0), chosen)}

    @torch.no_grad()
    def generate(self, batch: dict[str, torch.Tensor], max_new_tokens: int) -> torch.Tensor:
        """Greedy generation from [selected prompts ; x]; the selection is the training rule, with no task id."""
        idx = self.select(self.query(batch))
        self._last = None
        return generate_with_prefix(self.model, self.tokenizer, batch, self._prefix(idx), max_new_tokens)

    # ---- bookkeeping --------------------------------------------------------------------------------------------
    def param_report(self) -> dict[str, int]:
        """The pool and its keys, used by every task: ``added`` = M·L·d + M·d (M·L·d with TRACE's fixed keys, which
        are derived from the initial prompts); ``trainable`` = what the optimiser moves now."""
        keys = self.prompt_keys.numel() if self.cfg.key_init == "uniform" else 0
        added = self.prompt_pool.numel() + keys
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {"trainable": trainable, "added": added, "total": self.base_param_count + added}


__all__ = ["L2P", "L2PConfig"]
