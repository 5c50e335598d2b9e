"""``clbench bench-overhead``: what the harness's Lightning training loop costs over a bare torch/peft loop.

One process, one model (loaded once), one method (``lora`` by default, built through the registry with its YAML
defaults, ``begin_task(0, ...)`` called) and the same ``batches`` training batches of trace-mini's first task,
collated as the harness collates them (:class:`clbench.benchmark.Collator` with ``train=True``, a
:class:`clbench.sampling.GlobalBatchSampler` order, the benchmark's ``max_prompt_len``/``max_answer_len``). Each
*variant* trains on those batches from the same initial adapter weights (restored before every loop) and the same
dropout seed (set right before the first step), with a fresh AdamW from ``configure_optimizers``:

- ``bare``: ``for batch: autocast(bf16) forward -> loss (+ regularizer terms) -> backward -> clip_grad_norm_(clip)
  -> AdamW step -> zero_grad`` on pre-collated batches; nothing else;
- ``harness``: the Trainer of a run's fit, built by ``clbench.trainer_factory.fit_trainer`` itself (RichProgressBar,
  CSVLogger with ``log_every_n_steps=5``, the ThroughputMeter callback, gradient clipping, the run's precision),
  ``fit`` on the harness's DataLoader (records collated on the fly, as in a run);
- ``lightning``: the same Trainer with the progress bar and the logger off;
- breakdown variants (``--variants all``): the harness minus one thing each (``harness-no-progress``,
  ``harness-no-logger``, ``harness-no-meter``, ``harness-no-clip``, ``harness-precollated``), the minimal Lightning
  loop (``lightning-minimal``: pre-collated, no bar, no logger, no meter) and ``bare-no-clip``.

What is timed: the start of every step (for Lightning, ``on_train_batch_start`` of a timing callback; for the bare
loop, the top of the loop body), after a device sync. A step's time is the interval from its start to the next
step's start, so it holds everything the loop does per step (data fetch and collation, hooks, logging, progress bar
refresh); the first step (warm-up) and the last (no next start) are left out, so ``batches`` steps give
``batches - 2`` samples per loop. ``wall_s_per_step`` is the whole loop (Trainer construction, setup, teardown,
logger flush) divided by ``batches``. Variants run interleaved in ``rounds`` (the order rotating every round, as
``clbench bench`` interleaves its contenders) after one unmeasured warm-up of the bare loop and of the harness Trainer,
so slow drift of the CPU clock or of other load spreads over all of them. Ratios: the pooled per-step medians against
``bare`` and ``lightning``, and (``vs_bare_paired``) the median over rounds of each round's ratio.

Every loop's final trainable parameters are kept: ``update_norm`` (how far it moved them; 0 means it trained
nothing) and ``rel_diff_vs_bare`` (the largest difference from the bare loop's result, relative to the bare loop's
largest update) say whether the loops computed the same thing.
"""

from __future__ import annotations

import itertools
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from clbench import bench_tables
from clbench.bench import (
    _autocast,
    _rotations,
    _sync,
    _to,
    measurement_header,
    optimizer_step,
    resolve_device,
    torch_threads,
)
from clbench.bench_tables import median, ratio
from clbench.config import ConfigError, setting
from clbench.method import CLMethod
from clbench.trainer_factory import ThroughputMeter, fit_trainer, make_trainer, quiet_lightning

COLUMNS = ["variant", "step_s_median", "step_s_min", "step_s_max", "wall_s_per_step", "vs_bare", "vs_bare_paired",
           "vs_lightning", "steps_timed", "update_norm", "rel_diff_vs_bare", "description"]


@dataclass(frozen=True)
class Variant:
    """One training loop: bare torch or a Lightning Trainer with the harness's pieces switched on or off."""

    name: str
    lightning: bool
    description: str
    progress: bool = False  # RichProgressBar (the run's progress=True)
    logger: bool = False  # CSVLogger, log_every_n_steps=5
    meter: bool = False  # the harness's ThroughputMeter callback
    clip: bool = True  # gradient clipping to OverheadConfig.clip
    collate: bool = False  # the harness's DataLoader collating records on the fly (else pre-collated batches)
    exact: bool = False  # the Trainer comes from trainer_factory.fit_trainer itself


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("bare", False, "bare torch loop: autocast fwd, backward, clip, AdamW, zero_grad"),
    Variant("harness", True, "the harness's fit Trainer (fit_trainer): bar + CSV log + meter + clip, on-the-fly "
                             "collation", progress=True, logger=True, meter=True, collate=True, exact=True),
    Variant("lightning", True, "harness Trainer, progress bar and logger off", meter=True, collate=True),
    Variant("harness-no-progress", True, "harness minus the RichProgressBar", logger=True, meter=True, collate=True),
    Variant("harness-no-logger", True, "harness minus the CSVLogger", progress=True, meter=True, collate=True),
    Variant("harness-no-meter", True, "harness minus the ThroughputMeter", progress=True, logger=True, collate=True),
    Variant("harness-no-clip", True, "harness minus gradient clipping", progress=True, logger=True, meter=True,
            clip=False, collate=True),
    Variant("harness-precollated", True, "harness on pre-collated batches (no on-the-fly collation)",
            progress=True, logger=True, meter=True),
    Variant("lightning-minimal", True, "Lightning fit only: pre-collated, no bar, logger or meter; clip"),
    Variant("bare-no-clip", False, "bare loop without clipping", clip=False),
)}
DEFAULT_VARIANTS = ["bare", "harness", "lightning"]


@dataclass
class OverheadConfig:
    """Settings of one overhead measurement (every field is a ``clbench bench-overhead`` option)."""

    model: str = setting("bundled", "'bundled', 'tiny', a local folder or a hub id")
    method: str = setting("lora", "method trained by every loop (its YAML defaults)")
    batches: int = setting(40, "optimiser steps per loop: the first N training batches of trace-mini's first task "
                               "(>= 3; the first and last step are not timed)")
    rounds: int = setting(3, "times every variant runs, interleaved, the order rotating each round")
    warmup: int = setting(2, "steps of one unmeasured bare loop and one harness fit before the rounds (0: none)")
    variants: list[str] = setting(factory=lambda: list(DEFAULT_VARIANTS), help=(
        "loops to time, or 'all': " + ", ".join(VARIANTS)))
    batch_size: int = setting(8, "examples per step (the harness's batch_size)")
    precision: str = setting("32-true", "32-true (as runs) or bf16-mixed")
    clip: float | None = setting(1.0, "gradient-norm clip of every clipping loop (the run's gradient_clip_val)")
    max_prompt_len: int | None = setting(None, "prompt tokens kept (default: the benchmark's)")
    max_answer_len: int | None = setting(None, "answer tokens trained on (default: the benchmark's)")
    device: str = setting("auto", "auto, cpu or cuda")
    seed: int = setting(0, "seed of the model init, the batch order and the dropout masks")
    threads: int | None = setting(None, "torch CPU threads (default: torch's choice)")
    out: str = setting("runs/bench", "folder for <name>.csv and <name>.json")
    name: str | None = setting(None, "file name stem (default: overhead-<timestamp>)")

    def __post_init__(self) -> None:
        if self.variants == ["all"]:
            self.variants = list(VARIANTS)
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ConfigError(f"unknown variant '{unknown[0]}' (known: {', '.join(VARIANTS)}, or all)")
        self.variants = list(dict.fromkeys(self.variants))
        if not self.variants:
            raise ConfigError("--variants needs at least one loop")
        if self.precision not in ("bf16-mixed", "32-true"):
            raise ConfigError(f"--precision must be bf16-mixed or 32-true, got '{self.precision}'")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"--device must be auto, cpu or cuda, got '{self.device}'")
        if self.batches < 3:
            raise ConfigError(f"--batches must be >= 3 (first and last step are not timed), got {self.batches}")
        if min(self.rounds, self.batch_size) < 1 or self.warmup < 0:
            raise ConfigError("--rounds and --batch-size must be >= 1, --warmup >= 0")
        if self.clip is not None and self.clip <= 0:
            raise ConfigError(f"--clip must be > 0, got {self.clip}")


def _step_clock() -> Any:
    """A Lightning callback that seeds the dropout RNG at the first step and stamps the start of every step."""
    from lightning.pytorch.callbacks import Callback

    class StepClock(Callback):
        def __init__(self, seed: int, device: torch.device):
            self.seed, self.device, self.starts = seed, device, []

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            _sync(self.device)
            if not self.starts:  # the bare loop seeds right before its first step too: same dropout masks
                torch.manual_seed(self.seed)
            self.starts.append(time.perf_counter())

    return StepClock


# ---- one loop ---------------------------------------------------------------------------------------------------
@dataclass
class LoopResult:
    """One loop's step start times (s), its whole wall time (s) and the trainable parameters it ended with."""

    starts: list[float]
    wall_s: float
    final: torch.Tensor

    def step_seconds(self) -> list[float]:
        """Per-step times: consecutive start intervals, the first (warm-up) step left out."""
        return [b - a for a, b in itertools.pairwise(self.starts)][1:]


def trainable_vector(method: CLMethod) -> torch.Tensor:
    """Every trainable parameter of ``method``, flattened into one fp32 CPU vector (in parameter order)."""
    return torch.cat([p.detach().float().flatten().cpu() for p in method.trainable_parameters()])


def _restore(method: CLMethod, state: dict[str, torch.Tensor]) -> None:
    params = dict(method.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
    method.zero_grad(set_to_none=True)


def bare_loop(method: CLMethod, batches: list[dict[str, Any]], device: torch.device, precision: str,
              clip: float | None, seed: int) -> LoopResult:
    """The bare loop: per batch, autocast forward → loss (+ regularizer terms) → backward → clip → AdamW step →
    zero_grad (the optimiser and any warm-up schedule from ``configure_optimizers``)."""
    started = time.perf_counter()
    method.to(device)
    method.train()
    conf = method.configure_optimizers()  # AdamW (+ the warm-up schedule, stepped per step as Lightning does)
    scheduler = conf["lr_scheduler"]["scheduler"] if isinstance(conf, dict) and "lr_scheduler" in conf else None
    opt = conf["optimizer"] if isinstance(conf, dict) else conf
    params = [p for group in opt.param_groups for p in group["params"]]
    autocast = _autocast(device, precision)
    starts: list[float] = []
    torch.manual_seed(seed)
    for batch in batches:
        _sync(device)
        starts.append(time.perf_counter())
        optimizer_step(method, _to(batch, device), autocast, opt, clip, params)
        if scheduler is not None:
            scheduler.step()
    _sync(device)
    return LoopResult(starts, time.perf_counter() - started, trainable_vector(method))


def lightning_loop(method: CLMethod, variant: Variant, loader: Any, steps: int, epochs: int, cfg: OverheadConfig,
                   device: torch.device, log_dir: Path, tag: str) -> LoopResult:
    """``Trainer.fit`` of ``method`` for ``steps`` steps on ``loader``, with the harness pieces ``variant`` keeps."""
    from lightning.pytorch.loggers import CSVLogger

    from clbench.run_config import RunConfig

    started = time.perf_counter()
    clip = cfg.clip if variant.clip else None
    run_cfg = RunConfig(method=cfg.method, model=cfg.model, precision=cfg.precision, gradient_clip_val=clip,
                        progress=variant.progress, accelerator="gpu" if device.type == "cuda" else "cpu",
                        batch_size=cfg.batch_size, max_steps_per_task=steps)
    clock = _step_clock()(cfg.seed, device)
    meter = ThroughputMeter()
    if variant.exact:
        trainer = fit_trainer(run_cfg, type(method), log_dir, epochs, tag, meter)
        trainer.callbacks.append(clock)
    else:
        logger = CSVLogger(log_dir, name="logs", version=tag) if variant.logger else False
        trainer = make_trainer(run_cfg, type(method), max_epochs=epochs, max_steps=steps,
                               callbacks=[meter, clock] if variant.meter else [clock], logger=logger,
                               log_every_n_steps=5, accumulate_grad_batches=1, gradient_clip_val=clip)
    trainer.fit(method, train_dataloaders=loader)
    _sync(device)
    wall = time.perf_counter() - started
    if len(clock.starts) != steps:
        raise RuntimeError(f"{variant.name}: Lightning ran {len(clock.starts)} steps instead of {steps}")
    return LoopResult(clock.starts, wall, trainable_vector(method))


# ---- the measurement --------------------------------------------------------------------------------------------
@dataclass
class _Setup:
    method: CLMethod
    records: list[dict[str, str]]
    collate: Any
    batches: list[dict[str, Any]]
    source: str
    collate_ms: float
    device: torch.device


def _records_loader(setup: _Setup, cfg: OverheadConfig) -> Any:
    """The harness's training DataLoader: GlobalBatchSampler order, Collator(train=True) in the loop, no workers. Its
    own generator keeps the iterator's base seed off the global RNG (the dropout masks)."""
    from torch.utils.data import DataLoader

    from clbench.sampling import GlobalBatchSampler

    sampler = GlobalBatchSampler(len(setup.records), cfg.batch_size, seed=cfg.seed)
    return DataLoader(setup.records, batch_size=cfg.batch_size, sampler=sampler, collate_fn=setup.collate,
                      generator=torch.Generator().manual_seed(cfg.seed))


def _batches_loader(batches: list[dict[str, Any]]) -> Any:
    """Pre-collated batches as a DataLoader (each item one batch, nothing collated)."""
    from torch.utils.data import DataLoader

    return DataLoader(batches, batch_size=None, shuffle=False, generator=torch.Generator())


def prepare(cfg: OverheadConfig, log: Callable[[str], None] = lambda _: None) -> _Setup:
    """Load the model once, build the method with its YAML defaults (``begin_task(0, ...)``) and collate the first
    ``batches`` training batches of trace-mini's first task as the harness does (timing the collation)."""
    from clbench import registry
    from clbench.benchmark import Collator
    from clbench.models import load_model
    from clbench.run_plan import resolve_method

    device = resolve_device(cfg.device)
    method_cls, method_cfg = resolve_method(cfg.method)  # registry + YAML defaults, as runs and bench do
    benchmark = registry.get_benchmark("trace-mini")()
    tasks = benchmark.ordered(1)
    task = tasks[0]
    log(f"loading {cfg.model}, building {cfg.method}")
    torch.manual_seed(cfg.seed)
    loaded = load_model(cfg.model)
    method = method_cls(loaded.model, loaded.tokenizer, method_cfg, num_tasks=len(tasks))
    method.begin_task(0, task)
    method.to(device)
    collate = Collator(loaded.tokenizer, cfg.max_prompt_len or benchmark.max_prompt_len,
                       cfg.max_answer_len or benchmark.max_answer_len, train=True)
    setup = _Setup(method, task.train, collate, [], f"trace-mini order 1 task 1 ({task.name})", math.nan, device)
    loader = _records_loader(setup, cfg)
    started = time.perf_counter()
    setup.batches = list(itertools.islice(itertools.chain.from_iterable(itertools.repeat(loader)), cfg.batches))
    setup.collate_ms = 1000 * (time.perf_counter() - started) / cfg.batches
    return setup


def run_variant(setup: _Setup, variant: Variant, cfg: OverheadConfig, steps: int | None = None,
                tag: str = "loop") -> LoopResult:
    """Run ``variant`` for ``steps`` (default ``cfg.batches``) steps on the prepared batches; the caller restores
    the initial weights first."""
    steps = steps or cfg.batches
    if not variant.lightning:
        return bare_loop(setup.method, setup.batches[:steps], setup.device, cfg.precision,
                         cfg.clip if variant.clip else None, cfg.seed)
    if variant.collate:
        loader = _records_loader(setup, cfg)
        epochs = -(-steps // len(loader))
    else:
        loader, epochs = _batches_loader(setup.batches[:steps]), 1
    with tempfile.TemporaryDirectory(prefix="clbench-overhead-") as log_dir:
        return lightning_loop(setup.method, variant, loader, steps, epochs, cfg, setup.device, Path(log_dir), tag)


def run_overhead(cfg: OverheadConfig, log: Callable[[str], None] = lambda _: None,
                 on_round: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Time every variant (see the module docstring); returns the results as a JSON-able dict.

    ``on_round`` gets the results so far after every finished round (the command writes them, so a run stopped
    early still leaves its finished rounds on disk)."""
    with torch_threads(cfg.threads):
        return _run_overhead(cfg, log, on_round)


def _run_overhead(cfg: OverheadConfig, log: Callable[[str], None],
                  on_round: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]:
    quiet_lightning()  # as the harness's run() does: Lightning's info lines and inapplicable warnings off
    load_before = os.getloadavg()
    setup = prepare(cfg, log)
    method = setup.method
    initial = {n: p.detach().clone() for n, p in method.named_parameters() if p.requires_grad}
    start_vector = trainable_vector(method)
    if cfg.warmup:
        log(f"warm-up: {cfg.warmup} steps of the bare loop and of the harness Trainer (not measured)")
        for name in ("bare", "harness"):
            _restore(method, initial)
            run_variant(setup, VARIANTS[name], cfg, steps=cfg.warmup, tag=f"warmup-{name}")
    variants = [VARIANTS[name] for name in cfg.variants]
    results: dict[str, list[LoopResult]] = {v.name: [] for v in variants}
    load: dict[str, list[float]] = {v.name: [] for v in variants}  # 1-min load average as each loop started
    static = {
        **measurement_header(cfg.name, setup.device), "data": setup.source,
        "train_batch_shapes": [list(b["input_ids"].shape) for b in setup.batches],
        "collate_ms_per_batch": setup.collate_ms, "settings": asdict(cfg),
    }

    def summary(rounds_done: int) -> dict[str, Any]:
        done = {name: runs[:rounds_done] for name, runs in results.items()}
        return {
            **static, "rounds_done": rounds_done,
            "load_average_before_after": [load_before[0], os.getloadavg()[0]],  # other load on the machine (1 min)
            "load_average_per_loop": {name: values[:rounds_done] for name, values in load.items()},
            "step_seconds": {name: [res.step_seconds() for res in runs] for name, runs in done.items()},
            "wall_seconds": {name: [res.wall_s for res in runs] for name, runs in done.items()},
            "rows": _rows(variants, done, start_vector),
        }

    log(f"{cfg.rounds} round(s) of {len(variants)} loops x {cfg.batches} steps, interleaved")
    for i, (r, variant) in enumerate(_rotations(variants, cfg.rounds)):
        _restore(method, initial)
        load[variant.name].append(os.getloadavg()[0])
        result = run_variant(setup, variant, cfg, tag=f"round{r}-{variant.name}")
        results[variant.name].append(result)
        log(f"round {r + 1} {variant.name}: median {statistics.median(result.step_seconds()):.3f} s/step")
        if on_round is not None and (i + 1) % len(variants) == 0 and r + 1 < cfg.rounds:
            on_round(summary(r + 1))
    _restore(method, initial)
    return summary(cfg.rounds)


def _rows(variants: list[Variant], results: dict[str, list[LoopResult]], start: torch.Tensor
          ) -> list[dict[str, Any]]:
    rows = []
    for v in variants:
        runs = results[v.name]
        steps = [s for res in runs for s in res.step_seconds()]
        final = runs[0].final
        rows.append({"variant": v.name, "step_s_median": median(steps), "step_s_min": min(steps),
                     "step_s_max": max(steps), "wall_s_per_step": median(res.wall_s / len(res.starts) for res in runs),
                     "steps_timed": len(steps), "update_norm": float((final - start).norm()),
                     "rounds_rel_diff": _rel_diff(runs, start), "description": v.description,
                     "round_medians": [median(res.step_seconds()) for res in runs]})
    by_name = {row["variant"]: row for row in rows}
    bare, plain = by_name.get("bare"), by_name.get("lightning")
    for row in rows:
        row["vs_bare"] = ratio(row["step_s_median"], bare["step_s_median"]) if bare else math.nan
        row["vs_lightning"] = ratio(row["step_s_median"], plain["step_s_median"]) if plain else math.nan
        row["vs_bare_paired"] = median(ratio(a, b) for a, b in zip(row["round_medians"], bare["round_medians"],
                                                                      strict=True)) if bare else math.nan
        if bare:
            scale = float((results["bare"][0].final - start).abs().max())
            diff = float((results[row["variant"]][0].final - results["bare"][0].final).abs().max())
            row["rel_diff_vs_bare"] = ratio(diff, scale)
        else:
            row["rel_diff_vs_bare"] = math.nan
    return rows


def _rel_diff(runs: list[LoopResult], start: torch.Tensor) -> float:
    """The largest difference between rounds' final parameters, relative to the first round's largest update."""
    scale = float((runs[0].final - start).abs().max())
    diff = max(float((res.final - runs[0].final).abs().max()) for res in runs)
    return ratio(diff, scale)


def write_results(results: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    """``<out>/<name or overhead-timestamp>.csv`` (one row per variant, :data:`COLUMNS`) and ``.json`` (everything,
    per-step times included)."""
    return bench_tables.write_results(results, out, COLUMNS, stem_prefix="overhead-", float_format="%.4g")


def print_results(results: dict[str, Any], console: Any = None) -> None:
    """A rich table: per-step median/min, wall per step, the ratios and whether each loop trained."""
    s = results["settings"]
    load = results["load_average_before_after"]
    title = (f"clbench bench-overhead · {s['model']} · {s['method']} · {results['device']} · {s['precision']} · "
             f"batch {s['batch_size']} · {s['batches']} steps x {results['rounds_done']} rounds")
    caption = (f"data: {results['data']}; collation {results['collate_ms_per_batch']:.1f} ms/batch; "
               f"load average {load[0]:.2f} -> {load[1]:.2f} on {os.cpu_count()} CPUs; "
               "trainer: clbench.trainer_factory"
               + "".join(f"\n{row['variant']}: {row['description']}" for row in results["rows"]))
    heads = [("variant", "variant", None), ("s/step median", "step_s_median", ".3f"), ("min", "step_s_min", ".3f"),
             ("wall s/step", "wall_s_per_step", ".3f"), ("× bare", "vs_bare", ".3f"),
             ("× bare paired", "vs_bare_paired", ".3f"), ("× lightning", "vs_lightning", ".3f"),
             ("update", "update_norm", ".3g"), ("Δ vs bare", "rel_diff_vs_bare", ".2g")]
    bench_tables.print_table(results["rows"], heads, title, caption, console, width=150)
