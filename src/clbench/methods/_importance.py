"""Squared-gradient importance shared by EWC (diagonal Fisher) and SETA (Ω of the shared experts).

    E[g ⊙ g],  g = ∇_θ L_LM(batch or example)

read over at most ``max_batches`` training batches in eval mode (deterministic), and pooled across DDP ranks with one
all-reduce (every rank reads its own shard of the loader, so every rank must store the same estimate).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

_INPUTS = ("input_ids", "attention_mask", "labels")


def mean_squared_gradients(method: nn.Module, model: nn.Module, targets: list[torch.Tensor], loader: Any,
                           max_batches: int | None, per_example: bool) -> list[torch.Tensor]:
    """Mean over batches (or over single examples, ``per_example``) of the squared LM-loss gradient of ``targets``.

    Rows whose answer was truncated away carry no loss and are skipped. Raises RuntimeError when nothing was left.
    """
    needed = [p.requires_grad for p in targets]
    for p in targets:  # autograd.grad needs them even if a caller froze them
        p.requires_grad_(True)
    sums = [torch.zeros_like(p, dtype=torch.float32) for p in targets]
    count = 0
    device = targets[0].device
    was_training = method.training
    method.eval()
    try:
        with torch.enable_grad():
            for b, batch in enumerate(loader):
                if max_batches and b >= max_batches:
                    break
                rows = range(batch["input_ids"].shape[0]) if per_example else [slice(None)]
                for row in rows:
                    piece = {k: (batch[k][row : row + 1] if per_example else batch[k]).to(device) for k in _INPUTS}
                    if not (piece["labels"] != -100).any():
                        continue
                    loss = model(**piece).loss
                    grads = torch.autograd.grad(loss, targets, allow_unused=True)
                    for acc, g in zip(sums, grads, strict=True):
                        if g is not None:
                            acc += g.detach().float().pow(2)
                    count += 1
    finally:
        method.train(was_training)
        for p, flag in zip(targets, needed, strict=True):
            p.requires_grad_(flag)
    total = torch.tensor(float(count), device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        flat = torch.cat([*(s.flatten() for s in sums), total.view(1)])
        torch.distributed.all_reduce(flat)
        sums = [part.view_as(s) for part, s in zip(flat[:-1].split([s.numel() for s in sums]), sums, strict=True)]
        total = flat[-1]
    if total.item() == 0:
        raise RuntimeError("no training example with answer tokens to estimate the importance from")
    return [s / total for s in sums]
