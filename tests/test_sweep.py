"""`clbench sweep`: a grid runs exactly its missing and unfinished cells, locally or as one submitit job array."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml
from conftest import run_cli

from clbench import sweep
from clbench.config import ConfigError

TINY = {"num_tasks": 2, "max_steps_per_task": 2, "batch_size": 4, "eval_batch_size": 4, "precision": "32-true",
        "progress": False, "max_new_tokens": 3}


def tiny_grid(tmp_path: Path, trace_dir: Path, **extra) -> sweep.GridConfig:
    """A 3-cell grid (lora, seeds 0-2) of tiny-model runs into tmp_path/runs."""
    values = {"methods": ["lora"], "seeds": [0, 1, 2], "model": "tiny", "results_dir": str(tmp_path / "runs"),
              "run": {**TINY, "data_dir": str(trace_dir)}, "name": "tiny", **extra}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(values))
    return sweep.load_grid(path)


def _partial(cell: sweep.Cell) -> None:
    spec = dataclasses.replace(cell.spec, run={**cell.spec.run, "stop_after": 1})
    sweep.run_cell(spec)


def test_sweep_runs_exactly_the_missing_and_unfinished_cells(tmp_path, trace_dir, monkeypatch):
    """If this fails, `clbench sweep` retrains finished cells (hours lost), restarts a half-finished one from
    scratch instead of resuming it, or leaves a missing cell out."""
    grid = tiny_grid(tmp_path, trace_dir)
    done, half, missing = sweep.plan(grid)
    sweep.run_cell(done.spec)
    _partial(half)
    assert [c.state for c in sweep.plan(grid)] == ["done", "partial", "missing"]
    done_metrics = (done.run_dir / "metrics.json").read_text()
    half_row1 = json.loads((half.run_dir / "progress.json").read_text())["rows"]["1"]

    ran: list[str] = []
    original = sweep.run_cell
    monkeypatch.setattr(sweep, "run_cell", lambda spec: ran.append(spec.label) or original(spec))
    cells, summary = sweep.sweep(grid)

    assert ran == [half.spec.label, missing.spec.label]
    assert summary["failed"] == {}
    assert [c.state for c in cells] == ["done", "done", "done"]
    assert (done.run_dir / "metrics.json").read_text() == done_metrics
    # resumed, not restarted: the row written before the sweep is still the one on disk
    assert json.loads((half.run_dir / "progress.json").read_text())["rows"]["1"] == half_row1


def test_slurm_executor_submits_one_job_array_of_the_missing_cells(tmp_path, trace_dir):
    """If this fails, `clbench sweep` on a cluster submits finished cells again, submits one job per cell instead of
    one array, or asks SLURM for other resources than the cells' hardware profile (a 2-node DDP run must be an
    array of 2-node jobs with one task per GPU). submitit's in-process 'debug' cluster stands in for SLURM."""
    grid = tiny_grid(tmp_path, trace_dir, executor="slurm", slurm={"cluster": "debug", "array_parallelism": 2})
    first = sweep.plan(grid)[0]
    sweep.run_cell(first.spec)
    cells, summary = sweep.sweep(grid)
    jobs = summary["job_objects"]
    assert [job.submission().args[0].label for job in jobs] == [c.spec.label for c in cells[1:]]
    for job in jobs:  # the debug executor runs a job when its result is asked for
        job.result()
    assert [c.state for c in sweep.plan(grid)] == ["done", "done", "done"]

    cluster = tiny_grid(tmp_path, trace_dir, hardware="slurm-2-nodes",
                        slurm={"partition": "gpu", "array_parallelism": 2, "timeout_min": 90,
                               "setup": ["source .venv/bin/activate"]})
    cluster.run.pop("precision")
    todo = sweep.to_run(sweep.plan(cluster))
    script = sweep.sbatch_script(cluster, todo)
    for line in ("#SBATCH --array=0-2%2", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8",
                 "#SBATCH --gpus-per-node=8", "#SBATCH --partition=gpu", "#SBATCH --time=90",
                 "source .venv/bin/activate"):
        assert line in script, line


def test_committed_results_grid_holds_the_reference_cells():
    """If this fails, the grid that describes the committed results (it replaced scripts/run_results.sh) no longer
    lists every registered method at seeds 0-2 plus seeds 3-4 of lora, seqft and moses, writes them outside
    results/runs, or leaves the general-ability evaluation out of them."""
    import re

    import clbench.methods
    from clbench.configs_dir import configs_root

    grid = sweep.load_grid(configs_root() / "sweeps" / "trace-mini-results.yaml")
    cells = sweep._products(grid)
    # the built-in methods, read from their sources (independent of what other tests did to the live registry)
    sources = Path(clbench.methods.__file__).parent.rglob("*.py")
    built_in = sorted({m for path in sources for m in re.findall(r'register_method\("([^"]+)"\)', path.read_text())})
    assert len(built_in) >= 16
    # mbpa's per-example local adaptation is weeks of CPU per run (the grid file says why): left to GPU users
    expected = [(m, "default", 1, s) for m in built_in if m != "mbpa" for s in (0, 1, 2)]
    expected += [(m, "default", 1, s) for m in ("lora", "seqft", "moses") for s in (3, 4)]
    # issue 18's MoSEs ablations beside the tuned default, and for MoSEs only
    expected += [("moses", k, 1, s) for k in ("sparse-routing", "no-prompts") for s in (0, 1, 2)]
    # issue 21's leaderboard before tuning: every adopted study's method once more at its defaults at study time
    tuned = ("lora", "moses", "seqft")
    expected += [(m, f"{m}-pre-tuning", 1, 0) for m in tuned]
    assert sorted(cells) == sorted(expected)
    studies = Path(__file__).resolve().parents[1] / "results" / "studies" / "tune"
    for method in tuned:
        config = yaml.safe_load((studies / method / "default" / "config.yaml").read_text())
        at_study_time = config["identity"]["method"]
        pre_tuning = sweep.knob_sets(grid)[f"{method}-pre-tuning"]
        assert pre_tuning == {k: at_study_time[k] for k in pre_tuning}, method
        # ... and restores every knob the study moved, so the row is the method as it was
        now = yaml.safe_load((configs_root() / "methods" / f"{method}.yaml").read_text())
        moved = {k for k, v in now.items() if k != "search_space" and at_study_time.get(k) != v}
        assert moved <= set(pre_tuning), (method, moved - set(pre_tuning))
    assert sweep.knob_sets(grid)["sparse-routing"] == {"experts_per_input": 2}
    assert grid.results_dir == "results/runs" and grid.model == "bundled" and grid.executor == "local"
    assert grid.run.get("general") == "general-mini"  # every committed row gets its general-ability delta


def test_an_also_part_can_define_knob_sets_for_its_methods_only(tmp_path):
    """If this fails, a grid cannot hold one method's ablations (a knob set under knob_sets applies to every
    method, and lora has no prompt_length), or two parts can give one knob-set name two meanings."""
    path = tmp_path / "grid.yaml"
    path.write_text("methods: [lora, moses]\nseeds: [0]\n"
                    "also:\n  - {methods: [moses], knob_sets: {no-prompts: {prompt_length: 0}}}\n")
    grid = sweep.load_grid(path)
    assert sorted(sweep._products(grid)) == [("lora", "default", 1, 0), ("moses", "default", 1, 0),
                                             ("moses", "no-prompts", 1, 0)]
    assert sweep.knob_sets(grid)["no-prompts"] == {"prompt_length": 0}
    path.write_text("methods: [moses]\nknob_sets: {default: {}, short: {prompt_length: 4}}\n"
                    "also:\n  - {knob_sets: {short: {prompt_length: 8}}}\n")
    with pytest.raises(ConfigError, match="redefines knob set 'short'"):
        sweep._products(sweep.load_grid(path))


@pytest.mark.parametrize(("text", "message"), [
    ("methods: [lora]\nseed: [0]\n", "unknown key 'seed' in grid"),
    ("methods: [lora]\nexecutor: pbs\n", "executor 'pbs' is not one of local, slurm"),
    ("methods: [lora]\nslurm: {partiton: gpu}\nexecutor: slurm\n", "did you mean 'partition'"),
])
def test_grid_mistakes_are_one_line(tmp_path, text, message):
    """If this fails, a typo in a grid file gives a traceback (or runs a wrong grid) instead of one error line."""
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    result = run_cli("sweep", str(path), "--dry-run", timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
