"""`clbench bench-overhead` on the tiny model: it runs and writes its files, and the loops it times compute the same
thing (no timings asserted: they depend on the machine)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from clbench.bench_overhead import COLUMNS, VARIANTS, OverheadConfig, prepare, run_variant

# small enough for seconds on a busy CPU: byte-tokenised trace-mini prompts cut to 48 tokens, batch 2
TINY = dict(model="tiny", batch_size=2, max_prompt_len=48, max_answer_len=8, precision="bf16-mixed")


def test_overhead_mode_writes_a_row_per_loop_and_every_loop_trains_the_same_weights(tmp_path):
    """If this fails, `clbench bench-overhead` crashes, leaves out a loop or a column, its ratios are not relative to
    the bare loop, or a timed loop trains nothing / something else than the bare loop (so its speed says nothing)."""
    from typer.testing import CliRunner

    from clbench.cli import app

    result = CliRunner().invoke(app, ["bench-overhead", "--model", "tiny", "--batches", "4", "--rounds", "2",
                                      "--warmup", "1", "--batch-size", "2", "--max-prompt-len", "48",
                                      "--max-answer-len", "8", "--threads", "1", "--out", str(tmp_path),
                                      "--name", "tiny"])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "tiny.csv")
    assert list(table.columns) == COLUMNS
    rows = table.set_index("variant")
    assert list(rows.index) == ["bare", "harness", "lightning"]
    assert rows.loc["bare", "vs_bare"] == 1.0 and rows.loc["lightning", "vs_lightning"] == 1.0
    assert rows.loc["harness", "vs_bare"] == pytest.approx(
        rows.loc["harness", "step_s_median"] / rows.loc["bare", "step_s_median"], rel=1e-3)
    assert (rows["step_s_median"] > 0).all() and (rows["wall_s_per_step"] > 0).all()
    assert (rows["steps_timed"] == 2 * (4 - 2)).all()  # per round: batches minus the first and last step
    assert (rows["update_norm"] > 0).all()  # every loop moved the adapter
    assert (rows["rel_diff_vs_bare"] < 1e-2).all()  # ... to the bare loop's weights
    meta = json.loads((tmp_path / "tiny.json").read_text())
    for key in ("device", "versions", "command", "settings", "rows", "data", "step_seconds", "collate_ms_per_batch"):
        assert key in meta, key
    assert meta["settings"]["variants"] == ["bare", "harness", "lightning"] and "trace-mini" in meta["data"]
    assert [len(r) for r in meta["step_seconds"]["harness"]] == [2, 2] and meta["rounds_done"] == 2
    assert len(meta["load_average_per_loop"]["bare"]) == 2
    assert all(shape[0] == 2 for shape in meta["train_batch_shapes"]) and len(meta["train_batch_shapes"]) == 4


def _params(method) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in method.named_parameters() if p.requires_grad}


def _restore(method, state: dict[str, torch.Tensor]) -> None:
    params = dict(method.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def test_bare_and_harness_loops_reach_the_same_adapter_after_the_same_batches():
    """If this fails, the bare loop and the harness's Lightning fit (fit_trainer: bar, CSV log, meter, clipping,
    on-the-fly collation) do not compute the same training — other batches, no clipping, a missing or doubled step,
    another dropout mask, no update at all — so the overhead ratio compares different work.

    The tolerance is checked to be tight enough to matter: one step fewer, or no clipping, lands outside it."""
    cfg = OverheadConfig(**TINY, batches=5, clip=0.05)  # a clip this low is active at every step of the tiny model
    setup = prepare(cfg)
    initial = _params(setup.method)
    start = torch.cat([v.flatten() for v in initial.values()])

    def loop(name: str, steps: int | None = None) -> torch.Tensor:
        _restore(setup.method, initial)
        result = run_variant(setup, VARIANTS[name], cfg, steps=steps)
        assert len(result.starts) == (steps or cfg.batches)
        return result.final

    bare, harness = loop("bare"), loop("harness")
    update = (bare - start).abs().max()
    assert update > 1e-4 and (harness - start).abs().max() > 1e-4  # both trained
    tolerance = 1e-2 * update  # bf16 autocast: ~3 significant digits; both loops run the same ops in the same order
    assert (harness - bare).abs().max() <= tolerance
    # the tolerance separates a wrong loop from a right one
    assert (loop("bare", steps=cfg.batches - 1) - bare).abs().max() > 10 * tolerance
    assert (loop("harness-no-clip") - harness).abs().max() > 10 * tolerance
    assert (loop("bare-no-clip") - bare).abs().max() > 10 * tolerance


@pytest.mark.parametrize(("args", "message"), [
    (["--variants", "bare,harnes"], "unknown variant 'harnes'"),
    (["--batches", "2"], "--batches must be >= 3"),
    (["--precision", "16-true"], "--precision must be bf16-mixed or 32-true"),
])
def test_overhead_refuses_bad_settings_in_one_line_before_loading_a_model(tmp_path, args, message):
    """If this fails, a typo in bench-overhead's options is ignored (it times other loops than asked) or reported as a
    traceback."""
    from typer.testing import CliRunner

    from clbench.cli import app

    result = CliRunner().invoke(app, ["bench-overhead", *args, "--model", "tiny", "--out", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not list(tmp_path.iterdir())
