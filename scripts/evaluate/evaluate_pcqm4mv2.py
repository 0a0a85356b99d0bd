"""Evaluate a Transformer-M checkpoint on one PCQM4Mv2 split (HOMO-LUMO gap, eV).

Reads ``<data-path>/<split>.lmdb`` (written by ``graphormer-ext-preprocess pcqm4mv2``),
predicts every molecule from the graph token, and writes to ``--out``:

* ``<split>_predictions.csv``: ``idx,y_true,y_pred`` (``idx`` = position in the source
  split; ``y_true`` is empty where the label is hidden);
* ``<split>_metrics.json``: MAE (``ogb.lsc.PCQM4Mv2Evaluator``), counts, provenance;
* ``<split>_parity.png``: predicted vs true gap (labelled splits only);
* for ``test-dev`` / ``test-challenge``: ``y_pred_pcqm4m-v2_<split>.npz``, written by
  the evaluator's ``save_test_submission`` when the split holds exactly the official
  number of molecules (147,037 / 147,432); otherwise written in the same format by this
  script, with a warning that it is **not** a valid OGB submission.

Unlike the released ``evaluate.py`` (spec §4.1) it evaluates one checkpoint, writes
the predictions and a submission file, and reads released checkpoints without their
training code. A split built differently from the checkpoint's training data (path
convention, max hops, featurizer) is refused unless ``--allow-data-mismatch``; the released
checkpoints (``--released L12|L18``) were trained on the legacy "atom 0" shortest paths:
preprocess with ``--path-convention legacy``.

Examples::

    python scripts/evaluate/evaluate_pcqm4mv2.py --checkpoint ckpt/checkpoint_best.pt \\
        --data-path data/pcq-lmdb --split valid --out eval/
    python scripts/evaluate/evaluate_pcqm4mv2.py --checkpoint L12.pt --released L12 \\
        --data-path data/pcq-lmdb-legacy --split test-dev --out eval/
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np

logger = logging.getLogger("evaluate_pcqm4mv2")

SUBMISSION_SIZES = {"test-dev": 147_037, "test-challenge": 147_432}
# --released name -> (layers, arch) of transformer_m.inference.build_released_model
RELEASED = {
    "L12": (12, "transformer_m_base"),
    "L18": (18, "transformer_m_base"),
    "L12-old": (12, "transformer_m"),
}


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint .pt file")
    p.add_argument(
        "--released",
        choices=sorted(RELEASED),
        help="the checkpoint is a released Transformer-M file (L12.pt, L18.pt)",
    )
    p.add_argument("--data-path", required=True, help="directory with <split>.lmdb")
    p.add_argument(
        "--split",
        default="valid",
        help="split to evaluate: valid, test-dev, test-challenge, ... (default valid)",
    )
    p.add_argument(
        "--out", default=None, help="output directory (default: <checkpoint dir>/eval)"
    )
    p.add_argument(
        "--batch-size", type=int, default=256, help="molecules per forward pass"
    )
    p.add_argument(
        "--max-hops",
        type=int,
        default=None,
        help="path hops collated (default: the model's multi_hop_max_dist)",
    )
    p.add_argument(
        "--device", default=None, help="torch device (default: cuda if available)"
    )
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        help="evaluate only the first N molecules (a quick check)",
    )
    p.add_argument(
        "--allow-data-mismatch",
        action="store_true",
        help="go on (with a warning) when the split was built with another path convention, "
        "max hops or featurizer than the checkpoint's training data; by default an error",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plot", action="store_true", help="skip the parity plot")
    return p


def load_checkpoint(args: argparse.Namespace, device: str):
    """``(model in eval mode, data facts of its training data)``; released checkpoints get
    their known sizes and facts (legacy paths, 5 hops, hydrogens removed)."""
    from transformer_m.inference import RELEASED_FACTS, load_predictor, load_released_model

    if args.released:
        layers, arch = RELEASED[args.released]
        model = load_released_model(args.checkpoint, layers, arch=arch, device=device)
        return model, dict(RELEASED_FACTS)
    predictor = load_predictor(args.checkpoint, device=device)
    return predictor.model, predictor.facts


def write_predictions(
    path: Path, idx: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray
) -> None:
    """``idx,y_true,y_pred`` (eV), with an empty ``y_true`` for hidden labels."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["idx", "y_true", "y_pred"])
        for i, t, p in zip(idx.tolist(), y_true.tolist(), y_pred.tolist()):
            w.writerow([i, f"{t:.6f}" if np.isfinite(t) else "", f"{p:.6f}"])


def parity_plot(
    path: Path, y_true: np.ndarray, y_pred: np.ndarray, mae: float, title: str
) -> None:
    """Predicted vs true gap (eV) with the y = x line; a log hexbin for large sets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 5.0), dpi=120)
    lo = float(min(y_true.min(), y_pred.min()))
    hi = float(max(y_true.max(), y_pred.max()))
    pad = 0.03 * (hi - lo if hi > lo else 1.0)
    lo, hi = lo - pad, hi + pad
    if len(y_true) > 5000:
        hb = ax.hexbin(
            y_true,
            y_pred,
            gridsize=80,
            bins="log",
            mincnt=1,
            cmap="viridis",
            extent=(lo, hi, lo, hi),
        )
        fig.colorbar(hb, ax=ax, label="molecules (log)")
    else:
        ax.scatter(y_true, y_pred, s=6, alpha=0.35, linewidths=0)
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal")
    ax.set_xlabel("true HOMO-LUMO gap (eV)")
    ax.set_ylabel("predicted HOMO-LUMO gap (eV)")
    ax.set_title(f"{title}\nMAE = {mae:.4f} eV, N = {len(y_true):,}", fontsize=10)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_submission(out: Path, split: str, y_pred: np.ndarray) -> tuple[Path, bool]:
    """Write ``y_pred_pcqm4m-v2_<split>.npz``.

    Returns:
        ``(path, valid)``: ``valid`` is True when the evaluator wrote it (exactly the
        official number of molecules), False when this script wrote the same format.
    """
    from ogb.lsc import PCQM4Mv2Evaluator

    target = out / f"y_pred_pcqm4m-v2_{split}.npz"
    if y_pred.shape == (SUBMISSION_SIZES[split],):
        PCQM4Mv2Evaluator().save_test_submission(
            {"y_pred": y_pred}, str(out), mode=split
        )
        return target, True
    np.savez_compressed(target, y_pred=y_pred.astype(np.float32))
    return target, False


def main(argv: list[str] | None = None) -> int:
    """Run the evaluation; returns the exit code (2 if the split file is missing or was built
    differently from the checkpoint's training data)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    import torch

    from graphormer_ext.data import keys as K
    from graphormer_ext.data.lmdb_dataset import LMDBDataset
    from transformer_m.data_facts import DataMismatchError, check_facts, split_facts
    from transformer_m.inference import predict

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    split_file = Path(args.data_path) / f"{args.split}.lmdb"
    if not split_file.is_file():
        found = sorted(p.name for p in Path(args.data_path).glob("*.lmdb"))
        print(
            f"error: {split_file} does not exist (found: {found or 'no .lmdb files'}); "
            "create it with `graphormer-ext-preprocess pcqm4mv2 --root ROOT --out DIR`",
            file=sys.stderr,
        )
        return 2
    dataset = LMDBDataset(split_file)
    convention = dataset.meta.get("path_convention")
    n = len(dataset) if args.limit is None else min(args.limit, len(dataset))
    records = dataset if n == len(dataset) else _Head(dataset, n)
    logger.info(
        "%s: %d molecules (path convention %s), device %s",
        split_file,
        n,
        convention,
        device,
    )

    model, facts = load_checkpoint(args, device)
    hops = args.max_hops or facts.get("max_hops") or 5
    try:
        check_facts(
            facts,
            split_facts(dataset.meta, hops),
            expected_from=f"the training data of {args.checkpoint}",
            found_from=str(split_file),
            allow=args.allow_data_mismatch,
            fix=(
                "preprocess with `graphormer-ext-preprocess pcqm4mv2 ... --path-convention "
                f"{facts.get('path_convention') or 'fixed'} --max-hops {facts.get('max_hops') or 5}`"
            ),
        )
    except DataMismatchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    pred = predict(
        model,
        records,
        batch_size=args.batch_size,
        max_hops=args.max_hops,
        device=device,
        progress=not args.no_progress,
    )
    if pred.shape[1] != 1:
        logger.warning("the model has %d outputs; column 0 is the gap", pred.shape[1])
    y_pred = pred[:, 0].astype(np.float32)  # eV
    y_true = np.array([_label(records[i].get(K.Y)) for i in range(n)], np.float32)
    idx = np.asarray(dataset.source_index[:n], dtype=np.int64)

    out = Path(args.out or Path(args.checkpoint).resolve().parent / "eval")
    out.mkdir(parents=True, exist_ok=True)
    pred_file = out / f"{args.split}_predictions.csv"
    write_predictions(pred_file, idx, y_true, y_pred)
    logger.info("wrote %s", pred_file)

    labelled = np.isfinite(y_true)
    metrics: dict = {
        "checkpoint": os.path.abspath(args.checkpoint),
        "released": args.released,
        "split": args.split,
        "split_file": str(split_file.resolve()),
        "path_convention": convention,
        "num_molecules": int(n),
        "num_labelled": int(labelled.sum()),
        "mae": None,
    }
    if labelled.any():
        from ogb.lsc import PCQM4Mv2Evaluator

        if not labelled.all():
            logger.warning(
                "%d of %d molecules have no label; MAE over the labelled ones",
                int((~labelled).sum()),
                n,
            )
        mae = PCQM4Mv2Evaluator().eval(
            {"y_true": y_true[labelled], "y_pred": y_pred[labelled]}
        )["mae"]
        metrics["mae"] = float(mae)
        print(f"{args.split}: MAE = {mae:.5f} eV over {int(labelled.sum())} molecules")
        if not args.no_plot:
            png = out / f"{args.split}_parity.png"
            title = f"{Path(args.checkpoint).name} on {args.split}"
            parity_plot(png, y_true[labelled], y_pred[labelled], mae, title)
            logger.info("wrote %s", png)
    else:
        print(f"{args.split}: no labels, no MAE ({n} predictions written)")

    if args.split in SUBMISSION_SIZES:
        sub, valid = write_submission(out, args.split, y_pred)
        metrics["submission"] = str(sub)
        metrics["submission_valid"] = valid
        if valid:
            print(f"OGB {args.split} submission: {sub}")
        else:
            print(
                f"WARNING: {sub} is NOT a valid OGB submission: it holds {n:,} "
                f"predictions, OGB expects exactly {SUBMISSION_SIZES[args.split]:,} "
                f"for {args.split} (same format, for checking only)"
            )
    with open(out / f"{args.split}_metrics.json", "w") as f:
        json.dump(metrics, f, indent=2)
    return 0


def _label(y) -> float:
    """The first target of a record, NaN when absent."""
    if y is None or np.size(y) == 0:
        return float("nan")
    return float(np.asarray(y).reshape(-1)[0])


class _Head:
    """The first ``n`` records of a dataset."""

    def __init__(self, dataset, n: int):
        self.dataset, self.n = dataset, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.dataset[i]


if __name__ == "__main__":
    sys.exit(main())
