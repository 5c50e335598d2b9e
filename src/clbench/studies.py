"""``clbench studies``: one table of the tuning studies under a folder (``results/studies/tune`` by default).

Per study (one ``<folder>/study.json`` written by ``clbench tune``): the method, finished trials against the budget,
the mean trial wall time (what a budget costs on the study's machine), the best trial's eval OP, the current
defaults' eval OP on the same protocol and the gain, and whether the method YAML's defaults are the best trial's
knobs today. The last column is read from the YAML, not written by hand, so a default edited after its study (or a
study not adopted) shows.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clbench.config import ConfigError

STUDY_FILE = "study.json"
# adopted values are written rounded to two significant digits; rounding moves a value by < 5 %
ADOPTED_REL_TOL = 0.05


@dataclass(frozen=True)
class StudyRow:
    """One study, summarised for the table."""

    study: str
    method: str
    trials: str
    minutes_per_trial: float
    best_op: float
    best_trial: int
    default_op: float
    gain: float
    adopted: str


def load_studies(root: str | Path) -> list[tuple[Path, dict[str, Any]]]:
    """Every ``study.json`` directly under ``root``'s subfolders (or ``root`` itself), sorted by folder name.

    A folder without studies or an unreadable study file is one ConfigError line naming it."""
    root = Path(root)
    paths = [root / STUDY_FILE] if (root / STUDY_FILE).is_file() else sorted(root.glob(f"*/{STUDY_FILE}"))
    if not paths:
        raise ConfigError(f"no {STUDY_FILE} in {root} or its subfolders (clbench tune writes one per study)")
    studies = []
    for path in paths:
        try:
            studies.append((path.parent, json.loads(path.read_text())))
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"{path}: not a readable study file ({err})") from err
    return studies


def _same(default: Any, best: Any) -> bool:
    if isinstance(best, float) and isinstance(default, int | float) and not isinstance(default, bool):
        return math.isclose(float(default), best, rel_tol=ADOPTED_REL_TOL)
    return default == best


def adopted(study: dict[str, Any]) -> str:
    """``yes`` when the method YAML's defaults equal the best trial's knobs (floats to 5 %), else ``no (knob, ...)``
    naming the knobs that differ."""
    from clbench import registry

    config = registry.get_method(study["method"]).default_config({})
    best = study["best"]["params"]
    differ = [knob for knob, value in best.items() if not _same(getattr(config, knob), value)]
    return "yes" if not differ else f"no ({', '.join(differ)})"


def study_row(folder: Path, study: dict[str, Any]) -> StudyRow:
    """The table row of one study file."""
    complete = [t for t in study.get("trials", []) if t.get("state") == "COMPLETE"]
    times = [t["wall_time_s"] for t in complete if isinstance(t.get("wall_time_s"), int | float)]
    default = study.get("default") or {}
    default_op = default.get("value") if isinstance(default.get("value"), float) else math.nan
    best = study["best"]
    return StudyRow(study=folder.name, method=study["method"], trials=f"{len(complete)}/{study['budget']}",
                    minutes_per_trial=sum(times) / len(times) / 60 if times else math.nan,
                    best_op=best["value"], best_trial=best["number"], default_op=default_op,
                    gain=best["value"] - default_op, adopted=adopted(study))


COLUMNS = ("study", "method", "trials", "min/trial", "best eval OP (trial)", "study-time defaults' eval OP",
           "best − those", "YAML defaults = best")


def row_cells(r: StudyRow) -> list[str]:
    """One row's cells, in ``COLUMNS`` order, as the terminal table and the markdown show them (NaN as ``–``)."""
    def num(value: float, spec: str) -> str:
        return "–" if math.isnan(value) else format(value, spec)

    return [r.study, r.method, r.trials, num(r.minutes_per_trial, ".1f"), f"{r.best_op:.3f} (#{r.best_trial})",
            num(r.default_op, ".3f"), num(r.gain, "+.3f"), r.adopted]


def studies_markdown(rows: list[StudyRow]) -> str:
    """The rows as a markdown table (eval OP on each study's short protocol)."""
    from clbench.report import md_table

    return md_table(list(COLUMNS), [row_cells(r) for r in rows]) + "\n"


def format_knob(value: Any) -> str:
    """A knob value as the study READMEs write it: floats to 2 significant digits (``1.3e-3``, ``0.25``, ``32``)."""
    if isinstance(value, float):
        if value != 0 and not 0.01 <= abs(value) < 1000:
            mantissa, exponent = f"{value:.1e}".split("e")
            return f"{mantissa}e{int(exponent)}"
        return f"{value:.2g}"
    return str(value)


def trials_markdown(study: dict[str, Any]) -> str:
    """Every finished trial of one study, best eval OP first, then the study-time defaults' row (markdown).

    Failed or pruned trials are left out (the journal keeps them); ties keep trial order."""
    knobs = list(study.get("search_space") or (study["best"]["params"]))
    complete = [t for t in study.get("trials", []) if t.get("state") == "COMPLETE"]
    complete.sort(key=lambda t: (-t["value"], t["number"]))
    best = study["best"]["number"]
    rows = []
    for t in complete:
        minutes = t["wall_time_s"] / 60 if isinstance(t.get("wall_time_s"), int | float) else math.nan
        rows.append([f"{t['number']} (best)" if t["number"] == best else str(t["number"]), f"{t['value']:.3f}",
                     *(format_knob(t["params"].get(k, "–")) for k in knobs),
                     "–" if math.isnan(minutes) else f"{minutes:.1f}"])
    default = study.get("default") or {}
    if isinstance(default.get("value"), float):
        rows.append(["defaults at study time (`default/`)", f"{default['value']:.3f}",
                     *(format_knob(default.get("params", {}).get(k, "–")) for k in knobs), "–"])
    from clbench.report import md_table

    return md_table(["trial", "eval OP", *knobs, "minutes"], rows) + "\n"
