"""Progressive Prompts (Razdaibiedina et al., 2023, "Progressive Prompts: Continual Learning for Language Models",
ICLR 2023, arXiv 2301.12314). TRACE's version: ``model/Dynamic_network/PP.py`` (BeyonderXX/TRACE @462e39f).

Task k (0-based) learns a new soft prompt P_k of L vectors in front of the input; every earlier prompt is frozen and
kept, and the model always reads the whole stack, newest first (the paper's Eq. 4)::

    training task k:  max_{P_k} log p(y | [P'_k ; P'_{k-1} ; ... ; P'_0 ; x])      base model and P'_{<k} frozen
    test (no task id): every finished prompt, [P'_{T-1} ; ... ; P'_0 ; x]          the same input for every task
    test of task j under --oracle-task-id: [P'_j ; ... ; P'_0 ; x]                 the input task j trained with

The paper's protocol is the last line: its code (arazd/ProgressivePrompts, ``T5ContinualLearner.train_continual``)
scores each task right after learning it, with the stack up to that task, and that stack never changes afterwards,
so the paper's "no forgetting" is task-aware. clbench evaluates every method task-agnostically by default, so the
default here is the whole stack; ``--oracle-task-id`` gives the paper's setting (with it, R[i, j] = R[j, j] exactly).

With the optional residual reparameterisation (the paper's Sec. 3.3) the prompt trained for task k is
P'_k = P_k + MLP_k(P_k); after the task P'_k is computed once, stored in a frozen buffer and the MLP is dropped (the
paper: "we discard the MLP after training"), so a finished task costs L·d numbers whatever the MLP's size.

Where we differ from TRACE's PP.py (docs/methods/progressive-prompts.md has the list): every task starts a fresh
prompt (TRACE reuses the previous task's trained prompt: ``init_from_previous``), the stored prompt is the MLP output
that was trained (TRACE stores the raw prompt: its ``progress_previous_prompts(task=...)`` passes a keyword the
function does not take, so the MLP branch never runs), and evaluation uses the prompts (TRACE's inference scripts
call ``generate(input_ids=...)`` without any prompt, i.e. they score the frozen base model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from clbench.benchmark import Task
from clbench.method import CLMethod, MethodConfig
from clbench.registry import register_method

from ._prompts import generate_with_prefix, prefixed_forward, vocab_prompt_init

MLP_KINDS = ("none", "residual", "trace")


@dataclass(kw_only=True)
class ProgressivePromptsConfig(MethodConfig):
    """Progressive Prompts knobs (defaults in configs/methods/progressive-prompts.yaml)."""

    prompt_length: int  # L, vectors per task (the paper's and its code's 10; TRACE uses 20)
    mlp: str  # reparameterisation: none | residual (paper) | trace (TRACE's deeper MLP2)
    mlp_bottleneck: int  # hidden width of the reparameterisation MLP (the paper's code: 800)
    init_scale: float  # P_k starts at L random vocabulary embeddings times this (TRACE: 0.01)
    init_from_previous: bool  # TRACE: P_k starts where P_{k-1} ended instead of a fresh draw

    def __post_init__(self) -> None:
        if self.prompt_length < 1:
            raise ValueError(f"prompt_length must be >= 1, got {self.prompt_length}")
        if self.mlp not in MLP_KINDS:
            raise ValueError(f"mlp must be one of {', '.join(MLP_KINDS)}, got {self.mlp!r}")
        if self.mlp_bottleneck < 2:
            raise ValueError(f"mlp_bottleneck must be >= 2, got {self.mlp_bottleneck}")
        if self.init_scale <= 0:
            raise ValueError(f"init_scale must be > 0, got {self.init_scale}")


class ResidualMLP(nn.Module):
    """P' = P + f(P), the paper's residual prompt reparameterisation (Sec. 3.3).

    ``residual`` (the paper's code, its ``MLP1`` with layer norm): f = LayerNorm ∘ Linear(b→d) ∘ ReLU ∘ Linear(d→b).
    ``trace`` (TRACE's ``MLP2``): f = Linear(b/2→d) ∘ tanh ∘ Linear(b→b/2) ∘ ReLU ∘ Linear(d→b).
    """

    def __init__(self, dim: int, bottleneck: int, kind: str):
        super().__init__()
        if kind == "residual":
            self.f = nn.Sequential(nn.Linear(dim, bottleneck), nn.ReLU(), nn.Linear(bottleneck, dim), nn.LayerNorm(dim))
        elif kind == "trace":
            half = bottleneck // 2
            self.f = nn.Sequential(nn.Linear(dim, bottleneck), nn.ReLU(), nn.Linear(bottleneck, half), nn.Tanh(),
                                   nn.Linear(half, dim))
        else:
            raise ValueError(f"unknown MLP kind {kind!r}")

    def reset(self) -> None:
        """Fresh PyTorch default init of every layer (a new task gets a new MLP, as the paper's MLP_k)."""
        for module in self.f:
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def forward(self, prompt: torch.Tensor) -> torch.Tensor:
        """P + f(P) for a prompt of shape (L, d)."""
        return prompt + self.f(prompt)


@register_method("progressive-prompts")
class ProgressivePrompts(CLMethod):
    """A new soft prompt per task; earlier prompts frozen and concatenated in front of it (task-agnostic at test)."""

    config_class = ProgressivePromptsConfig
    supports_oracle_task_id = True  # task j's own stack [P'_j ; ... ; P'_0], the paper's evaluation

    def __init__(self, model: nn.Module, tokenizer: Any, cfg: ProgressivePromptsConfig, num_tasks: int):
        super().__init__(model, tokenizer, cfg, num_tasks)
        embeddings = model.get_input_embeddings().weight
        dim = embeddings.shape[1]
        # raw prompts P_k, one Parameter per task so a task's prompt is frozen by requires_grad alone; all drawn here
        # (seeded by the harness) so a resumed run rebuilds the same not-yet-trained prompts
        self.prompts = nn.ParameterList([
            nn.Parameter(vocab_prompt_init(embeddings, cfg.prompt_length, cfg.init_scale)) for _ in range(num_tasks)])
        # P'_k of finished tasks: a buffer, written once by end_task and never in any optimiser
        self.register_buffer("finished", torch.zeros(num_tasks, cfg.prompt_length, dim))
        self.register_buffer("task_done", torch.zeros(num_tasks, dtype=torch.bool))
        # one MLP, re-initialised per task (the paper's MLP_k lives only while task k trains)
        self.mlp = ResidualMLP(dim, cfg.mlp_bottleneck, cfg.mlp) if cfg.mlp != "none" else None

    # ---- task hooks ---------------------------------------------------------------------------------------------
    def begin_task(self, t: int, task: Task) -> None:
        """Only P_t (and a freshly initialised MLP) train; base model and every other prompt are frozen."""
        super().begin_task(t, task)
        self.freeze_all()
        if self.cfg.init_from_previous and t > 0:
            with torch.no_grad():  # TRACE's behaviour: one prompt tensor carried on from task to task
                self.prompts[t].copy_(self.prompts[t - 1])
        self.prompts[t].requires_grad_(True)
        if self.mlp is not None:
            self.mlp.reset()  # the harness seeds before begin_task, so a resumed run draws the same init
            self.mlp.requires_grad_(True)

    @torch.no_grad()
    def end_task(self, t: int, task: Task, train_loader: Any = None) -> None:
        """Store P'_t (after the MLP) in the frozen buffer; P_t and the MLP never train again."""
        self.finished[t] = self.live_prompt(t).float()
        self.task_done[t] = True
        self.freeze_all()

    # ---- the prefix ---------------------------------------------------------------------------------------------
    def live_prompt(self, t: int) -> torch.Tensor:
        """P'_t of the task being trained: P_t, or P_t + MLP(P_t) with the reparameterisation."""
        return self.mlp(self.prompts[t]) if self.mlp is not None else self.prompts[t]

    def prefix(self, task_id: int | None = None) -> torch.Tensor | None:
        """[P'_t ; P'_{t-1} ; ... ; P'_0] (newest first), or None before any task began (the base model).

        ``t`` is the current task, or ``task_id`` when given (``--oracle-task-id``: the stack task ``task_id`` was
        trained with; later prompts are left out). A task that began and is not finished contributes its live
        prompt (so eval-mode forwards during a task see what training sees); finished tasks contribute their stored
        P'_k.
        """
        parts = []
        t = self.current_task
        newest = self.num_tasks - 1 if task_id is None else task_id
        if 0 <= t <= newest and not bool(self.task_done[t]):
            parts.append(self.live_prompt(t))
        parts += [self.finished[k] for k in reversed(range(newest + 1)) if bool(self.task_done[k])]
        return torch.cat(parts) if parts else None

    def _batch_prefix(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        task_id = None
        if "task_id" in batch:  # --oracle-task-id: the harness sends one task per batch
            ids = torch.unique(batch["task_id"]).tolist()
            if len(ids) != 1:
                raise ValueError(f"progressive-prompts: one task id per batch under --oracle-task-id, got {ids}")
            task_id = int(ids[0])
            if not 0 <= task_id < self.num_tasks:
                raise ValueError(f"task_id {task_id} out of range: the run has {self.num_tasks} tasks")
        prefix = self.prefix(task_id)
        return None if prefix is None else prefix.unsqueeze(0).expand(batch["input_ids"].shape[0], -1, -1)

    # ---- training and inference ---------------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        """LM forward with the prompt stack in front of every example; logits cut back to the input tokens."""
        prefix = self._batch_prefix(batch)
        if prefix is None:
            return super().forward(batch)
        return prefixed_forward(self.model, batch, prefix)

    @torch.no_grad()
    def generate(self, batch: dict[str, torch.Tensor], max_new_tokens: int) -> torch.Tensor:
        """Greedy generation from ``inputs_embeds`` = [prompt stack ; x] (see ``_prompts.generate_with_prefix``)."""
        prefix = self._batch_prefix(batch)
        if prefix is None:
            return super().generate(batch, max_new_tokens)
        return generate_with_prefix(self.model, self.tokenizer, batch, prefix, max_new_tokens)

    # ---- bookkeeping --------------------------------------------------------------------------------------------
    def param_report(self) -> dict[str, int]:
        """``trainable``: P_t (+ the MLP) of the running task; ``added``: L·d per finished task (the MLP is dropped
        after its task), plus the running task's trainables; ``total``: base + added. Pre-allocated prompts of
        future tasks are not counted."""
        t = self.current_task
        running = 0 <= t < self.num_tasks and not bool(self.task_done[t])
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        frozen = int(self.task_done.sum()) * self.finished[0].numel()
        added = frozen + (trainable if running else 0)
        return {"trainable": trainable, "added": added, "frozen": frozen, "total": self.base_param_count + added}


__all__ = ["ProgressivePrompts", "ProgressivePromptsConfig", "ResidualMLP"]
