#!/usr/bin/env python
"""Study 1: GeoMFormer on the charged 5-body system (EGNN protocol), several seeds.

Protocol (GeoMFormer, ICML 2024, Table 6: test MSE 0.0047; EGNN 0.0071). The GeoMFormer paper
does not state its N-body training set-up, so EGNN's (Satorras et al. 2021, ``main_nbody.py``)
is used: 3,000 / 2,000 / 2,000 systems, Adam, lr 5e-4 (constant), weight decay 1e-12, batch
100, no gradient clipping, up to 10,000 epochs, valid and test MSE every 5 epochs, and the test
MSE reported at the best valid MSE. Early stopping: ``--patience`` validations without a better
valid MSE (fairseq's rule). The model is ``geomformer_small`` at EGNN's width (4 blocks, 64
channels, 8 heads, 32 Gaussian kernels) unless overridden.

Baselines computed on the same data: constant velocity ``x + v`` (the 1,000 steps span t = 1)
and EGNN's "Linear" baseline ``x + t v`` with the single ``t`` fitted on train (least squares;
EGNN reports 0.0819 for it on their draws).

Resumable: run the same command again after an interruption; runs continue from their last
checkpoint, finished seeds are skipped; a larger ``--max-epoch`` continues finished runs that
stopped on the epoch limit. Outputs (``--out``): ``data/`` (generated if missing),
``runs/seed<S>/`` (fairseq save dir, ``train.log``, ``result.json``), and in ``--report``
(default ``--out``) ``nbody_results.csv``, ``nbody_curves.csv`` and ``nbody.png``.

    python scripts/experiments/nbody_geomformer.py --out runs/experiments/nbody --seeds 1 2 3
    # tiny smoke run (seconds)
    python scripts/experiments/nbody_geomformer.py --out /tmp/nb --seeds 1 --train 32 \\
        --valid 16 --test 16 --max-epoch 2 --validate-interval 1 --layers 1 --embed-dim 16 \\
        --heads 2 --kernels 8 --batch-size 16
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _runs  # noqa: E402

PAPER_MSE = {"GeoMFormer (paper, Table 6)": 0.0047, "EGNN (Satorras et al. 2021, Table 2)": 0.0071,
             "Linear (EGNN Table 2)": 0.0819}
PROTOCOL_KEYS = ("train", "valid", "test", "data_seed_offset", "layers", "embed_dim", "heads",
                 "kernels", "batch_size", "lr", "weight_decay", "validate_interval", "patience",
                 "arch")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="study directory (data, runs)")
    p.add_argument("--report", type=Path, default=None,
                   help="where the CSVs and the PNG go (default: --out)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--train", type=int, default=3000)
    p.add_argument("--valid", type=int, default=2000)
    p.add_argument("--test", type=int, default=2000)
    p.add_argument("--data-seed-offset", type=int, default=0,
                   help="added to the simulator seeds of the splits")
    p.add_argument("--arch", default="geomformer_small")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--embed-dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kernels", type=int, default=32)
    for flag in ("dropout", "attention-dropout", "act-dropout"):
        p.add_argument(f"--{flag}", type=float, default=None,
                       help=f"model --{flag} (default: the arch's, 0 for geomformer_small)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--weight-decay", type=float, default=1e-12)
    p.add_argument("--max-epoch", type=int, default=10000,
                   help="epoch budget per seed (EGNN: 10,000)")
    p.add_argument("--validate-interval", type=int, default=5, help="epochs between validations")
    p.add_argument("--patience", type=int, default=20,
                   help="stop after this many validations without a better valid MSE")
    p.add_argument("--table-epochs", type=int, default=0,
                   help="epoch budget at which the seeds are compared in the table (default: the "
                   "smallest finished --max-epoch)")
    p.add_argument("--report-only", action="store_true",
                   help="only rebuild the CSVs and the plot from existing runs")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------
# data and baselines
# ------------------------------------------------------------------------------------------------
def ensure_data(args) -> Path:
    from graphormer_ext.sources.nbody import make_splits

    data = args.out / "data"
    if not all((data / f"{s}.npz").exists() for s in ("train", "valid", "test")):
        _runs.logger.info("simulating %d/%d/%d systems into %s", args.train, args.valid,
                          args.test, data)
        make_splits(data, {"train": args.train, "valid": args.valid, "test": args.test},
                    args.data_seed_offset)
    return data


def baselines(data: Path) -> list[dict]:
    """Constant-velocity and fitted-linear test/valid MSE (EGNN's metric: mean over particles
    and coordinates)."""
    from graphormer_ext.sources.nbody import load_split

    split = {s: load_split(data / f"{s}.npz") for s in ("train", "valid", "test")}
    tr = split["train"]
    t_fit = float((tr["vel"] * (tr["target_pos"] - tr["pos"])).sum() / (tr["vel"] ** 2).sum())
    rows = []
    for name, t in (("constant velocity (x + v)", 1.0), (f"linear, t fitted on train ({t_fit:.3f})",
                                                         t_fit)):
        mse = {s: float(np.mean((d["pos"] + t * d["vel"] - d["target_pos"]) ** 2))
               for s, d in split.items()}
        rows.append({"model": name, "source": "computed", "valid_mse": mse["valid"],
                     "test_mse": mse["test"]})
    return rows


# ------------------------------------------------------------------------------------------------
# one seed
# ------------------------------------------------------------------------------------------------
def train_cmd(args, data: Path, run_dir: Path, seed: int) -> list:
    return [
        _runs.tool("fairseq-train"), "--user-dir", _runs.REPO / "transformer_m",
        "--task", "geomformer_nbody", "--data-path", data, "--criterion", "geomformer_nbody",
        "--arch", args.arch, "--encoder-layers", args.layers,
        "--encoder-embed-dim", args.embed_dim, "--encoder-ffn-embed-dim", args.embed_dim,
        "--encoder-attention-heads", args.heads, "--num-kernel", args.kernels,
        *regularisation_flags(args),
        "--optimizer", "adam", "--adam-betas", "(0.9, 0.999)", "--lr", args.lr,
        "--weight-decay", args.weight_decay, "--lr-scheduler", "fixed", "--clip-norm", "0",
        "--batch-size", args.batch_size, "--required-batch-size-multiple", "1",
        "--max-epoch", args.max_epoch, "--validate-interval", args.validate_interval,
        "--valid-subset", "valid,test", "--best-checkpoint-metric", "mse",
        "--patience", args.patience, "--save-dir", run_dir, "--no-epoch-checkpoints",
        "--seed", seed, "--cpu", "--num-workers", "0", "--log-format", "json",
        "--log-interval", "1000",
    ]


REGULARISATION = ("dropout", "attention_dropout", "act_dropout")


def regularisation_flags(args) -> list:
    """Dropout flags given on the command line (none: the arch's defaults)."""
    out = []
    for key in REGULARISATION:
        if getattr(args, key) is not None:
            out += ["--" + key.replace("_", "-"), getattr(args, key)]
    return out


def validate_cmd(args, data: Path, run_dir: Path) -> list:
    return [
        _runs.tool("fairseq-validate"), "--user-dir", _runs.REPO / "transformer_m",
        "--task", "geomformer_nbody", "--data-path", data, "--path", run_dir / "checkpoint_best.pt",
        "--valid-subset", "test", "--batch-size", args.batch_size, "--cpu", "--num-workers", "0",
        "--log-format", "json",
    ]


def curves(run_dir: Path) -> list[dict]:
    """Per validated epoch: train (epoch mean), valid and test MSE."""
    log = run_dir / "train.log"
    recs = _runs.fairseq_records(log, ("train", "valid", "test"))
    by = {tag: _runs.last_by([r for r in recs if r["tag"] == tag], "epoch")
          for tag in ("train", "valid", "test")}
    rows = []
    for ep in sorted(by["valid"]):
        v, t, tr = by["valid"][ep], by["test"].get(ep, {}), by["train"].get(ep, {})
        rows.append({"epoch": int(ep), "num_updates": int(v.get("num_updates", 0)),
                     "train_mse": tr.get("mse", math.nan), "valid_mse": v["mse"],
                     "test_mse": t.get("mse", math.nan), "wall_s": tr.get("wall", math.nan)})
    return rows


def summarise(args, run_dir: Path, seed: int, test_validate: float) -> dict:
    rows = curves(run_dir)
    if not rows:
        raise SystemExit(f"{run_dir}/train.log has no validation line")
    best = min(rows, key=lambda r: (r["valid_mse"], r["epoch"]))
    train = _runs.last_by(_runs.fairseq_records(run_dir / "train.log", ("train",)), "epoch")
    last_epoch = int(max(train)) if train else 0
    if _runs.early_stopped(run_dir / "train.log"):
        reason = f"early stop (patience {args.patience})"
    else:
        reason = "epoch budget"
    return {
        "model": "GeoMFormer (ours)", "source": "trained", "seed": seed,
        "epochs": last_epoch, "max_epoch": args.max_epoch, "stop": reason,
        "best_epoch": best["epoch"], "valid_mse": best["valid_mse"],
        "test_mse_log": best["test_mse"], "test_mse": test_validate,
        "wall_s": _runs.log_wall_seconds(run_dir / "train.log")
        + _runs.wall_seconds(run_dir, "test"),
        "commit": args.commit,
    }


def run_seed(args, data: Path, seed: int) -> dict | None:
    run_dir = args.out / "runs" / f"seed{seed}"
    done = _runs.read_json(run_dir / "result.json")
    if done and (done["stop"].startswith("early stop") or done["max_epoch"] >= args.max_epoch):
        _runs.logger.info("seed %d: done (%s), skipped", seed, done["stop"])
        return done
    env = _runs.child_env()
    try:
        lock = _runs.RunLock(run_dir).__enter__()
    except RuntimeError as e:
        _runs.logger.warning("seed %d: %s; skipped here", seed, e)
        return None
    try:
        _runs.logger.info("seed %d: training in %s (log %s)", seed, run_dir, run_dir / "train.log")
        rc, wall = _runs.run_logged(train_cmd(args, data, run_dir, seed), run_dir / "train.log",
                                    env, run_dir)
        _runs.append_wall(run_dir, "train", wall, rc)
        if rc != 0:
            raise SystemExit(f"seed {seed}: fairseq-train exited with {rc}; see "
                             f"{run_dir / 'train.log'} (rerun the same command to resume)")
        rc, wall = _runs.run_logged(validate_cmd(args, data, run_dir), run_dir / "test.log", env,
                                    run_dir)
        _runs.append_wall(run_dir, "test", wall, rc)
        recs = _runs.fairseq_records(run_dir / "test.log", ("test",))
        if rc != 0 or not recs:
            raise SystemExit(f"seed {seed}: fairseq-validate failed; see {run_dir / 'test.log'}")
        result = summarise(args, run_dir, seed, recs[-1]["mse"])
        _runs.write_json(run_dir / "result.json", result)
        _runs.logger.info("seed %d: best epoch %d, valid %.5f, test %.5f (%s)", seed,
                          result["best_epoch"], result["valid_mse"], result["test_mse"],
                          result["stop"])
        return result
    finally:
        lock.__exit__(None, None, None)


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------
RESULT_FIELDS = ["model", "source", "seed", "epochs", "stop", "best_epoch", "valid_mse",
                 "valid_mse_std", "test_mse", "test_mse_std", "test_mse_validate", "wall_s",
                 "commit"]
CURVE_FIELDS = ["seed", "epoch", "num_updates", "train_mse", "valid_mse", "test_mse", "wall_s"]


def best_within(rows: list[dict], max_epoch: float) -> dict | None:
    """Validation row with the lowest valid MSE among epochs <= ``max_epoch`` (earliest on ties)."""
    rows = [r for r in rows if r["epoch"] <= max_epoch]
    return min(rows, key=lambda r: (r["valid_mse"], r["epoch"])) if rows else None


def report(args, data: Path) -> list[dict]:
    """CSVs and plot. Seeds are compared at one epoch budget (``--table-epochs``, default the
    smallest finished budget): best valid epoch within it and the test MSE logged there (the
    in-training evaluation of the full test split). ``test_mse_validate`` is fairseq-validate
    of ``checkpoint_best.pt`` when that checkpoint belongs to the budget. A seed trained beyond the
    budget also gets a row over all its logged epochs (the longest run)."""
    out = args.report or args.out
    out.mkdir(parents=True, exist_ok=True)
    base = baselines(data)
    finished, curve_rows, logged = {}, [], {}
    for seed_dir in sorted((args.out / "runs").glob("seed*")):
        seed = int(seed_dir.name[4:])
        rows = curves(seed_dir)
        curve_rows += [{"seed": seed, **r} for r in rows]
        logged[seed] = (seed_dir, rows)
        res = _runs.read_json(seed_dir / "result.json")
        if res is not None:
            finished[seed] = res
    budget = args.table_epochs or min((r["max_epoch"] for r in finished.values()), default=0)
    table, longest = [], []
    for seed, (seed_dir, rows) in logged.items():
        res = finished.get(seed)
        wall = _runs.log_wall_seconds(seed_dir / "train.log")
        best = best_within(rows, budget)
        if res is None or best is None or max(r["epoch"] for r in rows) < budget:
            continue
        row = {"model": "GeoMFormer (ours)", "source": "trained", "seed": seed,
               "epochs": budget, "stop": res["stop"] if res["max_epoch"] == budget else
               "epoch budget", "best_epoch": best["epoch"], "valid_mse": best["valid_mse"],
               "test_mse": best["test_mse"], "commit": res["commit"],
               "wall_s": _runs.log_wall_seconds(seed_dir / "train.log", budget)}
        if res["max_epoch"] == budget:
            row["test_mse_validate"] = res["test_mse"]
        table.append(row)
        last = max(r["epoch"] for r in rows)
        if last > budget:
            top = best_within(rows, last)
            # finished here: its budget reached, or stopped early at this epoch (patience)
            finished_here = res["max_epoch"] == last or (
                str(res["stop"]).startswith("early stop") and res.get("epochs") == last)
            longest.append({"model": f"GeoMFormer (ours), longest run: {last} epochs",
                            "source": "trained", "seed": seed, "epochs": last,
                            "stop": res["stop"] if finished_here else "interrupted",
                            "best_epoch": top["epoch"], "valid_mse": top["valid_mse"],
                            "test_mse": top["test_mse"], "wall_s": wall, "commit": res["commit"],
                            "test_mse_validate": res["test_mse"] if finished_here
                            and res["best_epoch"] == top["epoch"] else math.nan})
    if table:
        m, s = _runs.mean_std([r["test_mse"] for r in table])
        vm, vs = _runs.mean_std([r["valid_mse"] for r in table])
        table.append({"model": f"GeoMFormer (ours), mean ± std of {len(table)} seeds",
                      "source": "trained", "seed": "mean", "epochs": budget, "valid_mse": vm,
                      "test_mse": m, "valid_mse_std": vs, "test_mse_std": s})
    lit = [{"model": k, "source": "literature", "test_mse": v} for k, v in PAPER_MSE.items()]
    rows = table + longest + base + lit
    _runs.write_csv(out / "nbody_results.csv", rows, RESULT_FIELDS)
    _runs.write_csv(out / "nbody_curves.csv", curve_rows, CURVE_FIELDS)
    plot(out / "nbody.png", curve_rows, base, args)
    return rows


def plot(path: Path, curve_rows: list[dict], base: list[dict], args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 5.0))
    seeds = sorted({r["seed"] for r in curve_rows})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, seed in enumerate(seeds):
        rows = [r for r in curve_rows if r["seed"] == seed]
        ep = [r["epoch"] for r in rows]
        c = colors[i % len(colors)]
        ax.plot(ep, [r["valid_mse"] for r in rows], color=c, lw=1.2, label=f"seed {seed} valid")
        ax.plot(ep, [r["test_mse"] for r in rows], color=c, lw=1.0, ls="--",
                label=f"seed {seed} test")
        ax.plot(ep, [r["train_mse"] for r in rows], color=c, lw=0.8, ls=":",
                label=f"seed {seed} train (epoch mean)")
    refs = [(b["model"], b["test_mse"]) for b in base] + list(PAPER_MSE.items())[:2]
    for j, (name, val) in enumerate(refs):
        ax.axhline(val, color="0.35", lw=0.8, ls=[":", "-.", "--", "-"][j % 4])
        ax.text(1.0, val, f" {name}: {val:.4f}", transform=ax.get_yaxis_transform(),
                fontsize=7, va="center", ha="left")
    ax.set_yscale("log")
    ax.set_xlabel("epoch (30 updates of batch 100)" if args.batch_size == 100 else "epoch")
    ax.set_ylabel("MSE of positions after 1,000 steps")
    ax.set_title("GeoMFormer on charged 5-body (EGNN protocol)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6, loc="upper center", ncol=3, framealpha=0.9)
    fig.tight_layout()
    fig.subplots_adjust(right=0.68)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    _runs.setup_logging()
    args = _runs.resolve_study_args(parse_args(argv))
    config = {k: getattr(args, k) for k in PROTOCOL_KEYS}
    config.update({k: getattr(args, k) for k in REGULARISATION if getattr(args, k) is not None})
    config.update(max_epoch=args.max_epoch, seeds=args.seeds)
    _runs.check_config(args.out, config, ("max_epoch", "seeds"))
    data = ensure_data(args)
    if not args.report_only:
        for seed in args.seeds:
            run_seed(args, data, seed)
    rows = report(args, data)
    for r in rows:
        print(f"{r['model']:<48s} seed {r.get('seed', '-')!s:>4}  "
              f"valid {r.get('valid_mse', math.nan):.5f}  test {r['test_mse']:.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
