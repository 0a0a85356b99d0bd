"""PDBbind reader, ligand + pocket graphs, ``graphormer-ext-preprocess pdbbind`` and the
affinity metrics (R, MAE, RMSE, SD), on a tiny fake PDBbind v2016 tree built in code."""

from __future__ import annotations

import csv

import numpy as np
import pytest

pytest.importorskip("rdkit")

from pdbbind_testutils import (  # noqa: E402  (tests/graphormer_ext on sys.path)
    INDEX_HEADER,
    peptide_pdb,
    placed_ligand,
    write_fake_pdbbind,
)

from graphormer_ext.data import keys as K  # noqa: E402
from graphormer_ext.metrics import (  # noqa: E402
    SUM_KEYS,
    affinity_metrics,
    affinity_sums,
    metrics_from_sums,
)
from graphormer_ext.sources.base import MoleculeError, SourceError  # noqa: E402
from graphormer_ext.sources.pdbbind import PDBBindSource, parse_index  # noqa: E402


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    return write_fake_pdbbind(tmp_path_factory.mktemp("pdbbind"))


# --- index file ----------------------------------------------------------------------------
def test_parse_index(tmp_path):
    path = tmp_path / "INDEX_refined_data.2016"
    path.write_text(
        INDEX_HEADER
        + "2r58  2.00  2007   2.00  Kd=10mM       // 2r58.pdf (MLY)\n"
        + "\n"
        + "1LKK  NMR   1996  11.52  Ki=3pM        // 1lkk.pdf (1-mer)\n"
    )
    index = parse_index(path)
    assert list(index) == ["2r58", "1lkk"]
    e = index["1lkk"]
    assert (e.pk, e.resolution, e.year, e.affinity, e.ligand) == (
        11.52,
        "NMR",
        1996,
        "Ki=3pM",
        "1-mer",
    )
    assert index["2r58"].pk == 2.0 and index["2r58"].ligand == "MLY"


@pytest.mark.parametrize(
    "line, message",
    [
        ("2r58  2.00  2007  high  Kd=10mM // x (L)\n", ":7: year"),
        ("2r58  2.00\n", ":7: expected"),
        ("abcde 2.00  2007  2.0  Kd=10mM // x (L)\n", "PDB code"),
        ("2r58  2.00  2007  nan  Kd=10mM // x (L)\n", "not finite"),
    ],
)
def test_parse_index_errors(tmp_path, line, message):
    path = tmp_path / "index"
    path.write_text(INDEX_HEADER + line)
    with pytest.raises(SourceError, match=message):
        parse_index(path)


def test_parse_index_duplicate_and_missing(tmp_path):
    path = tmp_path / "index"
    path.write_text("1abc 2 2000 5.0 Kd=1uM\n1ABC 2 2000 6.0 Kd=1uM\n")
    with pytest.raises(SourceError, match="duplicate PDB code 1abc"):
        parse_index(path)
    with pytest.raises(SourceError, match="not found"):
        parse_index(tmp_path / "nope")


# --- source: splits --------------------------------------------------------------------------
def test_core_set_is_test_and_excluded_from_train_valid(fake):
    src = PDBBindSource(fake.root, valid_size=5, seed=3)
    core = set(fake.core + fake.far[-1:])  # the core set holds one far ligand too
    assert src.codes("test") == sorted(core)
    train, valid = src.codes("train"), src.codes("valid")
    assert (
        not core & set(train) and not core & set(valid) and not set(train) & set(valid)
    )
    assert set(train) | set(valid) == set(fake.labels) - core
    assert src.splits() == {"train": len(train), "valid": 5, "test": len(core)}
    assert src.excluded_core == len(core)
    assert src.describe()["core_excluded_from_train_valid"] == len(core)
    # seeded: same seed, same split; another seed, another split; default 10 % valid
    assert PDBBindSource(fake.root, valid_size=5, seed=3).codes("valid") == valid
    assert PDBBindSource(fake.root, valid_size=5, seed=4).codes("valid") != valid
    assert PDBBindSource(fake.root).splits()["valid"] == round(0.1 * (len(train) + 5))
    # labels are -logKd/Ki from the index, test records from the core folder
    recs = {r.item.split()[0]: r for s in ("train", "test") for r in src.iter_split(s)}
    for code, rec in recs.items():
        assert rec.y.tolist() == [pytest.approx(fake.labels[code])] and rec.use_3d
    assert src.complex_dir(fake.core[0], "test") == fake.root / "coreset" / fake.core[0]


def test_source_errors(fake, tmp_path):
    with pytest.raises(SourceError, match="core set folder not found"):
        PDBBindSource(fake.root, core_dir=tmp_path / "none")
    with pytest.raises(SourceError, match="refined set folder not found"):
        PDBBindSource(tmp_path)
    with pytest.raises(SourceError, match="valid size"):
        PDBBindSource(fake.root, valid_size=10_000)
    lonely = tmp_path / "core"
    (lonely / "9zzz").mkdir(parents=True)
    with pytest.raises(SourceError, match=r"core complexes without a -logKd/Ki.*9zzz"):
        PDBBindSource(fake.root, core_dir=lonely)
    with pytest.raises(SourceError, match="cutoff"):
        PDBBindSource(fake.root, cutoff=0)


# --- complexes: pocket selection and bad inputs -------------------------------------------
def _pdb_heavy(pdb: str) -> np.ndarray:
    rows = [ln for ln in pdb.splitlines() if ln.startswith(("ATOM", "HETATM"))]
    heavy = [ln for ln in rows if ln[76:78].strip() != "H"]
    return np.array([[float(ln[c : c + 8]) for c in (30, 38, 46)] for ln in heavy])


@pytest.mark.parametrize("cutoff", [3.0, 5.0, 8.0])
def test_cutoff_selects_pocket_atoms_within_range(cutoff):
    from rdkit import Chem

    from graphormer_ext.featurize.complexes import mol_from_complex

    pdb, heavy = peptide_pdb()
    lig = placed_ligand("CC(=O)Nc1ccc(O)cc1", seed=1, center=heavy[20] + [0, 0, 2.5])
    sdf = Chem.MolToMolBlock(lig)
    mol = mol_from_complex(sdf, None, pdb, "t", cutoff=cutoff)
    lig_pos = Chem.RemoveHs(lig).GetConformer().GetPositions()
    pocket = _pdb_heavy(pdb)  # brute force from the PDB columns (3-decimal Å)
    d = np.sqrt(((pocket[:, None] - lig_pos[None]) ** 2).sum(-1)).min(1)
    expected = pocket[d <= cutoff]
    n_lig = mol.GetIntProp("num_ligand_atoms")
    assert n_lig == 11 and mol.GetNumAtoms() == n_lig + len(expected) > n_lig
    pos = mol.GetConformer().GetPositions()
    np.testing.assert_allclose(pos[:n_lig], lig_pos, atol=1e-3)
    np.testing.assert_allclose(pos[n_lig:], expected, atol=1e-3)
    assert all(a.GetAtomicNum() > 1 for a in mol.GetAtoms())


def test_complex_bad_inputs_are_molecule_errors():
    from rdkit import Chem

    from graphormer_ext.featurize.complexes import complex_payload, mol_from_complex
    from graphormer_ext.featurize.pipeline import featurize_record
    from graphormer_ext.sources.base import SourceRecord

    pdb, heavy = peptide_pdb()
    far_mol = Chem.RemoveHs(placed_ligand("CCO", 0, heavy[0] + 50.0))
    far = Chem.MolToMolBlock(far_mol)
    lig = far_mol.GetConformer().GetPositions()
    nearest = np.sqrt(((heavy[:, None] - lig[None]) ** 2).sum(-1)).min()
    with pytest.raises(
        MoleculeError, match=f"no pocket atoms within 5 Å .* at {nearest:.2f} Å"
    ):
        mol_from_complex(far, None, pdb, "far")
    big = mol_from_complex(far, None, pdb, "far", cutoff=nearest + 0.01)
    assert big.GetNumAtoms() == 3 + 1
    with pytest.raises(MoleculeError, match="unreadable ligand: SDF: .*; MOL2: "):
        mol_from_complex("junk", "@<TRIPOS>MOLECULE\nx\n", pdb, "bad")
    with pytest.raises(MoleculeError, match="unreadable ligand: SDF: empty file"):
        mol_from_complex("", None, pdb, "bad")
    with pytest.raises(MoleculeError, match="empty pocket PDB"):
        mol_from_complex(far, None, "", "nopocket")
    rec = SourceRecord(
        "train", 0, "1abc (train #0)", "complex", y=np.array([5.0], np.float32), use_3d=True,
        text=complex_payload(ligand_sdf=None, ligand_mol2=None, pocket_pdb=pdb, cutoff=5,
                             missing=["1abc_ligand.sdf"]),
    )  # fmt: skip
    with pytest.raises(MoleculeError, match="missing file.*1abc_ligand.sdf"):
        featurize_record(rec)


def test_waters_are_dropped_unless_kept():
    from rdkit import Chem

    from graphormer_ext.featurize.complexes import mol_from_complex

    pdb, heavy = peptide_pdb()
    c = heavy[5] + [0, 0, 2.5]
    water = (
        f"HETATM 9999  O   HOH W   1    {c[0]:8.3f}{c[1]:8.3f}{c[2] + 1.0:8.3f}"
        "  1.00  0.00           O  \n"
    )
    pdb_w = pdb.replace("END", water + "END", 1)
    sdf = Chem.MolToMolBlock(placed_ligand("CCO", 0, c))
    n = mol_from_complex(sdf, None, pdb_w, "w").GetNumAtoms()
    assert (
        mol_from_complex(sdf, None, pdb_w, "w", keep_waters=True).GetNumAtoms() == n + 1
    )


# --- preprocess CLI --------------------------------------------------------------------------
def _skips(path) -> dict[str, str]:
    with open(path, newline="") as f:
        return {
            r["item"].split()[0]: r["reason"] for r in csv.DictReader(f, delimiter="\t")
        }


def test_preprocess_pdbbind_writes_splits_and_lists_skips(fake, tmp_path):
    from graphormer_ext.data.lmdb_dataset import LMDBDataset
    from graphormer_ext.preprocess import main

    out = tmp_path / "lmdb"
    argv = ["pdbbind", "--root", str(fake.root), "--out", str(out), "--valid-size", "4",
            "--workers", "1", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    skips = {**_skips(out / "train.skipped.tsv"), **_skips(out / "valid.skipped.tsv")}
    assert set(skips) == {fake.far[0], fake.bad_ligand[0], fake.no_pocket_file[0]}
    assert "no pocket atoms within 5 Å" in skips[fake.far[0]]
    assert "unreadable ligand" in skips[fake.bad_ligand[0]]
    assert "missing file" in skips[fake.no_pocket_file[0]]
    assert set(_skips(out / "test.skipped.tsv")) == {fake.far[1]}
    for split in ("train", "valid", "test"):
        ds = LMDBDataset(out / f"{split}.lmdb")
        meta = ds.meta
        desc = meta["source"]["describe"]
        assert desc["cutoff_angstrom"] == 5.0 and desc["version"] == "2016"
        assert meta["max_atoms"] == 512 and meta["stats"]["with_pos"] == len(ds)
        codes = desc["codes"][split]
        assert len(ds) + meta["counts"]["skipped"] == len(codes)
        for i in range(len(ds)):
            rec = ds[i]
            code = codes[ds.source_index[i]]
            assert rec[K.Y].tolist() == [pytest.approx(fake.labels[code])]
            assert rec[K.POS].shape == (rec[K.NODE_FEAT].shape[0], 3)
    # the complex whose SDF RDKit cannot read is kept, from its MOL2
    assert fake.mol2_only[0] not in skips
    # max-atoms filter: counted and listed with the reason
    out2 = tmp_path / "lmdb2"
    assert (
        main([*argv[:4], str(out2), *argv[5:], "--max-atoms", "25", "--splits", "test"])
        == 0
    )
    reasons = _skips(out2 / "test.skipped.tsv")
    big = [c for c, r in reasons.items() if "more than the maximum N = 25" in r]
    assert big and len(LMDBDataset(out2 / "test.lmdb")) == len(fake.core) - len(big)


# --- metrics ---------------------------------------------------------------------------------
def test_affinity_metrics_match_numpy_and_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    y = rng.normal(6.5, 2.0, size=285)
    p = 0.7 * y + rng.normal(1.5, 1.0, size=285)
    m = affinity_metrics(y, p)
    assert m["pearson_r"] == pytest.approx(stats.pearsonr(y, p)[0], rel=1e-10)
    assert m["mae"] == pytest.approx(np.abs(y - p).mean(), rel=1e-12)
    assert m["rmse"] == pytest.approx(np.sqrt(((y - p) ** 2).mean()), rel=1e-12)
    fit = stats.linregress(p, y)  # regression of true on predicted
    resid = y - (fit.slope * p + fit.intercept)
    assert m["sd"] == pytest.approx(np.sqrt((resid**2).sum() / (len(y) - 1)), rel=1e-10)
    # summed over uneven parts (batches / workers) = the whole
    parts = [affinity_sums(y[a:b], p[a:b]) for a, b in ((0, 7), (7, 100), (100, 285))]
    total = {k: sum(s[k] for s in parts) for k in SUM_KEYS}
    for k, v in metrics_from_sums(total).items():
        assert v == pytest.approx(m[k], rel=1e-9), k
    # degenerate inputs are NaN, not errors
    assert np.isnan(affinity_metrics([1.0], [2.0])["pearson_r"])
    assert np.isnan(affinity_metrics([1.0, 2.0], [3.0, 3.0])["pearson_r"])
    assert all(np.isnan(v) for v in metrics_from_sums(affinity_sums([], [])).values())
