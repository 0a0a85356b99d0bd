"""Collator vs the official golden batch; padding, no drops; epoch order, batching."""


import numpy as np
import pytest
import torch

from graphormer_ext.data import keys as K
from graphormer_ext.data.base import EpochDataset, GraphDataset, batch_by_size
from graphormer_ext.data.collator import Collator



@pytest.fixture(scope="module")
def golden():
    from golden_fixture import golden

    return golden()


def _stored_from_preprocessed(pre, max_hops=5):
    """Official ``preprocess_item`` output -> stored record (shifts of keys.py)."""
    return {
        K.X: (pre["x"].numpy() + 1).astype(np.int16),
        K.DEGREE: (pre["in_degree"].numpy() + 1).astype(np.int16),
        K.SPATIAL_POS: (pre["spatial_pos"].numpy() + 1).astype(np.int16),
        K.ATTN_EDGE_TYPE: pre["attn_edge_type"].numpy().astype(np.int16),
        K.EDGE_INPUT: (pre["edge_input"].numpy()[:, :, :max_hops] + 1).astype(np.int16),
        K.POS: pre["pos"].numpy().astype(np.float32),
        K.Y: pre["y"].numpy().astype(np.float32),
    }


@pytest.fixture(scope="module")
def stored(golden):
    return [_stored_from_preprocessed(p) for p in golden["preprocessed"]]


def _assert_batch_equal(got, want):
    """Same keys, shapes and values; index tensors are int32 (the golden batch has int64)."""
    assert set(got) == set(want)
    for key, ref in want.items():
        if ref.dtype == torch.int64 and key != K.IDX:
            assert got[key].dtype == torch.int32, key
        else:
            assert got[key].dtype == ref.dtype, key
        assert got[key].shape == ref.shape, key
        assert torch.equal(got[key].to(ref.dtype), ref), key


def test_golden_batch_from_preprocessed(golden, stored):
    _assert_batch_equal(Collator()(list(enumerate(stored))), golden["batch"])
    exact = Collator(index_dtype=torch.int64)(list(enumerate(stored)))
    for key, ref in golden["batch"].items():  # the official dtypes too
        assert exact[key].dtype == ref.dtype and torch.equal(exact[key], ref), key


def test_golden_batch_from_raw_graphs(golden):
    graph = pytest.importorskip("graphormer_ext.featurize.graph")
    try:
        recs = [
            graph.graph_to_record(
                m["node_feat"].numpy(),
                m["edge_index"].numpy(),
                m["edge_attr"].numpy(),
                pos=np.asarray(m["pos"], dtype=np.float32),
                y=np.asarray([m["y"]], dtype=np.float32),
                max_hops=5,
                path_convention="fixed",
            )
            for m in golden["molecules"]
        ]
    except ImportError as exc:  # compiled algos missing
        pytest.skip(str(exc))
    _assert_batch_equal(Collator()(list(enumerate(recs))), golden["batch"])


def test_golden_batch_from_stored_graphs(golden):
    """The LMDB read path (stored graphs, paths derived in the collator) gives the golden batch."""
    graph = pytest.importorskip("graphormer_ext.featurize.graph")
    recs = [
        graph.graph_to_stored(
            m["node_feat"].numpy(),
            m["edge_index"].numpy(),
            m["edge_attr"].numpy(),
            pos=np.asarray(m["pos"], dtype=np.float32),
            y=np.asarray([m["y"]], dtype=np.float32),
        )
        for m in golden["molecules"]
    ]
    _assert_batch_equal(Collator()(list(enumerate(recs))), golden["batch"])


def test_records_with_idx_and_graph_dataset(golden, stored):
    ds = GraphDataset(_ListDataset(stored), Collator())
    items = [ds[i] for i in range(len(ds))]
    assert items[3][K.IDX] == 3
    _assert_batch_equal(ds.collater(items), golden["batch"])
    assert ds.collater([]) == {}


def test_pad_multiple_keeps_values(golden, stored):
    want = golden["batch"]
    got = Collator(pad_multiple=8)(list(enumerate(stored)))
    n = want[K.X].shape[1]
    assert got[K.X].shape[1] + 1 == 16  # 9 atoms + graph token -> 16
    assert got[K.ATTN_BIAS].shape[1:] == (16, 16)
    for key, ref in want.items():
        g = got[key]
        if key in (K.IDX, K.Y):
            assert torch.equal(g, ref)
            continue
        if key == K.ATTN_BIAS:
            assert torch.equal(g[:, : n + 1, : n + 1], ref)
            assert torch.isneginf(g[:, :, n + 1 :]).all()
            assert (
                g[:, n + 1 :, : n + 1] == ref[:, :1, :]
            ).all()  # padded rows see real keys
            continue
        pair = key in (K.SPATIAL_POS, K.ATTN_EDGE_TYPE, K.EDGE_INPUT, K.NODE_TYPE_EDGE)
        real = g[:, :n, :n] if pair else g[:, :n]
        assert torch.equal(real, ref), key
        pad = g.clone()
        if pair:
            pad[:, :n, :n] = 0
        else:
            pad[:, :n] = 0
        if key == K.NODE_TYPE_EDGE:
            pad[:, :n, :n] = torch.tensor([1, 513])
            assert (pad == torch.tensor([1, 513])).all()
        else:
            assert (pad == 0).all(), key


def test_no_drop_mixed_inputs_and_targets(stored):
    recs = [dict(r) for r in stored]
    del recs[2][K.POS]  # no 3D -> zeros
    del recs[5][K.Y]  # no label -> NaN
    batch = Collator()([(10 + i, r) for i, r in enumerate(recs)])
    assert batch[K.IDX].tolist() == list(range(10, 26))
    assert (batch[K.POS][2] == 0).all()
    assert torch.isnan(batch[K.Y][5]) and torch.isfinite(batch[K.Y][4])
    assert torch.equal(batch[K.DEGREE], batch[K.OUT_DEGREE])
    two = [dict(r, **{K.Y: np.array([1.0, 2.0], np.float32)}) for r in stored[:3]]
    assert Collator()(list(enumerate(two)))[K.Y].shape == (3, 2)
    with pytest.raises(ValueError, match="empty"):
        Collator()([])


def test_hops_and_2d_collator(stored):
    methane = stored[0]
    assert methane[K.EDGE_INPUT].shape == (1, 1, 0, 3)
    batch = Collator()([(0, methane), (1, methane)])
    assert batch[K.EDGE_INPUT].shape == (2, 1, 1, 1, 3)  # one all-padding hop, see below
    assert Collator(max_hops=2)(list(enumerate(stored)))[K.EDGE_INPUT].shape[3] == 2
    b2d = Collator(with_pos=False)(list(enumerate(stored)))
    assert K.POS not in b2d and K.NODE_TYPE_EDGE not in b2d


# --- EpochDataset protocol ------------------------------------------------------------
class _ListDataset:
    def __init__(self, records):
        self.records = records
        self.sizes = np.array(
            [(r[K.NODE_FEAT] if K.NODE_FEAT in r else r[K.X]).shape[0] for r in records],
            dtype=np.int64,
        )
        self.epoch = None

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return self.records[i]

    def set_epoch(self, epoch):
        self.epoch = epoch


def _sized(sizes, **kw):
    recs = [{K.X: np.zeros((int(s), 9), np.int16)} for s in sizes]
    return GraphDataset(_ListDataset(recs), Collator(), **kw)


def test_ordered_indices_and_epochs():
    ds = _sized(np.arange(1, 51) % 7 + 1, shuffle=True, seed=3)
    assert isinstance(ds, EpochDataset)
    ds.set_epoch(1)
    a = ds.ordered_indices()
    assert ds.dataset.epoch == 1 and not ds.can_reuse_epoch_itr_across_epochs
    assert np.array_equal(a, ds.ordered_indices())  # same (seed, epoch) -> same order
    ds.set_epoch(2)
    b = ds.ordered_indices()
    assert ds.dataset.epoch == 2 and not np.array_equal(a, b)
    assert (
        sorted(a.tolist()) == sorted(b.tolist()) == list(range(50))
        and a.dtype == np.int64
    )
    plain = _sized([3, 1, 2])
    assert plain.can_reuse_epoch_itr_across_epochs
    assert plain.ordered_indices().tolist() == [0, 1, 2]
    srt = _sized(np.arange(1, 51) % 7 + 1, shuffle=True, seed=3, sort_by_size=True)
    assert np.all(np.diff(srt.sizes[srt.ordered_indices()]) >= 0)
    assert not ds.supports_prefetch and ds.supports_fetch_outside_dataloader
    assert ds.num_tokens(4) == ds.size(4) == ds.sizes[4]
    assert np.array_equal(ds.num_tokens_vec(np.array([1, 2])), ds.sizes[[1, 2]])


def test_filter_and_max_atoms():
    ds = _sized([3, 10, 4, 12, 5], max_atoms=9)
    kept, ignored = ds.filter_indices_by_size(np.arange(5), 10)
    assert kept.tolist() == [0, 1, 2, 4] and ignored == [3]
    assert ds.filter_indices_by_size(np.arange(5), None)[1] == []
    assert ds.ordered_indices().tolist() == [
        0,
        2,
        4,
    ]  # size filter upstream of the collator


def test_batch_by_size():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 30, size=200)
    ds = _sized(sizes)
    order = rng.permutation(200)
    batches = ds.batch_by_size(order, max_tokens=128)
    assert np.array_equal(np.concatenate(batches), order)  # nothing dropped, order kept
    for b in batches:
        assert b.dtype == np.int64 and sizes[b].max() * len(b) <= 128
    batches = ds.batch_by_size(order, max_sentences=16, required_batch_size_multiple=8)
    assert [len(b) for b in batches] == [16] * 12 + [8]
    batches = ds.batch_by_size(
        order, max_tokens=200, max_sentences=20, required_batch_size_multiple=4
    )
    assert np.array_equal(np.concatenate(batches), order)
    assert all(len(b) <= 20 and sizes[b].max() * len(b) <= 200 for b in batches)
    assert all(len(b) % 4 == 0 for b in batches[:-1])
    assert (
        batch_by_size(np.zeros(0, np.int64), np.zeros(0, np.int64), max_tokens=8) == []
    )
    with pytest.raises(ValueError, match="max_tokens"):
        ds.batch_by_size(order, max_tokens=10)


def test_single_atom_batch_gets_one_padding_hop():
    """A batch of single atoms has no path hop; the collator emits one all-zero hop (the release
    crashed on H = 0), which embeds to padding and leaves the model output unchanged."""
    from graphormer_ext.featurize.graph import graph_to_record

    methane = graph_to_record(
        np.array([[5, 0, 4, 5, 4, 0, 4, 0, 0]]), np.zeros((2, 0), np.int64), np.zeros((0, 3), np.int64)
    )
    batch = Collator(max_hops=5)([dict(methane, idx=0), dict(methane, idx=1)])
    assert tuple(batch[K.EDGE_INPUT].shape) == (2, 1, 1, 1, 3)
    assert int(batch[K.EDGE_INPUT].abs().sum()) == 0
    assert tuple(Collator(max_hops=0)([dict(methane, idx=0)])[K.EDGE_INPUT].shape) == (1, 1, 1, 0, 3)


# --- long-tailed data: size buckets and a byte budget ---------------------------------
def _stored_sized(sizes, seed=0):
    """Stored chains of the given atom counts (real graphs: the collator derives paths)."""
    from graphormer_ext.featurize.graph import graph_to_stored

    recs = []
    for n in sizes:
        bonds = np.array([[i, i + 1] for i in range(int(n) - 1)], dtype=np.int64).reshape(-1, 2)
        recs.append(graph_to_stored(
            np.zeros((int(n), 9), np.int64), np.concatenate([bonds, bonds[:, ::-1]]).T,
            np.zeros((2 * len(bonds), 3), np.int64), y=[float(n)],
        ))  # fmt: skip
    return _ListDataset(recs)


def test_size_buckets_auto_for_long_tailed_data_only(caplog):
    from graphormer_ext.data.base import is_long_tailed, size_bucket

    assert size_bucket(np.array([1, 4, 5, 9, 10, 100])).tolist() == [0, 6, 7, 9, 10, 20]
    rng = np.random.default_rng(0)
    typical = rng.integers(8, 30, size=300)
    assert not is_long_tailed(typical) and is_long_tailed(np.r_[typical, 122])
    plain = GraphDataset(_stored_sized(typical), Collator(), shuffle=True, seed=1)
    assert not plain.size_buckets  # PCQM4Mv2-like sizes keep the release's random batches
    assert np.array_equal(plain.ordered_indices(), EpochDataset.ordered_indices(plain))

    sizes = np.r_[typical, 122, 90, 70]
    caplog.set_level("INFO")
    ds = GraphDataset(_stored_sized(sizes), Collator(), shuffle=True, seed=1)
    assert ds.size_buckets and "long-tailed" in caplog.text
    order = ds.ordered_indices()
    assert sorted(order.tolist()) == list(range(len(sizes)))  # nothing left out
    assert np.all(np.diff(size_bucket(sizes[order])) >= 0)
    ds.set_epoch(2)
    assert not np.array_equal(order, ds.ordered_indices())  # new composition each epoch
    batches = ds.batch_by_size(order, max_sentences=16)
    assert np.array_equal(np.concatenate(batches), order)
    pad_bucketed = sum(len(b) * sizes[b].max() ** 2 for b in batches)
    random = GraphDataset(_stored_sized(sizes), Collator(), shuffle=True, seed=1,
                          size_buckets=False)  # fmt: skip
    rbatches = random.batch_by_size(random.ordered_indices(), max_sentences=16)
    pad_random = sum(len(b) * sizes[b].max() ** 2 for b in rbatches)
    assert pad_bucketed < 0.7 * pad_random, (pad_bucketed, pad_random)
    valid = GraphDataset(_stored_sized(sizes), Collator(), shuffle=False)
    assert valid.ordered_indices().tolist() == list(range(len(sizes)))  # order kept


def test_byte_budget_splits_batches_and_counts_what_cannot_fit(caplog):
    sizes = np.r_[np.full(300, 12), 122, 121]
    coll = Collator(max_batch_bytes=24 * 2**20)
    ds = GraphDataset(_stored_sized(sizes), coll, size_buckets=False)
    order = ds.ordered_indices()
    batches = ds.batch_by_size(order, max_sentences=256)
    assert np.array_equal(np.concatenate(batches), order)  # every molecule, once
    for b in batches:
        assert coll.batch_nbytes(len(b), int(sizes[b].max())) <= coll.max_batch_bytes
        batch = ds.collater([ds[int(i)] for i in b])  # and the collator accepts them
        assert batch[K.IDX].tolist() == b.tolist()
    assert [len(b) for b in batches][-1] <= 2  # the two large ones were split off
    tight = Collator(max_batch_bytes=coll.batch_nbytes(1, 121))
    small = GraphDataset(_stored_sized(sizes), tight, size_buckets=False)
    kept = small.ordered_indices()
    assert len(kept) == len(sizes) - 1 and 300 not in kept  # 122 atoms alone do not fit
    assert "leaving out 1 of 302 molecules larger than a batch" in caplog.text


def test_bucketed_batches_stay_in_their_bucket():
    from graphormer_ext.data.base import size_bucket

    rng = np.random.default_rng(2)
    sizes = np.r_[rng.integers(8, 30, size=400), [122, 90, 70, 60, 55, 50]]
    ds = GraphDataset(_stored_sized(sizes), Collator(), shuffle=True, seed=3)
    order = ds.ordered_indices()
    batches = ds.batch_by_size(order, max_sentences=64)
    assert np.array_equal(np.concatenate(batches), order)
    for b in batches:
        assert len(set(size_bucket(sizes[b]).tolist())) == 1
    big = next(b for b in batches if 400 in b)  # the batch of the 122-atom molecule
    assert sizes[big].min() > 100
