"""The CL loop end to end on the tiny random model: run folder contents, resume after a crash, task-agnostic eval."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import tiny_run

from clbench.harness import Harness


def test_two_task_run_writes_a_complete_run_folder(tmp_path, trace_dir):
    run_dir = Harness(tiny_run(tmp_path, trace_dir)).run()
    assert (run_dir / "DONE").is_file()
    R = pd.read_csv(run_dir / "R.csv", index_col=0)
    assert list(R.columns) == ["C-STANCE", "FOMC"]
    assert list(R.index) == ["zero-shot", "after-1:C-STANCE", "after-2:FOMC"]
    assert R.notna().all().all()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("OP", "BWT", "FWT", "params", "train_tokens_per_s", "inference_ms_per_example", "peak_memory_mb",
                "versions", "command", "data_manifest_digest"):
        assert key in metrics, key
    assert metrics["OP"] == pytest.approx(R.iloc[-1].mean())
    assert metrics["params"][-1]["added"] > 0 and metrics["params"][-1]["trainable"] > 0
    preds = json.loads((run_dir / "predictions" / "after-2" / "FOMC.json").read_text())
    assert set(preds[0]) == {"prompt", "answer", "prediction"} and len(preds) == 4
    import yaml

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["identity"]["run"]["method"] == "lora" and config["identity"]["run"]["model"] == "tiny"
    assert set(config["data_manifest"]) == {"C-STANCE", "FOMC", *config["data_manifest"]}  # every task's manifest
    assert config["data_manifest"]["FOMC"]["test"]["n"] == 4


def test_no_task_id_reaches_a_task_agnostic_method(tmp_path, trace_dir, monkeypatch):
    from clbench.method import CLMethod

    seen = []
    original = CLMethod.predict_step

    def spy(self, batch, batch_idx, dataloader_idx=0):
        seen.append("task_id" in batch)
        return original(self, batch, batch_idx, dataloader_idx)

    monkeypatch.setattr(CLMethod, "predict_step", spy)
    Harness(tiny_run(tmp_path, trace_dir, num_tasks=1)).run()
    assert seen and not any(seen)


def test_killed_run_resumes_after_last_finished_task_with_identical_R(tmp_path, trace_dir, monkeypatch):
    """If this fails, a run killed mid-order either retrains finished tasks or resumes from a state that differs
    from the uninterrupted run (R and predictions must be identical). The crash is raised from the method's public
    `begin_task` hook, where a user's Ctrl-C or an OOM would hit."""
    from clbench import registry

    fast = {"lr": 0.05}  # so 3 steps change the outputs: a no-op resume could not pass the comparison
    full = Harness(tiny_run(tmp_path, trace_dir, out=str(tmp_path / "full"), seed=3), fast).run()
    R_full = pd.read_csv(full / "R.csv", index_col=0).to_numpy()

    crashed_cfg = tiny_run(tmp_path, trace_dir, out=str(tmp_path / "crash"), seed=3)
    lora = registry.get_method("lora")
    original_begin = lora.begin_task
    begun = []

    def crash_on_second_task(self, t, task):
        if t == 1 and not begun.count("resumed"):
            raise KeyboardInterrupt
        begun.append(t)
        return original_begin(self, t, task)

    monkeypatch.setattr(lora, "begin_task", crash_on_second_task)
    with pytest.raises(KeyboardInterrupt):
        Harness(crashed_cfg, fast).run()
    crash_dir = tmp_path / "crash"
    assert not (crash_dir / "DONE").exists() and not (crash_dir / "metrics.json").exists()
    assert sorted(pd.read_csv(crash_dir / "R.csv", index_col=0).dropna().index) == ["after-1:C-STANCE", "zero-shot"]

    row_1 = json.loads((crash_dir / "progress.json").read_text())["rows"]["1"]
    begun.append("resumed")
    Harness(crashed_cfg, fast).run()
    assert json.loads((crash_dir / "progress.json").read_text())["rows"]["1"] == row_1  # task 1 was not retrained
    assert begun == [0, "resumed", 0, 1]  # the resume replays task 1's begin_task (no training) and trains task 2
    R_resumed = pd.read_csv(crash_dir / "R.csv", index_col=0).to_numpy()
    np.testing.assert_array_equal(R_resumed, R_full)
    full_preds = json.loads((full / "predictions" / "after-2" / "C-STANCE.json").read_text())
    resumed_preds = json.loads((crash_dir / "predictions" / "after-2" / "C-STANCE.json").read_text())
    assert full_preds == resumed_preds
    zero_shot = json.loads((full / "predictions" / "after-0" / "C-STANCE.json").read_text())
    assert zero_shot != full_preds  # training changed the outputs, so the comparison above is not vacuous
    assert list((crash_dir / "state").glob("*.pt")) == [crash_dir / "state" / "after-2.pt"]


def test_rerun_of_a_different_config_into_the_same_folder_is_refused(tmp_path, trace_dir):
    from clbench.results import RunConflictError

    Harness(tiny_run(tmp_path, trace_dir, num_tasks=1)).run()
    with pytest.raises(RunConflictError, match="different config"):
        Harness(tiny_run(tmp_path, trace_dir, num_tasks=1, seed=1)).run()


def test_seqft_trains_base_weights_and_checkpoints_them(tmp_path, trace_dir):
    from clbench.models import tiny_model
    from clbench.run_plan import resolve_method

    run_dir = Harness(tiny_run(tmp_path, trace_dir, method="seqft", num_tasks=1, max_steps_per_task=2)).run()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["params"][0]["added"] == 0
    assert metrics["params"][0]["trainable"] == metrics["params"][0]["total"]
    cls, cfg = resolve_method("seqft")
    method = cls(tiny_model().model, None, cfg, 1)
    import torch

    state = torch.load(run_dir / "state" / "after-1.pt", weights_only=True)
    assert set(state) == {n for n, _ in method.named_parameters()}


@pytest.mark.parametrize("method", ["lora", "olora", "moses", "ewc"])
def test_frozen_weights_in_bf16_give_the_same_predictions(tmp_path, trace_dir, method):
    """If this fails, `--frozen-dtype bf16` (half the weight memory, needed for 7B models) changes what a run
    computes, or leaves the frozen weights in fp32, or breaks a method's end_task (EWC's Fisher pass)."""
    import torch

    from clbench.harness import Harness, frozen_torch_dtype

    settings = dict(method=method, precision="bf16-mixed", num_tasks=2, max_steps_per_task=3)
    fast = {"lr": 0.05}  # so 3 steps change the outputs and the comparison below is not vacuous
    plain = Harness(tiny_run(tmp_path, trace_dir, out=str(tmp_path / "fp32"), **settings), fast).run()
    harness = Harness(tiny_run(tmp_path, trace_dir, out=str(tmp_path / "bf16"), frozen_dtype="bf16", **settings),
                      fast)
    halved = harness.run()
    for name in ("after-1/C-STANCE.json", "after-2/C-STANCE.json", "after-2/FOMC.json"):
        assert (plain / "predictions" / name).read_text() == (halved / "predictions" / name).read_text(), name
    assert (plain / "R.csv").read_text() == (halved / "R.csv").read_text()
    assert (plain / "predictions/after-0/C-STANCE.json").read_text() != (
        plain / "predictions/after-2/C-STANCE.json").read_text()
    # the folder hash ignores an unset option, so runs made before it existed keep their folders
    assert "frozen_dtype" not in json.dumps(Harness(tiny_run(tmp_path, trace_dir, **settings)).resolved["identity"])

    from clbench import registry
    from clbench.models import load_model

    loaded = load_model("tiny")
    m = registry.get_method(method)(loaded.model, loaded.tokenizer, harness.method_cfg, num_tasks=2)
    m.begin_task(0, harness.tasks[0])
    assert m.store_frozen_linears(frozen_torch_dtype("bf16", "bf16-mixed")) > 0
    linears = [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear)]
    # every frozen base linear, the output head tied to the embeddings included (its own bf16 copy); the table and
    # every tensor the method added (adapters it may unfreeze for a later task) stay fp32
    assert all(mod.weight.dtype == (torch.bfloat16 if id(mod.weight) in m._base_ids and not mod.weight.requires_grad
                                    else torch.float32) for mod in linears)
    assert m.model.get_output_embeddings().weight.dtype == torch.bfloat16
    assert m.model.get_input_embeddings().weight.dtype == torch.float32
    assert not [name for name in m.checkpoint_state() if "lm_head" in name or "embed_tokens" in name]


def test_trainable_weights_stay_fp32_at_every_task_under_frozen_bf16(tmp_path, trace_dir):
    """If this fails, `--frozen-dtype bf16` (set by the GPU profiles) makes some method train bf16 master weights from
    its second task on: it pre-created the later tasks' adapters frozen, the cast turned them to bf16, and AdamW then
    updates them in bf16, losing every update below bf16's resolution (O-LoRA and per-task-LoRA did this)."""
    import torch

    from clbench import registry
    from clbench.config import build
    from clbench.configs_dir import method_defaults
    from clbench.harness import Harness, frozen_torch_dtype
    from clbench.models import load_model

    harness = Harness(tiny_run(tmp_path, trace_dir, num_tasks=3))
    for name, cls in registry.methods().items():
        loaded = load_model("tiny")
        method = cls(loaded.model, loaded.tokenizer, build(cls.config_class, method_defaults(name)), num_tasks=3)
        for t, task in enumerate(harness.tasks):
            method.begin_task(t, task)
            method.store_frozen_linears(frozen_torch_dtype("bf16", "bf16-mixed"))
            low = [n for n, p in method.named_parameters() if p.requires_grad and p.dtype != torch.float32]
            assert not low, f"{name}, task {t}: {low[:3]}"
            assert any(p.requires_grad for p in method.parameters()), f"{name}, task {t}: nothing to train"


def test_a_bf16_trainable_weight_is_refused_before_training(tmp_path, trace_dir):
    """If this fails, a method that leaves a trainable weight in bf16 trains silently with bf16 master weights."""
    import pytest
    import torch

    from clbench import registry
    from clbench.harness import Harness
    from clbench.models import load_model

    harness = Harness(tiny_run(tmp_path, trace_dir, num_tasks=1))
    loaded = load_model("tiny")
    method = registry.get_method("lora")(loaded.model, loaded.tokenizer, harness.method_cfg, num_tasks=1)
    method.begin_task(0, harness.tasks[0])
    next(p for p in method.parameters() if p.requires_grad).data = torch.zeros(1, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="fp32 master"):
        method.on_train_start()


def test_frozen_dtype_needs_the_matching_precision(tmp_path, trace_dir):
    """If this fails, bf16 weights could meet fp32 activations outside autocast and crash mid-run."""
    from clbench.config import ConfigError
    from clbench.harness import Harness

    with pytest.raises(ConfigError, match="needs --precision bf16-mixed"):
        Harness(tiny_run(tmp_path, trace_dir, frozen_dtype="bf16", precision="32-true"))
    with pytest.raises(ConfigError, match="not one of"):
        Harness(tiny_run(tmp_path, trace_dir, frozen_dtype="int8", precision="32-true"))


@pytest.mark.parametrize("name", ["lora", "replay", "ewc", "mtl", "per-task-lora", "olora"])
def test_lora_layers_knob_adapts_only_those_layers_and_leaves_old_run_identities_alone(name):
    """If this fails, `--set layers=[...]` is ignored by a LoRA-based method (adapters land in every layer), or the
    new knob changes the identity of runs made before it existed, so their folders are no longer resumed or skipped
    and their seeds stop averaging with new ones."""
    import re

    from clbench.config import build, config_identity
    from clbench.configs_dir import method_defaults
    from clbench.models import tiny_model
    from clbench.registry import get_method

    cls = get_method(name)
    default = build(cls.config_class, method_defaults(name))
    assert "layers" not in config_identity(default)
    upper = build(cls.config_class, {**method_defaults(name), "layers": [2, 3]})
    assert config_identity(upper)["layers"] == [2, 3]
    loaded = tiny_model()
    method = cls(loaded.model, loaded.tokenizer, upper, num_tasks=2)
    adapted = {int(m.group(1)) for n, _ in method.named_parameters()
               if "lora_A" in n and (m := re.search(r"layers\.(\d+)\.", n))}
    assert adapted == {2, 3}
