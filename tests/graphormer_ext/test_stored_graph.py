"""Stored graphs (LMDB schema 2) -> model arrays: the compiled read-path kernels against the
NumPy reference, batch layout, the collator's two paths, bad stored data.

Tier A: CPU only, no fairseq.
"""
from pathlib import Path

import numpy as np
import pytest
import torch

from graphormer_ext import algos, algos_ref
from graphormer_ext.data import keys as K
from graphormer_ext.data.collator import Collator, batch_bytes
from graphormer_ext.featurize.graph import expand_record, graph_to_record, graph_to_stored


def _random_graph(rng, n, extra=None, components=1):
    """Raw OGB-like features and one row per bond (a random forest plus extra bonds)."""
    bonds = set()
    cut = sorted(rng.choice(np.arange(1, n), components - 1, replace=False)) if n > 1 else []
    starts = [0, *cut]
    for i in range(1, n):
        root = max(s for s in starts if s <= i)
        if i != root:
            bonds.add((int(rng.integers(root, i)), i))
    for _ in range(n // 3 if extra is None else extra):
        a, b = sorted(int(v) for v in rng.integers(0, n, 2))
        same = max(s for s in starts if s <= a) == max(s for s in starts if s <= b)
        if a != b and same:
            bonds.add((a, b))
    perm = rng.permutation(n)  # atom 0 anywhere, bond rows in random orientation
    pairs = np.array([(perm[a], perm[b]) for a, b in sorted(bonds)], dtype=np.int64)
    pairs = pairs.reshape(-1, 2)
    flip = rng.random(len(pairs)) < 0.5
    pairs[flip] = pairs[flip][:, ::-1]
    node_feat = rng.integers(0, 120, size=(n, K.NUM_ATOM_FEATURES))
    bond_feat = rng.integers(0, 6, size=(len(pairs), K.NUM_BOND_FEATURES))
    return node_feat, pairs, bond_feat


def _reference(node_feat, pairs, bond_feat, max_hops, legacy):
    """Model arrays from the NumPy reference kernels (an implementation independent of
    algos.expand_graph) and the offsets of keys.py; for large graphs the int64 kernels
    floyd_warshall + gen_edge_input (tested against the NumPy reference in test_algos)."""
    impl = algos_ref if len(node_feat) <= 64 else algos
    n = len(node_feat)
    adj = np.zeros((n, n), dtype=np.int64)
    aet = np.zeros((n, n, 3), dtype=np.int64)
    shifted = bond_feat + K.EDGE_TYPE_SHIFT + K.FEATURE_OFFSET * np.arange(3)
    for (a, b), f in zip(pairs, shifted):
        adj[a, b] = adj[b, a] = 1
        aet[a, b] = aet[b, a] = f
    dist, path = impl.floyd_warshall(adj, legacy)
    reach = dist[dist < impl.UNREACHABLE]
    hops = int(reach.max()) if reach.size else 0
    if max_hops:
        hops = min(hops, max_hops)
    ei = impl.gen_edge_input(hops, path, aet, legacy)  # -1 = unused
    return (
        node_feat + K.X_SHIFT + K.FEATURE_OFFSET * np.arange(K.NUM_ATOM_FEATURES),
        adj.sum(1) + K.DEGREE_SHIFT,
        dist + K.SPATIAL_SHIFT,
        aet,
        ei + 1,
    )


CASES = [(n, c) for n in (1, 2, 3, 7, 16, 31, 50) for c in (1, 2)] + [(300, 1), (280, 3)]


@pytest.mark.parametrize("n,components", CASES)
@pytest.mark.parametrize("legacy", [False, True])
def test_expand_graph_equals_reference(n, components, legacy):
    rng = np.random.default_rng(n * 10 + components + 1000 * legacy)
    node_feat, pairs, bond_feat = _random_graph(rng, n, components=min(components, n))
    dtype = np.uint8 if n <= 256 else np.uint16
    for max_hops in (None, 1, 3, 5):
        got = algos.expand_graph(
            node_feat.astype(np.uint8), pairs.astype(dtype), bond_feat.astype(np.uint8),
            max_hops, legacy,
        )  # fmt: skip
        want = _reference(node_feat, pairs, bond_feat, max_hops, legacy)
        for key, g, w in zip(K.MODEL_KEYS, got, want):
            assert g.dtype == np.int16 and g.shape == w.shape, (key, g.shape, w.shape)
            np.testing.assert_array_equal(g, w, err_msg=f"{key} max_hops={max_hops}")


def test_kernel_constants_are_those_of_keys():
    c = algos.GRAPH_FEATURE_CONSTANTS
    assert c["NUM_ATOM_FEATURES"] == K.NUM_ATOM_FEATURES
    assert c["NUM_BOND_FEATURES"] == K.NUM_BOND_FEATURES
    assert c["FEATURE_OFFSET"] == K.FEATURE_OFFSET
    assert c["X_SHIFT"] == K.X_SHIFT and c["EDGE_TYPE_SHIFT"] == K.EDGE_TYPE_SHIFT
    assert c["MAX_RAW_FEATURE"] == K.FEATURE_OFFSET - K.X_SHIFT - 1
    assert K.EDGE_INPUT_SHIFT == K.EDGE_TYPE_SHIFT + 1 and K.EDGE_INPUT_NO_BOND == 1
    from graphormer_ext.featurize import graph

    assert graph._UNREACHABLE == algos.UNREACHABLE


@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.int64])
@pytest.mark.parametrize("legacy", [False, True])
def test_collate_graphs_equals_padded_expand(dtype, legacy):
    rng = np.random.default_rng(7)
    graphs = [_random_graph(rng, int(n), components=1 + (n % 3 == 0)) for n in
              (1, 5, 12, 3, 27, 9, 2, 18)]  # fmt: skip
    n_pad = 31
    for max_hops, min_hops in ((5, 1), (2, 1), (0, 0), (5, 7)):
        stored = [(f.astype(np.uint8), p.astype(np.uint8), b.astype(np.uint8))
                  for f, p, b in graphs]  # fmt: skip
        x, deg, sp, aet, ei, sizes, nte = algos.collate_graphs(
            stored, n_pad, max_hops, legacy, min_hops, dtype, True
        )
        assert nte.shape == (len(graphs), n_pad, n_pad, 2) and nte.dtype == dtype
        singles = [algos.expand_graph(*g, max_hops or None, legacy) for g in stored]
        hops = max(min(max(s[4].shape[2] for s in singles), max_hops), min_hops)
        assert ei.shape == (len(graphs), n_pad, n_pad, hops, 3)
        assert sizes.tolist() == [len(g[0]) for g in graphs]
        for arr in (x, deg, sp, aet, ei):
            assert arr.dtype == dtype
        for b, (gx, gd, gs, ga, ge) in enumerate(singles):
            n, h = len(gx), min(ge.shape[2], hops) if max_hops else 0
            for got, want in ((x[b, :n], gx), (deg[b, :n], gd), (sp[b, :n, :n], gs),
                              (aet[b, :n, :n], ga), (ei[b, :n, :n, :h], ge[:, :, :h])):
                np.testing.assert_array_equal(got, want)  # fmt: skip
            assert not x[b, n:].any() and not deg[b, n:].any()  # padding is 0
            for arr in (sp, aet, ei):
                assert not arr[b, n:].any() and not arr[b, :, n:].any()
            assert not ei[b, :, :, h:].any()
            real = np.zeros((n_pad, n_pad), bool)
            real[:n, :n] = True
            x0 = x[b, :, 0].astype(np.int64)
            np.testing.assert_array_equal(
                nte[b, ..., 0], np.where(real, x0[:, None] + K.NODE_TYPE_I_SHIFT, 1)
            )
            np.testing.assert_array_equal(
                nte[b, ..., 1], np.where(real, x0[None, :] + K.NODE_TYPE_J_SHIFT, 513)
            )


def test_stored_and_model_records_collate_alike():
    rng = np.random.default_rng(3)
    for convention in K.PATH_CONVENTIONS:
        stored, model = [], []
        for i, n in enumerate((4, 17, 1, 9, 23)):
            f, p, b = _random_graph(rng, n, components=1 + i % 2)
            ei = np.concatenate([p, p[:, ::-1]]).T
            ea = np.concatenate([b, b])
            args = dict(pos=rng.normal(size=(n, 3)), y=[float(i)], path_convention=convention)
            if i == 2:
                args.pop("pos")
            stored.append(graph_to_stored(f, ei, ea, **args))
            model.append(graph_to_record(f, ei, ea, **args))
            assert set(expand_record(stored[-1])) == set(model[-1])
        for kw in ({}, {"pad_multiple": 8}, {"max_hops": 2}, {"with_pos": False},
                   {"index_dtype": torch.int64}):  # fmt: skip
            a = Collator(**kw)(list(enumerate(stored)))
            b = Collator(**kw)(list(enumerate(model)))
            mixed = Collator(**kw)(list(enumerate(stored[:2] + model[2:])))
            assert set(a) == set(b) == set(mixed)
            for key in b:
                assert a[key].dtype == b[key].dtype == mixed[key].dtype, key
                assert torch.equal(a[key], b[key]) and torch.equal(mixed[key], b[key]), key


def test_bad_stored_graphs_name_the_record():
    ok = graph_to_stored(np.zeros((3, 9), np.int64), np.array([[0, 1], [1, 0]]),
                         np.zeros((2, 3), np.int64))  # fmt: skip
    for change, match in (
        ({K.BOND_INDEX: np.array([[0, 3]], np.uint8)}, "outside"),
        ({K.BOND_INDEX: np.array([[1, 1]], np.uint8)}, "self-loop"),
        ({K.NODE_FEAT: np.full((3, 9), 510, np.uint16)}, "outside"),
        ({K.BOND_FEAT: np.zeros((2, 3), np.uint8)}, "bond_feat has 2 rows"),
    ):
        bad = dict(ok, **change)
        with pytest.raises(ValueError, match=match):
            expand_record(bad)
        with pytest.raises(ValueError, match="record idx=11") as exc:
            Collator()([(10, ok), (11, bad)])
        assert match in str(exc.value)
    legacy = dict(ok, **{K.PATH_SPEC: K.path_spec(5, "legacy")})
    with pytest.raises(ValueError, match="different path settings"):
        Collator()([(0, ok), (1, legacy)])
    with pytest.raises(KeyError, match="path_spec"):
        Collator()([(0, {k: v for k, v in ok.items() if k != K.PATH_SPEC})])


def test_batch_byte_cap_refuses_instead_of_allocating():
    rng = np.random.default_rng(0)
    f, p, b = _random_graph(rng, 120)
    big = graph_to_stored(f, np.concatenate([p, p[:, ::-1]]).T, np.concatenate([b, b]))
    small = graph_to_stored(f[:5], np.zeros((2, 0), np.int64), np.zeros((0, 3), np.int64))
    samples = [(i, small) for i in range(255)] + [(255, big)]
    need = batch_bytes(256, 120, 5, True)
    assert need > 200 * 2**20  # one 120-atom molecule pads all 256 to 120 atoms
    with pytest.raises(ValueError, match=r"256 molecules padded to 120 atoms.*max_batch_bytes"):
        Collator(max_batch_bytes=128 * 2**20)(samples)
    out = Collator(max_batch_bytes=None)(samples[-3:])
    assert out[K.EDGE_INPUT].shape[:3] == (3, 120, 120)


@pytest.mark.parametrize("convention", K.PATH_CONVENTIONS)
def test_featurize_stored_equals_the_ogb_graph_path(convention):
    """The featurizer's fast path (one row per RDKit bond) stores the graph whose model
    record equals graph_to_record of ogb.utils.smiles2graph, on real NCI molecules."""
    pytest.importorskip("rdkit")
    ogb = pytest.importorskip("ogb.utils")
    from rdkit import RDConfig

    from graphormer_ext.featurize.pipeline import featurize_record, featurize_stored
    from graphormer_ext.sources.base import SourceRecord

    path = Path(RDConfig.RDDataDir) / "NCI" / "first_5K.smi"
    if not path.exists():
        pytest.skip(f"{path} not shipped with this RDKit")
    lines = path.read_text().splitlines()[:400:10]  # 40 molecules, up to 50 atoms
    for i, line in enumerate(lines):
        smiles = line.split()[0]
        rec = SourceRecord(split="t", index=i, item=f"line {i}", kind="smiles", text=smiles)
        try:
            graph = ogb.smiles2graph(smiles)
        except Exception:  # noqa: BLE001 - RDKit cannot read it: skipped by both
            continue
        stored = featurize_stored(rec, path_convention=convention)
        want = graph_to_record(
            graph["node_feat"], graph["edge_index"], graph["edge_feat"],
            path_convention=convention,
        )  # fmt: skip
        got = expand_record(stored)
        for key in K.MODEL_KEYS:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"{smiles} {key}")
        model = featurize_record(rec, path_convention=convention)
        assert all(np.array_equal(model[k], want[k]) for k in K.MODEL_KEYS)
