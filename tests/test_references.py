"""The two references: mtl (joint training, one row, flagged) and per-task-lora (oracle task id, no forgetting)."""

from __future__ import annotations

import json

import numpy as np
import torch
from conftest import tiny_run

from clbench.benchmark import Collator


def _per_task_lora(num_tasks: int = 2):
    from clbench.models import tiny_model
    from clbench.run_plan import resolve_method

    cls, cfg = resolve_method("per-task-lora")
    loaded = tiny_model()
    return cls(loaded.model, loaded.tokenizer, cfg, num_tasks=num_tasks)


def adapter_name(t: int) -> str:
    """peft's name of task t's adapter (the methods' convention)."""
    from clbench.registry import get_method

    return get_method("per-task-lora").adapter_name(t)


def test_mtl_trains_once_on_all_tasks_and_is_flagged_joint(tmp_path, trace_dir):
    """If this fails, the multi-task upper bound is trained like a CL method (one stage per task) or is not marked
    as joint training, and the leaderboard would rank it next to the CL methods as if it were one."""
    from clbench.harness import Harness
    from clbench.leaderboard import build_leaderboard
    from clbench.registry import get_method

    fits = []
    mtl = get_method("mtl")
    original = mtl.begin_task
    mtl.begin_task = lambda self, t, task: (fits.append(t), original(self, t, task))[1]
    try:
        run_dir = Harness(tiny_run(tmp_path, trace_dir, method="mtl")).run()
    finally:
        mtl.begin_task = original
    assert fits == [1]  # one stage, t = T - 1
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["joint_training"] is True and metrics["task_aware"] is False
    R = np.array(metrics["R"], dtype=float)
    assert not np.isnan(R[0]).any() and not np.isnan(R[2]).any() and np.isnan(R[1]).all()
    rows = json.loads((run_dir / "progress.json").read_text())["rows"]
    assert sorted(rows) == ["0", "2"]
    assert rows["2"]["train"]["examples"] == 24  # both tasks' 12 training records, mixed
    table = build_leaderboard([run_dir])
    assert table.iloc[0]["method"] == "mtl" and bool(table.iloc[0]["joint_training"])


def test_per_task_lora_keeps_task_1_exactly_and_is_flagged_task_aware(tmp_path, trace_dir, monkeypatch):
    """If this fails, the no-forgetting reference forgets (task 1's adapter moved during task 2, or task 1's test
    examples were not answered with task 1's adapter), or its row is not flagged as using the oracle task id."""
    from clbench.harness import Harness
    from clbench.results import RunStore

    monkeypatch.setattr(RunStore, "prune_states", lambda self, keep_row: None)  # keep after-1.pt to compare
    run_dir = Harness(tiny_run(tmp_path, trace_dir, method="per-task-lora", max_steps_per_task=4),
                      method_overrides={"weight_decay": 0.1}).run()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["task_aware"] is True and metrics["joint_training"] is False
    after1 = torch.load(run_dir / "state" / "after-1.pt", weights_only=True)
    after2 = torch.load(run_dir / "state" / "after-2.pt", weights_only=True)
    task1_adapter = [k for k in after2 if f".{adapter_name(0)}." in k]
    assert task1_adapter
    for k in task1_adapter:
        assert torch.equal(after1[k], after2[k]), k
    assert any(not torch.equal(after1[k], after2[k]) for k in after2 if f"lora_B.{adapter_name(1)}." in k)
    # task 1's predictions come from its own (unchanged) adapter: identical before and after task 2
    preds = [json.loads((run_dir / "predictions" / f"after-{row}" / "C-STANCE.json").read_text()) for row in (1, 2)]
    assert preds[0] == preds[1]
    R = np.array(metrics["R"], dtype=float)
    assert R[2, 0] == R[1, 0]


def test_per_task_lora_routes_each_example_of_a_mixed_batch_to_its_task_adapter():
    """If this fails, a batch holding several tasks is answered with one task's adapter (or padding from other
    tasks changes an example's answer)."""
    method = _per_task_lora(num_tasks=2)
    torch.manual_seed(0)
    with torch.no_grad():  # make the two adapters very different so a wrong route shows up in the text
        for t in (0, 1):
            for name, p in method.adapter_parameters(t).items():
                if "lora_B" in name:
                    p.normal_(std=2.0)
    method.begin_task(1, None)
    method.eval()
    collate = Collator(method.tokenizer, 64, train=False)
    prompts = ["a short one", "a much longer prompt here", "mid prompt", "x"]
    ids = [0, 1, 1, 0]
    mixed = method.generate(collate([{"prompt": p, "task_id": j} for p, j in zip(prompts, ids, strict=True)]), 6)
    for row, (p, j) in enumerate(zip(prompts, ids, strict=True)):
        alone = method.generate(collate([{"prompt": p, "task_id": j}]), 6)
        assert torch.equal(mixed[row, : alone.shape[1]], alone[0]), (p, j)
        other = method.generate(collate([{"prompt": p, "task_id": 1 - j}]), 6)
        assert not torch.equal(other, alone), (p, j)  # the adapter choice matters: it is really task j's
    # generation switched adapters; training state is back to task 2's adapter only
    assert method.active_tasks() == [1]
    trainable = {n for n, p in method.named_parameters() if p.requires_grad}
    assert trainable == {f"model.{n}" for n in method.adapter_parameters(1)}
