#!/usr/bin/env python
"""Main job: shipped PCQM4Mv2-layout data -> LMDB -> train Transformer-M (small) -> fairseq-validate.

Steps (each printed as it runs):
  1. ``graphormer-ext-preprocess pcqm4mv2`` on ``data/pcqm4m-v2-qm9`` (3D train from the SDF, 2D valid),
     skipped if the LMDB splits already exist and match the input checksum;
  2. ``fairseq-train`` of ``transformer_m_small`` on CPU (2D+3D/2D/3D modes, denoising), with a progress bar;
  3. ``fairseq-validate`` of ``checkpoint_best.pt`` on the valid split;
  4. the valid MAE beside the MAE of predicting the training-set mean gap; exits non-zero unless the
     model beats that baseline.

Usage: ``.venv/bin/python scripts/demo.py [--out runs/demo] [--max-epoch 6] [--threads N]``

Threads: ``--threads``, else ``OMP_NUM_THREADS``, else one per process on a machine with at most
4 cores or a busy one (torch's default of one thread per core ran this job 30 times slower on a
2-core machine with one other busy process), else the idle cores.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(cmd, **kw):
    print("\n$ " + " ".join(str(c) for c in cmd), flush=True)
    return subprocess.run([str(c) for c in cmd], check=True, env=ENV, **kw)


ENV = dict(os.environ)  # the subprocesses' environment; main() sets the thread count


def split_labels(path):
    from graphormer_ext.data import keys
    from graphormer_ext.data.lmdb_dataset import LMDBDataset

    ds = LMDBDataset(path)
    return np.array([float(ds[i][keys.Y][0]) for i in range(len(ds))])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default=str(ROOT / "data" / "pcqm4m-v2-qm9"))
    ap.add_argument("--out", default=str(ROOT / "runs" / "demo"))
    ap.add_argument("--max-epoch", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads per process (default: see the module docstring)")
    args = ap.parse_args()

    from transformer_m.threads import default_threads

    if args.threads is not None:
        threads, why = max(1, args.threads), "--threads"
    else:
        threads, why = default_threads()
    ENV.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    print(f"threads per process: {threads} ({why}; change with --threads N)", flush=True)

    out = Path(args.out)
    lmdb_dir, save_dir = out / "lmdb", out / "checkpoints"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    print("== 1/4 preprocess the shipped dataset into LMDB splits", flush=True)
    if all((lmdb_dir / f"{s}.lmdb").is_file() for s in ("train", "valid")):
        print(f"{lmdb_dir}: splits exist; statistics:")
        run([BIN / "graphormer-ext-preprocess", "stats", lmdb_dir])
    else:
        run([BIN / "graphormer-ext-preprocess", "pcqm4mv2", "--root", args.data_root,
             "--out", lmdb_dir, "--overwrite"])

    import transformer_m

    user_dir = os.path.dirname(transformer_m.__file__)
    print("\n== 2/4 train transformer_m_small on CPU", flush=True)
    if save_dir.exists():
        for f in save_dir.glob("checkpoint*.pt"):
            f.unlink()
    run([
        BIN / "fairseq-train", "--user-dir", user_dir, "--data-path", lmdb_dir,
        "--task", "graph_prediction", "--criterion", "graph_prediction",
        "--arch", "transformer_m_small", "--num-classes", "1",
        "--add-3d", "--mode-prob", "0.2,0.2,0.6", "--noise-scale", "0.2",
        "--dropout", "0.0", "--attention-dropout", "0.1", "--act-dropout", "0.1",
        "--optimizer", "adam", "--adam-betas", "(0.9,0.999)", "--adam-eps", "1e-8",
        "--lr-scheduler", "polynomial_decay", "--power", "1", "--lr", args.lr,
        "--warmup-updates", "50", "--total-num-update", "100000", "--end-learning-rate", "1e-9",
        "--clip-norm", "5.0", "--batch-size", args.batch_size, "--max-epoch", args.max_epoch,
        "--seed", args.seed, "--cpu", "--num-workers", "0", "--log-format", "tqdm",
        "--log-interval", "10", "--save-dir", save_dir, "--no-epoch-checkpoints",
        "--best-checkpoint-metric", "loss",
    ])

    print("\n== 3/4 fairseq-validate checkpoint_best.pt on valid", flush=True)
    proc = run([
        BIN / "fairseq-validate", "--user-dir", user_dir, "--path", save_dir / "checkpoint_best.pt",
        "--task", "graph_prediction", "--data-path", lmdb_dir, "--valid-subset", "valid",
        "--batch-size", args.batch_size, "--cpu", "--num-workers", "0",
    ], capture_output=True, text=True)
    sys.stdout.write(proc.stdout[-2000:])
    log = proc.stdout + proc.stderr
    found = re.findall(r"valid on 'valid' subset \| loss ([0-9.]+)", log)
    if not found:
        sys.stderr.write(log[-4000:])
        raise SystemExit("could not find the valid loss in the fairseq-validate output")
    model_mae = float(found[-1])

    print("\n== 4/4 compare with the mean baseline", flush=True)
    y_train = split_labels(str(lmdb_dir / "train.lmdb"))
    y_valid = split_labels(str(lmdb_dir / "valid.lmdb"))
    baseline_mae = float(np.abs(y_valid - y_train.mean()).mean())
    result = {
        "valid_molecules": int(len(y_valid)),
        "valid_mae_ev": round(model_mae, 4),
        "train_mean_baseline_mae_ev": round(baseline_mae, 4),
        "ratio": round(model_mae / baseline_mae, 3),
        "wall_s": round(time.time() - t0, 1),
    }
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(f"valid MAE (Transformer-M small, 2D inference): {model_mae:.4f} eV")
    print(f"valid MAE of predicting the train mean:       {baseline_mae:.4f} eV")
    print(f"ratio {result['ratio']:.3f}; wall {result['wall_s']:.0f} s; written {out / 'result.json'}")
    if not model_mae < 0.8 * baseline_mae:
        raise SystemExit("the model did not clearly beat the mean baseline")


if __name__ == "__main__":
    main()
