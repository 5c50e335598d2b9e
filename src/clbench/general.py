"""General-ability retention (TRACE's second half) through lm-evaluation-harness: suites, the served model, scores.

TRACE measures not only forgetting of its 8 tasks but the loss of general ability after continual training (MMLU,
GSM8K, BBH, TydiQA, BoolQ, PIQA). Here a *suite* is a list of lm-eval tasks, each with the metric whose change is its
general-ability delta and its few-shot count. ``--general`` names a suite (``general-mini``, bundled and offline;
``trace-general``, TRACE's six benchmarks) or a comma list of lm-eval task names.

The model lm-eval scores is the method *as it serves*: :meth:`clbench.method.CLMethod.served_lm` (routing, adapters,
key matching active, no task id). This module does no file I/O on results; the harness stores rows through
:class:`clbench.results.RunStore`. lm-eval is imported inside functions, so runs without ``--general`` never load it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from clbench.config import ConfigError

if TYPE_CHECKING:
    from clbench.method import CLMethod

GENERAL_MINI = "general-mini"
TRACE_GENERAL = "trace-general"
# lm-eval's own default seeds (simple_evaluate), fixed here so every stage of every run samples few-shot examples alike
SEEDS = {"random_seed": 0, "numpy_random_seed": 1234, "torch_random_seed": 1234, "fewshot_random_seed": 1234}


@dataclass(frozen=True)
class SuiteTask:
    """One benchmark of a suite: an lm-eval task, group or tag name and how it is scored.

    ``metric`` is the key in lm-eval's results (``"acc,none"``: metric, comma, filter) whose change is the benchmark's
    general-ability delta; a tag (which lm-eval does not aggregate) gets the unweighted mean over its tasks.
    ``num_fewshot`` None keeps the task's own YAML setting; ``source`` says where the setting comes from.
    """

    name: str
    metric: str
    num_fewshot: int | None = None
    source: str = ""


_MINI_SOURCE = "clbench general-mini YAML (demo suite, not a measurement)"
_TRACE_SOURCE = ("TRACE (Wang et al. 2023, arXiv 2310.06762; BeyonderXX/TRACE@462e39f README: 'We follow OpenCompass') "
                 "names the benchmark; shots/CoT are lm-eval's task defaults, NOT verified against TRACE's OpenCompass "
                 "configs (see docs/general.md)")

SUITES: dict[str, list[SuiteTask]] = {
    GENERAL_MINI: [
        SuiteTask("gmini_piqa", "acc,none", source=_MINI_SOURCE),
        SuiteTask("gmini_boolq", "acc,none", source=_MINI_SOURCE),
        SuiteTask("gmini_arith", "exact_match,number", source=_MINI_SOURCE),
        SuiteTask("gmini_tydiqa_de", "exact_match,strip", source=_MINI_SOURCE),
    ],
    TRACE_GENERAL: [
        SuiteTask("mmlu", "acc,none", 5, _TRACE_SOURCE),  # factual knowledge
        SuiteTask("gsm8k_cot", "exact_match,strict-match", 8, _TRACE_SOURCE),  # general reasoning, 8-shot CoT
        SuiteTask("bbh_cot_fewshot", "exact_match,get-answer", 3, _TRACE_SOURCE),  # general reasoning, 3-shot CoT
        SuiteTask("tydiqa_goldp", "exact_match,none", None, _TRACE_SOURCE),  # multilinguality (9 languages, a tag)
        SuiteTask("boolq", "acc,none", 0, _TRACE_SOURCE),  # reading comprehension
        SuiteTask("piqa", "acc,none", 0, _TRACE_SOURCE),  # commonsense reasoning
    ],
}


def resolve_suite(spec: str) -> list[SuiteTask]:
    """The tasks of ``--general SPEC``: a named suite, or a comma list of lm-eval names (their first metric)."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise ConfigError("--general needs a suite name (general-mini, trace-general) or lm-eval task names")
    out: list[SuiteTask] = []
    for name in names:
        out += SUITES.get(name, [SuiteTask(name, metric="")])  # "" = the first metric lm-eval reports
    return out


def mini_include_dir() -> Path:
    """general-mini's YAMLs with absolute data paths, in clbench's cache (lm-eval reads data paths from the cwd).

    The folder name is a digest of where the suite lives and of its shipped YAMLs and data, so an edited suite gets
    a fresh folder, a second clone (or a moved or deleted one) never reuses YAMLs that point into another checkout,
    and the same suite in the same place keeps one path (datasets caches the loaded JSON under it).
    """
    import yaml

    from clbench.benchmarks.general_mini import DATA_DIR, SUITE_DIR
    from clbench.models import cache_dir

    files = sorted(SUITE_DIR.glob("*.yaml")) + sorted(DATA_DIR.glob("*.json"))
    content = b"".join(p.name.encode() + p.read_bytes() for p in files)
    digest = hashlib.sha256(str(SUITE_DIR.resolve()).encode() + b"\0" + content).hexdigest()[:12]
    target = cache_dir() / "general-mini" / digest
    if target.is_dir():
        return target
    tmp = target.with_name(f".{digest}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    for path in sorted(SUITE_DIR.glob("*.yaml")):
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
        files_ = config["dataset_kwargs"]["data_files"]
        config["dataset_kwargs"]["data_files"] = {k: str(SUITE_DIR / v) for k, v in files_.items()}
        (tmp / path.name).write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
    try:
        tmp.rename(target)
    except OSError:  # another process made it first: same content
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _is_mini(tasks: list[SuiteTask]) -> bool:
    mini = {t.name for t in SUITES[GENERAL_MINI]}
    return all(t.name in mini or t.name == "general_mini" for t in tasks)


def task_manager(tasks: list[SuiteTask]) -> Any:
    """An lm-eval TaskManager that knows general-mini and (unless only general-mini is asked for) lm-eval's tasks;
    every name must be known to it, else a one-line ConfigError saying where task names come from."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(mini_include_dir()), include_defaults=not _is_mini(tasks))
    known = set(manager.all_tasks)
    for task in tasks:
        if task.name not in known:
            raise ConfigError(
                f"unknown lm-eval task '{task.name}' in --general; task names come from lm-eval's own tasks "
                f"(`lm_eval ls tasks`; they need the dataset in the HF cache or a hub connection), clbench's bundled "
                f"general-mini ({', '.join(t.name for t in SUITES[GENERAL_MINI])}), and the named suites "
                f"{', '.join(SUITES)}")
    return manager


def check_suite(spec: str) -> None:
    """Fail early (one-line ConfigError) when ``--general SPEC`` names a task lm-eval does not know."""
    task_manager(resolve_suite(spec))


class ServedLM(nn.Module):
    """A CLMethod seen as a Hugging Face causal LM, for lm-eval's HFLM: the default of ``CLMethod.served_lm``.

    ``forward(input_ids)`` is the method's own forward in eval mode (its task-agnostic routing: keys, prompts,
    routers; no task id), ``generate`` is the method's own greedy ``generate`` (the path R is scored with) with
    lm-eval's stopping criteria passed through. lm-eval right-pads loglikelihood batches without an attention mask;
    a method that pools over the input to route would then see the padding, which is why the harness evaluates with
    batch size 1 (see :func:`evaluate_general`).
    """

    def __init__(self, method: CLMethod, task_id: int | None = None):
        """``task_id``: given to every batch, for task-aware references that cannot answer without one (None: no
        task id, the task-agnostic serving every CL method is scored with)."""
        super().__init__()
        self.method = method
        self.config = method.model.config
        self.task_id = task_id

    def _batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **extra: Any) -> dict[str, Any]:
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, **extra}
        if self.task_id is not None:
            batch["task_id"] = torch.full((input_ids.shape[0],), self.task_id, dtype=torch.long,
                                          device=input_ids.device)
        return batch

    @property
    def device(self) -> torch.device:
        """Where the method's parameters are (HFLM puts its inputs there)."""
        return next(self.method.parameters()).device

    @property
    def name_or_path(self) -> str:
        """Recorded by lm-eval in its results."""
        return str(getattr(self.config, "_name_or_path", "") or self.method.name)

    def tie_weights(self) -> None:
        """HFLM calls this on every model it is given; the method's model is already tied as loaded."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """Logits of the method's served forward (an object with ``.logits``, as a HF model returns)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.method(self._batch(input_ids, attention_mask, labels=None))

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_length: int | None = None, max_new_tokens: int | None = None, stopping_criteria: Any = None,
                 do_sample: bool = False, **kwargs: Any) -> torch.Tensor:
        """Context + new tokens (as HF's generate returns them) from the method's greedy ``generate``."""
        if do_sample:
            raise ConfigError("a --general task asks for sampling; clbench scores methods with greedy generation only")
        new = max_new_tokens if max_new_tokens is not None else int(max_length) - input_ids.shape[1]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        tokens = self.method.generate(self._batch(input_ids, attention_mask, stopping_criteria=stopping_criteria), new)
        return torch.cat([input_ids, tokens.to(input_ids.device)], dim=1)


@dataclass
class GeneralResult:
    """One stage's scores: ``benchmarks`` (one value per suite task, the delta's basis), ``scores`` (every lm-eval
    task/metric as ``"task/metric"``, filter ``none`` left out, other filters as ``metric:filter``), seconds."""

    benchmarks: dict[str, float]
    scores: dict[str, float]
    seconds: float
    lm_eval_version: str = ""
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    # per benchmark, its per-example scores (see :func:`benchmark_examples`): the general delta's test-sample term
    examples: dict[str, dict[str, Any]] = field(default_factory=dict)


def column(task: str, key: str) -> str:
    """``("gsm8k", "exact_match,strict-match")`` -> ``"gsm8k/exact_match:strict-match"``; filter none dropped."""
    metric, _, filt = key.partition(",")
    return f"{task}/{metric}" if filt in ("", "none") else f"{task}/{metric}:{filt}"


def flatten(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """lm-eval's ``results["results"]`` as ``{"task/metric": value}`` (numbers only, standard errors left out)."""
    out: dict[str, float] = {}
    for task, entry in results.items():
        for key, value in entry.items():
            skip = "_stderr" in key or key in ("alias", "sample_len")  # not scores
            if skip or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            out[column(task, key)] = float(value)
    return out


def benchmark_value(task: SuiteTask, results: dict[str, dict[str, Any]]) -> tuple[str, float]:
    """The (metric key, value) that stands for ``task``: its own entry, else the mean over the entries lm-eval
    returned for it (a tag); ``metric`` "" means the first metric lm-eval reports."""
    def metrics_of(entry: dict[str, Any]) -> list[str]:
        return [k for k, v in entry.items() if "," in k and "_stderr" not in k and isinstance(v, (int, float))]

    own = results.get(task.name)
    key = task.metric or next(iter(metrics_of(own or next(iter(results.values()), {}))), "")
    if own is not None and key in own:
        return key, float(own[key])
    values = [float(e[key]) for e in results.values() if key in e and isinstance(e[key], (int, float))]
    if not values:
        raise ConfigError(f"lm-eval reported no '{key}' for '{task.name}' (it reported: "
                          f"{', '.join(sorted(flatten(results)))})")
    return key, float(np.mean(values))


def benchmark_examples(key: str, value: float, samples: dict[str, list[dict[str, Any]]]) -> dict[str, Any] | None:
    """Per-example scores behind ``value`` from lm-eval's logged samples: ``{"weighting": "pooled" | "mean",
    "units": {subtask: [score of each doc, by doc_id]}}``, or None when they cannot reproduce it.

    ``key`` is the benchmark's metric (``"acc,none"``: the samples of that filter, their ``acc``). A plain task is
    one unit. A group's value (MMLU) is the size-weighted mean of its subtasks, i.e. the mean over the pooled examples
    ("pooled"); a tag's (TydiQA) is the unweighted mean of its subtasks' means ("mean"). Whichever reproduces
    ``value`` to 1e-6 is kept; a metric that is not a mean of per-example scores (corpus BLEU, F1) reproduces neither,
    and the interval then leaves the general delta's test sampling out and says so.
    """
    metric, _, filt = key.partition(",")
    units: dict[str, list[float]] = {}
    for name, records in samples.items():
        chosen = sorted((r for r in records if r.get("filter", "none") == (filt or "none")), key=lambda r: r["doc_id"])
        scores = [r.get(metric) for r in chosen]
        if not scores or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in scores):
            return None
        units[name] = [float(x) for x in scores]
    if not units:
        return None
    for weighting in ("pooled", "mean"):
        if abs(examples_value({"weighting": weighting, "units": units}) - value) <= 1e-6:
            return {"weighting": weighting, "units": units}
    return None


def examples_value(entry: dict[str, Any]) -> float:
    """The benchmark value :func:`benchmark_examples`' entry stands for (pooled or unweighted mean of unit means)."""
    units = [np.asarray(u, dtype=float) for u in entry["units"].values()]
    if entry["weighting"] == "pooled":
        return float(np.concatenate(units).mean())
    return float(np.mean([u.mean() for u in units]))


def unit_weights(entry: dict[str, Any]) -> dict[str, float]:
    """Each unit's share of its benchmark's value: n_u / Σ n (pooled) or 1 / U (mean of unit means)."""
    sizes = {name: len(u) for name, u in entry["units"].items()}
    if entry["weighting"] == "pooled":
        return {name: n / sum(sizes.values()) for name, n in sizes.items()}
    return {name: 1 / len(sizes) for name in sizes}


# lm-eval's modules that draw progress bars: the per-task request building (api.task) has no switch at all, and the
# HF model's bars are on unless a request method is called with disable_tqdm=True, which simple_evaluate never does
_TQDM_MODULES = ("lm_eval.api.task", "lm_eval.api.model", "lm_eval.models.huggingface")


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Any:
    """lm-eval's tqdm bars as ``--progress`` / ``--no-progress`` asks: with ``enabled`` False every bar those modules
    create is built with ``disable=True`` (a patch of their ``tqdm`` name, because lm-eval offers no option)."""
    if enabled:
        yield
        return
    import importlib
    from unittest import mock

    from tqdm import tqdm

    def quiet(*args: Any, **kwargs: Any) -> Any:
        return tqdm(*args, **{**kwargs, "disable": True})

    with contextlib.ExitStack() as stack:
        for name in _TQDM_MODULES:
            stack.enter_context(mock.patch.object(importlib.import_module(name), "tqdm", quiet))
        yield


@contextlib.contextmanager
def _preserved_rng() -> Any:
    """simple_evaluate seeds python, numpy and torch globally; the run's own random streams must not notice."""
    py, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(np_state)


def evaluate_general(method: CLMethod, tokenizer: Any, spec: str, batch_size: int = 1,
                     limit: int | float | None = None, progress: bool = True) -> GeneralResult:
    """Score ``method.served_lm()`` on suite ``spec`` with lm-eval (one ``simple_evaluate`` per suite task, so each
    has its own few-shot count and every result entry is known to belong to it). General-mini runs offline.

    ``batch_size`` 1 keeps every score independent of which requests share a batch (see :class:`ServedLM`);
    ``progress`` False hides lm-eval's progress bars (``--no-progress``).
    """
    tasks = resolve_suite(spec)
    if _is_mini(tasks):
        os.environ["HF_DATASETS_OFFLINE"] = "1"  # local JSON only: never ask the hub
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    manager = task_manager(tasks)
    started = time.perf_counter()
    served = method.served_lm()
    was_training = method.training
    quiet = [logging.getLogger(n) for n in ("lm_eval", "lm-eval", "datasets")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)
    benchmarks: dict[str, float] = {}
    scores: dict[str, float] = {}
    settings: dict[str, dict[str, Any]] = {}
    examples: dict[str, dict[str, Any]] = {}
    try:
        with _preserved_rng(), _progress_bars(progress):
            lm = HFLM(pretrained=served, tokenizer=tokenizer, batch_size=batch_size, backend="causal")
            for task in tasks:
                out = lm_eval.simple_evaluate(model=lm, tasks=[task.name], num_fewshot=task.num_fewshot,
                                              task_manager=manager, limit=limit, bootstrap_iters=0,
                                              log_samples=True, **SEEDS)
                results = out["results"]
                key, value = benchmark_value(task, results)
                benchmarks[task.name] = value
                if (entry := benchmark_examples(key, value, out.get("samples") or {})) is not None:
                    examples[task.name] = entry
                scores.update(flatten(results))
                scores.setdefault(column(task.name, key), value)  # a tag's mean gets a column of its own
                settings[task.name] = {"metric": key, "num_fewshot": task.num_fewshot, "source": task.source,
                                       "n_shot": out.get("n-shot", {})}
    finally:
        for q, level in zip(quiet, levels, strict=True):
            q.setLevel(level)
        method.train(was_training)
    return GeneralResult(benchmarks, scores, time.perf_counter() - started,
                         getattr(lm_eval, "__version__", ""), settings, examples)


def general_summary(rows: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """metrics.json's ``general`` from stored rows (stage 0 = before the first task, the highest stage = after the
    last one): per-benchmark before/after/delta and the mean delta (NaN when a stage is missing)."""
    if not rows:
        return {}
    first, last = rows.get(0), rows[max(rows)]
    names = list((first or last)["benchmarks"])
    before = {n: first["benchmarks"].get(n, math.nan) for n in names} if first else dict.fromkeys(names, math.nan)
    after = {n: last["benchmarks"].get(n, math.nan) for n in names} if max(rows) > 0 else dict.fromkeys(names, math.nan)
    delta = {n: after[n] - before[n] for n in names}
    return {"benchmarks": names, "before": before, "after": after, "delta": delta,
            "delta_mean": float(np.mean(list(delta.values()))) if delta else math.nan,
            "stages": [rows[s]["label"] for s in sorted(rows)],
            "seconds": float(sum(r.get("seconds", 0.0) for r in rows.values()))}
