"""``clbench tune``: choose a method's knobs with Optuna on the eval split, the same trial budget for every method.

Protocol (the defaults of :class:`TuneConfig`; the study file records the values used):

- search space: the ``search_space:`` block of ``configs/methods/<method>.yaml`` (``knob: {type: float|int|
  categorical, low, high, log, step, choices}``, Optuna's ``suggest_*`` arguments), or a YAML file given with
  ``--space``; every knob must be a field of the method's config (checked before any model loads);
- each trial is an ordinary harness run into ``<study>/trials/trial-<n>/`` over the first ``num_tasks`` tasks of
  ``order`` with ``max_steps_per_task`` steps per task, every row of R scored on the **eval** split
  (``score_split: eval``): test records are never read, not even for the data manifest;
- objective: OP of that run (mean of R's last row, on eval), maximised by Optuna's TPE sampler seeded with ``seed``;
- budget: ``budget`` finished trials per study, whatever the method (equal budgets make tuned methods comparable);
- the method's current defaults: one more run of the same protocol into ``<study>/default/`` (not a trial: not
  counted in the budget, not seen by the sampler), so the study says how much tuning moved eval OP;
- storage: Optuna's journal file ``<study>/journal.log``; several workers (``--workers N`` here, or the same command
  started on other machines that see the folder, or a SLURM array) share the study through it.

The study is written as ``<study>/study.json`` (protocol, search space, every trial's knobs and score, the chosen
knobs, the command, versions), a file to commit and cite; ``results/studies/`` holds the committed ones.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clbench.config import ConfigError, build, load_yaml

SPEC_TYPES = ("float", "int", "categorical")
_SPEC_KEYS = {"type", "low", "high", "log", "step", "choices"}
STUDY_FILE = "study.json"
JOURNAL = "journal.log"


@dataclass
class TuneConfig:
    """One tuning study: method, short protocol, budget, sampler seed, study folder (defaults documented above)."""

    method: str
    benchmark: str = "trace-mini"
    model: str = "bundled"
    data_dir: str | None = None
    hardware: str | None = None
    # trials that finish per study: the same number for every method
    budget: int = 20
    # the short protocol: first k tasks of the order, at most this many optimiser steps per task
    num_tasks: int = 3
    max_steps_per_task: int | None = 25
    order: int = 1
    # seed of every trial's run and of the TPE sampler (same seed -> same trials, same best trial)
    seed: int = 0
    # study folder; default: runs/studies/<benchmark>/<method>/<model>-order<o>-k<k>-seed<s>
    out: str | None = None
    # a YAML search space instead of the method YAML's search_space: block
    space: str | None = None
    # other RunConfig keys of every trial (limit_eval, batch_size, precision...)
    run: dict[str, Any] = field(default_factory=dict)
    # method knobs fixed for every trial (not searched)
    method_config: dict[str, Any] = field(default_factory=dict)
    # worker processes started here (submitit local jobs, CPU threads split between them); 1 = this process
    workers: int = 1
    # also run the method's current default knobs once on the same protocol (<study>/default/, outside the budget)
    default_run: bool = True

    def __post_init__(self) -> None:
        for name in ("budget", "num_tasks", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for key in ("method", "benchmark", "model", "order", "seed", "num_tasks", "max_steps_per_task", "out",
                    "score_split", "test_split"):
            if key in self.run:
                raise ValueError(f"run: must not set '{key}' (the tuning protocol sets it)")

    def study_dir(self) -> Path:
        """The study folder (``out`` or the default under the ignored runs/ folder)."""
        if self.out:
            return Path(self.out)
        model = Path(self.model).name.replace("/", "_") or "model"
        return (Path("runs") / "studies" / self.benchmark / self.method
                / f"{model}-order{self.order}-k{self.num_tasks}-seed{self.seed}")

    def protocol(self) -> dict[str, Any]:
        """What every trial shares; a study folder keeps one protocol (checked when a worker joins). The budget is
        not part of it: a later run with a larger budget extends the study."""
        keys = ("method", "benchmark", "model", "data_dir", "hardware", "num_tasks", "max_steps_per_task",
                "order", "seed", "run", "method_config")
        return {k: getattr(self, k) for k in keys} | {"score_split": "eval", "objective": "OP", "sampler": "TPE"}


def search_space(cfg: TuneConfig) -> dict[str, dict[str, Any]]:
    """The search space (``--space`` file or the method YAML's block), checked against the method's knobs.

    An unknown knob, a bad spec or a value the knob cannot take is one ConfigError line, before any model loads.
    """
    from clbench import registry
    from clbench.configs_dir import method_search_space

    where = cfg.space or f"configs/methods/{cfg.method}.yaml search_space"
    space = load_yaml(cfg.space) if cfg.space else method_search_space(cfg.method)
    if not space:
        raise ConfigError(f"method '{cfg.method}' has no search space: add a search_space: block to {where} "
                          f"or pass --space FILE")
    method_cls = registry.get_method(cfg.method)
    knobs = [f.name for f in dataclasses.fields(method_cls.config_class)]
    for knob, spec in space.items():
        if knob not in knobs:
            close = difflib.get_close_matches(knob, knobs, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else f"; knobs: {', '.join(knobs)}"
            raise ConfigError(f"unknown knob '{knob}' in the search space of {cfg.method} ({where}){hint}")
        if knob in cfg.method_config:
            raise ConfigError(f"knob '{knob}' is both searched and fixed (method_config) in {where}")
        _check_spec(knob, spec, where)
        # every value the space can give must build the method's config (types, ranges its __post_init__ checks)
        for value in _corner_values(spec):
            method_cls.default_config({**cfg.method_config, knob: value},
                                      where=f"method '{cfg.method}' config with {knob}={value!r} from {where}")
    return space


def _check_spec(knob: str, spec: Any, where: str) -> None:
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: '{knob}' must be a mapping like {{type: float, low: 1e-4, high: 1e-2}}")
    unknown = sorted(set(spec) - _SPEC_KEYS)
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(_SPEC_KEYS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{where}: '{knob}' has unknown key '{unknown[0]}'{hint}")
    kind = spec.get("type")
    if kind not in SPEC_TYPES:
        raise ConfigError(f"{where}: '{knob}' type must be one of {', '.join(SPEC_TYPES)}, got {kind!r}")
    if kind == "categorical":
        if not isinstance(spec.get("choices"), list) or not spec["choices"]:
            raise ConfigError(f"{where}: '{knob}' (categorical) needs a non-empty choices: list")
        return
    low, high = spec.get("low"), spec.get("high")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or low >= high:
        raise ConfigError(f"{where}: '{knob}' needs numbers low < high, got low={low!r} high={high!r}")
    if spec.get("log") and low <= 0:
        raise ConfigError(f"{where}: '{knob}' has log: true, so low must be > 0 (got {low})")


def _corner_values(spec: dict[str, Any]) -> list[Any]:
    if spec["type"] == "categorical":
        return list(spec["choices"])
    cast = int if spec["type"] == "int" else float
    return [cast(spec["low"]), cast(spec["high"])]


def suggest(trial: Any, space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Draw one value per knob from an Optuna trial (in the space's order, so a seeded sampler repeats itself)."""
    params: dict[str, Any] = {}
    for knob, spec in space.items():
        if spec["type"] == "float":
            params[knob] = trial.suggest_float(knob, float(spec["low"]), float(spec["high"]),
                                               log=bool(spec.get("log", False)), step=spec.get("step"))
        elif spec["type"] == "int":
            params[knob] = trial.suggest_int(knob, int(spec["low"]), int(spec["high"]),
                                             log=bool(spec.get("log", False)), step=int(spec.get("step") or 1))
        else:
            params[knob] = trial.suggest_categorical(knob, spec["choices"])
    return params


def trial_run_config(cfg: TuneConfig, trial_dir: Path) -> Any:
    """The RunConfig of one trial: the short protocol, scored on eval, into the trial's own run folder."""
    from clbench.run_config import load_run_config

    overrides = {**cfg.run, "method": cfg.method, "benchmark": cfg.benchmark, "model": cfg.model,
                 "data_dir": cfg.data_dir, "order": cfg.order, "seed": cfg.seed, "num_tasks": cfg.num_tasks,
                 "max_steps_per_task": cfg.max_steps_per_task, "score_split": "eval", "zero_shot": False,
                 "out": str(trial_dir)}
    return load_run_config(None, overrides, hardware=cfg.hardware)[0]


def check(cfg: TuneConfig) -> dict[str, dict[str, Any]]:
    """Everything that can be wrong before a model loads: the search space and a trial's run config and data."""
    from clbench.harness import Harness

    space = search_space(cfg)
    Harness(trial_run_config(cfg, cfg.study_dir() / "trials" / "check"), dict(cfg.method_config))
    return space


# ---- the study -------------------------------------------------------------------------------------------------
def _storage(study_dir: Path) -> Any:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    # the open-lock (O_EXCL lock file) also works on network file systems shared by SLURM nodes
    path = str(study_dir / JOURNAL)
    return JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))


def open_study(cfg: TuneConfig, worker: int = 0, space: dict[str, dict[str, Any]] | None = None) -> Any:
    """Create or join the study of ``cfg``. Its folder keeps one protocol and one search space: joining with another
    (a changed option, or a method YAML whose ``search_space:`` was edited since) is a one-line error, because
    TPE would otherwise mix trials drawn from two spaces into one study and one best trial."""
    import optuna

    study_dir = cfg.study_dir()
    study_dir.mkdir(parents=True, exist_ok=True)
    protocol_file = study_dir / "protocol.json"
    space = search_space(cfg) if space is None else space  # callers that checked it already pass it
    protocol = json.loads(json.dumps(cfg.protocol() | {"search_space": space}))
    if protocol_file.is_file():
        old = json.loads(protocol_file.read_text())
        if old != protocol:
            raise ConfigError(f"{study_dir} holds a study with another {_first_difference(old, protocol)}; "
                              f"pass another --out")
    else:
        from clbench.results import atomic_write_json

        atomic_write_json(protocol_file, protocol)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=f"{cfg.method}-{cfg.benchmark}", storage=_storage(study_dir),
                                direction="maximize", load_if_exists=True)
    # a fresh study's first worker samples with the seed itself (same seed -> same trials); a worker joining later
    # or beside others offsets it, or its TPE start-up draws would repeat the first worker's knobs
    offset = 1000 * worker + len(study.get_trials(deepcopy=False))
    study.sampler = optuna.samplers.TPESampler(seed=cfg.seed + offset)
    return study


def _first_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    """``protocol (key: old != new)`` or ``search space (knob: old != new)``, for the first key that differs."""
    key = next(k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k))
    if key == "search_space" and isinstance(old.get(key), dict):
        before, after = old[key], new[key]
        knob = next(k for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k))
        return f"search space ({knob}: {before.get(knob)!r} != {after.get(knob)!r})"
    return f"protocol ({key}: {old.get(key)!r} != {new.get(key)!r})"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fail_dead_trials(study: Any) -> None:
    """A worker killed mid-trial leaves it RUNNING in the journal; on its own host, mark those FAIL (uncounted)."""
    from optuna.trial import TrialState

    host = socket.gethostname()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker", {})
        if worker.get("host") == host and not _pid_alive(int(worker.get("pid", 0))):
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)


def _counted(study: Any) -> list[Any]:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))


def objective_for(cfg: TuneConfig, space: dict[str, dict[str, Any]]) -> Any:
    """The Optuna objective: one harness run on the eval split into ``trials/trial-<n>``, returning its OP."""
    import optuna

    from clbench.harness import Harness

    def objective(trial: optuna.Trial) -> float:
        # the budget is exact across workers: a trial numbered past it (another worker took the last slot) is
        # pruned unrun, and pruned trials are not counted
        ahead = [t for t in _counted(trial.study) if t.number < trial.number]
        if len(ahead) >= cfg.budget:
            trial.study.stop()
            raise optuna.TrialPruned("budget reached")
        trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid()})
        params = suggest(trial, space)
        trial_dir = cfg.study_dir() / "trials" / f"trial-{trial.number:03d}"
        trial.set_user_attr("run_dir", str(trial_dir))
        command = (f"clbench tune (trial {trial.number} of {cfg.study_dir()}) "
                   + " ".join(f"--set {k}={v}" for k, v in params.items()))
        started = time.perf_counter()
        run_dir = Harness(trial_run_config(cfg, trial_dir), {**cfg.method_config, **params}, command=command).run()
        trial.set_user_attr("wall_time_s", time.perf_counter() - started)
        metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
        if metrics.get("score_split") != "eval" or not isinstance(metrics.get("OP"), float):
            raise RuntimeError(f"{run_dir}: the trial did not produce an eval-split OP")
        return float(metrics["OP"])

    return objective


def run_worker(cfg: TuneConfig, threads: int | None = None, command: str | None = None, worker: int = 0) -> None:
    """One worker: run trials of the shared study until ``budget`` of them are counted, then write study.json."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    space = search_space(cfg)
    # workers of a SLURM array (docs/sweep.md) are told apart by their array index
    worker = worker or int(os.environ.get("SLURM_ARRAY_TASK_ID", "0") or 0)
    study = open_study(cfg, worker, space)
    _fail_dead_trials(study)
    objective = objective_for(cfg, space)
    while len(_counted(study)) < cfg.budget:
        study.optimize(objective, n_trials=1)
    if worker == 0:
        run_default(cfg)
    write_study(cfg, study, space, command)


DEFAULT_DIR = "default"


def default_knobs(cfg: TuneConfig, space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The searched knobs' values in the method's current default config (its YAML plus ``method_config``)."""
    from clbench import registry

    config = registry.get_method(cfg.method).default_config(dict(cfg.method_config))
    return {knob: getattr(config, knob) for knob in space}


def run_default(cfg: TuneConfig) -> Path | None:
    """Run the method's current defaults once on the study's protocol into ``<study>/default/`` (a finished one is
    kept; an interrupted one resumes), unless ``default_run`` is off. Not an Optuna trial: the budget is the same
    for every method, and the sampler never sees this run."""
    if not cfg.default_run:
        return None
    from clbench.harness import Harness

    run_dir = cfg.study_dir() / DEFAULT_DIR
    command = f"clbench tune (the current defaults of {cfg.study_dir()})"
    return Path(Harness(trial_run_config(cfg, run_dir), dict(cfg.method_config), command=command).run())


def _default_record(cfg: TuneConfig, space: dict[str, dict[str, Any]], best: Any) -> dict[str, Any] | None:
    """study.json's ``default``: the current defaults' knobs, eval OP and run folder, and the best trial's gain."""
    path = cfg.study_dir() / DEFAULT_DIR / "metrics.json"
    if not path.is_file():
        return None
    value = json.loads(path.read_text()).get("OP")
    return {"params": default_knobs(cfg, space), "value": value, "run_dir": str(path.parent),
            "best_minus_default": (best.value - value) if best is not None and isinstance(value, float) else None}


def write_study(cfg: TuneConfig, study: Any, space: dict[str, dict[str, Any]], command: str | None = None) -> Path:
    """``<study>/study.json``: protocol, space, every trial (knobs, eval OP, state, run folder), the chosen knobs."""
    from optuna.trial import TrialState

    from clbench.provenance import git_commit, versions
    from clbench.results import atomic_write_json

    trials = [{"number": t.number, "state": t.state.name, "params": t.params, "value": t.value,
               "run_dir": t.user_attrs.get("run_dir"), "wall_time_s": t.user_attrs.get("wall_time_s")}
              for t in study.get_trials(deepcopy=False)]
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    best = max(complete, key=lambda t: (t.value, -t.number)) if complete else None  # ties: the earlier trial
    record = {
        "study": study.study_name, "method": cfg.method, "benchmark": cfg.benchmark, "model": cfg.model,
        "protocol": cfg.protocol(),
        "objective": "OP (mean of R's last row) on the eval split after the short protocol; test never read",
        "search_space": space, "budget": cfg.budget, "finished_trials": len(complete),
        "trials": trials,
        "best": {"number": best.number, "value": best.value, "params": best.params} if best else None,
        "set": " ".join(f"--set {k}={v}" for k, v in best.params.items()) if best else None,
        "default": _default_record(cfg, space, best),
        "command": command or " ".join(["clbench", *sys.argv[1:]]),
        "journal": JOURNAL, "versions": versions(), "git_commit": git_commit(),
    }
    path = cfg.study_dir() / STUDY_FILE
    atomic_write_json(path, record)
    return path


def tune(cfg: TuneConfig, command: str | None = None, log: Any = print) -> dict[str, Any]:
    """Check, then run the study here (``workers`` processes; 1 = this process) and return study.json's content."""
    check(cfg)
    command = command or " ".join(["clbench", *sys.argv[1:]])
    if cfg.workers == 1:
        run_worker(cfg, command=command)
    else:
        import submitit

        threads = max(1, (os.cpu_count() or 1) // cfg.workers)
        executor = submitit.LocalExecutor(folder=str(cfg.study_dir() / "workers"))
        executor.update_parameters(timeout_min=7 * 24 * 60)
        jobs = [executor.submit(run_worker, cfg, threads, command, i) for i in range(cfg.workers)]
        log(f"{cfg.workers} workers share {cfg.study_dir() / JOURNAL} ({threads} threads each)")
        for job in jobs:
            job.result()  # worker 0 has run the current defaults (run_worker)
        space = search_space(cfg)
        write_study(cfg, open_study(cfg, space=space), space, command)
    return json.loads((cfg.study_dir() / STUDY_FILE).read_text())


def load_tune_config(path: str | None, overrides: dict[str, Any]) -> TuneConfig:
    """A TuneConfig from an optional YAML (same keys) and command-line values (None = not given)."""
    data = load_yaml(path) if path else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    if "method" not in data:
        raise ConfigError("tune needs --method")
    return build(TuneConfig, data, where=f"tune config{f' {path}' if path else ''}")
