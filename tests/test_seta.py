"""SETA (our reading of Siddika et al., 2026; docs/methods/seta.md): Split-on-Share picks the most sensitive
sub-blocks, a task's unique sub-blocks never move again, elastic anchoring behaves, the unified gate keeps old tasks'
routing, adding a task changes nothing before it trains, growth is sublinear under a budget, and a crashed run
resumes to the same predictions with its gate/growth reports in the run folder."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import crash_in_begin_task, run_predictions, tiny_run
from torch.utils.data import DataLoader

from clbench.benchmark import Collator, Task, TaskSpec

# distinct prompt alphabets per task, so a gate on prompt embeddings can tell them apart (as TRACE's tasks differ)
_ALPHABETS = ["abc", "XYZ", "123", "qrs", "MNO"]


def _records(t: int, n: int, offset: int = 0) -> list[dict[str, str]]:
    a = _ALPHABETS[t]
    return [{"prompt": f"{a * 3} {a[::-1]} {i + offset} {a}", "answer": f"{a[0]}{i % 3}"} for i in range(n)]


def _tasks(n_tasks: int = 3, n_train: int = 16) -> list[Task]:
    return [Task(TaskSpec(f"T{t}", "accuracy"), train=_records(t, n_train), eval=[], test=_records(t, 4, 100))
            for t in range(n_tasks)]


def _method(num_tasks: int = 3, **knobs):
    from clbench.models import tiny_model
    from clbench.registry import get_method

    cls = get_method("seta")
    loaded = tiny_model()
    return cls(loaded.model, loaded.tokenizer, cls.default_config(knobs), num_tasks=num_tasks)


def _loader(method, task: Task) -> DataLoader:
    return DataLoader(task.train, batch_size=4, collate_fn=Collator(method.tokenizer, 64, 8, train=True))


def _prompts(method, records: list[dict[str, str]]) -> dict[str, torch.Tensor]:
    return Collator(method.tokenizer, 64, train=False)([{"prompt": r["prompt"]} for r in records])


def _train(method, t: int, task: Task, steps: int = 3) -> None:
    """begin_task, ``steps`` AdamW steps of LM loss + regularizer (the method's own optimiser), end_task."""
    method.begin_task(t, task)
    method.train()
    opt = method.configure_optimizers()
    done = 0
    while done < steps:
        for batch in _loader(method, task):
            out = method(batch)
            loss = out.loss + sum(method.regularizer(batch, out).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
            if done == steps:
                break
    method.end_task(t, task, train_loader=_loader(method, task))


def test_seta_is_a_registered_package():
    """If this fails, `--method seta` is unknown or still runs the old dense LoRA-MoE + EWC module."""
    from clbench.registry import get_method

    cls = get_method("seta")
    assert cls.__module__ == "clbench.methods.seta.method"
    assert {"num_blocks", "shared_blocks", "unique_blocks", "threshold"} <= set(cls.config_class.__dataclass_fields__)


def test_split_picks_the_most_sensitive_sub_blocks_from_hand_made_gradients():
    """If this fails, Split-on-Share gives a task the wrong sub-blocks: not its most sensitive free ones as unique,
    someone else's unique sub-block, or shared sub-blocks the task barely depends on."""
    from clbench.methods.seta.layer import FREE, SHARED, block_sensitivity, split_on_share

    M, d_in, d_out = 8, 3, 2
    magnitude = torch.tensor([0.1, 3.0, 0.2, 2.0, 0.5, 1.0, 0.3, 0.4])  # gradient size per sub-block
    grad_A = magnitude[:, None, None] * torch.ones(M, 1, d_in)
    grad_B = magnitude[:, None, None] * torch.ones(M, d_out, 1)
    s = block_sensitivity(grad_A.pow(2), grad_B.pow(2))
    torch.testing.assert_close(s, magnitude.pow(2) * (d_in + d_out))
    # first task: the 2 most sensitive become unique, the next 3 seed the shared expert
    first = split_on_share(s, torch.full((M,), FREE), unique_blocks=2, shared_blocks=3, threshold=1e-6)
    assert first.unique.nonzero().flatten().tolist() == [1, 3]
    assert first.new_shared.nonzero().flatten().tolist() == [4, 5, 7]
    assert not first.update.any()
    # a later task: sub-block 1 is task 0's (never taken again), 3, 4, 5 are shared; dynamic threshold = mean of s/max
    owner = torch.tensor([FREE, 0, FREE, SHARED, SHARED, SHARED, FREE, FREE])
    later = split_on_share(s, owner, unique_blocks=3, shared_blocks=3, threshold=None)
    free_scaled = torch.tensor([0.1, 0.2, 0.3, 0.4]).pow(2) / 0.16  # free sub-blocks 0, 2, 6, 7
    expected_unique = [i for i, v in zip([0, 2, 6, 7], free_scaled, strict=True) if v >= free_scaled.mean()]
    assert sorted(later.unique.nonzero().flatten().tolist()) == sorted(expected_unique) == [6, 7]
    assert later.update.nonzero().flatten().tolist() == [3]  # 2.0² vs 0.5², 1.0²: only 3 is above the mean
    assert not later.new_shared.any()
    fixed = split_on_share(s, owner, unique_blocks=1, shared_blocks=3, threshold=0.2)
    assert fixed.unique.nonzero().flatten().tolist() == [7]  # the cap: one, the most sensitive
    assert fixed.update.nonzero().flatten().tolist() == [3, 5]  # 1.0²/2.0² = 0.25 >= 0.2, 0.5²/2.0² < 0.2


def test_split_on_the_model_uses_the_measured_sensitivity():
    """If this fails, the split a real task gets does not follow the gradients measured on its own data."""
    method = _method(num_blocks=12, shared_blocks=3, unique_blocks=2, threshold=1e-6)
    task = _tasks(1)[0]
    method.begin_task(0, task)
    method.train()
    method(next(iter(_loader(method, task))))  # the first training forward splits
    for layer in method.seta_layers():
        s = layer.sensitivity[0]
        assert s.sum() > 0
        order = torch.sort(s, descending=True, stable=True).indices.tolist()
        assert (layer.owner == 0).nonzero().flatten().tolist() == sorted(order[:2])
        assert layer.trained_by[0].sum() == 5 and bool(layer.trainable[order[:5]].all())


def test_unique_sub_blocks_are_bitwise_unchanged_after_later_tasks():
    """If this fails, training a later task overwrites an earlier task's unique expert (through weight decay,
    momentum or the gradient), so its knowledge is not isolated."""
    tasks = _tasks()
    method = _method(weight_decay=0.1, lr=1e-2, num_blocks=16, shared_blocks=4, unique_blocks=3)
    _train(method, 0, tasks[0])
    layers = method.seta_layers()
    mine = [layer.owner == 0 for layer in layers]
    before = [(layer.A_store[m].clone(), layer.B_store[m].clone()) for layer, m in zip(layers, mine, strict=True)]
    shared = [layer.B_store[layer.owner == -2].clone() for layer in layers]
    assert all(m.any() for m in mine) and any(b.abs().sum() > 0 for _, b in before)  # task 0 trained its blocks
    for t in (1, 2):
        _train(method, t, tasks[t])
        for layer, m, (A0, B0) in zip(layers, mine, before, strict=True):
            assert bool((layer.owner[m] == 0).all())
            A, B = layer.effective()
            assert torch.equal(A[m], A0) and torch.equal(B[m], B0)
    assert any(not torch.equal(layer.B_store[layer.owner == -2], s) for layer, s in zip(layers, shared, strict=True))


def test_anchoring_is_zero_at_the_anchor_and_grows_with_drift_of_important_shared_weights():
    """If this fails, the anchoring term punishes the anchor itself, ignores importance, or charges sub-blocks that
    are not shared (the shared knowledge of earlier tasks would be held too loosely or the wrong weights held)."""
    tasks = _tasks(2)
    method = _method(num_blocks=12, shared_blocks=4, unique_blocks=2)
    _train(method, 0, tasks[0])
    layer = method.seta_layers()[0]
    shared = layer.owner == -2
    assert layer.omega_B[shared].sum() > 0 and layer.omega_A[~shared].abs().sum() == 0  # Ω only on shared
    method.begin_task(1, tasks[1])
    method.train()
    method(next(iter(_loader(method, tasks[1]))))  # split: some shared sub-blocks become trainable
    assert float(method.anchor_penalty().detach()) == 0.0
    updated = (layer.trainable & shared).nonzero().flatten().tolist()
    assert updated
    m = updated[0]
    with torch.no_grad():
        layer.omega_B.zero_()
        layer.omega_B[m, 0, 0] = 10.0  # important weight
        layer.omega_B[m, 1, 0] = 0.1  # unimportant weight
        layer.B[m, 1, 0] += 1.0
    small = float(method.anchor_penalty().detach())
    with torch.no_grad():
        layer.B[m, 0, 0] += 1.0
    large = float(method.anchor_penalty().detach())
    with torch.no_grad():
        layer.B[m, 0, 0] += 1.0
    larger = float(method.anchor_penalty().detach())
    assert small == pytest.approx(method.cfg.anchor_weight * 0.1)
    assert large == pytest.approx(method.cfg.anchor_weight * 10.1)
    assert larger == pytest.approx(method.cfg.anchor_weight * 40.1)
    own = (layer.owner == 1).nonzero().flatten().tolist()[0]
    with torch.no_grad():
        layer.B[own] += 1.0  # task 1's unique sub-block moves freely: Ω is 0 outside the shared expert
    assert float(method.anchor_penalty().detach()) == pytest.approx(larger)


DRIFT_TOLERANCE = 0.05  # L1 over all gate outputs, mean over held-out old-task prompts


def _close_records(t: int, n: int, offset: int = 0) -> list[dict[str, str]]:
    """Two tasks whose prompts differ only in their last word: a gate that is not held generalises across them."""
    tag = ["abc", "XYZ"][t]
    return [{"prompt": f"hello world question {i + offset} topic {tag}", "answer": f"{tag[0]}{i % 3}"}
            for i in range(n)]


def _gate_drift_of_task0(**knobs) -> tuple[float, float]:
    tasks = [Task(TaskSpec(f"T{t}", "accuracy"), train=_close_records(t, 16), eval=[], test=[]) for t in range(2)]
    method = _method(num_tasks=2, lr=1e-2, gate_lr=5e-2, **knobs)
    held_out = _prompts(method, _close_records(0, 8, offset=500))  # task-0 prompts never trained on or stored
    _train(method, 0, tasks[0], steps=30)
    with torch.no_grad():
        before = method.route(held_out)
    _train(method, 1, tasks[1], steps=30)
    with torch.no_grad():
        after = method.route(held_out)
        own = method.route(_prompts(method, _close_records(1, 8, offset=500)))[:, 2]
    assert torch.equal(before[:, 2], torch.zeros(8))  # task 1's output was closed before task 1
    return float((after - before).abs().sum(-1).mean()), float(own.mean())


def test_gate_routing_of_an_earlier_task_stays_within_tolerance_after_the_next_task():
    """If this fails, after learning task 1 the unified gate routes task 0's inputs differently (e.g. to task 1's
    expert): task-agnostic inference would forget task 0 through routing alone. Checked on prompts the gate never
    saw, and against the same run without the routing-aware term, which must drift (so the check can fail)."""
    drift, own = _gate_drift_of_task0()
    assert drift <= DRIFT_TOLERANCE
    assert own > 0.5  # not trivially kept by never opening task 1's output
    unprotected, _ = _gate_drift_of_task0(routing_weight=0.0)
    assert unprotected > 4 * DRIFT_TOLERANCE


def test_adding_a_task_changes_no_output_before_its_first_optimiser_step():
    """If this fails, merely starting a new task (opening its gate output, splitting its sub-blocks) already changes
    what the model answers on earlier tasks."""
    tasks = _tasks(2)
    method = _method(num_tasks=2)
    probe = _prompts(method, _records(0, 4, offset=300) + _records(1, 4, offset=300))
    method.eval()
    with torch.no_grad():
        base = method._lm(probe).logits
    _train(method, 0, tasks[0])
    method.eval()
    with torch.no_grad():
        after_0 = method._lm(probe).logits
    assert not torch.equal(after_0, base)  # task 0 changed the model (so the comparison below means something)
    method.begin_task(1, tasks[1])
    method.train()
    method(next(iter(_loader(method, tasks[1]))))  # the split, no optimiser step
    assert not method._pending_split
    method.eval()
    with torch.no_grad():
        started_1 = method._lm(probe).logits
    assert torch.equal(started_1, after_0)


def test_parameters_grow_sublinearly_when_the_budget_forces_sharing(tmp_path):
    """If this fails, SETA's parameter count grows by a full expert per task even when its budget is spent (tasks
    would not share), or param_growth.csv disagrees with the run's parameter report."""
    tasks = _tasks(4)
    method = _method(num_tasks=4, num_blocks=6, shared_blocks=2, unique_blocks=2, threshold=1e-6)
    added = []
    for t in range(4):
        _train(method, t, tasks[t], steps=2)
        added.append(method.param_report()["added"])
    steps = np.diff([0, *added])
    assert all(a >= b for a, b in zip(steps, steps[1:], strict=False)) and steps[2] < steps[1] < steps[0]
    gate_row = method.gate.weight.shape[1] + 1
    assert steps[2] == steps[3] == gate_row  # budget spent: only the new gate output is added
    method.write_artifacts(tmp_path)
    growth = pd.read_csv(tmp_path / "param_growth.csv")
    assert growth["cumulative_added_params"].tolist() == added
    assert growth["new_unique_blocks"].tolist()[2:] == [0, 0]
    assert (growth["independent_cumulative_params"] > growth["cumulative_added_params"]).iloc[1:].all()
    usage = pd.read_csv(tmp_path / "block_usage.csv")
    assert set(usage["role"]) == {"unique", "shared-new", "shared-update"} and (tmp_path / "block_usage.png").exists()


def test_seta_run_resumes_with_identical_predictions_and_reports_gate_drift(tmp_path, trace_dir, monkeypatch):
    """If this fails, a resumed SETA run loses its split, stores, Ω, θ* or gate memory and predicts differently
    from an uninterrupted run, or the run folder lacks the gate-drift matrix and growth files."""
    from clbench.harness import Harness

    def cfg(name: str):
        return tiny_run(tmp_path, trace_dir, method="seta", out=str(tmp_path / name), seed=3, zero_shot=False)

    full = Harness(cfg("full")).run()
    with crash_in_begin_task("seta", at=1), pytest.raises(KeyboardInterrupt):
        Harness(cfg("crash")).run()
    resumed = Harness(cfg("crash")).run()
    assert run_predictions(resumed) == run_predictions(full)
    final_full = torch.load(full / "state" / "after-2.pt", weights_only=True)
    final_resumed = torch.load(resumed / "state" / "after-2.pt", weights_only=True)
    assert final_full.keys() == final_resumed.keys()
    for key, value in final_full.items():
        assert torch.equal(value, final_resumed[key]), key
    drift = pd.read_csv(full / "gate_drift.csv", index_col=0)
    assert drift.loc["zero-shot"].isna().all()  # nothing learned yet: no routing to drift
    first, second = drift.iloc[1], drift.iloc[2]  # after task 1, after task 2
    assert first.iloc[0] == 0.0 and np.isnan(first.iloc[1]) and np.isfinite(second).all()
    assert (full / "gate_leak.csv").exists() and (full / "gate_own.csv").exists()
    assert (full / "param_growth.csv").exists() and (full / "block_usage.csv").exists()


def test_bad_knobs_are_refused():
    """If this fails, an impossible SETA budget or threshold runs silently instead of stopping with one line."""
    from clbench.config import ConfigError
    from clbench.registry import get_method

    cls = get_method("seta")
    with pytest.raises(ConfigError, match="shared_blocks \\+ unique_blocks"):
        cls.default_config({"num_blocks": 4, "shared_blocks": 3, "unique_blocks": 2})
    with pytest.raises(ConfigError, match="threshold"):
        cls.default_config({"threshold": 1.5})
    with pytest.raises(ConfigError, match="memory_size"):
        cls.default_config({"memory_size": 0})
