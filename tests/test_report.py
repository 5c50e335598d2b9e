"""`clbench report`: the markdown report and figures a user puts in a paper, built from hand-made run folders.

One report is written per module (figures take a few seconds on a shared CPU) and several tests read it.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_leaderboard import TASKS3, make_R, write_run
from typer.testing import CliRunner

from clbench import cl_metrics
from clbench.cli import app
from clbench.report import NoRunsError, write_report

# lora seed 0/1 final scores (order 1): the table must show their mean ± sample std ×100
LORA_FINALS = {0: [0.40, 0.50, 0.90], 1: [0.60, 0.70, 0.80]}
LORA_R = {s: make_R(f, diag=[0.9, 0.85, 0.0]) for s, f in LORA_FINALS.items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Runs of two models: on `tiny` lora (2 seeds, 2 orders), seqft (adds no parameters), a task-aware and a joint
    reference; on `bundled` one lora run; plus an unfinished and a corrupt folder."""
    root = tmp_path_factory.mktemp("runs")
    for seed, R in LORA_R.items():
        write_run(root, "lora", seed, R=R, added=[7168] * 3, infer_ms=6.0)
    write_run(root, "lora", 0, order=2, tasks=list(reversed(TASKS3)), R=make_R([0.3, 0.4, 0.5]), added=[7168] * 3)
    write_run(root, "seqft", 0, R=make_R([0.1, 0.2, 0.7]), added=[0, 0, 0], infer_ms=5.0, device="NVIDIA H100")
    write_run(root, "per-task-lora", 0, R=make_R([0.8, 0.8, 0.8]), task_aware=True, added=[7168, 14336, 21504])
    joint = make_R([0.7, 0.7, 0.7])
    joint[1:3] = np.nan  # joint training: zero-shot and one trained row only
    write_run(root, "mtl", 0, R=joint, joint=True, added=[7168])
    write_run(root / "bundled", "lora", 0, model="bundled", R=make_R([0.2, 0.3, 0.4]), wall=100.0)
    write_run(root, "lora", 5, done=False)
    bad = write_run(root / "bad", "lora", 6)
    (bad / "metrics.json").write_text("{not json")
    return root


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory) -> Path:
    """report.md written once for the module."""
    out = tmp_path_factory.mktemp("report")
    with pytest.warns(Warning):  # the unfinished and the corrupt folder
        return write_report([runs], out, bwt_conventions=["max-drop"])


def _section(md: str, model: str) -> str:
    start = md.index(f"## trace-mini · model {model}")
    end = md.find("\n## ", start + 5)
    return md[start:end]


def _table_row(section: str, label: str, order: int | None = None) -> list[str]:
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == label and (order is None or cells[1] == str(order)):
            return cells
    raise AssertionError(f"no table row for {label} in\n{section}")


def test_every_figure_is_a_nonempty_png_at_print_resolution(report):
    """If this fails, `clbench report` crashes on some figure, writes an empty/corrupt PNG, a low-resolution one
    that blurs in a paper, or report.md links to a figure that does not exist."""
    figures = sorted((report.parent / "figures").rglob("*.png"))
    names = {p.name for p in figures}
    for name in ("op_vs_added_params.png", "bwt.png", "params_vs_tasks.png", "forgetting_order1.png",
                 "forgetting_order2.png", "latency_vs_op.png"):
        assert name in names, names
    heatmaps = [p for p in figures if p.name.startswith("heatmap_")]
    assert len(heatmaps) == 6  # tiny: lora o1, lora o2, seqft, per-task-lora, mtl; bundled: lora
    for path in figures:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width > 500 and image.height > 300
            assert min(image.info["dpi"]) >= 149
            assert len(image.getcolors(1 << 20) or range(100)) > 20  # not a blank canvas
    md = report.read_text()
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(linked) == sorted(p.relative_to(report.parent).as_posix() for p in figures)


def test_markdown_table_has_the_right_numbers(report):
    """If this fails, the TRACE-style table in the report shows per-task scores, OP, BWT or FWT that differ from
    the runs (wrong mean, wrong std, wrong scale or wrong column), and a paper would quote them."""
    tiny = _section(report.read_text(), "tiny")
    assert "| Method | Order | Seeds | C-STANCE | FOMC | MeetingBank | OP | BWT | FWT | BWT (max-drop) |" in tiny
    row = _table_row(tiny, "lora", order=1)
    finals = np.array(list(LORA_FINALS.values()))
    expected_tasks = [f"{100 * m:.1f} ± {100 * s:.1f}" for m, s in zip(finals.mean(0), finals.std(0, ddof=1),
                                                                         strict=True)]
    assert row[2] == "2" and row[3:6] == expected_tasks == ["50.0 ± 14.1", "60.0 ± 14.1", "85.0 ± 7.1"]
    for cell, fn in zip(row[6:9], (cl_metrics.overall_performance, cl_metrics.backward_transfer,
                                   cl_metrics.forward_transfer), strict=True):
        values = [fn(R) for R in LORA_R.values()]
        assert cell.strip("*") == f"{100 * np.mean(values):.1f} ± {100 * np.std(values, ddof=1):.1f}"
    assert row[6] == "**65.0 ± 7.1**"  # best CL method of order 1 is bold
    values = [cl_metrics.forgetting_max_drop(R) for R in LORA_R.values()]
    assert row[9] == f"{100 * np.mean(values):.1f} ± {100 * np.std(values, ddof=1):.1f}"
    # one seed: a plain number, no "± 0.0" that would claim zero variance
    assert _table_row(tiny, "seqft", order=1)[6] == f"{100 * np.mean([0.1, 0.2, 0.7]):.1f}"
    # references carry their mark, are never bold, and joint training has no BWT/FWT
    assert _table_row(tiny, "per-task-lora†", order=1)[6] == "80.0"
    mtl = _table_row(tiny, "mtl‡", order=1)
    assert mtl[6] == "70.0" and mtl[7] == mtl[8] == "n/a"
    assert "† task-aware" in report.read_text() and "‡ joint training" in report.read_text()


def test_models_get_separate_sections(report):
    """If this fails, runs on two different models end up in one table (or one figure) as if comparable."""
    md = report.read_text()
    assert md.count("## trace-mini · model") == 2
    bundled = _section(md, "bundled")
    row = _table_row(bundled, "lora")
    assert row[1] == "1" and row[5] == f"**{100 * np.mean([0.2, 0.3, 0.4]):.1f}**"  # the only CL method: best
    assert "seqft" not in bundled.split("### Figures")[0]
    assert (report.parent / "figures").is_dir() and len(list((report.parent / "figures").iterdir())) == 2


def test_report_lists_runs_hardware_wall_time_commands_and_skipped(report, runs):
    """If this fails, a reader cannot tell which runs, hardware and commands produced the numbers, or which
    folders were left out of the report."""
    md = report.read_text()
    runs_used = md[md.index("## Runs used"):md.index("## Hardware")]
    assert runs_used.count("`") == 2 * 7  # seven finished runs, each folder named once
    assert "- cpu x2: 6 runs" in md and "- NVIDIA H100: 1 run" in md
    wall = 6 * 60.0 + 100.0
    assert f"{int(wall) // 60}m {int(wall) % 60:02d}s over 7 runs" in md
    commands = md[md.index("## Commands"):]
    assert "clbench run --method seqft --seed 0 --order 1 --model tiny" in commands
    assert commands.count("clbench run --method") == 7
    left_out = md[md.index("## Runs left out"):]
    assert "unfinished" in left_out and str(runs / "trace-mini-tiny-lora-o1-s5") in left_out
    assert "corrupt" in left_out and str(runs / "bad") in left_out
    tiny = _section(md, "tiny")
    order_spread = _table_row(tiny[tiny.index("### Cost"):], "lora", order=1)[9]
    assert order_spread == f"{100 * abs(np.mean([0.3, 0.4, 0.5]) - 0.65):.1f}"


def test_cli_report_writes_one_section_and_names_skipped_folders(runs, tmp_path):
    """If this fails, `clbench report` crashes, prints a traceback or multi-line warnings instead of one line per
    skipped folder, ignores --model, leaves stale figures from an earlier report, or an empty selection gives no
    clear error."""
    out = tmp_path / "rep"
    stale = out / "figures" / "old" / "gone.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    result = CliRunner().invoke(app, ["report", str(runs), "--out", str(out), "--model", "bundled"])
    assert result.exit_code == 0, result.output
    warnings = [ln for ln in result.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 2 and all(str(runs) in w for w in warnings)
    assert "Traceback" not in result.output and not stale.exists()
    md = (out / "report.md").read_text()
    assert md.count("## trace-mini · model") == 1 and "model bundled" in md
    empty = CliRunner().invoke(app, ["report", str(runs), "--out", str(out), "--model", "nope"])
    assert empty.exit_code == 2 and empty.stderr.strip().splitlines()[-1].startswith("error: no finished runs")


def test_no_runs_is_a_clear_error(tmp_path):
    """If this fails, pointing the report at an empty folder writes an empty report silently (or crashes)."""
    with pytest.raises(NoRunsError, match="no finished runs"):
        write_report([tmp_path], tmp_path / "out")


def test_make_results_copies_the_leaderboard_and_two_figures_into_the_readme(report, tmp_path):
    """If this fails, `make results` leaves README.md showing numbers or figures the run folders no longer produce."""
    import subprocess
    import sys

    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:start -->\nstale numbers\n<!-- results:end -->\nrest\n")
    script = Path(__file__).resolve().parents[1] / "scripts" / "readme_results.py"
    done = subprocess.run([sys.executable, str(script), "--report", str(report), "--readme",
                           str(readme)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    text = readme.read_text()
    assert "stale numbers" not in text and text.startswith("intro\n") and text.endswith("rest\n")
    block = text.split("<!-- results:start -->")[1].split("<!-- results:end -->")[0]
    assert "| Method | Seeds |" in block and "OP" in block
    images = [line.split('src="')[1].split('"')[0] for line in block.splitlines() if line.startswith("<img")]
    assert [Path(i).name for i in images] == ["op_vs_added_params.png", "forgetting_order1.png"]
    assert all((readme.parent / i).is_file() for i in images)  # the paths resolve from the README's folder


def test_report_shows_intervals_vs_lora_and_splits_hardware(tmp_path):
    """If this fails, the report (and the README table copied from it) shows only the seed ± std, without the 95 %
    interval over seeds and test examples or which methods are distinguishable from lora, or it puts runs from two
    hardware classes in one table as if comparable."""
    import subprocess
    import sys

    from test_intervals import random_correct, write_examples_run
    from test_leaderboard import AMX_CPU, AVX2_CPU

    from clbench.leaderboard import build_leaderboard

    rng = np.random.default_rng(0)
    for seed in range(3):
        base = random_correct(rng, 0.4)
        write_examples_run(tmp_path / "runs", "lora", seed, base, hardware=AMX_CPU)
        better = [c.copy() for c in base]
        for c in better:
            c[3] = 1.0
        write_examples_run(tmp_path / "runs", "moses", seed, better, hardware=AMX_CPU)
    write_examples_run(tmp_path / "runs" / "other", "lora", 0, random_correct(rng, 0.6), hardware=AVX2_CPU)
    md = write_report([tmp_path / "runs"], tmp_path / "report").read_text()
    assert md.count("## trace-mini · model tiny") == 2
    amx = md[md.index("hardware cpu:avx512+avx512_bf16+amx\n"):]
    amx = amx[:amx.index("\n## ")]
    assert "| OP 95 % CI | BWT 95 % CI | FWT 95 % CI | vs lora |" in amx and "distinguishable" in amx
    table = build_leaderboard([tmp_path / "runs"])
    lora = table[(table["method"] == "lora") & (table["n_seeds"] == 3)].iloc[0]
    row = _table_row(amx, "lora")  # Method, Seeds, 3 tasks, OP, BWT, FWT, then the intervals
    assert row[8] == f"[{100 * lora['OP_ci_low']:.1f}, {100 * lora['OP_ci_high']:.1f}]" and row[-1] == "—"
    assert _table_row(amx, "moses")[-1].startswith("OP +")
    assert "cpu:avx2 (AMD EPYC 7B12, 2 threads): 1 run" in md
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:start -->\n<!-- results:end -->\n")
    script = Path(__file__).resolve().parents[1] / "scripts" / "readme_results.py"
    done = subprocess.run([sys.executable, str(script), "--report", str(tmp_path / "report" / "report.md"),
                           "--readme", str(readme)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "OP 95 % CI" in readme.read_text() and "not distinguishable" in readme.read_text()
