"""``--eval-rows needed``: evaluate only the entries of R that OP, BWT and FWT read, with the same OP/BWT/FWT."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_run

from clbench import cl_metrics


def _needed_mask(T: int) -> np.ndarray:
    mask = np.zeros((T + 1, T), dtype=bool)
    for row in range(T + 1):
        mask[row, cl_metrics.needed_columns(row, T)] = True
    return mask


@pytest.mark.parametrize("T", [1, 2, 3, 8])
def test_needed_entries_determine_op_bwt_fwt(T: int):
    """If needed_columns left out an entry a metric reads, "needed" runs would report NaN or wrong OP/BWT/FWT."""
    R = np.random.default_rng(T).random((T + 1, T))
    sparse = np.where(_needed_mask(T), R, np.nan)
    full, needed = cl_metrics.summarize(R), cl_metrics.summarize(sparse)
    assert full.keys() == needed.keys()
    for name in full:
        assert np.isnan(full[name]) == np.isnan(needed[name]), name
        if not np.isnan(full[name]):
            assert needed[name] == pytest.approx(full[name]), name


def test_needed_skips_most_entries_on_eight_tasks():
    """The point of the option: on TRACE's 8 tasks it evaluates 30 of the 72 (task, row) pairs."""
    assert int(_needed_mask(8).sum()) == 30


def test_needed_run_has_the_full_runs_metrics_and_evaluates_fewer_entries(tmp_path: Path, trace_dir: Path):
    """A user who picks --eval-rows needed to save time must get the OP/BWT/FWT of the full matrix, with the
    skipped entries left empty (NaN in R.csv, no predictions file), not zeros or copies."""
    from clbench.harness import Harness

    dirs = {}
    for rows in ("full", "needed"):
        cfg = tiny_run(tmp_path, trace_dir, num_tasks=3, eval_rows=rows, out=str(tmp_path / rows))
        dirs[rows] = Harness(cfg).run()
    full, needed = (json.loads((dirs[k] / "metrics.json").read_text()) for k in ("full", "needed"))
    for name in ("OP", "BWT", "FWT"):
        assert needed[name] == pytest.approx(full[name]), name
    R_full = np.array(full["R"], dtype=float)
    R_needed = np.array([[np.nan if v is None else v for v in row] for row in needed["R"]], dtype=float)
    mask = _needed_mask(3)
    assert not np.isnan(R_full).any()
    np.testing.assert_allclose(R_needed[mask], R_full[mask])
    assert np.isnan(R_needed[~mask]).all() and (~mask).sum() == 2  # R[1, 2] and R[2, 0]
    predicted = {p.relative_to(dirs["needed"] / "predictions").as_posix()
                 for p in (dirs["needed"] / "predictions").rglob("*.json")}
    assert len(predicted) == int(mask.sum()) and "after-1/" + needed["tasks"][2] + ".json" not in predicted


def test_full_spelled_out_is_the_default_run(tmp_path: Path, trace_dir: Path):
    """`--eval-rows full` must resume the same folder as leaving it unset; an unknown value fails in one line."""
    from clbench.config import ConfigError
    from clbench.harness import Harness

    default = Harness(tiny_run(tmp_path, trace_dir, out=None, results_dir=str(tmp_path / "runs")))
    spelled = Harness(tiny_run(tmp_path, trace_dir, out=None, results_dir=str(tmp_path / "runs"), eval_rows="full"))
    needed = Harness(tiny_run(tmp_path, trace_dir, out=None, results_dir=str(tmp_path / "runs"), eval_rows="needed"))
    assert spelled.run_dir == default.run_dir != needed.run_dir
    with pytest.raises(ConfigError, match="eval_rows 'some'"):
        Harness(tiny_run(tmp_path, trace_dir, eval_rows="some"))


def test_cli_passes_eval_rows(monkeypatch: pytest.MonkeyPatch):
    """`clbench run --eval-rows needed` must reach the run config, or the option would silently do nothing."""
    from typer.testing import CliRunner

    import clbench.harness
    from clbench.cli import app

    seen = {}

    class Recorder:
        def __init__(self, cfg, method_cfg=None, command=None):
            seen["cfg"] = cfg

        def run(self) -> None:
            pass

    monkeypatch.setattr(clbench.harness, "Harness", Recorder)
    result = CliRunner().invoke(app, ["run", "--model", "tiny", "--eval-rows", "needed"])
    assert result.exit_code == 0, result.output
    assert seen["cfg"].eval_rows == "needed"
