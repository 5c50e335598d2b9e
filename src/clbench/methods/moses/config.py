"""MoSEs knobs (defaults in configs/methods/moses.yaml; docs/methods/moses.md explains each)."""

from __future__ import annotations

from dataclasses import dataclass

from clbench.method import MethodConfig


@dataclass(kw_only=True)
class MoSEsConfig(MethodConfig):
    """MoSEs knobs. ``top_k`` is the task's mask (experts it may use per layer), ``experts_per_input`` the sparse
    per-input choice among them; ``experts_per_input = top_k`` is the per-task routing of the first version."""

    num_experts: int  # N, sub-experts in the pool of every MoSE layer
    top_k: int  # k, sub-experts a task may use per layer (its mask: its own plus the ones it borrows)
    experts_per_input: int  # k_x, experts of the mask each example activates (top-k_x of its router scores)
    rank: int  # r_s, rank of every sub-expert
    alpha: float  # scaling s = alpha / r_s
    target_modules: list[str]
    layers: list[int] | None  # transformer layers with MoSE layers; None = the upper half
    budget: int  # b, most new sub-experts a task may add per layer (task 0 takes k)
    temperature: float  # temperature of the router softmax (and of the per-input scores)
    key_layer: int | None  # hidden state after this layer is the query; None = first MoSE layer - 1
    pull_weight: float  # λ_p, weight of the pull constraint 1 - cos(q(x), k_t) (L2P: 0.5)
    key_init: str  # "first_batch": k_t starts at its first batch's mean query; "random"
    new_expert_score: float  # head start of the fresh slots' mask scores, so a task starts with its budget
    prompt_length: int  # L, task prompt P_t: L vectors added at the key layer in front of the input; 0 = off
    router_lr: float  # learning rate of the task's router W_r^t
    score_lr: float  # learning rate of the task's mask scores u_t
    key_lr: float  # learning rate of the task's key k_t (and of its prompt P_t, as L2P trains both alike)

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in 1..num_experts ({self.num_experts}), got {self.top_k}")
        if not 1 <= self.experts_per_input <= self.top_k:
            raise ValueError(f"experts_per_input must be in 1..top_k ({self.top_k}), got {self.experts_per_input}")
        if not 0 <= self.budget <= self.top_k:
            raise ValueError(f"budget must be in 0..top_k ({self.top_k}), got {self.budget}")
        if self.rank < 1 or self.temperature <= 0 or self.pull_weight < 0:
            raise ValueError("rank must be >= 1, temperature > 0 and pull_weight >= 0")
        if self.key_init not in ("first_batch", "random"):
            raise ValueError(f"key_init must be 'first_batch' or 'random', got {self.key_init!r}")
        if self.prompt_length < 0:
            raise ValueError(f"prompt_length must be >= 0, got {self.prompt_length}")
