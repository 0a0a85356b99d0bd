"""A tiny fake PDBbind v2016 tree for tests (refined set, index file, CASF core set).

The "protein" is an RDKit peptide (``Chem.MolFromSequence``) with an ETKDG conformer,
written with ``Chem.MolToPDBBlock`` as both ``<id>_pocket.pdb`` and ``<id>_protein.pdb``;
each ligand is a small molecule embedded with a seed and translated next to one peptide
atom. Labels are a deterministic function of the ligand, so a model can fit them.
Also used by ``tests/transformer_m/test_pdbbind_task.py`` (loaded by file path).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PEPTIDE = "GAFKWYDSLE"
LIGANDS = ("c1ccccc1C(=O)N", "CC(=O)Nc1ccc(O)cc1", "OC(=O)CCc1ccccc1", "CCN(CC)CC",
           "c1ccc2[nH]ccc2c1", "NC(=O)C1CCCN1", "CC(C)Cc1ccccc1", "OCC(O)CO")  # fmt: skip
INDEX_HEADER = """\
# ==============================================================================
# List of the protein-ligand complexes in the PDBbind refined set v.2016
# 4057 protein-ligand complexes in total, which are ranked by binding data
# Latest update: Dec 2016
# PDB code, resolution, release year, -logKd/Ki, Kd/Ki, reference, ligand name
# ==============================================================================
"""


@dataclass
class FakePDBbind:
    """What :func:`write_fake_pdbbind` wrote (codes by role, labels by code)."""

    root: Path
    refined: list[str]  # good refined complexes that are not in the core set
    core: list[str]  # good core complexes (also in the refined index and folder)
    labels: dict[str, float]
    far: list[str] = field(default_factory=list)  # ligand 100 Å away: no pocket atoms
    bad_ligand: list[str] = field(default_factory=list)  # unreadable SDF, no MOL2
    mol2_only: list[str] = field(default_factory=list)  # broken SDF, readable MOL2
    no_pocket_file: list[str] = field(default_factory=list)


def peptide_pdb(seed: int = 0) -> tuple[str, np.ndarray]:
    """PDB text of the fake protein and its heavy-atom coordinates ``[M, 3]`` (Å)."""
    pdb, heavy = _peptide_pdb(seed)
    return pdb, heavy.copy()


@functools.lru_cache(maxsize=2)  # ETKDG of the peptide takes about a second
def _peptide_pdb(seed: int) -> tuple[str, np.ndarray]:
    from rdkit import Chem
    from rdkit.Chem import AllChem

    pep = Chem.AddHs(Chem.MolFromSequence(PEPTIDE))
    assert AllChem.EmbedMolecule(pep, randomSeed=seed) == 0
    pos = pep.GetConformer().GetPositions()
    heavy = np.array([a.GetAtomicNum() > 1 for a in pep.GetAtoms()])
    return Chem.MolToPDBBlock(pep), pos[heavy]


def placed_ligand(smiles: str, seed: int, center: np.ndarray):
    """Ligand with hydrogens, embedded with ``seed``, centroid moved to ``center`` (Å)."""
    from rdkit import Chem
    from rdkit.Chem import AllChem

    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    assert AllChem.EmbedMolecule(mol, randomSeed=seed) == 0
    conf = mol.GetConformer()
    pos = conf.GetPositions()
    pos += np.asarray(center) - pos.mean(0)
    for i, p in enumerate(pos):
        conf.SetAtomPosition(i, p.tolist())
    return mol


def label_of(smiles: str) -> float:
    """A learnable stand-in for -logKd/Ki: heavy atoms and heteroatoms of the ligand."""
    from rdkit import Chem

    mol = Chem.MolFromSmiles(smiles)
    hetero = sum(a.GetAtomicNum() != 6 for a in mol.GetAtoms())
    return round(3.0 + 0.3 * mol.GetNumAtoms() + 0.4 * hetero, 2)


_SYBYL = {("C", False): "C.3", ("C", True): "C.ar", ("O", False): "O.3", ("N", False): "N.3",
          ("H", False): "H"}  # fmt: skip


def mol2_block(mol, name: str) -> str:
    """Minimal TRIPOS MOL2 of a non-aromatic C/N/O/H molecule with single bonds."""
    conf = mol.GetConformer()
    lines = ["@<TRIPOS>MOLECULE", name,
             f"{mol.GetNumAtoms()} {mol.GetNumBonds()} 0 0 0", "SMALL", "NO_CHARGES", "",
             "@<TRIPOS>ATOM"]  # fmt: skip
    for a in mol.GetAtoms():
        p = conf.GetAtomPosition(a.GetIdx())
        sym = a.GetSymbol()
        lines.append(
            f"{a.GetIdx() + 1:7d} {sym}{a.GetIdx() + 1:<4d} {p.x:10.4f} {p.y:10.4f} "
            f"{p.z:10.4f} {_SYBYL[(sym, a.GetIsAromatic())]:<6s} 1 LIG 0.0000"
        )
    lines.append("@<TRIPOS>BOND")
    for k, b in enumerate(mol.GetBonds(), 1):
        assert b.GetBondTypeAsDouble() == 1.0
        lines.append(
            f"{k:6d} {b.GetBeginAtomIdx() + 1:5d} {b.GetEndAtomIdx() + 1:5d} 1"
        )
    return "\n".join(lines) + "\n"


def _index_line(code: str, pk: float) -> str:
    return f"{code}  2.00  2010  {pk:5.2f}  Kd={10 ** (9 - pk):.0f}nM  // {code}.pdf (LIG)\n"


def write_fake_pdbbind(
    root: Path,
    n_refined: int = 24,
    n_core: int = 6,
    *,
    with_bad: bool = True,
) -> FakePDBbind:
    """Write ``root/refined-set/...`` and ``root/coreset/...`` in the v2016 layout.

    Core complexes appear in the refined index and folder too (as in v2016). With
    ``with_bad``, the refined pool also holds one complex of each failure kind (far
    ligand, unreadable ligand, missing pocket file) and one MOL2-only ligand; the core
    set holds one far ligand.
    """
    from rdkit import Chem

    pdb, heavy = peptide_pdb()
    refined_dir = root / "refined-set"
    core_dir = root / "coreset"
    (refined_dir / "index").mkdir(parents=True)
    core_dir.mkdir(parents=True)
    fake = FakePDBbind(root, [], [], {})
    n_total = n_refined + n_core + (5 if with_bad else 0)
    index = [INDEX_HEADER]
    for i in range(n_total):
        code = f"{1 + i // 100}x{i % 100:02d}"
        smiles = LIGANDS[i % len(LIGANDS)]
        center = heavy[(7 * i) % len(heavy)] + np.array([0.0, 0.0, 2.5])
        role = (
            "refined" if i < n_refined else "core" if i < n_refined + n_core else None
        )
        if role is None:
            role = ("far", "bad_ligand", "no_pocket_file", "mol2_only", "core_far")[
                i - n_refined - n_core
            ]
        if role == "mol2_only":
            smiles = "CCOCCN"
        if role in ("far", "core_far"):
            center = center + 100.0
        lig = placed_ligand(smiles, seed=i, center=center)
        pk = label_of(smiles)
        dirs = [refined_dir / code] + (
            [core_dir / code] if role in ("core", "core_far") else []
        )
        for d in dirs:
            d.mkdir()
            sdf = Chem.MolToMolBlock(lig) + "$$$$\n"
            if role == "bad_ligand":
                sdf = (
                    "garbage\n\n\n  3  2  0  0  0  0  0  0  0  0999 V2000\nnot a mol\n"
                )
            if role == "mol2_only":
                sdf = sdf.replace("V2000", "V2OOO")  # unreadable counts line
                (d / f"{code}_ligand.mol2").write_text(mol2_block(lig, code))
            (d / f"{code}_ligand.sdf").write_text(sdf)
            if role != "no_pocket_file":
                (d / f"{code}_pocket.pdb").write_text(pdb)
                (d / f"{code}_protein.pdb").write_text(pdb)
        index.append(_index_line(code, pk))
        fake.labels[code] = pk
        if role == "core_far":
            fake.far.append(code)
        else:
            getattr(fake, role).append(code)
    (refined_dir / "index" / "INDEX_refined_data.2016").write_text("".join(index))
    return fake
