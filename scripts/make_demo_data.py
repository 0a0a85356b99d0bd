#!/usr/bin/env python
"""Build the shipped demo dataset: QM9 molecules in the official PCQM4Mv2 layout.

Output (``--out``, default ``data/pcqm4m-v2-qm9``)::

    pcqm4m-v2/raw/data.csv.gz    idx,smiles,homolumogap (eV; empty = NaN for test rows)
    pcqm4m-v2/split_dict.pt      {"train","valid","test-dev","test-challenge"} -> int64
    pcqm4m-v2/RELEASE_v1.txt     release marker (ogb asks on stdin without it)
    pcqm4m-v2-train.sdf.tar.gz   one member, pcqm4m-v2-train.sdf: heavy atoms, DFT
                                 coordinates in Å, SDF record i <-> train row i
    qm9_index.csv                provenance: idx,split,gdb_index (QM9 id of each row)
    SHA256SUMS                   sha256sum -c compatible, paths relative to --out

Molecules are drawn from QM9 (the ``qm9pack`` CSVs) by a seeded permutation. A drawn
molecule is kept only if bond perception from its DFT XYZ geometry reproduces the QM9
SMILES graph (:func:`graphormer_ext.featurize.molecules.mol_from_xyz` with the SMILES as
template); rejections are counted by reason. The CSV SMILES is the canonical RDKit
SMILES of the perceived heavy-atom molecule (stereo from the DFT geometry), so it
describes exactly the SDF molecule. The label is the QM9 HOMO-LUMO gap
(B3LYP/6-31G(2df,p)) in eV, standing in for PCQM4Mv2's B3LYP/6-31G* gap. As in
PCQM4Mv2, train comes first, only train has 3D, and the test labels are hidden.

Every file is written deterministically (fixed gzip and tar timestamps), so a rerun with
the same arguments and inputs reproduces SHA256SUMS. The output is then read back with
RDKit's SDMolSupplier and, offline, with the real
``ogb.lsc.PCQM4Mv2Dataset(root, only_smiles=True)``.

Usage::

    .venv/bin/python scripts/make_demo_data.py --out data/pcqm4m-v2-qm9 [--overwrite]
"""
from __future__ import annotations

import argparse
import collections
import csv
import gzip
import hashlib
import io
import logging
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from graphormer_ext.featurize.molecules import mol_from_xyz
from graphormer_ext.sources.base import MoleculeError
from graphormer_ext.sources.qm9 import (
    HARTREE_TO_EV,
    QM9_TARGET_NAMES,
    QM9PackSource,
    xyz_block,
)

logger = logging.getLogger("make_demo_data")

SPLITS = ("train", "valid", "test-dev", "test-challenge")
LABELLED = ("train", "valid")
SDF_MEMBER = "pcqm4m-v2-train.sdf"
SDF_ARCHIVE = SDF_MEMBER + ".tar.gz"
GAP = QM9_TARGET_NAMES.index("gap")


def sha256(path: Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def rejection_reason(err: MoleculeError) -> str:
    """Short category of a perception failure (for the statistics)."""
    r = err.reason
    if "DetermineBonds gave" in r:
        return "perceived graph differs from the QM9 SMILES graph"
    if "DetermineBonds failed" in r:
        return "bond orders not assignable from the geometry"
    return r.split("(")[0].strip()[:80]


def perceive(src: QM9PackSource, pos: int):
    """Heavy-atom RDKit molecule (DFT coordinates) of QM9 molecule ``pos``, and SMILES.

    Raises:
        MoleculeError: perception does not reproduce the QM9 SMILES graph, or the result
            does not read back identically as an SDF record and as canonical SMILES.
    """
    from rdkit import Chem

    gdb = int(src.gdb_index[pos])
    item = f"gdb_{gdb}"
    text = xyz_block(src.elements(pos), src.coordinates(pos), item)
    mol = mol_from_xyz(
        text, item, charge=0, template_smiles=src.smiles[pos], remove_hs=True
    )
    if any(a.GetAtomicNum() == 1 for a in mol.GetAtoms()):
        raise MoleculeError(item, "explicit hydrogen left after RemoveHs")
    Chem.AssignStereochemistryFrom3D(mol)
    mol.SetProp("_Name", item)
    smiles = Chem.MolToSmiles(mol)
    back = Chem.MolFromSmiles(smiles)
    if back is None or Chem.MolToSmiles(back) != smiles:
        raise MoleculeError(item, "canonical SMILES does not round-trip")
    reread = Chem.MolFromMolBlock(Chem.MolToMolBlock(mol))
    if reread is None or Chem.MolToSmiles(reread) != smiles:
        raise MoleculeError(item, "SDF record does not read back as the same molecule")
    return mol, smiles


def draw(src: QM9PackSource, counts: dict[str, int], seed: int):
    """Draw molecules in seeded random order until every split is filled.

    Returns:
        per split a list of (file position, mol, smiles); the rejection Counter; the
        number of molecules tried.
    """
    need = sum(counts.values())
    order = np.random.default_rng(seed).permutation(len(src.gdb_index))
    kept, rejected, attempted = [], collections.Counter(), 0
    for pos in order.tolist():
        if len(kept) == need:
            break
        attempted += 1
        try:
            mol, smiles = perceive(src, pos)
        except MoleculeError as e:
            rejected[rejection_reason(e)] += 1
            continue
        kept.append((pos, mol, smiles))
    if len(kept) < need:
        raise SystemExit(f"only {len(kept)} usable molecules, {need} requested")
    out, start = {}, 0
    for split in SPLITS:
        out[split] = kept[start : start + counts[split]]
        start += counts[split]
    return out, rejected, attempted


def write_gzip(path: Path, data: bytes) -> None:
    """gzip with mtime 0 and no file name, so the bytes depend only on ``data``."""
    with open(path, "wb") as raw, gzip.GzipFile(
        filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9
    ) as gz:
        gz.write(data)


def write_tar_gz(path: Path, member: str, data: bytes) -> None:
    """A .tar.gz with one regular file, fixed owner, mode and timestamps."""
    info = tarfile.TarInfo(member)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(data))
    write_gzip(path, buf.getvalue())


def csv_text(header: tuple[str, ...], rows) -> str:
    """CSV with ``\\n`` line ends."""
    text = io.StringIO(newline="")
    w = csv.writer(text, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return text.getvalue()


def write_dataset(out: Path, src: QM9PackSource, chosen: dict, seed: int) -> None:
    """Write the PCQM4Mv2 layout of the chosen molecules into the empty ``out``."""
    import torch
    from rdkit import Chem

    folder = out / "pcqm4m-v2"
    (folder / "raw").mkdir(parents=True)
    gap_ev = src.targets()[:, GAP]  # QM9 gap [Hartree] x HARTREE_TO_EV

    rows, split_idx, provenance = [], {}, []
    for split in SPLITS:
        idx = []
        for pos, _mol, smiles in chosen[split]:
            i = len(rows)
            gap = repr(float(gap_ev[pos])) if split in LABELLED else ""
            rows.append((i, smiles, gap))
            provenance.append((i, split, int(src.gdb_index[pos])))
            idx.append(i)
        split_idx[split] = torch.tensor(idx, dtype=torch.int64)

    data_csv = csv_text(("idx", "smiles", "homolumogap"), rows)
    write_gzip(folder / "raw" / "data.csv.gz", data_csv.encode())
    torch.save(split_idx, folder / "split_dict.pt")
    (folder / "RELEASE_v1.txt").write_text(
        "PCQM4Mv2 layout, release v1 marker. Demo subset built from QM9 by "
        "scripts/make_demo_data.py (see data/README.md); not the real PCQM4Mv2.\n"
    )
    # MOL block + "$$$$" per record, no data fields (SDWriter adds the XYZ comment).
    train = chosen["train"]
    sdf = "".join(Chem.MolToMolBlock(mol) + "$$$$\n" for _pos, mol, _smi in train)
    write_tar_gz(out / SDF_ARCHIVE, SDF_MEMBER, sdf.encode())
    index_csv = csv_text(("idx", "split", "gdb_index"), provenance)
    (out / "qm9_index.csv").write_text(index_csv)
    logger.info("wrote %d rows (seed %d) to %s", len(rows), seed, out)


def write_checksums(out: Path) -> dict[str, int]:
    """Write ``SHA256SUMS`` over every other file; returns relative path -> bytes."""
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != "SHA256SUMS")
    sizes = {p.relative_to(out).as_posix(): p.stat().st_size for p in files}
    lines = [f"{sha256(p)}  {p.relative_to(out).as_posix()}\n" for p in files]
    (out / "SHA256SUMS").write_text("".join(lines))
    return sizes


def verify(out: Path, chosen: dict, counts: dict[str, int]) -> None:
    """Read the output back with RDKit and the real ogb loader (offline)."""
    import torch
    from ogb.lsc import PCQM4Mv2Dataset
    from rdkit import Chem

    with tarfile.open(out / SDF_ARCHIVE, "r:gz") as tar:
        names = tar.getnames()
        if names != [SDF_MEMBER]:
            raise SystemExit(f"{SDF_ARCHIVE} members {names} != [{SDF_MEMBER!r}]")
        data = tar.extractfile(SDF_MEMBER).read()
    mols = list(Chem.ForwardSDMolSupplier(io.BytesIO(data)))
    bad = sum(m is None for m in mols)
    if len(mols) != counts["train"] or bad:
        raise SystemExit(f"SDF: {len(mols)} records ({bad} unreadable)")
    for k, (m, (_pos, _mol, smiles)) in enumerate(zip(mols, chosen["train"])):
        if m.GetNumConformers() != 1 or not m.GetConformer().Is3D():
            raise SystemExit(f"SDF record {k} has no 3D conformer")
        if any(a.GetAtomicNum() == 1 for a in m.GetAtoms()):
            raise SystemExit(f"SDF record {k} has hydrogens")
        if Chem.MolToSmiles(m) != smiles:
            raise SystemExit(f"SDF record {k}: {Chem.MolToSmiles(m)} != CSV {smiles}")
    logger.info("RDKit: %d SDF records, 3D, heavy atoms only, SMILES == CSV", len(mols))

    ds = PCQM4Mv2Dataset(root=str(out), only_smiles=True)  # files exist: no download
    split = ds.get_idx_split()
    for name in SPLITS:
        got = split[name]
        got = got.numpy() if isinstance(got, torch.Tensor) else np.asarray(got)
        if len(got) != counts[name]:
            raise SystemExit(f"ogb split {name}: {len(got)} != {counts[name]}")
        labels = np.asarray([ds[int(i)][1] for i in got], dtype=np.float64)
        finite = np.isfinite(labels)
        if name in LABELLED and not finite.all():
            raise SystemExit(f"ogb split {name}: non-finite labels")
        if name not in LABELLED and finite.any():
            raise SystemExit(f"ogb split {name}: labels are not hidden")
    if not np.array_equal(np.asarray(split["train"]), np.arange(counts["train"])):
        raise SystemExit("train is not rows 0..n_train-1")
    sdf_smiles = [s for _p, _m, s in chosen["train"]]
    if [ds[i][0] for i in range(counts["train"])] != sdf_smiles:
        raise SystemExit("ogb SMILES differ from the SDF molecules")
    sizes = {k: len(v) for k, v in split.items()}
    logger.info("ogb PCQM4Mv2Dataset(only_smiles=True): %d rows, %s", len(ds), sizes)


def parse_args(argv=None) -> argparse.Namespace:
    """Command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--out", type=Path, default=Path("data/pcqm4m-v2-qm9"), help="output folder"
    )
    p.add_argument(
        "--csv-dir",
        type=Path,
        default=None,
        help="folder of qm9pack's qm9_part{1,2,3}.csv (default: the installed qm9pack)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the molecule draw")
    p.add_argument("--train", type=int, default=3000, help="train molecules (3D)")
    p.add_argument("--valid", type=int, default=500, help="valid molecules")
    p.add_argument("--test-dev", type=int, default=250, help="test-dev (label hidden)")
    p.add_argument(
        "--test-challenge", type=int, default=250, help="test-challenge (label hidden)"
    )
    p.add_argument(
        "--max-file-bytes",
        type=int,
        default=1_000_000,
        help="fail if any written file is larger than this",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing --out folder"
    )
    p.add_argument(
        "--no-verify", action="store_true", help="skip the RDKit/ogb read-back check"
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Build, check and install the demo dataset; returns the exit status."""
    args = parse_args(argv)
    fmt = "%(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.INFO, format=fmt)
    counts = {
        "train": args.train,
        "valid": args.valid,
        "test-dev": args.test_dev,
        "test-challenge": args.test_challenge,
    }
    if min(counts.values()) < 0 or counts["train"] == 0:
        raise SystemExit(f"bad split sizes {counts}")
    out = args.out
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise SystemExit(f"{out} exists and is not empty; pass --overwrite")

    src = QM9PackSource(csv_dir=args.csv_dir, split="all")
    for path in src.files():
        logger.info("input %s sha256 %s", path, sha256(path))
    logger.info("label: QM9 HOMO_LUMO_gap_au x %.10f eV/Hartree", HARTREE_TO_EV)

    chosen, rejected, attempted = draw(src, counts, args.seed)
    n_rej = sum(rejected.values())
    logger.info(
        "drew %d molecules (seed %d): kept %d, rejected %d (%.1f%%)",
        attempted,
        args.seed,
        attempted - n_rej,
        n_rej,
        100.0 * n_rej / max(attempted, 1),
    )
    for reason, n in rejected.most_common():
        logger.info("  rejected %5d: %s", n, reason)

    parent = out.parent if out.parent.exists() else None
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=parent))
    try:
        stage = tmp / "out"
        stage.mkdir()
        write_dataset(stage, src, chosen, args.seed)
        sizes = write_checksums(stage)
        for rel, size in sizes.items():
            logger.info("  %8d bytes  %s", size, rel)
        too_big = {k: v for k, v in sizes.items() if v > args.max_file_bytes}
        if too_big:
            raise SystemExit(f"files over {args.max_file_bytes} bytes: {too_big}")
        if not args.no_verify:
            verify(stage, chosen, counts)
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(stage), str(out))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("done: %s (%s)", out, ", ".join(f"{k}={v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
