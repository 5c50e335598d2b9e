"""Tasks, benchmarks, the TRACE-layout JSON loader and collation (prompt/answer -> input ids and labels).

TRACE's layout: ``<root>/<Task>/{train,eval,test}.json``, each a JSON list of ``{"prompt": str, "answer": str}``.
Every benchmark in the suite (the bundled trace-mini and TRACE itself) is read by :func:`load_trace_layout`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SPLITS = ("train", "eval", "test")
IGNORE_INDEX = -100


class DataError(ValueError):
    """Missing or malformed benchmark data; the message names the file and, where it applies, the record index."""


@dataclass(frozen=True)
class TaskSpec:
    """How one task is trained and scored: scorer name, epochs and generation length (TRACE's per-task settings)."""

    name: str
    metric: str
    epochs: int = 1
    max_new_tokens: int = 16


@dataclass
class Task:
    """A task's data and settings; ``train``/``eval``/``test`` are lists of {"prompt", "answer"} records."""

    spec: TaskSpec
    train: list[dict[str, str]]
    eval: list[dict[str, str]]
    test: list[dict[str, str]]

    @property
    def name(self) -> str:
        """The task's name, e.g. ``C-STANCE``."""
        return self.spec.name


@dataclass
class Benchmark:
    """A named benchmark: its tasks, its task orders and the settings the harness uses by default."""

    name: str
    tasks: dict[str, Task]
    orders: dict[int, list[str]]
    data_dir: str
    max_prompt_len: int = 1024
    max_answer_len: int = 512
    notes: dict[str, Any] = field(default_factory=dict)

    def ordered(self, order: int) -> list[Task]:
        """The tasks in task order ``order`` (1-based, as TRACE numbers them)."""
        if order not in self.orders:
            raise DataError(f"benchmark '{self.name}' has no order {order}; it has orders {sorted(self.orders)}")
        return [self.tasks[name] for name in self.orders[order]]

    def manifest(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Per task and split: record count and a content hash, so runs on different data are never mixed up."""
        return {name: {split: _split_manifest(getattr(task, split)) for split in SPLITS}
                for name, task in self.tasks.items()}


def _split_manifest(records: list[dict[str, str]]) -> dict[str, Any]:
    digest = hashlib.sha256(json.dumps(records, ensure_ascii=False, sort_keys=True).encode()).hexdigest()
    return {"n": len(records), "sha256": digest[:16]}


def manifest_digest(manifest: dict[str, Any]) -> str:
    """One short hash of a whole data manifest (the leaderboard groups runs by it)."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:12]


def read_split(path: Path, limit: int | None = None) -> list[dict[str, str]]:
    """Read one TRACE-layout JSON file, checking every record; ``limit`` keeps the first N records."""
    if not path.is_file():
        raise DataError(f"missing data file: {path}")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from None
    if not isinstance(records, list):
        kind = type(records).__name__
        raise DataError(f"{path}: expected a JSON list of {{\"prompt\", \"answer\"}} records, got {kind}")
    if not records:
        raise DataError(f"{path}: the task has no records")
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise DataError(f"{path}: record {i} is not an object")
        for key in ("prompt", "answer"):
            if key not in rec:
                raise DataError(f"{path}: record {i} has no \"{key}\"")
            if not isinstance(rec[key], str):
                raise DataError(f"{path}: record {i} \"{key}\" is not a string")
    records = [{"prompt": r["prompt"], "answer": r["answer"]} for r in records]
    return records[:limit] if limit else records


def load_trace_layout(
    root: str | Path,
    specs: list[TaskSpec],
    limit_train: int | None = None,
    limit_eval: int | None = None,
    limit_test: int | None = None,
) -> dict[str, Task]:
    """Load ``root/<Task>/{train,eval,test}.json`` for each spec, in TRACE's layout."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data directory not found: {root}")
    limits = {"train": limit_train, "eval": limit_eval, "test": limit_test}
    tasks = {}
    for spec in specs:
        folder = root / spec.name
        if not folder.is_dir():
            raise DataError(f"task folder missing: {folder} (expected {root}/<Task>/{{train,eval,test}}.json)")
        splits = {split: read_split(folder / f"{split}.json", limits[split]) for split in SPLITS}
        tasks[spec.name] = Task(spec=spec, **splits)
    return tasks


class Collator:
    """Tokenise {"prompt","answer"} records for training or generation.

    Training (TRACE's collation): ``BOS + prompt + answer + EOS``, labels only on ``answer + EOS`` (prompt positions are
    -100), right-padded. Generation: ``BOS + prompt``, left-padded so every row ends where generation starts. Prompts
    longer than ``max_prompt_len`` keep their last tokens (the answer cue sits at the end), answers keep their first
    ``max_answer_len`` tokens.
    """

    def __init__(self, tokenizer: Any, max_prompt_len: int = 1024, max_answer_len: int = 512, train: bool = True):
        self.tokenizer = tokenizer
        self.max_prompt_len = max_prompt_len
        self.max_answer_len = max_answer_len
        self.train = train
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.eos = [tokenizer.eos_token_id]

    def _prompt_ids(self, prompt: str) -> list[int]:
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return self.bos + ids[-self.max_prompt_len :]

    def __call__(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        """Collate a list of records (which may carry ``index`` and ``task_id``) into a padded batch."""
        prompts = [self._prompt_ids(r["prompt"]) for r in records]
        batch: dict[str, Any] = {}
        if self.train:
            seqs, labels = [], []
            for p, r in zip(prompts, records, strict=True):
                ans = self.tokenizer(r["answer"], add_special_tokens=False)["input_ids"][: self.max_answer_len]
                seqs.append(p + ans + self.eos)
                labels.append([IGNORE_INDEX] * len(p) + ans + self.eos)
            width = max(len(s) for s in seqs)
            batch["input_ids"] = torch.tensor([s + [self.pad_id] * (width - len(s)) for s in seqs])
            batch["labels"] = torch.tensor([lab + [IGNORE_INDEX] * (width - len(lab)) for lab in labels])
            batch["attention_mask"] = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        else:
            width = max(len(p) for p in prompts)
            batch["input_ids"] = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts])
            batch["attention_mask"] = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        # the prompt span of each row (query features for task-agnostic routing use it)
        batch["prompt_mask"] = _prompt_mask(prompts, width, left=not self.train)
        for key in ("index", "task_id"):
            if all(key in r for r in records):
                batch[key] = torch.tensor([r[key] for r in records])
        return batch


def _prompt_mask(prompts: list[list[int]], width: int, left: bool) -> torch.Tensor:
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        if left:
            mask[i, width - len(p) :] = 1
        else:
            mask[i, : len(p)] = 1
    return mask
