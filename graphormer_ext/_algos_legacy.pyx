# cython: language_level=3, boundscheck=False, wraparound=False
"""Benchmark baseline: the structure of the Graphormer / Transformer-M path kernels as released.

Not used by the library. It re-creates the original *algorithm structure* so that
``scripts/bench/bench_algos.py`` can measure the compiled kernels of :mod:`graphormer_ext.algos`
against it, and tests can check that both agree:

* ``floyd_warshall``: a typed Cython triple loop over numpy buffers (k outermost, strict ``>``),
  unreachable distance and path set to 510 afterwards;
* ``gen_edge_input``: allocates ``[N, N, max_dist, F]`` (the original passes
  ``max_dist = max(dist)``, i.e. 510 for a disconnected molecule) and rebuilds every node path
  with the recursive Python-level :func:`get_all_edges`, which returns a list, then copies the
  features hop by hop through numpy slicing.

Both conventions are available: ``legacy_atom0=False`` is Graphormer's fixed version (path
initialised with -1), ``True`` the released Transformer-M one (initialised with 0, and 0 read
as "direct edge").
"""
import numpy as np

cimport numpy as cnp

cnp.import_array()

UNREACHABLE = 510


def floyd_warshall(adjacency_matrix, legacy_atom0=False):
    """Hop distances and intermediates, as the original kernel computes them.

    Args:
        adjacency_matrix: [N, N] integer/boolean adjacency; nonzero = edge.
        legacy_atom0: initialise the path matrix with 0 instead of -1.

    Returns:
        ``(dist, path)``, both [N, N] int64, 510 for unreachable pairs.
    """
    n_rows, n_cols = adjacency_matrix.shape
    if n_rows != n_cols or n_rows == 0:
        raise ValueError(f"need a non-empty square adjacency matrix, got {adjacency_matrix.shape}")
    cdef Py_ssize_t n = n_rows
    cdef cnp.ndarray[cnp.int64_t, ndim=2, mode="c"] M = (
        np.asarray(adjacency_matrix) != 0
    ).astype(np.int64)
    cdef cnp.ndarray[cnp.int64_t, ndim=2, mode="c"] path = np.full(
        (n, n), 0 if legacy_atom0 else -1, dtype=np.int64
    )
    cdef Py_ssize_t i, j, k
    cdef cnp.int64_t M_ik, cost
    cdef cnp.int64_t* M_base = &M[0, 0]
    cdef cnp.int64_t* M_i
    cdef cnp.int64_t* M_k

    for i in range(n):
        for j in range(n):
            if i == j:
                M[i, j] = 0
            elif M[i, j] == 0:
                M[i, j] = 510

    for k in range(n):
        M_k = M_base + n * k
        for i in range(n):
            M_i = M_base + n * i
            M_ik = M_i[k]
            for j in range(n):
                cost = M_ik + M_k[j]
                if M_i[j] > cost:
                    M_i[j] = cost
                    path[i, j] = k

    for i in range(n):
        for j in range(n):
            if M[i, j] >= 510:
                path[i, j] = 510
                M[i, j] = 510
    return M, path


def get_all_edges(path, i, j, legacy_atom0=False):
    """Intermediate nodes of the i -> j path, recursively (a Python list, as in the original)."""
    k = path[i][j]
    if k == (0 if legacy_atom0 else -1):
        return []
    return get_all_edges(path, i, k, legacy_atom0) + [k] + get_all_edges(path, k, j, legacy_atom0)


def gen_edge_input(max_dist, path, edge_feat, legacy_atom0=False):
    """Per-hop edge features along every path, as the original builds them.

    Args:
        max_dist: hop slots to allocate (the original passes ``max(dist)``).
        path: [N, N] intermediates from :func:`floyd_warshall` (same convention).
        edge_feat: [N, N, F] edge features.
        legacy_atom0: read path value 0 as "direct edge".

    Returns:
        [N, N, max_dist, F] int64, -1 where no hop is written.
    """
    n_rows, n_cols = path.shape
    if n_rows != n_cols or n_rows == 0:
        raise ValueError(f"need a non-empty square path matrix, got {path.shape}")
    cdef Py_ssize_t n = n_rows
    cdef Py_ssize_t max_dist_copy = max_dist
    path_copy = path.astype(np.int64, order="C", copy=True)
    edge_feat_copy = edge_feat.astype(np.int64, order="C", copy=True)
    cdef cnp.ndarray[cnp.int64_t, ndim=4, mode="c"] edge_fea_all = -1 * np.ones(
        [n, n, max_dist_copy, edge_feat.shape[2]], dtype=np.int64
    )
    cdef Py_ssize_t i, j, k, num_path
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            if path_copy[i][j] == 510:
                continue
            nodes = [i] + get_all_edges(path_copy, i, j, legacy_atom0) + [j]
            num_path = len(nodes) - 1
            for k in range(min(num_path, max_dist_copy)):
                edge_fea_all[i, j, k, :] = edge_feat_copy[nodes[k], nodes[k + 1], :]
    return edge_fea_all
