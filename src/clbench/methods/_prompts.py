"""Shared key/query/prompt machinery for prompt-based CL methods (MoSEs, L2P-style methods).

L2P (Wang et al., 2022, "Learning to Prompt for Continual Learning") and MoSEs pick a task (or prompts) per example
by matching a query against learned keys::

    q(x)   = mean over the example's prompt tokens (BOS excluded) of a frozen hidden state h_ℓ(x)
    τ(x)   = argmax_t cos(q(x), k_t)                      nearest key, over the tasks that may be chosen
    pull   = mean_x (1 − cos(q(x), k_t))                  L2P's "surrogate loss ... pulls selected keys closer"

and L2P prepends learned prompt vectors P (L × d) to the input embeddings. Everything here is a plain function of
its arguments (no module state), so a method decides where the hidden state comes from (a hook in its own forward,
or :func:`hidden_at_layer`) and passes the result on explicitly.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clbench.benchmark import IGNORE_INDEX
from clbench.config import ConfigError

_DECODER_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)$")


# ---- query ------------------------------------------------------------------------------------------------------
def query_mask(batch: dict[str, torch.Tensor], bos_token_id: int | None) -> torch.Tensor:
    """(batch, tokens) bool: the tokens averaged into q(x): the prompt tokens (``prompt_mask`` if the batch has one,
    else the attention mask), BOS excluded unless a row has nothing else.

    Why BOS is excluded: it is an attention sink with massive activations (SmolLM2 layer 14: norm ~25000 vs ~150 for
    other tokens), so averaging it in makes every task's query the same vector (cosine 0.999 across tasks).
    """
    mask = batch.get("prompt_mask", batch["attention_mask"]).bool()
    if bos_token_id is None:
        return mask
    no_bos = mask & (batch["input_ids"] != bos_token_id)
    return torch.where(no_bos.any(-1, keepdim=True), no_bos, mask)


def pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q = Σ_i mask_i h_i / Σ_i mask_i over the tokens (float32, detached: the query comes from frozen weights)."""
    weights = mask.to(torch.float32).unsqueeze(-1)
    return (hidden.detach().float() * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def layer_output(output: Any) -> torch.Tensor:
    """The hidden-state tensor of a decoder layer's output (a tensor, or a tuple whose first item is one)."""
    return output[0] if isinstance(output, tuple) else output


def check_hidden_layer(knob: str, index: int, below: int, why: str) -> None:
    """Refuse (ConfigError) a hidden-state layer knob (``query_layer``, ``key_layer``) outside -1..below − 1, where -1
    is the token embeddings; ``why`` says in the message where the bound comes from."""
    if not -1 <= index < below:
        raise ConfigError(f"{knob} must be in -1..{below - 1} ({why}), got {index}")


def find_layer_module(model: nn.Module, index: int) -> nn.Module:
    """The decoder layer ``...layers.<index>`` (its output is the residual stream after that layer), or the token
    embeddings for ``index == -1``."""
    if index < 0:
        return model.get_input_embeddings()
    for name, module in model.named_modules():
        match = _DECODER_LAYER.search(name)
        if match and int(match.group(1)) == index:
            return module
    raise ConfigError(f"key_layer {index}: the model has no module named '...layers.{index}'")


class _StopForward(Exception):
    """Raised by a hook to end a forward pass early (only the layers up to the key layer are needed)."""


@torch.no_grad()
def hidden_at_layer(model: nn.Module, index: int, input_ids: torch.Tensor | None = None,
                    attention_mask: torch.Tensor | None = None, **inputs: Any) -> torch.Tensor:
    """h_index: the hidden state after decoder layer ``index`` (-1: token embeddings), running only the layers up to
    it (about (index + 1) / n_layers of a forward). ``inputs`` may hold ``inputs_embeds`` instead of ids."""
    captured: dict[str, torch.Tensor] = {}

    def stop(module: nn.Module, args: Any, output: Any) -> None:
        captured["hidden"] = layer_output(output)
        raise _StopForward

    handle = find_layer_module(model, index).register_forward_hook(stop)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **inputs)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if "hidden" not in captured:
        raise RuntimeError(f"layer {index} never ran in the forward pass")
    return captured["hidden"]


# ---- keys -------------------------------------------------------------------------------------------------------
def key_cosines(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """cos(q_b, k_t) for every example b and key t: (batch, n_keys), float32."""
    return F.normalize(query.float(), dim=-1) @ F.normalize(keys.detach().float(), dim=-1).T


def nearest_key(query: torch.Tensor, keys: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """argmax_t cos(q(x), k_t) per example, over the keys with ``allowed[t]`` (all if None); -1 where none is."""
    if allowed is not None and not bool(allowed.any()):
        return torch.full((query.shape[0],), -1, dtype=torch.long, device=query.device)
    cos = key_cosines(query, keys)
    if allowed is not None:
        cos = cos.masked_fill(~allowed.to(cos.device), float("-inf"))
    return cos.argmax(-1)


def pull_loss(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """L2P's pull constraint mean_b (1 − cos(q_b, k_b)); ``keys`` is (d,) for one key or (batch, d) per example.
    The query is detached (frozen features), so only the keys learn."""
    keys = keys if keys.dim() == 2 else keys.unsqueeze(0)
    return (1.0 - F.cosine_similarity(query.detach().to(keys.dtype), keys, dim=-1)).mean()


def mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over the DDP ranks (``x`` itself when not distributed), so replicas initialise keys alike."""
    x = x.clone()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(x)
        x /= torch.distributed.get_world_size()
    return x


# ---- prompts in embedding space ---------------------------------------------------------------------------------
def prepend_prompts(embeds: torch.Tensor, attention_mask: torch.Tensor, prompts: torch.Tensor,
                    labels: torch.Tensor | None = None, keep: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Model inputs with per-example prompt vectors in front: ``inputs_embeds`` = [P_b ; E(x_b)].

    embeds (batch, tokens, d); prompts (batch, L, d), one prompt per example; ``keep`` (batch,) bool, default all:
    rows with False get their prompt positions masked out (they see the model without a prompt). The attention mask
    grows by L (1 where kept) and labels by L ignored positions, so the LM loss is unchanged in meaning.
    """
    n, length = embeds.shape[0], prompts.shape[1]
    keep = torch.ones(n, dtype=torch.bool, device=embeds.device) if keep is None else keep.to(embeds.device)
    prefix = prompts.to(embeds.dtype) * keep[:, None, None].to(embeds.dtype)
    inputs = {"inputs_embeds": torch.cat([prefix, embeds], 1),
              "attention_mask": torch.cat([keep[:, None].expand(n, length).to(attention_mask.dtype),
                                           attention_mask], 1)}
    if labels is not None:
        ignore = torch.full((n, length), IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
        inputs["labels"] = torch.cat([ignore, labels], 1)
    return inputs


def cut_prompt_logits(logits: torch.Tensor, length: int) -> torch.Tensor:
    """Drop the logits of L prompt positions in front, so there is one row per input token as without prompts."""
    return logits[:, length:]


def mask_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip masked positions: cumsum(mask) − 1, clamped at 0 (HF ``generate``'s rule), so a row's
    visible tokens are numbered 0, 1, ... wherever its pads sit."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def prefixed_forward(model: nn.Module, batch: dict[str, torch.Tensor], prompts: torch.Tensor,
                     keep: torch.Tensor | None = None) -> Any:
    """LM forward of ``batch`` with ``prompts`` (batch, L, d) in front (:func:`prepend_prompts`); the returned logits
    are cut back to one row per input token, and the loss (if the batch has labels) covers the answer tokens only.

    Position ids come from the attention mask (:func:`mask_positions`), as ``generate`` derives them: a left-padded
    batch ([P ; pads ; x]) then gets the positions of its prefill, and a right-padded one the default 0, 1, ...
    """
    embeds = model.get_input_embeddings()(batch["input_ids"])
    inputs = prepend_prompts(embeds, batch["attention_mask"], prompts, batch.get("labels"), keep)
    out = model(**inputs, position_ids=mask_positions(inputs["attention_mask"]), use_cache=False)
    out["logits"] = cut_prompt_logits(out.logits, prompts.shape[1])
    return out


@torch.no_grad()
def generate_with_prefix(model: nn.Module, tokenizer: Any, batch: dict[str, torch.Tensor], prompts: torch.Tensor,
                         max_new_tokens: int, keep: torch.Tensor | None = None, **generate_kwargs: Any) -> Any:
    """Greedy generation with ``prompts`` (batch, L, d) in front of a left-padded batch; returns the new tokens only.

    Why ``inputs_embeds`` and not a key/value prefix: prompt tuning puts the vectors in the input (the first layer
    sees them like tokens), so the prefill over [P ; pads ; x] is the training forward itself; the attention mask
    hides the pads and ``generate`` derives position ids from it (cumsum), so a row's positions are 0..L-1 for P
    and L.. for its tokens, as in the right-padded training batch (tests check the first-token logits agree). With
    only ``inputs_embeds``, HF's ``generate`` returns just the new tokens.
    """
    embeds = model.get_input_embeddings()(batch["input_ids"])
    inputs = prepend_prompts(embeds, batch["attention_mask"], prompts, keep=keep)
    return model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                          pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **generate_kwargs)


def vocab_prompt_init(embeddings: nn.Embedding | torch.Tensor, length: int, scale: float = 1.0) -> torch.Tensor:
    """L rows drawn at random from the vocabulary embedding table (an ``nn.Embedding`` or its (vocab, d) weight),
    times ``scale``, float32: the prompt init of Lester et al., 2021 (global torch RNG, seeded by the harness)."""
    table = embeddings.weight if isinstance(embeddings, nn.Embedding) else embeddings
    rows = torch.randint(0, table.shape[0], (length,))
    return table.detach()[rows].clone().float() * scale

__all__ = ["check_hidden_layer", "cut_prompt_logits", "find_layer_module", "generate_with_prefix", "hidden_at_layer",
           "key_cosines", "layer_output", "mask_positions", "mean_over_ranks", "nearest_key", "pool",
           "prefixed_forward", "prepend_prompts", "pull_loss", "query_mask", "vocab_prompt_init"]
