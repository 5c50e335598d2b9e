"""Task routing of one model call: the query at the key layer picks each example's task, inside the same forward.

    q(x)  = mean over the prompt tokens (BOS excluded) of h_ℓ(x)     h_ℓ: the frozen model's state after layer ℓ
    τ(x)  = forced id (training task / oracle) if given, else argmax_{t active} cos(q(x), k_t)

ℓ is below the first MoSE layer, so q(x) comes from frozen weights and is read by a hook in the same pass: no extra
forward. With task prompts (L > 0) the input carries L placeholder slots in front; the hook adds the chosen task's
prompt P_τ to those slots' hidden states at ℓ, so the layers above (and only they) see the prompt, and the query
(computed before) does not depend on it. Everything the call decided comes back as a :class:`Routed` value.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._prompts import find_layer_module, layer_output, pool
from .layer import LayerRoute, MoSELinear


@dataclass
class Routed:
    """The routing decision of one model call (returned to the caller; nothing of it outlives the call elsewhere).

    ``query`` (batch, d) q(x); ``key_choice`` (batch,) the nearest active key's task (-1 if none), reported even
    when an id was forced; ``route`` what the MoSE layers got (its ``task_ids`` are the tasks used, and its
    ``choices`` the experts each example activated per layer).
    """

    route: LayerRoute
    query: torch.Tensor | None = None
    key_choice: torch.Tensor | None = None


@contextlib.contextmanager
def bound(layers: dict[str, MoSELinear], route: LayerRoute) -> Iterator[None]:
    """Hand ``route`` to every MoSE layer for the duration of one model call (the transformer calls ``q_proj(x)``
    with ``x`` alone, so this scope is how the call's decision reaches them); always cleared on exit."""
    for layer in layers.values():
        layer.route = route
    try:
        yield
    finally:
        for layer in layers.values():
            layer.route = None


@contextlib.contextmanager
def routed_call(model: nn.Module, key_layer: int, layers: dict[str, MoSELinear], token_mask: torch.Tensor,
                query_mask: torch.Tensor, choose: Callable[[torch.Tensor], torch.Tensor],
                forced: torch.Tensor | None, train_task: int | None = None,
                prompt: Callable[[torch.Tensor], torch.Tensor] | None = None, prompt_length: int = 0
                ) -> Iterator[Routed]:
    """Scope of one routed model call (a forward or a whole ``generate``); yields its :class:`Routed`.

    A hook on the key layer fires at the call's first step (prefill): it pools ``query_mask`` tokens into q(x),
    takes ``choose(q)`` (nearest key) and the task ids (``forced`` where given), and, if ``prompt`` is set, adds
    ``prompt(task_ids)`` ((batch, L, d), zero rows for no task) to the first ``prompt_length`` positions. Decoding
    steps reuse the decision (their slots' keys and values are cached from the prefill).
    """
    result = Routed(route=LayerRoute(token_mask=token_mask, train_task=train_task))

    def on_key_layer(module: nn.Module, args: Any, output: Any) -> Any:
        if result.route.task_ids is not None:
            return None
        hidden = layer_output(output)
        if query_mask.shape != hidden.shape[:2]:
            raise RuntimeError(f"query mask {tuple(query_mask.shape)} does not match the hidden states "
                               f"{tuple(hidden.shape[:2])} at the key layer")
        result.query = pool(hidden, query_mask)
        result.key_choice = choose(result.query)
        result.route.task_ids = forced if forced is not None else result.key_choice
        if prompt is None or prompt_length == 0:
            return None
        offset = prompt(result.route.task_ids).to(hidden.dtype)
        hidden = torch.cat([hidden[:, :prompt_length] + offset, hidden[:, prompt_length:]], 1)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = find_layer_module(model, key_layer).register_forward_hook(on_key_layer)
    try:
        with bound(layers, result.route):
            yield result
    finally:
        handle.remove()
