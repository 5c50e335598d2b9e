"""YAML defaults shipped in ``configs/`` (installed as ``clbench.configs``): one file per method / hardware profile."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from clbench.config import load_yaml


def configs_root() -> Path:
    """The folder holding methods/, benchmarks/ and hardware/ YAML files."""
    return Path(str(resources.files("clbench.configs")))


SEARCH_SPACE_KEY = "search_space"


def _method_yaml(name: str) -> dict[str, Any]:
    path = configs_root() / "methods" / f"{name}.yaml"
    return load_yaml(path) if path.is_file() else {}


def method_defaults(name: str) -> dict[str, Any]:
    """The knobs of ``configs/methods/<name>.yaml`` (its ``search_space:`` block left out), or {} when the method
    ships no YAML (plugins may not)."""
    return {k: v for k, v in _method_yaml(name).items() if k != SEARCH_SPACE_KEY}


def method_search_space(name: str) -> dict[str, Any]:
    """The ``search_space:`` block of ``configs/methods/<name>.yaml`` for ``clbench tune`` ({} when absent).

    Each entry is ``knob: {type: float|int|categorical, low, high, log, choices}`` (Optuna's suggest_* arguments).
    """
    space = _method_yaml(name).get(SEARCH_SPACE_KEY) or {}
    if not isinstance(space, dict):
        from clbench.config import ConfigError

        raise ConfigError(f"configs/methods/{name}.yaml: search_space must be a mapping of knob: spec")
    return space


def hardware_profile(name: str) -> dict[str, Any]:
    """``configs/hardware/<name>.yaml``: devices, strategy, precision... for ``clbench run --hardware NAME``."""
    path = configs_root() / "hardware" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (configs_root() / "hardware").glob("*.yaml"))
        from clbench.config import ConfigError

        raise ConfigError(f"unknown hardware profile '{name}' (known: {', '.join(known)})")
    return load_yaml(path)
