"""What a user sees on the command line: one clear error line and exit code 2 for bad input, nothing half-written."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from clbench.cli import app

runner = CliRunner()
FAST = ["--model", "tiny", "--num-tasks", "1", "--max-steps-per-task", "1", "--precision", "32-true",
        "--no-progress", "--max-new-tokens", "2", "--batch-size", "2"]


def invoke(*args):
    return runner.invoke(app, list(args))


def error_line(result) -> str:
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ")
    return lines[0]


def test_unknown_method_names_the_nearest(tmp_path):
    line = error_line(invoke("run", "--method", "lorra", "--out", str(tmp_path / "r"), *FAST))
    assert "unknown method 'lorra'" in line and "did you mean 'lora'" in line
    assert not (tmp_path / "r").exists()


def test_unknown_benchmark(tmp_path):
    line = error_line(invoke("run", "--benchmark", "trace-maxi", "--out", str(tmp_path / "r"), *FAST))
    assert "unknown benchmark 'trace-maxi'" in line and "trace-mini" in line


def test_missing_data_dir(tmp_path):
    line = error_line(invoke("run", "--data-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "r"), *FAST))
    assert "not found" in line and "nope" in line
    assert not (tmp_path / "r").exists()


def test_trace_without_data_says_where_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv("CLBENCH_TRACE_DIR", raising=False)
    line = error_line(invoke("run", "--benchmark", "trace", "--out", str(tmp_path / "r"), *FAST))
    assert "CLBENCH_TRACE_DIR" in line and "--data-dir" in line


def test_malformed_record_names_file_and_index(tmp_path, trace_dir):
    path = trace_dir / "C-STANCE" / "train.json"
    records = json.loads(path.read_text())
    del records[5]["answer"]
    path.write_text(json.dumps(records))
    line = error_line(invoke("run", "--data-dir", str(trace_dir), "--out", str(tmp_path / "r"), *FAST))
    assert "train.json" in line and "record 5" in line and '"answer"' in line
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("content, expected", [
    ('{"prompt": "x"}', "expected a JSON list"),
    ("[", "not valid JSON"),
    ("[]", "no records"),
])
def test_broken_split_files(tmp_path, trace_dir, content, expected):
    (trace_dir / "FOMC" / "test.json").write_text(content)
    line = error_line(invoke("run", "--data-dir", str(trace_dir), "--out", str(tmp_path / "r"), *FAST))
    assert expected in line and "FOMC" in line


def test_missing_split_names_the_file(tmp_path, trace_dir):
    (trace_dir / "Py150" / "eval.json").unlink()
    line = error_line(invoke("run", "--data-dir", str(trace_dir), "--out", str(tmp_path / "r"), *FAST))
    assert "missing data file" in line and "Py150" in line and "eval.json" in line


def test_method_knob_typo_names_the_nearest_key(tmp_path, trace_dir):
    line = error_line(invoke("run", "--data-dir", str(trace_dir), "--set", "rank=4", "--out", str(tmp_path / "r"),
                             *FAST))
    assert "unknown key 'rank'" in line
    line = error_line(invoke("run", "--data-dir", str(trace_dir), "--set", "alpah=4", "--out", str(tmp_path / "r"),
                             *FAST))
    assert "did you mean 'alpha'" in line


def test_run_yaml_typo_names_the_nearest_key(tmp_path, trace_dir):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("sead: 3\n")
    line = error_line(invoke("run", "--config", str(cfg), "--data-dir", str(trace_dir), *FAST))
    assert "unknown key 'sead'" in line and "did you mean 'seed'" in line


def test_bad_value_type(tmp_path, trace_dir):
    line = error_line(invoke("run", "--data-dir", str(trace_dir), "--set", "r=many", "--out", str(tmp_path / "r"),
                             *FAST))
    assert "'r' must be int" in line


def test_list_shows_methods_and_benchmarks():
    """If this fails, `clbench list` hides a registered method or benchmark (each must be a row of its table)."""
    import re

    from clbench import registry

    result = runner.invoke(app, ["list"], terminal_width=250)
    assert result.exit_code == 0
    cells = set(re.findall(r"^[│┃|]\s*(\S+)\s*[│┃|]", result.output, flags=re.MULTILINE))
    assert set(registry.methods()) | set(registry.benchmarks()) <= cells, result.output
    assert {"lora", "seqft", "moe-lora", "trace-mini", "trace"} <= cells


def test_run_then_leaderboard(tmp_path, trace_dir):
    runs = tmp_path / "runs"
    for seed in (0, 1):
        result = invoke("run", "--data-dir", str(trace_dir), "--seed", str(seed), "--out",
                        str(runs / f"lora-{seed}"), *FAST)
        assert result.exit_code == 0, result.output
    out = tmp_path / "lb.csv"
    result = invoke("leaderboard", str(runs), "--out", str(out))
    assert result.exit_code == 0, result.output
    import pandas as pd

    table = pd.read_csv(out)
    assert len(table) == 1 and table.loc[0, "n_seeds"] == 2 and table.loc[0, "method"] == "lora"


def test_score_a_predictions_file_as_json(tmp_path):
    """`clbench score --json` prints one object with TRACE's metric for the task."""
    preds = tmp_path / "preds.json"
    preds.write_text(json.dumps([{"prompt": "p", "answer": "A", "prediction": "A"},
                                 {"prompt": "p", "answer": "B", "prediction": "B "}]))
    result = invoke("score", "--benchmark", "trace", "--task", "FOMC", str(preds), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"benchmark": "trace", "task": "FOMC", "metric": "accuracy", "score": 0.5,
                                         "n": 2}


def test_score_unknown_task_and_bad_file(tmp_path):
    preds = tmp_path / "preds.json"
    preds.write_text(json.dumps([{"prompt": "p", "answer": "A"}]))
    assert "did you mean 'Py150'" in error_line(invoke("score", "--task", "Py15O", str(preds)))
    assert "record 0" in error_line(invoke("score", "--task", "FOMC", str(preds)))


def test_all_eight_trace_tasks_run_end_to_end_on_the_tiny_model(tmp_path, trace_dir):
    """A TRACE-layout folder with the 8 real task names goes through the whole loop with every TRACE scorer."""
    result = invoke("run", "--data-dir", str(trace_dir), "--model", "tiny", "--max-steps-per-task", "1",
                    "--precision", "32-true", "--no-progress", "--max-new-tokens", "2", "--batch-size", "2",
                    "--out", str(tmp_path / "r"))
    assert result.exit_code == 0, result.output
    import pandas as pd

    R = pd.read_csv(tmp_path / "r" / "R.csv", index_col=0)
    assert R.shape == (9, 8) and R.notna().all().all()
    assert list(R.columns) == ["C-STANCE", "FOMC", "MeetingBank", "Py150", "ScienceQA", "NumGLUE-cm", "NumGLUE-ds",
                               "20Minuten"]


def test_every_method_yaml_lists_exactly_its_knobs():
    """If this fails, a method's configs/methods/<name>.yaml misses a knob (users cannot see its default) or names
    one the method does not have (every run of that method would stop with 'unknown key')."""
    import dataclasses

    from clbench import registry
    from clbench.configs_dir import method_defaults

    bundled = {name: cls for name, cls in registry.methods().items() if cls.__module__.startswith("clbench.methods.")}
    assert len(bundled) >= 10
    for name, cls in bundled.items():
        fields = {f.name for f in dataclasses.fields(cls.config_class)}
        assert set(method_defaults(name)) == fields, name


def test_a_bundled_methods_defaults_have_one_source_its_yaml():
    """If this fails, a bundled method's config dataclass gives a default of its own again, so the YAML users read
    (and clbench tune starts from) and the code could disagree about what a run uses."""
    import dataclasses

    from clbench import registry

    bundled = {name: cls for name, cls in registry.methods().items() if cls.__module__.startswith("clbench.methods.")}
    for name, cls in bundled.items():
        with_default = [f.name for f in dataclasses.fields(cls.config_class)
                        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING]
        assert with_default == [], (name, with_default)


def command_options(name: str) -> dict[str, object]:
    """The options of `clbench NAME` by parameter name, as click parses them (the generated ones included)."""
    import typer

    group = typer.main.get_command(app)
    command = group.commands[name]
    ctx = command.make_context(name, ["--help"], resilient_parsing=True)
    return {p.name: p for p in command.get_params(ctx)}


def test_every_run_config_field_is_a_run_option_with_help():
    """If this fails, a RunConfig field cannot be set on the `clbench run` command line or its --help says nothing
    about it (the options are generated from the dataclass: clbench.cli_options)."""
    import dataclasses

    from clbench.run_config import RunConfig

    options = command_options("run")
    for f in dataclasses.fields(RunConfig):
        assert f.name in options, f.name
        assert options[f.name].help, f.name
    spellings = {opt for p in options.values() for opt in p.opts}
    assert {"--no-zero-shot", "--oracle-task-id", "--no-progress", "--general-every-task", "--micro-batch-size",
            "--batch-size", "--set", "-s", "--config", "--hardware", "--num-nodes"} <= spellings


def test_run_flags_arrive_as_field_values_over_the_yaml_and_the_profile(tmp_path, monkeypatch):
    """If this fails, a `clbench run` flag is lost or spelled into the wrong value, or an option the user did not
    give overrides the run YAML / hardware profile with its default (defaults < profile < --config < flags)."""
    import clbench.harness

    seen = {}

    class Recorder:
        def __init__(self, cfg, method_cfg):
            seen["cfg"], seen["method_cfg"] = cfg, method_cfg

        def run(self):
            pass

    monkeypatch.setattr(clbench.harness, "Harness", Recorder)
    yaml_path = tmp_path / "run.yaml"
    yaml_path.write_text("batch_size: 3\nprecision: bf16-mixed\nmethod_config:\n  r: 4\n")
    result = invoke("run", "--config", str(yaml_path), "--hardware", "8xgpu-node", "--no-zero-shot",
                    "--oracle-task-id", "--no-progress", "--general", "general-mini", "--general-every-task",
                    "--max-prompt-len", "64", "-s", "alpha=8")
    assert result.exit_code == 0, result.output
    cfg = seen["cfg"]
    assert (cfg.zero_shot, cfg.oracle_task_id, cfg.progress, cfg.general_every_task) == (False, True, False, True)
    assert cfg.max_prompt_len == 64 and cfg.general == "general-mini"
    assert cfg.batch_size == 3 and cfg.precision == "bf16-mixed"  # the YAML's, not the options' defaults
    assert cfg.devices == 8 and cfg.accumulate_grad_batches == 4  # the profile's
    assert cfg.method == "lora" and cfg.gradient_clip_val == 1.0  # built-in defaults
    assert seen["method_cfg"] == {"r": 4, "alpha": 8}
    result = invoke("run", "--config", str(yaml_path), "--micro-batch-size", "8", "--precision", "32-true")
    assert result.exit_code == 0, result.output
    assert seen["cfg"].batch_size == 8 and seen["cfg"].precision == "32-true"  # given = default still wins


def test_every_bench_config_field_is_a_bench_option_and_the_cli_starts_without_torch(monkeypatch):
    """If this fails, a BenchConfig field cannot be set with `clbench bench` (or has no --help), a given option
    does not reach BenchConfig, or building the CLI imports clbench.bench (torch: every `clbench` call would wait)."""
    import dataclasses
    import subprocess
    import sys

    check = ("import sys, typer; from clbench.cli import app; typer.main.get_command(app); "
             "sys.exit('clbench.bench' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", check], timeout=120).returncode == 0

    import clbench.bench
    from clbench.config import ConfigError

    options = command_options("bench")
    for f in dataclasses.fields(clbench.bench.BenchConfig):
        if f.metadata.get("cli", True):
            assert f.name in options and options[f.name].help, f.name
        else:
            assert f.name not in options, f.name
    seen = {}

    def fake_run_bench(cfg, log):
        seen["cfg"] = cfg
        raise ConfigError("stopped")

    monkeypatch.setattr(clbench.bench, "run_bench", fake_run_bench)
    assert error_line(invoke("bench", "--methods", "lora, hi=lora", "--seed", "3", "--clip", "0.5", "--set",
                             "hi.r=2")) == "error: stopped"
    cfg = seen["cfg"]
    assert (cfg.methods, cfg.seed, cfg.clip, cfg.overrides) == (["lora", "hi=lora"], 3, 0.5, {"hi": {"r": 2}})
    assert (cfg.steps, cfg.out) == (10, "runs/bench")
