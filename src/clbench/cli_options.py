"""Typer options generated from a config dataclass, so a command restates none of its fields.

``@dataclass_command(app, RunConfig)`` in place of ``@app.command()`` registers a command with one option per field
of the dataclass: ``--data-dir`` for ``data_dir``, the help text from the field's ``setting(..., help)``
(clbench.config), the default shown from the field's default (the dataclass is the one place both live), more names
from ``aliases=``. A bool field whose default is true is the flag ``--no-<name>``, any other bool field the flag
``--<name>``; a list field takes one comma-separated value (``--methods lora,moses``). Fields declared
``setting(..., cli=False)`` get no option (the command sets them another way).

The command function declares its own options as usual and takes the fields as ``**given``: only those given on the
command line, as field values (``--no-zero-shot`` arrives as ``zero_shot=False``). A field left out was not given, so
the layers under the command line (hardware profile, run YAML) still decide it — as ``load_run_config`` treats None.
Whether an option was given is click's parameter source, not its value, so ``--help`` can show the real default.

The dataclass may be named ``"module:Class"``: its module is then imported, and the options built, only when that
command runs or shows its help (``clbench.bench`` imports torch; ``clbench --help`` should not wait for it).

Why typer and not jsonargparse: typer is already the whole CLI (every command, the tests' CliRunner, the one-line
errors) and pinned; jsonargparse would be a second parser and a new dependency for the two commands built from
dataclasses, with its own flag spellings (``--zero_shot false``) that would break today's ``--no-zero-shot``. Typer
reads a command's parameters with ``inspect.signature``, which honours ``__signature__``, so setting that on the
command function is all the generation needs.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import types
import typing
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer
from typer.core import TyperCommand

from clbench.config import ALIASES, CLI, HELP, coerce, field_meta

F = TypeVar("F", bound=Callable[..., Any])
_CTX = "_options_from_ctx"  # the click context the generated command takes (typer passes it, it is no option)


def option_name(f: dataclasses.Field) -> str:
    """The option of field ``f``: ``--data-dir``; ``--no-zero-shot`` for a bool field whose default is true."""
    name = f.name.replace("_", "-")
    return f"--no-{name}" if f.default is True else f"--{name}"


def cli_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of ``cls`` that are command-line options (all but those declared ``setting(..., cli=False)``)."""
    return [f for f in dataclasses.fields(cls) if field_meta(f, CLI)]


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _base(annotation: Any) -> Any:
    """``T`` of ``T | None`` (another union stays as it is), else the annotation itself."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def _option(cls: type, f: dataclasses.Field, annotation: Any, panel: str | None, markup: str | None
            ) -> inspect.Parameter:
    """One ``Annotated[T, typer.Option(...)] = default`` parameter for field ``f``."""
    where = f"{cls.__name__}.{f.name}"
    annotation = _base(annotation)
    help_text = field_meta(f, HELP)
    if not help_text:
        raise ValueError(f"{where} has no help text: declare it setting(default, help)")
    if markup == "rich":  # help is plain text: R[j,j] is no rich markup tag
        from rich.markup import escape

        help_text = escape(help_text)
    default = _default(f)
    decls = (option_name(f), *field_meta(f, ALIASES))
    kind = typing.get_origin(annotation) or annotation
    if annotation is bool:
        option = typer.Option(*decls, help=help_text, show_default=False, rich_help_panel=panel)
    elif kind is list:
        option = typer.Option(*decls, help=f"{help_text} (comma-separated)", metavar="A,B,...",
                              rich_help_panel=panel)
        annotation, default = str, ",".join(map(str, default)) if default is not None else None
    elif annotation in (str, int, float):
        option = typer.Option(*decls, help=help_text, rich_help_panel=panel)
    else:
        raise TypeError(f"{where}: {annotation} has no command-line form; declare it setting(..., cli=False)")
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[annotation, option])


def _field_value(f: dataclasses.Field, annotation: Any, value: Any) -> Any:
    """The field value of an option given on the command line."""
    base = _base(annotation)
    if base is bool:
        return not bool(_default(f))  # the flag flips the default: --no-zero-shot -> False, --oracle-task-id -> True
    if typing.get_origin(base) is list:
        return coerce(value, annotation, f.name)  # "a, b" -> ["a", "b"], as the YAML's "a, b" would be
    return value


def with_options(cls: type, func: F, panel: str | None = None, markup: str | None = None) -> F:
    """``func`` (taking ``**given``) as a typer command function with one option per command-line field of ``cls``.

    ``panel`` names the ``--help`` panel the generated options are listed in; ``markup`` is the command's typer
    ``rich_markup_mode`` (help texts are escaped for it).
    """
    hints = typing.get_type_hints(cls)
    fields = cli_fields(cls)
    own = inspect.signature(func, eval_str=True)  # evaluated: typer does not re-read a __signature__'s strings
    kept = [p for p in own.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    if len(kept) == len(own.parameters):
        raise TypeError(f"{func.__name__} must take **given to receive the {cls.__name__} fields")
    clash = {p.name for p in kept} & {f.name for f in fields}
    if clash:
        raise TypeError(f"{func.__name__}: parameters {sorted(clash)} are also {cls.__name__} fields")

    @functools.wraps(func)
    def command(**values: Any) -> Any:
        ctx: typer.Context = values.pop(_CTX)
        given = {}
        for f in fields:
            value = values.pop(f.name)
            source = ctx.get_parameter_source(f.name)  # typer's own (vendored) click: compared by name
            if source is not None and source.name != "DEFAULT":
                given[f.name] = _field_value(f, hints[f.name], value)
        return func(**values, **given)

    ctx_param = inspect.Parameter(_CTX, inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)
    keyword = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in kept]
    command.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [ctx_param, *keyword, *(_option(cls, f, hints[f.name], panel, markup) for f in fields)])
    return command  # type: ignore[return-value]


def _resolve(config: type | str) -> type:
    if isinstance(config, type):
        return config
    module, _, name = config.partition(":")
    return getattr(importlib.import_module(module), name)


def dataclass_command(app: typer.Typer, config: type | str, *, panel: str | None = None,
                      **command_kwargs: Any) -> Callable[[F], F]:
    """Decorator in place of ``@app.command()``: the command also takes one option per field of ``config`` (a
    dataclass, or ``"module:Class"``), built when the command is first parsed, i.e. when it runs or shows ``--help``.
    """

    def decorate(func: F) -> F:
        class Command(TyperCommand):
            loaded = False

            def get_params(self, ctx: typer.Context) -> list[Any]:
                if not self.loaded:  # build the real command and take its parameters and callback
                    sub = typer.Typer(add_completion=False)
                    sub.command(self.name)(with_options(_resolve(config), func, panel, self.rich_markup_mode))
                    real = typer.main.get_command(sub)
                    self.params, self.callback, self.loaded = real.params, real.callback, True
                return super().get_params(ctx)

        def stub() -> None:  # what typer sees when it builds every command at start-up: the name and the doc
            raise AssertionError("replaced by the generated command before it runs")

        stub.__name__, stub.__doc__ = func.__name__, func.__doc__
        app.command(cls=Command, **command_kwargs)(stub)
        return func

    return decorate
