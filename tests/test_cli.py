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
