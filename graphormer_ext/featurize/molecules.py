"""RDKit adapters: SMILES, MOL or XYZ text -> sanitized RDKit ``Mol``; SDF streaming.

Every parser raises :class:`~graphormer_ext.sources.base.MoleculeError` with the item
and a reason; RDKit's own log output is blocked while parsing, because a failure is
reported through the exception instead. RDKit is imported lazily so that the rest of
``graphormer_ext`` works without it.
"""
from __future__ import annotations

import gzip
import io
import logging
import re
import tarfile
from collections import Counter
from pathlib import Path
from typing import Iterator

import numpy as np

from graphormer_ext.sources.base import MoleculeError, SourceError

logger = logging.getLogger(__name__)

_SDF_END = re.compile(r"^\$\$\$\$[^\n]*(\n|$)", re.M)
_CHUNK_CHARS = 1 << 20
# whitespace ends a SMILES for RDKit (the rest is a name) and NUL ends its C string
_NOT_SMILES = re.compile(r"[\s\x00-\x1f\x7f]")


def _rdkit():
    from rdkit import Chem, rdBase

    return Chem, rdBase


def mol_from_smiles(smiles: str, item: str):
    """Parse and sanitize a SMILES string (RDKit defaults, as in OGB's smiles2graph).

    Args:
        smiles: the SMILES string.
        item: origin used in error messages.

    Returns:
        ``rdkit.Chem.Mol`` with implicit hydrogens, in SMILES atom order.

    Raises:
        MoleculeError: empty or unparsable SMILES, whitespace or a control character
            inside the SMILES, or a molecule without atoms.
    """
    Chem, rdBase = _rdkit()
    if smiles is None or not str(smiles).strip():
        raise MoleculeError(item, "empty SMILES")
    inner = _NOT_SMILES.search(str(smiles).strip())
    if inner is not None:
        # RDKit reads text after whitespace as the molecule's name: "CC O" is ethane
        kind = "whitespace" if inner.group().isspace() else "a control character"
        raise MoleculeError(
            item,
            f"SMILES {smiles!r} contains {kind}; RDKit would read only the text "
            "before it (and take the rest as a name). Remove it, or move a name to "
            "its own column",
        )
    with rdBase.BlockLogs():
        mol = Chem.MolFromSmiles(str(smiles).strip())
    if mol is None:
        raise MoleculeError(
            item, f"unparsable SMILES {smiles!r} (RDKit cannot parse or sanitize it)"
        )
    if mol.GetNumAtoms() == 0:
        raise MoleculeError(item, f"empty molecule: SMILES {smiles!r} has no atoms")
    return mol


def mol_from_molblock(block: str, item: str, remove_hs: bool = True):
    """Parse and sanitize one MOL block (SDF record), keeping conformer and atom order.

    Equivalent to one record of ``Chem.SDMolSupplier(path, sanitize=True,
    removeHs=remove_hs)``; data fields after ``M  END`` are ignored.

    Args:
        block: the MOL block text (SDF data fields and the ``$$$$`` line may be
            included).
        item: origin used in error messages.
        remove_hs: drop hydrogens (heavy-atom order is unchanged).

    Returns:
        ``rdkit.Chem.Mol`` with the block's conformer.

    Raises:
        MoleculeError: an empty or unparsable block (bad counts line, non-numeric or NaN
            coordinates, valence errors, ...), or a molecule without atoms.
    """
    Chem, rdBase = _rdkit()
    if block is None or not block.strip():
        raise MoleculeError(item, "empty MOL block")
    with rdBase.BlockLogs():
        try:
            mol = Chem.MolFromMolBlock(block, sanitize=True, removeHs=remove_hs)
        except Exception as e:  # some malformed blocks raise instead of returning None
            raise MoleculeError(item, f"unparsable MOL block: {e}") from e
    if mol is None:
        raise MoleculeError(
            item,
            "unparsable MOL block (bad counts/atom/bond lines, non-numeric or NaN "
            "coordinates, or a sanitization error such as a bad valence)",
        )
    if mol.GetNumAtoms() == 0:
        raise MoleculeError(item, "empty molecule: the MOL block has no (heavy) atoms")
    return mol


def _graph_key(mol) -> str:
    """Canonical heavy-atom SMILES without stereo: bond graph, elements and charges."""
    Chem, _ = _rdkit()
    return Chem.MolToSmiles(Chem.RemoveAllHs(mol), isomericSmiles=False)



def _single_bond_skeleton(mol):
    """Copy of ``mol`` with every bond single and no aromaticity, charge or H flags: the bare
    connectivity, for matching a bond graph against distance-based connectivity."""
    Chem, _ = _rdkit()
    g = Chem.RWMol(mol)
    for bond in g.GetBonds():
        bond.SetBondType(Chem.BondType.SINGLE)
        bond.SetIsAromatic(False)
    for atom in g.GetAtoms():
        atom.SetIsAromatic(False)
        atom.SetFormalCharge(0)
        atom.SetNoImplicit(True)
        atom.SetNumExplicitHs(0)
    g.UpdatePropertyCache(strict=False)
    Chem.FastFindRings(g)
    return g.GetMol()


def _template_with_geometry(raw, template, charge: int):
    """The template's own bond graph with coordinates taken from the XYZ geometry, in XYZ order.

    For strained cages, distance-based connectivity adds bonds that no bond-order assignment
    can satisfy, but the true graph is still a subgraph of it. The template (with hydrogens
    when the XYZ has them) is matched as a subgraph of that connectivity; among the matches,
    the one whose template bonds are shortest in the geometry is used (a false "bond" across a
    cage is longer than a real one). Stereo is then assigned from the coordinates.

    Raises:
        ValueError: atom counts differ, or the template graph is not a subgraph.
    """
    Chem, _ = _rdkit()
    from rdkit.Chem import rdDetermineBonds

    conn = Chem.Mol(raw)
    rdDetermineBonds.DetermineConnectivity(conn, charge=charge)
    has_h = any(a.GetAtomicNum() == 1 for a in conn.GetAtoms())
    reference = Chem.AddHs(template) if has_h else Chem.Mol(template)
    if reference.GetNumAtoms() != conn.GetNumAtoms():
        raise ValueError(
            f"template has {reference.GetNumAtoms()} atoms, the geometry {conn.GetNumAtoms()}"
        )
    matches = _single_bond_skeleton(conn).GetSubstructMatches(
        _single_bond_skeleton(reference), uniquify=False, maxMatches=2000
    )
    if not matches:
        raise ValueError("the template graph is not a subgraph of the geometry's connectivity")
    xyz = raw.GetConformer().GetPositions()
    ends = np.array([(b.GetBeginAtomIdx(), b.GetEndAtomIdx()) for b in reference.GetBonds()])

    def bond_length_sum(match):
        m = np.asarray(match)
        if len(ends) == 0:
            return 0.0
        return float(np.linalg.norm(xyz[m[ends[:, 0]]] - xyz[m[ends[:, 1]]], axis=1).sum())

    match = min(matches, key=bond_length_sum)  # match[t] = XYZ index of template atom t
    order = sorted(range(len(match)), key=lambda t: match[t])
    mol = Chem.RenumberAtoms(reference, order)  # new atom k = XYZ atom k
    conf = Chem.Conformer(mol.GetNumAtoms())
    for k in range(mol.GetNumAtoms()):
        conf.SetAtomPosition(k, xyz[k].tolist())
    mol.RemoveAllConformers()
    mol.AddConformer(conf, assignId=True)
    Chem.AssignStereochemistryFrom3D(mol)
    return mol

def mol_from_xyz(
    xyz_block: str,
    item: str,
    charge: int = 0,
    template_smiles: str | None = None,
    remove_hs: bool = True,
):
    """Molecule with bonds from an XYZ block (coordinates in Å), in the XYZ atom order.

    Bonds come from ``rdDetermineBonds.DetermineBonds(charge=charge)``. If that fails,
    or its graph differs from ``template_smiles`` (compared as canonical heavy-atom
    SMILES without stereo), the fallback is ``DetermineConnectivity`` followed by
    ``AllChem.AssignBondOrdersFromTemplate``. This recovers about 93% of QM9 (data spec
    §2.3). For the rest, strained cages where distance-based connectivity adds bonds, the
    template's own graph is matched as a subgraph of that connectivity and takes the XYZ
    coordinates (:func:`_template_with_geometry`).

    Args:
        xyz_block: ``N``, a comment line, then ``N`` lines ``element x y z``.
        item: origin used in error messages.
        charge: total charge of the molecule.
        template_smiles: SMILES whose graph the result must match; ``None`` accepts the
            perceived bonds.
        remove_hs: drop hydrogens after bond perception (heavy-atom order is unchanged).

    Returns:
        sanitized ``rdkit.Chem.Mol`` with the XYZ conformer.

    Raises:
        MoleculeError: unparsable XYZ, an unparsable template, or bonds that cannot be
            perceived or do not match the template.
    """
    Chem, rdBase = _rdkit()
    from rdkit.Chem import AllChem, rdDetermineBonds

    if xyz_block is None or not xyz_block.strip():
        raise MoleculeError(item, "empty XYZ block")
    with rdBase.BlockLogs():
        try:
            raw = Chem.MolFromXYZBlock(xyz_block)
        except Exception:  # some malformed blocks raise instead of returning None
            raw = None
        if raw is None:
            raise MoleculeError(
                item,
                "unparsable XYZ block (expected a count line, a comment line, then "
                "'element x y z' lines)",
            )
        if raw.GetNumAtoms() == 0:
            raise MoleculeError(item, "empty molecule: the XYZ block has no atoms")
        template = None
        if template_smiles is not None:
            template = Chem.MolFromSmiles(template_smiles)
            if template is None:
                raise MoleculeError(
                    item, f"unparsable template SMILES {template_smiles!r}"
                )
            template_key = _graph_key(template)

        failures = []
        mol = Chem.Mol(raw)
        try:
            rdDetermineBonds.DetermineBonds(mol, charge=charge)
            Chem.SanitizeMol(mol)
            if template is None or _graph_key(mol) == template_key:
                return Chem.RemoveAllHs(mol) if remove_hs else mol
            failures.append(
                f"DetermineBonds gave {_graph_key(mol)!r}, template is {template_key!r}"
            )
        except Exception as e:  # ValueError/RuntimeError: no valid bond orders
            failures.append(f"DetermineBonds failed ({e})")

        if template is None:
            raise MoleculeError(
                item,
                "bond perception failed: "
                + "; ".join(failures)
                + " (pass template_smiles to enable the template fallback)",
            )
        mol = Chem.Mol(raw)
        try:
            rdDetermineBonds.DetermineConnectivity(mol, charge=charge)
            # Match with explicit hydrogens when the XYZ has them: removing them from
            # the connectivity-only molecule first would lose the heavy atoms' H counts.
            has_h = any(a.GetAtomicNum() == 1 for a in mol.GetAtoms())
            reference = Chem.AddHs(template) if has_h else template
            if not has_h:  # heavy-atom-only XYZ: sanitization adds implicit hydrogens
                for atom in mol.GetAtoms():
                    atom.SetNoImplicit(False)
            assigned = AllChem.AssignBondOrdersFromTemplate(reference, mol)
            Chem.SanitizeMol(assigned)
            Chem.AssignStereochemistryFrom3D(assigned)
            if _graph_key(assigned) == template_key:
                return Chem.RemoveAllHs(assigned) if remove_hs else assigned
            failures.append(f"template fallback gave {_graph_key(assigned)!r}")
        except Exception as e:  # no substructure match, valence errors
            failures.append(f"template fallback failed ({e})")
        try:
            mapped = _template_with_geometry(raw, template, charge)
            if _graph_key(mapped) == template_key:
                return Chem.RemoveAllHs(mapped) if remove_hs else mapped
            failures.append(f"template mapping gave {_graph_key(mapped)!r}")
        except Exception as e:
            failures.append(f"template mapping failed ({e})")
    raise MoleculeError(
        item,
        "XYZ bond perception does not reproduce the template: " + "; ".join(failures),
    )


def positions(mol, item: str = "molecule") -> np.ndarray:
    """Coordinates of the molecule's first conformer.

    Args:
        mol: ``rdkit.Chem.Mol`` with a conformer.
        item: origin used in error messages.

    Returns:
        float32 ``[N, 3]`` in Å.

    Raises:
        MoleculeError: no conformer, NaN/inf coordinates, all coordinates zero (for N >
            1), or a 2D conformer (all z = 0 and the MOL header does not say 3D).
    """
    if mol.GetNumConformers() == 0:
        raise MoleculeError(
            item, "no conformer: 3D positions requested but the molecule has none"
        )
    conf = mol.GetConformer()
    pos = np.asarray(conf.GetPositions(), dtype=np.float64).reshape(-1, 3)
    if not np.isfinite(pos).all():
        raise MoleculeError(item, "NaN or inf coordinates")
    n = pos.shape[0]
    if n > 1 and not pos.any():
        raise MoleculeError(
            item, "all coordinates are zero (a placeholder, not a 3D structure)"
        )
    if n > 1 and not conf.Is3D() and not pos[:, 2].any():
        raise MoleculeError(
            item,
            "2D conformer (flat depiction, z = 0): read this file as 2D (use_3d=False)",
        )
    return pos.astype(np.float32)


def heavy_formula(mol) -> str:
    """Heavy-atom formula (hydrogens ignored, charges ignored), for alignment checks.

    Args:
        mol: ``rdkit.Chem.Mol`` (sanitized or not).

    Returns:
        e.g. ``"C6N1O2"``: element symbols sorted with C first, then alphabetically,
        each with its count.
    """
    counts = Counter(a.GetSymbol() for a in mol.GetAtoms() if a.GetAtomicNum() != 1)
    order = sorted(counts, key=lambda s: (s != "C", s))
    return "".join(f"{s}{counts[s]}" for s in order)


def smiles_heavy_formula(smiles: str, item: str) -> str:
    """:func:`heavy_formula` of a SMILES string, parsed without sanitization (fast).

    Raises:
        MoleculeError: an unparsable SMILES.
    """
    Chem, rdBase = _rdkit()
    with rdBase.BlockLogs():
        mol = Chem.MolFromSmiles(smiles, sanitize=False) if smiles else None
    if mol is None:
        raise MoleculeError(item, f"unparsable check SMILES {smiles!r}")
    return heavy_formula(mol)


def _open_sdf_text(path: Path):
    """Text stream (context manager) of .sdf, .sdf.gz or a tar holding one .sdf."""
    name = path.name.lower()
    if name.endswith((".tar.gz", ".tgz", ".tar")):
        return _TarSdf(path)
    if name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="replace", newline=None)
    return open(path, "rt", encoding="utf-8", errors="replace", newline=None)


class _ForwardOnly(io.RawIOBase):
    """Non-seekable raw view of a streamed tar member (TextIOWrapper asks seekable)."""

    def __init__(self, fileobj):
        self._f = fileobj

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._f.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class _TarSdf:
    """Streams the one ``.sdf`` member of a tar archive, without extracting it."""

    def __init__(self, path: Path):
        self.path = path
        self.tar = None

    def __enter__(self):
        self.tar = tarfile.open(self.path, mode="r|*")
        for member in iter(self.tar.next, None):
            if member.isfile() and member.name.lower().endswith(".sdf"):
                self.member = member.name
                member_file = _ForwardOnly(self.tar.extractfile(member))
                raw = io.BufferedReader(member_file, _CHUNK_CHARS)
                return io.TextIOWrapper(
                    raw, encoding="utf-8", errors="replace", newline=None
                )
        raise SourceError(f"{self.path}: no .sdf file inside the archive")

    def __exit__(self, *exc):
        if exc[0] is None:
            # A second .sdf member would make the record order ambiguous (tar.next()
            # continues after the member just read).
            for member in iter(self.tar.next, None):
                if member.isfile() and member.name.lower().endswith(".sdf"):
                    self.tar.close()
                    raise SourceError(
                        f"{self.path}: more than one .sdf inside the archive "
                        f"({self.member!r}, {member.name!r}); extract the one to use"
                    )
        self.tar.close()
        return False


def iter_sdf(path) -> Iterator[str]:
    """Stream an SDF file's records as MOL-block text in file order, never extracting.

    Reads ``.sdf``, ``.sdf.gz`` and tar archives (``.tar.gz``, ``.tgz``, ``.tar``) that
    hold exactly one ``.sdf`` member, such as the official
    ``pcqm4m-v2-train.sdf.tar.gz``. Record ``i`` is the text before the ``i``-th
    ``$$$$`` line (data fields included), matching ``Chem.SDMolSupplier`` record
    numbering; trailing text without ``$$$$`` counts as a last record unless it is
    blank.

    Args:
        path: the file.

    Yields:
        one MOL block per record (``str``, ``\\n`` line ends).

    Raises:
        SourceError: a missing file, or an archive without exactly one ``.sdf``.
    """
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"SDF file not found: {path}")
    with _open_sdf_text(path) as f:
        buf = ""
        while True:
            chunk = f.read(_CHUNK_CHARS)
            at_eof = not chunk
            buf += chunk
            start = 0
            for m in _SDF_END.finditer(buf):
                if not m.group(1) and not at_eof:
                    break  # "$$$$" at the very end of the buffer: its line may continue
                yield buf[start : m.start()]
                start = m.end()
            buf = buf[start:]
            if at_eof:
                break
        if buf.strip():
            yield buf
