"""GEM and A-GEM: the projected update never raises an earlier task's memory loss to first order, leaves a
non-conflicting gradient alone, runs inside the training loop and resumes mid-order with identical predictions."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_run

from clbench.benchmark import Collator, Task, TaskSpec
from clbench.methods.gem import flat_grad, loss_gradient, project_agem, project_gem


def _tasks(n_tasks: int = 3, n_train: int = 12) -> list[Task]:
    def split(t: int, name: str, n: int) -> list[dict[str, str]]:
        return [{"prompt": f"task{t} {name} {i}: {t} + {i} =", "answer": str(t + i)} for i in range(n)]

    return [Task(TaskSpec(f"T{t}", "accuracy"), train=split(t, "train", n_train), eval=split(t, "eval", 3),
                 test=split(t, "test", 3)) for t in range(n_tasks)]


def _method(name: str, num_tasks: int = 3, **knobs):
    from clbench.models import tiny_model
    from clbench.registry import get_method

    cls = get_method(name)
    loaded = tiny_model()
    return cls(loaded.model, loaded.tokenizer, cls.default_config(knobs), num_tasks=num_tasks)


def _conflicting(seed: int = 0, k: int = 3, n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(k, n, generator=gen)
    g = -G.sum(0) + 0.1 * torch.randn(n, generator=gen)  # conflicts with every memory gradient
    return g, G


@pytest.mark.parametrize("margin", [0.0, 0.5])
def test_gem_projection_has_nonnegative_dot_with_every_memory_gradient(margin):
    """If this fails, a GEM step can raise the loss of an earlier task's memory (the one thing GEM promises not to
    do): the QP is wrong or quadprog's sign convention was misread."""
    for seed in range(5):
        g, G = _conflicting(seed)
        assert (G @ g < 0).all()
        z = project_gem(g, G, margin=margin)
        scale = g.norm() * G.norm(dim=1)
        assert (G @ z >= -1e-6 * scale).all(), (seed, G @ z)
        # the projection is the closest such vector to g: it moves g, but not beyond the unconstrained answer
        assert not torch.allclose(z, g) and (z - g).norm() <= g.norm() * 10


def test_gem_and_agem_leave_a_non_conflicting_gradient_unchanged():
    """If this fails, GEM/A-GEM change updates that harm no earlier task (they would slow learning for nothing)."""
    gen = torch.Generator().manual_seed(1)
    G = torch.rand(3, 32, generator=gen)  # non-negative entries: every dot product with g is positive
    g = torch.rand(32, generator=gen)
    assert (G @ g > 0).all()
    assert torch.equal(project_gem(g, G), g)
    assert torch.equal(project_agem(g, G[0]), g)
    assert torch.equal(project_gem(g, torch.zeros(0, 32)), g)


def test_agem_projection_removes_exactly_the_conflicting_component():
    """If this fails, an A-GEM step still increases the reference (memory) loss, or removes more than needed."""
    gen = torch.Generator().manual_seed(2)
    g_ref = torch.randn(128, generator=gen)
    g = -0.5 * g_ref + torch.randn(128, generator=gen)
    assert torch.dot(g, g_ref) < 0
    z = project_agem(g, g_ref)
    assert abs(torch.dot(z, g_ref).item()) <= 1e-5 * g.norm().item() * g_ref.norm().item()
    torch.testing.assert_close(g - z, (torch.dot(g, g_ref) / g_ref.dot(g_ref)) * g_ref)  # only along g_ref


def test_gem_hook_constrains_the_real_adapter_gradient_against_training_memories():
    """If this fails, GEM on a real model trains task 2 with an update that raises task 1's memory loss, or its memory
    holds records that are not task 1 TRAINING records (a test-data leak)."""
    tasks = _tasks(n_tasks=3)
    method = _method("gem", memory_per_task=4, memory_batch_size=3)
    method.begin_task(0, tasks[0])
    params = method.trainable_parameters()
    with torch.no_grad():  # make the adapter non-trivial (B = 0 at init gives A no gradient)
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    assert method.train_examples(2, tasks) == tasks[2].train  # memories constrain, they are not mixed in
    assert [len(m) for m in method.memories] == [4, 4]
    assert all(r in tasks[k].train for k, m in enumerate(method.memories) for r in m)
    method.begin_task(2, tasks[2])
    collate = Collator(method.tokenizer, train=True)
    G = torch.stack([loss_gradient(method, m, collate, params, 8) for m in method.memories])
    # an adversarial "current" gradient: straight up both memory losses
    g = -(G[0] / G[0].norm() + G[1] / G[1].norm())
    offset = 0
    for p in params:
        p.grad = g[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()
    method.on_before_optimizer_step(None)
    z = flat_grad(params)
    assert not torch.allclose(z, g)
    assert (G @ z >= -1e-5 * z.norm() * G.norm(dim=1)).all(), G @ z


def test_bad_memory_knobs_are_one_line_errors():
    """If this fails, `--set memory_per_task=0` or a negative margin runs silently instead of stopping."""
    from clbench.config import ConfigError
    from clbench.registry import get_method

    with pytest.raises(ConfigError, match="memory_per_task"):
        get_method("gem").default_config({"memory_per_task": 0})
    with pytest.raises(ConfigError, match="margin"):
        get_method("gem").default_config({"margin": -1})
    with pytest.raises(ConfigError, match="ref_batch_size"):
        get_method("agem").default_config({"ref_batch_size": 0})


@pytest.mark.parametrize("name", ["gem", "agem"])
def test_killed_run_resumes_mid_order_with_identical_predictions(name, tmp_path, trace_dir, monkeypatch):
    """If this fails, a GEM/A-GEM run resumed after a crash trains the next task against a different (or no)
    memory than the uninterrupted run, so its R differs."""
    from clbench.harness import Harness
    from clbench.registry import get_method

    knobs = {"method": name, "num_tasks": 3, "max_steps_per_task": 2, "seed": 3}
    overrides = {"memory_per_task": 3, "lr": 0.05}
    full = Harness(tiny_run(tmp_path, trace_dir, out=str(tmp_path / "full"), **knobs), overrides).run()
    cls = get_method(name)
    projected = []
    original_hook = cls.on_before_optimizer_step

    def spy(self, optimizer):
        projected.append(bool(self.memories))
        return original_hook(self, optimizer)

    monkeypatch.setattr(cls, "on_before_optimizer_step", spy)
    cfg = tiny_run(tmp_path, trace_dir, out=str(tmp_path / "crash"), stop_after=1, **knobs)
    Harness(cfg, overrides).run()
    cfg.stop_after = None
    Harness(cfg, overrides).run()
    assert any(projected)  # the resumed tasks 2-3 did run the surgery with a memory
    for after in ("after-2", "after-3"):
        for task in ("C-STANCE", "FOMC", "MeetingBank"):
            a = json.loads((full / "predictions" / after / f"{task}.json").read_text())
            b = json.loads((tmp_path / "crash" / "predictions" / after / f"{task}.json").read_text())
            assert a == b, (after, task)
