"""OGD: updates are orthogonal to the stored directions of earlier tasks, the basis is orthonormal, and it survives a
resume with identical predictions."""

from __future__ import annotations

import pytest
import torch
from conftest import run_predictions, tiny_run
from torch.utils.data import DataLoader

from clbench.benchmark import Collator, Task, TaskSpec
from clbench.methods.gem import flat_grad
from clbench.methods.ogd import add_to_basis, project_orthogonal


def _tasks(n_tasks: int = 2, n_train: int = 10) -> list[Task]:
    def split(t: int, name: str, n: int) -> list[dict[str, str]]:
        return [{"prompt": f"task{t} {name} {i}: {t} + {i} =", "answer": str(t + i)} for i in range(n)]

    return [Task(TaskSpec(f"T{t}", "accuracy"), train=split(t, "train", n_train), eval=split(t, "eval", 3),
                 test=split(t, "test", 3)) for t in range(n_tasks)]


def _method(num_tasks: int = 2, **knobs):
    from clbench.models import tiny_model
    from clbench.registry import get_method

    cls = get_method("ogd")
    loaded = tiny_model()
    return cls(loaded.model, loaded.tokenizer, cls.default_config(knobs), num_tasks=num_tasks)


def test_projection_and_gram_schmidt_on_hand_made_vectors():
    """If this fails, OGD's stored basis is not orthonormal (the projection then removes too much or too little) or a
    projected gradient keeps a component along an earlier task's direction."""
    gen = torch.Generator().manual_seed(0)
    n = 500
    dirs = torch.randn(6, n, generator=gen)
    dirs[5] = dirs[0] - 2 * dirs[1]  # already spanned: must add nothing
    basis = torch.zeros(8, n)
    used = add_to_basis(basis, 0, dirs)
    assert used == 5
    torch.testing.assert_close(basis[:used] @ basis[:used].T, torch.eye(used), atol=1e-6, rtol=0)
    assert (basis[used:] == 0).all()
    g = 100 * torch.randn(n, generator=gen)
    z = project_orthogonal(g, basis)
    assert (basis @ z).abs().max() <= 1e-6 * z.norm()
    torch.testing.assert_close(z + basis.T @ (basis @ g), g, atol=1e-4, rtol=1e-5)  # only the spanned part went


def test_ogd_update_on_the_tiny_model_is_orthogonal_to_stored_directions():
    """If this fails, an OGD step on task 2 moves the adapter along a direction that task 1's examples are sensitive
    to (what OGD exists to prevent), or task 1 stored no direction at all."""
    tasks = _tasks()
    method = _method(memory_per_task=6, optimizer="sgd", lr=0.1)  # the paper's optimiser: the update is -lr g~
    method.begin_task(0, tasks[0])
    params = method.adapter_parameters()
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    collate = Collator(method.tokenizer, train=True)
    method.end_task(0, tasks[0], train_loader=DataLoader(tasks[0].train, batch_size=4, collate_fn=collate))
    used = int(method.ogd_used)
    assert used == 6  # six distinct records give six independent directions in a 7,168-value adapter
    basis = method.ogd_basis[:used]
    torch.testing.assert_close(basis @ basis.T, torch.eye(used), atol=1e-5, rtol=0)
    method.begin_task(1, tasks[1])
    assert method.ogd_basis.shape[0] == 12 and torch.equal(method.ogd_basis[:used], basis)
    batch = collate(tasks[1].train[:4])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    method.model(**inputs).loss.backward()
    raw = flat_grad(params)
    assert (basis @ raw).abs().max() > 1e-3 * raw.norm()  # the raw gradient does lean on task 1's directions
    opt = method.configure_optimizers()
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0
    before = torch.cat([p.detach().reshape(-1).clone() for p in params])
    method.on_before_optimizer_step(opt)
    projected = flat_grad(params)
    assert (basis @ projected).abs().max() <= 1e-6 * projected.norm()
    opt.step()
    update = torch.cat([p.detach().reshape(-1) for p in params]) - before
    torch.testing.assert_close(update, -method.cfg.lr * projected, atol=1e-7, rtol=1e-5)  # SGD: the update is -lr g~


def test_bad_ogd_knobs_are_one_line_errors():
    """If this fails, a typo in ogd_direction/optimizer, or weight decay with SGD (which breaks orthogonality), runs
    silently."""
    from clbench.config import ConfigError
    from clbench.registry import get_method

    cls = get_method("ogd")
    for knobs, word in (({"ogd_direction": "all"}, "ogd_direction"), ({"optimizer": "adam"}, "optimizer"),
                        ({"optimizer": "sgd", "weight_decay": 0.01}, "weight_decay"),
                        ({"memory_per_task": 0}, "memory_per_task")):
        with pytest.raises(ConfigError, match=word):
            cls.default_config(knobs)
    cls.default_config({"optimizer": "adamw", "weight_decay": 0.01})  # TRACE's setting is allowed


@pytest.mark.parametrize("direction", ["gtl", "loss"])
def test_killed_run_resumes_mid_order_with_identical_predictions(direction, tmp_path, trace_dir):
    """If this fails, a resumed OGD run lost task 1's directions (or got a basis of another shape) and trains the
    rest of the order unprotected, so its predictions differ from the uninterrupted run's."""
    from clbench.harness import Harness

    knobs = {"method": "ogd", "num_tasks": 3, "max_steps_per_task": 2, "seed": 3}
    overrides = {"memory_per_task": 4, "ogd_direction": direction}
    full = Harness(tiny_run(tmp_path, trace_dir, out=str(tmp_path / "full"), **knobs), overrides).run()
    cfg = tiny_run(tmp_path, trace_dir, out=str(tmp_path / "crash"), stop_after=1, **knobs)
    Harness(cfg, overrides).run()
    state = torch.load(tmp_path / "crash" / "state" / "after-1.pt", weights_only=True)
    assert int(state["ogd_used"]) > 0 and state["ogd_basis"].shape[0] == 4
    cfg.stop_after = None
    Harness(cfg, overrides).run()
    assert run_predictions(full) == run_predictions(tmp_path / "crash")
