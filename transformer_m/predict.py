"""``transformer-m-predict``: HOMO-LUMO gap (eV) of molecules from SMILES, SDF or XYZ.

Examples::

    transformer-m-predict --checkpoint ckpt/checkpoint_best.pt --smiles CCO c1ccccc1
    transformer-m-predict --checkpoint ckpt/checkpoint_best.pt --smiles CCO --conformer
    transformer-m-predict --checkpoint ckpt/checkpoint_best.pt --sdf ligands.sdf
    transformer-m-predict --checkpoint L12.pt --released L12 --xyz water.xyz

Output (stdout, tab-separated, after a header): one line per input molecule with
``id``, ``mode`` and ``gap_ev``; SMILES first, then SMILES files, SDF and XYZ files,
each in command-line order. ``mode`` is ``2D`` (graph only: SMILES, or a flat SDF
depiction) or ``3D`` (positions from the file or from ``--conformer`` reach the model's
3D channel, which runs only on non-zero positions). An input that cannot be used gets
the line ``id  ERROR  reason`` and the others are still predicted; the exit code is
then 1.

Featurization is the training one (:func:`graphormer_ext.featurize.pipeline.
featurize_record`): heavy atoms only, OGB features, shortest-path edges with
``--path-convention`` (default ``fixed``; ``legacy`` for the released checkpoints).
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from graphormer_ext.data import keys as K
from graphormer_ext.sources.base import MoleculeError, SourceError, SourceRecord

logger = logging.getLogger(__name__)

__all__ = ["Item", "generate_conformer", "main", "read_inputs"]

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
    """

    ident: str
    record: dict | None = None
    error: str | None = None
    note: str | None = None


def generate_conformer(smiles: str, item: str, seed: int = 0, max_iters: int = 500):
    """An RDKit ETKDG conformer of a SMILES, MMFF-relaxed, hydrogens removed afterwards.

    Embedding uses ETKDGv3 with ``randomSeed=seed`` (deterministic); if it fails it is
    retried from random coordinates. MMFF94 relaxation runs when MMFF has parameters
    for the molecule (otherwise the ETKDG geometry is kept).

    Args:
        smiles: the SMILES string.
        item: origin used in error messages.
        seed: embedding seed.
        max_iters: MMFF iterations.

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
    return Chem.MolToMolBlock(Chem.RemoveHs(mol_h))


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


def featurize(ident: str, rec: SourceRecord, args: argparse.Namespace) -> Item:
    """Featurize one input into an :class:`Item` (errors are caught per molecule).

    SMILES get a generated conformer with ``args.conformer``; an SDF record is read in
    3D when it has 3D coordinates and in 2D when it is a flat depiction.
    """
    from dataclasses import replace

    from graphormer_ext.featurize.pipeline import featurize_record

    note = None
    try:
        if rec.kind == "smiles" and args.conformer:
            block = generate_conformer(rec.text, rec.item, seed=args.seed)
            rec = replace(rec, kind="molblock", text=block, use_3d=True)
        elif rec.kind == "molblock":
            use_3d = _is_3d_block(rec.text, rec.item)
            if not use_3d:
                note = f"{ident}: the SDF record has flat 2D coordinates; read as 2D"
            rec = replace(rec, use_3d=use_3d)
        record = featurize_record(
            rec, max_hops=args.max_hops, path_convention=args.path_convention
        )
    except MoleculeError as exc:
        return Item(ident, error=exc.reason)
    except (ValueError, SourceError) as exc:
        return Item(ident, error=str(exc))
    return Item(ident, record=record, note=note)


def build_parser() -> argparse.ArgumentParser:
    """The ``transformer-m-predict`` argument parser."""
    p = argparse.ArgumentParser(
        prog="transformer-m-predict",
        description="Predict the HOMO-LUMO gap (eV) with a Transformer-M checkpoint. "
        "SMILES are predicted in 2D mode (graph only) unless --conformer is given; SDF "
        "and XYZ coordinates are used in 3D mode.",
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
    p.add_argument(
        "--conformer",
        action="store_true",
        help="generate an RDKit ETKDG+MMFF conformer for each SMILES (3D mode)",
    )
    p.add_argument("--seed", type=int, default=0, help="conformer embedding seed")
    p.add_argument(
        "--charge", type=int, default=0, help="total charge of XYZ molecules"
    )
    p.add_argument(
        "--batch-size", type=int, default=64, help="molecules per forward pass"
    )
    p.add_argument(
        "--max-hops", type=int, default=5, help="shortest-path hops featurized"
    )
    p.add_argument(
        "--path-convention",
        choices=("fixed", "legacy"),
        default=None,
        help="shortest-path edge convention of the training data (default: legacy "
        "with --released, else fixed)",
    )
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, ...)")
    return p


def _load(args: argparse.Namespace):
    from transformer_m.inference import load_model, load_released_model

    if args.released:
        layers, arch = _RELEASED[args.released]
        return load_released_model(
            args.checkpoint, layers, arch=arch, device=args.device
        )
    return load_model(args.checkpoint, device=args.device)[0]


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``transformer-m-predict``.

    Args:
        argv: command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        the exit code: 0, 1 if any input could not be predicted, 2 if the checkpoint
        cannot be loaded (argparse exits with 2 on bad usage).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (args.smiles or args.smiles_file or args.sdf or args.xyz):
        parser.error("give molecules with --smiles, --smiles-file, --sdf or --xyz")
    if args.path_convention is None:
        args.path_convention = "legacy" if args.released else "fixed"
    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger().setLevel(logging.WARNING)  # fairseq's import may set INFO

    items = [
        Item(ident, error=rec) if isinstance(rec, str) else featurize(ident, rec, args)
        for ident, rec in read_inputs(args)
    ]
    from transformer_m.inference import (
        CheckpointLoadError,
        has_3d_channel,
        predict,
        record_mode,
    )

    try:
        model = _load(args)
    except (OSError, CheckpointLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    good = [it for it in items if it.record is not None]
    preds = predict(model, [it.record for it in good], batch_size=args.batch_size)
    gap = {id(it): float(p[0]) for it, p in zip(good, preds)}  # eV
    if any(K.POS in it.record for it in good) and not has_3d_channel(model):
        print(
            "warning: the checkpoint has no 3D channel (trained without --add-3d): "
            "coordinates are ignored and every molecule is predicted in 2D",
            file=sys.stderr,
        )

    print("id\tmode\tgap_ev")
    for it in items:
        if it.note:
            print(f"note: {it.note}", file=sys.stderr)
        if it.record is None:
            reason = " ".join(str(it.error).split())  # one line, no tabs
            print(f"{it.ident}\tERROR\t{reason}")
        else:
            mode = record_mode(it.record, model)
            print(f"{it.ident}\t{mode}\t{gap[id(it)]:.4f}")
    failed = sum(it.record is None for it in items)
    if failed:
        print(
            f"{failed} of {len(items)} molecules could not be predicted",
            file=sys.stderr,
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
