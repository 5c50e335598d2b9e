"""`clbench studies`: the table of tuning studies that says which method's defaults come from its study."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import run_cli

from clbench.config import ConfigError
from clbench.studies import load_studies, studies_markdown, study_row


def write_study(folder: Path, method: str, best: dict, default_value: float | None) -> None:
    """A study.json as `clbench tune` writes it: two finished trials (60 s and 120 s), a best and maybe defaults."""
    folder.mkdir(parents=True)
    trials = [{"number": 0, "state": "COMPLETE", "params": best, "value": 0.6, "wall_time_s": 60.0},
              {"number": 1, "state": "COMPLETE", "params": best, "value": 0.5, "wall_time_s": 120.0},
              {"number": 2, "state": "FAIL", "params": {}, "value": None}]
    default = None if default_value is None else {"params": {}, "value": default_value}
    study = {"method": method, "budget": 2, "trials": trials, "best": {"number": 0, "value": 0.6, "params": best},
             "default": default}
    (folder / "study.json").write_text(json.dumps(study))


def test_the_table_says_whether_the_yaml_defaults_are_the_best_trial(tmp_path):
    """If this fails, the studies table calls a method tuned when its YAML defaults are not its study's best knobs
    (or the reverse), or misstates the budget's cost or the gain over the defaults."""
    write_study(tmp_path / "lora", "lora", {"lr": 0.000585, "r": 16}, default_value=0.45)  # lora.yaml: 5.8e-4, 16
    write_study(tmp_path / "seqft", "seqft", {"lr": 0.5}, default_value=None)
    rows = {r.study: r for r in (study_row(f, s) for f, s in load_studies(tmp_path))}

    lora = rows["lora"]
    assert lora.adopted == "yes" and lora.trials == "2/2" and lora.minutes_per_trial == pytest.approx(1.5)
    assert lora.gain == pytest.approx(0.15) and lora.best_trial == 0
    assert rows["seqft"].adopted == "no (lr)" and math.isnan(rows["seqft"].default_op)
    table = studies_markdown(list(rows.values()))
    assert "| lora | lora | 2/2 | 1.5 | 0.600 (#0) | 0.450 | +0.150 | yes |" in table
    assert "| seqft | seqft | 2/2 | 1.5 | 0.600 (#0) | – | – | no (lr) |" in table


def test_a_folder_without_studies_is_one_line(tmp_path):
    """If this fails, `clbench studies` on a wrong folder prints a traceback or an empty table instead of saying
    that no study file is there."""
    with pytest.raises(ConfigError, match="no study.json in"):
        load_studies(tmp_path)
    write_study(tmp_path / "lora", "lora", {"lr": 0.001, "r": 8}, default_value=0.5)
    out = tmp_path / "studies.md"
    result = run_cli("studies", str(tmp_path), "--out", str(out), timeout=120)
    assert result.returncode == 0, result.stderr
    assert "| lora | lora |" in out.read_text() and "lora" in result.stdout
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "study.json").write_text("{")
    result = run_cli("studies", str(tmp_path), timeout=120)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert "not a readable study file" in result.stderr


def test_the_trials_table_lists_finished_trials_best_first_with_their_knobs(tmp_path):
    """If this fails, a study README built from `clbench studies --trials` misorders trials, shows a failed trial as a
    result, or writes knob values other than the 2-significant-digit ones the adopted YAML holds."""
    from clbench.studies import format_knob, trials_markdown

    study = {"method": "lora", "budget": 3, "search_space": {"lr": {}, "r": {}},
             "trials": [{"number": 0, "state": "COMPLETE", "params": {"lr": 0.00125, "r": 4}, "value": 0.5,
                         "wall_time_s": 60.0},
                        {"number": 1, "state": "FAIL", "params": {"lr": 0.1, "r": 8}, "value": None},
                        {"number": 2, "state": "COMPLETE", "params": {"lr": 0.25, "r": 16}, "value": 0.7,
                         "wall_time_s": 90.0}],
             "best": {"number": 2, "value": 0.7, "params": {"lr": 0.25, "r": 16}},
             "default": {"params": {"lr": 0.001, "r": 8}, "value": 0.45}}
    lines = trials_markdown(study).splitlines()
    assert lines[0] == "| trial | eval OP | lr | r | minutes |"
    assert lines[2:] == ["| 2 (best) | 0.700 | 0.25 | 16 | 1.5 |", "| 0 | 0.500 | 1.3e-3 | 4 | 1.0 |",
                         "| defaults at study time (`default/`) | 0.450 | 1.0e-3 | 8 | – |"]
    assert [format_knob(v) for v in (6.5e-3, 32, 0.0, 12.3, 3.0e-5)] == ["6.5e-3", "32", "0", "12", "3.0e-5"]
