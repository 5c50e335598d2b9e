"""The ``clbench`` command: run, list, leaderboard, report, score (and the commands later modules add).

Every user error (unknown name, bad data, config typo) ends in one ``error: ...`` line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from clbench.cli_options import dataclass_command
from clbench.config import ConfigError
from clbench.run_config import RunConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="clbench: continual learning of LLMs — run methods over TRACE, compare, report.")


def _user_errors() -> tuple[type[BaseException], ...]:
    from clbench.benchmark import DataError
    from clbench.models import ModelError
    from clbench.registry import RegistryError
    from clbench.results import RunConflictError

    return ConfigError, DataError, ModelError, RegistryError, RunConflictError


def fail(message: str) -> None:
    """Print one error line and exit 2."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


@dataclass_command(app, RunConfig, panel="Run settings (also keys of the --config YAML)")
def run(
    config: Annotated[str | None, typer.Option(help="YAML with run keys and a method_config: mapping")] = None,
    hardware: Annotated[str | None, typer.Option(help="hardware profile from configs/hardware/")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", "-s", help="method knob key=value (repeatable)")] = None,
    **given: Any,
) -> None:
    """Train METHOD through BENCHMARK's task order, evaluating every task after each one (resumable).

    Settings come in layers, each overriding the one before: built-in defaults < the --hardware profile (or the
    YAML's `hardware:` key) < the --config YAML < flags given on this command line. Method knobs: the method's
    configs/methods/<name>.yaml < the YAML's method_config: < --set.
    """
    from clbench.config import parse_overrides
    from clbench.harness import Harness, load_run_config

    try:
        cfg, method_cfg = load_run_config(config, given, hardware=hardware)
        method_cfg.update(parse_overrides(set_ or []))
        Harness(cfg, method_cfg).run()
    except _user_errors() as err:
        fail(str(err))
    except KeyboardInterrupt:
        typer.echo("interrupted: finished tasks are saved; rerun the same command to resume", err=True)
        raise typer.Exit(130) from None


@app.command("list")
def list_() -> None:
    """Show the registered methods and benchmarks."""
    from rich.console import Console
    from rich.table import Table

    from clbench import registry

    table = Table(title="methods")
    table.add_column("name")
    table.add_column("task-aware")
    table.add_column("description")
    for name, cls in registry.methods().items():
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        table.add_row(name, "yes" if cls.task_aware else "", doc)
    Console().print(table)
    bench = Table(title="benchmarks")
    bench.add_column("name")
    bench.add_column("description")
    for name, factory in registry.benchmarks().items():
        doc = (factory.__doc__ or "").strip().splitlines()[0] if factory.__doc__ else ""
        bench.add_row(name, doc)
    Console().print(bench)


@app.command()
def leaderboard(
    runs: Annotated[list[str] | None, typer.Argument(help="run folders or folders holding them (default runs; the "
                                                          "committed reference runs: results/runs)")] = None,
    out: Annotated[str, typer.Option(help="CSV to write (make results writes results/leaderboard.csv)")]
    = "runs/leaderboard.csv",
    bwt_convention: Annotated[list[str] | None, typer.Option(help="also show: clipped, max-drop")] = None,
) -> None:
    """Aggregate finished run folders into a leaderboard CSV (mean ± std over seeds) and print it."""
    from clbench.leaderboard import build_leaderboard, one_line_warnings, print_leaderboard

    try:
        with one_line_warnings():  # each skipped (unfinished/corrupt) folder: one "warning: ..." line naming it
            table = build_leaderboard(runs or ["runs"], bwt_conventions=bwt_convention or [])
    except ConfigError as err:
        fail(str(err))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False, float_format="%.4f")
    print_leaderboard(table)
    typer.echo(f"wrote {out}", err=True)


@app.command()
def report(
    runs: Annotated[list[str] | None, typer.Argument(help="run folders or folders holding them (default runs; the "
                                                          "committed reference runs: results/runs)")] = None,
    out: Annotated[str, typer.Option(help="folder for report.md and figures/ (make results writes results/report)")]
    = "runs/report",
    bwt_convention: Annotated[list[str] | None, typer.Option(help="also show: clipped, max-drop")] = None,
    benchmark: Annotated[str | None, typer.Option(help="only this benchmark (default: a section per group)")]
    = None,
    model: Annotated[str | None, typer.Option(help="only this model (default: a section per group)")] = None,
) -> None:
    """Write a markdown report with figures (leaderboard, accuracy matrices, trade-offs) from finished runs."""
    from clbench.leaderboard import one_line_warnings
    from clbench.report import NoRunsError, write_report

    try:
        with one_line_warnings():
            path = write_report(runs or ["runs"], out, bwt_conventions=bwt_convention or [],
                                benchmark=benchmark, model=model)
    except (ConfigError, NoRunsError) as err:
        fail(str(err))
    typer.echo(f"wrote {path}", err=True)


@app.command()
def compare(
    reference: Annotated[str, typer.Argument(help="the run folder the others are compared with")],
    others: Annotated[list[str], typer.Argument(help="run folders of the same benchmark, order and task count")],
    out: Annotated[str | None, typer.Option(help="also write the table as this CSV")] = None,
) -> None:
    """How far runs of one protocol are apart (another CPU, thread count, precision or seed): ΔR, ΔOP/BWT/FWT and
    the share of answers whose text changed."""
    from clbench.compare import compare_runs, print_comparison
    from clbench.leaderboard import one_line_warnings

    try:
        with one_line_warnings():
            table = compare_runs(reference, others)
    except ConfigError as err:
        fail(str(err))
    print_comparison(table)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(out, index=False, float_format="%.4f")
        typer.echo(f"wrote {out}", err=True)


@app.command()
def gap(
    runs: Annotated[list[str] | None, typer.Argument(help="run folders or folders holding them (default runs; the "
                                                          "committed reference runs: results/runs)")] = None,
    method: Annotated[str, typer.Option(help="the method whose gap is explained")] = "moses",
    against: Annotated[list[str] | None, typer.Option(help="reference method (repeatable) [default: per-task-lora, "
                                                          "replay]")] = None,
    out: Annotated[str | None, typer.Option(help="also write the tables as markdown here")] = None,
) -> None:
    """Where METHOD's distance to the references comes from, per task: learned less (R[j, j]) or kept less (R[T, j]),
    with its task-id accuracy where it reports one."""
    from rich import box
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from clbench.gap import SCORE_COLUMNS, format_score, gap_markdown, gap_table
    from clbench.leaderboard import load_runs, one_line_warnings

    try:
        with one_line_warnings():
            table = gap_table(load_runs(runs or ["runs"]), method, against)
    except ConfigError as err:
        fail(str(err))
    for (method_label, ref, order), part in table.groupby(["method", "reference", "order"], sort=False):
        rich_table = Table(title=f"{method_label} vs {ref}, order {order} (×100; Δ = method − reference; later = "
                                 "the part of the final Δ that opened after the task was learned; id = task-id "
                                 "accuracy)", box=box.SIMPLE_HEAD)
        rich_table.add_column("task", no_wrap=True)
        # shorter headers than the markdown's: the terminal table has to fit 80 columns
        for header in ("R[j,j]", "ref", "Δ", "R[T,j]", "ref", "Δ", "later", "id"):
            rich_table.add_column(escape(header), justify="right", min_width=len(header))
        for _, r in part.iterrows():
            rich_table.add_row(str(r["task"]), *(format_score(c, r[c]) for c in SCORE_COLUMNS))
        Console().print(rich_table)
    if out:
        from clbench.results import atomic_write_text

        atomic_write_text(Path(out), gap_markdown(table))
        typer.echo(f"wrote {out}", err=True)


@app.command()
def score(
    predictions: Annotated[str, typer.Argument(help="JSON list of {prompt, answer, prediction}")],
    benchmark: Annotated[str, typer.Option()] = "trace",
    task: Annotated[str, typer.Option()] = ...,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Score a predictions file with the task's TRACE scorer."""
    from clbench.benchmark import DataError
    from clbench.registry import task_metric
    from clbench.scores import score as score_fn

    try:
        metric = task_metric(benchmark, task)
        path = Path(predictions)
        if not path.is_file():
            raise DataError(f"predictions file not found: {path}")
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from None
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a JSON list of {{prompt, answer, prediction}} records")
        for i, rec in enumerate(records):
            if not isinstance(rec, dict) or not all(isinstance(rec.get(k), str) for k in ("answer", "prediction")):
                raise DataError(f"{path}: record {i} needs string \"answer\" and \"prediction\"")
        value = score_fn(metric, [r["prediction"] for r in records], [r["answer"] for r in records],
                         [r.get("prompt", "") for r in records])
    except _user_errors() as err:
        fail(str(err))
    if as_json:
        typer.echo(json.dumps({"benchmark": benchmark, "task": task, "metric": metric, "score": value,
                               "n": len(records)}))
    else:
        typer.echo(f"{benchmark} {task} {metric}: {value:.4f} (n={len(records)})")


@dataclass_command(app, "clbench.bench:BenchConfig", panel="Bench settings")
def bench(
    set_: Annotated[list[str] | None, typer.Option("--set", "-s", help="LABEL.KEY=VALUE: a knob of one contender "
                                                   "(repeatable), e.g. lora15.layers=[15,16,17]")] = None,
    **given: Any,
) -> None:
    """Speed and memory of methods vs lora and the base model, in one process on the same batches."""
    from rich.console import Console

    from clbench.bench import BenchConfig, parse_contender_overrides, print_results, run_bench, write_results

    console = Console(stderr=True)
    try:
        cfg = BenchConfig(**given, overrides=parse_contender_overrides(set_ or []))
        results = run_bench(cfg, log=lambda line: console.print(f"[dim]{line}[/]"))
    except _user_errors() as err:
        fail(str(err))
    print_results(results)
    csv_path, json_path = write_results(results, cfg.out)
    typer.echo(f"wrote {csv_path} and {json_path}", err=True)


@dataclass_command(app, "clbench.bench_overhead:OverheadConfig", panel="Overhead settings", name="bench-overhead")
def bench_overhead(**given: Any) -> None:
    """Training-loop overhead: the harness's Lightning fit vs a bare torch loop on the same batches, interleaved."""
    from rich.console import Console

    from clbench.bench_overhead import OverheadConfig, print_results, run_overhead, write_results

    console = Console(stderr=True)
    try:
        cfg = OverheadConfig(**given)
        results = run_overhead(cfg, log=lambda line: console.print(f"[dim]{line}[/]"),
                               on_round=lambda partial: write_results(partial, cfg.out))  # finished rounds kept
    except _user_errors() as err:
        fail(str(err))
    print_results(results)
    csv_path, json_path = write_results(results, cfg.out)
    typer.echo(f"wrote {csv_path} and {json_path}", err=True)


@app.command()
def sweep(
    grid: Annotated[str, typer.Argument(help="grid YAML: methods, seeds, orders, knob_sets, benchmark, model, "
                                             "hardware, executor (see docs/sweep.md, configs/sweeps/)")],
    status: Annotated[bool, typer.Option("--status", help="only show the grid's state; run nothing")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="show what would run (slurm: the sbatch job array)")]
    = False,
    executor: Annotated[str | None, typer.Option(help="override the grid's executor: local or slurm")] = None,
    parallel: Annotated[int | None, typer.Option(help="local: cells at once, CPU threads split between them")]
    = None,
) -> None:
    """Run every missing or unfinished cell of a grid (finished cells are skipped) and show the grid's state."""
    from clbench import sweep as sweep_mod

    try:
        cfg = sweep_mod.load_grid(grid)
        if executor or parallel:
            import dataclasses

            from clbench.config import build

            values = {**dataclasses.asdict(cfg), **({"executor": executor} if executor else {}),
                      **({"parallel": parallel} if parallel else {})}
            cfg = build(sweep_mod.GridConfig, values, where=f"grid {grid}")
        if status:
            from rich.console import Console

            Console(stderr=True).print(sweep_mod.status_table(sweep_mod.plan(cfg), title=cfg.name))
            return
        _, summary = sweep_mod.sweep(cfg, dry_run=dry_run)
    except _user_errors() as err:
        fail(str(err))
    except KeyboardInterrupt:
        typer.echo("interrupted: finished tasks are saved; rerun the same command to resume", err=True)
        raise typer.Exit(130) from None
    if summary["failed"]:
        typer.echo(f"{len(summary['failed'])} cell(s) failed (errors above); rerun to retry them", err=True)
        raise typer.Exit(1)


@app.command()
def tune(
    method: Annotated[str | None, typer.Option(help="method whose knobs are tuned")] = None,
    benchmark: Annotated[str | None, typer.Option(help="benchmark [default: trace-mini]")] = None,
    budget: Annotated[int | None, typer.Option(help="finished trials per study, the same for every method "
                                                    "[default: 20]")] = None,
    num_tasks: Annotated[int | None, typer.Option(help="short protocol: the first k tasks [default: 3]")] = None,
    max_steps_per_task: Annotated[int | None, typer.Option(help="short protocol: steps per task [default: 25]")]
    = None,
    order: Annotated[int | None, typer.Option(help="task order [default: 1]")] = None,
    seed: Annotated[int | None, typer.Option(help="run seed of every trial and TPE sampler seed [default: 0]")]
    = None,
    model: Annotated[str | None, typer.Option(help="'bundled', 'tiny', a folder or a hub id")] = None,
    data_dir: Annotated[str | None, typer.Option()] = None,
    hardware: Annotated[str | None, typer.Option(help="hardware profile of every trial")] = None,
    space: Annotated[str | None, typer.Option(help="search-space YAML (default: the method YAML's search_space:)")]
    = None,
    workers: Annotated[int | None, typer.Option(help="worker processes here sharing the study's journal "
                                                     "[default: 1]")] = None,
    out: Annotated[str | None, typer.Option(help="study folder [default: runs/studies/<bench>/<method>/...]")]
    = None,
    default_run: Annotated[bool | None, typer.Option(
        "--default-run/--no-default-run", help="also run the current default knobs once, outside the budget, so the "
        "study says what tuning gained [default: on]")] = None,
    config: Annotated[str | None, typer.Option(help="YAML with the same keys (+ run:, method_config:)")] = None,
) -> None:
    """Choose METHOD's knobs with Optuna: OP on the eval split after a short protocol; writes <study>/study.json."""
    from clbench import tune as tune_mod

    try:
        cfg = tune_mod.load_tune_config(config, {
            "method": method, "benchmark": benchmark, "budget": budget, "num_tasks": num_tasks,
            "max_steps_per_task": max_steps_per_task, "order": order, "seed": seed, "model": model,
            "data_dir": data_dir, "hardware": hardware, "space": space, "workers": workers, "out": out,
            "default_run": default_run})
        study = tune_mod.tune(cfg, log=lambda line: typer.echo(line, err=True))
    except _user_errors() as err:
        fail(str(err))
    except KeyboardInterrupt:
        typer.echo("interrupted: finished trials are in the study's journal; rerun the same command to go on",
                   err=True)
        raise typer.Exit(130) from None
    best = study["best"]
    typer.echo(f"best of {study['finished_trials']} trials: #{best['number']} eval OP {best['value']:.4f}  "
               f"{study['set']}")
    if (default := study.get("default")) and isinstance(default.get("value"), float):
        typer.echo(f"current defaults: eval OP {default['value']:.4f} (best − defaults "
                   f"{default['best_minus_default']:+.4f})")
    typer.echo(f"wrote {Path(cfg.study_dir()) / tune_mod.STUDY_FILE}", err=True)


@app.command()
def studies(
    root: Annotated[str, typer.Argument(help="folder of study folders, or one study folder")]
    = "results/studies/tune",
    out: Annotated[str | None, typer.Option(help="also write the table as markdown here (make results writes "
                                                 "results/studies/tune/studies.md)")] = None,
    trials: Annotated[bool, typer.Option(help="instead, every finished trial of each study, best first, with its "
                                              "knobs (the table a study README shows)")] = False,
) -> None:
    """Summarise tuning studies: trials, time per trial, best vs current defaults' eval OP, whether adopted."""
    from rich.console import Console
    from rich.table import Table

    from clbench.studies import COLUMNS, load_studies, row_cells, studies_markdown, study_row, trials_markdown

    try:
        found = load_studies(root)
        rows = [] if trials else [study_row(folder, study) for folder, study in found]
        markdown = ("\n".join(f"## {folder.name}\n\n{trials_markdown(study)}" for folder, study in found) if trials
                    else studies_markdown(rows))
    except _user_errors() as err:
        fail(str(err))
    if trials:
        typer.echo(markdown)
    else:
        table = Table(title=f"tuning studies in {root} (eval OP on each study's short protocol)")
        for column in COLUMNS:
            table.add_column(column, no_wrap=column in ("study", "method"))
        for r in rows:
            table.add_row(*row_cells(r))
        Console().print(table)
    if out:
        from clbench.results import atomic_write_text

        atomic_write_text(Path(out), markdown)
        typer.echo(f"wrote {out}", err=True)


def main() -> None:
    """Entry point of the ``clbench`` script."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app()
    except BrokenPipeError:
        sys.exit(1)


if __name__ == "__main__":
    main()
