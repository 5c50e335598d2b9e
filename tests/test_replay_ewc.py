"""Replay mixes the configured share of earlier tasks' TRAINING data (never test data); EWC's penalty and Fisher are
right and survive a resume."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from conftest import tiny_run
from torch.utils.data import DataLoader

from clbench.benchmark import Collator, Task, TaskSpec


def _tasks(n_tasks: int = 3, n_train: int = 20) -> list[Task]:
    def split(t: int, name: str, n: int) -> list[dict[str, str]]:
        return [{"prompt": f"task{t} {name} {i}: 1 + {i} =", "answer": str(1 + i)} for i in range(n)]

    return [Task(TaskSpec(f"T{t}", "accuracy"), train=split(t, "train", n_train), eval=split(t, "eval", 5),
                 test=split(t, "test", 5)) for t in range(n_tasks)]


def _method(name: str, num_tasks: int = 3, **knobs):
    from clbench.models import tiny_model
    from clbench.registry import get_method

    cls = get_method(name)
    loaded = tiny_model()
    return cls(loaded.model, loaded.tokenizer, cls.default_config(knobs), num_tasks=num_tasks)


# ---- replay ---------------------------------------------------------------------------------------------------------
def test_replay_mixes_the_configured_fraction_of_earlier_training_data_only():
    """If this fails, replay trains on the wrong amount of old data, on test/eval data (a leak that inflates scores),
    or draws a different memory at every stage (not a replay buffer)."""
    tasks = _tasks(n_tasks=3, n_train=20)
    method = _method("replay", replay_fraction=0.25, replay_seed=7)
    assert method.train_examples(0, tasks) == tasks[0].train
    mixed = method.train_examples(2, tasks)
    origin = Counter(r["prompt"].split()[0] for r in mixed)
    assert origin == {"task2": 20, "task0": 5, "task1": 5}  # all of task 2, 25% of each earlier task
    assert all(" train " in r["prompt"] for r in mixed)  # never an eval or test record, of any task
    train_prompts = {r["prompt"] for t in tasks for r in t.train}
    assert all(r["prompt"] in train_prompts for r in mixed)
    stage1 = [r for r in method.train_examples(1, tasks) if r["prompt"].startswith("task0")]
    assert stage1 == [r for r in mixed if r["prompt"].startswith("task0")]  # the same memory at every later stage
    other = _method("replay", replay_fraction=0.25, replay_seed=8).train_examples(2, tasks)
    assert {r["prompt"] for r in other} != {r["prompt"] for r in mixed}  # the seed matters


def test_replay_keeps_at_least_one_record_and_rejects_bad_fractions():
    """If this fails, a small task is never replayed, or a typo like replay_fraction=10 runs silently."""
    from clbench.config import ConfigError
    from clbench.registry import get_method

    method = _method("replay", replay_fraction=0.01)
    assert method.memory_size(20) == 1 and method.memory_size(1000) == 10
    assert _method("replay", replay_fraction=0.0).train_examples(1, _tasks()) == _tasks()[1].train
    with pytest.raises(ConfigError, match="replay_fraction"):
        get_method("replay").default_config({"replay_fraction": 10})


# ---- EWC ------------------------------------------------------------------------------------------------------------
def _loader(method, task: Task, batch_size: int = 4) -> DataLoader:
    return DataLoader(task.train, batch_size=batch_size, collate_fn=Collator(method.tokenizer, 64, 8, train=True))


def test_ewc_penalty_is_zero_at_the_anchor_and_grows_away_from_it():
    """If this fails, EWC either pulls parameters that sit exactly at the old optimum or does not protect them."""
    tasks = _tasks(n_tasks=2, n_train=8)
    method = _method("ewc", num_tasks=2, ewc_lambda=2.0, fisher_max_batches=2)
    method.begin_task(0, tasks[0])
    assert method.regularizer({}, None) == {}  # nothing to protect during the first task
    method.end_task(0, tasks[0], train_loader=_loader(method, tasks[0]))
    fisher = method.fisher()
    assert all((f >= 0).all() for f in fisher.values())
    assert sum(f.sum() for f in fisher.values()) > 0
    assert int(method.ewc_tasks_done) == 1
    method.begin_task(1, tasks[1])
    assert method.regularizer({}, None)["ewc"].item() == 0.0  # at the anchor
    params = dict(method.model.named_parameters())
    with torch.no_grad():
        for name in method.ewc_names:
            params[name].add_(0.1)
    expected = 0.5 * 2.0 * sum((fisher[n] * 0.1**2).sum() for n in method.ewc_names)
    penalty = method.regularizer({}, None)["ewc"]
    assert penalty.item() > 0 and penalty.item() == pytest.approx(expected.item(), rel=1e-3)
    penalty.backward()
    assert any(params[n].grad is not None and params[n].grad.abs().sum() > 0 for n in method.ewc_names)


def test_ewc_fisher_accumulates_as_a_sum_over_tasks():
    """If this fails, EWC forgets the importance of the first task when the second one ends (fisher_decay=1: sum)."""
    tasks = _tasks(n_tasks=2, n_train=8)
    method = _method("ewc", num_tasks=2, fisher_max_batches=1)
    method.begin_task(0, tasks[0])
    method.end_task(0, tasks[0], train_loader=_loader(method, tasks[0]))
    first = {n: f.clone() for n, f in method.fisher().items()}
    method.begin_task(1, tasks[1])
    new = method.estimate_fisher(_loader(method, tasks[1]))
    method.end_task(1, tasks[1], train_loader=_loader(method, tasks[1]))
    for n, f in method.fisher().items():
        torch.testing.assert_close(f, first[n] + new[n])


def test_ewc_state_survives_a_resume(tmp_path, trace_dir):
    """If this fails, a resumed EWC run trains the next task with no penalty (Fisher and anchor lost in the crash)."""
    from clbench.harness import Harness

    run_dir = Harness(tiny_run(tmp_path, trace_dir, method="ewc")).run()
    state = torch.load(run_dir / "state" / "after-2.pt", weights_only=True)
    assert any(k.startswith("ewc_fisher.") for k in state) and any(k.startswith("ewc_anchor.") for k in state)
    resumed = _method("ewc", num_tasks=2)
    resumed.begin_task(0, None)
    resumed.begin_task(1, None)
    resumed.load_checkpoint_state(state)
    assert int(resumed.ewc_tasks_done) == 2
    for name, value in resumed.fisher().items():
        assert torch.equal(value, state[f"ewc_fisher.{name.replace('.', '__')}"])
    assert sum(v.sum() for v in resumed.fisher().values()) > 0
    assert resumed.regularizer({}, None)["ewc"].item() == 0.0  # loaded parameters sit at the loaded anchor
