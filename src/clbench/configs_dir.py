"""YAML defaults shipped in ``configs/`` (installed as ``clbench.configs``): one file per method / hardware profile."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from clbench.config import load_yaml


def configs_root() -> Path:
    """The folder holding methods/, benchmarks/ and hardware/ YAML files."""
    return Path(str(resources.files("clbench.configs")))


def method_defaults(name: str) -> dict[str, Any]:
    """``configs/methods/<name>.yaml`` as a dict, or {} when the method ships no YAML (plugins may not)."""
    path = configs_root() / "methods" / f"{name}.yaml"
    return load_yaml(path) if path.is_file() else {}


def hardware_profile(name: str) -> dict[str, Any]:
    """``configs/hardware/<name>.yaml``: devices, strategy, precision... for ``clbench run --hardware NAME``."""
    path = configs_root() / "hardware" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (configs_root() / "hardware").glob("*.yaml"))
        from clbench.config import ConfigError

        raise ConfigError(f"unknown hardware profile '{name}' (known: {', '.join(known)})")
    return load_yaml(path)
