"""Metrics, baselines, per-molecule tables and plots for ``finetune_user``'s report.

A user compares a model against simple baselines before trusting it, so the report puts three
predictors side by side on the same molecules of each split:

* the fine-tuned Transformer-M (its predictions in label units, :mod:`transformer_m.inference`);
* the train mean (regression) or the majority class (classification) of the training labels;
* a random forest on RDKit 2D descriptors (``rdkit.Chem.Descriptors.CalcMolDescriptors``,
  scikit-learn), trained on the same training molecules.

Regression is scored with MAE and RMSE, binary classification with accuracy, ROC-AUC and PR-AUC
(average precision), multiclass with accuracy. Molecules without the label are left out of every
score and counted.
"""
from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "PRIMARY",
    "descriptor_matrix",
    "format_report",
    "metrics",
    "plot_parity",
    "plot_roc",
    "random_forest_baseline",
    "trivial_baseline",
    "verdict",
    "write_predictions",
]

# the score each kind is judged by, and whether higher is better
PRIMARY = {"regression": ("mae", False), "binary": ("roc_auc", True),
           "multiclass": ("accuracy", True)}  # fmt: skip


def metrics(kind: str, y: np.ndarray, pred: np.ndarray, prob: Optional[np.ndarray] = None) -> dict:
    """Scores of predictions on labelled molecules.

    Args:
        kind: ``regression``, ``binary`` or ``multiclass``.
        y: labels ``[M]`` (NaN = missing: left out, counted in ``n_missing``).
        pred: predictions ``[M]`` (label units; classes for classification).
        prob: binary: P(class 1) ``[M]``, for ROC-AUC and PR-AUC.

    Returns:
        ``{"n", "n_missing", ...}``: ``mae``, ``rmse`` (regression); ``accuracy``, and for
        binary ``roc_auc``, ``pr_auc`` (NaN with one class only).
    """
    y = np.asarray(y, dtype=np.float64)
    pred = np.asarray(pred, dtype=np.float64)
    ok = np.isfinite(y)
    out: dict = {"n": int(ok.sum()), "n_missing": int((~ok).sum())}
    y, pred = y[ok], pred[ok]
    if kind == "regression":
        err = pred - y
        out["mae"] = float(np.abs(err).mean()) if y.size else math.nan
        out["rmse"] = float(np.sqrt((err**2).mean())) if y.size else math.nan
        return out
    out["accuracy"] = float((pred == y).mean()) if y.size else math.nan
    if kind == "binary" and prob is not None:
        from sklearn.metrics import average_precision_score, roc_auc_score

        p = np.asarray(prob, dtype=np.float64)[ok]
        two = y.size > 0 and 0 < y.sum() < y.size
        out["roc_auc"] = float(roc_auc_score(y, p)) if two else math.nan
        out["pr_auc"] = float(average_precision_score(y, p)) if two else math.nan
    return out


def trivial_baseline(kind: str, y_train: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The train mean (regression) or majority class, for ``n`` molecules.

    Returns:
        ``(pred [n], prob [n])``; ``prob`` is the training rate of class 1 (binary), else
        the prediction.
    """
    y = np.asarray(y_train, dtype=np.float64)
    y = y[np.isfinite(y)]
    if kind == "regression":
        value = float(y.mean())
        return np.full(n, value), np.full(n, value)
    values, counts = np.unique(y, return_counts=True)
    majority = float(values[np.argmax(counts)])
    rate = float((y == 1).mean()) if kind == "binary" else majority
    return np.full(n, majority), np.full(n, rate)


def descriptor_matrix(smiles: Sequence[Optional[str]]) -> np.ndarray:
    """RDKit 2D descriptors ``[M, D]`` (float64; NaN for a molecule RDKit cannot parse or a
    descriptor it cannot compute)."""
    from rdkit import Chem, rdBase
    from rdkit.Chem import Descriptors

    names = [name for name, _ in Descriptors.descList]
    rows = []
    with rdBase.BlockLogs():
        for smi in smiles:
            mol = Chem.MolFromSmiles(smi) if smi else None
            if mol is None:
                rows.append([math.nan] * len(names))
                continue
            values = Descriptors.CalcMolDescriptors(mol, missingVal=math.nan)
            rows.append([float(values.get(name, math.nan)) for name in names])
    x = np.asarray(rows, dtype=np.float64).reshape(len(rows), len(names))
    # Ipc and a few others reach 1e30+: float32 trees would overflow; clip, keep the order
    return np.clip(x, -1e12, 1e12)


def random_forest_baseline(
    kind: str,
    train_smiles: Sequence[Optional[str]],
    y_train: np.ndarray,
    eval_smiles: Mapping[str, Sequence[Optional[str]]],
    *,
    seed: int = 0,
    n_estimators: int = 500,
    n_jobs: int = 1,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A random forest on RDKit descriptors, fit on the labelled training molecules.

    Non-finite descriptor values are replaced by the training median of the column.

    Args:
        kind: ``regression``, ``binary`` or ``multiclass``.
        train_smiles, y_train: training molecules and labels (NaN labels are left out).
        eval_smiles: split name -> SMILES to predict.
        seed: ``random_state`` of the forest.
        n_estimators: trees.
        n_jobs: worker threads.

    Returns:
        split -> ``(pred, prob)`` as in :func:`trivial_baseline`.
    """
    from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor

    y = np.asarray(y_train, dtype=np.float64)
    x = descriptor_matrix(train_smiles)
    keep = np.isfinite(y)
    x, y = x[keep], y[keep]
    median = np.nanmedian(np.where(np.isfinite(x), x, np.nan), axis=0)
    median = np.where(np.isfinite(median), median, 0.0)

    def clean(m: np.ndarray) -> np.ndarray:
        return np.where(np.isfinite(m), m, median)

    if kind == "regression":
        model = RandomForestRegressor(n_estimators=n_estimators, random_state=seed,
                                      n_jobs=n_jobs)
    else:
        model = RandomForestClassifier(n_estimators=n_estimators, random_state=seed,
                                       n_jobs=n_jobs)
    model.fit(clean(x), y)
    out = {}
    for split, smiles in eval_smiles.items():
        xs = clean(descriptor_matrix(smiles))
        pred = model.predict(xs).astype(np.float64)
        if kind == "binary":
            classes = list(model.classes_)
            prob = model.predict_proba(xs)[:, classes.index(1.0)] if 1.0 in classes else (
                np.zeros(len(xs)))
        else:
            prob = pred
        out[split] = (pred, prob)
    return out


def write_predictions(path: Path, rows: Sequence[Mapping], columns: Sequence[str]) -> None:
    """A CSV of per-molecule predictions (quoted where needed)."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(v) for k, v in row.items()})


def _cell(value):
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return value


def plot_parity(path: Path, y: np.ndarray, pred: np.ndarray, title: str, label: str,
                baselines: Mapping[str, float]) -> None:
    """Predicted vs measured with the y = x line, MAE/RMSE in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = np.isfinite(y)
    y, pred = np.asarray(y)[ok], np.asarray(pred)[ok]
    fig, ax = plt.subplots(figsize=(5.0, 5.0), dpi=120)
    lo, hi = float(min(y.min(), pred.min())), float(max(y.max(), pred.max()))
    pad = 0.04 * (hi - lo if hi > lo else 1.0)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="0.5", lw=1, zorder=1)
    m = metrics("regression", y, pred)
    ax.scatter(y, pred, s=10, alpha=0.6, zorder=2,
               label=f"Transformer-M  MAE {m['mae']:.3g}  RMSE {m['rmse']:.3g}")
    for name, mae in baselines.items():
        ax.plot([], [], " ", label=f"{name}  MAE {mae:.3g}")
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel(f"measured {label}")
    ax.set_ylabel(f"predicted {label}")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_roc(path: Path, curves: Mapping[str, tuple[np.ndarray, np.ndarray]], title: str) -> None:
    """ROC curves (one per predictor) of binary labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, ax = plt.subplots(figsize=(5.0, 5.0), dpi=120)
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--")
    for name, (y, prob) in curves.items():
        ok = np.isfinite(y)
        if not 0 < y[ok].sum() < ok.sum():
            continue
        fpr, tpr, _ = roc_curve(y[ok], prob[ok])
        ax.plot(fpr, tpr, label=f"{name}  AUC {roc_auc_score(y[ok], prob[ok]):.3f}")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def format_report(kind: str, scores: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """A plain-text table: one row per predictor, one column per split and score.

    Args:
        kind: the task kind (decides the columns).
        scores: predictor -> split -> :func:`metrics` output.
    """
    names = {"regression": ("mae", "rmse"), "binary": ("accuracy", "roc_auc", "pr_auc"),
             "multiclass": ("accuracy",)}[kind]  # fmt: skip
    splits = []
    for per_split in scores.values():
        splits += [s for s in per_split if s not in splits]
    header = ["predictor"] + [f"{s} {n.upper().replace('_', '-')}" for s in splits for n in names]
    rows = [header]
    for predictor, per_split in scores.items():
        row = [predictor]
        for s in splits:
            for n in names:
                v = (per_split.get(s) or {}).get(n)
                row.append("-" if v is None or (isinstance(v, float) and math.isnan(v))
                           else f"{v:.4g}")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in rows
    )


def verdict(kind: str, scores: Mapping[str, Mapping[str, Mapping[str, float]]], split: str,
            model: str, baselines: Sequence[str]) -> str:
    """One sentence: does the model beat each baseline on ``split`` by the primary score?"""
    name, higher = PRIMARY[kind]
    ours = (scores.get(model, {}).get(split) or {}).get(name)
    if ours is None or (isinstance(ours, float) and math.isnan(ours)):
        return f"no {name} on {split} for {model}"
    parts, beats = [], []
    for base in baselines:
        theirs = (scores.get(base, {}).get(split) or {}).get(name)
        if theirs is None or (isinstance(theirs, float) and math.isnan(theirs)):
            continue
        better = ours > theirs if higher else ours < theirs
        beats.append(better)
        parts.append(f"{'beats' if better else 'does not beat'} {base} ({theirs:.4g})")
    if not parts:
        return f"{model} {name.upper()} on {split}: {ours:.4g} (no baseline to compare)"
    summary = (f"{model} {name.upper().replace('_', '-')} on {split} is {ours:.4g}: it "
               + ", and ".join(parts))
    if all(beats):
        return summary + ". The model helps on this split."
    if any(beats):
        return summary + ". A simpler model is as good or better here."
    return summary + ". The model does not help here: use the baseline, or more data/pre-training."
