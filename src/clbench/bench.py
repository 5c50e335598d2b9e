"""``clbench bench``: speed and memory of methods measured in one process on the same batches.

What is measured, for the base model (inference only) and each contender (a method built through the registry with
its YAML defaults, plus ``--set LABEL.KEY=VALUE`` knobs for a ``LABEL=METHOD`` contender, so two settings of one
method can be compared side by side), at task ``at_task`` of the order (default 1, the second task): every earlier
task gets one training step and its end-of-task work on the bench's training batches first (``begin_task(k)``, one
step, ``finish_task(k)``: episodic memories, gradient bases, Fisher, the frozen teacher, keys), then
``begin_task(at_task)``.
Methods whose per-step cost starts with the second task (GEM and A-GEM's memory gradients, OGD's projection, LwF's
teacher forward, EWC's penalty) pay it in the measured steps; at ``--at-task 0`` they do not.

- train step: forward + backward + the method's ``on_before_optimizer_step`` (gradient surgery) + gradient clipping
  + optimiser step on a fixed batch, in the order Lightning runs them, under the run's precision, median over
  ``steps`` steps after ``warmup`` steps;
- inference: greedy generation of exactly ``new_tokens`` tokens (EOS is suppressed until then, so every method does
  the same work) for a fixed batch, ms per example, median over ``steps`` repeats after ``warmup``;
- peak memory of one train step and of one generation, above the level just before it: CUDA
  ``max_memory_allocated`` on GPU; on CPU the peak resident set size (RSS, sampled every millisecond from
  /proc/self/statm after ``malloc_trim``) — not tracemalloc, which does not see PyTorch's allocations;
- trainable parameters.

Methods are interleaved (round-robin, rotating the order every repeat) so slow drift of the CPU clock or of other
load on the machine spreads evenly over all of them. Ratios are reported against ``lora`` and against the base model.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import platform
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from clbench import bench_tables
from clbench.bench_tables import median, ratio
from clbench.benchmark import Collator, DataError, Task, TaskSpec
from clbench.config import ConfigError
from clbench.method import CLMethod, MethodConfig
from clbench.provenance import slow_precision_warning

BASE = "base"
PRECISIONS = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16, "32-true": None, "32": None}
COLUMNS = ["method", "trainable_params", "train_step_ms", "train_step_ms_min", "infer_ms_per_example",
           "infer_ms_per_example_min", "train_peak_mem_mb", "infer_peak_mem_mb", "train_vs_lora", "infer_vs_lora",
           "train_mem_vs_lora", "infer_mem_vs_lora", "infer_vs_base", "train_mem_vs_base", "infer_mem_vs_base",
           "knobs"]


@dataclass
class BenchConfig:
    """Settings of one benchmark (every field is a ``clbench bench`` option)."""

    # each field is a `clbench bench` option (clbench.cli_options): its help and default live here
    methods: list[str] = field(default_factory=lambda: ["lora", "moses"], metadata={
        "help": "method names, or LABEL=METHOD for a second setting of a method (its knobs: --set); the base model "
                "is always measured"})
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict, metadata={
        "cli": False, "help": "label -> knobs over the method's YAML (`clbench bench --set LABEL.KEY=VALUE`)"})
    model: str = field(default="bundled", metadata={"help": "'bundled', 'tiny', a local folder or a hub id"})
    steps: int = field(default=10, metadata={"help": "measured train steps / generations per method (median)"})
    warmup: int = field(default=2, metadata={"help": "unmeasured steps / generations first"})
    batch_size: int = field(default=8, metadata={"help": "examples per train step and per generation"})
    seq_len: int = field(default=128, metadata={"help": "prompt tokens at most (random data: about this many "
                                                        "tokens)"})
    new_tokens: int = field(default=16, metadata={"help": "tokens generated per example (exactly; EOS suppressed)"})
    precision: str = field(default="32-true", metadata={"help": "32-true (as runs), bf16-mixed or 16-mixed"})
    data: str = field(default="trace-mini", metadata={"help": "trace-mini (its first task) or random"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:1 ..."})
    num_tasks: int = field(default=8, metadata={"help": "tasks the methods pre-allocate for (TRACE has 8)"})
    at_task: int = field(default=1, metadata={
        "help": "task index measured (0 = the first task; 1 = the second, after the first's end-of-task work, where "
                "memory- and projection-based methods pay their per-step cost)"})
    seed: int = field(default=0, metadata={"help": "seed of the contenders' init and of the random data"})
    clip: float | None = field(default=1.0, metadata={"help": "clip the gradient norm of each train step to this, "
                                                              "as runs do"})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default: torch's choice)"})
    frozen_dtype: str | None = field(default=None, metadata={
        "help": "bf16|fp16: frozen Linear weights in the autocast dtype, as `clbench run --frozen-dtype`"})
    out: str = field(default="runs/bench", metadata={
        "help": "folder for <name>.csv and <name>.json (committed benches: results/bench)"})
    name: str | None = field(default=None, metadata={"help": "file name stem (default: a timestamp)"})

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision '{self.precision}' (known: {', '.join(PRECISIONS)})")
        if self.data not in ("trace-mini", "random"):
            raise ConfigError(f"--data must be 'trace-mini' or 'random', got '{self.data}'")
        if min(self.steps, self.batch_size, self.seq_len, self.new_tokens, self.num_tasks) < 1 or self.warmup < 0:
            raise ConfigError("steps, batch size, seq len, new tokens and num tasks must be >= 1, warmup >= 0")
        if not 0 <= self.at_task < self.num_tasks:
            raise ConfigError(f"--at-task must be in 0..{self.num_tasks - 1} (--num-tasks {self.num_tasks}), "
                              f"got {self.at_task}")
        if not self.methods:
            raise ConfigError("--methods needs at least one method name")
        labels = [label for label, _ in self.contenders()]
        if len(set(labels)) != len(labels) or BASE in labels:
            raise ConfigError(f"--methods labels must be unique and not '{BASE}', got {', '.join(self.methods)}")
        for label in self.overrides:
            if label not in labels:
                raise ConfigError(f"--set {label}.KEY=VALUE names no contender (contenders: {', '.join(labels)})")
        from clbench.run_config import frozen_torch_dtype

        frozen_torch_dtype(self.frozen_dtype, self.precision)  # the same check as `clbench run`

    def contenders(self) -> list[tuple[str, str]]:
        """``(label, method name)`` per ``--methods`` entry: ``lora`` is ``("lora", "lora")``, ``lora15=lora`` is
        ``("lora15", "lora")``."""
        pairs = []
        for entry in dict.fromkeys(self.methods):  # a repeated entry is measured once
            if entry == BASE:  # always measured
                continue
            label, _, method = entry.partition("=")
            label, method = label.strip(), (method or label).strip()
            if not label or not method:
                raise ConfigError(f"--methods entry '{entry}' must be METHOD or LABEL=METHOD")
            pairs.append((label, method))
        return pairs


@dataclass
class _Entry:
    """One contender: its method object, optimiser (None for the base model) and the measurements so far."""

    name: str
    method: CLMethod
    optimizer: torch.optim.Optimizer | None
    train_s: list[float] = field(default_factory=list)
    infer_s: list[float] = field(default_factory=list)
    train_mem: float = math.nan
    infer_mem: float = math.nan


# ---- memory ------------------------------------------------------------------------------------------------------
def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _malloc_trim() -> None:
    # glibc keeps freed small blocks in its arenas; trimming first makes the "before" level honest
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def memory_kind(device: torch.device) -> str:
    """How peak memory is measured on ``device`` (recorded in the results)."""
    if device.type == "cuda":
        return "cuda max_memory_allocated above the pre-step level"
    return "cpu peak RSS above the pre-step level (sampled every 1 ms after malloc_trim; not tracemalloc)"


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[list[float]]:
    """Yields a one-element list that holds, on exit, the peak memory (MiB) above the level on entry."""
    result = [math.nan]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        yield result
        torch.cuda.synchronize(device)
        result[0] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        return
    _malloc_trim()
    before = _rss_bytes()
    if before is None:  # no /proc (macOS): leave NaN rather than report a process-lifetime maximum
        yield result
        return
    peak = [before]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes() or 0)
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        peak[0] = max(peak[0], _rss_bytes() or 0)
        result[0] = (peak[0] - before) / 2**20


# ---- data --------------------------------------------------------------------------------------------------------
def _random_records(n: int, seq_len: int, seed: int) -> list[dict[str, str]]:
    """Printable-ASCII prompts/answers: the tokenizer turns them into about seq_len tokens (3/4 prompt)."""
    g = torch.Generator().manual_seed(seed)
    chars = torch.randint(97, 123, (n, 4 * seq_len), generator=g)
    records = []
    for row in chars.tolist():
        text = "".join(map(chr, row))
        words = " ".join(text[i : i + 5] for i in range(0, len(text), 5))
        records.append({"prompt": words[: 3 * seq_len], "answer": words[3 * seq_len : 4 * seq_len]})
    return records


def train_collator(tokenizer: Any, cfg: BenchConfig) -> Collator:
    """The collate function of every bench training batch; prompts are cut to their last ``seq_len`` tokens (the
    Collator keeps the end, where the answer cue is)."""
    return Collator(tokenizer, max_prompt_len=cfg.seq_len, max_answer_len=max(1, cfg.seq_len // 4), train=True)


def make_batches(tokenizer: Any, cfg: BenchConfig) -> tuple[list[dict[str, Any]], dict[str, Any], Task, str]:
    """The fixed batches every contender sees: ``steps + warmup`` train batches, one generation batch, the task
    handed to every ``begin_task`` (its ``train`` is the records of the train batches), and a description of the
    data."""
    n_train = (cfg.steps + cfg.warmup) * cfg.batch_size
    task: Task | None = None
    source = cfg.data
    if cfg.data == "trace-mini":
        from clbench import registry

        try:
            first = registry.get_benchmark("trace-mini")().ordered(1)[0]
            task, source = first, f"trace-mini order 1 task 1 ({first.name})"
        except (DataError, KeyError, FileNotFoundError) as err:
            source = f"random (trace-mini unavailable: {str(err).splitlines()[0]})"
    if task is None:
        records = _random_records(n_train + cfg.batch_size, cfg.seq_len, cfg.seed)
        task = Task(TaskSpec("bench-random", "accuracy"), train=records[:n_train], eval=[],
                    test=records[n_train:])
    train_records = [task.train[i % len(task.train)] for i in range(n_train)]
    test_records = [task.test[i % len(task.test)] for i in range(cfg.batch_size)]
    task = Task(task.spec, train=train_records, eval=task.eval, test=test_records)
    train_collate = train_collator(tokenizer, cfg)
    batches = [train_collate(train_records[i : i + cfg.batch_size]) for i in range(0, n_train, cfg.batch_size)]
    infer = Collator(tokenizer, max_prompt_len=cfg.seq_len, train=False)(
        [{"prompt": r["prompt"], "index": i} for i, r in enumerate(test_records)])
    return batches, infer, task, source


# ---- contenders --------------------------------------------------------------------------------------------------
def _optimizer(method: CLMethod) -> torch.optim.Optimizer:
    conf = method.configure_optimizers()
    if isinstance(conf, dict):
        conf = conf["optimizer"]
    if isinstance(conf, (list, tuple)):
        conf = conf[0]
    return conf


def parse_contender_overrides(pairs: list[str]) -> dict[str, dict[str, Any]]:
    """``--set LABEL.KEY=VALUE`` pairs (values are YAML, as in ``clbench run --set``) → ``{label: {key: value}}``."""
    from clbench.config import parse_overrides

    out: dict[str, dict[str, Any]] = {}
    for dotted, value in parse_overrides(pairs).items():
        label, _, key = dotted.partition(".")
        if not label or not key:
            raise ConfigError(f"bench --set expects LABEL.KEY=VALUE (e.g. lora.r=16), got '{dotted}=...'")
        out.setdefault(label, {})[key] = value
    return out


def contender_config(label: str, method_name: str, cfg: BenchConfig) -> Any:
    """The method config of contender ``label``: the method's YAML defaults, then ``--set label.KEY=VALUE``."""
    from clbench.run_plan import resolve_method

    return resolve_method(method_name, cfg.overrides.get(label, {}),
                          where=f"method '{method_name}' config of contender '{label}'")[1]


def earlier_tasks_loader(task: Task, tokenizer: Any, cfg: BenchConfig) -> torch.utils.data.DataLoader:
    """The training loader handed to ``finish_task`` of the tasks before ``at_task``: the bench's training records
    in its batches, through the same collate function as the train batches (methods read its ``collate_fn``)."""
    return torch.utils.data.DataLoader(task.train, batch_size=cfg.batch_size, collate_fn=train_collator(tokenizer, cfg))


def advance_to_task(method: CLMethod, task: Task, cfg: BenchConfig, device: torch.device,
                    step: Callable[[CLMethod], None]) -> None:
    """Bring ``method`` to task ``cfg.at_task`` as a run would, but with one training step per earlier task: for
    every earlier task k, ``begin_task(k)``, ``step(method)`` (some end-of-task work needs a trained task, e.g. SETA's
    sub-blocks) and ``finish_task(k)`` on the bench's records (each task is the same records: cost, not accuracy, is
    measured); then ``train_examples`` (methods derive per-stage state there, e.g. GEM's memories) and
    ``begin_task(at_task)``. The method ends on ``device``."""
    tasks = [task] * (cfg.at_task + 1)
    loader = earlier_tasks_loader(task, method.tokenizer, cfg)
    for k in range(cfg.at_task):
        method.train_examples(k, tasks)
        method.begin_task(k, task)
        method.to(device)
        step(method)
        method.finish_task(k, task, train_loader=loader)
    method.train_examples(cfg.at_task, tasks)
    method.begin_task(cfg.at_task, task)
    method.to(device)


def build_contender(name: str, cfg: BenchConfig, task: Task, device: torch.device, method_name: str | None = None,
                    batch: dict[str, Any] | None = None) -> _Entry:
    """A fresh copy of the model wrapped by ``method_name`` (default: ``name``) with its YAML defaults and the knobs
    ``cfg.overrides[name]``, advanced to task ``cfg.at_task`` (:func:`advance_to_task`); ``name`` labels the
    contender's row; ``batch`` (on ``device``) is the training step of each earlier task (required when
    ``at_task`` > 0)."""
    from clbench import registry
    from clbench.models import load_model

    torch.manual_seed(cfg.seed)
    loaded = load_model(cfg.model)
    # exactly new_tokens tokens for everyone: EOS is suppressed until then (greedy decoding is otherwise unchanged)
    loaded.model.generation_config.min_new_tokens = cfg.new_tokens
    from clbench.run_config import frozen_torch_dtype

    frozen = frozen_torch_dtype(cfg.frozen_dtype, cfg.precision)
    if name == BASE:
        no_knobs = MethodConfig(lr=0.0, weight_decay=0.0, warmup_steps=0)  # the base model only runs inference
        method = CLMethod(loaded.model, loaded.tokenizer, no_knobs, num_tasks=1)
        if frozen is not None:
            method.store_frozen_linears(frozen)
        return _Entry(name, method.to(device), None)
    method_name = method_name or name
    cls = registry.get_method(method_name)
    method_cfg = contender_config(name, method_name, cfg)
    if cfg.at_task > 0 and batch is None:
        raise ValueError("build_contender: at_task > 0 needs the training batch of the earlier tasks' step")
    method = cls(loaded.model, loaded.tokenizer, method_cfg, num_tasks=cfg.num_tasks)
    autocast = _autocast(device, cfg.precision)

    def one_step(m: CLMethod) -> None:
        m.train()
        optimizer_step(m, batch, autocast, _optimizer(m), cfg.clip)

    advance_to_task(method, task, cfg, device, one_step)
    if frozen is not None:
        method.store_frozen_linears(frozen)
    method.to(device)
    return _Entry(name, method, _optimizer(method))


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _autocast(device: torch.device, precision: str) -> Callable[[], contextlib.AbstractContextManager]:
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def optimizer_step(method: CLMethod, batch: dict[str, Any], autocast: Callable[[], Any],
                   optimizer: torch.optim.Optimizer, clip: float | None, params: list[torch.Tensor] | None = None
                   ) -> None:
    """One optimiser step as the harness takes it: (LM loss + Σ regularizer terms) under autocast, backward, the
    method's ``on_before_optimizer_step`` (GEM/A-GEM/OGD gradient surgery), clip the norm of ``params`` (default: the
    trainable parameters), step, zero the gradients. That is Lightning 2.6's order: hooks, then clipping."""
    with autocast():
        out = method(batch)
        terms = method.regularizer(batch, out)
        loss = out.loss + sum(terms.values()) if terms else out.loss
    loss.backward()
    method.on_before_optimizer_step(optimizer)
    if clip:
        torch.nn.utils.clip_grad_norm_(params if params is not None else method.trainable_parameters(), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def train_step(entry: _Entry, batch: dict[str, Any], autocast: Callable[[], Any], clip: float | None) -> None:
    """:func:`optimizer_step` of a contender in train mode."""
    entry.method.train()
    optimizer_step(entry.method, batch, autocast, entry.optimizer, clip)


@torch.no_grad()
def infer_step(entry: _Entry, batch: dict[str, Any], autocast: Callable[[], Any], new_tokens: int) -> torch.Tensor:
    """Greedy generation of ``new_tokens`` tokens through the method (task-agnostic routing included).

    Task-aware references (told the task id, as in runs) get the measured task's id; every other method is measured
    task-agnostic, as runs evaluate it by default.
    """
    entry.method.eval()
    if entry.method.task_aware:  # the task being measured
        batch = {**batch, "task_id": torch.full_like(batch["input_ids"][:, 0], entry.method.current_task)}
    with autocast():
        return entry.method.generate(batch, new_tokens)


def _rotations(names: list[Any], rounds: int) -> Iterator[tuple[int, Any]]:
    """Round-robin with the start rotating every round: each contender runs first, second, ... equally often."""
    for r in range(rounds):
        k = r % len(names)
        for item in names[k:] + names[:k]:
            yield r, item


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """``torch.set_num_threads(n)`` inside the block (None: torch's choice); the process (a test session, a notebook)
    gets its own setting back afterwards."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when present, else cpu; anything else as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def measurement_header(name: str | None, device: torch.device) -> dict[str, Any]:
    """What every bench result starts with: name, command, timestamp, device, hardware, threads, versions, commit."""
    from clbench.provenance import git_commit, hardware, versions

    return {
        "name": name, "command": " ".join(["clbench", *sys.argv[1:]]),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"cpu x{os.cpu_count()} ({platform.processor() or platform.machine()})",
        "hardware": hardware(),  # CPU model/ISA, threads, GPU and CUDA versions: speed depends on all of them
        "torch_threads": torch.get_num_threads(), "versions": versions(), "git_commit": git_commit(),
    }


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Measure every contender (see the module docstring); returns the results as a JSON-able dict."""
    with torch_threads(cfg.threads):
        return _run_bench(cfg, log)


def _run_bench(cfg: BenchConfig, log: Callable[[str], None]) -> dict[str, Any]:
    device = resolve_device(cfg.device)
    contenders = [(BASE, BASE), *cfg.contenders()]
    from clbench.models import load_model

    for label, method_name in contenders[1:]:  # an unknown name or knob fails before any model is loaded
        contender_config(label, method_name, cfg)
    warning = slow_precision_warning(cfg.precision, device.type == "cpu")
    if warning:
        log(f"warning: {warning}")
    batches, infer, task, source = make_batches(load_model(cfg.model).tokenizer, cfg)
    batches = [_to(b, device) for b in batches]
    infer = _to(infer, device)
    entries: list[_Entry] = []
    for label, method_name in contenders:
        log(f"building {label}")
        entries.append(build_contender(label, cfg, task, device, method_name, batch=batches[0]))
    autocast = _autocast(device, cfg.precision)
    trainers = [e for e in entries if e.optimizer is not None]

    log(f"train: {cfg.warmup} warm-up + {cfg.steps} measured steps per method, interleaved")
    for r, entry in _rotations(trainers, cfg.warmup + cfg.steps):
        batch = batches[r % len(batches)]
        _sync(device)
        start = time.perf_counter()
        train_step(entry, batch, autocast, cfg.clip)
        _sync(device)
        if r >= cfg.warmup:
            entry.train_s.append(time.perf_counter() - start)
    log(f"inference: {cfg.warmup} warm-up + {cfg.steps} measured generations per contender, interleaved")
    for r, entry in _rotations(entries, cfg.warmup + cfg.steps):
        _sync(device)
        start = time.perf_counter()
        new = infer_step(entry, infer, autocast, cfg.new_tokens)
        _sync(device)
        if new.shape[1] != cfg.new_tokens:
            raise RuntimeError(f"{entry.name} generated {new.shape[1]} tokens instead of {cfg.new_tokens}")
        if r >= cfg.warmup:
            entry.infer_s.append(time.perf_counter() - start)
    log("peak memory: one train step and one generation each")
    for entry in entries:  # apart from the timed loops: the sampling thread must not perturb the timings
        if entry.optimizer is not None:
            with peak_memory(device) as mem:
                train_step(entry, batches[0], autocast, cfg.clip)
            entry.train_mem = mem[0]
        with peak_memory(device) as mem:
            infer_step(entry, infer, autocast, cfg.new_tokens)
        entry.infer_mem = mem[0]

    rows = [{**_row(e, cfg.batch_size), "knobs": _knobs_text(cfg.overrides.get(e.name, {}))} for e in entries]
    _add_ratios(rows)
    return {
        **measurement_header(cfg.name, device), "memory_kind": memory_kind(device), "data": source,
        "train_batch_shapes": [list(b["input_ids"].shape) for b in batches],
        "infer_batch_shape": list(infer["input_ids"].shape), "settings": asdict(cfg), "rows": rows,
    }


def _knobs_text(knobs: dict[str, Any]) -> str:
    """``key=value`` pairs of a contender's non-default knobs, as typed after ``--set LABEL.``."""
    return " ".join(f"{key}={json.dumps(value, separators=(',', ':'))}" for key, value in knobs.items())


def _row(entry: _Entry, batch_size: int) -> dict[str, Any]:
    # the method's own count (pre-allocating methods exclude rows that never get a gradient); base class: requires_grad
    trainable = entry.method.param_report()["trainable"] if entry.optimizer is not None else 0
    return {
        "method": entry.name, "trainable_params": trainable,
        "train_step_ms": 1000 * median(entry.train_s),
        "train_step_ms_min": 1000 * min(entry.train_s) if entry.train_s else math.nan,
        "infer_ms_per_example": 1000 * median(entry.infer_s) / batch_size,
        "infer_ms_per_example_min": 1000 * min(entry.infer_s) / batch_size if entry.infer_s else math.nan,
        "train_peak_mem_mb": entry.train_mem, "infer_peak_mem_mb": entry.infer_mem,
    }


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    by_name = {r["method"]: r for r in rows}
    lora, base = by_name.get("lora"), by_name.get(BASE)
    for row in rows:
        for key, metric, ref in (("train_vs_lora", "train_step_ms", lora), ("infer_vs_lora", "infer_ms_per_example",
                                 lora), ("train_mem_vs_lora", "train_peak_mem_mb", lora),
                                 ("infer_mem_vs_lora", "infer_peak_mem_mb", lora),
                                 ("infer_vs_base", "infer_ms_per_example", base),
                                 ("train_mem_vs_base", "train_peak_mem_mb", base),
                                 ("infer_mem_vs_base", "infer_peak_mem_mb", base)):
            row[key] = ratio(row[metric], ref[metric]) if ref else math.nan


def write_results(results: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    """``<out>/<name or timestamp>.csv`` (one row per contender, :data:`COLUMNS`) and ``.json`` (everything)."""
    return bench_tables.write_results(results, out, COLUMNS)


def print_results(results: dict[str, Any], console: Any = None) -> None:
    """A rich table: times, memory, trainable parameters and the ratios against lora and the base model."""
    settings = results["settings"]
    title = (f"clbench bench · {settings['model']} · {results['device']} · {settings['precision']} · "
             f"batch {settings['batch_size']} · {settings['steps']} steps"
             + (f" · frozen weights {settings['frozen_dtype']}" if settings.get("frozen_dtype") else ""))
    caption = f"memory: {results['memory_kind']}; data: {results['data']}" + "".join(
        f"\n{row['method']}: {row['knobs']}" for row in results["rows"] if row.get("knobs"))
    heads = [("method", "method", None), ("trainable", "trainable_params", ",d"),
             ("train ms/step", "train_step_ms", ".1f"), ("× lora", "train_vs_lora", ".2f"),
             ("infer ms/ex", "infer_ms_per_example", ".1f"), ("× lora", "infer_vs_lora", ".2f"),
             ("× base", "infer_vs_base", ".2f"), ("train MiB", "train_peak_mem_mb", ".0f"),
             ("× lora", "train_mem_vs_lora", ".2f"), ("infer MiB", "infer_peak_mem_mb", ".0f"),
             ("× base", "infer_mem_vs_base", ".2f")]
    bench_tables.print_table(results["rows"], heads, title, caption, console)
