"""PDBbind metrics of a fine-tuned Transformer-M checkpoint: Pearson R, MAE, RMSE, SD.

Reads ``<data-path>/<split>.lmdb`` (written by ``graphormer-ext-preprocess pdbbind``;
``test`` = the CASF-2016 core set), predicts -logKd/Ki from the graph token (undoing the
``affinity_regression`` criterion's ``--target-mean/--target-std`` stored in the
checkpoint), and writes to ``--out``:

* ``<split>_predictions.csv``: ``code,idx,y_true,y_pred`` (``idx`` = position in the
  source split);
* ``<split>_metrics.json``: ``pearson_r``, ``mae``, ``rmse``, ``sd``
  (:mod:`graphormer_ext.metrics`; SD of the regression of true on predicted, N - 1),
  the number of complexes evaluated and skipped at preprocessing, provenance.

``--predictions CSV`` recomputes the metrics of an existing predictions file instead
(columns ``y_true,y_pred``), e.g. to compare other methods on the same complexes.

Examples::

    python scripts/evaluate/pdbbind_metrics.py --checkpoint ckpt/checkpoint_best.pt \\
        --data-path lmdb/pdbbind --split test --out eval/
    python scripts/evaluate/pdbbind_metrics.py --predictions eval/test_predictions.csv
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

logger = logging.getLogger("pdbbind_metrics")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None, help="fine-tuned checkpoint .pt file")
    p.add_argument("--data-path", default=None, help="folder with <split>.lmdb")
    p.add_argument("--split", default="test", help="split to evaluate (default: test)")
    p.add_argument(
        "--out", default=None, help="output folder (default <ckpt dir>/eval)"
    )
    p.add_argument("--batch-size", type=int, default=16, help="complexes per batch")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if any)")
    p.add_argument(
        "--predictions", default=None, help="metrics of this CSV (y_true,y_pred) only"
    )
    return p


def read_predictions(path: str) -> tuple[np.ndarray, np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    y = np.array([float(r["y_true"]) for r in rows], dtype=np.float64)
    p = np.array([float(r["y_pred"]) for r in rows], dtype=np.float64)
    return y, p


def evaluate_checkpoint(args: argparse.Namespace) -> dict:
    import torch

    from graphormer_ext.data import keys as K
    from graphormer_ext.data.lmdb_dataset import LMDBDataset
    from graphormer_ext.metrics import affinity_metrics
    from transformer_m.inference import load_model, predict

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, cfg = load_model(args.checkpoint, device=device)
    crit = cfg.criterion
    if getattr(crit, "_name", None) != "affinity_regression":
        logger.warning(
            "the checkpoint was trained with criterion %r, not affinity_regression: "
            "predictions are used as they are",
            getattr(crit, "_name", None),
        )
    mean = float(getattr(crit, "target_mean", 0.0))
    std = float(getattr(crit, "target_std", 1.0))
    dataset = LMDBDataset(os.path.join(args.data_path, f"{args.split}.lmdb"))
    meta = dataset.meta
    pred = predict(model, dataset, batch_size=args.batch_size)[:, 0].astype(np.float64)
    pred = pred * std + mean  # -logKd/Ki
    y = np.array([float(dataset[i][K.Y][0]) for i in range(len(dataset))])
    idx = np.asarray(dataset.source_index, dtype=np.int64)
    codes_all = ((meta.get("source") or {}).get("describe") or {}).get("codes", {})
    codes = codes_all.get(args.split)
    out = Path(args.out or Path(args.checkpoint).resolve().parent / "eval")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{args.split}_predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["code", "idx", "y_true", "y_pred"])
        for i, yt, yp in zip(idx, y, pred):
            # repr: the shortest text that reads back to the same float (the metrics are
            # recomputed from this file; 6 digits are too few for nearly equal predictions)
            w.writerow([codes[i] if codes else "", int(i), repr(float(yt)), repr(float(yp))])
    result = {
        **affinity_metrics(y, pred),
        "n": int(len(y)),
        "skipped_at_preprocessing": (meta.get("counts") or {}).get("skipped"),
        "split": args.split,
        "checkpoint": os.path.abspath(args.checkpoint),
        "data": os.path.abspath(os.path.join(args.data_path, f"{args.split}.lmdb")),
        "target_mean": mean,
        "target_std": std,
    }
    with open(out / f"{args.split}_metrics.json", "w") as f:
        json.dump(result, f, indent=2)
    return result


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    if args.predictions:
        from graphormer_ext.metrics import affinity_metrics

        y, p = read_predictions(args.predictions)
        result = {**affinity_metrics(y, p), "n": int(len(y))}
    else:
        if not (args.checkpoint and args.data_path):
            logger.error("give --checkpoint and --data-path (or --predictions)")
            return 2
        result = evaluate_checkpoint(args)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
