"""One command from a user CSV/SDF to a validated model and a report against baselines.

    scripts/finetune_user.sh --csv mols.csv --smiles-column smiles \\
        --label-columns logS,active --target logS --out runs/logS [--pretrained ckpt.pt]

Steps (each command is printed before it runs; its output streams live to the console and to
its log file):

1. Check the arguments (``--target``, ``--pretrained`` read safely) before any work.
2. ``graphormer-ext-preprocess csv|sdf`` → ``<out>/lmdb/{train,valid,test}.lmdb`` (split from a
   column/property or seeded random; ``--conformers`` adds RDKit ETKDG+MMFF 3D; unreadable
   molecules are skipped and listed in ``<out>/lmdb/*.skipped.tsv``). An existing
   ``<out>/lmdb`` built from the same input and flags is reused (``--overwrite`` rebuilds it);
   ``--lmdb DIR`` uses splits you built yourself. A table gives per split the molecules, the
   skips, and the labelled and missing values of the target.
3. ``fairseq-train --task graph_prediction_qm9`` on the target column (``train.log``), from
   ``--pretrained`` (``--finetune-from-model --remove-head``; the architecture is read from the
   checkpoint) or from scratch (``--arch``).
4. ``fairseq-validate`` of ``checkpoint_best.pt`` on valid and test (``validate.log``).
5. The report (``summary.json``, and printed): MAE and RMSE (regression) or accuracy, ROC-AUC and
   PR-AUC (binary; accuracy for multiclass) on valid and test for the model, the train mean /
   majority class and a random forest on RDKit descriptors, all on the same molecules, with a
   one-line verdict; per-molecule predictions with SMILES/ids (``predictions_<split>.csv``); a
   parity plot (``parity_<split>.png``) or ROC curve (``roc_<split>.png``).

Regression uses ``--loss-type L2 --std-type std_logits`` (the QM9 recipe); ``--kind binary`` BCE
(labels 0/1), ``--kind multiclass`` CE (labels 0..K-1). Extra fairseq-train flags go after
``--``. Threads: ``--threads`` (default: ``OMP_NUM_THREADS`` if set, else 1 on a machine with at
most 4 cores or a 1-minute load above half its cores, else the idle cores) sets
``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` for every step: on a busy 2-core machine the default
torch threading ran the same job 4x slower than one thread.
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
import time
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

logger = logging.getLogger("transformer_m.finetune_user")

PLUGIN_DIR = Path(__file__).resolve().parent
# Model fields copied from a pre-trained checkpoint so that its weights load (strict).
_ARCH_FIELDS = (
    "encoder_layers", "encoder_embed_dim", "encoder_ffn_embed_dim", "encoder_attention_heads",
    "num_3d_bias_kernel", "activation_fn",
)  # fmt: skip
_BOOL_FIELDS = ("encoder_normalize_before", "add_3d", "sandwich_ln")
SPLITS = ("train", "valid", "test")
# From-scratch defaults, measured on the ChEMBL set of the README (transformer_m_small)
SCRATCH_LR = 5e-4
PRETRAINED_LR = 7e-5
MODEL = "Transformer-M"
MEAN = "train mean"
MAJORITY = "majority class"
FOREST = "RF on RDKit descriptors"
_CONSOLE_WIDTH = 400  # longer lines (fairseq's config dump) are cut on the console only


class UserError(SystemExit):
    """A bad argument or input: printed as one ``error:`` line, exit status 2."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _bin(name: str) -> str:
    exe = Path(sys.executable).parent / name
    return str(exe) if exe.exists() else name


def checkpoint_model_args(path: str) -> tuple[list[str], bool]:
    """fairseq flags reproducing a checkpoint's architecture, and whether it has a 3D channel."""
    from transformer_m.checkpoint import load_checkpoint_file

    state = load_checkpoint_file(path, what="--pretrained")  # weights only
    if not isinstance(state, dict) or not (state.get("cfg") or state.get("args")):
        raise UserError(
            f"--pretrained {path} has neither a fairseq 'cfg' nor 'args': pass a checkpoint "
            "written by fairseq-train/transformer-m-train with this plugin"
        )
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


def _label_list(text: Optional[str]) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def resolve_target(target: Optional[str], names: Sequence[str], where: str) -> int:
    """The column index of ``--target`` (a name or an index) among ``names``."""
    if target is None:
        return 0
    if target in names:
        return list(names).index(target)
    if target.isdigit() and int(target) < len(names):
        return int(target)
    raise UserError(
        f"--target {target!r} is not one of the labels of {where} ({', '.join(names) or 'none'}); "
        "give a name from that list or its 0-based index"
    )


# --- data ---------------------------------------------------------------------------------------
def _preprocess_argv(args: argparse.Namespace, lmdb_dir: Path) -> list[str]:
    if args.csv:
        pre = ["csv", "--path", args.csv, "--smiles-column", args.smiles_column,
               "--label-columns", args.label_columns]
        if args.id_column:
            pre += ["--id-column", args.id_column]
        if args.delimiter:
            pre += ["--delimiter", args.delimiter]
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
    pre += ["--split-fractions", *map(str, args.split_fractions), "--seed", str(args.split_seed),
            "--out", str(lmdb_dir), "--workers", str(args.workers), "--no-progress"]
    return pre


def _built_from(meta: Mapping) -> dict:
    """The preprocessing inputs a reused LMDB must share with this run."""
    pa = meta.get("preprocess_args") or {}
    path = pa.get("path")
    return {
        "command": pa.get("command"),
        "path": str(Path(path).resolve()) if path else None,
        "labels": pa.get("label_columns") or pa.get("label_properties"),
        "smiles_column": pa.get("smiles_column"),
        "id_column": pa.get("id_column"),
        "split": pa.get("split_column") or pa.get("split_property"),
        "fractions": [float(f) for f in pa.get("split_fractions") or []],
        "seed": pa.get("seed"),
        "conformers": bool(pa.get("conformers")),
        "no_3d": bool(pa.get("no_3d")),
    }


def _wanted(args: argparse.Namespace) -> dict:
    return {
        "command": "csv" if args.csv else "sdf",
        "path": str(Path(args.csv or args.sdf).resolve()),
        "labels": args.label_columns,
        "smiles_column": args.smiles_column if args.csv else None,
        "id_column": args.id_column if args.csv else None,
        "split": args.split_column,
        "fractions": [float(f) for f in args.split_fractions],
        "seed": args.split_seed,
        "conformers": bool(args.conformers) if args.csv else False,
        "no_3d": bool(args.no_3d) if args.sdf else False,
    }


def prepare_data(args: argparse.Namespace, out: Path) -> Path:
    """Preprocess into ``<out>/lmdb``, reuse it when it was built the same way, or use --lmdb."""
    from graphormer_ext.data.lmdb_dataset import LMDBDataset

    if args.lmdb:
        lmdb_dir = Path(args.lmdb)
        print(f"using the existing splits in {lmdb_dir}", flush=True)
    else:
        lmdb_dir = out / "lmdb"
        train = lmdb_dir / "train.lmdb"
        if train.exists() and not args.overwrite:
            built, wanted = _built_from(LMDBDataset(train).meta), _wanted(args)
            differ = [f"{k}: {built[k]!r} (wanted {wanted[k]!r})" for k in wanted
                      if built.get(k) != wanted[k]]
            if differ:
                raise UserError(
                    f"{lmdb_dir} exists but was built differently ({'; '.join(differ)}); "
                    "pass --overwrite to rebuild it, or another --out"
                )
            print(f"reusing {lmdb_dir} (same input and flags; --overwrite rebuilds it)",
                  flush=True)
        else:
            from graphormer_ext import preprocess

            pre = _preprocess_argv(args, lmdb_dir)
            if args.overwrite:
                pre.append("--overwrite")
            print("+ graphormer-ext-preprocess " + " ".join(shlex.quote(a) for a in pre),
                  flush=True)
            status = preprocess.main(pre)
            if status != 0:
                raise UserError(f"preprocessing failed (status {status}); see the message above")
    for split in ("train", "valid"):
        if not (lmdb_dir / f"{split}.lmdb").exists():
            raise UserError(
                f"{lmdb_dir}/{split}.lmdb is missing: the split column/fractions must give "
                "train and valid"
            )
    return lmdb_dir


def _targets(lmdb_dir: Path) -> tuple[list[str], list]:
    from transformer_m.data_facts import split_facts
    from graphormer_ext.data.lmdb_dataset import LMDBDataset

    facts = split_facts(LMDBDataset(lmdb_dir / "train.lmdb").meta, 5)
    names = facts.get("targets") or []
    return names, facts.get("units") or [None] * len(names)


def split_labels(lmdb_dir: Path, split: str, task_idx: int) -> np.ndarray:
    """The target of every record of a split (NaN where missing), in key order."""
    from graphormer_ext.data import keys as K
    from graphormer_ext.data.lmdb_dataset import LMDBDataset

    ds = LMDBDataset(lmdb_dir / f"{split}.lmdb", keys=[K.Y])
    y = np.full(len(ds), np.nan)
    for i in range(len(ds)):
        values = np.asarray(ds[i].get(K.Y, []), dtype=np.float64).reshape(-1)
        if task_idx < values.size:
            y[i] = values[task_idx]
    return y


def data_table(lmdb_dir: Path, labels: Mapping[str, np.ndarray], target: str) -> str:
    """Per split: molecules written, skipped at preprocessing, with 3D, labelled, missing."""
    from graphormer_ext.data.lmdb_dataset import LMDBDataset

    rows = [("split", "molecules", "skipped", "with 3D", f"{target} labelled", "missing")]
    for split, y in labels.items():
        meta = LMDBDataset(lmdb_dir / f"{split}.lmdb").meta
        skipped = (meta.get("counts") or {}).get("skipped", 0)
        with_3d = (meta.get("stats") or {}).get("with_pos", 0)
        n_missing = int((~np.isfinite(y)).sum())
        rows.append((split, f"{len(y):,}", f"{skipped:,}", f"{with_3d:,}",
                     f"{len(y) - n_missing:,}", f"{n_missing:,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)


def check_labels(kind: str, num_classes: int, y: np.ndarray, target: str) -> None:
    """Classification labels must be class indices; at least two training labels."""
    v = y[np.isfinite(y)]
    if v.size < 2:
        raise UserError(f"train split has {v.size} labelled molecules for {target!r}; need >= 2")
    if kind == "binary" and not np.isin(v, (0.0, 1.0)).all():
        bad = sorted(set(v[~np.isin(v, (0.0, 1.0))].tolist()))[:5]
        raise UserError(f"--kind binary needs labels 0/1 in {target!r}, found {bad}; "
                        "use --kind regression, or recode the column")
    if kind == "multiclass":
        ok = (v == np.round(v)) & (v >= 0) & (v < num_classes)
        if not ok.all():
            bad = sorted(set(v[~ok].tolist()))[:5]
            raise UserError(f"--kind multiclass needs class indices 0..{num_classes - 1} in "
                            f"{target!r} (--num-classes {num_classes}), found {bad}")


def split_molecules(lmdb_dir: Path, split: str) -> tuple[list, list, list, str]:
    """SMILES, ids and source rows of a split's records, in key order, and where from.

    Read from the records' provenance keys (the CSV/SDF sources store the input SMILES, the
    file line or SDF record and the ``--id-column`` value); for splits written before that,
    re-read from the source file named in the meta record (same split rule), matched by the
    records' source index. ``None`` entries (and the reason) when neither is possible.
    """
    from graphormer_ext.data.lmdb_dataset import LMDBDataset
    from graphormer_ext.data.provenance import record_provenance

    ds = LMDBDataset(lmdb_dir / f"{split}.lmdb")
    pa = ds.meta.get("preprocess_args") or {}
    name = Path(pa.get("path") or "input").name
    prov = [record_provenance(ds[i]) for i in range(len(ds))]
    if prov and all(p["smiles"] is not None for p in prov):
        ids = [p["source_id"] or (f"{name}:{p['source_row']}" if p["source_row"] else None)
               for p in prov]
        return ([p["smiles"] for p in prov], ids, [p["source_row"] for p in prov],
                "stored with the records")
    none = [None] * len(ds)
    if pa.get("command") not in ("csv", "sdf") or not pa.get("path"):
        return none, none, none, "the records store no SMILES and the source is not a CSV/SDF"
    try:
        recs = list(_rebuild_source(pa).iter_split(split))
    except Exception as exc:  # the file moved, or its reader changed: report, do not fail
        return none, none, none, f"cannot re-read {pa.get('path')}: {exc}"
    smiles, ids = [], []
    for k in ds.source_index.tolist():
        rec = recs[k]
        if rec.kind == "smiles":
            smiles.append(rec.text)
            ids.append(rec.item)
        else:
            title = rec.text.lstrip("\n").split("\n", 1)[0].strip()
            smiles.append(_molblock_smiles(rec.text))
            ids.append(title or rec.item)
    return smiles, ids, none, f"re-read from {pa.get('path')}"


def _rebuild_source(pa: Mapping):
    from graphormer_ext.sources.custom import CSVSource, SDFSource

    common = dict(split_fractions=tuple(pa.get("split_fractions") or (0.8, 0.1, 0.1)),
                  seed=int(pa.get("seed") or 0))
    labels = _label_list(pa.get("label_columns") or pa.get("label_properties"))
    if pa["command"] == "csv":
        return CSVSource(pa["path"], smiles_column=pa.get("smiles_column") or "smiles",
                         label_columns=labels, split_column=pa.get("split_column"), **common)
    return SDFSource(pa["path"], label_properties=labels, split_property=pa.get("split_property"),
                     use_3d=False, **common)


def _molblock_smiles(block: str) -> Optional[str]:
    from rdkit import Chem, rdBase

    with rdBase.BlockLogs():
        mol = Chem.MolFromMolBlock(block)
    return Chem.MolToSmiles(mol) if mol is not None else None


# --- running commands -----------------------------------------------------------------------------
def run_live(argv: list[str], log: Path, env: Mapping[str, str]) -> str:
    """Run a command; stream every line to the console and to ``log`` as it comes."""
    print("+ " + " ".join(shlex.quote(a) for a in argv), flush=True)
    lines: list[str] = []
    with open(log, "w", encoding="utf-8") as fh:
        fh.write("+ " + " ".join(shlex.quote(a) for a in argv) + "\n")
        fh.flush()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1, env=dict(env))
        assert proc.stdout is not None
        for line in proc.stdout:
            fh.write(line)
            fh.flush()
            lines.append(line)
            shown = line.rstrip("\n")
            if len(shown) > _CONSOLE_WIDTH:
                shown = shown[:_CONSOLE_WIDTH] + f" ... (full line in {log.name})"
            print(shown, flush=True)
        code = proc.wait()
    text = "".join(lines)
    if code != 0:
        tail = "\n".join(text.splitlines()[-15:])
        raise UserError(f"{Path(argv[0]).name} failed (exit {code}); log {log}; last lines:\n"
                        f"{tail}")
    return text


def json_records(text: str, kind: str) -> list[dict]:
    """fairseq's ``--log-format json`` records of one kind (``train``, ``valid``, ...)."""
    pat = re.compile(r"\| " + re.escape(kind) + r" \| (\{.*\})\s*$")
    return [json.loads(m.group(1)) for m in map(pat.search, text.splitlines()) if m]


# --- the command ----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The ``finetune_user`` argument parser."""
    p = argparse.ArgumentParser(
        prog="scripts/finetune_user.sh",
        description="Preprocess a CSV/SDF, fine-tune Transformer-M on one label, validate, and "
        "report it against the train mean and a random forest on RDKit descriptors.",
        epilog="Threads: --threads, or OMP_NUM_THREADS; the default is 1 on machines with <= 4 "
        "cores or a busy CPU (load above half the cores).",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--csv", help="CSV/TSV(.gz) with a SMILES column and label columns")
    src.add_argument("--sdf", help="SDF(.gz) with labels as properties (3D kept)")
    src.add_argument("--lmdb", help="a folder of <split>.lmdb written by graphormer-ext-preprocess "
                     "(reused as is: no preprocessing)")
    p.add_argument("--smiles-column", default="smiles", help="CSV SMILES column")
    p.add_argument("--id-column", default=None,
                   help="CSV column with a molecule ID (kept with each record, written to the "
                   "per-molecule predictions)")
    p.add_argument("--delimiter", default=None,
                   help="CSV field separator (default: detected; see graphormer-ext-preprocess "
                   "csv --help)")
    p.add_argument("--label-columns", default=None,
                   help="comma-separated label columns (CSV) or properties (SDF), all stored; "
                   "required with --csv/--sdf")
    p.add_argument("--target", default=None,
                   help="label to train on (name or 0-based index; default: the first)")
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
                   help="input channels: auto = 2D and 3D together when the data have 3D and the "
                   "model a 3D channel, else 2D; 3d = 3D only (the QM9 paper protocol)")
    p.add_argument("--readout", choices=("cls", "mean", "sum"), default="cls")
    p.add_argument("--lr", type=float, default=None,
                   help=f"peak learning rate (default {PRETRAINED_LR:g} with --pretrained, "
                   f"{SCRATCH_LR:g} from scratch)")
    p.add_argument("--warmup-updates", type=int, default=None, help="default: 10%% of updates")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-epoch", type=int, default=50)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="preprocessing processes")
    p.add_argument("--threads", type=int, default=None,
                   help="threads per process for training and the baselines (default: see "
                   "below)")
    p.add_argument("--no-forest", action="store_true",
                   help="skip the random-forest baseline")
    p.add_argument("--cpu", action="store_true", help="train on CPU")
    p.add_argument("--out", required=True, help="output folder (lmdb/, checkpoints/, logs, "
                   "report)")
    p.add_argument("--overwrite", action="store_true", help="rebuild the LMDB splits")
    p.add_argument("fairseq_args", nargs=argparse.REMAINDER,
                   help="after --: extra fairseq-train flags")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; see the module docstring. Returns 0, or raises ``SystemExit``."""
    try:
        return _main(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    import transformer_m  # noqa: F401  (importing fairseq sets the root logger to DEBUG)

    logging.getLogger().setLevel(logging.INFO)
    for noisy in ("matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    extra = list(args.fairseq_args)
    if extra and extra[0] == "--":
        extra = extra[1:]
    # 1. arguments first: nothing runs on a bad --target or an unsafe --pretrained ------------
    if not args.lmdb:
        labels = _label_list(args.label_columns)
        if not labels:
            raise UserError("--label-columns is required with --csv/--sdf (comma-separated)")
        resolve_target(args.target, labels, "--label-columns")
    pretrained = checkpoint_model_args(args.pretrained) if args.pretrained else None
    from transformer_m.threads import default_threads

    threads, why = (args.threads, "--threads") if args.threads else default_threads()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONUNBUFFERED="1")
    os.environ.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    import torch

    torch.set_num_threads(threads)
    print(f"threads: {threads} ({why}; change with --threads N or OMP_NUM_THREADS)", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out / "checkpoints"

    # 2. data ----------------------------------------------------------------------
    lmdb_dir = prepare_data(args, out)
    names, units = _targets(lmdb_dir)
    task_idx = resolve_target(args.target, names, str(lmdb_dir))
    target = names[task_idx] if task_idx < len(names) else f"target{task_idx}"
    unit = units[task_idx] if task_idx < len(units) else None
    splits = [s for s in SPLITS if (lmdb_dir / f"{s}.lmdb").exists()]
    y = {s: split_labels(lmdb_dir, s, task_idx) for s in splits}
    print(data_table(lmdb_dir, y, target), flush=True)
    check_labels(args.kind, args.num_classes, y["train"], target)

    # 3. fine-tune ----------------------------------------------------------------------
    from graphormer_ext.data.lmdb_dataset import LMDBDataset

    if pretrained:
        model, ckpt_3d = list(pretrained[0]), pretrained[1]
        model += ["--finetune-from-model", args.pretrained]
    else:
        model, ckpt_3d = ["--arch", args.arch], True
    data_3d = bool((LMDBDataset(lmdb_dir / "train.lmdb").meta.get("stats") or {}).get("with_pos"))
    channels = args.channels
    if channels == "auto":
        channels = "2d3d" if data_3d and ckpt_3d else "2d"
    if channels in ("3d", "2d3d") and not (data_3d and ckpt_3d):
        raise UserError(f"--channels {channels} needs 3D data (--conformers or an SDF) and a "
                        "model with a 3D channel")
    if not pretrained and channels != "2d":
        model.append("--add-3d")  # from scratch: a 3D channel only when it is trained
    if channels == "3d":
        model.append("--no-2d")
    if channels == "2d" and data_3d:
        model.append("--no-3d-input")  # the positions stay in the LMDB, unused
    if args.kind == "regression":
        loss = ["--loss-type", "L2", "--std-type", "std_logits", "--num-classes", "1"]
    elif args.kind == "binary":
        loss = ["--loss-type", "BCE", "--std-type", "no_std", "--num-classes", "1"]
    else:
        loss = ["--loss-type", "CE", "--std-type", "no_std", "--num-classes",
                str(args.num_classes)]
    lr = args.lr if args.lr is not None else (PRETRAINED_LR if pretrained else SCRATCH_LR)
    n_train = len(y["train"])
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
        "--lr", str(lr), "--lr-scheduler", "polynomial_decay",
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
    t0 = time.time()
    train_log = run_live(train, out / "train.log", env)
    train_minutes = (time.time() - t0) / 60
    best = ckpt_dir / "checkpoint_best.pt"
    if not best.exists():
        raise UserError(f"training wrote no {best}; see {out / 'train.log'}")

    # 4. validate ----------------------------------------------------------------------
    evaluated = [s for s in ("valid", "test") if s in splits]
    validate = [
        _bin("fairseq-validate"), *common, "--path", str(best),
        "--valid-subset", ",".join(evaluated), "--batch-size", str(args.batch_size),
        "--num-workers", "0", "--log-format", "json",
    ]  # fmt: skip
    if args.cpu:
        validate.append("--cpu")
    val_log = run_live(validate, out / "validate.log", env)

    # 5. report ----------------------------------------------------------------------
    summary = {
        "target": target, "task_idx": task_idx, "unit": unit, "kind": args.kind,
        "channels": channels, "pretrained": args.pretrained, "threads": threads,
        "lr": lr, "max_epoch": args.max_epoch, "train_minutes": round(train_minutes, 2),
        "checkpoint": str(best), "lmdb": str(lmdb_dir),
        "data": {s: {"molecules": int(len(v)), "labelled": int(np.isfinite(v).sum()),
                     "missing": int((~np.isfinite(v)).sum())} for s, v in y.items()},
        "train": json_records(train_log, "train"),
    }
    for split in evaluated:
        recs = json_records(val_log, split)
        summary[split] = recs[-1] if recs else None
    summary.update(report(args, out, lmdb_dir, best, y, evaluated, target, unit, threads))
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=_json_default))
    print(f"checkpoint: {best}\nsummary: {out / 'summary.json'}", flush=True)
    return 0


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(type(value).__name__)


def report(args, out: Path, lmdb_dir: Path, best: Path, y: Mapping[str, np.ndarray],
           evaluated: Sequence[str], target: str, unit: Optional[str], threads: int) -> dict:
    """Scores of the model and the baselines, per-molecule files, plot, printed table."""
    from graphormer_ext.data.lmdb_dataset import LMDBDataset
    from transformer_m import user_report as ur
    from transformer_m.inference import load_predictor

    import torch

    kind = args.kind
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.WARNING)  # not fairseq's model-building INFO lines in the report
    try:
        predictor = load_predictor(best, device=device)
    finally:
        root.setLevel(level)
    cols = predictor.spec.columns(args.num_classes if kind == "multiclass" else 1)
    ours: dict = {}
    for split in evaluated:
        ds = LMDBDataset(lmdb_dir / f"{split}.lmdb")
        preds = predictor.predict([ds[i] for i in range(len(ds))], batch_size=args.batch_size)
        if kind == "regression":
            ours[split] = (preds[cols[0]], preds[cols[0]])
        elif kind == "binary":
            ours[split] = (preds[cols[0]], preds[cols[1]])
        else:
            ours[split] = (preds[cols[0]], preds[cols[0]])
    base_name = MEAN if kind == "regression" else MAJORITY
    predictors = {MODEL: ours,
                  base_name: {s: ur.trivial_baseline(kind, y["train"], len(y[s]))
                              for s in evaluated}}
    mols = {s: split_molecules(lmdb_dir, s) for s in ["train", *evaluated]}
    forest_note = None
    if args.no_forest:
        forest_note = "skipped (--no-forest)"
    elif any(m[0] and all(x is None for x in m[0]) for m in mols.values()):
        forest_note = "skipped: " + next(m[3] for m in mols.values() if all(
            x is None for x in m[0]))
    else:
        print(f"fitting the baseline: random forest (500 trees) on RDKit descriptors, "
              f"{threads} thread(s)", flush=True)
        predictors[FOREST] = ur.random_forest_baseline(
            kind, mols["train"][0], y["train"], {s: mols[s][0] for s in evaluated},
            seed=args.seed, n_jobs=threads)
    scores = {name: {s: ur.metrics(kind, y[s], *per[s]) for s in evaluated}
              for name, per in predictors.items()}
    files = {}
    for split in evaluated:
        smiles, ids, lines, _ = mols[split]
        rows = []
        for i in range(len(y[split])):
            row = {"split": split, "index": i, "source_row": lines[i], "id": ids[i],
                   "smiles": smiles[i],
                   "y_true": float(y[split][i]), "y_pred": float(ours[split][0][i])}
            if kind == "binary":
                row["prob"] = float(ours[split][1][i])
            if FOREST in predictors:
                row["rf_pred"] = float(predictors[FOREST][split][0][i])
            rows.append(row)
        columns = ["split", "index", "source_row", "id", "smiles", "y_true", "y_pred"]
        columns += ["prob"] if kind == "binary" else []
        columns += ["rf_pred"] if FOREST in predictors else []
        path = out / f"predictions_{split}.csv"
        ur.write_predictions(path, rows, columns)
        files[f"predictions_{split}"] = str(path)
    plot_split = "test" if "test" in evaluated else "valid"
    label = f"{target} [{unit}]" if unit else target
    title = f"{target}, {plot_split} split ({int(np.isfinite(y[plot_split]).sum())} molecules)"
    if kind == "regression":
        path = out / f"parity_{plot_split}.png"
        ur.plot_parity(path, y[plot_split], ours[plot_split][0], title, label,
                       {n: scores[n][plot_split]["mae"] for n in scores if n != MODEL})
        files[f"parity_{plot_split}"] = str(path)
    elif kind == "binary":
        path = out / f"roc_{plot_split}.png"
        ur.plot_roc(path, {n: (y[plot_split], per[plot_split][1])
                           for n, per in predictors.items()}, title)
        files[f"roc_{plot_split}"] = str(path)
    table = ur.format_report(kind, scores)
    text = ur.verdict(kind, scores, plot_split, MODEL, [n for n in scores if n != MODEL])
    print(f"\n{target} ({kind}{', ' + unit if unit else ''}): model vs baselines on the same "
          f"molecules\n{table}\n{text}", flush=True)
    if forest_note:
        print(f"random-forest baseline {forest_note}", flush=True)
    for name, path in files.items():
        print(f"{name}: {path}", flush=True)
    return {"scores": scores, "verdict": text, "forest": forest_note or "fitted",
            "molecules_from": {s: m[3] for s, m in mols.items()}, "files": files,
            "report_table": table}


if __name__ == "__main__":
    sys.exit(main())
