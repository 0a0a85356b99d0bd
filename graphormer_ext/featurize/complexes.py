"""Protein-ligand complexes -> one RDKit molecule: the ligand plus the pocket atoms near it.

Transformer-M's PDBBind input (spec ``transformer_m.md`` §5.2) is the complex restricted
to the pocket atoms around the ligand, fed to one encoder. This module builds that
molecule from file *contents* (no file I/O, no RNG):

1. the ligand's heavy atoms from its SDF record, or from its MOL2 block when RDKit cannot
   read the SDF (PDBbind ships both);
2. the pocket's heavy atoms from a PDB block (``rdkit.Chem.MolFromPDBBlock``: bonds from
   the standard-residue templates plus proximity bonding), waters dropped by default;
3. of those, the atoms within ``cutoff`` Å of any ligand heavy atom; bonds between kept
   atoms are kept, bonds to dropped atoms are cut (the cut atom gains implicit hydrogens);
4. ``Chem.CombineMols(ligand, pocket)``: ligand atoms first, then the pocket atoms in PDB
   order, with the files' 3D coordinates (Å) as the conformer.

The result is featurized like any molecule (OGB features, shortest paths; the ligand and
the pocket are separate fragments of one graph), so Transformer-M's 2D and 3D channels
apply unchanged. Pocket aromaticity is re-perceived after the cut: a ring that the cutoff
splits is no longer aromatic.

The worker input is a JSON payload (:func:`complex_payload`) carried in
``SourceRecord.text`` with ``kind ==`` :data:`COMPLEX_KIND`.
"""

from __future__ import annotations

import json

import numpy as np

from graphormer_ext.featurize.molecules import mol_from_molblock
from graphormer_ext.sources.base import MoleculeError

__all__ = [
    "COMPLEX_KIND",
    "WATER_RESIDUES",
    "complex_payload",
    "ligand_from_blocks",
    "pocket_from_pdb",
    "select_pocket",
    "mol_from_complex",
    "mol_from_complex_payload",
]

COMPLEX_KIND = "complex"  # SourceRecord.kind of a protein-ligand complex (JSON payload)
WATER_RESIDUES = ("HOH", "WAT", "DOD", "H2O", "TIP", "TIP3", "SOL")
_PAYLOAD_VERSION = 1


def complex_payload(
    *,
    ligand_sdf: str | None,
    ligand_mol2: str | None,
    pocket_pdb: str | None,
    cutoff: float,
    keep_waters: bool = False,
    missing: list[str] | None = None,
) -> str:
    """Serialize a complex's file contents for :func:`mol_from_complex_payload`.

    Args:
        ligand_sdf: text of ``<id>_ligand.sdf`` (first record used), or ``None``.
        ligand_mol2: text of ``<id>_ligand.mol2`` (fallback), or ``None``.
        pocket_pdb: text of ``<id>_pocket.pdb`` (or the whole protein PDB), or ``None``.
        cutoff: pocket radius in Å around the ligand heavy atoms.
        keep_waters: keep water oxygens of the PDB block.
        missing: names of expected files that do not exist (the worker reports a skip).

    Returns:
        JSON text.
    """
    return json.dumps(
        {
            "version": _PAYLOAD_VERSION,
            "ligand_sdf": ligand_sdf,
            "ligand_mol2": ligand_mol2,
            "pocket_pdb": pocket_pdb,
            "cutoff": float(cutoff),
            "keep_waters": bool(keep_waters),
            "missing": list(missing or []),
        }
    )


def _rdkit():
    from rdkit import Chem, rdBase

    return Chem, rdBase


def ligand_from_blocks(sdf: str | None, mol2: str | None, item: str):
    """Ligand heavy atoms with 3D coordinates: SDF first, MOL2 as fallback.

    Args:
        sdf: SDF text (the first record is read), or ``None``.
        mol2: MOL2 text, or ``None``.
        item: origin used in error messages.

    Returns:
        sanitized ``rdkit.Chem.Mol`` without hydrogens, with one conformer.

    Raises:
        MoleculeError: neither file gives a molecule ("unreadable ligand", with each
            file's reason).
    """
    Chem, rdBase = _rdkit()
    reasons = []
    if sdf is not None and sdf.strip():
        block = sdf.split("$$$$", 1)[0]
        try:
            mol = mol_from_molblock(block, item, remove_hs=True)
        except MoleculeError as exc:
            reasons.append(f"SDF: {exc.reason}")
        else:
            if mol.GetNumConformers():
                return mol
            reasons.append("SDF: no coordinates")
    elif sdf is not None:
        reasons.append("SDF: empty file")
    if mol2 is not None and mol2.strip():
        mol = None
        with rdBase.BlockLogs():
            try:
                mol = Chem.MolFromMol2Block(mol2, sanitize=True, removeHs=True)
            except Exception as e:  # noqa: BLE001 - malformed blocks may raise
                reasons.append(f"MOL2: {e}")
            else:
                if mol is None:
                    reasons.append("MOL2: unparsable or unsanitizable")
        if mol is not None:
            if mol.GetNumAtoms() and mol.GetNumConformers():
                return mol
            reasons.append("MOL2: no atoms or no coordinates")
    elif mol2 is not None:
        reasons.append("MOL2: empty file")
    if not reasons:
        reasons.append("no ligand file")
    raise MoleculeError(item, "unreadable ligand: " + "; ".join(reasons))


def _strip_waters(pdb: str) -> str:
    lines = []
    for line in pdb.splitlines():
        if (
            line.startswith(("ATOM", "HETATM"))
            and line[17:21].strip() in WATER_RESIDUES
        ):
            continue
        lines.append(line)
    return "\n".join(lines) + "\n"


def _partial_sanitize(mol) -> None:
    """Ring info, aromaticity, conjugation and hybridization without valence checks.

    Real pocket files break strict sanitization (cut residues, metals, odd protonation);
    the OGB features only need these properties.
    """
    Chem, _ = _rdkit()
    mol.UpdatePropertyCache(strict=False)
    ops = (
        Chem.SanitizeFlags.SANITIZE_FINDRADICALS
        | Chem.SanitizeFlags.SANITIZE_SETAROMATICITY
        | Chem.SanitizeFlags.SANITIZE_SETCONJUGATION
        | Chem.SanitizeFlags.SANITIZE_SETHYBRIDIZATION
        | Chem.SanitizeFlags.SANITIZE_SYMMRINGS
    )
    Chem.SanitizeMol(mol, ops, catchErrors=True)


def pocket_from_pdb(pdb: str, item: str, keep_waters: bool = False):
    """Pocket (or protein) molecule from a PDB block, hydrogens included, Kekulé form.

    Args:
        pdb: PDB text (``ATOM``/``HETATM`` records; ``CONECT`` used if present).
        item: origin used in error messages.
        keep_waters: keep residues named in :data:`WATER_RESIDUES`.

    Returns:
        ``rdkit.Chem.Mol`` with one conformer; aromatic flags cleared (bonds kekulized
        where possible) so that a cut ring is not left aromatic.

    Raises:
        MoleculeError: empty or unparsable PDB text, or no atoms.
    """
    Chem, rdBase = _rdkit()
    if pdb is None or not pdb.strip():
        raise MoleculeError(item, "empty pocket PDB")
    text = pdb if keep_waters else _strip_waters(pdb)
    with rdBase.BlockLogs():
        try:
            mol = Chem.MolFromPDBBlock(
                text, sanitize=False, removeHs=False, proximityBonding=True
            )
        except Exception as e:  # noqa: BLE001 - malformed blocks may raise
            raise MoleculeError(item, f"unparsable pocket PDB: {e}") from e
        if mol is None:
            raise MoleculeError(
                item, "unparsable pocket PDB (RDKit returned no molecule)"
            )
        if mol.GetNumAtoms() == 0 or mol.GetNumConformers() == 0:
            raise MoleculeError(item, "the pocket PDB has no atoms")
        try:
            Chem.SanitizeMol(mol)
        except (
            Exception
        ):  # noqa: BLE001 - valence/kekulization problems of real pockets
            _partial_sanitize(mol)
        try:
            Chem.Kekulize(mol, clearAromaticFlags=True)
        except Exception:  # noqa: BLE001 - keep the perceived flags; re-perceived later
            pass
    return mol


def select_pocket(pocket, ligand_pos: np.ndarray, cutoff: float) -> np.ndarray:
    """Indices of the pocket's heavy atoms within ``cutoff`` Å of any ligand position.

    Args:
        pocket: ``rdkit.Chem.Mol`` with a conformer.
        ligand_pos: ``[L, 3]`` ligand heavy-atom coordinates in Å.
        cutoff: radius in Å (inclusive).

    Returns:
        int64 ``[P]`` atom indices in increasing order.
    """
    pos = np.asarray(pocket.GetConformer().GetPositions(), dtype=np.float64)  # [M, 3]
    heavy = np.array([a.GetAtomicNum() > 1 for a in pocket.GetAtoms()], dtype=bool)
    lig = np.asarray(ligand_pos, dtype=np.float64).reshape(-1, 3)
    if lig.shape[0] == 0 or pos.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    d2 = ((pos[:, None, :] - lig[None, :, :]) ** 2).sum(-1).min(axis=1)  # [M]
    return np.flatnonzero(heavy & (d2 <= cutoff * cutoff)).astype(np.int64)


def _nearest_heavy(pocket, ligand_pos: np.ndarray) -> float:
    pos = np.asarray(pocket.GetConformer().GetPositions(), dtype=np.float64)
    heavy = np.array([a.GetAtomicNum() > 1 for a in pocket.GetAtoms()], dtype=bool)
    if not heavy.any():
        return float("inf")
    d2 = ((pos[heavy, None, :] - ligand_pos[None, :, :]) ** 2).sum(-1)
    return float(np.sqrt(d2.min()))


def _submol(mol, keep: np.ndarray):
    """Copy of ``mol`` with only the atoms ``keep`` (bonds to removed atoms are cut)."""
    Chem, _ = _rdkit()
    keep_set = set(int(i) for i in keep)
    rw = Chem.RWMol(mol)
    for idx in range(mol.GetNumAtoms() - 1, -1, -1):
        if idx not in keep_set:
            rw.RemoveAtom(idx)
    sub = rw.GetMol()
    for atom in sub.GetAtoms():
        # A cut bond leaves an open valence: fill it with implicit hydrogens (capping).
        atom.SetNoImplicit(False)
        atom.SetNumRadicalElectrons(0)
    _partial_sanitize(sub)
    return sub


def mol_from_complex(
    ligand_sdf: str | None,
    ligand_mol2: str | None,
    pocket_pdb: str | None,
    item: str,
    cutoff: float = 5.0,
    keep_waters: bool = False,
):
    """The ligand plus the pocket heavy atoms within ``cutoff`` Å, as one molecule.

    Args:
        ligand_sdf: SDF text of the ligand, or ``None``.
        ligand_mol2: MOL2 text of the ligand (fallback), or ``None``.
        pocket_pdb: PDB text of the pocket (or protein).
        item: origin used in error messages.
        cutoff: pocket radius in Å (inclusive), > 0.
        keep_waters: keep water oxygens.

    Returns:
        ``rdkit.Chem.Mol`` with one 3D conformer (Å): ``L`` ligand atoms, then ``P``
        pocket atoms; the property ``num_ligand_atoms`` (int) holds ``L``.

    Raises:
        MoleculeError: unreadable ligand or pocket, or no pocket atom within the cutoff.
    """
    Chem, _ = _rdkit()
    if not cutoff > 0:
        raise ValueError(f"cutoff must be > 0 Å, got {cutoff}")
    ligand = ligand_from_blocks(ligand_sdf, ligand_mol2, item)
    pocket = pocket_from_pdb(pocket_pdb, item, keep_waters=keep_waters)
    lig_pos = np.asarray(ligand.GetConformer().GetPositions(), dtype=np.float64)
    keep = select_pocket(pocket, lig_pos, cutoff)
    if keep.size == 0:
        raise MoleculeError(
            item,
            f"no pocket atoms within {cutoff:g} Å of the ligand (nearest pocket heavy atom "
            f"at {_nearest_heavy(pocket, lig_pos):.2f} Å); check that the ligand and the "
            "pocket share a coordinate frame, or raise --cutoff",
        )
    sub = _submol(pocket, keep)
    combined = Chem.CombineMols(ligand, sub)
    combined.GetConformer().Set3D(True)
    combined.SetIntProp("num_ligand_atoms", ligand.GetNumAtoms())
    return combined


def mol_from_complex_payload(text: str, item: str):
    """:func:`mol_from_complex` of a :func:`complex_payload` JSON text (worker entry).

    Raises:
        MoleculeError: a listed file is missing, or :func:`mol_from_complex` fails.
        ValueError: the payload is not a complex payload of this version.
    """
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{item}: the complex record is not JSON ({e})") from e
    if payload.get("version") != _PAYLOAD_VERSION:
        raise ValueError(
            f"{item}: complex payload version {payload.get('version')!r}, "
            f"expected {_PAYLOAD_VERSION}"
        )
    if payload["missing"]:
        raise MoleculeError(item, "missing file(s): " + ", ".join(payload["missing"]))
    return mol_from_complex(
        payload["ligand_sdf"],
        payload["ligand_mol2"],
        payload["pocket_pdb"],
        item,
        cutoff=payload["cutoff"],
        keep_waters=payload["keep_waters"],
    )
