"""``transformer-m-predict``: predictions of a Transformer-M checkpoint for SMILES, SDF or XYZ.

Examples::

    transformer-m-predict --checkpoint ckpt/checkpoint_best.pt --smiles CCO c1ccccc1
    transformer-m-predict --checkpoint ckpt/checkpoint_best.pt --smiles CCO --conformer
    transformer-m-predict --checkpoint ckpt/checkpoint_best.pt --sdf ligands.sdf --out pred.csv
    transformer-m-predict --checkpoint L12.pt --released L12 --xyz water.xyz

Output: a table (tab-separated on stdout by default; ``--out FILE`` writes a file, CSV
for ``.csv``; both quoted where needed, so a tab or comma in a molecule title cannot
shift the columns) with one row per input molecule: ``id``, ``mode``, the prediction
columns, ``error``. Predictions are in the units of the label the model was trained on
(the training standardisation of ``--std-type std_logits/std_labels`` undone) and named
after it (``logS``, ``homo_eV``, ``homolumogap_eV`` for PCQM4Mv2 and the released
files); classifiers give the class and its probability (``active``, ``active_prob``).
Rows follow the inputs: SMILES first, then SMILES files, SDF and XYZ files, each in
command-line order. ``mode`` is ``2D`` (graph only) or ``3D`` (positions reach the
model's 3D channel). An input that cannot be used gets ``mode`` ``ERROR`` and the reason
in ``error``; the others are still predicted, and the exit code is then 1.

The checkpoint decides how inputs are featurized: the training data's path convention,
path hops and hydrogens (stored in the checkpoint; a different ``--path-convention`` or
``--max-hops`` is refused unless ``--allow-data-mismatch``), and its input channels. A
model only trained on molecules with 3D coordinates gets an RDKit ETKDG+MMFF conformer for
every input without coordinates (``--no-conformer`` refuses those inputs instead); both are
said on stderr. Featurization is the training one (:func:`graphormer_ext.featurize.pipeline.
featurize_record`).
"""
from __future__ import annotations

import argparse
import csv
import logging
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np

from graphormer_ext.data import keys as K
from graphormer_ext.sources.base import MoleculeError, SourceError, SourceRecord

logger = logging.getLogger(__name__)

__all__ = ["Item", "generate_conformer", "main", "read_inputs", "write_table"]

# --released name -> (layers, arch) of transformer_m.inference.build_released_model
_RELEASED = {
    "L12": (12, "transformer_m_base"),
    "L18": (18, "transformer_m_base"),
    "L12-old": (12, "transformer_m"),
}


@dataclass
class Item:
    """One input molecule on its way to a prediction.

    Attributes:
        ident: the id printed in the output.
        record: the stored record (``None`` if featurization failed).
        error: why the molecule cannot be predicted (``None`` if it can).
        note: a remark printed to stderr (e.g. a flat SDF read as 2D).
        conformer: a conformer was generated for it.
    """

    ident: str
    record: dict | None = None
    error: str | None = None
    note: str | None = None
    conformer: bool = False


def generate_conformer(
    smiles: str, item: str, seed: int = 0, max_iters: int = 500, keep_hs: bool = False
):
    """An RDKit ETKDG conformer of a SMILES, MMFF-relaxed, hydrogens removed afterwards.

    Embedding uses ETKDGv3 with ``randomSeed=seed`` (deterministic); if it fails it is
    retried from random coordinates. MMFF94 relaxation runs when MMFF has parameters
    for the molecule (otherwise the ETKDG geometry is kept).

    Args:
        smiles: the SMILES string.
        item: origin used in error messages.
        seed: embedding seed.
        max_iters: MMFF iterations.
        keep_hs: keep the explicit hydrogens (models trained with hydrogens, e.g. QM9).

    Returns:
        a MOL block (V2000, heavy atoms in SMILES order, coordinates in Å).

    Raises:
        MoleculeError: unparsable SMILES, or no conformer could be embedded.
    """
    from rdkit import Chem, rdBase
    from rdkit.Chem import AllChem

    from graphormer_ext.featurize.molecules import mol_from_smiles

    mol = mol_from_smiles(smiles, item)
    mol_h = Chem.AddHs(mol)
    with rdBase.BlockLogs():
        params = AllChem.ETKDGv3()
        params.randomSeed = int(seed)
        status = AllChem.EmbedMolecule(mol_h, params)
        if status != 0:
            params.useRandomCoords = True
            status = AllChem.EmbedMolecule(mol_h, params)
        if status != 0:
            raise MoleculeError(
                item,
                "conformer generation failed: RDKit ETKDG could not embed the molecule "
                "(also not from random coordinates); give a 3D structure (--sdf/--xyz) "
                "or predict it in 2D (without --conformer)",
            )
        if AllChem.MMFFHasAllMoleculeParams(mol_h):
            AllChem.MMFFOptimizeMolecule(mol_h, maxIters=int(max_iters))
    return Chem.MolToMolBlock(mol_h if keep_hs else Chem.RemoveHs(mol_h))


def _is_3d_block(block: str, item: str) -> bool:
    """Whether a MOL block carries 3D coordinates (header flag or any non-zero z)."""
    from graphormer_ext.featurize.molecules import mol_from_molblock

    mol = mol_from_molblock(block, item)
    if mol.GetNumConformers() == 0:
        return False
    conf = mol.GetConformer()
    pos = np.asarray(conf.GetPositions())
    return bool(conf.Is3D() or pos[:, 2].any())


def _split_xyz(text: str) -> Iterator[str]:
    """Split concatenated XYZ blocks (``N``, comment, ``N`` atom lines, repeated)."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if not lines[i].strip():
            i += 1
            continue
        try:
            n = int(lines[i].split()[0])
        except ValueError:
            yield "\n".join(lines[i:])  # malformed: let the parser report it
            return
        yield "\n".join(lines[i : i + n + 2]) + "\n"
        i += n + 2


def _sdf_title(block: str) -> str:
    return block.lstrip("\n").split("\n", 1)[0].strip() if block.strip() else ""


def read_inputs(
    args: argparse.Namespace,
) -> Iterator[tuple[str, SourceRecord | str]]:
    """Yield ``(id, SourceRecord)`` for every input molecule, or ``(id, error message)``
    for an input file that cannot be read; SMILES first, then SMILES files, SDF and XYZ
    files, each in command-line order.

    ``--smiles`` ids are the SMILES themselves; ``--smiles-file`` lines are ``SMILES
    [name]`` (``.smi`` style; blank lines and ``#`` comments skipped), the id is the
    name or ``file:line``; SDF ids are the record title or ``file#i``; XYZ ids are the
    file name (``file#i`` for multi-molecule files).
    """
    from graphormer_ext.featurize.molecules import iter_sdf

    for k, smi in enumerate(args.smiles or []):
        item = f"--smiles #{k + 1} {smi!r}"
        yield smi, SourceRecord("predict", k, item, "smiles", smi)
    for path in args.smiles_file or []:
        try:
            text = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            yield path, f"cannot read the SMILES file: {exc}"
            continue
        for line_no, line in enumerate(text.splitlines(), start=1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            ident = fields[1] if len(fields) > 1 else f"{path}:{line_no}"
            item = f"{path} line {line_no}"
            yield ident, SourceRecord("predict", line_no, item, "smiles", fields[0])
    for path in args.sdf or []:
        try:
            blocks = list(iter_sdf(path))
        except (OSError, SourceError) as exc:
            yield path, f"cannot read the SDF file: {exc}"
            continue
        for k, block in enumerate(blocks):
            ident = _sdf_title(block) or f"{path}#{k}"
            item = f"{path} record {k}"
            yield ident, SourceRecord("predict", k, item, "molblock", block)
    for path in args.xyz or []:
        try:
            text = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            yield path, f"cannot read the XYZ file: {exc}"
            continue
        blocks = list(_split_xyz(text)) or [""]
        for k, block in enumerate(blocks):
            ident = path if len(blocks) == 1 else f"{path}#{k}"
            item = f"{path} molecule {k}"
            yield ident, SourceRecord(
                "predict", k, item, "xyz", block, use_3d=True, charge=args.charge
            )


def _smiles_of_block(block: str, item: str) -> str:
    from rdkit import Chem

    from graphormer_ext.featurize.molecules import mol_from_molblock

    return Chem.MolToSmiles(mol_from_molblock(block, item))


def _explicit_h_block(smiles: str, item: str) -> str:
    """A MOL block with explicit hydrogens and no coordinates (2D input of a model
    trained with hydrogens, e.g. QM9)."""
    from rdkit import Chem

    from graphormer_ext.featurize.molecules import mol_from_smiles

    return Chem.MolToMolBlock(Chem.AddHs(mol_from_smiles(smiles, item)))


def featurize(ident: str, rec: SourceRecord, args: argparse.Namespace) -> Item:
    """Featurize one input into an :class:`Item` (errors are caught per molecule).

    Inputs without coordinates (SMILES, flat SDF depictions) get a generated conformer
    when ``args.conformer`` is ``"always"``, or ``"needed"`` and the model needs 3D input;
    with ``"never"`` such an input of a 3D-only model is an error. ``args.remove_hs``,
    ``args.max_hops`` and ``args.path_convention`` follow the checkpoint.
    """
    from graphormer_ext.featurize.pipeline import featurize_record

    note = None
    conformer = False
    try:
        has_3d = rec.kind == "xyz"
        if rec.kind == "molblock":
            has_3d = _is_3d_block(rec.text, rec.item)
            rec = replace(rec, use_3d=has_3d)
        if not has_3d and args.conformer in ("always", "needed"):
            if args.conformer == "always" or args.needs_3d:
                smiles = rec.text if rec.kind == "smiles" else _smiles_of_block(
                    rec.text, rec.item)
                block = generate_conformer(smiles, rec.item, seed=args.seed,
                                           keep_hs=not args.remove_hs)
                rec = replace(rec, kind="molblock", text=block, use_3d=True)
                has_3d = conformer = True
        if not has_3d and args.needs_3d:
            return Item(ident, error=(
                "the model was only trained on molecules with 3D coordinates (training "
                f"modes: {args.channels_text}) and this input has none; give an SDF/XYZ "
                "with coordinates, or drop "
                "--no-conformer to generate an RDKit conformer"))
        if rec.kind == "molblock" and not has_3d:
            note = f"{ident}: the SDF record has flat 2D coordinates; read as 2D"
        if rec.kind == "smiles" and not args.remove_hs:
            rec = replace(rec, kind="molblock", text=_explicit_h_block(rec.text, rec.item),
                          use_3d=False)
        record = featurize_record(
            rec, max_hops=args.max_hops, path_convention=args.path_convention,
            remove_hs=args.remove_hs,
        )
    except MoleculeError as exc:
        return Item(ident, error=exc.reason)
    except (ValueError, SourceError) as exc:
        return Item(ident, error=str(exc))
    return Item(ident, record=record, note=note, conformer=conformer)


def build_parser() -> argparse.ArgumentParser:
    """The ``transformer-m-predict`` argument parser."""
    p = argparse.ArgumentParser(
        prog="transformer-m-predict",
        description="Predict with a Transformer-M checkpoint, in the units of the label it "
        "was trained on. Inputs with coordinates (SDF, XYZ, --conformer) use the 3D "
        "channel; SMILES are 2D unless the model was only trained with 3D coordinates, in "
        "which case a conformer is generated (or, with --no-conformer, the input is refused).",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint (.pt)")
    p.add_argument(
        "--released",
        choices=sorted(_RELEASED),
        help="the checkpoint is a released Transformer-M file (L12.pt, L18.pt, "
        "L12-old.pt) rather than one trained with this plugin",
    )
    src = p.add_argument_group("inputs (at least one)")
    src.add_argument("--smiles", nargs="+", metavar="S", help="SMILES strings")
    src.add_argument(
        "--smiles-file",
        nargs="+",
        metavar="F",
        help="files with one 'SMILES [name]' per line",
    )
    src.add_argument(
        "--sdf", nargs="+", metavar="F", help="SDF files (3D coordinates used)"
    )
    src.add_argument(
        "--xyz",
        nargs="+",
        metavar="F",
        help="XYZ files, Å (bonds perceived by RDKit; 3D coordinates used)",
    )
    conf = p.add_mutually_exclusive_group()
    conf.add_argument(
        "--conformer",
        action="store_true",
        help="generate an RDKit ETKDG+MMFF conformer for every input without coordinates "
        "(3D mode); by default only when the model was only trained with 3D coordinates",
    )
    conf.add_argument(
        "--no-conformer",
        action="store_true",
        help="never generate conformers: inputs without coordinates of a 3D-only model are "
        "refused (ERROR rows)",
    )
    p.add_argument("--seed", type=int, default=0, help="conformer embedding seed")
    p.add_argument(
        "--charge", type=int, default=0, help="total charge of XYZ molecules"
    )
    p.add_argument(
        "--batch-size", type=int, default=64, help="molecules per forward pass"
    )
    p.add_argument(
        "--max-hops",
        type=int,
        default=None,
        help="shortest-path hops featurized (default: the checkpoint's training data, 5)",
    )
    p.add_argument(
        "--path-convention",
        choices=("fixed", "legacy"),
        default=None,
        help="shortest-path edge convention (default: the checkpoint's training data; "
        "legacy with --released; fixed for checkpoints that do not say)",
    )
    p.add_argument(
        "--allow-data-mismatch",
        action="store_true",
        help="featurize with --path-convention/--max-hops even when they differ from the "
        "checkpoint's training data (a warning instead of an error)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="write the table to this file (.csv: comma-separated, else tab-separated) "
        "instead of stdout",
    )
    p.add_argument(
        "--format",
        choices=("tsv", "csv"),
        default=None,
        help="table format (default: from --out's extension, tsv on stdout)",
    )
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, ...)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (default: OMP_NUM_THREADS if set, else 1 on a machine with <= 4 "
        "cores or a load above half its cores, else the idle cores)",
    )
    return p


def _featurization_settings(args: argparse.Namespace, predictor) -> list[str]:
    """Fill ``args`` from the checkpoint's data facts; return refusal messages (if any).

    An explicit ``--path-convention``/``--max-hops`` that differs from the checkpoint is
    refused (a warning with ``--allow-data-mismatch``); so is a checkpoint trained with
    another featurizer version.
    """
    from graphormer_ext.featurize.pipeline import FEATURIZER_VERSION
    from transformer_m.data_facts import check_facts

    facts = predictor.facts
    wanted = {"path_convention": args.path_convention, "max_hops": args.max_hops,
              "featurizer_version": FEATURIZER_VERSION}
    for name, default in (("path_convention", "fixed"), ("max_hops", 5)):
        if getattr(args, name) is None:
            setattr(args, name, facts.get(name) or default)
    ckpt_version = facts.get("featurizer_version")
    if ckpt_version and "/" in str(ckpt_version) and str(ckpt_version).split("/")[0] != (
            FEATURIZER_VERSION.split("/")[0]):
        wanted["featurizer_version"] = None  # other featurizer family (PDBbind, ...)
    errors = []
    try:
        check_facts(facts, wanted, expected_from=f"the training data of {args.checkpoint}",
                    found_from="this featurization", allow=False,
                    fix="drop --path-convention/--max-hops (the checkpoint's are the default)")
    except ValueError as exc:
        if not args.allow_data_mismatch:
            errors.append(str(exc))
        else:  # stderr: stdout holds the table
            print(f"warning: {exc} (going on: --allow-data-mismatch)", file=sys.stderr)
    args.remove_hs = facts.get("remove_hs") is not False
    channels = predictor.channels
    args.needs_3d = bool(channels.get("needs_3d"))
    args.channels_text = ", ".join(channels.get("modes") or []) or "unknown"
    args.conformer = "always" if args.conformer else (
        "never" if args.no_conformer else "needed")
    return errors


def write_table(
    fh, items: list[Item], columns: list[str], values: dict, modes: dict, fmt: str
) -> None:
    """Write the prediction table (``csv`` or ``tsv``, quoted where needed)."""
    writer = csv.writer(fh, delimiter="," if fmt == "csv" else "\t", lineterminator="\n")
    writer.writerow(["id", "mode", *columns, "error"])
    for it in items:
        if it.record is None:
            reason = " ".join(str(it.error).split())  # one line
            writer.writerow([it.ident, "ERROR", *([""] * len(columns)), reason])
        else:
            row = values[id(it)]
            writer.writerow([it.ident, modes[id(it)], *(f"{v:.6g}" for v in row), ""])


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``transformer-m-predict``.

    Args:
        argv: command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        the exit code: 0, 1 if any input could not be predicted, 2 if the checkpoint
        cannot be loaded or the featurization contradicts it (argparse exits with 2 on
        bad usage).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (args.smiles or args.smiles_file or args.sdf or args.xyz):
        parser.error("give molecules with --smiles, --smiles-file, --sdf or --xyz")
    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger().setLevel(logging.WARNING)  # fairseq's import may set INFO
    import torch

    from transformer_m.inference import CheckpointLoadError, load_predictor, record_mode
    from transformer_m.threads import default_threads

    torch.set_num_threads(args.threads or default_threads()[0])

    try:
        predictor = load_predictor(
            args.checkpoint, device=args.device,
            released=_RELEASED.get(args.released) if args.released else None,
        )
    except (OSError, CheckpointLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    errors = _featurization_settings(args, predictor)
    if errors:
        for msg in errors:
            print(f"error: {msg}", file=sys.stderr)
        return 2

    items = [
        Item(ident, error=rec) if isinstance(rec, str) else featurize(ident, rec, args)
        for ident, rec in read_inputs(args)
    ]
    generated = [it.ident for it in items if it.conformer]
    if generated:
        why = ("the model was only trained on molecules with 3D coordinates (training "
               f"modes: {args.channels_text})"
               if args.conformer == "needed" else "--conformer")
        print(f"note: {why}: generated RDKit ETKDG+MMFF conformers for {len(generated)} "
              "input(s) without coordinates"
              + ("; --no-conformer refuses them instead" if args.conformer == "needed"
                 else ""), file=sys.stderr)
    good = [it for it in items if it.record is not None]
    preds = predictor.predict([it.record for it in good], batch_size=args.batch_size)
    columns = list(preds)
    values = {id(it): [float(preds[c][i]) for c in columns] for i, it in enumerate(good)}
    modes = {id(it): record_mode(it.record, predictor.model) if predictor.uses_positions
             else "2D" for it in good}
    with_pos = [it for it in good if K.POS in it.record]
    if with_pos and not predictor.uses_positions:
        print(
            "warning: the checkpoint was not trained with 3D input (no 3D channel, or no "
            "coordinates reached it in training): coordinates are ignored and every "
            "molecule is predicted in 2D",
            file=sys.stderr,
        )
    for it in items:
        if it.note:
            print(f"note: {it.note}", file=sys.stderr)
    fmt = args.format or ("csv" if (args.out or "").lower().endswith(".csv") else "tsv")
    if args.out:
        with open(args.out, "w", newline="", encoding="utf-8") as fh:
            write_table(fh, items, columns, values, modes, fmt)
        print(f"wrote {len(items)} rows to {args.out}", file=sys.stderr)
    else:
        write_table(sys.stdout, items, columns, values, modes, fmt)
    failed = sum(it.record is None for it in items)
    if failed:
        print(
            f"{failed} of {len(items)} molecules could not be predicted",
            file=sys.stderr,
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
