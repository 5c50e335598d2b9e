"""Run folders as a user meets them: their own runs apart from the committed reference runs, a finished run shown
rather than silently skipped, one writer per folder, and a broken resume explained in one line."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest
from conftest import tiny_run
from typer.testing import CliRunner

from clbench.cli import app
from clbench.harness import Harness, RunConfig
from clbench.results import RunBusyError, RunStore

FAST = ["--model", "tiny", "--num-tasks", "1", "--max-steps-per-task", "1", "--precision", "32-true",
        "--no-progress", "--max-new-tokens", "2", "--batch-size", "2"]


def one_error_line(result) -> str:
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_user_runs_never_land_in_the_committed_reference_folder(tmp_path, trace_dir, monkeypatch):
    """If this fails, `make demo` on a fresh clone finds the committed reference run at its default path and does
    nothing ("already finished"), or a user's run overwrites a committed result."""
    monkeypatch.chdir(tmp_path)
    harness = Harness(RunConfig(method="lora", benchmark="trace-mini", data_dir=str(trace_dir), model="tiny",
                                num_tasks=1))
    assert harness.run_dir.parts[0] == "runs" and "results" not in harness.run_dir.parts
    gitignore = (Path(__file__).resolve().parents[1] / ".gitignore").read_text().splitlines()
    assert "/runs/" in gitignore


def test_rerunning_a_finished_command_shows_its_R_and_metrics(tmp_path, trace_dir):
    """If this fails, a finished run answers with one line and the user has to dig R out of the folder."""
    args = ["run", "--data-dir", str(trace_dir), "--out", str(tmp_path / "r"), *FAST, "--num-tasks", "2"]
    assert CliRunner().invoke(app, args).exit_code == 0
    again = CliRunner().invoke(app, args, terminal_width=200)
    assert again.exit_code == 0, again.output
    assert "already finished" in again.output and "OP " in again.output and "BWT " in again.output
    assert "zero-shot" in again.output and "after-1:C-STANCE" in again.output  # the R table's rows


def _hold_lock(folder: str, ready, release) -> None:
    with RunStore(folder).locked():
        ready.set()
        release.wait(60)


def test_a_second_process_on_a_busy_run_folder_fails_naming_the_holder(tmp_path, trace_dir):
    """If this fails, the same command started twice (or a sweep scheduling a cell twice) has two processes write
    one run folder, and both end with `done`."""
    folder = tmp_path / "busy"
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(folder), ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        with pytest.raises(RunBusyError, match=rf"busy.*pid {holder.pid}"):
            Harness(tiny_run(tmp_path, trace_dir, out=str(folder), num_tasks=1)).run()
        line = one_error_line(CliRunner().invoke(app, ["run", "--data-dir", str(trace_dir), "--out", str(folder),
                                                       *FAST]))
        assert f"pid {holder.pid}" in line
        assert not (folder / "R.csv").exists()  # the refused run wrote nothing
    finally:
        release.set()
        holder.join(30)
    # once the holder is gone (a crash releases the OS lock too) the folder runs normally
    assert (Harness(tiny_run(tmp_path, trace_dir, out=str(folder), num_tasks=1)).run() / "DONE").is_file()
    assert not (folder / ".owner.json").exists()


def test_resume_without_its_state_file_is_one_line(tmp_path, trace_dir):
    """If this fails, a run folder whose state/ checkpoint was deleted ends a resume in a FileNotFoundError
    traceback instead of saying which file is missing and what to do."""
    out = tmp_path / "r"
    args = ["run", "--data-dir", str(trace_dir), "--out", str(out), *FAST[:2], "--num-tasks", "2",
            *FAST[4:]]
    assert CliRunner().invoke(app, [*args, "--stop-after", "1"]).exit_code == 0
    for state in (out / "state").glob("*.pt"):
        state.unlink()
    line = one_error_line(CliRunner().invoke(app, args))
    assert "after-1.pt" in line and "cannot resume" in line


def test_negative_steps_per_task_is_one_line(tmp_path, trace_dir):
    """If this fails, `--max-steps-per-task -3` prints Lightning's MisconfigurationException traceback."""
    args = ["run", "--data-dir", str(trace_dir), "--out", str(tmp_path / "r"), *FAST]
    line = one_error_line(CliRunner().invoke(app, [*args, "--max-steps-per-task", "-3"]))
    assert "max_steps_per_task must be >= 1" in line
    assert not (tmp_path / "r").exists()


def test_the_run_yaml_chooses_the_method_on_the_command_line(tmp_path, trace_dir):
    """If this fails, `clbench run --config run.yaml` ignores the YAML's `method:` (the CLI's default wins)."""
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text("method: no-such-method\n")
    line = one_error_line(CliRunner().invoke(app, ["run", "--config", str(run_yaml), "--data-dir", str(trace_dir),
                                                   "--out", str(tmp_path / "r"), *FAST]))
    assert "unknown method 'no-such-method'" in line
