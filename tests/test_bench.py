"""`clbench bench` on the tiny model: one process, two methods and the base model, CSV/JSON written (no timings
asserted: they depend on the machine)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from clbench.bench import COLUMNS


def test_bench_writes_rows_for_base_and_each_method_with_lora_as_unit(tmp_path):
    """If this fails, `clbench bench` crashes, leaves out a contender or a column, or its ratios are not relative to
    lora / the base model, so the speed claims in the docs cannot be reproduced."""
    from typer.testing import CliRunner

    from clbench.cli import app

    result = CliRunner().invoke(app, ["bench", "--methods", "lora,moses", "--model", "tiny", "--steps", "2",
                                      "--warmup", "1", "--batch-size", "2", "--seq-len", "32", "--new-tokens", "3",
                                      "--data", "random", "--precision", "32-true", "--threads", "1",
                                      "--out", str(tmp_path), "--name", "tiny"])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "tiny.csv")
    assert list(table.columns) == COLUMNS
    assert list(table["method"]) == ["base", "lora", "moses"]
    rows = table.set_index("method")
    assert rows.loc["lora", "train_vs_lora"] == 1.0 and rows.loc["lora", "infer_vs_lora"] == 1.0
    assert rows.loc["base", "infer_vs_base"] == 1.0 and pd.isna(rows.loc["base", "train_step_ms"])
    assert rows.loc["base", "trainable_params"] == 0 and (rows.loc[["lora", "moses"], "trainable_params"] > 0).all()
    assert (rows.loc[["lora", "moses"], "train_step_ms"] > 0).all() and (rows["infer_ms_per_example"] > 0).all()
    assert rows.loc["moses", "train_vs_lora"] == pytest.approx(
        rows.loc["moses", "train_step_ms"] / rows.loc["lora", "train_step_ms"], rel=1e-3)
    meta = json.loads((tmp_path / "tiny.json").read_text())
    for key in ("device", "versions", "command", "memory_kind", "settings", "rows", "data"):
        assert key in meta, key
    assert meta["settings"]["methods"] == ["lora", "moses"] and meta["infer_batch_shape"][0] == 2


def test_bench_names_an_unknown_method_in_one_line(tmp_path):
    """If this fails, a typo in --methods loads models for minutes before failing, or fails with a traceback."""
    from typer.testing import CliRunner

    from clbench.cli import app

    result = CliRunner().invoke(app, ["bench", "--methods", "lora,mosse", "--model", "tiny", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "unknown method 'mosse'" in result.output and "moses" in result.output


def test_bench_measures_a_second_setting_of_a_method_side_by_side(tmp_path):
    """If this fails, `lora15=lora --set lora15.layers=[...]` does not reach the method (so a "same layers" speed
    comparison silently measures the default setting twice) or its row does not say which knobs it ran with."""
    from typer.testing import CliRunner

    from clbench.cli import app

    result = CliRunner().invoke(app, ["bench", "--methods", "lora,upper=lora", "--set", "upper.layers=[2,3]",
                                      "--model", "tiny", "--steps", "1", "--warmup", "0", "--batch-size", "2",
                                      "--seq-len", "16", "--new-tokens", "2", "--data", "random",
                                      "--precision", "32-true", "--threads", "1", "--out", str(tmp_path),
                                      "--name", "variant"])
    assert result.exit_code == 0, result.output
    rows = pd.read_csv(tmp_path / "variant.csv").set_index("method")
    assert list(rows.index) == ["base", "lora", "upper"]
    # the tiny model has 4 layers: adapting 2 of them halves LoRA's trainable parameters
    assert rows.loc["upper", "trainable_params"] * 2 == rows.loc["lora", "trainable_params"]
    assert rows.loc["upper", "knobs"] == "layers=[2,3]" and pd.isna(rows.loc["lora", "knobs"])
    assert json.loads((tmp_path / "variant.json").read_text())["settings"]["overrides"] == {"upper": {"layers": [2, 3]}}


@pytest.mark.parametrize(("args", "message"), [
    (["--methods", "lora", "--set", "lroa.r=4"], "--set lroa.KEY=VALUE names no contender (contenders: lora)"),
    (["--methods", "lora", "--set", "lora.rank=4"], "unknown key 'rank'"),
    (["--methods", "lora", "--set", "r=4"], "bench --set expects LABEL.KEY=VALUE"),
])
def test_bench_refuses_a_bad_contender_knob_in_one_line_before_loading_models(tmp_path, args, message):
    """If this fails, a typo in a contender's --set is ignored (the bench measures something else than asked) or is
    reported only after minutes of model loading, or as a traceback."""
    from typer.testing import CliRunner

    from clbench.cli import app

    result = CliRunner().invoke(app, ["bench", *args, "--model", "tiny", "--out", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("at_task", [0, 1])
def test_bench_measures_the_later_task_step_where_gradient_surgery_runs(at_task, monkeypatch):
    """If this fails, `clbench bench` times A-GEM/GEM/OGD on the first task, where they have no memory and skip their
    projection, or never calls their gradient-surgery hook: their published step ratio vs lora is then ~1.0× while
    every later task of a run pays for the memory gradients (the runs measured 1.7× for A-GEM)."""
    import torch

    from clbench.bench import BenchConfig, _autocast, build_contender, make_batches, train_step
    from clbench.methods.gem import AGEM
    from clbench.models import load_model

    cfg = BenchConfig(methods=["agem"], model="tiny", steps=1, warmup=0, batch_size=2, seq_len=32, new_tokens=2,
                      data="random", num_tasks=3, at_task=at_task)
    batches, _, task, _ = make_batches(load_model("tiny").tokenizer, cfg)
    entry = build_contender("agem", cfg, task, torch.device("cpu"), batch=batches[0])
    assert entry.method.current_task == at_task
    assert len(entry.method.memories) == at_task  # M_0 exists from the second task on
    projections = []
    original = AGEM.project
    monkeypatch.setattr(AGEM, "project", lambda self, g, params: projections.append(1) or original(self, g, params))
    train_step(entry, batches[0], _autocast(torch.device("cpu"), "32-true"), 1.0)
    assert len(projections) == at_task  # the hook ran, and computed the reference gradient, on the second task only


def test_bench_refuses_an_at_task_past_the_order_in_one_line(tmp_path):
    """If this fails, `--at-task 8` with 8 tasks crashes deep inside a method's begin_task instead of saying why."""
    from typer.testing import CliRunner

    from clbench.cli import app

    result = CliRunner().invoke(app, ["bench", "--methods", "lora", "--model", "tiny", "--num-tasks", "2",
                                      "--at-task", "2", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "--at-task must be in 0..1" in result.output
