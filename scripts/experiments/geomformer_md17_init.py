#!/usr/bin/env python
"""GeoMFormer-small on an aspirin MD17-format trajectory: gradient norms and losses of the first
updates with the published initialisation and with this repository's defaults.

Issue 11 item 8 reported gradient norms ~3,000, clipping on every step and a model worse than
predicting zero after 100 updates. Variants (everything else identical: ``geomformer_small``,
forces as -dE/dR, L1 energy 0.2 + forces 0.8, Adam lr 5e-4, inverse-sqrt schedule, clip 10,
batch 8, the recipe ``scripts/recipes/geomformer_md17.sh`` defaults):

* ``published``   ``--gbf-std-offset 1e-5 --energy-head-init default`` (Gaussian widths
  ``|s| + 1e-5``, ``nn.Linear`` init of the energy output: the code before the fix);
* ``gbf_floor``   ``--gbf-std-offset 0.1 --energy-head-init default``;
* ``defaults``    the model defaults (width floor 0.1, zero energy output layer);
* ``defaults_wu100`` the defaults with 100 instead of 1,000 warm-up updates.

The trajectory is GFN2-xTB (``scripts/make_md17_xtb.py``, tblite), generated when ``--npz`` is
not given. Outputs (``--out``): ``data/``, ``runs/<variant>/`` and, in ``--report``,
``md17_init_curves.csv``, ``md17_init_results.csv`` and ``md17_init.png``. Resumable like the
other studies (finished variants are skipped).

    python scripts/experiments/geomformer_md17_init.py --out runs/experiments/md17_init
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _runs  # noqa: E402

VARIANTS = {
    "published": (["--gbf-std-offset", "1e-5", "--energy-head-init", "default"], 1000),
    "gbf_floor": (["--gbf-std-offset", "0.1", "--energy-head-init", "default"], 1000),
    "defaults": ([], 1000),
    "defaults_wu100": ([], 100),
}
ASPIRIN = "CC(=O)Oc1ccccc1C(=O)O"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--report", type=Path, default=None)
    p.add_argument("--npz", type=Path, default=None,
                   help="MD17-format trajectory (default: aspirin, GFN2-xTB, generated)")
    p.add_argument("--frames", type=int, default=1001, help="frames of the generated trajectory")
    p.add_argument("--train", type=int, default=800)
    p.add_argument("--valid", type=int, default=100)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--max-update", type=int, default=200)
    p.add_argument("--validate-interval-updates", type=int, default=50)
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--arch", default="geomformer_small")
    p.add_argument("--model-args", default="",
                   help="extra model flags for every variant (tests: a smaller model)")
    return p.parse_args(argv)


def ensure_data(args) -> Path:
    data = args.out / "data"
    env = _runs.child_env()
    npz = args.npz
    if npz is None:
        npz = data / "md17_aspirin_xtb.npz"
        if not npz.exists():
            cmd = [sys.executable, _runs.REPO / "scripts" / "make_md17_xtb.py", "--smiles",
                   ASPIRIN, "--name", "aspirin", "--frames", args.frames, "--seed", "0",
                   "--out", npz]
            rc, _ = _runs.run_logged(cmd, data / "make.log", env, _runs.REPO)
            if rc:
                raise SystemExit(f"trajectory generation failed; see {data / 'make.log'}")
    lmdb = data / "lmdb"
    if not (lmdb / "train.lmdb").exists():
        cmd = [_runs.tool("graphormer-ext-preprocess"), "md17", "--path", npz, "--train",
               args.train, "--valid", args.valid, "--seed", "0", "--out", lmdb]
        rc, _ = _runs.run_logged(cmd, data / "make.log", env, _runs.REPO)
        if rc:
            raise SystemExit(f"preprocessing failed; see {data / 'make.log'}")
    return lmdb


def baseline(lmdb: Path) -> dict:
    """Valid MAE of zero forces and of the training-mean energy (kcal/mol, kcal/mol/Å)."""
    import numpy as np

    from graphormer_ext.data import keys
    from graphormer_ext.data.lmdb_dataset import LMDBDataset

    def energies(ds):
        return np.array([float(np.asarray(ds[i][keys.Y]).reshape(-1)[0]) for i in range(len(ds))])

    train, valid = LMDBDataset(str(lmdb / "train.lmdb")), LMDBDataset(str(lmdb / "valid.lmdb"))
    f = np.concatenate([np.asarray(valid[i][keys.FORCES]).ravel() for i in range(len(valid))])
    return {"force_mae": float(np.abs(f).mean()),
            "energy_mae": float(np.abs(energies(valid) - energies(train).mean()).mean())}


def train_cmd(args, lmdb: Path, run_dir: Path, variant: str) -> list:
    flags, warmup = VARIANTS[variant]
    return [
        _runs.tool("fairseq-train"), "--user-dir", _runs.REPO / "transformer_m",
        "--task", "geomformer_md17", "--data-path", lmdb, "--arch", args.arch,
        "--force-mode", "grad", "--criterion", "geomformer_md17", "--loss-type", "l1",
        "--energy-weight", "0.2", "--force-weight", "0.8", *flags, *args.model_args.split(),
        "--optimizer", "adam", "--adam-betas", "(0.9, 0.999)", "--lr", "5e-4",
        "--clip-norm", "10.0", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", warmup,
        "--warmup-init-lr", "1e-7", "--batch-size", "8", "--max-update", args.max_update,
        "--max-epoch", "0", "--validate-interval-updates", args.validate_interval_updates,
        "--validate-interval", "1000000", "--save-interval-updates",
        args.validate_interval_updates, "--save-interval", "1000000", "--keep-interval-updates",
        "1", "--no-epoch-checkpoints", "--best-checkpoint-metric", "force_mae",
        "--save-dir", run_dir, "--seed", args.seed, "--cpu", "--num-workers", "0",
        "--log-format", "json", "--log-interval", args.log_interval,
    ]


def curves(run_dir: Path, variant: str) -> tuple[list[dict], list[dict]]:
    recs = _runs.fairseq_records(run_dir / "train.log", ("train_inner", "valid"))
    inner = _runs.last_by([r for r in recs if r["tag"] == "train_inner"], "num_updates")
    valid = _runs.last_by([r for r in recs if r["tag"] == "valid"], "num_updates")
    train_rows = [{"variant": variant, "num_updates": int(u), "gnorm": r.get("gnorm"),
                   "clip_pct": r.get("clip", 0.0), "lr": r.get("lr"), "train_loss": r.get("loss"),
                   "train_force_mae": r.get("force_mae"), "train_energy_mae": r.get("energy_mae")}
                  for u, r in sorted(inner.items())]
    valid_rows = [{"variant": variant, "num_updates": int(u), "valid_force_mae": r.get("force_mae"),
                   "valid_energy_mae": r.get("energy_mae")} for u, r in sorted(valid.items())]
    return train_rows, valid_rows


def run_variant(args, lmdb: Path, variant: str) -> None:
    run_dir = args.out / "runs" / variant
    if (run_dir / "done").exists():
        _runs.logger.info("%s: done, skipped", variant)
        return
    with _runs.RunLock(run_dir):
        _runs.logger.info("%s: training in %s", variant, run_dir)
        rc, wall = _runs.run_logged(train_cmd(args, lmdb, run_dir, variant), run_dir / "train.log",
                                    _runs.child_env(), run_dir)
        _runs.append_wall(run_dir, "train", wall, rc)
        if rc:
            raise SystemExit(f"{variant}: fairseq-train exited with {rc}; see "
                             f"{run_dir / 'train.log'}")
        (run_dir / "done").write_text(args.commit + "\n")


def report(args, lmdb: Path) -> list[dict]:
    out = args.report or args.out
    out.mkdir(parents=True, exist_ok=True)
    base = baseline(lmdb)
    train_rows, valid_rows, results = [], [], []
    for variant in VARIANTS:
        run_dir = args.out / "runs" / variant
        if not (run_dir / "done").exists():
            continue
        tr, va = curves(run_dir, variant)
        train_rows += tr
        valid_rows += va
        first = [r["gnorm"] for r in tr if r["num_updates"] <= 50]
        res = {"variant": variant, "flags": " ".join(VARIANTS[variant][0]) or "(defaults)",
               "warmup_updates": VARIANTS[variant][1],
               "gnorm_mean_first50": sum(first) / len(first) if first else math.nan,
               "gnorm_max_first50": max(first) if first else math.nan,
               "clip_pct_first50": (sum(r["clip_pct"] for r in tr if r["num_updates"] <= 50)
                                    / max(len(first), 1)),
               "commit": (run_dir / "done").read_text().strip()}
        for r in va:
            res[f"valid_force_mae_{r['num_updates']}"] = r["valid_force_mae"]
            res[f"valid_energy_mae_{r['num_updates']}"] = r["valid_energy_mae"]
        results.append(res)
    results.append({"variant": "zero forces, train-mean energy", "flags": "(baseline)",
                    **{f"valid_force_mae_{u}": base["force_mae"] for u in _checkpoints(args)},
                    **{f"valid_energy_mae_{u}": base["energy_mae"] for u in _checkpoints(args)}})
    fields = ["variant", "flags", "warmup_updates", "gnorm_mean_first50", "gnorm_max_first50",
              "clip_pct_first50"]
    for u in _checkpoints(args):
        fields += [f"valid_force_mae_{u}", f"valid_energy_mae_{u}"]
    _runs.write_csv(out / "md17_init_results.csv", results, fields + ["commit"])
    _runs.write_csv(out / "md17_init_curves.csv", train_rows,
                    ["variant", "num_updates", "gnorm", "clip_pct", "lr", "train_loss",
                     "train_force_mae", "train_energy_mae"])
    plot(out / "md17_init.png", train_rows, valid_rows, base)
    return results


def _checkpoints(args) -> list[int]:
    step = args.validate_interval_updates
    return list(range(step, args.max_update + 1, step))


def plot(path: Path, train_rows, valid_rows, base) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for variant in VARIANTS:
        tr = [r for r in train_rows if r["variant"] == variant]
        va = [r for r in valid_rows if r["variant"] == variant]
        if not tr:
            continue
        axes[0].plot([r["num_updates"] for r in tr], [r["gnorm"] for r in tr], marker=".",
                     label=variant)
        axes[1].plot([r["num_updates"] for r in va], [r["valid_force_mae"] for r in va],
                     marker="o", label=variant)
    axes[0].axhline(10.0, color="0.4", ls=":", lw=0.9)
    axes[0].text(0.01, 10.0, " --clip-norm 10", transform=axes[0].get_yaxis_transform(),
                 fontsize=7, va="bottom")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("update")
    axes[0].set_ylabel("gradient norm (mean of 10 updates)")
    axes[1].axhline(base["force_mae"], color="0.4", ls=":", lw=0.9)
    axes[1].text(0.01, base["force_mae"], " zero forces", transform=axes[1].get_yaxis_transform(),
                 fontsize=7, va="bottom")
    axes[1].set_xlabel("update")
    axes[1].set_ylabel("valid force MAE (kcal/mol/Å)")
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle("GeoMFormer-small, aspirin (GFN2-xTB), batch 8", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    _runs.setup_logging()
    args = _runs.resolve_study_args(parse_args(argv))
    args.npz = args.npz.resolve() if args.npz else None
    config = {k: getattr(args, k) for k in ("frames", "train", "valid", "seed", "max_update",
                                            "validate_interval_updates", "arch", "model_args")}
    config["npz"] = str(args.npz) if args.npz else None
    _runs.check_config(args.out, config, ())
    lmdb = ensure_data(args)
    for variant in args.variants:
        run_variant(args, lmdb, variant)
    for r in report(args, lmdb):
        u = args.max_update
        print(f"{r['variant']:<32s} gnorm(first 50) mean {r.get('gnorm_mean_first50', math.nan):9.1f}"
              f"  valid force MAE @{u}: {r.get(f'valid_force_mae_{u}', math.nan):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
