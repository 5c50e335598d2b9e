"""Multi-process runs through Lightning's own DDP launcher (gloo on CPU): same results as one process, resumable,
only rank 0 writes. Plain ``ddp`` re-runs the command line in each rank, so the CLI runs in a subprocess here."""

from __future__ import annotations

import json
import subprocess

from conftest import run_cli, run_predictions

COMMON = ["run", "--method", "lora", "--model", "tiny", "--num-tasks", "2", "--max-steps-per-task", "4",
          "--precision", "32-true", "--no-progress", "--max-new-tokens", "4", "--accelerator", "cpu",
          "--set", "lr=0.05", "--set", "dropout=0", "--eval-batch-size", "3"]  # dropout masks differ per rank


def clbench(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    result = run_cli(*args, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_two_processes_match_one_process_and_resume(tmp_path, trace_dir):
    """1 process × batch 4 and 2 processes × batch 2 train on the same global batches and gather every prediction
    back in file order: the two runs' predictions (hence R) must be identical. The 2-process run is stopped after
    task 1 and resumed."""
    one = tmp_path / "one"
    clbench(*COMMON, "--data-dir", str(trace_dir), "--batch-size", "4", "--out", str(one))
    two = tmp_path / "two"
    ddp = [*COMMON, "--data-dir", str(trace_dir), "--batch-size", "2", "--devices", "2", "--strategy", "ddp",
           "--out", str(two)]
    clbench(*ddp, "--stop-after", "1")
    assert not (two / "DONE").exists()
    assert json.loads((two / "progress.json").read_text())["rows"].keys() == {"0", "1"}
    resumed = clbench(*ddp)
    assert "resuming" in resumed.stderr
    assert (two / "DONE").is_file()
    preds = run_predictions(one)
    assert preds == run_predictions(two)
    zero_shot, after = preds["after-0/C-STANCE.json"], preds["after-2/C-STANCE.json"]
    assert zero_shot != after  # training changed the outputs, so the comparison above is not vacuous
    assert (one / "R.csv").read_text() == (two / "R.csv").read_text()


def test_non_zero_rank_writes_nothing(tmp_path, trace_dir, monkeypatch):
    """Every result file is written by rank 0 only: the same run as rank 1 leaves the run folder empty."""
    from conftest import tiny_run
    from lightning.pytorch.utilities import rank_zero_only

    from clbench.harness import Harness

    monkeypatch.setattr(rank_zero_only, "rank", 1)
    run_dir = tmp_path / "rank1"
    Harness(tiny_run(tmp_path, trace_dir, num_tasks=1, out=str(run_dir))).run()
    written = [p for p in run_dir.rglob("*") if p.is_file()] if run_dir.exists() else []
    assert written == []


def test_unsupported_strategy_is_one_clear_line(tmp_path, trace_dir):
    """FSDP/DeepSpeed on a CPU machine: an error line before any model is loaded, never a hang."""
    for strategy, expected in (("fsdp", "needs CUDA GPUs"), ("deepspeed_stage_2", "deepspeed"),
                               ("dpp", "unknown strategy"), ("ddp_spawn", "use --strategy ddp")):
        result = run_cli(*COMMON, "--data-dir", str(trace_dir), "--strategy", strategy, "--out",
                         str(tmp_path / strategy), timeout=120)
        assert result.returncode == 2
        lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
        assert lines[-1].startswith("error: ") and expected in lines[-1], result.stderr
        assert not (tmp_path / strategy).exists()
