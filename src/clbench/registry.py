"""Name -> method class / benchmark factory.

Built-ins register themselves with the decorators below when the ``clbench.methods`` / ``clbench.benchmarks``
packages are scanned; third-party packages add theirs through the entry-point groups of the same names, e.g. in
their pyproject::

    [project.entry-points."clbench.methods"]
    my-method = "my_pkg.my_method:MyMethod"

The core never imports a specific method or benchmark module by name: it only scans these two namespaces.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

METHOD_GROUP = "clbench.methods"
BENCHMARK_GROUP = "clbench.benchmarks"

_METHODS: dict[str, type] = {}
_BENCHMARKS: dict[str, Callable[..., Any]] = {}
_FROM_ENTRY_POINTS: set[tuple[str, str]] = set()  # (group, name) of plugins, so reset() can forget exactly those
_loaded = False


class RegistryError(KeyError):
    """Unknown method or benchmark name, or one name registered by two sources."""

    def __str__(self) -> str:  # KeyError quotes its message; a user wants the sentence
        return str(self.args[0])


def _source(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', getattr(obj, '__name__', '?'))}"


def _add(kind: str, table: dict[str, Any], name: str, obj: Any) -> None:
    """Register ``obj`` as ``name``; a second, different source for the same name is an error naming both.

    The same object (same module and qualified name, e.g. a module imported again by ``importlib.reload``) is
    accepted, as lm-evaluation-harness's registry accepts re-registration of the same class.
    """
    old = table.get(name)
    if old is not None and _source(old) != _source(obj):
        raise RegistryError(f"{kind} '{name}' is registered twice: by {_source(old)} and by {_source(obj)}; "
                            f"rename one of them")
    table[name] = obj


def register_method(name: str) -> Callable[[type], type]:
    """Class decorator: make a CLMethod subclass available as ``clbench run --method NAME``."""

    def deco(cls: type) -> type:
        cls.name = name
        _add("method", _METHODS, name, cls)
        return cls

    return deco


def register_benchmark(name: str, metrics: dict[str, str]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator for a factory ``f(data_dir, limit_train, limit_eval, limit_test) -> Benchmark``.

    ``metrics`` maps each task name to its scorer, so ``clbench score`` works without the benchmark's data.
    """

    def deco(factory: Callable[..., Any]) -> Callable[..., Any]:
        factory.metrics = dict(metrics)
        _add("benchmark", _BENCHMARKS, name, factory)
        return factory

    return deco


def _scan(package: str) -> None:
    module = importlib.import_module(package)
    for info in pkgutil.iter_modules(module.__path__, package + "."):
        if not info.name.rsplit(".", 1)[-1].startswith("_"):
            importlib.import_module(info.name)


def _load_entry_points(group: str, table: dict[str, Any], decorate: bool) -> None:
    kind = "method" if group == METHOD_GROUP else "benchmark"
    for ep in entry_points(group=group):
        obj = ep.load()
        _add(kind, table, ep.name, obj)  # a plugin may not silently shadow (or be shadowed by) another source
        if decorate:
            obj.name = ep.name
        _FROM_ENTRY_POINTS.add((group, ep.name))


def load_all() -> None:
    """Import built-in methods and benchmarks and the entry points of installed plugins (once)."""
    global _loaded
    if _loaded:
        return
    _scan(METHOD_GROUP)
    _scan(BENCHMARK_GROUP)
    _load_entry_points(METHOD_GROUP, _METHODS, decorate=True)
    _load_entry_points(BENCHMARK_GROUP, _BENCHMARKS, decorate=False)
    _loaded = True


def reset() -> None:
    """Forget the plugins loaded from entry points so the next lookup scans them again (tests, long sessions).

    Built-ins stay registered: their modules are imported once and their decorators do not run a second time.
    """
    global _loaded
    for group, name in _FROM_ENTRY_POINTS:
        (_METHODS if group == METHOD_GROUP else _BENCHMARKS).pop(name, None)
    _FROM_ENTRY_POINTS.clear()
    _loaded = False


def _lookup(kind: str, name: str, table: dict[str, Any]) -> Any:
    load_all()
    if name not in table:
        close = difflib.get_close_matches(name, list(table), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise RegistryError(f"unknown {kind} '{name}'{hint} (known: {', '.join(sorted(table))})")
    return table[name]


def get_method(name: str) -> type:
    """The CLMethod subclass registered as ``name``."""
    return _lookup("method", name, _METHODS)


def get_benchmark(name: str) -> Callable[..., Any]:
    """The benchmark factory registered as ``name``."""
    return _lookup("benchmark", name, _BENCHMARKS)


def task_metric(benchmark: str, task: str) -> str:
    """The scorer name of ``task`` in ``benchmark`` (an unknown task names the nearest one)."""
    metrics = getattr(get_benchmark(benchmark), "metrics", {})
    if task not in metrics:
        close = difflib.get_close_matches(task, list(metrics), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise RegistryError(f"benchmark '{benchmark}' has no task '{task}'{hint} (tasks: {', '.join(metrics)})")
    return metrics[task]


def methods() -> dict[str, type]:
    """All registered methods by name."""
    load_all()
    return dict(sorted(_METHODS.items()))


def benchmarks() -> dict[str, Callable[..., Any]]:
    """All registered benchmark factories by name."""
    load_all()
    return dict(sorted(_BENCHMARKS.items()))
