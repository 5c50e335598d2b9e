"""`clbench gap`: a user reading why MoSEs trails per-task LoRA sees, per task, what it learned and what it kept.

Run folders are written by hand (test_leaderboard.write_run), so the expected numbers are known exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_leaderboard import TASKS3, make_R, write_run
from typer.testing import CliRunner

from clbench.cli import app
from clbench.config import ConfigError
from clbench.gap import gap_markdown, gap_table
from clbench.leaderboard import load_runs

MOSES_DIAG, MOSES_FINAL = [0.8, 0.7, 0.6], [0.5, 0.6, 0.6]
REF_DIAG, REF_FINAL = [0.9, 0.7, 0.9], [0.9, 0.7, 0.9]


@pytest.fixture
def runs(tmp_path):
    """Two moses seeds (one with a task-id file), one per-task-lora seed, and a lora run that is no reference."""
    for seed, shift in ((0, 0.02), (1, -0.02)):  # seeds average to MOSES_*
        R = make_R([f + shift for f in MOSES_FINAL], [d + shift for d in MOSES_DIAG])
        folder = write_run(tmp_path, "moses", seed, R=R)
        if seed == 0:
            (folder / "task_id_accuracy.csv").write_text(
                ",C-STANCE,FOMC,MeetingBank\nzero-shot,,,\nafter-1,1,,\nafter-2,1,1,\nafter-3,0.5,1,1\n")
    write_run(tmp_path, "per-task-lora", 0, R=make_R(REF_FINAL, REF_DIAG), task_aware=True)
    write_run(tmp_path, "lora", 0, R=make_R([0.1, 0.2, 0.3]))
    return tmp_path


def test_gap_splits_each_task_into_learned_and_forgotten_parts(runs):
    """If this fails, the table blames forgetting for what was never learned (or the reverse), or its mean row is not
    the OP difference a user sees on the leaderboard."""
    table = gap_table(load_runs([runs]), "moses")
    assert all(r.startswith("per-task-lora") for r in table["reference"])  # lora is no reference
    per_task = table[table["task"] != "mean"].set_index("task")
    for j, task in enumerate(TASKS3):
        row = per_task.loc[task]
        assert row["d_learned"] == pytest.approx(MOSES_DIAG[j] - REF_DIAG[j] if j < 2 else
                                                 MOSES_FINAL[j] - REF_FINAL[j])
        assert row["d_final"] == pytest.approx(MOSES_FINAL[j] - REF_FINAL[j])
        assert row["d_final"] == pytest.approx(row["d_learned"] + row["d_forgetting"])
    # C-STANCE: learned 0.8 vs 0.9 (-0.1), kept 0.5 vs 0.9 (-0.4 in all): -0.3 opened after it was learned
    assert per_task.loc["C-STANCE", "d_forgetting"] == pytest.approx(-0.3)
    assert per_task.loc["MeetingBank", "d_forgetting"] == pytest.approx(0.0)  # the last task cannot be forgotten
    mean = table[table["task"] == "mean"].iloc[0]
    assert mean["d_final"] == pytest.approx(np.mean(MOSES_FINAL) - np.mean(REF_FINAL))
    assert mean["seeds"] == "2 vs 1"


def test_task_id_accuracy_is_the_last_row_averaged_over_the_seeds_that_report_it(runs):
    """If this fails, a user reads a routing accuracy that is not what the keys did after the last task."""
    table = gap_table(load_runs([runs]), "moses").set_index("task")
    assert table.loc["C-STANCE", "task_id"] == pytest.approx(0.5)
    assert table.loc["FOMC", "task_id"] == pytest.approx(1.0)


def test_missing_method_or_reference_is_one_line(runs):
    """If this fails, a typo in --method or a grid without the references gives a traceback or an empty table."""
    loaded = load_runs([runs])
    with pytest.raises(ConfigError, match="no finished run of method 'mosess'.*moses"):
        gap_table(loaded, "mosess")
    with pytest.raises(ConfigError, match="no run of replay shares a section"):
        gap_table(loaded, "moses", ["replay"])
    result = CliRunner().invoke(app, ["gap", str(runs), "--method", "mosess"])
    assert result.exit_code != 0 and "Traceback" not in result.output


def test_cli_prints_and_writes_markdown(runs, tmp_path):
    """If this fails, `clbench gap --out` does not leave the file the docs embed, or it lacks the mean row."""
    out = tmp_path / "gap.md"
    result = CliRunner().invoke(app, ["gap", str(runs), "--method", "moses", "--against", "per-task-lora",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    md = out.read_text()
    assert md == gap_markdown(gap_table(load_runs([runs]), "moses", ["per-task-lora"]))
    assert "| **mean** | 70.0 | 83.3 | -13.3 | 56.7 | 83.3 | -26.7 | -13.3 | 83.3 |" in md
