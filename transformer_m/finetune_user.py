"""One command from a user CSV/SDF to a validated fine-tuned checkpoint.

    python -m transformer_m.finetune_user --csv mols.csv --smiles-column smiles \\
        --label-columns logS,active --target logS --pretrained ckpt.pt --out runs/logS

Steps (each printed before it runs):

1. ``graphormer-ext-preprocess csv|sdf`` → ``<out>/lmdb/{train,valid,test}.lmdb`` (split from a
   column/property or seeded random; ``--conformers`` adds RDKit ETKDG+MMFF 3D; unreadable
   molecules and failed embeddings are skipped and listed in ``<out>/lmdb/*.skipped.tsv``).
   Reused when it exists (``--overwrite`` rebuilds it).
2. ``fairseq-train --task graph_prediction_qm9 --criterion graph_prediction_qm9`` on the chosen
   label column (``--task-idx``), from ``--pretrained`` with ``--finetune-from-model
   --remove-head`` (the architecture and sizes are read from the checkpoint so the weights load),
   or from scratch (``--arch``).
3. ``fairseq-validate`` of ``checkpoint_best.pt`` on valid and test; the metrics go to
   ``<out>/summary.json``.

Regression uses ``--loss-type L2 --std-type std_logits`` (the QM9 recipe); ``--kind binary`` uses
BCE (labels 0/1; accuracy and ROC-AUC), ``--kind multiclass`` CE (labels 0..K-1; accuracy).
Extra fairseq flags go after ``--``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Sequence

logger = logging.getLogger("transformer_m.finetune_user")

PLUGIN_DIR = Path(__file__).resolve().parent
# Model fields copied from a pre-trained checkpoint so that its weights load (strict).
_ARCH_FIELDS = (
    "encoder_layers", "encoder_embed_dim", "encoder_ffn_embed_dim", "encoder_attention_heads",
    "num_3d_bias_kernel", "activation_fn",
)  # fmt: skip
_BOOL_FIELDS = ("encoder_normalize_before", "add_3d", "sandwich_ln")


def _bin(name: str) -> str:
    exe = Path(sys.executable).parent / name
    return str(exe) if exe.exists() else name


def checkpoint_model_args(path: str) -> tuple[list[str], bool]:
    """fairseq flags reproducing a checkpoint's architecture, and whether it has a 3D channel."""
    from transformer_m.checkpoint import load_checkpoint_file

    state = load_checkpoint_file(path, what="--pretrained")  # weights only
    model = dict(state["cfg"]["model"]) if state.get("cfg") else vars(state["args"])
    arch = model.get("_name") or model.get("arch")
    flags = ["--arch", str(arch)]
    for name in _ARCH_FIELDS:
        if model.get(name) is not None:
            flags += ["--" + name.replace("_", "-"), str(model[name])]
    for name in _BOOL_FIELDS:
        if model.get(name):
            flags.append("--" + name.replace("_", "-"))
    return flags, bool(model.get("add_3d"))


def _has_3d(lmdb_dir: Path) -> bool:
    from graphormer_ext.data.lmdb_dataset import LMDBDataset

    meta = LMDBDataset(lmdb_dir / "train.lmdb").meta
    return bool((meta.get("stats") or {}).get("with_pos"))


def _targets(lmdb_dir: Path) -> list[str]:
    from graphormer_ext.data.lmdb_dataset import LMDBDataset

    desc = (LMDBDataset(lmdb_dir / "train.lmdb").meta.get("source") or {}).get("describe") or {}
    return [t["name"] if isinstance(t, dict) else str(t) for t in desc.get("targets") or []]


def _run(argv: list[str], log: Path) -> str:
    print("+ " + " ".join(shlex.quote(a) for a in argv), flush=True)
    with open(log, "w") as fh:
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        fh.write(proc.stdout)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-30:])
        raise SystemExit(f"{argv[0]} failed ({proc.returncode}); log {log}:\n{tail}")
    return proc.stdout


def _json_records(text: str, kind: str) -> list[dict]:
    pat = re.compile(r"\| " + re.escape(kind) + r" \| (\{.*\})\s*$")
    return [json.loads(m.group(1)) for m in map(pat.search, text.splitlines()) if m]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m transformer_m.finetune_user",
        description="Preprocess a user CSV/SDF, fine-tune Transformer-M on one label, validate.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--csv", help="CSV/TSV(.gz) with a SMILES column and label columns")
    src.add_argument("--sdf", help="SDF(.gz) with labels as properties (3D kept)")
    p.add_argument("--smiles-column", default="smiles", help="CSV SMILES column")
    p.add_argument("--label-columns", required=True,
                   help="comma-separated label columns (CSV) or properties (SDF), all stored")
    p.add_argument("--target", default=None,
                   help="label to fine-tune on (name or index; default: the first)")
    p.add_argument("--split-column", default=None,
                   help="column/property with train/valid/test (default: seeded random split)")
    p.add_argument("--split-fractions", type=float, nargs=3, default=(0.8, 0.1, 0.1))
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--conformers", action="store_true",
                   help="CSV: generate RDKit ETKDG+MMFF 3D conformers (seeded)")
    p.add_argument("--no-3d", action="store_true", help="SDF: ignore the coordinates")
    p.add_argument("--kind", choices=("regression", "binary", "multiclass"), default="regression")
    p.add_argument("--num-classes", type=int, default=2, help="classes for --kind multiclass")
    p.add_argument("--pretrained", default=None,
                   help="pre-trained Transformer-M checkpoint (fairseq); default: from scratch")
    p.add_argument("--arch", default="transformer_m_small", help="without --pretrained")
    p.add_argument("--channels", choices=("auto", "3d", "2d", "2d3d"), default="auto",
                   help="auto: 3D only when the data has 3D (the QM9 protocol), else 2D")
    p.add_argument("--readout", choices=("cls", "mean", "sum"), default="cls")
    p.add_argument("--lr", type=float, default=7e-5)
    p.add_argument("--warmup-updates", type=int, default=None, help="default: 10%% of updates")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-epoch", type=int, default=50)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="preprocessing processes")
    p.add_argument("--cpu", action="store_true", help="train on CPU")
    p.add_argument("--out", required=True, help="output folder (lmdb/, checkpoints/, logs)")
    p.add_argument("--overwrite", action="store_true", help="rebuild the LMDB splits")
    p.add_argument("fairseq_args", nargs=argparse.REMAINDER,
                   help="after --: extra fairseq-train flags")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    extra = list(args.fairseq_args)
    if extra and extra[0] == "--":
        extra = extra[1:]
    # an unreadable or unsafe --pretrained stops the run before any work
    pretrained = checkpoint_model_args(args.pretrained) if args.pretrained else None
    out = Path(args.out)
    lmdb_dir, ckpt_dir = out / "lmdb", out / "checkpoints"
    out.mkdir(parents=True, exist_ok=True)

    # 1. preprocess --------------------------------------------------------------------
    if args.overwrite or not (lmdb_dir / "train.lmdb").exists():
        from graphormer_ext import preprocess

        if args.csv:
            pre = ["csv", "--path", args.csv, "--smiles-column", args.smiles_column,
                   "--label-columns", args.label_columns]
            if args.split_column:
                pre += ["--split-column", args.split_column]
            if args.conformers:
                pre += ["--conformers", "--conformer-seed", str(args.split_seed)]
        else:
            pre = ["sdf", "--path", args.sdf, "--label-properties", args.label_columns]
            if args.split_column:
                pre += ["--split-property", args.split_column]
            if args.no_3d:
                pre.append("--no-3d")
        pre += ["--split-fractions", *map(str, args.split_fractions), "--seed",
                str(args.split_seed), "--out", str(lmdb_dir), "--workers", str(args.workers),
                "--no-progress"]
        if args.overwrite:
            pre.append("--overwrite")
        print("+ graphormer-ext-preprocess " + " ".join(shlex.quote(a) for a in pre), flush=True)
        status = preprocess.main(pre)
        if status != 0:
            raise SystemExit(f"preprocessing failed (status {status})")
    for split in ("train", "valid"):
        if not (lmdb_dir / f"{split}.lmdb").exists():
            raise SystemExit(
                f"{lmdb_dir}/{split}.lmdb is missing: the split column/fractions must give "
                "train and valid"
            )
    has_test = (lmdb_dir / "test.lmdb").exists()

    names = _targets(lmdb_dir)
    if args.target is None:
        task_idx = 0
    elif args.target.isdigit():
        task_idx = int(args.target)
    elif args.target in names:
        task_idx = names.index(args.target)
    else:
        raise SystemExit(f"--target {args.target!r} is not a label; labels: {names}")

    # 2. fine-tune ---------------------------------------------------------------------
    if args.pretrained:
        model, ckpt_3d = pretrained
        model += ["--finetune-from-model", args.pretrained]
    else:
        model, ckpt_3d = ["--arch", args.arch, "--add-3d"], True
    data_3d = _has_3d(lmdb_dir)
    channels = args.channels
    if channels == "auto":
        channels = "3d" if data_3d and ckpt_3d else "2d"
    if channels in ("3d", "2d3d") and not (data_3d and ckpt_3d):
        raise SystemExit(f"--channels {channels} needs 3D data (--conformers or an SDF) and "
                         "a model with a 3D channel")
    if channels == "3d":
        model.append("--no-2d")
    if args.kind == "regression":
        loss = ["--loss-type", "L2", "--std-type", "std_logits", "--num-classes", "1"]
    elif args.kind == "binary":
        loss = ["--loss-type", "BCE", "--std-type", "no_std", "--num-classes", "1"]
    else:
        loss = ["--loss-type", "CE", "--std-type", "no_std", "--num-classes",
                str(args.num_classes)]
    from graphormer_ext.data.lmdb_dataset import LMDBDataset

    n_train = len(LMDBDataset(lmdb_dir / "train.lmdb"))
    updates = max(1, -(-n_train // args.batch_size)) * args.max_epoch
    warmup = args.warmup_updates if args.warmup_updates is not None else max(1, updates // 10)
    common = ["--user-dir", str(PLUGIN_DIR), "--data-path", str(lmdb_dir),
              "--task", "graph_prediction_qm9", "--dataset-name", "custom",
              "--task-idx", str(task_idx)]
    train = [
        _bin("fairseq-train"), *common, "--criterion", "graph_prediction_qm9", *loss,
        "--readout-type", args.readout, "--load-qm9", "--remove-head", *model,
        "--dropout", "0.0", "--attention-dropout", "0.1", "--act-dropout", "0.1",
        "--droppath-prob", "0.0",
        "--optimizer", "adam", "--adam-betas", "(0.9, 0.999)", "--adam-eps", "1e-8",
        "--weight-decay", "0.0", "--clip-norm", "5.0",
        "--lr", str(args.lr), "--lr-scheduler", "polynomial_decay",
        "--warmup-updates", str(warmup), "--total-num-update", str(updates),
        "--end-learning-rate", "1e-9", "--batch-size", str(args.batch_size),
        "--max-epoch", str(args.max_epoch), "--seed", str(args.seed),
        "--valid-subset", "valid", "--save-dir", str(ckpt_dir), "--no-epoch-checkpoints",
        "--num-workers", "0", "--log-format", "json", "--log-interval", "10",
        "--no-progress-bar",
    ]  # fmt: skip
    if args.kind != "regression":
        train += ["--best-checkpoint-metric", "accuracy", "--maximize-best-checkpoint-metric"]
    if args.cpu:
        train.append("--cpu")
    train += extra
    train_log = _run(train, out / "train.log")

    # 3. validate ----------------------------------------------------------------------
    subsets = "valid,test" if has_test else "valid"
    validate = [
        _bin("fairseq-validate"), *common, "--path", str(ckpt_dir / "checkpoint_best.pt"),
        "--valid-subset", subsets, "--batch-size", str(args.batch_size), "--num-workers", "0",
        "--log-format", "json",
    ]  # fmt: skip
    if args.cpu:
        validate.append("--cpu")
    val_log = _run(validate, out / "validate.log")
    summary = {
        "target": names[task_idx] if task_idx < len(names) else task_idx,
        "task_idx": task_idx,
        "kind": args.kind,
        "channels": channels,
        "checkpoint": str(ckpt_dir / "checkpoint_best.pt"),
        "train": _json_records(train_log, "train"),
    }
    for split in subsets.split(","):
        recs = _json_records(val_log, split)
        summary[split] = recs[-1] if recs else None
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    for split in subsets.split(","):
        print(f"{split}: {json.dumps(summary[split])}")
    print(f"checkpoint: {summary['checkpoint']}\nsummary: {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
