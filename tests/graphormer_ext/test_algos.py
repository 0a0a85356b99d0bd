"""Compiled path kernels vs the NumPy reference, the baseline re-creation, scipy and the golden.

Tier A: CPU only, no fairseq.
"""
import sys

import numpy as np
import pytest
from scipy.sparse.csgraph import shortest_path

from graphormer_ext import _algos_legacy as baseline
from graphormer_ext import algos, algos_ref

IMPLS = {"fast": algos, "ref": algos_ref, "baseline": baseline}
U = algos.UNREACHABLE


# --- graph generators (undirected, symmetric 0/1 int64 adjacency) --------------------------------
def _sym(n, edges):
    adj = np.zeros((n, n), dtype=np.int64)
    for a, b in edges:
        adj[a, b] = adj[b, a] = 1
    return adj


def _tree(rng, n):
    return _sym(n, [(i, int(rng.integers(0, i))) for i in range(1, n)])


def _connected(rng, n, extra):
    adj = _tree(rng, n)
    for _ in range(extra):
        a, b = rng.integers(0, n, size=2)
        if a != b:
            adj[a, b] = adj[b, a] = 1
    perm = rng.permutation(n)  # so that atom 0 is not always the tree root
    return adj[np.ix_(perm, perm)]


def _ring(n):
    return _sym(n, [(i, (i + 1) % n) for i in range(n)])


def _disconnected(rng, sizes):
    blocks = [_connected(rng, s, s // 2) for s in sizes]
    n = sum(sizes)
    adj = np.zeros((n, n), dtype=np.int64)
    at = 0
    for blk in blocks:
        adj[at : at + len(blk), at : at + len(blk)] = blk
        at += len(blk)
    perm = rng.permutation(n)
    return adj[np.ix_(perm, perm)]


def _dense(rng, n, p):
    upper = np.triu(rng.random((n, n)) < p, 1)
    return (upper | upper.T).astype(np.int64)


def _graphs():
    rng = np.random.default_rng(1234)
    cases = {
        "single_atom": np.zeros((1, 1), dtype=np.int64),
        "two_atoms": _sym(2, [(0, 1)]),
        "no_edges": np.zeros((5, 5), dtype=np.int64),
        "ring6": _ring(6),
        "ring9": _ring(9),
        "complete7": np.ones((7, 7), dtype=np.int64) - np.eye(7, dtype=np.int64),
        "path12": _sym(12, [(i, i + 1) for i in range(11)]),
        "fused_rings": _sym(10, [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 0), (3, 6),
                                 (6, 7), (7, 8), (8, 9), (9, 4), (2, 7)]),
    }
    for t in range(4):
        cases[f"tree{t}"] = _tree(rng, int(rng.integers(5, 30)))
    for t in range(6):
        cases[f"connected{t}"] = _connected(rng, int(rng.integers(5, 30)), int(rng.integers(0, 10)))
    for t in range(4):
        sizes = [int(s) for s in rng.integers(1, 10, size=3)]
        cases[f"disconnected{t}"] = _disconnected(rng, sizes)
    for t in range(2):
        cases[f"dense{t}"] = _dense(rng, int(rng.integers(8, 24)), 0.5)
    return cases


GRAPHS = _graphs()


def _edge_feat(adj, n_feat=3, seed=0):
    """Distinct nonzero features on edges (so that a non-bond hop, 0, is always visible)."""
    rng = np.random.default_rng(seed)
    n = len(adj)
    feat = rng.integers(1, 500, size=(n, n, n_feat)) * (adj[..., None] != 0)
    return feat.astype(np.int64)


def _max_reachable(dist):
    return int(dist[dist < U].max())


# --- constants and Floyd–Warshall ---------------------------------------------------------------
def test_unreachable_constant_is_shared():
    assert algos.UNREACHABLE == algos_ref.UNREACHABLE == baseline.UNREACHABLE == 510


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("name", sorted(GRAPHS))
def test_floyd_warshall_matches_ref_baseline_scipy(name, legacy):
    adj = GRAPHS[name]
    dist, path = algos.floyd_warshall(adj, legacy_atom0=legacy)
    assert dist.dtype == path.dtype == np.int64
    for impl in (algos_ref, baseline):
        d2, p2 = impl.floyd_warshall(adj, legacy_atom0=legacy)
        np.testing.assert_array_equal(dist, d2)
        np.testing.assert_array_equal(path, p2)
    expected = shortest_path(adj, unweighted=True, directed=False)
    expected = np.where(np.isinf(expected), U, expected).astype(np.int64)
    np.testing.assert_array_equal(dist, expected)
    np.testing.assert_array_equal(path[dist == U], U)
    np.testing.assert_array_equal(np.diag(path), 0 if legacy else -1)


def test_floyd_warshall_accepts_bool_and_noncontiguous_input():
    adj = GRAPHS["connected0"]
    d_ref, p_ref = algos.floyd_warshall(adj)
    for variant in (adj.astype(bool), adj.astype(np.uint8), np.asfortranarray(adj), adj.T, 3 * adj):
        d, p = algos.floyd_warshall(variant)
        np.testing.assert_array_equal(d, d_ref)
        np.testing.assert_array_equal(p, p_ref)


def test_floyd_warshall_max_size_graph():
    rng = np.random.default_rng(7)
    for adj in (_connected(rng, 128, 40), _disconnected(rng, [60, 40, 28])):
        d, p = algos.floyd_warshall(adj)
        d2, p2 = algos_ref.floyd_warshall(adj)
        np.testing.assert_array_equal(d, d2)
        np.testing.assert_array_equal(p, p2)
    # the largest supported size: a path whose end-to-end distance is 509 < UNREACHABLE
    n = U
    chain = _sym(n, [(i, i + 1) for i in range(n - 1)])
    d, _ = algos.floyd_warshall(chain)
    assert d[0, n - 1] == n - 1 and d.max() == n - 1


def test_fixed_and_legacy_path_matrices_differ_only_in_init():
    for adj in GRAPHS.values():
        _, fixed = algos.floyd_warshall(adj)
        _, legacy = algos.floyd_warshall(adj, legacy_atom0=True)
        np.testing.assert_array_equal(legacy, np.where(fixed == -1, 0, fixed))


# --- path-edge features -------------------------------------------------------------------------
@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("name", sorted(GRAPHS))
def test_gen_edge_input_matches_ref_and_baseline(name, legacy):
    adj = GRAPHS[name]
    feat = _edge_feat(adj)
    dist, path = algos.floyd_warshall(adj, legacy_atom0=legacy)
    # the original allocates max(dist) hops (510 if disconnected); keep that for small graphs
    full = int(dist.max()) if len(adj) <= 30 else _max_reachable(dist)
    for max_dist in sorted({0, 1, 3, _max_reachable(dist), full}):
        out = algos.gen_edge_input(max_dist, path, feat, legacy_atom0=legacy)
        assert out.shape == (len(adj), len(adj), max_dist, feat.shape[2])
        assert out.dtype == np.int64
        for impl in (algos_ref, baseline):
            np.testing.assert_array_equal(out, impl.gen_edge_input(max_dist, path, feat, legacy))
    out = algos.gen_edge_input(full, path, feat, legacy_atom0=legacy)
    assert (out[dist == U] == -1).all()
    assert (out[np.arange(len(adj)), np.arange(len(adj))] == -1).all()
    if not legacy:  # every pair uses exactly dist[i, j] hops, each over a real bond
        hops_used = (out != -1).all(-1).sum(-1)
        np.testing.assert_array_equal(hops_used, np.where(dist == U, 0, np.minimum(dist, full)))
        assert (out[(out != -1).all(-1)] > 0).all()


def _node_path(path, i, j):
    k = path[i, j]
    if k == -1:
        return [i, j]
    return _node_path(path, i, k)[:-1] + _node_path(path, k, j)


@pytest.mark.parametrize("name", sorted(GRAPHS))
def test_legacy_differs_from_fixed_exactly_on_paths_through_atom0(name):
    adj = GRAPHS[name]
    feat = _edge_feat(adj)
    dist, fixed_path = algos.floyd_warshall(adj)
    hops = _max_reachable(dist)
    fixed = algos.gen_edge_input(hops, fixed_path, feat)
    _, legacy_path = algos.floyd_warshall(adj, legacy_atom0=True)
    legacy = algos.gen_edge_input(hops, legacy_path, feat, legacy_atom0=True)
    n = len(adj)
    for i in range(n):
        for j in range(n):
            via0 = i != j and dist[i, j] < U and 0 in _node_path(fixed_path, i, j)[1:-1]
            differs = not np.array_equal(fixed[i, j], legacy[i, j])
            assert differs == via0, (i, j)
            if via0:  # the defect: some hop is read from a non-bonded pair (feature 0)
                assert (legacy[i, j] == 0).all(-1).any()


def test_gen_edge_input_rejects_malformed_path():
    adj = _sym(3, [(0, 1), (1, 2)])
    feat = _edge_feat(adj)
    _, path = algos.floyd_warshall(adj)
    cyc = path.copy()
    cyc[0, 1] = 2  # with path[0, 2] == 1 the split tree of (0, 2) never bottoms out
    assert path[0, 2] == 1
    with pytest.raises(ValueError, match="Floyd"):
        algos.gen_edge_input(5, cyc, feat)
    bad = path.copy()
    bad[0, 2] = 7  # not a node
    with pytest.raises(ValueError, match="Floyd"):
        algos.gen_edge_input(2, bad, feat)
    with pytest.raises(ValueError, match="Floyd"):  # fixed matrix read as legacy: -1 is invalid
        algos.gen_edge_input(2, path, feat, legacy_atom0=True)


# --- fused kernel -------------------------------------------------------------------------------
@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("name", sorted(GRAPHS))
def test_shortest_path_features_matches_two_step(name, legacy):
    adj = GRAPHS[name]
    feat = _edge_feat(adj, n_feat=2, seed=3)
    dist, path = algos.floyd_warshall(adj, legacy_atom0=legacy)
    reach = _max_reachable(dist)
    full = algos.gen_edge_input(reach, path, feat, legacy_atom0=legacy)
    for max_hops in (None, 0, -1, 1, 2, 5, 1000):
        d, ei = algos.shortest_path_features(adj, feat, max_hops, legacy_atom0=legacy)
        hops = reach if not max_hops or max_hops <= 0 else min(reach, max_hops)
        np.testing.assert_array_equal(d, dist)
        np.testing.assert_array_equal(ei, full[:, :, :hops])
        d_ref, ei_ref = algos_ref.shortest_path_features(adj, feat, max_hops, legacy)
        np.testing.assert_array_equal(d_ref, d)
        np.testing.assert_array_equal(ei_ref, ei)


def test_shortest_path_features_disconnected_never_allocates_unreachable_hops():
    adj = GRAPHS["no_edges"]
    dist, ei = algos.shortest_path_features(adj, _edge_feat(adj), None)
    assert ei.shape == (5, 5, 0, 3)
    assert (dist == U - U * np.eye(5, dtype=np.int64)).all()
    adj = _disconnected(np.random.default_rng(0), [3, 4])
    dist, ei = algos.shortest_path_features(adj, _edge_feat(adj), None)
    assert dist.max() == U and ei.shape[2] == _max_reachable(dist) < 5


def test_shortest_path_features_max_size_matches_baseline():
    rng = np.random.default_rng(11)
    adj = _connected(rng, 128, 30)
    feat = _edge_feat(adj, seed=5)
    dist, ei = algos.shortest_path_features(adj, feat, 5)
    d_b, p_b = baseline.floyd_warshall(adj)
    full = baseline.gen_edge_input(int(d_b.max()), p_b, feat)
    np.testing.assert_array_equal(dist, d_b)
    np.testing.assert_array_equal(ei, full[:, :, :5])


# --- golden: official preprocessing (fixed paths) of 16 real molecules --------------------------
@pytest.fixture(scope="module")
def golden():
    from golden_fixture import golden

    return golden()


def _golden_inputs(pre):
    feat = pre["attn_edge_type"].numpy()
    adj = (feat != 0).any(-1).astype(np.int64)
    return adj, feat


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_golden_paths_and_edge_input(golden, impl):
    mod = IMPLS[impl]
    for idx, pre in enumerate(golden["preprocessed"]):
        adj, feat = _golden_inputs(pre)
        dist, path = mod.floyd_warshall(adj)
        np.testing.assert_array_equal(dist, pre["spatial_pos"].numpy(), err_msg=f"mol {idx}")
        np.testing.assert_array_equal(path, pre["fw_path"].numpy(), err_msg=f"mol {idx}")
        edge_input = mod.gen_edge_input(int(dist.max()), path, feat)
        np.testing.assert_array_equal(edge_input, pre["edge_input"].numpy(), err_msg=f"mol {idx}")
        d2, ei2 = algos.shortest_path_features(adj, feat, None)
        np.testing.assert_array_equal(d2, dist)
        np.testing.assert_array_equal(ei2, pre["edge_input"].numpy(), err_msg=f"mol {idx}")


def test_golden_legacy_atom0_defect(golden):
    documented = {5: {(1, 5), (5, 1)}, 7: {(1, 3), (3, 1)}, 14: {(1, 6), (6, 1)}}
    for idx, pre in enumerate(golden["preprocessed"]):
        adj, feat = _golden_inputs(pre)
        dist, path = algos.floyd_warshall(adj, legacy_atom0=True)
        ei = algos.gen_edge_input(int(dist.max()), path, feat, legacy_atom0=True)
        slow = baseline.gen_edge_input(int(dist.max()), path, feat, True)
        np.testing.assert_array_equal(slow, ei)
        fixed = pre["edge_input"].numpy()
        differs = {tuple(p) for p in np.argwhere((ei != fixed).any(-1).any(-1)).tolist()}
        assert differs == documented.get(idx, set()), idx
    pre = golden["preprocessed"][5]
    adj, feat = _golden_inputs(pre)
    dist, path = algos.floyd_warshall(adj, legacy_atom0=True)
    ei = algos.gen_edge_input(int(dist.max()), path, feat, legacy_atom0=True)
    official = [[0, 0, 0], [-1, -1, -1], [-1, -1, -1]]
    assert ei[1, 5].tolist() == official and ei[5, 1].tolist() == official


# --- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["fast", "ref"])
def test_bad_adjacency(impl):
    mod = IMPLS[impl]
    with pytest.raises(ValueError, match="N = 0"):
        mod.floyd_warshall(np.zeros((0, 0), dtype=np.int64))
    with pytest.raises(ValueError, match="square"):
        mod.floyd_warshall(np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="square"):
        mod.floyd_warshall(np.zeros(4, dtype=np.int64))
    with pytest.raises(ValueError, match="511"):
        mod.floyd_warshall(np.zeros((U + 1, U + 1), dtype=np.int64))
    adj = _ring(4)
    with pytest.raises(ValueError, match="N = 0"):
        mod.shortest_path_features(np.zeros((0, 0), dtype=np.int64), np.zeros((0, 0, 3)), 5)
    with pytest.raises(ValueError, match="edge_feat"):
        mod.shortest_path_features(adj, np.zeros((4, 3, 3), dtype=np.int64), 5)
    _, path = mod.floyd_warshall(adj)
    with pytest.raises(ValueError, match="max_dist"):
        mod.gen_edge_input(-1, path, _edge_feat(adj))
    with pytest.raises(ValueError, match="N = 0"):
        mod.gen_edge_input(1, np.zeros((0, 0), dtype=np.int64), np.zeros((0, 0, 3), dtype=np.int64))


def test_bad_dtypes_fast():
    with pytest.raises(ValueError, match="integer"):
        algos.floyd_warshall(np.ones((3, 3)) * 0.5)
    adj = _ring(4)
    with pytest.raises(ValueError, match="integer"):
        algos.shortest_path_features(adj, np.zeros((4, 4, 3), dtype=np.float32), 5)


def test_deep_split_tree_without_python_recursion():
    # In a 500-atom chain the split tree of (0, 499) is ~500 levels deep before the first hop.
    n = 500
    chain = _sym(n, [(i, i + 1) for i in range(n - 1)])
    feat = _edge_feat(chain, n_feat=1)
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(100)
    try:
        dist, ei = algos.shortest_path_features(chain, feat, 3)
    finally:
        sys.setrecursionlimit(old)
    assert dist[0, n - 1] == n - 1 and ei.shape == (n, n, 3, 1)
    np.testing.assert_array_equal(ei[0, n - 1, :, 0], [feat[0, 1, 0], feat[1, 2, 0], feat[2, 3, 0]])
    np.testing.assert_array_equal(
        ei[n - 1, 0, :, 0], [feat[n - 1, n - 2, 0], feat[n - 2, n - 3, 0], feat[n - 3, n - 4, 0]]
    )


@pytest.mark.parametrize("legacy", [False, True])
def test_fused_kernel_on_many_random_graphs(legacy):
    # the fused kernel fills hops by dynamic programming; the two-step API walks each path
    rng = np.random.default_rng(99 + legacy)
    for t in range(300):
        n = int(rng.integers(1, 16))
        adj = _dense(rng, n, float(rng.uniform(0.05, 0.6)))
        feat = _edge_feat(adj, n_feat=int(rng.integers(1, 4)), seed=t)
        dist, path = algos.floyd_warshall(adj, legacy_atom0=legacy)
        reach = _max_reachable(dist)
        walked = algos.gen_edge_input(reach, path, feat, legacy_atom0=legacy)
        for max_hops in (None, 1, 2, 5):
            d, ei = algos.shortest_path_features(adj, feat, max_hops, legacy_atom0=legacy)
            np.testing.assert_array_equal(d, dist)
            np.testing.assert_array_equal(ei, walked[:, :, : ei.shape[2]])
            assert ei.shape[2] == (reach if max_hops is None else min(reach, max_hops))
        if t % 10 == 0:
            np.testing.assert_array_equal(
                walked, baseline.gen_edge_input(reach, path, feat, legacy_atom0=legacy)
            )
