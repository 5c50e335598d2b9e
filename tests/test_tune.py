"""`clbench tune`: Optuna over a method's search space, scored on the eval split only, written as a study file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli

from clbench import registry, tune
from clbench.benchmark import Benchmark, Task, TaskSpec, load_trace_layout
from clbench.config import ConfigError

TUNED_HERE = sorted(registry.methods())  # every method, so none escapes the equal-budget protocol
TINY_RUN = {"batch_size": 4, "eval_batch_size": 4, "precision": "32-true", "progress": False, "max_new_tokens": 3}


class SealedTask(Task):
    """A task whose test split raises when read: tuning must never look at it."""

    def __getattribute__(self, name: str):
        if name == "test":
            raise AssertionError("the test split was read")
        return super().__getattribute__(name)


@pytest.fixture
def sealed_benchmark(trace_dir):
    """Benchmark 'sealed-mini': trace_dir's tasks (TRACE names and orders), every test split sealed."""
    from clbench.benchmarks.trace import TRACE_ORDERS, TRACE_TASKS

    name = "sealed-mini"

    def factory(data_dir=None, limit_train=None, limit_eval=None, limit_test=None) -> Benchmark:
        specs = [TaskSpec(n, metric, epochs=1, max_new_tokens=3) for n, (metric, _) in TRACE_TASKS.items()]
        tasks = load_trace_layout(data_dir or trace_dir, specs, limit_train, limit_eval, limit_test)
        sealed = {n: SealedTask(t.spec, t.train, t.eval, t.__dict__["test"]) for n, t in tasks.items()}
        return Benchmark(name, sealed, TRACE_ORDERS, str(trace_dir), max_prompt_len=64, max_answer_len=8)

    registry.register_benchmark(name, metrics={n: m for n, (m, _) in TRACE_TASKS.items()})(factory)
    yield name
    registry._BENCHMARKS.pop(name, None)


def tiny_tune(out: Path, benchmark: str, **extra) -> tune.TuneConfig:
    """A 3-trial study of lora on the tiny model: 2 tasks, 2 steps each."""
    values = {"method": "lora", "benchmark": benchmark, "model": "tiny", "budget": 3, "num_tasks": 2,
              "max_steps_per_task": 2, "out": str(out), "run": TINY_RUN, **extra}
    return tune.TuneConfig(**values)


def test_tune_writes_a_study_from_eval_scores_and_repeats_with_the_seed(tmp_path, sealed_benchmark):
    """If this fails, `clbench tune` reads test data (tuned knobs would be chosen on the numbers they are reported
    on), writes no citable study file, or gives another best trial when rerun with the same seed."""
    first = tune.tune(tiny_tune(tmp_path / "a", sealed_benchmark), command="clbench tune (test a)")
    second = tune.tune(tiny_tune(tmp_path / "b", sealed_benchmark), command="clbench tune (test b)")

    assert (tmp_path / "a" / "study.json").is_file() and (tmp_path / "a" / "journal.log").is_file()
    assert first["finished_trials"] == 3 and [t["state"] for t in first["trials"]] == ["COMPLETE"] * 3
    assert first["protocol"]["score_split"] == "eval" and first["command"] == "clbench tune (test a)"
    assert set(first["best"]["params"]) == {"lr", "r"} and first["set"].startswith("--set lr=")
    assert len({json.dumps(t["params"], sort_keys=True) for t in first["trials"]}) == 3  # the sampler moved
    for trial in first["trials"]:
        run_dir = Path(trial["run_dir"])
        assert json.loads((run_dir / "metrics.json").read_text())["score_split"] == "eval"
        prompts = json.loads((run_dir / "predictions" / "after-2" / "FOMC.json").read_text())
        assert all(" eval " in p["prompt"] for p in prompts)  # conftest's prompts name their split
    assert [(t["params"], t["value"]) for t in first["trials"]] == [(t["params"], t["value"])
                                                                  for t in second["trials"]]
    assert first["best"] == second["best"]
    # the current defaults ran once on the same protocol, outside the budget, and the study says what tuning gained
    default = first["default"]
    from clbench import registry

    config = registry.get_method("lora").default_config({})
    assert default["params"] == {"lr": config.lr, "r": config.r}  # lora.yaml's
    default_metrics = json.loads((Path(default["run_dir"]) / "metrics.json").read_text())
    assert default_metrics["score_split"] == "eval" and default["value"] == default_metrics["OP"]
    assert default["best_minus_default"] == pytest.approx(first["best"]["value"] - default["value"])
    assert Path(default["run_dir"]).name == "default" and len(first["trials"]) == 3


def test_a_later_worker_joins_the_study_and_keeps_the_budget(tmp_path, sealed_benchmark):
    """If this fails, workers do not share one study through the journal file (each runs its own budget, so a
    method gets more trials than another), or a second worker repeats the first one's knobs."""
    tune.tune(tiny_tune(tmp_path / "s", sealed_benchmark, budget=1))
    study = tune.tune(tiny_tune(tmp_path / "s", sealed_benchmark, budget=2))
    assert [t["number"] for t in study["trials"]] == [0, 1]
    assert study["trials"][0]["params"] != study["trials"][1]["params"]
    again = tune.tune(tiny_tune(tmp_path / "s", sealed_benchmark, budget=2))
    assert len(again["trials"]) == 2  # budget reached: nothing more runs
    off = tune.tune(tiny_tune(tmp_path / "off", sealed_benchmark, budget=1, default_run=False))
    assert off["default"] is None and not (tmp_path / "off" / "default").exists()


def test_unknown_knob_in_a_search_space_is_one_line_before_any_model_loads(tmp_path):
    """If this fails, a typo in a search space starts loading a model (minutes) and then stops with a traceback,
    or trains with the typo ignored. The model path does not exist: loading it would be a different error."""
    space = tmp_path / "space.yaml"
    space.write_text("lrr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n")
    result = run_cli("tune", "--method", "lora", "--space", str(space), "--model", str(tmp_path / "no-model"),
                     "--out", str(tmp_path / "study"), timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown knob 'lrr'" in lines[0] and "did you mean 'lr'" in lines[0], result.stderr
    assert not (tmp_path / "study").exists()


def test_a_study_folder_refuses_another_protocol_or_an_edited_search_space(tmp_path):
    """If this fails, rerunning `clbench tune` into a study folder after editing the method's search_space: (or an
    option such as --max-steps-per-task) silently mixes trials of two spaces into one study and one best trial."""
    narrow, wide = tmp_path / "narrow.yaml", tmp_path / "wide.yaml"
    narrow.write_text("lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n")
    wide.write_text("lr: {type: float, low: 1.0e-4, high: 3.0e-2, log: true}\n")
    tune.open_study(tiny_tune(tmp_path / "s", "trace-mini", space=str(narrow)))
    tune.open_study(tiny_tune(tmp_path / "s", "trace-mini", space=str(narrow)))  # the same study joins
    with pytest.raises(ConfigError, match=r"another search space \(lr: .*0\.01.* != .*0\.03.*pass another --out"):
        tune.open_study(tiny_tune(tmp_path / "s", "trace-mini", space=str(wide)))
    with pytest.raises(ConfigError, match=r"another protocol \(max_steps_per_task: 2 != 3\)"):
        tune.open_study(tiny_tune(tmp_path / "s", "trace-mini", space=str(narrow), max_steps_per_task=3))


@pytest.mark.parametrize("method", TUNED_HERE)
def test_method_search_spaces_are_valid(method):
    """If this fails, `clbench tune --method M` stops at once: M's YAML has no search_space: block, or it names a
    knob M does not have, or a value M's config rejects."""
    space = tune.search_space(tune.TuneConfig(method=method))
    assert "lr" in space and space["lr"]["type"] == "float" and space["lr"]["log"] is True
