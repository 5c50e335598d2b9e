"""Learning without Forgetting on the LoRA adapter (Li & Hoiem, 2017, TPAMI, Sec. 3, Eq. 2-4).

One LoRA adapter is trained through all tasks (as ``lora``). The "old network" is the adapter as it was when the
previous task ended: a copy of its tensors kept in buffers (``lwf_teacher``), swapped in with
``torch.func.functional_call`` for a no-grad forward, so the frozen base model is shared and never copied. From the
second task on, the loss on a batch of the CURRENT task's inputs is ::

    loss = LM loss + λ · mean_{positions i} KL( softmax(z_old_i / T) ‖ softmax(z_i / T) )

z_i the current next-token logits at position i, z_old_i the old adapter's. KL(p_old ‖ p) equals the paper's
"knowledge distillation" cross-entropy −Σ p_old log p (Eq. 3) minus the entropy of p_old, a constant: the same
gradient, and 0 exactly when the model still agrees with its old self (so the term starts at 0 on task 2). T = 2 and
λ = 1 are the paper's values (λ_o = 1, T = 2); like the paper we do not multiply by T².

Where the paper is silent (it has one output per image; an LM has one per token) we choose, as a knob: ``positions:
tokens`` (default) averages over every non-padding position, i.e. every next-token distribution the old model
produced on the new inputs; ``answer`` only over the positions that predict answer tokens. The teacher forward runs
in eval mode (no dropout), as a recorded response of the old network would be.

TRACE (model/Regular/LwF.py) differs: it records the old model's logits once per batch index before the task and
reuses them by step number, although the training loader reshuffles every epoch (teacher and student then see
different inputs); it calls ``F.kl_div(log_softmax(z_old/T), softmax(z/T), 'batchmean')``, which is KL(p ‖ p_old)
(the reversed direction), summed over all positions including padding and divided by the batch size.
``trace_kl: true`` gives that loss (direction, padding, normalisation), computed on the matching inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from clbench.benchmark import Task
from clbench.registry import register_method

from .lora import LoRA, LoRAMethodConfig

POSITIONS = ("tokens", "answer")


@dataclass(kw_only=True)
class LwFConfig(LoRAMethodConfig):
    """LwF knobs: the LoRA shape plus the distillation weight, temperature and which positions are distilled."""

    lwf_lambda: float  # λ_o of the paper: weight of the distillation term
    temperature: float  # T of the paper (softmax(z / T) for teacher and student)
    positions: str  # "tokens" = every non-padding position, "answer" = positions predicting the answer
    trace_kl: bool  # TRACE's loss: KL(student ‖ teacher), padding included, divided by the batch size

    def __post_init__(self) -> None:
        if self.lwf_lambda < 0:
            raise ValueError(f"lwf_lambda must be >= 0, got {self.lwf_lambda}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {list(POSITIONS)}, got '{self.positions}'")


def _buffer_key(param_name: str) -> str:
    return param_name.replace(".", "__")  # buffer names may not contain dots


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, temperature: float,
                      trace_kl: bool = False) -> torch.Tensor:
    """Mean over masked positions of KL(softmax(teacher/T) ‖ softmax(logits/T)) (Li & Hoiem's KD term up to a
    constant). ``trace_kl``: TRACE's Σ_{all positions} KL(softmax(logits/T) ‖ softmax(teacher/T)) / batch size."""
    log_p = F.log_softmax(logits.float() / temperature, dim=-1)
    log_q = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if trace_kl:
        return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)
    per_position = F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1)
    keep = mask.to(per_position.dtype)
    return (per_position * keep).sum() / keep.sum().clamp_min(1.0)


@register_method("lwf")
class LwF(LoRA):
    """LoRA plus LwF: distil the previous task's adapter (kept in buffers) on the current task's inputs."""

    config_class = LwFConfig

    def __init__(self, model: nn.Module, tokenizer: Any, cfg: LwFConfig, num_tasks: int):
        super().__init__(model, tokenizer, cfg, num_tasks)
        self.lwf_names = [n for n, _ in self.model.named_parameters() if "lora_" in n]
        # allocated now so a resumed run can load them (load_checkpoint_state refuses unknown names)
        self.lwf_teacher = nn.Module()
        params = dict(self.model.named_parameters())
        for name in self.lwf_names:
            self.lwf_teacher.register_buffer(_buffer_key(name), torch.zeros_like(params[name]))
        self.register_buffer("lwf_tasks_done", torch.zeros((), dtype=torch.long))

    def teacher_state(self) -> dict[str, torch.Tensor]:
        """The old adapter's tensors by parameter name (as ``functional_call`` wants them)."""
        return {n: getattr(self.lwf_teacher, _buffer_key(n)) for n in self.lwf_names}

    @torch.no_grad()
    def teacher_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Next-token logits of the base model with the OLD adapter swapped in (eval mode, no grad)."""
        was_training = self.model.training
        self.model.eval()
        try:
            out = functional_call(self.model, self.teacher_state(), args=(),
                                  kwargs={"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
        finally:
            self.model.train(was_training)
        return out.logits

    def distill_mask(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Positions distilled: every non-padding one, or those predicting answer tokens (labels shift by one)."""
        if self.cfg.positions == "tokens":
            return batch["attention_mask"].bool()
        mask = torch.zeros_like(batch["labels"], dtype=torch.bool)
        mask[:, :-1] = batch["labels"][:, 1:] != -100
        return mask

    def regularizer(self, batch: dict[str, torch.Tensor], out: Any) -> dict[str, torch.Tensor]:
        """``lwf`` = λ · distillation loss against the previous task's adapter, from the second task on."""
        if int(self.lwf_tasks_done) == 0 or self.cfg.lwf_lambda == 0:
            return {}
        loss = distillation_loss(out.logits, self.teacher_logits(batch), self.distill_mask(batch),
                                 self.cfg.temperature, self.cfg.trace_kl)
        return {"lwf": self.cfg.lwf_lambda * loss}

    def end_task(self, t: int, task: Task, train_loader: Any = None) -> None:
        """Keep the adapter that just finished as the next task's teacher (in buffers: checkpointed)."""
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, buf in self.teacher_state().items():
                buf.copy_(params[name].detach())
            self.lwf_tasks_done += 1
