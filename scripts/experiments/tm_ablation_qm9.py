#!/usr/bin/env python
"""Study 2: Transformer-M's joint 2D/3D training claim at reduced scale, on real QM9.

Claim (Transformer-M, ICLR 2023, ablation): training on 2D and 3D data jointly, with the 3D
denoising task, improves 2D-only inference over training on 2D alone. Tested here on QM9
molecules (DFT geometries and HOMO-LUMO gaps from the ``qm9pack`` wheel) written in the
PCQM4Mv2 layout by ``scripts/make_demo_data.py``: 3D for train, SMILES (2D) only for valid and
test, as in PCQM4Mv2. Target: HOMO-LUMO gap (eV), L1.

Conditions (same ``transformer_m_small`` model built with ``--add-3d``, same data, updates,
optimiser and seeds; only the mode distribution and the denoising task differ):

* ``2d``             ``--mode-prob 0,1,0``: every training molecule in 2D mode (the 3D
  channel is built but never fed; the original repository's way to train on 2D);
* ``joint``          ``--mode-prob 0.2,0.2,0.6 --noise-scale 0.2``, denoising weight 1 (paper);
* ``joint_nodenoise`` ``--mode-prob 0.2,0.2,0.6`` on clean 3D, no denoising loss.

Valid and test MAE are 2D-only (the splits carry no coordinates). The valid split picks the
checkpoint; the test MAE is read at that checkpoint. Test molecules are a labelled held-out half
of the drawn valid molecules (real PCQM4Mv2 hides its test labels), stored as ``test-dev``.

Resumable: the same command continues interrupted runs from their last checkpoint and skips
finished ones. Outputs (``--out``): ``data/`` (layout + LMDB), ``runs/<condition>/seed<S>/``;
in ``--report`` (default ``--out``): ``tm_ablation_results.csv``, ``tm_ablation_summary.csv``,
``tm_ablation_curves.csv`` and ``tm_ablation.png``.

    python scripts/experiments/tm_ablation_qm9.py --out runs/experiments/tm_ablation --seeds 1 2 3
    # tiny smoke run (seconds)
    python scripts/experiments/tm_ablation_qm9.py --out /tmp/tma --seeds 1 --train 64 --valid 32 \\
        --test 32 --max-update 6 --validate-interval-updates 3 --batch-size 16 --layers 1 \\
        --embed-dim 16 --ffn-dim 16 --heads 2
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _runs  # noqa: E402

CONDITIONS = {
    "2d": {"mode_prob": "0,1,0", "noise_scale": 0.0, "denoise_weight": 0.0,
           "label": "(a) 2D only"},
    "joint": {"mode_prob": "0.2,0.2,0.6", "noise_scale": 0.2, "denoise_weight": 1.0,
              "label": "(b) joint + denoising"},
    "joint_nodenoise": {"mode_prob": "0.2,0.2,0.6", "noise_scale": 0.0, "denoise_weight": 0.0,
                        "label": "(c) joint, no denoising"},
}
PROTOCOL_KEYS = ("train", "valid", "test", "data_seed", "arch", "layers", "embed_dim", "ffn_dim",
                 "heads", "kernels", "batch_size", "lr", "warmup_ratio", "max_update",
                 "validate_interval_updates")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--report", type=Path, default=None, help="CSV/PNG folder (default --out)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=list(CONDITIONS))
    p.add_argument("--train", type=int, default=20000, help="training molecules (3D)")
    p.add_argument("--valid", type=int, default=2000, help="valid molecules (2D)")
    p.add_argument("--test", type=int, default=2000, help="test molecules (2D)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the QM9 draw")
    p.add_argument("--csv-dir", type=Path, default=None,
                   help="qm9pack CSV folder (default: the installed qm9pack)")
    p.add_argument("--arch", default="transformer_m_small")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--embed-dim", type=int, default=128)
    p.add_argument("--ffn-dim", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kernels", type=int, default=32, help="3D Gaussian kernels")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup-ratio", type=float, default=0.1,
                   help="linear warm-up share of --max-update (paper: 150k of 1.5M)")
    p.add_argument("--max-update", type=int, default=800, help="updates per run")
    p.add_argument("--validate-interval-updates", type=int, default=200)
    p.add_argument("--report-only", action="store_true")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------
def ensure_data(args) -> Path:
    """PCQM4Mv2 layout of QM9 (train 3D; valid and a labelled test-dev 2D) -> LMDB splits."""
    layout, lmdb = args.out / "data" / "layout", args.out / "data" / "lmdb"
    env = _runs.child_env()
    if not (layout / "SHA256SUMS").exists():
        cmd = [sys.executable, _runs.REPO / "scripts" / "make_demo_data.py", "--out", layout,
               "--seed", args.data_seed, "--train", args.train, "--valid", args.valid + args.test,
               "--test-dev", 0, "--test-challenge", 0, "--max-file-bytes", 1 << 34,
               "--no-verify", "--overwrite"]
        if args.csv_dir:
            cmd += ["--csv-dir", args.csv_dir]
        rc, wall = _runs.run_logged(cmd, args.out / "data" / "make.log", env, _runs.REPO)
        _runs.append_wall(args.out / "data", "layout", wall, rc)
        if rc:
            raise SystemExit(f"make_demo_data.py failed; see {args.out / 'data' / 'make.log'}")
        split_valid_test(layout, args.valid)
    if not all((lmdb / f"{s}.lmdb").exists() for s in ("train", "valid", "test-dev")):
        cmd = [_runs.tool("graphormer-ext-preprocess"), "pcqm4mv2", "--root", layout, "--out",
               lmdb, "--splits", "train,valid,test-dev", "--workers", "1", "--no-progress",
               "--overwrite"]
        rc, wall = _runs.run_logged(cmd, args.out / "data" / "make.log", env, _runs.REPO)
        _runs.append_wall(args.out / "data", "lmdb", wall, rc)
        if rc:
            raise SystemExit(f"preprocessing failed; see {args.out / 'data' / 'make.log'}")
    return lmdb


def split_valid_test(layout: Path, n_valid: int) -> None:
    """Keep the first ``n_valid`` labelled valid rows as ``valid``; the rest become a labelled
    ``test-dev`` (their labels stay in data.csv.gz). Refreshes SHA256SUMS."""
    import torch

    sys.path.insert(0, str(_runs.REPO / "scripts"))
    from make_demo_data import write_checksums

    path = layout / "pcqm4m-v2" / "split_dict.pt"
    split = torch.load(path, weights_only=True)
    valid = split["valid"]
    split["valid"], split["test-dev"] = valid[:n_valid].clone(), valid[n_valid:].clone()
    torch.save(split, path)
    write_checksums(layout)
    _runs.logger.info("split: train %d (3D), valid %d, test-dev %d (labelled, 2D)",
                      len(split["train"]), len(split["valid"]), len(split["test-dev"]))


# ------------------------------------------------------------------------------------------------
# runs
# ------------------------------------------------------------------------------------------------
def train_cmd(args, lmdb: Path, run_dir: Path, cond: str, seed: int) -> list:
    c = CONDITIONS[cond]
    warmup = max(1, int(round(args.warmup_ratio * args.max_update)))
    return [
        _runs.tool("fairseq-train"), "--user-dir", _runs.REPO / "transformer_m",
        "--task", "graph_prediction", "--criterion", "graph_prediction", "--data-path", lmdb,
        "--arch", args.arch, "--num-classes", "1", "--encoder-layers", args.layers,
        "--encoder-embed-dim", args.embed_dim, "--encoder-ffn-embed-dim", args.ffn_dim,
        "--encoder-attention-heads", args.heads, "--num-3d-bias-kernel", args.kernels,
        "--add-3d", "--mode-prob", c["mode_prob"], "--noise-scale", c["noise_scale"],
        "--denoise-weight", c["denoise_weight"],
        "--dropout", "0.0", "--attention-dropout", "0.1", "--act-dropout", "0.1",
        "--optimizer", "adam", "--adam-betas", "(0.9, 0.999)", "--adam-eps", "1e-8",
        "--weight-decay", "0.0", "--clip-norm", "5.0",
        "--lr-scheduler", "polynomial_decay", "--power", "1", "--lr", args.lr,
        "--warmup-updates", warmup, "--total-num-update", args.max_update,
        "--end-learning-rate", "1e-9", "--batch-size", args.batch_size,
        "--max-update", args.max_update, "--max-epoch", "0",
        "--validate-interval-updates", args.validate_interval_updates,
        "--validate-interval", "1000000", "--save-interval-updates",
        args.validate_interval_updates, "--save-interval", "1000000",
        "--keep-interval-updates", "1", "--no-epoch-checkpoints",
        "--valid-subset", "valid,test-dev", "--best-checkpoint-metric", "loss",
        "--save-dir", run_dir, "--seed", seed, "--cpu", "--num-workers", "0",
        "--log-format", "json", "--log-interval", "100",
    ]


def curves(run_dir: Path) -> list[dict]:
    """Per validation: valid and test MAE (eV), keyed by update."""
    recs = _runs.fairseq_records(run_dir / "train.log", ("valid", "test-dev"))
    by = {tag: _runs.last_by([r for r in recs if r["tag"] == tag], "num_updates")
          for tag in ("valid", "test-dev")}
    return [{"num_updates": int(u), "valid_mae": v["loss"],
             "test_mae": by["test-dev"].get(u, {}).get("loss", math.nan)}
            for u, v in sorted(by["valid"].items())]


def run_one(args, lmdb: Path, cond: str, seed: int) -> dict | None:
    run_dir = args.out / "runs" / cond / f"seed{seed}"
    done = _runs.read_json(run_dir / "result.json")
    if done and done["max_update"] >= args.max_update:
        _runs.logger.info("%s seed %d: done, skipped", cond, seed)
        return done
    try:
        lock = _runs.RunLock(run_dir).__enter__()
    except RuntimeError as e:
        _runs.logger.warning("%s seed %d: %s; skipped here", cond, seed, e)
        return None
    try:
        _runs.logger.info("%s seed %d: training in %s", cond, seed, run_dir)
        rc, wall = _runs.run_logged(train_cmd(args, lmdb, run_dir, cond, seed),
                                    run_dir / "train.log", _runs.child_env(), run_dir)
        _runs.append_wall(run_dir, "train", wall, rc)
        if rc != 0:
            raise SystemExit(f"{cond} seed {seed}: fairseq-train exited with {rc}; see "
                             f"{run_dir / 'train.log'} (rerun the same command to resume)")
        rows = curves(run_dir)
        if not rows:
            raise SystemExit(f"{run_dir / 'train.log'} has no validation line")
        best = min(rows, key=lambda r: (r["valid_mae"], r["num_updates"]))
        result = {"condition": cond, "label": CONDITIONS[cond]["label"], "seed": seed,
                  "max_update": args.max_update, "best_update": best["num_updates"],
                  "valid_mae": best["valid_mae"], "test_mae": best["test_mae"],
                  "final_valid_mae": rows[-1]["valid_mae"], "final_test_mae": rows[-1]["test_mae"],
                  "wall_s": _runs.log_wall_seconds(run_dir / "train.log"),
                  "commit": args.commit,
                  **{k: v for k, v in CONDITIONS[cond].items() if k != "label"}}
        _runs.write_json(run_dir / "result.json", result)
        _runs.logger.info("%s seed %d: valid %.4f test %.4f eV (best at update %d)", cond, seed,
                          result["valid_mae"], result["test_mae"], result["best_update"])
        return result
    finally:
        lock.__exit__(None, None, None)


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------
RESULT_FIELDS = ["condition", "label", "seed", "mode_prob", "noise_scale", "denoise_weight",
                 "max_update", "best_update", "valid_mae", "test_mae", "final_valid_mae",
                 "final_test_mae", "wall_s", "commit"]
SUMMARY_FIELDS = ["condition", "label", "n_seeds", "valid_mae_mean", "valid_mae_std",
                  "test_mae_mean", "test_mae_std", "train_mean_baseline_valid",
                  "train_mean_baseline_test"]
CURVE_FIELDS = ["condition", "seed", "num_updates", "valid_mae", "test_mae"]


def mean_baseline(lmdb: Path) -> dict:
    """MAE of predicting the training mean gap on valid and test (eV)."""
    import numpy as np

    from graphormer_ext.data import keys
    from graphormer_ext.data.lmdb_dataset import LMDBDataset

    def labels(split):
        ds = LMDBDataset(str(lmdb / f"{split}.lmdb"))
        return np.array([float(np.asarray(ds[i][keys.Y]).reshape(-1)[0]) for i in range(len(ds))])

    mu = float(labels("train").mean())
    return {s: float(np.abs(labels(f) - mu).mean()) for s, f in (("valid", "valid"),
                                                                  ("test", "test-dev"))}


def report(args, lmdb: Path) -> list[dict]:
    out = args.report or args.out
    out.mkdir(parents=True, exist_ok=True)
    results, curve_rows = [], []
    for cond in CONDITIONS:
        for run_dir in sorted((args.out / "runs" / cond).glob("seed*")):
            seed = int(run_dir.name[4:])
            curve_rows += [{"condition": cond, "seed": seed, **r} for r in curves(run_dir)]
            res = _runs.read_json(run_dir / "result.json")
            if res is not None:
                res["wall_s"] = _runs.log_wall_seconds(run_dir / "train.log")
                results.append(res)
    base = mean_baseline(lmdb)
    summary = []
    for cond, c in CONDITIONS.items():
        rs = [r for r in results if r["condition"] == cond]
        if not rs:
            continue
        vm, vs = _runs.mean_std([r["valid_mae"] for r in rs])
        tm, ts = _runs.mean_std([r["test_mae"] for r in rs])
        summary.append({"condition": cond, "label": c["label"], "n_seeds": len(rs),
                        "valid_mae_mean": vm, "valid_mae_std": vs, "test_mae_mean": tm,
                        "test_mae_std": ts, "train_mean_baseline_valid": base["valid"],
                        "train_mean_baseline_test": base["test"]})
    _runs.write_csv(out / "tm_ablation_results.csv", results, RESULT_FIELDS)
    _runs.write_csv(out / "tm_ablation_summary.csv", summary, SUMMARY_FIELDS)
    _runs.write_csv(out / "tm_ablation_curves.csv", curve_rows, CURVE_FIELDS)
    plot(out / "tm_ablation.png", curve_rows, results, base)
    return summary


def plot(path: Path, curve_rows: list[dict], results: list[dict], base: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), gridspec_kw={"width_ratios": [2, 1]})
    colors = dict(zip(CONDITIONS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    ax = axes[0]
    for cond, c in CONDITIONS.items():
        rows = [r for r in curve_rows if r["condition"] == cond]
        for seed in sorted({r["seed"] for r in rows}):
            rr = [r for r in rows if r["seed"] == seed]
            ax.plot([r["num_updates"] for r in rr], [r["valid_mae"] for r in rr],
                    color=colors[cond], lw=1.1, alpha=0.85,
                    label=c["label"] if seed == min(r["seed"] for r in rows) else None)
    ax.axhline(base["valid"], color="0.4", ls=":", lw=0.9)
    ax.text(0.02, base["valid"], " predict train mean", transform=ax.get_yaxis_transform(),
            fontsize=7, va="bottom")
    ax.set_yscale("log")
    ax.set_xlabel("update (batch 64)")
    ax.set_ylabel("valid MAE, 2D input (eV)")
    ax.set_title("HOMO-LUMO gap, QM9 in PCQM4Mv2 layout: valid curves", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax = axes[1]
    for i, (cond, c) in enumerate(CONDITIONS.items()):
        vals = [r["test_mae"] for r in results if r["condition"] == cond]
        if not vals:
            continue
        m, s = _runs.mean_std(vals)
        ax.errorbar([i], [m], yerr=[0 if math.isnan(s) else s], fmt="o", color=colors[cond],
                    capsize=4)
        ax.scatter([i + 0.12] * len(vals), vals, s=10, color=colors[cond], alpha=0.6)
    ax.set_xticks(range(len(CONDITIONS)))
    ax.set_xticklabels([c["label"].split(" ", 1)[0] for c in CONDITIONS.values()])
    ax.set_ylabel("test MAE at best valid (eV)")
    ax.set_title("test MAE: mean ± std (dots: seeds)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    _runs.setup_logging()
    args = _runs.resolve_study_args(parse_args(argv))
    config = {k: getattr(args, k) for k in PROTOCOL_KEYS}
    config.update(seeds=args.seeds, conditions=args.conditions)
    _runs.check_config(args.out, config, ("seeds", "conditions"))
    lmdb = ensure_data(args)
    if not args.report_only:
        for seed in args.seeds:  # seed-major: every condition gets seed 1 before seed 2
            for cond in args.conditions:
                run_one(args, lmdb, cond, seed)
    for r in report(args, lmdb):
        print(f"{r['label']:<28s} n={r['n_seeds']}  valid {r['valid_mae_mean']:.4f} ± "
              f"{r['valid_mae_std']:.4f}  test {r['test_mae_mean']:.4f} ± {r['test_mae_std']:.4f} eV")
    return 0


if __name__ == "__main__":
    sys.exit(main())
