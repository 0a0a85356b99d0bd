"""OGB's 9 atom and 3 bond features, array-identical to ``ogb.utils.smiles2graph``.

The vocabularies are the ones of ``ogb.utils.features.allowable_features`` (ogb 1.3.x):
a value outside a list maps to the list's last index ("misc"). Bond stereo has no "misc"
entry in OGB, so a stereo label that OGB does not know (RDKit's atropisomer labels)
makes OGB raise; we raise :class:`MoleculeError` instead.

RDKit enum values are mapped through small lookup tables keyed by the enum's integer
value (built on first use), so no ``list.index`` or ``str()`` runs per atom. ``ogb``
itself is never imported.
"""
from __future__ import annotations

import numpy as np

from graphormer_ext.sources.base import MoleculeError

#: Bump whenever the produced arrays could change for the same RDKit molecule.
FEATURIZER_VERSION = "ogb-1.3.6-smiles2graph/1"

ATOM_FEATURE_NAMES = (
    "atomic_num",
    "chirality",
    "degree",
    "formal_charge",
    "num_h",
    "num_radical_e",
    "hybridization",
    "is_aromatic",
    "is_in_ring",
)
BOND_FEATURE_NAMES = ("bond_type", "bond_stereo", "is_conjugated")
ATOM_FEATURE_DIMS = (119, 5, 12, 12, 10, 6, 6, 2, 2)
BOND_FEATURE_DIMS = (5, 6, 2)

# OGB's named vocabularies (the "misc" slot is the index after the last name).
_CHIRALITY = (
    "CHI_UNSPECIFIED",
    "CHI_TETRAHEDRAL_CW",
    "CHI_TETRAHEDRAL_CCW",
    "CHI_OTHER",
)
_HYBRIDIZATION = ("SP", "SP2", "SP3", "SP3D", "SP3D2")
_BOND_TYPE = ("SINGLE", "DOUBLE", "TRIPLE", "AROMATIC")
_BOND_STEREO = (
    "STEREONONE",
    "STEREOZ",
    "STEREOE",
    "STEREOCIS",
    "STEREOTRANS",
    "STEREOANY",
)
_NO_INDEX = -1  # bond stereo labels OGB cannot encode

# Integer vocabularies of atom features 0, 2, 3, 4, 5 (atomic_num, degree, formal_charge,
# num_h, num_radical_e): value v -> v - lo for lo <= v <= hi, else misc = hi - lo + 1.
_INT_COLUMNS = np.array([0, 2, 3, 4, 5])
_INT_LO = np.array([1, 0, -5, 0, 0], dtype=np.int64)
_INT_HI = np.array([118, 10, 5, 8, 4], dtype=np.int64)

_TABLES: dict | None = None


def _enum_table(enum_type, names: tuple[str, ...], missing: int) -> np.ndarray:
    """Lookup table ``int(enum value) -> OGB index`` for one RDKit enum type."""
    values = enum_type.values  # {int: enum}
    table = np.full(max(values) + 1, missing, dtype=np.int64)
    position = {name: i for i, name in enumerate(names)}
    for key, value in values.items():
        table[key] = position.get(str(value), missing)
    return table


def _tables() -> dict:
    global _TABLES
    if _TABLES is None:
        from rdkit import Chem

        _TABLES = {
            "chirality": _enum_table(Chem.ChiralType, _CHIRALITY, len(_CHIRALITY)),
            "hybridization": _enum_table(
                Chem.HybridizationType, _HYBRIDIZATION, len(_HYBRIDIZATION)
            ),
            "bond_type": _enum_table(Chem.BondType, _BOND_TYPE, len(_BOND_TYPE)),
            "bond_stereo": _enum_table(Chem.BondStereo, _BOND_STEREO, _NO_INDEX),
        }
    return _TABLES


def atom_features(mol) -> np.ndarray:
    """OGB atom features of every atom of an RDKit molecule.

    Args:
        mol: a sanitized ``rdkit.Chem.Mol``.

    Returns:
        int64 array ``[N, 9]`` in the order of :data:`ATOM_FEATURE_NAMES`; raw OGB
        indices (no offsets).
    """
    tables = _tables()
    # GetAtomWithIdx is cheaper than iterating mol.GetAtoms() (a Python-level wrapper).
    n = mol.GetNumAtoms()
    atoms = [mol.GetAtomWithIdx(i) for i in range(n)]
    if n == 0:
        return np.zeros((0, len(ATOM_FEATURE_DIMS)), dtype=np.int64)
    raw = np.array(
        [
            (
                a.GetAtomicNum(),
                a.GetChiralTag(),
                a.GetTotalDegree(),
                a.GetFormalCharge(),
                a.GetTotalNumHs(),
                a.GetNumRadicalElectrons(),
                a.GetHybridization(),
                a.GetIsAromatic(),
                a.IsInRing(),
            )
            for a in atoms
        ],
        dtype=np.int64,
    )  # [N, 9]
    out = raw.copy()  # is_aromatic and is_in_ring are already 0/1
    ints = raw[:, _INT_COLUMNS]
    out[:, _INT_COLUMNS] = np.where(
        (ints >= _INT_LO) & (ints <= _INT_HI), ints - _INT_LO, _INT_HI - _INT_LO + 1
    )
    out[:, 1] = tables["chirality"][raw[:, 1]]
    out[:, 6] = tables["hybridization"][raw[:, 6]]
    return out


def bond_features(mol, item: str = "molecule") -> tuple[np.ndarray, np.ndarray]:
    """Bond list and OGB bond features of a molecule, one row per bond in RDKit order.

    Args:
        mol: a sanitized ``rdkit.Chem.Mol``.
        item: origin used in error messages.

    Returns:
        ``(pairs, features)``: int64 ``[B, 2]`` (begin, end atom) and int64 ``[B, 3]``
        in the order of :data:`BOND_FEATURE_NAMES`.

    Raises:
        MoleculeError: a bond stereo label outside OGB's vocabulary.
    """
    tables = _tables()
    bonds = [mol.GetBondWithIdx(i) for i in range(mol.GetNumBonds())]
    if not bonds:
        return np.zeros((0, 2), dtype=np.int64), np.zeros((0, 3), dtype=np.int64)
    raw = np.array(
        [
            (
                b.GetBeginAtomIdx(),
                b.GetEndAtomIdx(),
                b.GetBondType(),
                b.GetStereo(),
                b.GetIsConjugated(),
            )
            for b in bonds
        ],
        dtype=np.int64,
    )  # [B, 5]
    feats = np.empty((len(bonds), 3), dtype=np.int64)
    feats[:, 0] = tables["bond_type"][raw[:, 2]]
    feats[:, 1] = tables["bond_stereo"][raw[:, 3]]
    feats[:, 2] = raw[:, 4]
    bad = np.flatnonzero(feats[:, 1] == _NO_INDEX)
    if bad.size:
        stereo = bonds[int(bad[0])].GetStereo()
        raise MoleculeError(
            item,
            f"bond stereo {stereo} is outside OGB's vocabulary {list(_BOND_STEREO)} "
            "(ogb.utils.smiles2graph raises on it too)",
        )
    return raw[:, :2].copy(), feats


def mol_to_graph(mol, item: str = "molecule") -> dict[str, np.ndarray]:
    """OGB graph of an RDKit molecule: the arrays of ``ogb.utils.smiles2graph``.

    Args:
        mol: a sanitized ``rdkit.Chem.Mol`` (atom order is kept).
        item: origin used in error messages.

    Returns:
        ``node_feat`` int64 ``[N, 9]``, ``edge_index`` int64 ``[2, E]`` and
        ``edge_attr`` int64 ``[E, 3]`` with ``E = 2 * num_bonds``: bond ``k`` gives
        edges ``2k`` (begin -> end) and ``2k + 1`` (end -> begin), as in OGB.

    Raises:
        MoleculeError: a bond stereo label outside OGB's vocabulary.
    """
    node_feat = atom_features(mol)
    pairs, feats = bond_features(mol, item)
    num_edges = 2 * len(pairs)
    edge_index = np.empty((2, num_edges), dtype=np.int64)
    edge_index[0, 0::2] = pairs[:, 0]
    edge_index[1, 0::2] = pairs[:, 1]
    edge_index[0, 1::2] = pairs[:, 1]
    edge_index[1, 1::2] = pairs[:, 0]
    edge_attr = np.repeat(feats, 2, axis=0)
    return {"node_feat": node_feat, "edge_index": edge_index, "edge_attr": edge_attr}
