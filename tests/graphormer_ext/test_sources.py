"""Dataset readers on tiny files written in the official layouts under tmp_path."""
import csv
import gzip
import importlib.util
import io
import math
import tarfile

import numpy as np
import pytest

Chem = pytest.importorskip("rdkit.Chem")
torch = pytest.importorskip("torch")
from rdkit.Chem import AllChem  # noqa: E402

from graphormer_ext.data import keys  # noqa: E402
from graphormer_ext.featurize.molecules import iter_sdf  # noqa: E402
from graphormer_ext.featurize.pipeline import featurize_record  # noqa: E402
from graphormer_ext.sources.base import SourceError  # noqa: E402
from graphormer_ext.sources.custom import CSVSource, SDFSource, random_split  # noqa: E402
from graphormer_ext.sources.pcqm4mv2 import PCQM4Mv2Source  # noqa: E402

HAVE_GRAPH = importlib.util.find_spec("graphormer_ext.featurize.graph") is not None

# Distinct heavy-atom formulas, so that a shuffled SDF is detectable.
SMILES = ["CCO", "c1ccccc1", "CC(=O)N", "OC(=O)CCl", "C1CC1", "CCN(C)C", "O=CC=O", "FC(F)F",
          "CC#N", "COC", "NCCO", "C=CC=C"]
N_TRAIN, N_VALID, N_DEV = 6, 3, 2  # the remaining row is test-challenge


def _embed(smiles, seed=0):
    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    assert AllChem.EmbedMolecule(mol, randomSeed=seed) == 0
    return mol


def _sdf_text(mols, props=None):
    out = io.StringIO()
    writer = Chem.SDWriter(out)
    for i, mol in enumerate(mols):
        mol = Chem.Mol(mol)
        for key, value in (props[i] if props else {}).items():
            mol.SetProp(key, str(value))
        writer.write(mol)
    writer.close()
    return out.getvalue()


def _write_tar_gz(path, member_name, text):
    data = text.encode()
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(member_name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def _pcqm_layout(root, n_sdf=N_TRAIN, shuffle=False, release=True, numpy_split=False):
    folder = root / "pcqm4m-v2"
    (folder / "raw").mkdir(parents=True)
    gaps = [3.0 + 0.25 * i for i in range(len(SMILES))]
    n_labelled = N_TRAIN + N_VALID
    with gzip.open(folder / "raw" / "data.csv.gz", "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow(["idx", "smiles", "homolumogap"])
        for i, smi in enumerate(SMILES):
            w.writerow([i, smi, gaps[i] if i < n_labelled else ""])
    bounds = np.cumsum([0, N_TRAIN, N_VALID, N_DEV, len(SMILES) - N_TRAIN - N_VALID - N_DEV])
    split = {
        name: np.arange(a, b) if numpy_split else torch.arange(a, b)
        for name, a, b in zip(["train", "valid", "test-dev", "test-challenge"], bounds, bounds[1:])
    }
    torch.save(split, folder / "split_dict.pt")
    if release:
        (folder / "RELEASE_v1.txt").write_text("PCQM4Mv2 release v1 (test fixture)\n")
    order = list(range(n_sdf))
    if shuffle:
        order = order[::-1]
    text = _sdf_text([_embed(SMILES[i % len(SMILES)], seed=i) for i in order])
    (root / "pcqm4m-v2-train.sdf").write_text(text)
    return text


def test_pcqm4mv2_records_and_splits(tmp_path):
    _pcqm_layout(tmp_path)
    src = PCQM4Mv2Source(tmp_path)
    assert src.splits() == {"train": 6, "valid": 3, "test-dev": 2, "test-challenge": 1}
    train = list(src.iter_split("train"))
    assert [r.index for r in train] == list(range(6))
    assert all(r.kind == "molblock" and r.use_3d for r in train)
    assert [r.check_smiles for r in train] == SMILES[:6]
    assert train[3].item == "pcqm4m-v2 idx 3 (train #3, SDF record 3)"
    assert train[1].y.dtype == np.float32 and train[1].y.tolist() == [3.25]
    valid = list(src.iter_split("valid"))
    assert [r.text for r in valid] == SMILES[6:9]
    assert all(r.kind == "smiles" and not r.use_3d and r.check_smiles is None for r in valid)
    assert valid[0].item == "pcqm4m-v2 idx 6 (valid #0)"
    test = list(src.iter_split("test-challenge"))
    assert len(test) == 1 and math.isnan(test[0].y[0])
    info = src.describe()
    assert info["targets"] == ["homolumogap"] and info["units"] == ["eV"] and info["train_3d"]
    assert [p.name for p in src.files()][-1] == "pcqm4m-v2-train.sdf"
    assert len(src.checksum()) == 64


def test_pcqm4mv2_train_sdf_tar_gz_and_2d(tmp_path):
    text = _pcqm_layout(tmp_path)
    (tmp_path / "pcqm4m-v2-train.sdf").unlink()
    _write_tar_gz(tmp_path / "pcqm4m-v2-train.sdf.tar.gz", "pcqm4m-v2-train.sdf", text)
    src = PCQM4Mv2Source(tmp_path, splits=("train",))
    assert src.sdf_path.name == "pcqm4m-v2-train.sdf.tar.gz"
    blocks = [r.text for r in src.iter_split("train")]
    assert blocks == list(iter_sdf(_write_plain(tmp_path / "plain.sdf", text)))
    assert len(blocks) == 6
    two_d = PCQM4Mv2Source(tmp_path, splits=("train",), use_sdf=False)
    assert all(r.kind == "smiles" for r in two_d.iter_split("train"))
    assert not two_d.describe()["train_3d"]


def _write_plain(path, text):
    path.write_text(text)
    return path


def test_pcqm4mv2_sdf_length_checks(tmp_path):
    _pcqm_layout(tmp_path, n_sdf=4)
    src = PCQM4Mv2Source(tmp_path, splits=("train",))
    with pytest.raises(SourceError, match="only 4 records.*6 rows"):
        list(src.iter_split("train"))
    assert len(list(PCQM4Mv2Source(tmp_path, limit=4).iter_split("train"))) == 4

    longer = tmp_path / "long.sdf"
    longer.write_text(_sdf_text([_embed(s) for s in SMILES[:7]]))
    src = PCQM4Mv2Source(tmp_path, sdf_path=longer, splits=("train",))
    with pytest.raises(SourceError, match="more records than the 6 train rows"):
        list(src.iter_split("train"))
    limited = PCQM4Mv2Source(tmp_path, sdf_path=longer, splits=("train",), limit=6)
    assert len(list(limited.iter_split("train"))) == 6
    with pytest.raises(SourceError, match="not found"):
        PCQM4Mv2Source(tmp_path, sdf_path=tmp_path / "missing.sdf")


def test_pcqm4mv2_shuffled_sdf_is_fatal(tmp_path):
    _pcqm_layout(tmp_path, shuffle=True)
    records = list(PCQM4Mv2Source(tmp_path, splits=("train",)).iter_split("train"))
    with pytest.raises(SourceError, match=r"idx 0 \(train #0.*not aligned"):
        featurize_record(records[0])


@pytest.mark.parametrize(
    "remove, match",
    [("pcqm4m-v2/RELEASE_v1.txt", "RELEASE_v1.txt not found.*stdin"),
     ("pcqm4m-v2/raw/data.csv.gz", "data.csv.gz not found.*pcqm4m-v2.zip"),
     ("pcqm4m-v2/split_dict.pt", "split_dict.pt not found")],
)
def test_pcqm4mv2_missing_files(tmp_path, remove, match):
    _pcqm_layout(tmp_path)
    (tmp_path / remove).unlink()
    with pytest.raises(SourceError, match=match):
        PCQM4Mv2Source(tmp_path)


def test_pcqm4mv2_bad_split_dicts(tmp_path):
    _pcqm_layout(tmp_path, numpy_split=True)
    path = tmp_path / "pcqm4m-v2" / "split_dict.pt"
    # numpy arrays in split_dict.pt; root given as the pcqm4m-v2 folder itself
    assert PCQM4Mv2Source(tmp_path / "pcqm4m-v2").splits()["valid"] == 3
    t = torch.tensor
    for split, match in [
        ({"train": t([0, 1, 99])}, "index 99, outside the 12 rows"),
        ({"train": t([0, 1, 1])}, "index 1 more than once"),
        ({"train": t([0, 1]), "valid": t([1, 2])}, "in both 'train' and 'valid'"),
        ({"train": t([0, 1])}, r"no split \['valid'"),
    ]:
        torch.save(split, path)
        with pytest.raises(SourceError, match=match):
            splits = ("train", "valid") if "valid" in match else ("train",)
            PCQM4Mv2Source(tmp_path, splits=splits)


def test_ogb_reads_the_same_fixture(tmp_path):
    lsc = pytest.importorskip("ogb.lsc")
    _pcqm_layout(tmp_path)
    ds = lsc.PCQM4Mv2Dataset(root=str(tmp_path), only_smiles=True)
    ours = PCQM4Mv2Source(tmp_path, use_sdf=False)
    idx = ds.get_idx_split()
    for split in ("train", "valid", "test-dev", "test-challenge"):
        records = list(ours.iter_split(split))
        assert len(records) == len(idx[split])
        for rec, row in zip(records, idx[split].tolist()):
            smi, gap = ds[row]
            assert rec.text == smi
            assert (math.isnan(gap) and math.isnan(rec.y[0])) or rec.y[0] == np.float32(gap)


@pytest.mark.skipif(not HAVE_GRAPH, reason="featurize/graph.py not present yet")
def test_pcqm4mv2_end_to_end(tmp_path):
    _pcqm_layout(tmp_path)
    src = PCQM4Mv2Source(tmp_path, splits=("train", "valid"))
    train = [featurize_record(r) for r in src.iter_split("train")]
    valid = [featurize_record(r) for r in src.iter_split("valid")]
    assert all(keys.POS in r and r[keys.POS].shape == (r[keys.X].shape[0], 3) for r in train)
    assert all(keys.POS not in r for r in valid)
    assert train[1][keys.X].shape == (6, 9)  # benzene, hydrogens removed


# --- iter_sdf ------------------------------------------------------------------------------------


def test_iter_sdf_formats(tmp_path):
    text = _sdf_text([_embed(s) for s in SMILES[:3]])
    plain = _write_plain(tmp_path / "a.sdf", text)
    with gzip.open(tmp_path / "a.sdf.gz", "wt") as f:
        f.write(text)
    _write_tar_gz(tmp_path / "a.sdf.tar.gz", "dir/a.sdf", text)
    blocks = list(iter_sdf(plain))
    assert len(blocks) == 3 and all(b.rstrip().endswith("M  END") for b in blocks)
    assert list(iter_sdf(tmp_path / "a.sdf.gz")) == blocks
    assert list(iter_sdf(tmp_path / "a.sdf.tar.gz")) == blocks
    # CRLF line ends and a last record without "$$$$"
    crlf = _write_plain(tmp_path / "b.sdf", text.rsplit("$$$$", 1)[0])
    crlf.write_bytes(crlf.read_text().replace("\n", "\r\n").encode())
    assert [b.rstrip() for b in iter_sdf(crlf)] == [b.rstrip() for b in blocks]


def test_iter_sdf_errors(tmp_path):
    with tarfile.open(tmp_path / "two.tar.gz", "w:gz") as tar:
        for name in ("a.sdf", "b.sdf"):
            info = tarfile.TarInfo(name)
            info.size = 0
            tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(SourceError, match="more than one .sdf"):
        list(iter_sdf(tmp_path / "two.tar.gz"))
    with pytest.raises(SourceError, match="not found"):
        list(iter_sdf(tmp_path / "none.sdf"))


# --- custom sources ------------------------------------------------------------------------------


def _write_csv(path, rows, header=("smiles", "logp", "active", "fold")):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_csv_source_random_split(tmp_path):
    rows = [(SMILES[i % 12], i * 0.5, "" if i % 4 == 0 else i % 2, "") for i in range(40)]
    path = _write_csv(tmp_path / "d.csv", rows)
    a = CSVSource(path, label_columns=["logp", "active"], seed=3)
    b = CSVSource(path, label_columns=["logp", "active"], seed=3)
    c = CSVSource(path, label_columns=["logp", "active"], seed=4)
    assert a.splits() == {"train": 32, "valid": 4, "test": 4}
    texts = {s: [r.item for r in a.iter_split(s)] for s in a.splits()}
    assert texts == {s: [r.item for r in b.iter_split(s)] for s in b.splits()}
    assert texts != {s: [r.item for r in c.iter_split(s)] for s in c.splits()}
    lines_seen = sorted(int(r.item.split()[2]) for s in a.splits() for r in a.iter_split(s))
    assert lines_seen == list(range(2, 42))  # file lines (header = 1): a partition
    rec = next(r for r in a.iter_split("train") if r.item.startswith("d.csv line 2 "))
    assert rec.y.dtype == np.float32 and rec.y[0] == 0.0 and math.isnan(rec.y[1])
    assert a.describe()["targets"] == ["logp", "active"]


def test_csv_source_split_column_and_errors(tmp_path):
    rows = [("CCO", 1.0, 1, "train"), ("", 2.0, 0, "valid"), ("C1CC", "NA", 1, "test"),
            ("CC", 4.0, 0, "train")]
    path = _write_csv(tmp_path / "d.csv", rows)
    src = CSVSource(path, label_columns=["logp"], split_column="fold")
    assert src.splits() == {"train": 2, "valid": 1, "test": 1}
    assert [r.text for r in src.iter_split("train")] == ["CCO", "CC"]
    assert next(src.iter_split("valid")).text == ""  # kept; featurize reports "empty SMILES"
    assert math.isnan(next(src.iter_split("test")).y[0])
    with pytest.raises(SourceError, match=r"no column \['pIC50'\]; available columns: \['smiles'"):
        CSVSource(path, label_columns=["pIC50"])
    with pytest.raises(SourceError, match=r"no column \['SMILES'\]"):
        CSVSource(path, smiles_column="SMILES")
    with pytest.raises(SourceError, match="line 2 column 'fold': label 'train' is not a number"):
        CSVSource(path, label_columns=["fold"])
    with pytest.raises(SourceError, match="sum to 1"):
        CSVSource(path, split_fractions=(0.5, 0.1, 0.1))
    with pytest.raises(SourceError, match="no split 'dev'"):
        list(src.iter_split("dev"))


def test_random_split_partitions():
    parts = random_split(10, (0.8, 0.1, 0.1), seed=0)
    assert [len(p) for p in parts] == [8, 1, 1]
    assert sorted(np.concatenate(parts).tolist()) == list(range(10))


def test_sdf_source(tmp_path):
    mols = [_embed(s, seed=i) for i, s in enumerate(SMILES[:5])]
    props = [{"energy": -1.5 * i, "fold": "train" if i < 3 else "test"} for i in range(5)]
    del props[2]["energy"]
    path = _write_plain(tmp_path / "set.sdf", _sdf_text(mols, props))
    src = SDFSource(path, label_properties=["energy"], split_property="fold")
    assert src.splits() == {"train": 3, "test": 2}
    train = list(src.iter_split("train"))
    assert [r.index for r in train] == [0, 1, 2]
    assert train[1].y.tolist() == [-1.5] and math.isnan(train[2].y[0])
    assert all(r.kind == "molblock" and r.use_3d for r in train)
    assert train[0].item.startswith("set.sdf record 1 (line 1)")
    test = list(src.iter_split("test"))
    assert test[1].item.startswith("set.sdf record 5 (line ") and test[1].index == 1
    assert [r.source_row for r in test] == [4, 5]
    rnd = SDFSource(path, label_properties=["energy"], split_fractions=(0.6, 0.4), seed=1,
                    use_3d=False)
    assert rnd.splits() == {"train": 3, "valid": 2}
    assert not any(r.use_3d for r in rnd.iter_split("valid"))
    with pytest.raises(SourceError, match=r"no record has property \['gap'\]; properties found: "
                                          r"\['energy', 'fold'\]"):
        SDFSource(path, label_properties=["gap"])
    if HAVE_GRAPH:
        out = featurize_record(train[0])
        assert out[keys.POS].shape == (3, 3)
