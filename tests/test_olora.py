"""O-LoRA: the orthogonality term really acts (non-zero, gradient on the new A only), later adapters stay inactive,
and earlier adapters are bitwise frozen through a later task."""

from __future__ import annotations

import torch
from conftest import tiny_run

from clbench.benchmark import Task, TaskSpec


def _olora(num_tasks: int = 3, **knobs):
    from clbench.models import tiny_model
    from clbench.registry import get_method

    cls = get_method("olora")
    loaded = tiny_model()
    return cls(loaded.model, loaded.tokenizer, cls.default_config(knobs), num_tasks=num_tasks)


def adapter_name(t: int) -> str:
    """peft's name of task t's adapter (the methods' convention)."""
    from clbench.registry import get_method

    return get_method("olora").adapter_name(t)


def _task(name: str = "T") -> Task:
    return Task(TaskSpec(name, "accuracy"), train=[], eval=[], test=[])


def _A(method, t: int) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in method.adapter_parameters(t).items() if "lora_A" in n}


def test_orthogonality_term_is_nonzero_and_trains_only_the_new_A():
    """If this fails, O-LoRA's orthogonality loss is dead (TRACE's copy is always 0) or leaks gradient into frozen
    earlier adapters, and O-LoRA silently degrades to plain LoRA."""
    method = _olora(lambda_orth=0.5)
    method.begin_task(0, _task())
    assert method.orthogonality_loss().item() == 0.0  # nothing to be orthogonal to yet
    method.begin_task(1, _task())
    with torch.no_grad():  # A_1 = A_0: maximally non-orthogonal
        for (_, old), (_, new) in zip(_A(method, 0).items(), _A(method, 1).items(), strict=True):
            new.copy_(old)
    orth = method.orthogonality_loss()
    assert orth.item() > 0
    terms = method.regularizer({}, None)
    assert set(terms) == {"orth"} and torch.allclose(terms["orth"], 0.5 * orth)
    terms["orth"].backward()
    for name, p in method.named_parameters():
        if f"lora_A.{adapter_name(1)}." in name:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:  # earlier adapters, B_1, the base model: no gradient at all
            assert p.grad is None or not p.grad.any(), name
            if adapter_name(1) not in name:
                assert not p.requires_grad, name


def test_orthogonal_subspaces_give_zero_penalty():
    """If this fails, the penalty punishes adapters that are already orthogonal (wrong product or wrong axes)."""
    method = _olora()
    method.begin_task(1, _task())
    with torch.no_grad():
        for layer in method.lora_layers():
            A0 = layer.lora_A[adapter_name(0)].weight
            A1 = layer.lora_A[adapter_name(1)].weight
            r, d = A0.shape
            basis = torch.linalg.qr(torch.randn(d, 2 * r))[0].T  # 2r orthonormal rows
            A0.copy_(basis[:r])
            A1.copy_(basis[r:])
    assert method.orthogonality_loss().item() < 1e-4  # fp32 round-off over 8 layers × r² entries; A_1 = A_0 gives ~64


def test_only_adapters_up_to_t_contribute_and_train():
    """If this fails, adapters of future tasks leak into the output or the wrong adapter trains (peft's set_adapter
    re-enables requires_grad on every active adapter)."""
    method = _olora(num_tasks=3)
    method.begin_task(1, _task())
    assert method.active_tasks() == [0, 1]
    trainable = {n for n, p in method.named_parameters() if p.requires_grad}
    assert trainable == {f"model.{n}" for n in method.adapter_parameters(1)}
    ids = torch.randint(3, 200, (2, 9))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    method.eval()
    with torch.no_grad():
        before = method(batch).logits
        for name, p in method.adapter_parameters(2).items():
            if "lora_B" in name:
                p.normal_()  # a future task's adapter: must change nothing
        assert torch.equal(method(batch).logits, before)
        for name, p in method.adapter_parameters(1).items():
            if "lora_B" in name:
                p.normal_()
        assert not torch.allclose(method(batch).logits, before)
    # begin_task is replayed on resume: its result must not depend on what was trainable before
    method.begin_task(2, _task())
    method.begin_task(1, _task())
    assert {n for n, p in method.named_parameters() if p.requires_grad} == trainable


def test_earlier_adapter_is_bitwise_unchanged_after_a_later_task_and_resumes(tmp_path, trace_dir, monkeypatch):
    """If this fails, O-LoRA forgets through its 'frozen' adapters (optimizer, weight decay or a requires_grad slip),
    or a resumed run cannot rebuild the per-task adapters from the checkpoint."""
    from clbench.harness import Harness
    from clbench.results import RunStore

    monkeypatch.setattr(RunStore, "prune_states", lambda self, keep_row: None)  # keep after-1.pt to compare
    # weight decay on: a frozen adapter that slipped into the optimiser would move even with zero gradient
    run_dir = Harness(tiny_run(tmp_path, trace_dir, method="olora", max_steps_per_task=4),
                      method_overrides={"weight_decay": 0.1}).run()
    after1 = torch.load(run_dir / "state" / "after-1.pt", weights_only=True)
    after2 = torch.load(run_dir / "state" / "after-2.pt", weights_only=True)
    fresh = _olora(num_tasks=2)
    initial = fresh.checkpoint_state()
    for k in after2:
        if f"lora_B.{adapter_name(0)}." in k:
            assert not torch.equal(after1[k], initial[k]), k  # task 1 trained adapter 0 ...
        if f".{adapter_name(0)}." in k:
            assert torch.equal(after1[k], after2[k]), k  # ... and task 2 left it bit for bit
        if f"lora_B.{adapter_name(1)}." in k:
            assert torch.equal(after1[k], initial[k]) and not torch.equal(after2[k], initial[k]), k
    # resume = construct, replay begin_task for finished tasks, load the state: every tensor comes back
    fresh.begin_task(0, _task())
    fresh.begin_task(1, _task())
    fresh.load_checkpoint_state(after2)
    assert fresh.active_tasks() == [0, 1]
    for k, v in fresh.checkpoint_state().items():
        assert torch.equal(after2[k], v), k
