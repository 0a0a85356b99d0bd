"""The shipped demo dataset ``data/pcqm4m-v2-qm9`` (PCQM4Mv2 layout, QM9 molecules)."""
from __future__ import annotations

import csv
import gzip
import hashlib
import io
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2] / "data" / "pcqm4m-v2-qm9"
FILES = (
    "pcqm4m-v2/raw/data.csv.gz",
    "pcqm4m-v2/split_dict.pt",
    "pcqm4m-v2/RELEASE_v1.txt",
    "pcqm4m-v2-train.sdf.tar.gz",
    "qm9_index.csv",
)
SIZES = {"train": 3000, "valid": 500, "test-dev": 250, "test-challenge": 250}
MAX_BYTES = 1_000_000


def _rows() -> list[tuple[int, str, float]]:
    with gzip.open(ROOT / "pcqm4m-v2/raw/data.csv.gz", "rt", newline="") as f:
        reader = csv.reader(f)
        assert next(reader) == ["idx", "smiles", "homolumogap"]
        return [(int(i), s, float(g) if g else math.nan) for i, s, g in reader]


def _sdf_text() -> str:
    with tarfile.open(ROOT / "pcqm4m-v2-train.sdf.tar.gz", "r:gz") as tar:
        assert tar.getnames() == ["pcqm4m-v2-train.sdf"]
        return tar.extractfile("pcqm4m-v2-train.sdf").read().decode()


def _splits() -> dict[str, np.ndarray]:
    import torch

    raw = torch.load(ROOT / "pcqm4m-v2/split_dict.pt", weights_only=True)
    return {k: v.numpy() for k, v in raw.items()}


def test_files_exist_and_are_small():
    for rel in FILES + ("SHA256SUMS",):
        path = ROOT / rel
        assert path.is_file(), f"missing {path}; run scripts/make_demo_data.py"
        assert path.stat().st_size <= MAX_BYTES, rel


def test_checksums_match():
    listed = {}
    for line in (ROOT / "SHA256SUMS").read_text().splitlines():
        digest, rel = line.split("  ", 1)
        listed[rel] = digest
    assert sorted(listed) == sorted(FILES)
    for rel, digest in listed.items():
        assert hashlib.sha256((ROOT / rel).read_bytes()).hexdigest() == digest, rel


def test_split_sizes_and_labels():
    splits = _splits()
    assert {k: len(v) for k, v in splits.items()} == SIZES
    assert all(v.dtype == np.int64 for v in splits.values())
    # train comes first, as in PCQM4Mv2 (SDF record i = row i)
    np.testing.assert_array_equal(splits["train"], np.arange(SIZES["train"]))
    rows = _rows()
    assert [r[0] for r in rows] == list(range(sum(SIZES.values())))
    every = np.concatenate(list(splits.values()))
    assert sorted(every.tolist()) == list(range(len(rows)))
    gaps = np.array([r[2] for r in rows])
    for name in ("train", "valid"):
        g = gaps[splits[name]]
        assert np.isfinite(g).all() and (g > 0.5).all() and (g < 20).all()  # eV
    for name in ("test-dev", "test-challenge"):
        assert np.isnan(gaps[splits[name]]).all()


def test_sdf_aligned_with_train_rows():
    text = _sdf_text()
    records = text.split("$$$$\n")
    assert records[-1] == ""
    assert len(records) - 1 == SIZES["train"]
    Chem = pytest.importorskip("rdkit.Chem")
    from graphormer_ext.featurize.molecules import heavy_formula, smiles_heavy_formula

    rows = _rows()
    mols = Chem.ForwardSDMolSupplier(io.BytesIO(text.encode()))
    for k, mol in zip(range(25), mols):
        assert mol is not None and mol.GetConformer().Is3D()
        assert all(a.GetAtomicNum() > 1 for a in mol.GetAtoms())  # heavy atoms only
        assert heavy_formula(mol) == smiles_heavy_formula(rows[k][1], f"row {k}")
        assert Chem.MolToSmiles(mol) == rows[k][1]


def test_provenance_index():
    with open(ROOT / "qm9_index.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == sum(SIZES.values())
    assert [r["split"] for r in rows[: SIZES["train"]]] == ["train"] * SIZES["train"]
    gdb = [int(r["gdb_index"]) for r in rows]
    assert len(set(gdb)) == len(gdb) and 1 <= min(gdb) and max(gdb) <= 133885


def test_real_ogb_loader_reads_it_offline():
    lsc = pytest.importorskip("ogb.lsc")
    # RELEASE_v1.txt present: no stdin prompt; data.csv.gz present: no download
    ds = lsc.PCQM4Mv2Dataset(root=str(ROOT), only_smiles=True)
    assert len(ds) == sum(SIZES.values())
    split = ds.get_idx_split()
    assert {k: len(v) for k, v in split.items()} == SIZES
    smiles, gap = ds[0]
    assert smiles == _rows()[0][1] and np.isfinite(gap)
    assert np.isnan(ds[int(split["test-dev"][0])][1])


def test_pcqm4mv2_source_reads_it():
    pytest.importorskip("rdkit")
    from graphormer_ext.data import keys
    from graphormer_ext.featurize.pipeline import featurize_record
    from graphormer_ext.sources.pcqm4mv2 import PCQM4Mv2Source

    src = PCQM4Mv2Source(ROOT)
    assert src.splits() == SIZES
    assert src.sdf_path is not None
    assert src.sdf_path.name == "pcqm4m-v2-train.sdf.tar.gz"
    rec = next(src.iter_split("train"))
    assert rec.kind == "molblock" and rec.use_3d and rec.check_smiles == _rows()[0][1]
    out = featurize_record(rec)  # checks the SDF molecule against the CSV SMILES
    assert out[keys.POS].shape[0] == out[keys.X].shape[0]
