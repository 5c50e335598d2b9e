"""SETA (our reading of Siddika et al., 2026): a task's unique expert is frozen for good, the unified gate only routes
to experts of learned tasks, the anchoring and routing terms behave, parameters are counted honestly, and a crashed
run resumes to the same numbers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_run
from torch.utils.data import DataLoader

from clbench.benchmark import Collator, Task, TaskSpec


def _tasks(n_tasks: int = 3, n_train: int = 8) -> list[Task]:
    def split(t: int, name: str, n: int) -> list[dict[str, str]]:
        return [{"prompt": f"task{t} {name} {i}: {t} + {i} =", "answer": str(t + i)} for i in range(n)]

    return [Task(TaskSpec(f"T{t}", "accuracy"), train=split(t, "train", n_train), eval=split(t, "eval", 2),
                 test=split(t, "test", 2)) for t in range(n_tasks)]


def _method(num_tasks: int = 3, **knobs):
    from clbench.models import tiny_model
    from clbench.registry import get_method

    cls = get_method("seta")
    loaded = tiny_model()
    return cls(loaded.model, loaded.tokenizer, cls.config_class(**knobs), num_tasks=num_tasks)


def _loader(method, task: Task) -> DataLoader:
    return DataLoader(task.train, batch_size=4, collate_fn=Collator(method.tokenizer, 64, 8, train=True))


def _train(method, t: int, task: Task, steps: int = 3) -> None:
    """begin_task, a few AdamW steps of LM loss + regularizer (the method's own optimiser), end_task."""
    method.begin_task(t, task)
    method.train()
    opt = method.configure_optimizers()
    batches = iter(_loader(method, task))
    for _ in range(steps):
        batch = next(batches, None) or next(iter(_loader(method, task)))
        out = method(batch)
        loss = out.loss + sum(method.regularizer(batch, out).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    method.end_task(t, task, train_loader=_loader(method, task))


def test_unique_expert_is_bitwise_unchanged_after_later_tasks():
    """If this fails, training a later task overwrites an earlier task's unique expert (its knowledge is not isolated),
    e.g. through weight decay or momentum, or a future task's expert is touched before its task."""
    tasks = _tasks()
    method = _method(weight_decay=0.1, lr=1e-2)
    _train(method, 0, tasks[0])
    layers = method.seta_layers()
    first = [(layer.unique_A[0].detach().clone(), layer.unique_B[0].detach().clone()) for layer in layers]
    future = [layer.unique_A[2].detach().clone() for layer in layers]
    shared = [layer.A.detach().clone() for layer in layers]
    assert any(layer.unique_B[0].abs().sum() > 0 for layer in layers)  # task 0 did train its expert
    _train(method, 1, tasks[1])
    assert all(torch.equal(layer.unique_A[2], f) for layer, f in zip(layers, future, strict=True))
    _train(method, 2, tasks[2])
    for layer, (A0, B0) in zip(layers, first, strict=True):
        assert torch.equal(layer.unique_A[0], A0) and torch.equal(layer.unique_B[0], B0)
        assert not layer.unique_A[0].requires_grad
    assert any(not torch.equal(layer.A, s) for layer, s in zip(layers, shared, strict=True))  # shared ones move


def test_gate_routes_only_to_experts_of_learned_tasks():
    """If this fails, the model routes tokens to untrained experts of future tasks (task-agnostic inference would use
    random adapters), or zero-shot evaluation is not the base model."""
    method = _method(num_tasks=3, num_shared=2)
    gate = method.seta_layers()[0].router
    x = torch.randn(2, 5, gate.weight.shape[1])
    with torch.no_grad():
        gate.weight.normal_()
    _, g = gate(x)  # before any task: only the shared experts
    torch.testing.assert_close(g.sum(-1), torch.ones(2, 5))
    assert torch.equal(g[..., :3], torch.zeros(2, 5, 3)) and (g[..., 3:] > 0).all()
    method.begin_task(1, None)  # training task 1 (and testing after it): unique 0, 1 and the shared experts
    _, g = gate(x)
    assert torch.equal(g[..., 2], torch.zeros(2, 5)) and (g[..., [0, 1, 3, 4]] > 0).all()
    torch.testing.assert_close(g.sum(-1), torch.ones(2, 5))


def test_anchoring_is_zero_at_the_anchor_and_grows_only_with_drift_of_important_weights():
    """If this fails, SETA pulls shared weights that sit at the old optimum, fails to protect important shared
    weights, or penalises weights the earlier tasks never cared about."""
    tasks = _tasks(n_tasks=2)
    method = _method(num_tasks=2, anchor_weight=3.0, routing_weight=0.0)
    method.begin_task(0, tasks[0])
    assert method.regularizer({}, None)["anchor"].item() == 0.0  # nothing to protect in the first task
    method.end_task(0, tasks[0], train_loader=_loader(method, tasks[0]))
    layers = method.seta_layers()
    omegas = [o for layer in layers for _, o, _ in layer.shared_params()]
    assert all((o >= 0).all() for o in omegas) and sum(o.sum() for o in omegas) > 0
    method.begin_task(1, tasks[1])
    assert method.regularizer({}, None)["anchor"].item() == 0.0  # at the anchor

    layer = layers[0]
    with torch.no_grad():  # a controlled Ω: one important entry, one unimportant one
        layer.omega_A.zero_()
        layer.omega_A[0, 0, 0] = 2.0
        for other in layers[1:]:
            for _, omega, _ in other.shared_params():
                omega.zero_()
        layer.omega_B.zero_()
        layer.A[0, 0, 1] += 5.0  # Ω = 0 there: free to move
    assert method.anchor_penalty().item() == 0.0
    penalties = []
    for drift in (0.1, 0.2):
        with torch.no_grad():
            layer.A[0, 0, 0] = layer.anchor_A[0, 0, 0] + drift
        penalties.append(method.anchor_penalty().item())
    assert penalties == pytest.approx([3.0 * 2.0 * 0.1**2, 3.0 * 2.0 * 0.2**2], rel=1e-4)
    method.anchor_penalty().backward()
    assert layer.A.grad[0, 0, 0] > 0 and layer.A.grad[0, 0, 1] == 0


def _after_first_task(support: str):
    """A method that finished task 0 with a non-trivial gate and is now training task 1, plus a batch."""
    tasks = _tasks(n_tasks=2)
    method = _method(num_tasks=2, anchor_weight=0.0, routing_weight=1.0, routing_kl_support=support)
    batch = next(iter(_loader(method, tasks[0])))
    method.begin_task(0, tasks[0])
    method.train()
    assert method.regularizer(batch, method(batch))["routing"].item() == 0.0  # task 0: no snapshot yet
    with torch.no_grad():
        for layer in method.seta_layers():
            layer.router.weight.normal_(std=0.5)  # a gate task 0 "learned"
            layer.router.weight[1].zero_()  # task 1's row as it was never used
    method.end_task(0, tasks[0], train_loader=None)  # λ_a = 0: no importance pass, the loader is not needed
    method.begin_task(1, tasks[1])
    method.train()
    return method, batch


def test_routing_term_is_zero_for_an_unchanged_gate_and_positive_after_it_moved():
    """If this fails, the routing-aware term either penalises a gate that still routes like after the last task, or
    lets the gate drift freely (old tasks' inputs would be routed elsewhere)."""
    method, batch = _after_first_task("old")
    assert method.regularizer(batch, method(batch))["routing"].item() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():  # the new task's unique expert takes mass: the old experts' relative routing is the same
        for layer in method.seta_layers():
            layer.router.weight[1].normal_(std=2.0)
    assert method.regularizer(batch, method(batch))["routing"].item() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():  # an old expert's row moves: routing among the old experts changes
        for layer in method.seta_layers():
            layer.router.weight[0] += 0.3 * torch.randn_like(layer.router.weight[0])
    moved = method.regularizer(batch, method(batch))["routing"]
    assert moved.item() > 1e-4
    moved.backward()
    grad = method.seta_layers()[0].router.weight.grad
    assert grad[0].abs().sum() > 0 and grad[1].abs().sum() == 0  # support "old": the new row is not pulled


def test_routing_term_with_support_all_also_counts_mass_taken_by_the_new_expert():
    """If this fails, routing_kl_support=all does not penalise the gate for moving old inputs to the new expert."""
    method, batch = _after_first_task("all")
    unchanged = method.regularizer(batch, method(batch))["routing"]
    # the gate's weights are the snapshot's, but the new expert (logit 0) now takes a share of every token
    assert unchanged.item() > 1e-3
    unchanged.backward()
    assert method.seta_layers()[0].router.weight.grad[1].abs().sum() > 0


def test_param_report_counts_only_experts_of_tasks_begun():
    """If this fails, the growth curve counts pre-allocated experts of future tasks (SETA looks T times bigger than it
    is after task 1) or misses the shared experts and the gate."""
    method = _method(num_tasks=3, num_shared=2, rank=4)
    # tiny model: 4 layers; q 64->64 (expert 4*(64+64)), v 64->32 (expert 4*(64+32)); gate rows of width 64
    q, v = 4 * (64 + 64), 4 * (64 + 32)

    def expected(n: int) -> int:
        return 4 * ((n + 2) * (q + v) + 2 * (n + 2) * 64)

    assert method.param_report()["added"] == expected(0)
    method.begin_task(0, None)
    report = method.param_report()
    assert report["added"] == report["trainable"] == expected(1) and report["frozen"] == 0
    method.begin_task(1, None)
    report = method.param_report()
    assert report["added"] == expected(2) and report["frozen"] == 4 * (q + v)
    assert report["total"] == method.base_param_count + report["added"]
    preallocated = sum(p.numel() for p in method.parameters()) - method.base_param_count
    assert report["added"] < preallocated


def test_seta_run_resumes_after_a_crash_with_identical_R(tmp_path, trace_dir, monkeypatch):
    """If this fails, a resumed SETA run forgets Ω, θ*, the gate snapshot or which experts are routable, and its
    results differ from an uninterrupted run."""
    from clbench.harness import Harness

    def cfg(name: str):
        return tiny_run(tmp_path, trace_dir, method="seta", out=str(tmp_path / name), seed=3, zero_shot=False)

    full = Harness(cfg("full")).run()
    R_full = pd.read_csv(full / "R.csv", index_col=0).to_numpy()
    original_fit = Harness._fit

    def crash_on_second_task(self, method, t):
        if t == 1:
            raise KeyboardInterrupt
        return original_fit(self, method, t)

    monkeypatch.setattr(Harness, "_fit", crash_on_second_task)
    with pytest.raises(KeyboardInterrupt):
        Harness(cfg("crash")).run()
    state = torch.load(tmp_path / "crash" / "state" / "after-1.pt", weights_only=True)
    assert int(state["tasks_done"]) == 1
    assert any(k.endswith("omega_A") for k in state) and any(k.endswith("router.old_weight") for k in state)
    monkeypatch.setattr(Harness, "_fit", original_fit)
    resumed = Harness(cfg("crash")).run()
    np.testing.assert_array_equal(pd.read_csv(resumed / "R.csv", index_col=0).to_numpy(), R_full)
    final_full = torch.load(full / "state" / "after-2.pt", weights_only=True)
    final_resumed = torch.load(resumed / "state" / "after-2.pt", weights_only=True)
    assert final_full.keys() == final_resumed.keys()
    for key, value in final_full.items():
        assert torch.equal(value, final_resumed[key]), key


def test_bad_knobs_are_refused():
    """If this fails, a typo in a SETA choice knob runs silently with a default the user did not ask for."""
    from clbench.config import ConfigError, build
    from clbench.registry import get_method

    with pytest.raises(ConfigError, match="importance_norm"):
        build(get_method("seta").config_class, {"importance_norm": "sum"})
    with pytest.raises(ConfigError, match="routing_kl_support"):
        build(get_method("seta").config_class, {"routing_kl_support": "new"})
