"""Config dataclasses from YAML / ``key=value`` overrides, with typo errors that name the nearest valid key.

A config dataclass documents each field where it declares it, with ``setting(default, help, ...)``: the help text
(``--help`` of the command generated from the dataclass, see ``clbench.cli_options``) and the field's role in a run's
identity live in the field's metadata, so there is one place to read them.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

# Keys of a config dataclass field's metadata (written by ``setting``) and their values when a field leaves them out.
HELP = "help"  # one line for `--help` and the docs: what the field does (its default is shown from the field)
CLI = "cli"  # False: not a generated command-line option (the command sets it another way; the help says how)
ALIASES = "aliases"  # more option names, e.g. ("--micro-batch-size",)
IDENTITY = "identity"  # "always": part of a run's identity (folder hash, resume check); "never": changes nothing a
#   run computes (where it is written, progress display); "if_set": added after run folders were published, so left
#   out of the identity while unset (None), and a rerun of an earlier command still finds its folder
SCORES = "scores"  # False: part of the identity but leaves the scores (R, OP/BWT/FWT) unchanged
METADATA_DEFAULTS: dict[str, Any] = {HELP: "", CLI: True, ALIASES: (), IDENTITY: "always", SCORES: True}
IDENTITY_VALUES = ("always", "never", "if_set")


def setting(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = dataclasses.MISSING,
            cli: bool = True, aliases: tuple[str, ...] = (), identity: str = "always", scores: bool = True) -> Any:
    """A dataclass field with its help text and role in metadata: ``seed: int = setting(0, "run seed")``.

    ``factory`` is dataclasses' ``default_factory``; the keyword arguments are the metadata keys above.
    """
    if identity not in IDENTITY_VALUES:
        raise ValueError(f"identity must be one of {IDENTITY_VALUES}, got {identity!r}")
    metadata = {HELP: help, CLI: cli, ALIASES: tuple(aliases), IDENTITY: identity, SCORES: scores}
    return dataclasses.field(default=default, default_factory=factory, metadata=metadata)


def field_meta(f: dataclasses.Field, key: str) -> Any:
    """``f``'s metadata ``key``, or the value a field without it has (``METADATA_DEFAULTS``)."""
    return f.metadata.get(key, METADATA_DEFAULTS[key])


def fields_where(cls: type, **metadata: Any) -> frozenset[str]:
    """Names of ``cls``'s fields whose metadata matches, e.g. ``fields_where(RunConfig, identity="never")``."""
    return frozenset(f.name for f in dataclasses.fields(cls)
                     if all(field_meta(f, k) == v for k, v in metadata.items()))


class ConfigError(ValueError):
    """A config key or value is wrong; the message is one line a user can act on."""


def _nearest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(valid))}"


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def coerce(value: Any, annotation: Any, key: str) -> Any:
    """Turn a YAML value or a command-line string into the field's declared type (bool, int, float, str, list, None)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"bad value for '{key}': {value!r}")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{key}' must be a list, got {value!r}")
        inner = args[0] if args else Any
        return [coerce(v, inner, key) for v in value]
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        raise ConfigError(f"'{key}' must be true or false, got {value!r}")
    if annotation in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"'{key}' must be a number, got {value!r}")
        try:
            number = float(value) if annotation is float else int(str(value), 0) if isinstance(value, str) else value
        except (TypeError, ValueError):
            raise ConfigError(f"'{key}' must be {annotation.__name__}, got {value!r}") from None
        if annotation is int and isinstance(number, float):
            if not number.is_integer():
                raise ConfigError(f"'{key}' must be an integer, got {value!r}")
            number = int(number)
        return annotation(number)
    if annotation is str:
        return str(value)
    return value


def build(cls: type[T], values: dict[str, Any] | None = None, where: str = "config") -> T:
    """Build dataclass ``cls`` from a mapping; unknown keys are an error naming the nearest valid one."""
    values = dict(values or {})
    types_ = _field_types(cls)
    for key in values:
        if key not in types_:
            raise ConfigError(f"unknown key '{key}' in {where}{_nearest(key, list(types_))}")
    kwargs = {k: coerce(v, types_[k], k) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"invalid {where}: {err}") from None


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Parse ``--set key=value`` pairs; values are YAML scalars (``true``, ``3``, ``[q_proj,v_proj]``)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set expects key=value, got '{pair}'")
        key, raw = pair.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file or a non-mapping is a ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of key: value")
    return data


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass as a plain dict (for config.yaml and hashing)."""
    return dataclasses.asdict(obj)


def config_identity(obj: Any) -> dict[str, Any]:
    """``to_dict(obj)`` less its unset (None) ``identity="if_set"`` fields.

    Those are options added after run folders were published: left out while unset, a rerun of an earlier command
    still finds (and resumes or skips) its folder, and its seeds average with the earlier ones. A field says so in its
    metadata (``setting(..., identity="if_set")``) or, the older spelling method configs use, by being named in the
    class attribute ``identity_if_set``.
    """
    values = to_dict(obj)
    for key in (*getattr(obj, "identity_if_set", ()), *sorted(fields_where(type(obj), identity="if_set"))):
        if values.get(key) is None:
            values.pop(key, None)
    return values
