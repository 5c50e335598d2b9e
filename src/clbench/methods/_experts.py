"""Shared adapter pieces for expert methods (moe-lora, seta, moses): a pool of LoRA experts wrapped around a frozen
linear, a pluggable router, and injection into target linears.

Why not peft: peft cannot register a new tuner type from outside (its ``PeftType`` enum is closed), and these methods
need per-example expert selection inside the layer. A wrapper module around ``nn.Linear`` is the simple route.

    y = W0 x + s Σ_{e ∈ S(x)} g_e(x) B_e A_e x,   s = alpha / r,  A_e ∈ R^{r×d_in},  B_e ∈ R^{d_out×r}, B_e = 0 at init

The router returns, per example, the selected expert indices S (k of them) and token weights g over those k, so only
the selected experts are computed (k·r·(d_in + d_out) multiply-adds per token, whatever the pool size).
"""

from __future__ import annotations

import abc
import math
import re
from collections.abc import Callable

import torch
from torch import nn

from clbench.config import ConfigError

LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


class Router(nn.Module, abc.ABC):
    """Base router: ``forward(x) -> (indices, weights)``.

    ``indices``: LongTensor (batch, k) of selected experts per example, or None for all experts.
    ``weights``: (batch, tokens, k) mixing weights for those experts (or (batch, tokens, E) when indices is None).
    """

    @abc.abstractmethod
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Route ``x`` (batch, tokens, d_in): the selected experts per example and their token weights."""


class ExpertLinear(nn.Module):
    """A frozen ``nn.Linear`` plus a pool of ``num_experts`` rank-``rank`` LoRA experts and a router."""

    def __init__(self, base: nn.Linear, num_experts: int, rank: int, alpha: float, router: Router | None = None):
        super().__init__()
        self.base = base
        self.num_experts = num_experts
        self.rank = rank
        self.scaling = alpha / rank
        self.A = nn.Parameter(torch.empty(num_experts, rank, base.in_features))
        self.B = nn.Parameter(torch.zeros(num_experts, base.out_features, rank))
        for e in range(num_experts):  # peft's LoRA init: kaiming-uniform A, zero B (the layer starts as W0)
            nn.init.kaiming_uniform_(self.A.data[e], a=math.sqrt(5))
        self.router = router

    @property
    def in_features(self) -> int:
        """Input width of the wrapped linear."""
        return self.base.in_features

    @property
    def out_features(self) -> int:
        """Output width of the wrapped linear."""
        return self.base.out_features

    def expert_params(self, e: int) -> int:
        """Parameters of one expert (A_e and B_e)."""
        return self.rank * (self.in_features + self.out_features)

    def delta(self, x: torch.Tensor, indices: torch.Tensor | None, weights: torch.Tensor) -> torch.Tensor:
        """s Σ_k w_k B_{i_k} A_{i_k} x, computing only the selected experts.

        x: (batch, tokens, d_in); indices: (batch, k) or None (all experts); weights: (batch, tokens, k).
        """
        A, B = self.A, self.B
        x = x.to(A.dtype)  # adapters are thin (rank 2-8): fp32 here costs little and avoids autocast dtype clashes
        if indices is None:
            h = torch.einsum("btd,erd->bter", x, A)
            h = h * weights.unsqueeze(-1)
            return self.scaling * torch.einsum("bter,eor->bto", h, B)
        A_sel, B_sel = A[indices], B[indices]  # (batch, k, r, d_in), (batch, k, d_out, r)
        h = torch.einsum("btd,bkrd->btkr", x, A_sel) * weights.unsqueeze(-1)
        return self.scaling * torch.einsum("btkr,bkor->bto", h, B_sel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """W0 x plus the routed experts' contribution (just W0 x when no router is set)."""
        out = self.base(x)
        if self.router is None:
            return out
        indices, weights = self.router(x)
        return out + self.delta(x, indices, weights).to(out.dtype)


def layer_index(name: str) -> int | None:
    """Transformer layer number in a module path such as ``model.layers.7.self_attn.q_proj``."""
    match = LAYER_INDEX.search("." + name + ".")
    return int(match.group(1)) if match else None


def check_layers(model: nn.Module, layers: list[int] | None) -> None:
    """Refuse (ConfigError) a ``layers`` knob that is empty or names a transformer layer the model does not have;
    None (every layer) is fine."""
    if layers is None:
        return
    n_layers = num_layers(model)
    if not layers or any(not 0 <= i < n_layers for i in layers):
        raise ConfigError(f"layers must be indices in 0..{n_layers - 1}, got {layers}")


def inject(
    model: nn.Module,
    target_modules: list[str],
    make: Callable[[str, nn.Linear], nn.Module],
    layers: list[int] | None = None,
) -> dict[str, nn.Module]:
    """Replace every ``nn.Linear`` whose name ends with one of ``target_modules`` (in ``layers``, if given).

    ``make(name, linear)`` builds the wrapper. Returns the wrappers by module name. Raises ConfigError for a bad
    ``layers`` list (:func:`check_layers`) before touching the model, ValueError if nothing matched.
    """
    check_layers(model, layers)
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in target_modules
               and (layers is None or layer_index(name) in layers)]
    if not targets:
        raise ValueError(f"no nn.Linear named {target_modules} in layers {layers} of {type(model).__name__}")
    wrappers = {}
    for name, linear in targets:
        parent_name, child = name.rsplit(".", 1) if "." in name else ("", name)
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapper = make(name, linear)
        setattr(parent, child, wrapper)
        wrappers[name] = wrapper
    return wrappers


def num_layers(model: nn.Module) -> int:
    """Number of transformer layers (from the config, else from module names)."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "num_hidden_layers", None):
        return int(config.num_hidden_layers)
    return 1 + max((i for n, _ in model.named_modules() if (i := layer_index(n)) is not None), default=-1)
