"""OGB features, RDKit adapters and the per-record featurize pipeline."""
import importlib.util
import os

import numpy as np
import pytest

Chem = pytest.importorskip("rdkit.Chem")
from rdkit import RDConfig, rdBase  # noqa: E402
from rdkit.Chem import AllChem  # noqa: E402

from graphormer_ext.data import keys  # noqa: E402
from graphormer_ext.featurize import molecules, ogb_features  # noqa: E402
from graphormer_ext.featurize.ogb_features import (  # noqa: E402
    ATOM_FEATURE_DIMS,
    BOND_FEATURE_DIMS,
    mol_to_graph,
)
from graphormer_ext.featurize.pipeline import featurize_record  # noqa: E402
from graphormer_ext.sources.base import MoleculeError, SourceError, SourceRecord  # noqa: E402

HAVE_GRAPH = importlib.util.find_spec("graphormer_ext.featurize.graph") is not None
needs_graph = pytest.mark.skipif(not HAVE_GRAPH, reason="featurize/graph.py not present yet")

# Edge cases of the OGB vocabularies: dummy atom (misc atomic number), radicals, charges, stereo
# bonds and centres, isotopes, salts, aromatic heterocycles, hypervalent atoms, metals.
HAND_SMILES = [
    "Cl[C@H](/C=C/C)Br",
    "*C",
    "[C]",
    "[CH3]",
    "[Fe+3]",
    "[O-][N+](=O)c1ccccc1",
    "C[S@@](=O)CC",
    "F/C=C\\F",
    "[2H]C([2H])[2H]",
    "CC(=O)[O-].[Na+]",
    "c1ccc2[nH]ccc2c1",
    "OS(=O)(=O)O",
    "F[P-](F)(F)(F)(F)F",
    "C#N",
    "[NH4+]",
    "C",
    "C[Fe@TB1](F)(Cl)(Br)I",  # chirality outside OGB's list -> misc
    "c1ccccc1[Os](F)(F)(F)(F)(F)(F)(F)(F)(F)(F)F",  # degree 11 -> misc
]


def _nci_smiles(limit):
    path = os.path.join(RDConfig.RDDataDir, "NCI", "first_5K.smi")
    out = []
    with open(path) as f, rdBase.BlockLogs():
        for line in f:
            smi = line.split()[0]
            if Chem.MolFromSmiles(smi) is not None:
                out.append(smi)
            if len(out) == limit:
                break
    return out


def _assert_same_as_ogb(smiles, ogb_graph):
    ours = mol_to_graph(Chem.MolFromSmiles(smiles))
    for mine, theirs in (
        (ours["node_feat"], ogb_graph["node_feat"]),
        (ours["edge_index"], ogb_graph["edge_index"]),
        (ours["edge_attr"], ogb_graph["edge_feat"]),
    ):
        assert mine.dtype == theirs.dtype == np.int64, smiles
        assert mine.shape == theirs.shape, smiles
        np.testing.assert_array_equal(mine, theirs, err_msg=smiles)


def test_dims_match_ogb():
    features = pytest.importorskip("ogb.utils.features")
    assert list(ATOM_FEATURE_DIMS) == features.get_atom_feature_dims()
    assert list(BOND_FEATURE_DIMS) == features.get_bond_feature_dims()
    assert isinstance(ogb_features.FEATURIZER_VERSION, str)


def test_matches_ogb_smiles2graph_on_nci():
    ogb_utils = pytest.importorskip("ogb.utils")
    smiles = _nci_smiles(1200)
    assert len(smiles) == 1200
    for smi in smiles:
        _assert_same_as_ogb(smi, ogb_utils.smiles2graph(smi))


def test_matches_ogb_on_edge_cases():
    ogb_utils = pytest.importorskip("ogb.utils")
    for smi in HAND_SMILES:
        _assert_same_as_ogb(smi, ogb_utils.smiles2graph(smi))


def test_out_of_vocabulary_integers_match_ogb():
    features = pytest.importorskip("ogb.utils.features")
    mol = Chem.RWMol(Chem.MolFromSmiles("CC"))
    mol.GetAtomWithIdx(0).SetFormalCharge(7)  # charge outside [-5, 5]
    mol.GetAtomWithIdx(0).SetNumRadicalElectrons(6)  # radicals outside [0, 4]
    mol.GetAtomWithIdx(1).SetFormalCharge(-6)
    mol.GetAtomWithIdx(1).SetNumExplicitHs(12)  # numH outside [0, 8]
    mol.UpdatePropertyCache(strict=False)
    got = ogb_features.atom_features(mol)
    want = [features.atom_to_feature_vector(a) for a in mol.GetAtoms()]
    assert got.tolist() == want
    assert got[0, 3] == 11 and got[0, 5] == 5 and got[1, 3] == 11 and got[1, 4] == 9


def test_hand_checked_features():
    # ogb/utils/features.py documents this chiral carbon and this stereo double bond.
    g = mol_to_graph(Chem.MolFromSmiles("Cl[C@H](/C=C/C)Br"))
    assert g["node_feat"][1].tolist() == [5, 2, 4, 5, 1, 0, 2, 0, 0]
    bond2 = g["edge_attr"][4]  # bond 2 -> edges 4 and 5
    assert bond2.tolist() == [1, 2, 0]
    assert g["edge_attr"][5].tolist() == [1, 2, 0]

    g = mol_to_graph(Chem.MolFromSmiles("*C"))
    assert g["node_feat"][0, 0] == 118  # atomic number 0 -> misc
    g = mol_to_graph(Chem.MolFromSmiles("[C]"))
    assert g["node_feat"][0].tolist() == [5, 0, 0, 5, 0, 4, 2, 0, 0]  # 4 radical electrons

    g = mol_to_graph(Chem.MolFromSmiles("c1ccccc1"))
    assert (g["node_feat"][:, 7] == 1).all() and (g["node_feat"][:, 8] == 1).all()
    assert (g["edge_attr"][:, 0] == 3).all() and (g["edge_attr"][:, 2] == 1).all()
    # both directions, in RDKit bond order
    assert g["edge_index"][:, :2].tolist() == [[0, 1], [1, 0]]


def test_single_atom_has_no_edges():
    g = mol_to_graph(Chem.MolFromSmiles("C"))
    assert g["node_feat"].tolist() == [[5, 0, 4, 5, 4, 0, 2, 0, 0]]
    assert g["edge_index"].shape == (2, 0) and g["edge_index"].dtype == np.int64
    assert g["edge_attr"].shape == (0, 3) and g["edge_attr"].dtype == np.int64


def test_unknown_bond_stereo_is_a_molecule_error():
    mol = Chem.RWMol(Chem.MolFromSmiles("CC=CC"))
    bond = mol.GetBondWithIdx(1)
    bond.SetStereoAtoms(0, 3)
    bond.SetStereo(Chem.BondStereo.STEREOATROPCW)
    with pytest.raises(MoleculeError, match="bond stereo"):
        mol_to_graph(mol, "x")


@pytest.mark.parametrize(
    "smiles, reason",
    [("C1CC", "unparsable SMILES"), ("", "empty SMILES"), ("  ", "empty SMILES"),
     ("C(C)(C)(C)(C)C", "unparsable SMILES")],
)
def test_bad_smiles(smiles, reason, capfd):
    with pytest.raises(MoleculeError, match=reason) as info:
        molecules.mol_from_smiles(smiles, "row 7")
    assert info.value.item == "row 7"
    assert capfd.readouterr().err == ""  # RDKit's log is blocked for expected failures


def _embedded(smiles, seed=7):
    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    assert AllChem.EmbedMolecule(mol, randomSeed=seed) == 0
    return mol


def test_molblock_keeps_conformer_and_order():
    mol = _embedded("OCC(=O)N")
    block = Chem.MolToMolBlock(mol)
    parsed = molecules.mol_from_molblock(block, "rec 0")
    assert parsed.GetNumAtoms() == 5  # hydrogens removed
    heavy = [a.GetIdx() for a in mol.GetAtoms() if a.GetAtomicNum() > 1]
    expected = mol.GetConformer().GetPositions()[heavy]
    pos = molecules.positions(parsed)
    assert pos.dtype == np.float32 and pos.shape == (5, 3)
    np.testing.assert_allclose(pos, expected, atol=1e-4)
    assert [a.GetSymbol() for a in parsed.GetAtoms()] == ["O", "C", "C", "O", "N"]
    with_h = molecules.mol_from_molblock(block, "rec 0", remove_hs=False)
    assert with_h.GetNumAtoms() == mol.GetNumAtoms()


def test_bad_molblocks(capfd):
    block = Chem.MolToMolBlock(_embedded("CCO"))
    first_atom = block.split("\n")[4]
    nan_block = block.replace(first_atom, "       nan" + first_atom[10:], 1)
    with pytest.raises(MoleculeError, match="unparsable MOL block"):
        molecules.mol_from_molblock(nan_block, "rec 3")
    with pytest.raises(MoleculeError, match="empty MOL block"):
        molecules.mol_from_molblock("", "rec 4")
    assert capfd.readouterr().err == ""


def test_positions_errors():
    with pytest.raises(MoleculeError, match="no conformer"):
        molecules.positions(Chem.MolFromSmiles("CC"), "a")
    mol = Chem.MolFromSmiles("CC")
    conf = Chem.Conformer(2)
    conf.Set3D(True)
    mol.AddConformer(conf)
    with pytest.raises(MoleculeError, match="all coordinates are zero"):
        molecules.positions(mol, "b")
    conf = mol.GetConformer()
    conf.SetAtomPosition(0, (float("nan"), 0.0, 0.0))
    with pytest.raises(MoleculeError, match="NaN"):
        molecules.positions(mol, "c")
    single = Chem.MolFromSmiles("[Na+]")
    single.AddConformer(Chem.Conformer(1))
    assert molecules.positions(single).shape == (1, 3)  # one atom at the origin is fine


def test_heavy_formula():
    assert molecules.heavy_formula(Chem.MolFromSmiles("OCC(=O)[O-].[Na+]")) == "C2Na1O3"
    assert molecules.smiles_heavy_formula("c1ccccc1N", "x") == "C6N1"
    with pytest.raises(MoleculeError):
        molecules.smiles_heavy_formula("C1CC", "x")


@pytest.mark.parametrize("smiles", ["CCO", "c1ccccc1O", "CC(=O)[O-]", "C[C@H](N)C(=O)O"])
def test_xyz_perception(smiles):
    mol = _embedded(smiles)
    charge = Chem.GetFormalCharge(mol)
    xyz = Chem.MolToXYZBlock(mol)
    got = molecules.mol_from_xyz(xyz, "q", charge=charge, template_smiles=smiles)
    canon = Chem.MolToSmiles(Chem.MolFromSmiles(smiles), isomericSmiles=False)
    assert Chem.MolToSmiles(got, isomericSmiles=False) == canon
    assert molecules.positions(got).shape == (got.GetNumAtoms(), 3)
    # the XYZ atom order is kept (heavy atoms come first in an AddHs molecule)
    assert [a.GetSymbol() for a in got.GetAtoms()] == [
        a.GetSymbol() for a in mol.GetAtoms() if a.GetAtomicNum() > 1
    ]


def test_xyz_template_fallback_and_failure(capfd):
    mol = _embedded("CC(=O)[O-]")
    xyz = Chem.MolToXYZBlock(mol)
    # wrong total charge: DetermineBonds fails, the template recovers the graph
    got = molecules.mol_from_xyz(xyz, "q", charge=0, template_smiles="CC(=O)[O-]")
    assert Chem.MolToSmiles(got) == "CC(=O)[O-]"
    with pytest.raises(MoleculeError, match="bond perception failed"):
        molecules.mol_from_xyz(xyz, "q", charge=0)
    with pytest.raises(MoleculeError, match="does not reproduce the template"):
        molecules.mol_from_xyz(xyz, "q", charge=-1, template_smiles="CCC(=O)[O-]")
    with pytest.raises(MoleculeError, match="unparsable XYZ"):
        molecules.mol_from_xyz("3\n\nC 0 0\n", "q")
    with pytest.raises(MoleculeError, match="unparsable XYZ"):
        molecules.mol_from_xyz("2\n\nC 0 0 nan\nO 1.2 0 0\n", "q", template_smiles="C=O")
    assert capfd.readouterr().err == ""


# --- pipeline ------------------------------------------------------------------------------------


def _smiles_record(smiles, **kw):
    return SourceRecord(split="train", index=0, item="t #0", kind="smiles", text=smiles, **kw)


def test_pipeline_errors_before_graph():
    with pytest.raises(MoleculeError, match="unparsable SMILES"):
        featurize_record(_smiles_record("C1CC"))
    with pytest.raises(MoleculeError, match="raise --max-atoms"):
        featurize_record(_smiles_record("CCCCCC"), max_atoms=5)
    block = Chem.MolToMolBlock(_embedded("CCO"))
    rec = SourceRecord("train", 0, "sdf #0", "molblock", block, use_3d=True, check_smiles="CCN")
    with pytest.raises(SourceError, match="sdf #0.*not aligned"):
        featurize_record(rec)


@needs_graph
def test_pipeline_smiles_record():
    y = np.array([1.5, np.nan], np.float32)
    rec = featurize_record(_smiles_record("CC(=O)O", y=y))
    g = mol_to_graph(Chem.MolFromSmiles("CC(=O)O"))
    offsets = keys.X_SHIFT + keys.FEATURE_OFFSET * np.arange(9)
    np.testing.assert_array_equal(rec[keys.X], g["node_feat"] + offsets)
    assert keys.POS not in rec
    np.testing.assert_array_equal(rec[keys.Y], y)


@needs_graph
@pytest.mark.parametrize("smiles, n", [("[Na+]", 1), ("CCO.[Na+].[Cl-]", 5)])
def test_pipeline_keeps_single_atoms_and_fragments(smiles, n):
    rec = featurize_record(_smiles_record(smiles), max_atoms=n)
    assert rec[keys.X].shape == (n, 9)


@needs_graph
def test_pipeline_molblock_3d():
    mol = _embedded("OCC(=O)N")
    block = Chem.MolToMolBlock(mol)
    rec = SourceRecord("train", 0, "sdf #0", "molblock", block, use_3d=True,
                       check_smiles="NC(=O)CO")
    out = featurize_record(rec)
    assert out[keys.POS].dtype == np.float32 and out[keys.POS].shape == (5, 3)
    assert out[keys.X].shape == (5, 9)


@pytest.mark.slow  # a wall-clock bound: on a loaded machine it fails by luck (opt in: -m slow)
def test_featurize_speed_smoke():
    """SMILES -> OGB graph must not be slower than ogb itself (loose bound, shared CI machine)."""
    import time

    smiles = _nci_smiles(300)
    start = time.perf_counter()
    for smi in smiles:
        mol_to_graph(molecules.mol_from_smiles(smi, "x"))
    rate = len(smiles) / (time.perf_counter() - start)
    assert rate > 300, f"{rate:.0f} molecules/s"


# QM9 gdb_105 (bicyclo[1.1.1]pentane, DFT geometry from qm9pack): distance-based connectivity
# bonds the two bridgeheads across the cage, so bond orders cannot be assigned from it.
GDB_105_XYZ = """13
gdb_105
C -0.0445774324 1.5704237601 0.0110417803
C 1.4740896832 1.2298426501 -0.0067263896
C 1.1682993117 0.1443109379 1.0663744852
C 0.0391253719 0.0162093398 0.0024263012
C 1.1462118991 0.1542190803 -1.0826776727
H -0.432979399 2.0365230932 0.9212539305
H -0.4522920887 2.0457291576 -0.8859162855
H 2.3071156075 1.9344078755 -0.0121404539
H 1.8734729739 -0.6889311545 1.1373305611
H 0.8720963351 0.5020028465 2.0568232459
H -0.79393529 -0.6883164323 0.0076413099
H 0.8299890169 0.5207143173 -2.063620376
H 1.8497119208 -0.6782799316 -1.1756418065
"""


def test_xyz_strained_cage_keeps_template_graph_and_dft_coordinates():
    from rdkit import Chem
    from rdkit.Chem import rdDetermineBonds

    from graphormer_ext.featurize.molecules import mol_from_xyz, positions

    raw = Chem.MolFromXYZBlock(GDB_105_XYZ)
    with pytest.raises(Exception):  # the plain perception fails on this cage
        rdDetermineBonds.DetermineBonds(Chem.Mol(raw), charge=0)
    mol = mol_from_xyz(GDB_105_XYZ, "gdb_105", template_smiles="C1C2CC1C2", remove_hs=False)
    template = Chem.MolFromSmiles("C1C2CC1C2")
    assert Chem.MolToSmiles(Chem.RemoveAllHs(mol)) == Chem.MolToSmiles(template)
    # atoms stay in XYZ order with their own coordinates, and every bond is a real (short) one
    assert [a.GetSymbol() for a in mol.GetAtoms()] == [line.split()[0] for line in GDB_105_XYZ.splitlines()[2:]]
    np.testing.assert_allclose(positions(mol), raw.GetConformer().GetPositions(), atol=1e-6)
    xyz = positions(mol)
    lengths = [np.linalg.norm(xyz[b.GetBeginAtomIdx()] - xyz[b.GetEndAtomIdx()]) for b in mol.GetBonds()]
    assert max(lengths) < 1.7 and mol.GetNumBonds() == template.GetNumBonds() + 8  # + C-H bonds
    heavy = mol_from_xyz(GDB_105_XYZ, "gdb_105", template_smiles="C1C2CC1C2")
    assert heavy.GetNumAtoms() == 5
