"""LwF: the distillation term against the previous task's adapter starts at 0 on task 2, pulls only trainable
parameters, uses a buffer copy of the adapter (no second model), and survives a resume with identical predictions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import run_predictions, tiny_run

from clbench.benchmark import Collator, Task, TaskSpec
from clbench.methods.lwf import distillation_loss


def _tasks(n_tasks: int = 2, n_train: int = 8) -> list[Task]:
    def split(t: int, name: str, n: int) -> list[dict[str, str]]:
        return [{"prompt": f"task{t} {name} {i}: {t} + {i} =", "answer": str(t + i)} for i in range(n)]

    return [Task(TaskSpec(f"T{t}", "accuracy"), train=split(t, "train", n_train), eval=split(t, "eval", 3),
                 test=split(t, "test", 3)) for t in range(n_tasks)]


def _method(name: str = "lwf", num_tasks: int = 2, **knobs):
    from clbench.models import tiny_model
    from clbench.registry import get_method

    cls = get_method(name)
    loaded = tiny_model()
    return cls(loaded.model, loaded.tokenizer, cls.default_config(knobs), num_tasks=num_tasks)


def test_distillation_is_zero_before_task_2_updates_and_reaches_only_trainable_parameters():
    """If this fails, LwF penalises a model that has not moved yet (the term must start at 0 on task 2), or its
    gradient leaks into the frozen base model or the stored old adapter (which would then drift)."""
    tasks = _tasks()
    # without adapter dropout: with it the train-mode student differs from the eval-mode teacher by the dropout noise
    method = _method(positions="answer", dropout=0.0)
    method.begin_task(0, tasks[0])
    batch = Collator(method.tokenizer, train=True)(tasks[1].train[:4])
    assert method.regularizer(batch, method(batch)) == {}  # no teacher during the first task
    params = dict(method.model.named_parameters())
    with torch.no_grad():  # "training task 1": the adapter leaves its init
        for name in method.lwf_names:
            params[name].add_(0.1 * torch.randn_like(params[name]))
    method.end_task(0, tasks[0])
    method.begin_task(1, tasks[1])
    method.train()
    term = method.regularizer(batch, method(batch))["lwf"]
    assert abs(term.item()) < 1e-6
    with torch.no_grad():  # one "update" of task 2
        for name in method.lwf_names:
            params[name].add_(0.1 * torch.randn_like(params[name]))
    term = method.regularizer(batch, method(batch))["lwf"]
    assert term.item() > 1e-4
    method.zero_grad(set_to_none=True)
    term.backward()
    assert all(p.grad is None for p in method.parameters() if not p.requires_grad)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.parameters() if p.requires_grad)
    assert all(not b.requires_grad and b.grad is None for b in method.lwf_teacher.buffers())


def test_old_model_is_a_buffer_copy_of_the_adapter_not_a_second_model():
    """If this fails, LwF keeps a second copy of the base model (twice the memory on a 7B model) or its stored old
    adapter is not the adapter that finished the previous task."""
    lwf = _method("lwf")
    lora = _method("lora", r=lwf.cfg.r)  # the same adapter shape, whatever the two YAMLs default to
    assert sum(p.numel() for p in lwf.parameters()) == sum(p.numel() for p in lora.parameters())
    adapter = sum(p.numel() for n, p in lwf.model.named_parameters() if "lora_" in n)
    assert sum(b.numel() for b in lwf.lwf_teacher.buffers()) == adapter
    lwf.begin_task(0, None)
    with torch.no_grad():
        for p in lwf.trainable_parameters():
            p.add_(0.3)
    lwf.end_task(0, None)
    params = dict(lwf.model.named_parameters())
    assert all(torch.equal(buf, params[n]) for n, buf in lwf.teacher_state().items())
    assert int(lwf.lwf_tasks_done) == 1


def test_paper_and_trace_kl_directions_on_hand_made_logits():
    """If this fails, the default loss is not Li & Hoiem's KL(old ‖ new) at temperature T averaged over the chosen
    positions, or `trace_kl: true` does not reproduce TRACE's F.kl_div call (reversed direction, padding included)."""
    gen = torch.Generator().manual_seed(0)
    z, z_old = torch.randn(2, 5, 11, generator=gen), torch.randn(2, 5, 11, generator=gen)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    T = 2.0
    p_old, log_p = F.softmax(z_old / T, -1), F.log_softmax(z / T, -1)
    per_pos = (p_old * (p_old.log() - log_p)).sum(-1)
    torch.testing.assert_close(distillation_loss(z, z_old, mask, T), per_pos[mask].mean())
    trace = F.kl_div(F.log_softmax(z_old / T, dim=-1), F.softmax(z / T, dim=-1), reduction="batchmean")
    torch.testing.assert_close(distillation_loss(z, z_old, mask, T, trace_kl=True), trace)
    assert distillation_loss(z, z, mask, T).abs() < 1e-6


def test_bad_lwf_knobs_are_one_line_errors():
    """If this fails, `--set temperature=0` (a division by zero) or a typo in positions runs silently."""
    from clbench.config import ConfigError
    from clbench.registry import get_method

    cls = get_method("lwf")
    for knobs, word in (({"temperature": 0}, "temperature"), ({"positions": "prompt"}, "positions"),
                        ({"lwf_lambda": -1}, "lwf_lambda")):
        with pytest.raises(ConfigError, match=word):
            cls.default_config(knobs)


def test_killed_run_resumes_mid_order_with_identical_predictions(tmp_path, trace_dir):
    """If this fails, a resumed LwF run distils towards the wrong old adapter (or none) after a crash, so its
    predictions differ from the uninterrupted run's."""
    from clbench.harness import Harness

    knobs = {"method": "lwf", "num_tasks": 3, "max_steps_per_task": 2, "seed": 3}
    overrides = {"lr": 0.05}
    full = Harness(tiny_run(tmp_path, trace_dir, out=str(tmp_path / "full"), **knobs), overrides).run()
    cfg = tiny_run(tmp_path, trace_dir, out=str(tmp_path / "crash"), stop_after=1, **knobs)
    Harness(cfg, overrides).run()
    state = torch.load(tmp_path / "crash" / "state" / "after-1.pt", weights_only=True)
    assert int(state["lwf_tasks_done"]) == 1 and any(k.startswith("lwf_teacher.") for k in state)
    cfg.stop_after = None
    Harness(cfg, overrides).run()
    assert run_predictions(full) == run_predictions(tmp_path / "crash")
