"""Binding-affinity metrics of PDBbind papers: Pearson R, MAE, RMSE and SD.

SD is the standard deviation of the residuals of the least-squares line of the true
values on the predictions (as in the CASF "scoring power" protocol, PotentialNet and
SIGN): ``SD = sqrt(sum_i (y_i - (a * p_i + b))^2 / (N - 1))``.

All four are functions of eight sums (:data:`SUM_KEYS`), so they can be accumulated over
batches and workers (fairseq's ``reduce_metrics`` sums logging outputs) and finished once
(:func:`metrics_from_sums`). :func:`affinity_metrics` is the direct NumPy version.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "SUM_KEYS",
    "METRIC_NAMES",
    "affinity_sums",
    "metrics_from_sums",
    "affinity_metrics",
]

# n, sum y, sum p, sum y^2, sum p^2, sum y*p, sum |y - p|, sum (y - p)^2
# (y true, p predicted)
SUM_KEYS = ("n", "sy", "sp", "syy", "spp", "syp", "sabs", "ssq")
METRIC_NAMES = ("pearson_r", "mae", "rmse", "sd")


def affinity_sums(y_true, y_pred) -> dict[str, float]:
    """The sums :data:`SUM_KEYS` that :func:`metrics_from_sums` needs, in float64.

    Args:
        y_true, y_pred: ``[N]`` (any shape, flattened) true and predicted values.
    """
    y = np.asarray(y_true, dtype=np.float64).reshape(-1)
    p = np.asarray(y_pred, dtype=np.float64).reshape(-1)
    if y.shape != p.shape:
        raise ValueError(f"y_true has {y.size} values, y_pred {p.size}")
    return {
        "n": float(y.size),
        "sy": float(y.sum()),
        "sp": float(p.sum()),
        "syy": float((y * y).sum()),
        "spp": float((p * p).sum()),
        "syp": float((y * p).sum()),
        "sabs": float(np.abs(y - p).sum()),
        "ssq": float(((y - p) ** 2).sum()),
    }


def metrics_from_sums(s: dict[str, float]) -> dict[str, float]:
    """Pearson R, MAE, RMSE and SD from :func:`affinity_sums` (summed over parts).

    Returns:
        ``{"pearson_r", "mae", "rmse", "sd"}`` (target units; R unitless). NaN where
        undefined: no values, R or SD with fewer than 2 values, R with constant values.
    """
    n = s["n"]
    nan = float("nan")
    if n <= 0:
        return {k: nan for k in METRIC_NAMES}
    out = {"mae": s["sabs"] / n, "rmse": math.sqrt(max(s["ssq"], 0.0) / n)}
    cyy = s["syy"] - s["sy"] ** 2 / n  # centred sums
    cpp = s["spp"] - s["sp"] ** 2 / n
    cyp = s["syp"] - s["sy"] * s["sp"] / n
    if n < 2:
        out.update(pearson_r=nan, sd=nan)
        return out
    out["pearson_r"] = cyp / math.sqrt(cyy * cpp) if cyy > 0 and cpp > 0 else nan
    ss_res = cyy - cyp**2 / cpp if cpp > 0 else cyy  # residuals of y ~ a p + b
    out["sd"] = math.sqrt(max(ss_res, 0.0) / (n - 1))
    return out


def affinity_metrics(y_true, y_pred) -> dict[str, float]:
    """Pearson R, MAE, RMSE and SD of predictions, directly (NumPy).

    Args:
        y_true, y_pred: ``[N]`` true and predicted values (e.g. -logKd/Ki).

    Returns:
        ``{"pearson_r", "mae", "rmse", "sd"}``, see :func:`metrics_from_sums`.
    """
    y = np.asarray(y_true, dtype=np.float64).reshape(-1)
    p = np.asarray(y_pred, dtype=np.float64).reshape(-1)
    if y.shape != p.shape:
        raise ValueError(f"y_true has {y.size} values, y_pred {p.size}")
    if y.size < 2 or np.ptp(p) == 0:
        return metrics_from_sums(affinity_sums(y, p))
    a, b = np.polyfit(p, y, 1)
    resid = y - (a * p + b)
    return {
        "pearson_r": float(np.corrcoef(y, p)[0, 1]),
        "mae": float(np.abs(y - p).mean()),
        "rmse": float(np.sqrt(((y - p) ** 2).mean())),
        "sd": float(np.sqrt((resid**2).sum() / (y.size - 1))),
    }
