"""Fixtures for the Transformer-M plugin tests.

``e2e_*`` fixtures (end-to-end training, ``test_train_e2e.py``): tiny LMDB splits built in
code from a fixed list of SMILES, with RDKit ETKDG conformers (seeded) for the 3D train
split. Labels are a deterministic function of the molecule (in "eV"), so a model can fit
them. Other fixture families in this file use their own prefixes.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from suite_env import subprocess_env

# --- e2e: fixture data ------------------------------------------------------------------
_E2E_CORES = ("C", "CC", "CCC", "CCCC", "CC(C)C", "C1CCCC1", "c1ccccc1", "C1CCOC1")
_E2E_TAILS = ("", "O", "N", "F", "C(=O)O", "C#N", "OC", "C(N)=O", "Cl", "C=O")
E2E_TRAIN_SIZE = 64
E2E_VALID_SIZE = 16


def _e2e_smiles() -> list[str]:
    """80 distinct small molecules: every core with every tail (deterministic order)."""
    from rdkit import Chem

    seen, out = set(), []
    for tail in _E2E_TAILS:
        for core in _E2E_CORES:
            smi = Chem.MolToSmiles(Chem.MolFromSmiles(core + tail))
            if smi not in seen:
                seen.add(smi)
                out.append(smi)
    return out


def _e2e_label(mol) -> float:
    """A learnable stand-in for the HOMO-LUMO gap (eV): heavy atoms, heteroatoms, aromaticity."""
    n = mol.GetNumAtoms()
    hetero = sum(a.GetAtomicNum() not in (6, 1) for a in mol.GetAtoms())
    aromatic = sum(a.GetIsAromatic() for a in mol.GetAtoms())
    return 4.0 + 0.25 * n + 0.5 * hetero - 0.2 * aromatic


def _e2e_record(smiles: str, seed: int, with_pos: bool) -> dict:
    from rdkit import Chem
    from rdkit.Chem import AllChem

    from graphormer_ext.featurize.graph import graph_to_record
    from graphormer_ext.featurize.ogb_features import mol_to_graph

    mol = Chem.MolFromSmiles(smiles)
    pos = None
    if with_pos:
        mol_h = Chem.AddHs(mol)
        if AllChem.EmbedMolecule(mol_h, randomSeed=seed) != 0:
            raise RuntimeError(f"ETKDG failed for {smiles}")
        mol = Chem.RemoveHs(mol_h)
        pos = mol.GetConformer().GetPositions()  # [N, 3], Å
    g = mol_to_graph(mol, smiles)
    return graph_to_record(
        g["node_feat"], g["edge_index"], g["edge_attr"], pos=pos, y=[_e2e_label(mol)]
    )


def _e2e_write(path: Path, smiles: list[str], with_pos: bool, seed0: int) -> Path:
    from graphormer_ext.data.lmdb_writer import write_split

    records = [_e2e_record(s, seed0 + i, with_pos) for i, s in enumerate(smiles)]
    write_split(path, records, split=path.stem, workers=1, progress=False)
    return path


@pytest.fixture(scope="session")
def e2e_smiles() -> list[str]:
    """The fixture molecules: ``E2E_TRAIN_SIZE`` train then ``E2E_VALID_SIZE`` valid."""
    pytest.importorskip("rdkit")
    smiles = _e2e_smiles()
    assert len(smiles) >= E2E_TRAIN_SIZE + E2E_VALID_SIZE
    return smiles[: E2E_TRAIN_SIZE + E2E_VALID_SIZE]


@pytest.fixture(scope="session")
def e2e_data_3d(tmp_path_factory, e2e_smiles) -> Path:
    """``train.lmdb`` with conformers (64 molecules) and a 2D-only ``valid.lmdb`` (16)."""
    root = tmp_path_factory.mktemp("e2e_data_3d")
    _e2e_write(root / "train.lmdb", e2e_smiles[:E2E_TRAIN_SIZE], True, 0)
    _e2e_write(root / "valid.lmdb", e2e_smiles[E2E_TRAIN_SIZE:], False, 0)
    return root


@pytest.fixture(scope="session")
def e2e_data_2d(tmp_path_factory, e2e_smiles) -> Path:
    """The same molecules with no positions in any split."""
    root = tmp_path_factory.mktemp("e2e_data_2d")
    _e2e_write(root / "train.lmdb", e2e_smiles[:E2E_TRAIN_SIZE], False, 0)
    _e2e_write(root / "valid.lmdb", e2e_smiles[E2E_TRAIN_SIZE:], False, 0)
    return root


@pytest.fixture(scope="session")
def e2e_env() -> dict:
    """Environment for fairseq subprocesses: this checkout's code, quiet, single-threaded, no
    GPU (``tests/suite_env.py``)."""
    return subprocess_env()
