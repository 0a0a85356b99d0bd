"""QM9 readers: qm9pack CSVs and PyG raw files, targets and units, split, errors."""
from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from graphormer_ext.sources.base import SourceError
from graphormer_ext.sources.qm9 import (
    ATOMREF_HARTREE,
    HARTREE_TO_EV,
    KCALMOL_TO_EV,
    QM9_TARGET_NAMES,
    QM9_TARGETS,
    QM9PackSource,
    QM9PyGRawSource,
    atomization_kcalmol,
    qm9_split,
    read_uncharacterized,
    xyz_block,
)

# Rows of the real gdb9.sdf.csv (PyG/DeepChem) for gdb_1..gdb_5: mu, alpha, homo, lumo,
# gap (Hartree), A, B, C (GHz) and the four atomisation energies (kcal/mol).
REFERENCE = {
    1: dict(mu=0.0, alpha=13.21, homo=-0.3877, lumo=0.1171, gap=0.5048,
            A=157.7118, B=157.70997, C=157.70699,
            atom=(-395.999594594, -398.643290011, -401.014646522, -372.471772148)),
    2: dict(mu=1.6256, alpha=9.46, homo=-0.2570, lumo=0.0829, gap=0.3399,
            A=293.60975, B=293.54111, C=191.39397,
            atom=(-276.861363, -278.620271, -280.399259, -259.338802)),
    3: dict(mu=1.8511, alpha=6.31, homo=-0.2928, lumo=0.0687, gap=0.3615,
            A=799.58812, B=437.90386, C=282.94545,
            atom=(-213.087624, -213.974294, -215.159658, -201.407171)),
    4: dict(mu=0.0, alpha=16.28, homo=-0.2845, lumo=0.0506, gap=0.3351,
            A=0.0, B=35.610036, C=35.610036,
            atom=(-385.501997, -387.237686, -389.016047, -365.800724)),
    5: dict(mu=2.8937, alpha=12.99, homo=-0.3604, lumo=0.0191, gap=0.3796,
            A=0.0, B=44.593883, C=44.593883,
            atom=(-301.820534, -302.906752, -304.091489, -288.720028)),
}  # fmt: skip
PACK_ROWS = {
    "qm9_part1.csv": range(1, 7),
    "qm9_part2.csv": (7, 8),
    "qm9_part3.csv": (184,),  # CF4: exercises the F atomref
}
UNCHARACTERIZED_HEADER = """
List of molecules among the 133885 GDB9 molecules for which the Corina generated
Cartesian coordinates and the B3LYP/6-31G(2df,p) geometry lead to different SMILES.

==============================================================================
#   Index      GDB17 SMILES      SMILES for B3LYP XYZ     SMILES for Corina      D_IJ
==============================================================================
"""


def _qm9pack_dir() -> Path:
    spec = importlib.util.find_spec("qm9pack")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("qm9pack is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


@pytest.fixture(scope="module")
def pack_dir(tmp_path_factory) -> Path:
    """qm9pack-format CSVs holding real rows: GDB 1-6, 7-8 and 184 (CF4)."""
    src = _qm9pack_dir() / "qm9_part1.csv"
    wanted = {i for rows in PACK_ROWS.values() for i in rows}
    found = {}
    with open(src, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        col = header.index("Index")
        for row in reader:
            if int(row[col]) in wanted:
                found[int(row[col])] = row
            if len(found) == len(wanted):
                break
    out = tmp_path_factory.mktemp("qm9pack")
    for name, rows in PACK_ROWS.items():
        with open(out / name, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(found[i] for i in rows)
    return out


def _write_pyg_raw(folder: Path, pack: QM9PackSource, gdb_ids, uncharacterized) -> None:
    """gdb9.sdf, gdb9.sdf.csv and uncharacterized.txt for molecules of ``pack``."""
    from graphormer_ext.featurize.molecules import mol_from_xyz
    from rdkit import Chem

    folder.mkdir(parents=True, exist_ok=True)
    csv_cols = ["A", "B", "C"] + list(QM9_TARGET_NAMES[:16])
    sdf, rows = [], []
    cols = {name: j for j, name in enumerate(QM9_TARGET_NAMES)}
    for gdb in gdb_ids:
        pos = int(np.searchsorted(pack.gdb_index, gdb))
        assert pack.gdb_index[pos] == gdb
        text = xyz_block(pack.elements(pos), pack.coordinates(pos))
        mol = mol_from_xyz(
            text, f"gdb_{gdb}", template_smiles=pack.smiles[pos], remove_hs=False
        )
        mol.SetProp("_Name", f"gdb_{gdb}")
        sdf.append(Chem.MolToMolBlock(mol) + "$$$$\n")
        # back to the raw units of gdb9.sdf.csv
        raw = pack.targets()[pos] / np.array([t.factor for t in QM9_TARGETS])
        rows.append([f"gdb_{gdb}"] + [repr(float(raw[cols[c]])) for c in csv_cols])
    (folder / "gdb9.sdf").write_text("".join(sdf))
    with open(folder / "gdb9.sdf.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(QM9PyGRawSource.CSV_COLUMNS)
        w.writerows(rows)
    row = "  {:6d}    N=C1NC=CO1    [NH]C1NC=CO1    N=c1occ[nH]1    1.588400\n"
    body = "".join(row.format(i) for i in uncharacterized)
    text = UNCHARACTERIZED_HEADER + body + "=" * 78 + "\n"
    (folder / "uncharacterized.txt").write_text(text)


@pytest.fixture(scope="module")
def pack(pack_dir) -> QM9PackSource:
    return QM9PackSource(csv_dir=pack_dir, split="all")


@pytest.fixture(scope="module")
def pyg_dir(tmp_path_factory, pack) -> Path:
    pytest.importorskip("rdkit")
    out = tmp_path_factory.mktemp("qm9raw") / "raw"
    _write_pyg_raw(out, pack, gdb_ids=(1, 2, 3, 4, 5, 6), uncharacterized=(3,))
    return out


def test_target_table():
    assert len(QM9_TARGETS) == 19
    assert QM9_TARGET_NAMES[:5] == ("mu", "alpha", "homo", "lumo", "gap")
    assert QM9_TARGET_NAMES[12:] == (
        "u0_atom", "u298_atom", "h298_atom", "g298_atom", "A", "B", "C"
    )  # fmt: skip
    ev = [i for i, t in enumerate(QM9_TARGETS) if t.unit == "eV"]
    assert ev == [2, 3, 4, 6, 7, 8, 9, 10, 12, 13, 14, 15]
    assert [QM9_TARGETS[i].factor for i in (2, 12)] == [HARTREE_TO_EV, KCALMOL_TO_EV]
    assert (QM9_TARGETS[0].unit, QM9_TARGETS[1].unit, QM9_TARGETS[11].unit) == (
        "D", "a0^3", "cal/(mol K)"
    )  # fmt: skip


def test_atomization_matches_gdb9_csv():
    # Methane from the atomref table alone reproduces gdb9.sdf.csv's u0_atom.
    total = np.array([[-40.47893, -40.476062, -40.475117, -40.498597]])
    got = atomization_kcalmol(total, {"C": np.array([1]), "H": np.array([4])})
    np.testing.assert_allclose(got[0], REFERENCE[1]["atom"], atol=1e-6)
    assert set(ATOMREF_HARTREE) == {"H", "C", "N", "O", "F"}


def test_qm9pack_targets_and_units(pack):
    assert pack.gdb_index.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 184]
    y = pack.targets()
    assert y.shape == (9, 19) and np.isfinite(y).all()
    name = {n: j for j, n in enumerate(QM9_TARGET_NAMES)}
    for gdb, ref in REFERENCE.items():
        row = y[gdb - 1]
        for key in ("mu", "alpha", "A", "B", "C"):
            # the reference table shows 6 decimals
            assert row[name[key]] == pytest.approx(ref[key], abs=1e-6)
        for key in ("homo", "lumo", "gap"):
            assert row[name[key]] == pytest.approx(ref[key] * HARTREE_TO_EV, abs=1e-9)
        atom_ev = np.array(ref["atom"]) * KCALMOL_TO_EV
        np.testing.assert_allclose(row[12:16], atom_ev, atol=1e-6)
    assert y[0, name["u0"]] == pytest.approx(-40.47893 * HARTREE_TO_EV)
    assert y[0, name["u0_atom"]] == pytest.approx(-17.1722, abs=1e-4)  # methane, eV
    assert y[-1, name["u0_atom"]] < 0  # CF4 uses the F atomref


def test_qm9pack_records(pack):
    recs = list(pack.iter_split("all"))
    assert [r.index for r in recs] == list(range(9))
    r = recs[3]  # acetylene: the row written with Python floats like "0."
    assert (r.kind, r.split, r.use_3d, r.charge) == ("xyz", "all", True, 0)
    assert r.template_smiles == "C#C"
    assert "gdb_4" in r.item
    lines = r.text.splitlines()
    assert lines[0] == "4"
    assert [ln.split()[0] for ln in lines[2:]] == ["C", "C", "H", "H"]
    np.testing.assert_array_equal(
        np.array([ln.split()[1:] for ln in lines[2:]], dtype=float), pack.coordinates(3)
    )
    assert "e-" not in r.text  # no exponents (RDKit's XYZ parser rejects them)
    assert r.y.dtype == np.float32 and r.y.shape == (19,)
    np.testing.assert_array_equal(r.y, pack.targets()[3].astype(np.float32))
    assert [len(pack.elements(i)) for i in range(9)] == [5, 4, 3, 4, 3, 4, 8, 6, 5]
    assert pack.describe()["targets"][4] == {"name": "gap", "unit": "eV"}


def test_xyz_block_reads_back_in_rdkit():
    Chem = pytest.importorskip("rdkit.Chem")
    coords = np.array([[0.0, -7.70322e-05, 1.0], [1.2, 2.1997e-06, 0.5]])
    block = xyz_block(["C", "O"], coords, "test")
    assert "e-0" not in block  # RDKit's XYZ parser rejects exponents
    mol = Chem.MolFromXYZBlock(block)
    np.testing.assert_array_equal(mol.GetConformer().GetPositions(), coords)


def test_seeded_split_sizes_and_reproducibility():
    s1 = qm9_split(50, (30, 12, 8), seed=3)
    assert {k: len(v) for k, v in s1.items()} == {"train": 30, "valid": 12, "test": 8}
    allidx = np.concatenate(list(s1.values()))
    assert sorted(allidx.tolist()) == list(range(50))
    s2 = qm9_split(50, (30, 12, 8), seed=3)
    assert all(np.array_equal(s1[k], s2[k]) for k in s1)
    s3 = qm9_split(50, (30, 12, 8), seed=4)
    assert not np.array_equal(s1["test"], s3["test"])
    before = np.random.get_state()[1].copy()
    qm9_split(50, (30, 12, 8), seed=5)
    assert np.array_equal(before, np.random.get_state()[1])  # global RNG untouched
    with pytest.raises(SourceError, match="add up"):
        qm9_split(50, (30, 12, 9), seed=3)


def test_seeded_split_equals_sklearn_double_split():
    model_selection = pytest.importorskip("sklearn.model_selection")
    n, seed = 300, 7
    split = model_selection.train_test_split
    train_valid, test = split(np.arange(n), test_size=31, random_state=seed)
    train, valid = split(train_valid, test_size=40, random_state=seed)
    ours = qm9_split(n, (n - 71, 40, 31), seed=seed)
    for name, ref in (("train", train), ("valid", valid), ("test", test)):
        np.testing.assert_array_equal(ours[name], ref)


def test_qm9pack_seeded_split(pack_dir):
    a = QM9PackSource(csv_dir=pack_dir, sizes=(5, 2, 2), seed=11)
    assert a.splits() == {"train": 5, "valid": 2, "test": 2}
    b = QM9PackSource(csv_dir=pack_dir, sizes=(5, 2, 2), seed=11)
    ids = {s: [r.item.split()[1] for r in a.iter_split(s)] for s in a.splits()}
    assert ids == {s: [r.item.split()[1] for r in b.iter_split(s)] for s in b.splits()}
    assert sorted(sum(ids.values(), [])) == sorted(f"gdb_{i}" for i in a.gdb_index)
    assert [r.index for r in a.iter_split("train")] == list(range(5))
    lim = QM9PackSource(csv_dir=pack_dir, sizes=(2, 1, 1), limit=4)
    assert lim.gdb_index.tolist() == [1, 2, 3, 4]
    with pytest.raises(SourceError, match="sizes"):
        QM9PackSource(csv_dir=pack_dir, limit=4)  # default sizes do not fit 4 molecules
    with pytest.raises(SourceError, match="split scheme"):
        QM9PackSource(csv_dir=pack_dir, split="random")


def test_qm9pack_missing_file(pack_dir, tmp_path):
    for name in ("qm9_part1.csv", "qm9_part3.csv"):
        (tmp_path / name).write_bytes((pack_dir / name).read_bytes())
    with pytest.raises(SourceError, match="qm9_part2.csv"):
        QM9PackSource(csv_dir=tmp_path, split="all")


def test_read_uncharacterized(tmp_path):
    p = tmp_path / "uncharacterized.txt"
    rows = "".join(f"   {i:6d}   CC   CC   CC   1.0\n" for i in (58, 61, 133866))
    p.write_text(UNCHARACTERIZED_HEADER + rows + "=" * 40 + "\n")
    assert read_uncharacterized(p) == [58, 61, 133866]


def test_pyg_raw_records_and_skip(pyg_dir):
    Chem = pytest.importorskip("rdkit.Chem")
    src = QM9PyGRawSource(pyg_dir, split="all")
    assert src.num_skipped == 1 and src.skipped_gdb_index.tolist() == [3]
    assert src.gdb_index.tolist() == [1, 2, 4, 5, 6]
    assert src.splits() == {"all": 5}
    assert src.describe()["num_skipped_uncharacterized"] == 1
    recs = list(src.iter_split("all"))
    assert [r.kind for r in recs] == ["molblock"] * 5 and all(r.use_3d for r in recs)
    assert recs[2].item.startswith("gdb9.sdf gdb_4")
    mols = [Chem.MolFromMolBlock(r.text, removeHs=False) for r in recs]
    heavy_and_h = [m.GetNumAtoms() for m in mols]
    assert heavy_and_h == [5, 4, 4, 3, 4]  # hydrogens kept
    names = ["gdb9.sdf", "gdb9.sdf.csv", "uncharacterized.txt"]
    assert [p.name for p in src.files()] == names


def test_both_layouts_give_identical_targets(pyg_dir, pack):
    raw = QM9PyGRawSource(pyg_dir, split="all")
    for rec_raw, gdb in zip(raw.iter_split("all"), raw.gdb_index):
        pos = int(np.searchsorted(pack.gdb_index, gdb))
        np.testing.assert_array_equal(rec_raw.y, pack.record("all", 0, pos).y)
        row = list(raw.gdb_index).index(gdb)
        np.testing.assert_allclose(
            raw.targets()[row], pack.targets()[pos], rtol=1e-12, atol=1e-12
        )


def test_pyg_raw_seeded_split(pyg_dir):
    src = QM9PyGRawSource(pyg_dir, sizes=(3, 1, 1), seed=2)
    assert src.splits() == {"train": 3, "valid": 1, "test": 1}
    items = sorted(r.item.split()[1] for s in src.splits() for r in src.iter_split(s))
    assert items == ["gdb_1", "gdb_2", "gdb_4", "gdb_5", "gdb_6"]


def test_pyg_raw_errors(pyg_dir, tmp_path):
    for missing in ("uncharacterized.txt", "gdb9.sdf"):
        d = tmp_path / f"no_{missing}"
        d.mkdir()
        for name in ("gdb9.sdf", "gdb9.sdf.csv", "uncharacterized.txt"):
            if name != missing:
                (d / name).write_bytes((pyg_dir / name).read_bytes())
        with pytest.raises(SourceError, match=missing.replace(".", r"\.")):
            QM9PyGRawSource(d, split="all")

    # SDF record titles out of step with the CSV rows.
    d = tmp_path / "swapped"
    d.mkdir()
    for name in ("gdb9.sdf.csv", "uncharacterized.txt"):
        (d / name).write_bytes((pyg_dir / name).read_bytes())
    text = (pyg_dir / "gdb9.sdf").read_text()
    swapped = text.replace("gdb_1\n", "gdb_X\n").replace("gdb_2\n", "gdb_1\n")
    (d / "gdb9.sdf").write_text(swapped)
    with pytest.raises(SourceError, match="gdb_1"):
        list(QM9PyGRawSource(d, split="all").iter_split("all"))

    # One SDF record fewer than CSV rows.
    (d / "gdb9.sdf").write_text(text.split("$$$$\n", 1)[1])
    with pytest.raises(SourceError, match="records"):
        list(QM9PyGRawSource(d, split="all").iter_split("all"))

    # Wrong CSV header.
    (d / "gdb9.sdf.csv").write_text("mol_id,mu\ngdb_1,0.0\n")
    with pytest.raises(SourceError, match="header"):
        QM9PyGRawSource(d, split="all")


def test_records_featurize(pack, pyg_dir):
    pytest.importorskip("rdkit")
    from graphormer_ext.data import keys
    from graphormer_ext.featurize.pipeline import featurize_record

    rec = pack.record("all", 0, 5)  # formaldehyde, 4 atoms with H
    out = featurize_record(rec, remove_hs=False)
    assert out[keys.POS].shape == (4, 3) and out[keys.Y].shape == (19,)
    out = featurize_record(rec, remove_hs=True)
    assert out[keys.POS].shape == (2, 3)
    raw = next(QM9PyGRawSource(pyg_dir, split="all").iter_split("all"))
    assert featurize_record(raw, remove_hs=False)[keys.POS].shape == (5, 3)
