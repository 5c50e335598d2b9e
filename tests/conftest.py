"""Shared fixtures: a TRACE-layout data folder with the 8 real task names, and fast tiny-model run settings."""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

TASKS = ["C-STANCE", "FOMC", "MeetingBank", "Py150", "ScienceQA", "NumGLUE-cm", "NumGLUE-ds", "20Minuten"]


def make_trace_layout(root: Path, n_train: int = 12, n_eval: int = 4, n_test: int = 4, seed: int = 0) -> Path:
    """Write ``root/<Task>/{train,eval,test}.json`` with short synthetic records for all 8 TRACE tasks."""
    rng = random.Random(seed)
    for task in TASKS:
        for split, n in (("train", n_train), ("eval", n_eval), ("test", n_test)):
            records = []
            for i in range(n):
                a, b = rng.randint(1, 9), rng.randint(1, 9)
                answer = {"C-STANCE": "ABC"[i % 3], "FOMC": "ABC"[(i + 1) % 3], "ScienceQA": "ABCD"[i % 4],
                          "NumGLUE-cm": str(a + b), "NumGLUE-ds": str(a * b)}.get(task, f"say {a} and {b}")
                records.append({"prompt": f"{task} {split} {i}: {a} ? {b} =", "answer": answer})
            folder = root / task
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{split}.json").write_text(json.dumps(records))
    return root


@pytest.fixture
def trace_dir(tmp_path: Path) -> Path:
    """A small TRACE-layout folder with TRACE's 8 task names."""
    return make_trace_layout(tmp_path / "data")


def tiny_run(tmp_path: Path, data_dir: Path, **overrides):
    """RunConfig for a 2-task run of the tiny random model that takes seconds."""
    from clbench.harness import RunConfig

    values = dict(method="lora", benchmark="trace-mini", data_dir=str(data_dir), model="tiny", num_tasks=2,
                  max_steps_per_task=3, batch_size=4, eval_batch_size=4, precision="32-true", progress=False,
                  max_new_tokens=4, out=str(tmp_path / "run"))
    values.update(overrides)
    return RunConfig(**values)


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m clbench.cli ARGS`` in a fresh process with one thread and no inherited torch.distributed variables
    (a launcher's RANK/WORLD_SIZE leaking in would make a single-process run wait for peers)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    for var in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return subprocess.run([sys.executable, "-m", "clbench.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def run_predictions(run_dir: Path) -> dict[str, list[str]]:
    """Every predictions file of a run folder, ``{"after-N/Task.json": [prediction, ...]}``."""
    return {str(p.relative_to(run_dir / "predictions")): [r["prediction"] for r in json.loads(p.read_text())]
            for p in sorted((run_dir / "predictions").rglob("*.json"))}


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tiny-model ops are dominated by thread start-up: one thread is ~30x faster on a busy 2-core machine."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@contextlib.contextmanager
def crash_in_begin_task(method: str, at: int) -> Iterator[None]:
    """Inside the block, method ``method``'s public ``begin_task`` raises KeyboardInterrupt at task ``at`` (a Ctrl-C
    or a kill mid-run, where a user's crash would land); the class is restored on exit."""
    from clbench.registry import get_method

    cls = get_method(method)
    original = cls.begin_task

    def crash(self, t, task):
        if t == at:
            raise KeyboardInterrupt
        return original(self, t, task)

    cls.begin_task = crash
    try:
        yield
    finally:
        cls.begin_task = original


def fit_task(method, t: int, task, steps: int = 3) -> None:
    """begin_task / a Lightning fit of ``steps`` steps / finish_task (end_task + dropping gradients) on ``task``'s
    training split, as the harness does."""
    import warnings

    import lightning as L
    from torch.utils.data import DataLoader

    from clbench.benchmark import Collator

    method.begin_task(t, task)
    loader = DataLoader(task.train, batch_size=4, collate_fn=Collator(method.tokenizer, 64, 16, train=True))
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_model_summary=False, enable_progress_bar=False, precision="32-true")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(method, loader)
    method.finish_task(t, task, train_loader=loader)
