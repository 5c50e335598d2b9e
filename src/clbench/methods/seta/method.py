"""SETA (Siddika, Hossen, Jannesari, Mallick, 2026, "Split-on-Share: Mixture of Sparse Experts for Task-Agnostic
Continual Learning", arXiv 2601.17616; revised as "Sparse Subspace-to-Expert Sharing for Task-Agnostic Continual
Learning", arXiv 2606.07500). No public code exists: this is OUR reading (docs/methods/seta.md, point by point).

Every target linear (default ``q_proj``/``v_proj`` of every layer) holds M rank-1 sub-blocks (:mod:`.layer`); one
unified gate (:mod:`.routing`) routes each example over the shared expert and every task's unique expert::

    y = W0 x + s Σ_m g_{group(m)}(q(x)) b_m a_m^T x

Task t:
  begin_task    gate output 1 + t opens (inactive: σ(−4)), rows of earlier unique outputs stay frozen
  first step    Split-on-Share from the squared gradients of the first training batch: task t's unique sub-blocks,
                (first task) the shared expert, and which shared sub-blocks task t may move
  training      LM loss + anchor + routing + gate_open (each logged):
                  anchor    = λ_a Σ_{shared θ} Ω_θ (θ − θ*)²                    adaptive elastic anchoring
                  routing   = λ_r · drift penalty on stored gate inputs of tasks < t (routing-aware regularisation)
                  gate_open = λ_o · mean −log g_{1+t}(q(x)) on task t's batch
  end_task      commit (task t's unique sub-blocks are frozen for good), Ω ← Ω + Ω_t/mean(Ω_t), θ* ← θ,
                keep task t's gate inputs and reference routing

Ω_t = per-example E[g²] of the LM loss on up to ``importance_batches`` training batches, over the shared sub-blocks
(``_importance.mean_squared_gradients``, pooled over DDP ranks), divided by its mean over all shared weights so
λ_a does not depend on the model's gradient scale; summed over tasks, so a sub-block important to several earlier
tasks is held harder ("adaptive"). All state is pre-allocated at construction in parameters and buffers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clbench.benchmark import Collator, Task
from clbench.method import CLMethod, gather_by_index
from clbench.registry import register_method

from .._experts import inject
from .._importance import mean_squared_gradients
from .._prompts import pool, query_mask
from .config import SETAConfig
from .layer import SHARED, RoutingContext, SETALinear, block_sensitivity, split_on_share
from .report import gate_report, write_block_usage, write_param_growth
from .routing import SETAGate


@register_method("seta")
class SETA(CLMethod):
    """SETA, our reading: sparse rank-1 sub-blocks split into unique and shared experts by gradient sensitivity,
    elastic anchoring of shared sub-blocks, one sigmoid gate per model that grows by one output per task."""

    config_class = SETAConfig
    end_task_on_training_device = True  # Ω is a backward per training example

    def __init__(self, model: nn.Module, tokenizer: Any, cfg: SETAConfig, num_tasks: int):
        super().__init__(model, tokenizer, cfg, num_tasks)
        layers = list(cfg.layers) if cfg.layers is not None else None
        self.context = RoutingContext()
        self._seta_layers: dict[str, SETALinear] = inject(
            model, list(cfg.target_modules),
            lambda name, linear: SETALinear(linear, cfg.num_blocks, num_tasks, cfg.scaling, self.context), layers)
        self.gate = SETAGate(model.get_input_embeddings().embedding_dim, num_tasks, cfg.memory_size)
        self.register_buffer("tasks_done", torch.zeros((), dtype=torch.long))
        self._pending_split = False  # set by begin_task; the first training forward of the task splits
        self._task_names: dict[int, str] = {}
        self._eval_gates: list[tuple[int, list[float]]] = []
        self._last_gates: torch.Tensor | None = None

    def seta_layers(self) -> list[SETALinear]:
        """Every SETA layer, in model order."""
        return list(self._seta_layers.values())

    def named_seta_layers(self) -> dict[str, SETALinear]:
        """SETA layers by module name."""
        return dict(self._seta_layers)

    # ---- routing --------------------------------------------------------------------------------------------------
    def query(self, batch: dict[str, Any]) -> torch.Tensor:
        """q(x): mean frozen token embedding over each example's prompt tokens, (batch, d) fp32, detached.

        Training batches: the prompt tokens are ``prompt_mask``, else the attended positions without a label (the
        answer must not leak into the routing: at test time only the prompt exists).
        """
        if "prompt_mask" not in batch:
            mask = batch["attention_mask"].bool()
            if batch.get("labels") is not None:
                mask = mask & (batch["labels"] == -100)
            batch = {**batch, "prompt_mask": mask}
        with torch.no_grad():
            embeds = self.model.get_input_embeddings()(batch["input_ids"])
        return pool(embeds, query_mask(batch, self.tokenizer.bos_token_id))

    def route(self, batch: dict[str, Any]) -> torch.Tensor:
        """g(q(x)) of the unified gate: (batch, 1 + T)."""
        return self.gate(self.query(batch))

    def _lm(self, batch: dict[str, Any]) -> Any:
        """The LM forward with this batch's routing set for every SETA layer."""
        gates = self.route(batch)
        self.context.gates = F.pad(gates, (1, 0))  # column 0: weight 0 for free sub-blocks
        try:
            return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              labels=batch.get("labels"))
        finally:
            self.context.gates = None

    def _lm_kwargs(self, **piece: torch.Tensor) -> Any:
        """``_lm`` with keyword inputs, the calling convention of ``mean_squared_gradients``."""
        return self._lm(piece)

    def forward(self, batch: dict[str, Any]) -> Any:
        """Routed LM forward; the task's first training forward first runs Split-on-Share on this batch."""
        if self._pending_split and self.training and torch.is_grad_enabled():
            self.split(batch)
        return self._lm(batch)

    @torch.no_grad()
    def generate(self, batch: dict[str, torch.Tensor], max_new_tokens: int) -> torch.Tensor:
        """Route once from the prompt (no task id), then greedy generation with that routing for every new token."""
        gates = self.route(batch)
        self._last_gates = gates.detach().float().cpu()
        self.context.gates = F.pad(gates, (1, 0))
        try:
            return super().generate(batch, max_new_tokens)
        finally:
            self.context.gates = None

    # ---- task hooks -----------------------------------------------------------------------------------------------
    def begin_task(self, t: int, task: Task) -> None:
        """Open gate output 1 + t; the sub-blocks and gate rows train; the split waits for the first training batch."""
        if not 0 <= t < self.num_tasks:
            raise RuntimeError(f"seta pre-allocated gate outputs for {self.num_tasks} tasks; task {t} has none")
        super().begin_task(t, task)
        self._task_names[t] = task.name
        self.freeze_all()
        for layer in self.seta_layers():
            layer.A.requires_grad_(True)
            layer.B.requires_grad_(True)
            with torch.no_grad():
                layer.trainable.zero_()
            layer.live = False
        self.gate.weight.requires_grad_(True)
        self.gate.bias.requires_grad_(True)
        self.gate.open_task(t)
        self._pending_split = True

    @torch.enable_grad()
    def split(self, batch: dict[str, Any]) -> None:
        """Split-on-Share for the current task from per-example squared gradients on ``batch`` (pooled over ranks).

        Outputs do not change: the candidates (free sub-blocks, b_m = 0, weighted by the new output) only receive
        gradients, and the chosen rows start from their stored values.
        """
        t = self.current_task
        layers = self.seta_layers()
        for layer in layers:
            layer.open_candidates(t)
        targets = [p for layer in layers for p in (layer.A, layer.B)]
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
        squares = mean_squared_gradients(self, self._lm_kwargs, targets, [inputs], None, per_example=True)
        for i, layer in enumerate(layers):
            s = block_sensitivity(squares[2 * i], squares[2 * i + 1])
            with torch.no_grad():
                layer.sensitivity[t] = s.to(layer.sensitivity)
            layer.apply_split(t, split_on_share(s, layer.owner, self.cfg.unique_blocks, self.cfg.shared_blocks,
                                                self.cfg.threshold))
        self._pending_split = False

    def end_task(self, t: int, task: Task, train_loader: Any = None) -> None:
        """Commit (task t's unique sub-blocks and gate row freeze for good), Ω += Ω_t, θ* ← θ, remember gate inputs
        (on the training device: ``end_task_on_training_device``)."""
        if self._pending_split:  # no training step ran, so no split: the task would silently own nothing
            raise RuntimeError(f"seta: task {t} ended before its first training step, so it has no sub-blocks")
        for layer in self.seta_layers():
            layer.commit()
        self.gate.commit()
        if self.cfg.anchor_weight > 0 and any(bool((la.owner == SHARED).any()) for la in self.seta_layers()):
            if train_loader is None:
                raise RuntimeError("seta needs the task's training loader in end_task to estimate Ω")
            self._accumulate_importance(train_loader)
        with torch.no_grad():
            for layer in self.seta_layers():
                layer.anchor_A.copy_(layer.A_store)
                layer.anchor_B.copy_(layer.B_store)
        if self.cfg.memory_size > 0:
            self.gate.remember(t, self._memory_queries(task, train_loader))
        with torch.no_grad():
            self.tasks_done.fill_(t + 1)

    def _accumulate_importance(self, loader: Any) -> None:
        """Ω ← Ω + Ω_t / mean(Ω_t) over the shared sub-blocks of every layer (per-example squared gradients)."""
        layers = self.seta_layers()
        for layer in layers:
            layer.go_live(layer.owner == SHARED)  # gradients reach the shared rows only; outputs unchanged
        try:
            targets = [p for layer in layers for p in (layer.A, layer.B)]
            squares = mean_squared_gradients(self, self._lm_kwargs, targets, loader,
                                             self.cfg.importance_batches or None, per_example=True)
        finally:
            for layer in layers:
                layer.commit()  # trainable rows equal the store: nothing changes, rows are frozen again
        masks = [(layer.owner == SHARED).float() for layer in layers]
        parts = [(squares[2 * i] * m[:, None, None], squares[2 * i + 1] * m[:, None, None])
                 for i, m in enumerate(masks)]
        count = sum(float(m.sum()) * la.block_params for m, la in zip(masks, layers, strict=True))
        total = sum(float(a.sum() + b.sum()) for a, b in parts)
        scale = total / count if count and total > 0 else 1.0
        with torch.no_grad():
            for layer, (a, b) in zip(layers, parts, strict=True):
                layer.omega_A.add_(a / scale)
                layer.omega_B.add_(b / scale)

    def _memory_queries(self, task: Task, train_loader: Any) -> torch.Tensor:
        """q(x) of up to ``memory_size`` training prompts of the task, evenly spaced over its training split (the
        same on every DDP rank: read from the records, not from this rank's shard), collated as in training."""
        records = task.train
        n = min(self.cfg.memory_size, len(records))
        if n == 0:
            return torch.zeros(0, self.gate.memory_q.shape[-1])
        picks = torch.linspace(0, len(records) - 1, n).round().long().tolist()
        collate = getattr(train_loader, "collate_fn", None)
        if not isinstance(collate, Collator):
            collate = Collator(self.tokenizer, train=True)
        batch = collate([records[i] for i in picks])
        batch = {k: v.to(self.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        return self.query(batch)

    # ---- loss -----------------------------------------------------------------------------------------------------
    def anchor_penalty(self) -> torch.Tensor:
        """λ_a Σ_layers Σ Ω (θ − θ*)² (Ω = 0 outside the shared expert and before the first task ends)."""
        return self.cfg.anchor_weight * sum(layer.anchor_penalty() for layer in self.seta_layers())

    def regularizer(self, batch: dict[str, torch.Tensor], out: Any) -> dict[str, torch.Tensor]:
        """``anchor`` (λ_a > 0), ``routing`` (λ_r > 0) and ``gate_open`` (λ_o > 0); the first two are 0 in the first
        task (nothing to protect yet)."""
        t = self.current_task
        terms: dict[str, torch.Tensor] = {}
        zero = self.gate.bias.new_zeros(())
        if self.cfg.anchor_weight > 0:
            terms["anchor"] = self.anchor_penalty() if t > 0 else zero
        if self.cfg.routing_weight > 0:
            terms["routing"] = self.cfg.routing_weight * self.gate.drift_penalty(t) if t > 0 else zero
        if self.cfg.gate_open_weight > 0:
            own = self.gate.logits(self.query(batch))[:, 1 + t]
            terms["gate_open"] = self.cfg.gate_open_weight * F.softplus(-own).mean()  # −log σ(z)
        return terms

    def param_groups(self) -> list[dict[str, Any]]:
        """Sub-blocks at ``lr`` with ``weight_decay``, the gate at ``gate_lr`` without decay (the base class builds
        AdamW over them and adds the warm-up)."""
        blocks = [p for layer in self.seta_layers() for p in (layer.A, layer.B)]
        return [{"params": blocks, "lr": self.cfg.lr, "weight_decay": self.cfg.weight_decay},
                {"params": [self.gate.weight, self.gate.bias], "lr": self.cfg.gate_lr, "weight_decay": 0.0}]

    # ---- evaluation -----------------------------------------------------------------------------------------------
    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> list[str]:
        """Generate, and keep each example's routing for :meth:`evaluation_report`."""
        texts = super().predict_step(batch, batch_idx, dataloader_idx)
        if self._last_gates is not None:
            self._eval_gates.extend(zip(batch["index"].tolist(), self._last_gates.tolist(), strict=True))
        return texts

    def on_predict_epoch_start(self) -> None:
        """Fresh prediction and routing buffers."""
        super().on_predict_epoch_start()
        self._eval_gates = []

    def on_predict_epoch_end(self) -> None:
        """Gather predictions (base class) and every rank's routing records."""
        super().on_predict_epoch_end()
        self._eval_gates = gather_by_index(self._eval_gates)

    def evaluation_report(self, j: int, task: Task) -> dict[str, float]:
        """For a learned task j: ``gate_drift`` (stored inputs, since the end of task j), ``gate_own`` and
        ``gate_leak`` (task j's test prompts: its own unique output, and the largest later task's output)."""
        done = int(self.tasks_done)
        if j >= done:
            return {}
        gates = torch.tensor([g for _, g in self._eval_gates]) if self._eval_gates else None
        return gate_report(self.gate, j, done, gates)

    # ---- bookkeeping ----------------------------------------------------------------------------------------------
    def param_report(self) -> dict[str, int]:
        """``added``: sub-blocks in use (shared expert + unique ones of tasks begun) and the open gate rows;
        ``trainable``: the sub-blocks the latest task trains (after its split) and its two gate rows; ``frozen``:
        added − trainable. Free sub-blocks of the budget and buffers (Ω, θ*, stores, memory) are not counted."""
        t = self.current_task
        d = self.gate.weight.shape[1] + 1
        added = self.gate.n_open * d
        trainable = 2 * d if 0 <= t < self.num_tasks else 0
        for layer in self.seta_layers():
            added += layer.blocks_in_use(t) * layer.block_params
            if 0 <= t < self.num_tasks:
                trainable += int(layer.trained_by[t].sum()) * layer.block_params
        return {"trainable": trainable, "added": added, "frozen": added - trainable,
                "total": self.base_param_count + added}

    def write_artifacts(self, run_dir: Path) -> None:
        """``param_growth.csv``, ``block_usage.csv`` and its figure ``block_usage.png`` (see :mod:`.report`)."""
        done = int(self.tasks_done)
        names = [self._task_names.get(t, str(t)) for t in range(done)]
        write_param_growth(self, Path(run_dir) / "param_growth.csv", names)
        write_block_usage(self, Path(run_dir), names)


__all__ = ["SETA"]
