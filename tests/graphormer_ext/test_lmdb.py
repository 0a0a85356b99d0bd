"""LMDB writer and reader: round trip, workers, atomic writes, skip lists, errors."""

import os
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch

from graphormer_ext.data import codec
from graphormer_ext.data import keys as K
from graphormer_ext.data import lmdb_dataset as lmdb_dataset_module
from graphormer_ext.data.base import GraphDataset
from graphormer_ext.data.collator import Collator
from graphormer_ext.data.lmdb_dataset import (
    ChecksumError,
    DatasetFormatError,
    LMDBDataset,
    RecordFormatError,
    SchemaVersionError,
)
from graphormer_ext.data.lmdb_writer import WriteError, skip_list_path, write_split
from graphormer_ext.featurize.graph import expand_record, graph_to_stored
from graphormer_ext.sources.base import MoleculeError, Source, SourceError, SourceRecord


def make_record(seed: int, with_pos: bool = True) -> dict:
    """A random molecular graph in the stored layout of keys.py (random features and bonds)."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 12))
    pairs = {(int(rng.integers(0, i)), i) for i in range(1, n) if rng.random() < 0.9}
    pairs |= {tuple(sorted(map(int, rng.choice(n, 2, replace=False)))) for _ in range(n // 3)}
    bonds = np.array(sorted(pairs), dtype=np.int64).reshape(-1, 2)
    edge_index = np.concatenate([bonds, bonds[:, ::-1]]).T
    bond_feat = rng.integers(0, 5, size=(len(bonds), 3))
    return graph_to_stored(
        rng.integers(0, 120, size=(n, 9)),
        edge_index,
        np.concatenate([bond_feat, bond_feat]),
        pos=rng.normal(size=(n, 3)) if with_pos else None,
        y=rng.normal(size=1),
    )


def fake_featurize(rec: SourceRecord, **kwargs) -> dict:
    """Picklable stand-in for featurize_record: text 'bad' skips, 'fatal' aborts."""
    if rec.text == "bad":
        raise MoleculeError(rec.item, "unparsable\tSMILES")
    if rec.text == "fatal":
        raise SourceError("structure file misaligned")
    out = make_record(int(rec.text), with_pos=rec.use_3d)
    assert kwargs["max_hops"] == 5 and kwargs["path_convention"] == "fixed"
    return out


def source_records(texts, split="train"):
    return [
        SourceRecord(
            split=split,
            index=i,
            item=f"row {i}",
            kind="smiles",
            text=t,
            use_3d=i % 2 == 0,
        )
        for i, t in enumerate(texts)
    ]


def assert_record_equal(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


@pytest.fixture()
def split8(tmp_path):
    recs = [make_record(i, with_pos=i % 3 != 0) for i in range(8)]
    path = tmp_path / "train.lmdb"
    meta = write_split(
        path, recs, split="train", workers=1, progress=False, commit_every=3
    )
    return path, recs, meta


def test_round_trip_and_meta(split8):
    path, recs, meta = split8
    ds = LMDBDataset(path)
    assert len(ds) == 8 == meta["num_entries"] == ds.meta["num_entries"]
    for i, rec in enumerate(recs):
        assert_record_equal(ds[i], rec)
    assert ds.sizes.dtype == np.int64
    assert ds.sizes.tolist() == [r[K.NODE_FEAT].shape[0] for r in recs]
    assert ds.source_index.tolist() == list(range(8))
    m = ds.meta
    assert m["schema_version"] == K.SCHEMA_VERSION and m["split"] == "train"
    assert m["counts"] == {"read": 8, "kept": 8, "skipped": 0}
    ys = np.array([r[K.Y][0] for r in recs], dtype=np.float64)
    assert m["stats"]["y_mean"][0] == pytest.approx(ys.mean())
    assert m["stats"]["y_std"][0] == pytest.approx(ys.std(ddof=1))
    assert m["stats"]["num_atoms_max"] == max(ds.sizes)
    assert m["stats"]["with_pos"] == sum(K.POS in r for r in recs)
    assert {"created", "package_version", "path_convention", "max_hops"} <= set(m)
    sub = LMDBDataset(path, keys=[K.Y])
    assert set(sub[0]) == {K.Y}
    sub = LMDBDataset(path, keys=[K.NODE_FEAT, K.BOND_INDEX, K.BOND_FEAT])
    assert set(sub[0]) == {*K.GRAPH_KEYS, K.PATH_SPEC}  # paths travel with the graph
    with pytest.raises(IndexError):
        ds[8]
    assert not os.path.exists(str(path) + "-lock")
    assert {p.name for p in path.parent.iterdir()} == {
        "train.lmdb",
        "train.skipped.tsv",
    }


def test_dataloader_workers_same_records(split8):
    path, recs, _ = split8
    ds = GraphDataset(LMDBDataset(path), Collator())
    ds[0]  # open the env in the parent first: workers must re-open, not reuse it
    loader = torch.utils.data.DataLoader(
        ds, batch_size=3, shuffle=False, num_workers=2, collate_fn=ds.collater
    )
    batches = list(loader)
    want = [Collator()(list(enumerate(recs))[i : i + 3]) for i in range(0, 8, 3)]
    assert len(batches) == len(want)
    for got, ref in zip(batches, want):
        assert set(got) == set(ref)
        for k in ref:
            assert torch.equal(got[k], ref[k]), k


def test_parallel_featurize_skips_and_contiguous_keys(tmp_path):
    texts = ["0", "bad", "2", "3", "bad", "5", "6", "7", "8", "bad"]
    path = tmp_path / "valid.lmdb"
    meta = write_split(
        path,
        source_records(texts, "valid"),
        featurize=fake_featurize,
        workers=2,
        chunksize=2,
        commit_every=2,
        progress=False,
    )
    assert meta["counts"] == {"read": 10, "kept": 7, "skipped": 3}
    assert meta["split"] == "valid"
    ds = LMDBDataset(path)
    assert len(ds) == 7
    assert ds.source_index.tolist() == [0, 2, 3, 5, 6, 7, 8]
    for i, src in enumerate(ds.source_index):
        want = make_record(int(texts[src]), with_pos=src % 2 == 0)
        assert_record_equal(ds[i], want)
    lines = skip_list_path(path).read_text().splitlines()
    assert lines[0] == "item\treason"
    assert lines[1:] == [
        "row 1\tunparsable SMILES",
        "row 4\tunparsable SMILES",
        "row 9\tunparsable SMILES",
    ]
    lmdb_dataset_module.close_envs()
    with lmdb.open(str(path), subdir=False, readonly=True, lock=False) as env:
        with env.begin() as txn:
            keys = [k for k, _ in txn.cursor()]
    assert keys == [K.record_key(i) for i in range(7)] + [K.INDEX_KEY, K.META_KEY]
    assert K.record_key(3) == b"0000000003"


def test_refuses_overwrite(split8):
    path, recs, _ = split8
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_split(path, recs[:2], workers=1, progress=False)
    assert len(LMDBDataset(path)) == 8
    write_split(path, recs[:2], workers=1, progress=False, overwrite=True)
    assert len(LMDBDataset(path)) == 2


@pytest.mark.parametrize("workers", [1, 2])
def test_failure_leaves_no_file(tmp_path, workers):
    path = tmp_path / "train.lmdb"
    texts = [str(i) for i in range(12)] + ["fatal"] + ["1"] * 5
    with pytest.raises(SourceError, match="misaligned"):
        write_split(
            path,
            source_records(texts),
            featurize=fake_featurize,
            workers=workers,
            chunksize=2,
            commit_every=2,
            progress=False,
        )
    assert list(tmp_path.iterdir()) == []

    def crashing():
        for i in range(10):
            yield make_record(i)
        raise OSError("disk went away")

    with pytest.raises(OSError, match="disk went away"):
        write_split(path, crashing(), workers=1, progress=False, commit_every=2)
    assert list(tmp_path.iterdir()) == []


def test_map_grows(tmp_path):
    recs = [make_record(i) for i in range(40)]
    path = tmp_path / "big.lmdb"
    write_split(
        path, recs, workers=1, progress=False, map_size=1 << 15, commit_every=40
    )
    ds = LMDBDataset(path)
    assert len(ds) == 40
    assert_record_equal(ds[39], recs[39])


def test_meta_length_without_key_scan(split8, monkeypatch):
    path = split8[0]

    class Guard:
        def __init__(self, obj):
            self._obj = obj

        def __getattr__(self, name):
            if name in ("cursor", "__iter__"):
                raise AssertionError("key scan")
            attr = getattr(self._obj, name)
            if name == "begin":
                return lambda *a, **k: Guard(attr(*a, **k))
            return attr

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    real_open = lmdb.open
    monkeypatch.setattr(
        lmdb_dataset_module.lmdb, "open", lambda *a, **k: Guard(real_open(*a, **k))
    )
    ds = LMDBDataset(path)
    assert len(ds) == 8 and ds[7][K.NODE_FEAT].shape[1] == 9


# --- loud failures --------------------------------------------------------------------
def _edit(path, fn):
    lmdb_dataset_module.close_envs()  # py-lmdb: one open environment per file/process
    with lmdb.open(str(path), subdir=False, lock=False) as env:
        with env.begin(write=True) as txn:
            fn(txn)


def test_missing_path_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="graphormer-ext-preprocess") as exc:
        LMDBDataset(tmp_path / "nope.lmdb")
    assert "nope.lmdb" in str(exc.value)
    with pytest.raises(DatasetFormatError, match="directory"):
        LMDBDataset(tmp_path)


def test_garbage_file(tmp_path):
    path = tmp_path / "garbage.lmdb"
    path.write_bytes(os.urandom(20000))
    with pytest.raises(DatasetFormatError, match="not a readable LMDB"):
        LMDBDataset(path)


def test_truncated_file(split8):
    path = split8[0]
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 4096)
    with pytest.raises(DatasetFormatError, match="truncated"):
        LMDBDataset(path)


def test_schema_mismatch(split8):
    path = split8[0]
    meta = LMDBDataset(path).meta
    _edit(
        path,
        lambda t: t.put(K.META_KEY, codec.encode_meta(dict(meta, schema_version=999))),
    )
    with pytest.raises(SchemaVersionError) as exc:
        LMDBDataset(path)
    msg = str(exc.value)
    assert "999" in msg and str(K.SCHEMA_VERSION) in msg
    assert "rebuild it with `graphormer-ext-preprocess" in msg and "--overwrite" in msg


def test_entries_disagree_and_missing_meta(split8):
    path = split8[0]
    meta = LMDBDataset(path).meta
    _edit(
        path, lambda t: t.put(K.META_KEY, codec.encode_meta(dict(meta, num_entries=9)))
    )
    with pytest.raises(DatasetFormatError, match="says 9 records but the file holds 8"):
        LMDBDataset(path)
    _edit(path, lambda t: t.delete(K.META_KEY))
    with pytest.raises(DatasetFormatError, match="no __meta__"):
        LMDBDataset(path)


def test_corrupt_and_missing_record(split8):
    path = split8[0]
    _edit(path, lambda t: t.put(K.record_key(3), b"GXR2\xff\xff\x00\x00garbage"))
    ds = LMDBDataset(path)
    assert ds[2][K.NODE_FEAT].ndim == 2
    with pytest.raises(RecordFormatError, match="record 3"):
        ds[3]

    def drop_five(txn):
        txn.delete(K.record_key(5))
        txn.put(b"stray", b"x")  # keep the entry count consistent

    _edit(path, drop_five)
    with pytest.raises(DatasetFormatError, match="record 5 is missing"):
        LMDBDataset(path)[5]


def test_stats_cli(split8, capsys):
    from graphormer_ext.preprocess import describe_lmdb, main

    path = split8[0]
    row = describe_lmdb(path)
    assert row["kept"] == 8 and row["split"] == "train"
    assert main(["stats", str(path.parent)]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "label mean" in out


class _FakeSource(Source):
    name = "fake"

    def __init__(self, path):
        self.path = path

    def splits(self):
        return {"train": 6, "valid": 2}

    def iter_split(self, split):
        n = self.splits()[split]
        return iter(source_records([str(i) for i in range(n)], split))

    def files(self):
        return [self.path]

    def describe(self):
        return {"source": self.name, "target": "gap", "unit": "eV"}


def test_source_meta_and_limit(tmp_path):
    raw = tmp_path / "raw.txt"
    raw.write_text("molecules")
    src = _FakeSource(raw)
    path = tmp_path / "train.lmdb"
    meta = write_split(
        path, src, split="train", featurize=fake_featurize, workers=1, limit=4,
        progress=False,
    )  # fmt: skip
    assert meta["source"] == {
        "name": "fake",
        "checksum": src.checksum(),
        "describe": {"source": "fake", "target": "gap", "unit": "eV"},
    }
    assert meta["counts"]["read"] == 4 and len(LMDBDataset(path)) == 4


def test_cli_csv_end_to_end(tmp_path, capsys, caplog):
    pytest.importorskip("rdkit")
    pytest.importorskip("graphormer_ext.sources.custom")
    from graphormer_ext.preprocess import main

    csv = tmp_path / "mols.csv"
    csv.write_text(
        "smiles,gap,split\nCCO,1.5,train\nc1ccccc1,2.5,train\nnot_a_smiles,3,train\n"
        "CC(=O)O,4.0,valid\nC,,test\n"
    )
    out = tmp_path / "out"
    argv = ["csv", "--path", str(csv), "--smiles-column", "smiles", "--label-columns",
            "gap", "--split-column", "split", "--out", str(out), "--workers", "1",
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "train" in table and "label mean" in table
    train = LMDBDataset(out / "train.lmdb")
    assert len(train) == 2 and train.meta["counts"]["skipped"] == 1
    assert train.meta["source"]["name"] and train.meta["source"]["checksum"]
    assert "not_a_smiles" in (out / "train.skipped.tsv").read_text()
    assert np.isnan(LMDBDataset(out / "test.lmdb")[0][K.Y]).all()
    assert main(argv) == 2  # refuses to overwrite
    assert "--overwrite" in caplog.text
    assert main(argv + ["--overwrite"]) == 0


# --- schema 2: checksums, old files, stored graphs -------------------------------------
def _flip_bit(path, key, byte, bit=0):
    def flip(txn):
        value = bytearray(txn.get(key))
        value[byte] ^= 1 << bit
        txn.put(key, bytes(value))

    _edit(path, flip)


def test_bit_flip_in_a_record_names_file_and_record(split8):
    path, recs, _ = split8
    ds = LMDBDataset(path)
    raw = ds._connect().get(K.record_key(4))
    y_at = raw.rindex(recs[4][K.Y].tobytes())  # the label's bytes: 5.8 -> 23.3 in schema 1
    _flip_bit(path, K.record_key(4), y_at + 3, bit=1)
    ds = LMDBDataset(path)
    with pytest.raises(ChecksumError) as exc:
        ds[4]
    msg = str(exc.value)
    assert str(path) in msg and "record 4 (source index 4)" in msg and "checksum" in msg
    assert "graphormer-ext-preprocess" in msg
    assert_record_equal(ds[5], recs[5])  # the other records still read


def test_every_single_bit_flip_is_caught(split8):
    """No flipped bit of a record reads back as a (silently different) record."""
    path, recs, _ = split8
    ds = LMDBDataset(path)
    good = bytes(ds._connect().get(K.record_key(1)))
    for bit in range(len(good) * 8):
        value = bytearray(good)
        value[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(RecordFormatError):
            codec.decode(bytes(value))
    assert_record_equal(
        dict(codec.decode(good), **{K.PATH_SPEC: recs[1][K.PATH_SPEC]}), recs[1]
    )


def test_bit_flip_in_meta_and_index(split8):
    path = split8[0]
    _flip_bit(path, K.INDEX_KEY, 40)
    with pytest.raises(DatasetFormatError, match="corrupt index record.*checksum"):
        LMDBDataset(path)
    _flip_bit(path, K.INDEX_KEY, 40)  # back
    LMDBDataset(path)
    _flip_bit(path, K.META_KEY, 30)
    with pytest.raises(DatasetFormatError, match="__meta__.*checksum"):
        LMDBDataset(path)


def _encode_schema1(record: dict) -> bytes:
    """The schema-1 codec (JSON header, 8-byte aligned arrays, no checksum), for old files."""
    import json
    import struct

    header, chunks, offset = [], [], 0
    for name, arr in record.items():
        raw = np.ascontiguousarray(arr).tobytes()
        header.append([name, arr.dtype.str, list(arr.shape), offset])
        chunks.append(raw + b"\0" * ((-len(raw)) % 8))
        offset += len(chunks[-1])
    head = json.dumps(header, separators=(",", ":")).encode()
    prefix = b"GXR1" + struct.pack("<I", len(head)) + head
    return prefix + b"\0" * ((-len(prefix)) % 8) + b"".join(chunks)


def test_schema1_split_asks_for_a_rebuild(tmp_path):
    """A split written by the previous version (per-record model arrays, bare JSON meta)."""
    import json

    path = tmp_path / "train.lmdb"
    rec = expand_record(make_record(0))
    with lmdb.open(str(path), subdir=False, lock=False) as env:
        with env.begin(write=True) as txn:
            txn.put(b"0", _encode_schema1(rec))
            txn.put(K.INDEX_KEY, _encode_schema1(
                {K.SIZES: np.array([rec[K.X].shape[0]]), K.SOURCE_INDEX: np.array([0])}
            ))
            txn.put(K.META_KEY, json.dumps({
                "schema_version": 1, "num_entries": 1, "split": "train",
                "path_convention": "fixed", "max_hops": 5,
                "preprocess_args": {"command": "pcqm4mv2", "out": str(tmp_path)},
            }).encode())  # fmt: skip
    with pytest.raises(SchemaVersionError) as exc:
        LMDBDataset(path)
    msg = str(exc.value)
    assert "schema version 1" in msg and f"version {K.SCHEMA_VERSION}" in msg
    assert f"`graphormer-ext-preprocess pcqm4mv2 ... --out {tmp_path} --overwrite`" in msg
    with pytest.raises(RecordFormatError, match="schema-1 record"):
        codec.decode(_encode_schema1(rec))


def test_model_records_are_stored_as_their_graph(tmp_path):
    """A featurizer returning model records (graph_to_record) is stored exactly; arrays that
    the graph does not derive (hand-made paths, another convention) stop the run."""
    recs = [expand_record(make_record(i)) for i in range(5)]
    path = tmp_path / "train.lmdb"
    write_split(path, recs, workers=1, progress=False)
    from graphormer_ext.data.collator import Collator

    ds = LMDBDataset(path)
    got = Collator()([(i, ds[i]) for i in range(5)])
    want = Collator()(list(enumerate(recs)))
    for key in want:
        assert torch.equal(got[key], want[key]), key
    bad = dict(recs[3])
    bad[K.EDGE_INPUT] = bad[K.EDGE_INPUT].copy()
    if bad[K.EDGE_INPUT].size:
        bad[K.EDGE_INPUT].flat[0] += 1
    else:
        bad[K.SPATIAL_POS] = bad[K.SPATIAL_POS] + 1
    with pytest.raises(WriteError, match="differs from the one derived"):
        write_split(tmp_path / "bad.lmdb", recs[:3] + [bad], workers=1, progress=False)
    legacy = graph_to_stored(
        np.zeros((1, 9), np.int64), np.zeros((2, 0), np.int64), np.zeros((0, 3), np.int64),
        path_convention="legacy",
    )
    with pytest.raises(WriteError, match="path settings"):
        write_split(tmp_path / "mixed.lmdb", [legacy], workers=1, progress=False)
    assert not (tmp_path / "bad.lmdb").exists() and not (tmp_path / "mixed.lmdb").exists()


def test_records_are_compact(tmp_path):
    """Stored graphs, not model arrays: a 30-atom chain record stays small on disk."""
    n = 30
    bonds = np.array([[i, i + 1] for i in range(n - 1)])
    rec = graph_to_stored(
        np.ones((n, 9), np.int64), np.concatenate([bonds, bonds[:, ::-1]]).T,
        np.ones((2 * (n - 1), 3), np.int64), y=[1.0],
    )  # fmt: skip
    stored = {k: v for k, v in rec.items() if k != K.PATH_SPEC}
    buf = codec.encode(stored)
    assert rec[K.NODE_FEAT].dtype == rec[K.BOND_INDEX].dtype == np.uint8
    assert len(buf) < 9 * n + 5 * (n - 1) + 4 + 100  # payload + < 100 B of header
    assert len(codec.encode(expand_record(rec))) > 20 * len(buf)


def test_readme_reading_a_record_snippet(split8, capsys):
    """The README's 'Reading a record' code runs (on a tiny split instead of PCQM4Mv2)."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = readme.index("Reading a record")
    code = readme[readme.index("```python", start) + len("```python") :]
    code = code[: code.index("```")]
    assert 'LMDBDataset("lmdb/pcqm4mv2/train.lmdb")' in code
    exec(code.replace("lmdb/pcqm4mv2/train.lmdb", str(split8[0])), {})  # noqa: S102
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("8 fixed {'node_feat': (")
    assert "'edge_input': (" in out[1]


def test_per_record_bytes_travel_with_the_graph(tmp_path):
    """A per-record bytes field (e.g. the source SMILES as uint8) is stored, checksummed,
    read back exactly, and ignored by the collator."""
    from graphormer_ext.data.collator import Collator

    recs = []
    for i in range(4):
        rec = make_record(i)
        rec["smiles"] = np.frombuffer(f"C{'C' * i}O".encode(), dtype=np.uint8)
        recs.append(rec)
    path = tmp_path / "train.lmdb"
    write_split(path, recs, workers=1, progress=False)
    ds = LMDBDataset(path)
    for i, rec in enumerate(recs):
        assert_record_equal(ds[i], rec)
        assert ds[i]["smiles"].tobytes().decode() == f"C{'C' * i}O"
    with_text = Collator()([(i, ds[i]) for i in range(4)])
    without = Collator()([(i, {k: v for k, v in ds[i].items() if k != "smiles"})
                          for i in range(4)])  # fmt: skip
    assert set(with_text) == set(without)
    assert all(torch.equal(with_text[k], without[k]) for k in without)
