r"""``graphormer-ext-preprocess``: raw dataset files -> one LMDB file per split.

Examples::

    graphormer-ext-preprocess pcqm4mv2 --root data/ --out lmdb/pcqm4mv2
    graphormer-ext-preprocess qm9pack --out lmdb/qm9
    graphormer-ext-preprocess qm9-pyg --raw-dir data/QM9/raw --out lmdb/qm9
    graphormer-ext-preprocess csv --path mols.csv --smiles-column smiles \
        --label-columns a,b --out lmdb/x
    graphormer-ext-preprocess sdf --path mols.sdf --label-properties gap --out lmdb/y
    graphormer-ext-preprocess md17 --path md17_ethanol.npz --train 950 --valid 50 \
        --out lmdb/md17_ethanol
    graphormer-ext-preprocess pdbbind --root PDBbind_v2016 --cutoff 5 --out lmdb/pdbbind
    graphormer-ext-preprocess stats lmdb/pcqm4mv2
    graphormer-ext-preprocess export lmdb/x --output rows.csv

Each run writes ``<out>/<split>.lmdb`` and ``<out>/<split>.skipped.tsv`` per split, logs
the input checksum and prints a statistics table. A run holds a lock on ``<out>``: a
second run on the same folder stops at once. ``export`` lists which input row went to
which split and record (CSV and SDF sources).
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from graphormer_ext.data import keys as K

logger = logging.getLogger(__name__)

__all__ = [
    "main",
    "build_parser",
    "describe_lmdb",
    "describe_dir",
    "format_table",
    "export_rows",
]


# --- statistics -----------------------------------------------------------------------
def describe_lmdb(path: str | os.PathLike) -> dict:
    """Summary statistics of one split file, from its meta record (nothing is decoded).

    Returns:
        ``{"split", "path", "kept", "skipped", "with_3d", "atoms_mean", "atoms_max",
        "targets", "label_mean", "label_std"}`` (label statistics of the first target,
        over finite labels).
    """
    from graphormer_ext.data.lmdb_dataset import LMDBDataset

    meta = LMDBDataset(path).meta
    stats = meta.get("stats", {})
    counts = meta.get("counts", {})
    mean = (stats.get("y_mean") or [None])[0]
    std = (stats.get("y_std") or [None])[0]
    return {
        "split": meta.get("split") or Path(path).stem,
        "path": str(path),
        "kept": meta.get("num_entries"),
        "skipped": counts.get("skipped"),
        "with_3d": stats.get("with_pos"),
        "atoms_mean": stats.get("num_atoms_mean"),
        "atoms_max": stats.get("num_atoms_max"),
        "targets": stats.get("num_targets"),
        "label_mean": mean,
        "label_std": std,
    }


def describe_dir(directory: str | os.PathLike) -> list[dict]:
    """:func:`describe_lmdb` of every ``*.lmdb`` file in ``directory``, by name."""
    paths = sorted(Path(directory).glob("*.lmdb"))
    if not paths:
        raise FileNotFoundError(f"no *.lmdb split files in {directory}")
    return [describe_lmdb(p) for p in paths]


def _fmt(value, spec: str) -> str:
    if value is None:
        return "-"
    return format(value, spec)


def format_table(rows: Sequence[dict]) -> str:
    """Render :func:`describe_lmdb` rows as a fixed-width text table."""
    header = ("split", "kept", "skipped", "with 3D", "atoms mean", "atoms max", "T",
              "label mean", "label std")  # fmt: skip
    body = [
        (
            str(r["split"]),
            _fmt(r["kept"], ",d"),
            _fmt(r["skipped"], ",d"),
            _fmt(r["with_3d"], ",d"),
            _fmt(r["atoms_mean"], ".2f"),
            _fmt(r["atoms_max"], "d"),
            _fmt(r["targets"], "d"),
            _fmt(r["label_mean"], ".5g"),
            _fmt(r["label_std"], ".5g"),
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(header)]
    lines = [
        "  ".join(
            h.rjust(w) if i else h.ljust(w)
            for i, (h, w) in enumerate(zip(header, widths))
        )
    ]
    lines.append("  ".join("-" * w for w in widths))
    for row in body:
        lines.append(
            "  ".join(
                c.rjust(w) if i else c.ljust(w)
                for i, (c, w) in enumerate(zip(row, widths))
            )
        )
    return "\n".join(lines)


# --- sources --------------------------------------------------------------------------
def _split_list(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [t.strip() for t in text.split(",") if t.strip()]


def _build_source(args: argparse.Namespace):
    """Instantiate the reader of ``args.command`` (imported lazily, like RDKit)."""
    if args.command == "pcqm4mv2":
        from graphormer_ext.sources.pcqm4mv2 import PCQM4Mv2Source

        kwargs = {}
        if args.splits:
            kwargs["splits"] = args.splits
        return PCQM4Mv2Source(args.root, sdf_path=args.sdf, limit=args.limit, **kwargs)
    if args.command in ("qm9pack", "qm9-pyg"):
        from graphormer_ext.sources import qm9

        kwargs = dict(split=args.split_scheme, seed=args.seed, use_3d=not args.no_3d)
        if args.remove_hs is not None:
            kwargs["remove_hs"] = args.remove_hs
        if args.command == "qm9pack":
            return qm9.QM9PackSource(args.csv_dir, **kwargs)
        return qm9.QM9PyGRawSource(args.raw_dir, **kwargs)
    if args.command == "csv":
        from graphormer_ext.sources.custom import CSVSource

        return CSVSource(
            args.path,
            smiles_column=args.smiles_column,
            label_columns=_split_list(args.label_columns),
            split_column=args.split_column,
            split_fractions=tuple(args.split_fractions),
            seed=args.seed,
            conformers=getattr(args, "conformers", False),
            conformer_seed=getattr(args, "conformer_seed", 0),
            delimiter=getattr(args, "delimiter", None),
            id_column=getattr(args, "id_column", None),
        )
    if args.command == "sdf":
        from graphormer_ext.sources.custom import SDFSource

        return SDFSource(
            args.path,
            label_properties=_split_list(args.label_properties),
            split_property=args.split_property,
            split_fractions=tuple(args.split_fractions),
            seed=args.seed,
            use_3d=not args.no_3d,
        )
    if args.command == "md17":
        from graphormer_ext.sources.md17 import MD17Source

        return MD17Source(
            args.path,
            molecule=args.molecule,
            train=args.train,
            valid=args.valid,
            test=args.test,
            seed=args.seed,
            format=args.format,
            length_unit=args.length_unit,
            energy_unit=args.energy_unit,
            min_test=args.min_test,
        )
    if args.command == "pdbbind":
        from graphormer_ext.sources.pdbbind import PDBBindSource

        return PDBBindSource(
            args.root,
            version=args.version,
            cutoff=args.cutoff,
            valid_fraction=args.valid_fraction,
            valid_size=args.valid_size,
            seed=args.seed,
            index_path=args.index,
            core_dir=args.core_dir,
            pocket_source=args.pocket_source,
            keep_waters=args.keep_waters,
        )
    raise ValueError(f"unknown command {args.command!r}")


def run(args: argparse.Namespace) -> list[dict]:
    """Write every split of the source in ``args``; return the statistics rows."""
    from graphormer_ext.data.lmdb_writer import output_lock

    source = _build_source(args)
    # one lock for the whole run: every split in <out> comes from this run's input
    with output_lock(args.out):
        return _write_all(args, source)


def _write_all(args: argparse.Namespace, source) -> list[dict]:
    from graphormer_ext.data.lmdb_writer import skip_list_path, write_split
    from graphormer_ext.sources.base import SourceError, check_split_name

    sizes = source.splits()
    names = list(sizes)
    for name in names:  # split names become file names in <out>
        check_split_name(name, f"{source.name} split")
    if args.splits:
        unknown = [s for s in args.splits if s not in sizes]
        if unknown:
            raise SourceError(f"{source.name} has no split {unknown}; it has {names}")
        names = [s for s in names if s in args.splits]
    out = Path(args.out)
    targets = {s: out / f"{s}.lmdb" for s in names}
    existing = [str(p) for p in targets.values() if p.exists()]
    if existing and not args.overwrite:  # check all splits before doing any work
        raise FileExistsError(
            f"output exists: {', '.join(existing)}; pass --overwrite to replace it"
        )
    for p in source.files():
        logger.info("input %s (%s bytes)", p, f"{os.path.getsize(p):,}")
    checksum = source.checksum()
    logger.info("%s input sha256 %s", source.name, checksum)
    remove_hs = (
        getattr(source, "remove_hs", True) if args.remove_hs is None else args.remove_hs
    )
    max_atoms = args.max_atoms if args.max_atoms and args.max_atoms > 0 else None
    rows = []
    for split in names:
        total = sizes[split] if args.limit is None else min(sizes[split], args.limit)
        write_split(
            targets[split],
            source,
            split=split,
            source_checksum=checksum,
            max_hops=args.max_hops,
            path_convention=args.path_convention,
            max_atoms=max_atoms,
            remove_hs=remove_hs,
            featurize=getattr(source, "featurize", None),
            workers=args.workers,
            limit=args.limit,
            total=total,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            extra_meta={"preprocess_args": {k: v for k, v in vars(args).items()}},
        )
        row = describe_lmdb(targets[split])
        rows.append(row)
        if row["skipped"]:
            logger.warning(
                "%s: %d molecules skipped, listed in %s",
                split,
                row["skipped"],
                skip_list_path(targets[split]),
            )
        if not row["kept"]:
            logger.warning(
                "%s: no molecule written to %s; training or evaluating on it will fail",
                split,
                targets[split],
            )
    return rows


def export_rows(directory: str | os.PathLike, stream) -> int:
    """Write, as CSV, every input row of every split file in ``directory``.

    Columns: ``split, index, status, source_row, source_id, smiles, reason``;
    ``status`` is ``written`` (``index`` = LMDB key) or ``skipped`` (with the reason
    from ``<split>.skipped.tsv``). See
    :func:`graphormer_ext.data.provenance.iter_provenance`.

    Returns:
        The number of rows written.
    """
    from graphormer_ext.data.provenance import iter_provenance

    target = Path(directory)
    paths = [target] if target.is_file() else sorted(target.glob("*.lmdb"))
    if not paths:
        raise FileNotFoundError(f"no *.lmdb split files in {directory}")
    columns = ("split", "index", "status", "source_row", "source_id", "smiles",
               "reason")  # fmt: skip
    w = csv.writer(stream, lineterminator="\n")
    w.writerow(columns)
    n = 0
    for p in paths:
        for r in iter_provenance(p):
            w.writerow(["" if r[c] is None else r[c] for c in columns])
            n += 1
    return n


# --- argument parsing -----------------------------------------------------------------
def _common(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("output and featurization")
    g.add_argument(
        "--out", required=True, help="output folder: <out>/<split>.lmdb per split"
    )
    g.add_argument(
        "--overwrite", action="store_true", help="replace existing split files"
    )
    g.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="featurization processes (default: all cores; 1 = in process)",
    )
    g.add_argument(
        "--max-hops", type=int, default=5, help="hops stored in edge_input (default 5)"
    )
    g.add_argument(
        "--max-atoms",
        type=int,
        default=128,
        help="skip (and list) molecules with more atoms; 0 = no limit (default 128; "
        "PCQM4Mv2 has "
        "at most 51 heavy atoms, the official collator allows 256)",
    )
    g.add_argument(
        "--path-convention",
        choices=K.PATH_CONVENTIONS,
        default="fixed",
        help="shortest-path edge reconstruction: fixed (Graphormer) or legacy "
        "(released "
        "Transformer-M, paths through atom 0 read as one non-bond hop)",
    )
    g.add_argument(
        "--remove-hs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="drop explicit hydrogens of 3D inputs (default: the source's own "
        "default; QM9 keeps "
        "them as Transformer-M's qm9H does)",
    )
    g.add_argument(
        "--limit", type=int, default=None, help="keep only the first N items per split"
    )
    g.add_argument(
        "--splits",
        type=_split_list,
        default=None,
        help="comma-separated splits to write (default all)",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``graphormer-ext-preprocess``."""
    parser = argparse.ArgumentParser(
        prog="graphormer-ext-preprocess",
        description="Featurize a molecular dataset into one LMDB file per split.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pcqm4mv2", help="OGB-LSC PCQM4Mv2 (HOMO-LUMO gap, eV)")
    p.add_argument(
        "--root",
        required=True,
        help="folder holding pcqm4m-v2/ (raw/data.csv.gz, split_dict.pt)",
    )
    p.add_argument(
        "--sdf",
        default=None,
        help="pcqm4m-v2-train.sdf[.tar.gz|.gz] (3D train); default: found in --root",
    )
    _common(p)

    for name, helptext in (
        ("qm9pack", "QM9 from the qm9pack CSVs"),
        ("qm9-pyg", "QM9 from PyG raw files"),
    ):
        p = sub.add_parser(name, help=helptext)
        if name == "qm9pack":
            p.add_argument(
                "--csv-dir",
                default=None,
                help="folder of qm9_part*.csv (default: installed qm9pack)",
            )
        else:
            p.add_argument(
                "--raw-dir",
                required=True,
                help="folder with gdb9.sdf, gdb9.sdf.csv, uncharacterized.txt",
            )
        p.add_argument(
            "--split-scheme",
            choices=("seeded", "all"),
            default="seeded",
            help="seeded train/valid/test or one split 'all'",
        )
        p.add_argument("--seed", type=int, default=1, help="split seed (default 1)")
        p.add_argument(
            "--no-3d", action="store_true", help="do not store DFT coordinates"
        )
        _common(p)

    p = sub.add_parser("csv", help="a CSV/TSV of SMILES and labels")
    p.add_argument(
        "--path",
        required=True,
        help="UTF-8 table of SMILES and labels (.csv, .tsv, .txt, ...; optionally "
        ".gz), header on line 1; the delimiter is detected from the header unless "
        "--delimiter is given",
    )
    p.add_argument(
        "--delimiter",
        default="auto",
        help="field separator: auto (default: the one of comma, tab, semicolon, pipe "
        "under which the header has all requested columns; tab first for .tsv), comma, "
        "tab, semicolon, pipe, or a single punctuation character",
    )
    p.add_argument("--smiles-column", required=True)
    p.add_argument(
        "--id-column",
        default=None,
        help="optional column with a molecule ID, stored with each record (see the "
        "export command)",
    )
    p.add_argument(
        "--label-columns",
        default="",
        help="comma-separated label columns (none: unlabelled)",
    )
    p.add_argument(
        "--split-column",
        default=None,
        help="column with train/valid/test (default: random split)",
    )
    p.add_argument(
        "--split-fractions",
        type=float,
        nargs=3,
        default=(0.8, 0.1, 0.1),
        metavar=("TRAIN", "VALID", "TEST"),
    )
    p.add_argument("--seed", type=int, default=0, help="random split seed")
    p.add_argument(
        "--conformers",
        action="store_true",
        help="generate a 3D conformer per molecule (RDKit ETKDG + MMFF94, seeded); "
        "molecules that fail to embed are skipped and listed",
    )
    p.add_argument(
        "--conformer-seed", type=int, default=0, help="ETKDG random seed (default 0)"
    )
    _common(p)

    p = sub.add_parser("sdf", help="an SDF with labels as properties (3D kept)")
    p.add_argument("--path", required=True, help="SDF file (.sdf or .sdf.gz)")
    p.add_argument(
        "--label-properties",
        default="",
        help="comma-separated SDF properties (none: unlabelled)",
    )
    p.add_argument(
        "--no-3d", action="store_true", help="do not store the SDF coordinates"
    )
    p.add_argument(
        "--split-property",
        default=None,
        help="property with train/valid/test (default: random split)",
    )
    p.add_argument(
        "--split-fractions",
        type=float,
        nargs=3,
        default=(0.8, 0.1, 0.1),
        metavar=("TRAIN", "VALID", "TEST"),
    )
    p.add_argument("--seed", type=int, default=0, help="random split seed")
    _common(p)

    p = sub.add_parser(
        "md17",
        help="MD17 / rMD17 npz trajectory (stored in kcal/mol, kcal/mol/Å, Å); protocol: "
        "950 train / 50 valid frames drawn from the full trajectory, the rest is test",
    )
    p.add_argument(
        "--path", required=True, help="sGDML or rMD17 .npz (or a folder + --molecule)"
    )
    p.add_argument("--molecule", default=None, help="molecule name (file in a folder)")
    p.add_argument("--train", type=int, default=950, help="train frames (default 950)")
    p.add_argument("--valid", type=int, default=50, help="valid frames (default 50)")
    p.add_argument(
        "--test", type=int, default=None, help="test frames (default: the rest)"
    )
    p.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    p.add_argument(
        "--format", choices=("auto", "sgdml", "rmd17"), default="auto", help="npz keys"
    )
    p.add_argument(
        "--min-test",
        type=int,
        default=None,
        help="refuse a test split (the rest) smaller than this (default: the validation "
        "split's size, at least 1; 0 = accept any)",
    )
    p.add_argument(
        "--length-unit",
        default=None,
        help="coordinate unit of a file without an r_unit field: Å (Ang), bohr, nm, pm "
        "(default: the file's field, else Å)",
    )
    p.add_argument(
        "--energy-unit",
        default=None,
        help="energy unit of a file without an e_unit field: kcal/mol, kJ/mol, eV, meV, "
        "hartree; forces are in energy/length (default: the file's field, else kcal/mol)",
    )
    _common(p)

    p = sub.add_parser(
        "pdbbind",
        help="PDBbind v2016 refined set (train/valid) + CASF core set (test), -logKd/Ki",
    )
    p.add_argument(
        "--root", required=True, help="folder with refined-set/ and coreset/"
    )
    p.add_argument("--version", default="2016", help="index file year (default 2016)")
    p.add_argument(
        "--cutoff",
        type=float,
        default=5.0,
        help="keep pocket heavy atoms within this many Å of the ligand (default 5.0)",
    )
    p.add_argument(
        "--valid-fraction",
        type=float,
        default=0.1,
        help="share of non-core refined complexes in valid (default 0.1)",
    )
    p.add_argument(
        "--valid-size", type=int, default=None, help="valid complexes (overrides fraction)"
    )
    p.add_argument("--seed", type=int, default=0, help="train/valid split seed")
    p.add_argument("--index", default=None, help="index file (default: refined-set/index/)")
    p.add_argument("--core-dir", default=None, help="core set folder (default <root>/coreset)")
    p.add_argument(
        "--pocket-source",
        choices=("pocket", "protein"),
        default="pocket",
        help="read <id>_pocket.pdb (10 Å residues) or <id>_protein.pdb (cutoff > 10 Å)",
    )
    p.add_argument("--keep-waters", action="store_true", help="keep crystal waters")
    _common(p)
    # ligand + pocket graphs are larger than molecules: ~30 + ~150-250 atoms at 5 Å
    p.set_defaults(max_atoms=512)

    p = sub.add_parser("stats", help="print the statistics of existing split files")
    p.add_argument("dir", help="folder of <split>.lmdb files (or one .lmdb file)")

    p = sub.add_parser(
        "export",
        help="CSV of every input row: split, record index (or skipped), file line or "
        "SDF record, ID, SMILES",
    )
    p.add_argument("dir", help="folder of <split>.lmdb files (or one .lmdb file)")
    p.add_argument(
        "-o", "--output", default=None, help="CSV file to write (default: stdout)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the process exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from graphormer_ext.data.lmdb_dataset import DatasetFormatError
    from graphormer_ext.data.lmdb_writer import OutputBusyError
    from graphormer_ext.sources.base import SourceError

    try:
        if args.command == "export":
            if args.output is None:
                n = export_rows(args.dir, sys.stdout)
            else:
                with open(args.output, "w", newline="", encoding="utf-8") as f:
                    n = export_rows(args.dir, f)
            logger.info("exported %d rows", n)
            return 0
        if args.command == "stats":
            target = Path(args.dir)
            rows = [describe_lmdb(target)] if target.is_file() else describe_dir(target)
        else:
            rows = run(args)
    except (
        SourceError,
        FileExistsError,
        FileNotFoundError,
        DatasetFormatError,
        OutputBusyError,
    ) as exc:
        logger.error("%s", exc)
        return 2
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
