"""Continual-learning metrics from the accuracy matrix R (TRACE's definitions, Wang et al. 2023, Sec. 3.3).

``R`` has T+1 rows and T columns: ``R[0, j]`` is the zero-shot score on task j (NaN when skipped) and ``R[i, j]``
(i = 1..T) the score on task j after training the i-th task of the order. Columns follow the task order.
"""

from __future__ import annotations

import numpy as np


def _check(R: np.ndarray) -> tuple[np.ndarray, int]:
    R = np.asarray(R, dtype=float)
    if R.ndim != 2 or R.shape[0] != R.shape[1] + 1:
        raise ValueError(f"R must have shape (T+1, T) with a zero-shot row first, got {R.shape}")
    return R, R.shape[1]


def overall_performance(R: np.ndarray) -> float:
    """OP = (1/T) Σ_j R[T, j]: mean score over all tasks after the last task."""
    R, T = _check(R)
    return float(np.mean(R[T, :]))


def backward_transfer(R: np.ndarray) -> float:
    """BWT = 1/(T-1) Σ_{j<T} (R[T, j] − R[j, j]) (TRACE): negative means forgetting. NaN for a single task."""
    R, T = _check(R)
    if T < 2:
        return float("nan")
    return float(np.mean([R[T, j] - R[j + 1, j] for j in range(T - 1)]))


def forward_transfer(R: np.ndarray) -> float:
    """FWT = 1/(T-1) Σ_{j>1} (R[j-1, j] − R[0, j]): what earlier tasks give a task before it is trained.

    Needs the zero-shot row; NaN without it. In 0-based columns: mean over j = 1..T-1 of R[j, j] − R[0, j], where row j
    is "after training the j-th task", i.e. just before task j (0-based) is trained.
    """
    R, T = _check(R)
    if T < 2 or np.isnan(R[0]).any():
        return float("nan")
    return float(np.mean([R[j, j] - R[0, j] for j in range(1, T)]))


def needed_columns(row: int, T: int) -> list[int]:
    """The columns of R's row ``row`` that OP, BWT and FWT read (``--eval-rows needed`` evaluates only these).

    Row 0 (zero-shot) and row T (after the last task): every column (FWT reads R[0, 1..T-1]; the whole row is kept for
    the report). Row i in 1..T-1: column i-1 (R[j+1, j], BWT's "just trained") and column i (R[j, j], FWT's "just
    before training"). The max-drop forgetting reads the rows in between too, so it is NaN without the full matrix.
    """
    if row in (0, T):
        return list(range(T))
    return [row - 1, row]


def bwt_clipped(R: np.ndarray) -> float:
    """TreeLoRA's convention: (1/T) Σ_{j<T} min(R[T, j] − R[j, j], 0) (only drops count, divided by T)."""
    R, T = _check(R)
    return float(np.sum([min(R[T, j] - R[j + 1, j], 0.0) for j in range(T - 1)]) / T)


def forgetting_max_drop(R: np.ndarray) -> float:
    """Average forgetting (Chaudhry et al. 2018): 1/(T-1) Σ_{j<T} max_{j≤i<T} (R[i, j] − R[T, j])."""
    R, T = _check(R)
    if T < 2:
        return float("nan")
    return float(np.mean([np.max(R[j + 1 : T, j]) - R[T, j] for j in range(T - 1)]))


def summarize(R: np.ndarray) -> dict[str, float]:
    """OP, BWT and FWT of a full matrix (TRACE's conventions)."""
    return {"OP": overall_performance(R), "BWT": backward_transfer(R), "FWT": forward_transfer(R)}


BWT_CONVENTIONS = {
    "trace": backward_transfer,
    "clipped": bwt_clipped,
    "max-drop": forgetting_max_drop,
}


def summarize_stack(R: np.ndarray) -> dict[str, np.ndarray]:
    """OP, BWT, FWT of a stack of matrices, shape (..., T+1, T) -> one array of shape (...) per metric.

    The same formulas as :func:`summarize`, vectorised over leading axes (bootstrap replicates of R):
    OP = mean_j R[T, j]; BWT = mean_{j<T-1} (R[T, j] − R[j+1, j]); FWT = mean_{j=1..T-1} (R[j, j] − R[0, j])
    (0-based columns). NaN where the matrix lacks a needed entry (no zero-shot row: FWT; T = 1: BWT and FWT).
    """
    R = np.asarray(R, dtype=float)
    if R.ndim < 2 or R.shape[-2] != R.shape[-1] + 1:
        raise ValueError(f"R must have shape (..., T+1, T) with a zero-shot row first, got {R.shape}")
    T = R.shape[-1]
    last = R[..., T, :]
    nan = np.full(R.shape[:-2], np.nan)
    if T < 2:
        return {"OP": last.mean(axis=-1), "BWT": nan, "FWT": nan}
    cols = np.arange(T - 1)
    bwt = (last[..., : T - 1] - R[..., cols + 1, cols]).mean(axis=-1)
    fwt = (R[..., cols + 1, cols + 1] - R[..., 0, 1:]).mean(axis=-1)
    fwt = np.where(np.isnan(R[..., 0, :]).any(axis=-1), np.nan, fwt)  # as forward_transfer: any zero-shot gap -> NaN
    return {"OP": last.mean(axis=-1), "BWT": bwt, "FWT": fwt}
