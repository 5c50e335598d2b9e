"""``clbench sweep GRID.yaml``: every cell of a methods x knob sets x orders x seeds grid, run where it is missing.

A grid file (see ``configs/sweeps/`` and docs/sweep.md)::

    benchmark: trace-mini
    model: bundled
    hardware: cpu-laptop            # a profile of configs/hardware/ (optional)
    results_dir: results/runs       # parent of the cells' run folders (default: RunConfig's, i.e. runs/)
    methods: [lora, moses]
    seeds: [0, 1, 2]
    orders: [1]
    knob_sets: {default: {}}        # named method-knob overrides; each set is a separate cell
    method_config: {moses: {top_k: 4}}   # knobs of one method fixed for the whole grid
    run: {max_steps_per_task: 50}   # any other RunConfig key
    also:                           # more products, unioned with the main one (same keys as above, partly)
      - {methods: [lora], seeds: [3, 4]}
    executor: local                 # local | slurm
    parallel: 1                     # local: cells at once (CPU threads split between them)
    slurm: {partition: gpu, timeout_min: 240}

Each cell is an ordinary ``clbench run``: its folder is the one ``clbench run`` derives from the same settings, so
finished cells are skipped, unfinished ones resume, and ``make results`` / ``clbench leaderboard`` read what a sweep
wrote. Cells whose folder another process holds (the run folder's lock) are left alone: a cell is never scheduled twice.
"""

from __future__ import annotations

import itertools
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from clbench.config import ConfigError, build, load_yaml

STATES = ("done", "partial", "missing", "running")
EXECUTORS = ("local", "slurm")
_PRODUCT_KEYS = ("methods", "seeds", "orders", "knob_sets")


@dataclass
class SlurmConfig:
    """Where and how long the cells of a grid run on SLURM (submitit parameters; one job array per sweep)."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    timeout_min: int = 240
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    # most cells of the array running at once (sbatch --array=0-N%K)
    array_parallelism: int = 64
    # shell lines run in the job before srun, e.g. ["module load cuda", "source .venv/bin/activate"]
    setup: list[str] = field(default_factory=list)
    # any other sbatch option, e.g. {mail-type: END}
    additional_parameters: dict[str, Any] = field(default_factory=dict)
    # submitit cluster: "slurm"; "debug" (in this process) and "local" (subprocesses) run the same job array here
    cluster: str = "slurm"
    # submitit's logs and pickled jobs; default: <results_dir>/.sweeps/<grid name>
    folder: str | None = None


@dataclass
class GridConfig:
    """A grid file (see the module docstring); unknown keys are an error naming the nearest valid one."""

    methods: list[str]
    seeds: list[int] = field(default_factory=lambda: [0])
    orders: list[int] = field(default_factory=lambda: [1])
    benchmark: str = "trace-mini"
    model: str = "bundled"
    hardware: str | None = None
    results_dir: str | None = None
    knob_sets: dict[str, dict[str, Any]] = field(default_factory=lambda: {"default": {}})
    method_config: dict[str, dict[str, Any]] = field(default_factory=dict)
    run: dict[str, Any] = field(default_factory=dict)
    also: list[dict[str, Any]] = field(default_factory=list)
    executor: str = "local"
    parallel: int = 1
    slurm: dict[str, Any] = field(default_factory=dict)
    name: str = "sweep"

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS:
            raise ValueError(f"executor '{self.executor}' is not one of {', '.join(EXECUTORS)}")
        if self.parallel < 1:
            raise ValueError(f"parallel must be >= 1, got {self.parallel}")
        if not self.knob_sets:
            raise ValueError("knob_sets must name at least one set (default: {default: {}})")
        for i, extra in enumerate(self.also):
            unknown = sorted(set(extra) - set(_PRODUCT_KEYS))
            if unknown:
                raise ValueError(f"also[{i}] may only set {', '.join(_PRODUCT_KEYS)}, not '{unknown[0]}'")
        for key in ("method", "benchmark", "model", "order", "seed", "out", "results_dir"):
            if key in self.run:
                raise ValueError(f"run: must not set '{key}' (a grid sets it at top level or per cell)")


@dataclass
class CellSpec:
    """What one job needs to run a cell: the RunConfig values and the method knobs (plain data, so it pickles)."""

    label: str
    run: dict[str, Any]
    method_config: dict[str, Any]
    threads: int | None = None


@dataclass
class Cell:
    """One cell of the grid with its run folder and its state on disk."""

    method: str
    knobs: str
    order: int
    seed: int
    spec: CellSpec
    run_dir: Path
    tasks: int
    state: str = "missing"
    rows: int = 0
    op: float | None = None
    note: str = ""


def load_grid(path: str | Path) -> GridConfig:
    """Read and check a grid file (one-line ConfigError on any mistake)."""
    data = load_yaml(path)
    data.setdefault("name", Path(path).stem)
    grid = build(GridConfig, data, where=f"grid {path}")
    slurm_config(grid)  # a typo in the slurm: block is an error now, not after the grid is planned
    return grid


def knob_sets(grid: GridConfig) -> dict[str, dict[str, Any]]:
    """Every named knob set: the grid's ``knob_sets`` plus those an ``also`` part defines inline (a mapping instead
    of a list of names, e.g. ablations of one method); one name cannot mean two different sets."""
    sets = dict(grid.knob_sets)
    for i, part in enumerate(grid.also):
        for name, knobs in (part.get("knob_sets") if isinstance(part.get("knob_sets"), dict) else {}).items():
            if name in sets and sets[name] != knobs:
                raise ConfigError(f"grid: also[{i}] redefines knob set '{name}' ({knobs} != {sets[name]})")
            sets[name] = knobs
    return sets


def _products(grid: GridConfig) -> list[tuple[str, str, int, int]]:
    defined = knob_sets(grid)
    main = {"methods": grid.methods, "seeds": grid.seeds, "orders": grid.orders, "knob_sets": list(grid.knob_sets)}
    out: list[tuple[str, str, int, int]] = []
    for part in [main, *({**main, **extra} for extra in grid.also)]:
        sets = list(part["knob_sets"])  # names, or the names of an inline mapping
        for name in sets:
            if name not in defined:
                raise ConfigError(f"grid: knob set '{name}' is not defined under knob_sets")
        for cell in itertools.product(part["methods"], sets, part["orders"], part["seeds"]):
            if cell not in out:
                out.append(cell)
    return out


def plan(grid: GridConfig) -> list[Cell]:
    """Every cell of the grid with its run folder and state; checks every cell's config (no model is loaded).

    Two cells that resolve to the same run folder (e.g. a knob set equal to the defaults) are one cell.
    """
    from clbench.harness import Harness, load_run_config

    cells: list[Cell] = []
    seen: dict[Path, Cell] = {}
    sets = knob_sets(grid)
    for method, knobs, order, seed in _products(grid):
        overrides = {**grid.run, "method": method, "benchmark": grid.benchmark, "model": grid.model,
                     "order": order, "seed": seed, "results_dir": grid.results_dir}
        cfg, _ = load_run_config(None, overrides, hardware=grid.hardware)
        method_cfg = {**grid.method_config.get(method, {}), **sets[knobs]}
        harness = Harness(cfg, method_cfg)  # validates method, knobs, strategy and data, without the model
        label = f"{method}[{knobs}] order{order} seed{seed}"
        if harness.run_dir in seen:
            seen[harness.run_dir].note = f"also {label}"
            continue
        run = {k: v for k, v in asdict(cfg).items()}
        run["out"] = str(harness.run_dir)
        cell = Cell(method, knobs, order, seed, CellSpec(label, run, method_cfg), harness.run_dir,
                    tasks=len(harness.tasks) + int(cfg.zero_shot))
        refresh(cell)
        seen[harness.run_dir] = cell
        cells.append(cell)
    return cells


def _locked_by_other(run_dir: Path) -> bool:
    """True while another process holds the run folder's lock (results.RunStore.locked)."""
    from filelock import FileLock, Timeout

    from clbench.results import LOCK

    if not (run_dir / LOCK).exists():
        return False
    lock = FileLock(str(run_dir / LOCK), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        return True
    lock.release()
    return False


def refresh(cell: Cell) -> Cell:
    """Read the cell's state from its run folder: done (DONE), running (locked), partial (rows on disk), missing."""
    import json

    from clbench.results import RunStore

    store = RunStore(cell.run_dir)
    cell.rows = len(store.rows())
    if store.finished:
        cell.state = "done"
        try:
            cell.op = json.loads((cell.run_dir / "metrics.json").read_text()).get("OP")
        except (OSError, ValueError):
            cell.op = None
    elif _locked_by_other(cell.run_dir):
        cell.state = "running"
    elif (cell.run_dir / "config.yaml").is_file():
        cell.state = "partial"
    else:
        cell.state = "missing"
    return cell


def to_run(cells: list[Cell]) -> list[Cell]:
    """The cells a sweep schedules: missing and partial ones (done ones are skipped, running ones left alone)."""
    return [c for c in cells if c.state in ("missing", "partial")]


def status_table(cells: list[Cell], title: str = "sweep") -> Table:
    """A rich table of the grid: one line per cell with its state, rows of R on disk, OP and folder."""
    colours = {"done": "green", "partial": "yellow", "missing": "red", "running": "cyan", "failed": "bold red"}
    counts = {s: sum(c.state == s for c in cells) for s in sorted({c.state for c in cells})}
    table = Table(title=f"{title}: " + ", ".join(f"{n} {s}" for s, n in counts.items()), title_justify="left")
    for name in ("method", "knobs", "order", "seed", "state", "rows", "OP", "run folder"):
        table.add_column(name, justify="right" if name in ("order", "seed", "rows", "OP") else "left",
                         overflow="fold")  # a run folder is only useful whole
    for c in cells:
        op = f"{c.op:.4f}" if isinstance(c.op, float) else ""
        state = f"[{colours.get(c.state, 'white')}]{c.state}[/]" + (f" ({c.note})" if c.note else "")
        table.add_row(c.method, c.knobs, str(c.order), str(c.seed), state, f"{c.rows}/{c.tasks}", op,
                      str(c.run_dir))
    return table


# ---- running a cell ------------------------------------------------------------------------------------------
def run_cell(spec: CellSpec) -> str:
    """Run one cell as ``clbench run`` would (in this process; under SLURM in every task of the job)."""
    from clbench.harness import Harness, RunConfig

    if spec.threads:
        import torch

        torch.set_num_threads(spec.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg = build(RunConfig, spec.run, where=f"cell {spec.label}")
    command = f"clbench sweep (cell {spec.label})"
    return str(Harness(cfg, dict(spec.method_config), command=command).run())


def _user_errors() -> tuple[type[BaseException], ...]:
    from clbench.benchmark import DataError
    from clbench.models import ModelError
    from clbench.registry import RegistryError
    from clbench.results import RunConflictError

    return ConfigError, DataError, ModelError, RegistryError, RunConflictError


def run_local(cells: list[Cell], parallel: int = 1, folder: Path | None = None,
              log: Any = print) -> dict[str, str]:
    """Run ``cells`` here: one at a time in this process, or ``parallel`` at once as submitit local jobs with the
    machine's CPU threads split between them. Returns {label: error} for the cells that failed."""
    failed: dict[str, str] = {}
    if parallel == 1:
        for i, cell in enumerate(cells, 1):
            log(f"cell {i}/{len(cells)}: {cell.spec.label} ({cell.state})")
            try:
                run_cell(cell.spec)
            except _user_errors() as err:  # one bad or busy cell must not stop the rest of the grid
                failed[cell.spec.label] = str(err)
                log(f"error: {cell.spec.label}: {err}")
        return failed
    import submitit

    # two torch processes that each take every core thrash (10x slower on 2 cores): split the threads
    threads = max(1, (os.cpu_count() or 1) // parallel)
    executor = submitit.LocalExecutor(folder=str(folder or Path(".sweeps") / "local"))
    executor.update_parameters(timeout_min=7 * 24 * 60)
    pending = list(cells)
    running: list[tuple[Cell, Any]] = []
    while pending or running:
        while pending and len(running) < parallel:
            cell = pending.pop(0)
            spec = CellSpec(cell.spec.label, cell.spec.run, cell.spec.method_config, threads=threads)
            running.append((cell, executor.submit(run_cell, spec)))
            log(f"started {cell.spec.label} ({threads} threads)")
        time.sleep(1.0)
        for cell, job in list(running):
            if job.done():
                running.remove((cell, job))
                try:
                    job.result()
                    log(f"finished {cell.spec.label}")
                except Exception as err:  # submitit wraps the job's traceback; its last line is the error
                    failed[cell.spec.label] = str(err).strip().splitlines()[-1]
                    log(f"error: {cell.spec.label}: {failed[cell.spec.label]}")
    return failed


# ---- SLURM ---------------------------------------------------------------------------------------------------
def slurm_config(grid: GridConfig) -> SlurmConfig:
    """The grid's ``slurm:`` block as a SlurmConfig (unknown keys name the nearest one)."""
    return build(SlurmConfig, grid.slurm, where="the grid's slurm block")


def slurm_parameters(grid: GridConfig, cells: list[Cell]) -> dict[str, Any]:
    """submitit AutoExecutor parameters for the grid's job array, from its hardware profile and ``slurm:`` block.

    Lightning on SLURM wants one task per device (it reads its ranks from srun's environment): a cell with
    ``devices: 8, num_nodes: 2`` is a 2-node job of 8 tasks and 8 GPUs per node.
    """
    slurm = slurm_config(grid)
    run = cells[0].spec.run if cells else {}
    gpu = str(run.get("accelerator", "auto")) in ("gpu", "cuda")
    params: dict[str, Any] = {
        "name": f"clbench-{grid.name}", "timeout_min": slurm.timeout_min, "nodes": int(run.get("num_nodes", 1)),
        "tasks_per_node": int(run.get("devices", 1)), "gpus_per_node": int(run.get("devices", 1)) if gpu else None,
        "cpus_per_task": slurm.cpus_per_task, "mem_gb": slurm.mem_gb,
        "slurm_partition": slurm.partition, "slurm_account": slurm.account, "slurm_qos": slurm.qos,
        "slurm_constraint": slurm.constraint, "slurm_array_parallelism": slurm.array_parallelism,
        "slurm_setup": slurm.setup or None, "slurm_additional_parameters": slurm.additional_parameters or None,
    }
    return {k: v for k, v in params.items() if v is not None}


def _slurm_folder(grid: GridConfig, cells: list[Cell]) -> Path:
    slurm = slurm_config(grid)
    if slurm.folder:
        return Path(slurm.folder)
    root = Path(cells[0].spec.run["results_dir"]) if cells else Path("runs")
    return root / ".sweeps" / grid.name


def sbatch_script(grid: GridConfig, cells: list[Cell]) -> str:
    """The sbatch file submitit writes for the grid's job array of ``cells`` (``clbench sweep --dry-run``).

    submitit has no public preview, so this asks its SlurmExecutor for the text it would submit (submitit is
    pinned, 1.5.4): the same parameter translation and ``--array=0-N%K`` line as the real submission. It works
    off the cluster too (the executor only writes text here, so its check for srun is skipped).
    """
    import submitit

    class PreviewExecutor(submitit.SlurmExecutor):
        @classmethod
        def affinity(cls) -> int:
            return 1

    executor = PreviewExecutor(folder=str(_slurm_folder(grid, cells)))
    params = slurm_parameters(grid, cells)
    # AutoExecutor's translation: generic names (nodes, tasks_per_node...) to sbatch's, slurm_* without the prefix
    generic = executor._convert_parameters({k: v for k, v in params.items() if not k.startswith("slurm_")})
    executor.update_parameters(**generic, **{k[len("slurm_"):]: v for k, v in params.items()
                                             if k.startswith("slurm_")})
    if len(cells) > 1:
        executor.parameters["map_count"] = len(cells)
    return executor._make_submission_file_text(executor._submitit_command_str, uid="preview")


def submit_slurm(grid: GridConfig, cells: list[Cell]) -> list[Any]:
    """Submit ``cells`` as one submitit job array (one array task per cell) and return the submitit jobs."""
    import submitit

    slurm = slurm_config(grid)
    if slurm.cluster == "slurm" and shutil.which("sbatch") is None:
        raise ConfigError("executor slurm needs sbatch on PATH (run on the cluster's login node); "
                          "`clbench sweep GRID --dry-run` shows the job array it would submit")
    executor = submitit.AutoExecutor(folder=str(_slurm_folder(grid, cells)), cluster=slurm.cluster)
    executor.update_parameters(**slurm_parameters(grid, cells))
    with executor.batch():  # one sbatch --array for the whole grid, not one job per cell
        jobs = [executor.submit(run_cell, cell.spec) for cell in cells]
    return jobs


def sweep(grid: GridConfig, dry_run: bool = False, console: Console | None = None) -> tuple[list[Cell], dict[str, Any]]:
    """Plan the grid, show its table, run (local) or submit (slurm) what is missing, show the table again.

    Returns the cells and a summary: ``scheduled`` labels, ``failed`` {label: error}, ``jobs`` (slurm job ids).
    """
    console = console or Console(stderr=True)
    cells = plan(grid)
    todo = to_run(cells)
    console.print(status_table(cells, title=f"{grid.name} ({len(todo)} to run, executor {grid.executor})"))
    summary: dict[str, Any] = {"scheduled": [c.spec.label for c in todo], "failed": {}, "jobs": []}
    if dry_run or not todo:
        if dry_run and grid.executor == "slurm" and todo:
            console.print(sbatch_script(grid, todo), markup=False, highlight=False)
        return cells, summary
    if grid.executor == "local":
        summary["failed"] = run_local(todo, grid.parallel, folder=Path(todo[0].spec.run["results_dir"]) / ".sweeps"
                                      / grid.name, log=lambda line: console.print(line, markup=False))
        for cell in cells:
            refresh(cell)
            if cell.spec.label in summary["failed"]:
                cell.state = "failed"
        console.print(status_table(cells, title=grid.name))
    else:
        jobs = submit_slurm(grid, todo)
        summary["jobs"] = [job.job_id for job in jobs]
        summary["job_objects"] = jobs
        console.print(f"submitted {len(jobs)} cells as one job array ({jobs[0].job_id.split('_')[0]}); "
                      "`clbench sweep GRID --status` shows their progress", markup=False)
    return cells, summary
