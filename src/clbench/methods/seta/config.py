"""SETA's knobs (defaults and one-line comments in configs/methods/seta.yaml; docs/methods/seta.md explains each)."""

from __future__ import annotations

from dataclasses import dataclass

from clbench.method import MethodConfig


@dataclass(kw_only=True)
class SETAConfig(MethodConfig):
    """Knobs of SETA (our reading of Siddika et al., 2026; see docs/methods/seta.md).

    Budget per adapted linear: ``num_blocks`` rank-1 sub-blocks b_m a_m^T. The first task seeds the shared expert with
    ``shared_blocks`` of them; every task takes at most ``unique_blocks`` free ones as its unique expert.
    """

    num_blocks: int  # M: rank-1 sub-blocks per adapted linear (the parameter budget)
    shared_blocks: int  # S: sub-blocks the first task makes shared (the shared expert)
    unique_blocks: int  # most free sub-blocks one task takes as its unique expert, per layer
    threshold: float | None  # relevance: s_m >= threshold * max s; None = dynamic (the group's mean of s/max s)
    scaling: float  # s in y = W0 x + s Σ_m w_m b_m a_m^T x (lora's alpha / r = 32 / 8)
    target_modules: list[str]
    layers: list[int] | None  # transformer layers with SETA layers; None = all
    anchor_weight: float  # λ_a of the elastic anchoring λ_a Σ Ω (θ − θ*)² over shared sub-blocks
    routing_weight: float  # λ_r of the routing drift term on stored gate inputs of earlier tasks
    gate_open_weight: float  # λ_o of the term opening task t's own gate output on task t's inputs
    gate_lr: float  # learning rate of the unified gate (rows of the shared expert and of task t)
    memory_size: int  # gate inputs (prompt-mean embeddings) kept per task for the drift term and report
    importance_batches: int  # training batches per task for Ω (per-example squared gradients); 0 = all

    def __post_init__(self) -> None:
        if self.num_blocks < 1 or self.shared_blocks < 0 or self.unique_blocks < 0:
            raise ValueError(f"num_blocks must be >= 1 and shared_blocks, unique_blocks >= 0, got "
                             f"{self.num_blocks}, {self.shared_blocks}, {self.unique_blocks}")
        if not 1 <= self.shared_blocks + self.unique_blocks <= self.num_blocks:
            raise ValueError(f"shared_blocks + unique_blocks ({self.shared_blocks + self.unique_blocks}) must be in "
                             f"1..num_blocks ({self.num_blocks})")
        if self.threshold is not None and not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1] (a fraction of the largest sensitivity) or null, "
                             f"got {self.threshold}")
        if self.scaling <= 0 or self.gate_lr <= 0:
            raise ValueError(f"scaling and gate_lr must be > 0, got {self.scaling} and {self.gate_lr}")
        if min(self.anchor_weight, self.routing_weight, self.gate_open_weight) < 0:
            raise ValueError("anchor_weight, routing_weight and gate_open_weight must be >= 0")
        if self.memory_size < 0 or self.importance_batches < 0:
            raise ValueError(f"memory_size and importance_batches must be >= 0, got {self.memory_size} and "
                             f"{self.importance_batches}")
        if self.routing_weight > 0 and self.memory_size == 0:
            raise ValueError("routing_weight > 0 needs memory_size >= 1 (the drift term is measured on stored inputs)")
