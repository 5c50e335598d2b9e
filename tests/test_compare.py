"""`clbench compare`: what a user reads to see how far two runs of one protocol are apart."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_run


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    """Two finished tiny runs that differ only in their seed, plus a 1-task run."""
    from conftest import make_trace_layout

    from clbench.harness import Harness

    root = tmp_path_factory.mktemp("compare")
    data = make_trace_layout(root / "data")
    runs = [Harness(tiny_run(root / f"s{seed}", data, seed=seed)).run() for seed in (0, 1)]
    one_task = Harness(tiny_run(root / "one", data, num_tasks=1)).run()
    return runs, one_task


def test_a_run_compared_with_itself_differs_nowhere(two_seeds):
    """If this fails, `clbench compare` reports differences between identical runs, so every sensitivity figure it
    gives (threads, precision, machine) is inflated."""
    from clbench.compare import compare_runs

    run, _ = two_seeds[0]
    table = compare_runs(run, [run]).set_index("differs")
    same = table.loc["nothing"]
    assert same["max_abs_dR"] == same["dOP"] == same["answers_changed"] == 0
    assert same["answers_compared"] > 0


def test_another_seed_is_named_and_its_differences_are_the_matrices(two_seeds):
    """If this fails, the comparison hides what distinguishes the runs, or its ΔR / ΔOP / changed answers are not
    what the two folders hold (a user would misjudge how much a seed moves results)."""
    import numpy as np

    from clbench.compare import compare_runs

    (a, b), _ = two_seeds
    row = compare_runs(a, [b]).iloc[1]
    assert row["differs"].split() == ["seed=1"]
    R_a, R_b = (np.array(json.loads((d / "metrics.json").read_text())["R"], dtype=float) for d in (a, b))
    diff = np.abs(R_a - R_b)
    assert row["max_abs_dR"] == pytest.approx(np.nanmax(diff)) and row["mean_abs_dR"] == pytest.approx(np.nanmean(diff))
    op = [json.loads((d / "metrics.json").read_text())["OP"] for d in (a, b)]
    assert row["dOP"] == pytest.approx(op[1] - op[0])
    changed = compared = 0
    for path in (a / "predictions").rglob("*.json"):
        left = [r["prediction"] for r in json.loads(path.read_text())]
        right = [r["prediction"] for r in json.loads((b / path.relative_to(a)).read_text())]
        changed += sum(x != y for x, y in zip(left, right, strict=True))
        compared += len(left)
    assert (row["answers_compared"], row["answers_changed"]) == (compared, pytest.approx(changed / compared))


def test_runs_of_different_task_lists_or_unfinished_folders_are_one_line_errors(two_seeds, tmp_path):
    """If this fails, comparing a 1-task run with a 2-task run prints a meaningless table, or a folder that is not
    a finished run gives a traceback instead of one line."""
    from conftest import run_cli

    (a, _), one_task = two_seeds
    for args, words in (((str(a), str(one_task)), "compare runs of one benchmark"),
                        ((str(a), str(tmp_path)), "not a finished run folder")):
        result = run_cli("compare", *args)
        assert result.returncode != 0 and words in result.stderr
        assert "Traceback" not in result.stderr
