"""95 % intervals for OP, BWT and FWT that cover seed-to-seed and test-sample variation, and paired comparisons.

A leaderboard row is the mean over S seeds of a metric m (OP, BWT or FWT) computed from each seed's R, and each
R[i, j] is a mean of per-example scores x_{ijk} over the n_j test examples of task j. Two things would change the
number on a rerun: the seed (and, across machines, the numerics: rows of different hardware are never pooled, see
:mod:`clbench.provenance`), and which test examples happen to be in the test set. The interval covers both:

1. **Test examples: a nonparametric bootstrap.** Replicate b draws, for every task j, n_j examples with replacement
   (multinomial counts c_{bjk}, weights w_{bjk} = c_{bjk} / n_j) and rescores every row of R with the same draw:
   R*_b[i, j] = Σ_k w_{bjk} x_{ijk}. Using one draw for all rows keeps BWT = R[T, j] − R[j+1, j] and FWT paired (an
   example that is hard stays hard in both terms). The draw depends only on (task name, n_j, :data:`SEED`), so every
   run of a task with the same test set gets the same draws: seeds of one method share them (they were tested on
   the same examples, so averaging seeds does not average test-sample noise away), and two methods compared with
   each other are paired on examples. The deviation of run s is δ_s(b) = m(R*_b) − m(R̂_s), R̂_s the unresampled
   per-example means (equal to the run's R).
2. **Seeds: Student's t.** With S = 2 or 3 seeds a bootstrap over seeds has 3 or 10 distinct resamples and shrinks
   the spread by (S − 1)/S; the t distribution is the exact small-sample law of a mean of S normal seed effects
   with unknown variance. The seed term is e_b = (sd / √S) · t_{df, b}, sd the sample std (n − 1) of the S per-seed
   values, df = S − 1. A single-seed row has no spread of its own: it borrows the pooled spread of the multi-seed
   rows of its section, sd_p² = Σ_r (S_r − 1) sd_r² / Σ_r (S_r − 1), df = Σ_r (S_r − 1) (the pooled-variance
   assumption of a two-sample t test: seed noise is similar across methods), and says so in its note. Without any
   multi-seed row it covers test sampling only and is flagged; if that is zero as well it gets no interval (NaN),
   never a zero-width one.

Replicate b of the row: m̄ + (1/S) Σ_s δ_s(b) + e_b, m̄ the mean of the seeds' values. The interval is the 2.5 and
97.5 percentiles of the :data:`N_BOOT` replicates, clipped to the metric's range (:data:`RANGES`). It is conservative
in one place: the seed × example interaction enters both terms.

**Paired comparison.** For two rows A and B of one section the replicates of the difference are d_b = A_b − B_b:
the example draws are shared (paired on examples), the seed terms independent (seeds are different trainings).
A is *distinguishable* from B when the 95 % percentile interval of d excludes 0; the two-sided bootstrap p-value
p = min(1, 2 (1 + min(#{d_b ≤ 0}, #{d_b ≥ 0})) / (N_BOOT + 1)) is the one that interval inverts.

**General-ability delta** (``--general``, :mod:`clbench.general`). A run's mean delta is
Δ = (1/B) Σ_b (after_b − before_b) over the suite's B benchmarks, each benchmark a mean of per-example scores
(pooled over its subtasks, or the unweighted mean of its subtasks' means for a tag). Both stages score the *same*
examples, so Δ is a weighted sum of paired per-example differences d_uk = after_uk − before_uk over units u (a
benchmark, or one subtask of it) with weights c_u (1/B times the unit's share of its benchmark): Δ = Σ_u c_u ·
mean_k d_uk. Its test term resamples the examples of every unit as above (draws fixed by the unit's name and size,
shared by seeds and methods), δ_s(b) = Σ_u c_u (Σ_k w_buk d_uk − mean_k d_uk); its seed term, pooling and flags are
those of OP/BWT/FWT. A row gets it as the metric ``general_delta`` over the seeds that ran ``--general``.

Everything here is numpy on small arrays; :data:`SEED` fixes every draw, so a leaderboard is reproducible.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clbench import cl_metrics

METRICS = ("OP", "BWT", "FWT")
GENERAL = "general_delta"  # the mean general-ability delta, the fourth metric of a row that ran --general
# the values each metric can take (scores are 0-1): an interval end beyond them is clipped (the t term is unbounded)
RANGES = {"OP": (0.0, 1.0), "BWT": (-1.0, 1.0), "FWT": (-1.0, 1.0), GENERAL: (-1.0, 1.0)}
N_BOOT = 4000  # Monte-Carlo error of a 2.5 % quantile at 4000 replicates is ~0.25 % of the spread: negligible
SEED = 20261202
LEVEL = 0.95


def _stream(*parts: Any) -> np.random.Generator:
    """A generator fixed by :data:`SEED` and ``parts`` (names hashed with CRC-32, stable across Python runs)."""
    keys = [p if isinstance(p, int) else zlib.crc32(str(p).encode()) for p in parts]
    return np.random.default_rng([SEED, *keys])


def resample_weights(task: str, n: int, n_boot: int = N_BOOT) -> np.ndarray:
    """Bootstrap weights w[b, k] = c[b, k] / n, c ~ Multinomial(n, 1/n each): shape (n_boot, n), rows sum to 1.

    Fixed by (task, n): every run tested on the same n examples of ``task`` gets the same draws (pairing).
    """
    if n < 1:
        raise ValueError(f"task {task!r} has no test examples to resample")
    counts = _stream("examples", task, n).multinomial(n, np.full(n, 1.0 / n), size=n_boot)
    return counts / n


def resampled_R(examples: Sequence[np.ndarray], weights: Sequence[np.ndarray]) -> np.ndarray:
    """R*[b, i, j] = Σ_k weights[j][b, k] · examples[j][i, k], shape (n_boot, T+1, T).

    ``examples[j]`` is task j's per-example score matrix, shape (T+1, n_j), NaN rows where R has no row.
    """
    cols = [w @ np.asarray(x, dtype=float).T for x, w in zip(examples, weights, strict=True)]  # each (B, T+1)
    return np.stack(cols, axis=-1)


def run_deviations(examples: Sequence[np.ndarray], tasks: Sequence[str], n_boot: int = N_BOOT
                   ) -> dict[str, np.ndarray]:
    """δ_m(b) = m(R*_b) − m(R̂) for m in OP, BWT, FWT, each shape (n_boot,); R̂[i, j] = mean_k examples[j][i, k].

    NaN where the metric is undefined for the run (joint training has no BWT; no zero-shot row, no FWT).
    """
    weights = [resample_weights(t, np.shape(x)[1], n_boot) for t, x in zip(tasks, examples, strict=True)]
    full = np.stack([np.asarray(x, dtype=float).mean(axis=1) for x in examples], axis=-1)  # (T+1, T)
    base = cl_metrics.summarize_stack(full)
    boot = cl_metrics.summarize_stack(resampled_R(examples, weights))
    return {m: boot[m] - base[m] for m in METRICS}


@dataclass(frozen=True)
class GeneralUnit:
    """One block of paired examples of a general-ability benchmark: ``delta[k]`` = score of example k after the last
    task minus before the first; ``weight`` c_u is its share of the run's mean delta (see the module docstring);
    ``name`` (e.g. ``"mmlu/mmlu_anatomy"``) with the size fixes its bootstrap draw."""

    name: str
    weight: float
    delta: np.ndarray


def general_deviations(units: Sequence[GeneralUnit], n_boot: int = N_BOOT) -> np.ndarray:
    """δ(b) = Σ_u c_u (Σ_k w_buk d_uk − mean_k d_uk), shape (n_boot,): the test-example term of one run's mean
    general-ability delta (weights w from :func:`resample_weights`, the same draw for every run of the unit)."""
    total = np.zeros(n_boot)
    for unit in units:
        d = np.asarray(unit.delta, dtype=float)
        total += unit.weight * (resample_weights(unit.name, len(d), n_boot) @ d - d.mean())
    return total


def seed_spread(values: Sequence[float]) -> tuple[float, int] | None:
    """(sample std with n − 1, df = S − 1) of the per-seed values; None with fewer than 2 seeds or a NaN value."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2 or np.isnan(values).any():
        return None
    return float(values.std(ddof=1)), len(values) - 1


def pooled_spread(spreads: Sequence[tuple[float, int] | None]) -> tuple[float, int] | None:
    """Pooled std sd_p = √(Σ df_r sd_r² / Σ df_r) with df = Σ df_r over the given (sd, df); None if there is none."""
    known = [s for s in spreads if s is not None]
    df = sum(d for _, d in known)
    if df == 0:
        return None
    return float(np.sqrt(sum(d * sd**2 for sd, d in known) / df)), df


def row_replicates(values: Sequence[float], deviations: np.ndarray | None, spread: tuple[float, int] | None,
                   rng: np.random.Generator, n_boot: int = N_BOOT) -> np.ndarray:
    """Replicates m̄ + (1/S) Σ_s δ_s(b) + (sd/√S) t_df(b) of one row's metric, shape (n_boot,).

    ``values``: the S per-seed metric values; ``deviations``: shape (S, n_boot), or None when the test examples are
    unknown (no predictions: the test term is left out); ``spread``: (sd, df) of the seed term, or None to leave it
    out. All NaN when the metric is undefined for a seed.
    """
    values = np.asarray(values, dtype=float)
    reps = np.full(n_boot, values.mean())
    if deviations is not None:
        reps = reps + np.asarray(deviations, dtype=float).mean(axis=0)
    if spread is not None:
        sd, df = spread
        reps = reps + sd / np.sqrt(len(values)) * rng.standard_t(df, size=n_boot)
    return reps


def percentile_interval(replicates: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The ((1 − level)/2, (1 + level)/2) quantiles of the replicates; (NaN, NaN) if any replicate is NaN."""
    replicates = np.asarray(replicates, dtype=float)
    if np.isnan(replicates).any():
        return float("nan"), float("nan")
    low, high = np.quantile(replicates, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def paired_difference(reps_a: np.ndarray, reps_b: np.ndarray, level: float = LEVEL) -> tuple[float, float, float]:
    """(low, high, p) of d = A − B from replicates drawn with shared example weights: percentile interval of d_b and
    p = min(1, 2 (1 + min(#{d_b ≤ 0}, #{d_b ≥ 0})) / (B + 1)); NaNs when either side has no interval."""
    d = np.asarray(reps_a, dtype=float) - np.asarray(reps_b, dtype=float)
    if np.isnan(d).any():
        return float("nan"), float("nan"), float("nan")
    low, high = percentile_interval(d, level)
    tail = min(int((d <= 0).sum()), int((d >= 0).sum()))
    return low, high, float(min(1.0, 2 * (1 + tail) / (len(d) + 1)))


def difference_mark(low: float, high: float) -> str:
    """'+' when the difference's interval lies above 0, '−' below, '≈' when it contains 0, '?' when undefined."""
    if np.isnan(low) or np.isnan(high):
        return "?"
    return "+" if low > 0 else "−" if high < 0 else "≈"


# ---- a whole leaderboard -----------------------------------------------------------------------------------------


@dataclass
class RowInput:
    """What the interval of one leaderboard row needs: its per-seed values and, per seed, the test examples.

    ``section`` groups rows that may pool seed spreads and be compared (same benchmark, model, task count, data and
    hardware class); ``order`` further restricts comparisons (different task orders are different experiments).
    ``examples[s]`` is seed s's list of per-task (T+1, n_j) score matrices in ``tasks`` order, or None.
    ``values`` may hold :data:`GENERAL` too: the mean general-ability deltas of the seeds that ran ``--general``,
    with ``general_units`` (one list of :class:`GeneralUnit` per such seed, or None where its per-example scores are
    unknown).
    """

    key: str
    section: tuple
    order: Any
    method: str
    tasks: list[str]
    values: dict[str, list[float]]
    examples: list[list[np.ndarray] | None]
    general_units: list[list[GeneralUnit] | None] = field(default_factory=list)
    n_seeds: int = field(init=False)

    def __post_init__(self) -> None:
        self.n_seeds = len(self.examples)


# what an interval does not cover (or borrows), short code -> sentence; the CSV has both, terminals show the codes
NOTES = {
    "pooled": "1 seed: seed spread pooled from the section's multi-seed rows",
    "no-seed-var": "1 seed: seed variation not covered",
    "no-test-var": "test sampling not covered (no usable predictions)",
    "general-no-test-var": "general delta: test sampling not covered (no per-example lm-eval scores)",
}


def _note_codes(has_examples: bool, spread_kind: str, general_examples: bool | None = None) -> list[str]:
    """Codes of :data:`NOTES` for a row (none when its interval covers seeds and examples from its own runs);
    ``general_examples`` None: the row has no general delta."""
    codes = [] if has_examples else ["no-test-var"]
    if general_examples is False:
        codes.append("general-no-test-var")
    if spread_kind == "pooled":
        codes.append("pooled")
    elif spread_kind == "none":
        codes.append("no-seed-var")
    return codes


def _row_metrics(row: RowInput) -> tuple[str, ...]:
    """The metrics a row has an interval for: OP, BWT, FWT, and the general delta when a seed ran ``--general``."""
    return (*METRICS, GENERAL) if row.values.get(GENERAL) else METRICS


def _deviations(row: RowInput, n_boot: int) -> tuple[dict[str, np.ndarray | None], bool, bool | None]:
    """Per metric, the (S, n_boot) test-example deviations of the row's seeds (None where some seed's examples are
    unknown), whether R's examples are known and whether the general delta's are (None: no general delta)."""
    has_examples = row.n_seeds > 0 and all(e is not None for e in row.examples)
    devs: dict[str, np.ndarray | None] = dict.fromkeys(METRICS)
    if has_examples:
        per_seed = [run_deviations(e, row.tasks, n_boot) for e in row.examples]
        devs = {m: np.stack([d[m] for d in per_seed]) for m in METRICS}
    general_known = None
    if GENERAL in _row_metrics(row):
        general_known = (len(row.general_units) == len(row.values[GENERAL])
                         and all(u is not None for u in row.general_units))
        devs[GENERAL] = (np.stack([general_deviations(u, n_boot) for u in row.general_units])
                         if general_known else None)
    return devs, has_examples, general_known


def leaderboard_intervals(rows: Sequence[RowInput], reference_method: str = "lora", n_boot: int = N_BOOT,
                          level: float = LEVEL) -> list[dict[str, Any]]:
    """Interval and comparison columns for every row, in input order.

    Per metric m (OP, BWT, FWT and, for rows that ran ``--general``, :data:`GENERAL`): ``m_ci_low``, ``m_ci_high``
    (see the module docstring), ``m_vs_<ref>_low/high/p`` (the paired difference row − reference, where the
    reference is the ``reference_method`` row of the same section and order with the most seeds; NaN for the
    reference itself or where there is none); ``ci_flags`` (codes of :data:`NOTES`) and ``ci_note`` (their
    sentences: what the interval does not cover or borrows); ``vs_<ref>``: one mark per metric, e.g. ``OP + BWT ≈
    FWT −`` (+: higher than the reference, i.e. better for all of them; ≈: not distinguishable), the general delta's
    as ``general ≈`` when both rows have one; empty for the reference row and without a reference.
    """
    own = {r.key: {m: seed_spread(r.values[m]) for m in _row_metrics(r)} for r in rows}
    pooled = {}
    for section in {r.section for r in rows}:
        members = [r for r in rows if r.section == section]
        pooled[section] = {m: pooled_spread([own[r.key].get(m) for r in members]) for m in (*METRICS, GENERAL)}

    reps: dict[str, dict[str, np.ndarray]] = {}
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        devs, has_examples, general_known = _deviations(r, n_boot)
        rng = _stream("seeds", r.key)
        cols: dict[str, Any] = {}
        kinds = set()
        reps[r.key] = {}
        for m in _row_metrics(r):
            n_values = len(r.values[m])
            spread, kind = own[r.key][m], "own"
            if spread is None and n_values == 1:
                spread = pooled[r.section][m]
                kind = "pooled" if spread is not None else "none"
            if not np.isnan(np.asarray(r.values[m], dtype=float)).any():
                kinds.add(kind)  # an undefined metric (joint training's BWT) says nothing about coverage
            rep = row_replicates(r.values[m], devs[m], spread, rng, n_boot)
            low, high = (float(np.clip(v, *RANGES[m])) for v in percentile_interval(rep, level))
            if n_values == 1 and high - low <= 1e-12:  # (float noise of weights that sum to 1 ± 1 ulp)
                low = high = float("nan")  # one seed and no measurable variation: no interval rather than [x, x]
                rep = np.full(n_boot, np.nan)
            reps[r.key][m] = rep
            cols[f"{m}_ci_low"], cols[f"{m}_ci_high"] = low, high
        kind = "pooled" if "pooled" in kinds else "none" if "none" in kinds else "own"
        codes = _note_codes(has_examples, kind, general_known)
        cols["ci_flags"] = " ".join(codes)
        cols["ci_note"] = "; ".join(NOTES[c] for c in codes)
        out[r.key] = cols

    ref_name = f"vs_{reference_method}"
    for r in rows:
        refs = [q for q in rows if q.method == reference_method and q.section == r.section and q.order == r.order]
        ref = max(refs, key=lambda q: q.n_seeds, default=None)
        cols = out[r.key]
        marks = []
        for m in _row_metrics(r):
            if ref is None or ref.key == r.key or m not in reps[ref.key]:
                low = high = p = float("nan")
            else:
                low, high, p = paired_difference(reps[r.key][m], reps[ref.key][m], level)
                if not np.isnan(np.asarray(r.values[m], dtype=float)).any():
                    marks.append(f"{'general' if m == GENERAL else m} {difference_mark(low, high)}")
            cols[f"{m}_{ref_name}_low"], cols[f"{m}_{ref_name}_high"], cols[f"{m}_{ref_name}_p"] = low, high, p
        cols[ref_name] = " ".join(marks)
    return [out[r.key] for r in rows]
