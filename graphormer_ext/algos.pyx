# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""Shortest paths and path-edge features for molecular graphs (compiled kernels).

The API mirrors Graphormer's ``algos.pyx``: one pass returning hop distances plus the
Floyd–Warshall "predecessor" matrix, then the per-hop edge features along every shortest
path. :func:`shortest_path_features` fuses both steps and only materialises the hops a
model reads. All arrays going in and out are ``int64``.

Speed: Floyd–Warshall relaxes whole rows branch-free on int16 scratch (vectorised by the C
compiler). :func:`gen_edge_input` rebuilds each node path with an explicit C stack (no Python
recursion) and validates the path matrix it is given; the fused kernel instead fills the hop
slots by dynamic programming over pairs sorted by path value (see ``_edge_input_dp``). No
Python object is created per pair.

Path conventions (Transformer-M spec §3.1):

* **fixed** (default; Graphormer PR #119/#121): ``path`` starts at ``-1`` and ``-1`` means
  "no intermediate node" (direct bond).
* **legacy** (``legacy_atom0=True``; the released Transformer-M code): ``path`` starts at ``0``
  and ``0`` means "no intermediate node", so a shortest path whose recorded intermediate is
  atom 0 is read as a single hop over a non-bonded pair. Reproduced bit for bit.

Tie-breaking: ``k`` is the outermost loop and ``path[i, j] = k`` only on a strict improvement.
Equal-length alternatives therefore resolve exactly as in the official code, which is what the
golden preprocessing of the reference implementation reproduces.

Distances use :data:`UNREACHABLE` (510) both as "infinity" and as the sentinel reported for
unreachable pairs (distance and path entry). Real distances must stay below it, hence graphs
are limited to ``N <= UNREACHABLE`` nodes.
"""
import numpy as np

cimport numpy as cnp
from libc.stdint cimport int16_t, int32_t, int64_t, uint8_t, uint16_t
from libc.stdlib cimport free, malloc
from libc.string cimport memset

cnp.import_array()

cdef enum:
    _UNREACH = 510

UNREACHABLE = _UNREACH
"""int: distance and path value of an unreachable pair (the official sentinel)."""

__all__ = [
    "UNREACHABLE",
    "floyd_warshall",
    "gen_edge_input",
    "shortest_path_features",
    "expand_graph",
    "collate_graphs",
]


# ----------------------------------------------------------------------------------------------
# nogil cores (raw C-contiguous buffers)
# ----------------------------------------------------------------------------------------------
# Floyd–Warshall runs on int16 scratch: distances stay <= 2 * 510 and node ids < 510, and the
# branch-free relaxation of one row is then auto-vectorised 8 lanes wide even for baseline SSE2.
cdef inline void _relax_row(int16_t* d_i, int16_t* p_i, const int16_t* d_k, int16_t d_ik,
                            int16_t k, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t j
    cdef int16_t cost, old
    for j in range(n):
        cost = d_ik + d_k[j]
        old = d_i[j]
        p_i[j] = k if cost < old else p_i[j]
        d_i[j] = cost if cost < old else old


cdef int64_t _fw_core(const int64_t* adj, int16_t* dist, int16_t* path, Py_ssize_t n,
                      int16_t init) noexcept nogil:
    """Floyd–Warshall (k outermost, strict improvement); returns the largest reachable distance."""
    cdef Py_ssize_t i, k, nn = n * n
    cdef int16_t d_ik
    cdef int64_t max_d = 0
    for i in range(nn):
        dist[i] = 1 if adj[i] != 0 else _UNREACH
        path[i] = init
    for i in range(n):
        dist[i * n + i] = 0
    for k in range(n):
        for i in range(n):
            d_ik = dist[i * n + k]
            # Rows that cannot reach k (and row k itself) cannot strictly improve: skipping
            # them leaves the result of the full triple loop unchanged.
            if d_ik >= _UNREACH or i == k:
                continue
            _relax_row(dist + i * n, path + i * n, dist + k * n, d_ik, <int16_t> k, n)
    for i in range(nn):
        if dist[i] >= _UNREACH:
            dist[i] = _UNREACH
            path[i] = _UNREACH
        elif dist[i] > max_d:
            max_d = dist[i]
    return max_d


cdef void _edge_input_dp(const int16_t* path, const int64_t* feat, int64_t* out,
                         Py_ssize_t n, Py_ssize_t hops, Py_ssize_t nfeat, int16_t no_mid,
                         int32_t* order, int32_t* start, int16_t* nhop) noexcept nogil:
    """Path-edge features of a matrix made by :func:`_fw_core`, without walking paths.

    If ``path[i, j] = k`` then k is the largest node on the recorded i→j path, so both halves
    (i, k) and (k, j) have smaller path values (or are direct). Visiting pairs in increasing
    path value (a counting sort) makes the first ``hops`` slots of (i, j) the concatenation of
    the already written slots of (i, k) and (k, j). ``nhop`` keeps the hop count capped at
    ``hops``. Scratch: ``order`` [n*n], ``start`` [n+2], ``nhop`` [n*n].
    """
    cdef Py_ssize_t i, j, q, c, a, b, f, m, ij, stride = hops * nfeat
    cdef int64_t k
    cdef int64_t* dst
    cdef const int64_t* src
    if hops <= 0:
        return
    for i in range(n + 2):
        start[i] = 0
    for i in range(n):
        for j in range(n):
            k = path[i * n + j]
            if i != j and k != _UNREACH:
                start[k + 2] += 1
    for i in range(2, n + 2):
        start[i] += start[i - 1]
    for i in range(n):
        for j in range(n):
            ij = i * n + j
            k = path[ij]
            if i != j and k != _UNREACH:
                order[start[k + 1]] = <int32_t> ij
                start[k + 1] += 1
    m = start[n]  # pairs to write
    for q in range(m):
        ij = order[q]
        k = path[ij]
        dst = out + ij * stride
        if k == no_mid:
            src = feat + ij * nfeat
            for f in range(nfeat):
                dst[f] = src[f]
            nhop[ij] = 1
            continue
        i = ij // n
        j = ij - i * n
        a = nhop[i * n + k]
        src = out + (i * n + k) * stride
        for c in range(a * nfeat):
            dst[c] = src[c]
        b = 0
        if a < hops:
            b = nhop[k * n + j]
            if b > hops - a:
                b = hops - a
            src = out + (k * n + j) * stride
            dst += a * nfeat
            for c in range(b * nfeat):
                dst[c] = src[c]
        nhop[ij] = <int16_t> (a + b)


cdef int _edge_input_core(const int64_t* path, const int64_t* feat, int64_t* out,
                          Py_ssize_t n, Py_ssize_t hops, Py_ssize_t nfeat,
                          int64_t no_mid) noexcept nogil:
    """Write the first ``hops`` path-edge features of every reachable pair into ``out``.

    ``out`` ([n, n, hops, nfeat]) must already hold -1. The node sequence i, ..., j is produced
    in order by a depth-first walk over (a, b) segments kept on an explicit stack; a segment
    whose path entry is ``no_mid`` is one hop. Returns 0, or -1 for a path matrix that is not
    a Floyd–Warshall predecessor matrix (bad index or a cycle).
    """
    cdef Py_ssize_t i, j, f, a, b, top, hop, cap = n + 2
    cdef int64_t k
    cdef int64_t* dst
    cdef const int64_t* src
    cdef Py_ssize_t seg_a[_UNREACH + 2]
    cdef Py_ssize_t seg_b[_UNREACH + 2]
    if hops <= 0:
        return 0
    for i in range(n):
        for j in range(n):
            if i == j or path[i * n + j] == _UNREACH:
                continue
            dst = out + (i * n + j) * hops * nfeat
            seg_a[0] = i
            seg_b[0] = j
            top = 1
            hop = 0
            while top > 0 and hop < hops:
                top -= 1
                a = seg_a[top]
                b = seg_b[top]
                k = path[a * n + b]
                if k == no_mid:
                    src = feat + (a * n + b) * nfeat
                    for f in range(nfeat):
                        dst[f] = src[f]
                    dst += nfeat
                    hop += 1
                else:
                    if k < 0 or k >= n or top + 2 > cap:
                        return -1
                    # right half first so that (a, k) is expanded next
                    seg_a[top] = k
                    seg_b[top] = b
                    seg_a[top + 1] = a
                    seg_b[top + 1] = k
                    top += 2
    return 0


# ----------------------------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------------------------
cdef inline bint _ready(object arr, int ndim):
    """True for a C-contiguous int64 ndarray of the given rank (no conversion needed)."""
    return (
        cnp.PyArray_Check(arr)
        and cnp.PyArray_NDIM(<cnp.ndarray> arr) == ndim
        and cnp.PyArray_TYPE(<cnp.ndarray> arr) == cnp.NPY_INT64
        and cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray> arr)
    )


cdef cnp.ndarray _square_int64(object arr, str name):
    cdef cnp.npy_intp* dims
    if _ready(arr, 2):
        dims = cnp.PyArray_DIMS(<cnp.ndarray> arr)
        if dims[0] == dims[1] and 0 < dims[0] <= _UNREACH:
            return <cnp.ndarray> arr
    a = np.asarray(arr)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"{name} must be a square [N, N] matrix, got shape {a.shape}")
    if a.shape[0] == 0:
        raise ValueError(f"{name} is empty (N = 0): a graph needs at least one node")
    if a.shape[0] > _UNREACH:
        raise ValueError(
            f"{name} has N = {a.shape[0]} nodes; at most {_UNREACH} are supported because "
            f"{_UNREACH} (UNREACHABLE) is the sentinel for unreachable pairs"
        )
    if a.dtype.kind not in "biu":
        raise ValueError(f"{name} must have an integer or boolean dtype, got {a.dtype}")
    return np.ascontiguousarray(a, dtype=np.int64)


cdef cnp.ndarray _edge_feat_int64(object edge_feat, Py_ssize_t n):
    cdef cnp.npy_intp* dims
    if _ready(edge_feat, 3):
        dims = cnp.PyArray_DIMS(<cnp.ndarray> edge_feat)
        if dims[0] == n and dims[1] == n:
            return <cnp.ndarray> edge_feat
    e = np.asarray(edge_feat)
    if e.ndim != 3 or e.shape[0] != n or e.shape[1] != n:
        raise ValueError(f"edge_feat must have shape [N, N, F] with N = {n}, got {e.shape}")
    if e.dtype.kind not in "biu":
        raise ValueError(f"edge_feat must have an integer dtype, got {e.dtype}")
    return np.ascontiguousarray(e, dtype=np.int64)


cdef inline int64_t* _ptr(cnp.ndarray a):
    return <int64_t*> cnp.PyArray_DATA(a)


cdef cnp.ndarray _filled_edge_input(Py_ssize_t n, Py_ssize_t hops, Py_ssize_t nfeat):
    cdef cnp.npy_intp dims[4]
    dims[0] = n
    dims[1] = n
    dims[2] = hops
    dims[3] = nfeat
    out = cnp.PyArray_EMPTY(4, dims, cnp.NPY_INT64, 0)
    # all-ones bytes are -1 in two's complement
    memset(cnp.PyArray_DATA(out), 0xFF, <size_t> (n * n * hops * nfeat) * sizeof(int64_t))
    return out


cdef cnp.ndarray _square_empty(Py_ssize_t n):
    cdef cnp.npy_intp dims[2]
    dims[0] = n
    dims[1] = n
    return cnp.PyArray_EMPTY(2, dims, cnp.NPY_INT64, 0)


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------
def floyd_warshall(adj, bint legacy_atom0=False):
    """All-pairs hop distances and Floyd–Warshall intermediates.

    Args:
        adj: adjacency matrix, integer or boolean; any nonzero off-diagonal entry is an edge of
            length 1, the diagonal is ignored.
        legacy_atom0: initialise ``path`` with 0 (released Transformer-M) instead of -1.

    Returns:
        ``(dist, path)``: ``dist[i, j]`` is the hop count (0 on the diagonal,
        :data:`UNREACHABLE` if there is no path); ``path[i, j]`` is the last intermediate node
        ``k`` that strictly shortened i→j with ``k`` as the outer loop, the initial value
        (-1, or 0 in legacy mode) if none did, and :data:`UNREACHABLE` for unreachable pairs.

    Shapes:
        adj: [N, N]; dist, path: [N, N] int64.

    Raises:
        ValueError: for N = 0, a non-square or non-integer matrix, or N > UNREACHABLE.
    """
    cdef cnp.ndarray a = _square_int64(adj, "adj")
    cdef Py_ssize_t i, n = a.shape[0], nn = n * n
    cdef cnp.ndarray dist = _square_empty(n)
    cdef cnp.ndarray path = _square_empty(n)
    cdef int16_t init = 0 if legacy_atom0 else -1
    cdef const int64_t* pa = _ptr(a)
    cdef int64_t* pd = _ptr(dist)
    cdef int64_t* pp = _ptr(path)
    cdef int16_t* d16 = <int16_t*> malloc(<size_t> (2 * nn) * sizeof(int16_t))
    cdef int16_t* p16 = d16 + nn
    if d16 == NULL:
        raise MemoryError()
    with nogil:
        _fw_core(pa, d16, p16, n, init)
        for i in range(nn):
            pd[i] = d16[i]
            pp[i] = p16[i]
    free(d16)
    return dist, path


def gen_edge_input(Py_ssize_t max_dist, path, edge_feat, bint legacy_atom0=False):
    """Edge features along the reconstructed shortest path of every pair.

    Args:
        max_dist: number of hop slots to allocate; hops beyond it are not written.
        path: Floyd–Warshall intermediates from :func:`floyd_warshall` (same convention).
        edge_feat: per-pair edge features, e.g. ``attn_edge_type``.
        legacy_atom0: read path value 0 as "no intermediate" (released Transformer-M).

    Returns:
        ``edge_input`` filled with -1; for each pair i != j with a path, hop slot ``h`` holds
        ``edge_feat[p[h], p[h + 1]]`` of the node sequence ``p = (i, ..., j)``.

    Shapes:
        path: [N, N]; edge_feat: [N, N, F]; returns [N, N, max_dist, F] int64.

    Raises:
        ValueError: for N = 0, mismatched shapes, ``max_dist < 0`` or a malformed path matrix.
    """
    if max_dist < 0:
        raise ValueError(f"max_dist must be >= 0, got {max_dist}")
    cdef cnp.ndarray p = _square_int64(path, "path")
    cdef Py_ssize_t n = p.shape[0]
    cdef cnp.ndarray e = _edge_feat_int64(edge_feat, n)
    cdef Py_ssize_t nfeat = e.shape[2]
    cdef cnp.ndarray out = _filled_edge_input(n, max_dist, nfeat)
    cdef const int64_t* pp = _ptr(p)
    cdef const int64_t* pe = _ptr(e)
    cdef int64_t* po = _ptr(out)
    cdef int64_t no_mid = 0 if legacy_atom0 else -1
    cdef int rc
    with nogil:
        rc = _edge_input_core(pp, pe, po, n, max_dist, nfeat, no_mid)
    if rc != 0:
        raise ValueError(
            "path is not a Floyd–Warshall intermediate matrix of the "
            f"{'legacy' if legacy_atom0 else 'fixed'} convention (bad node index or cycle)"
        )
    return out


def shortest_path_features(adj, edge_feat, max_hops, bint legacy_atom0=False):
    """Fused :func:`floyd_warshall` + :func:`gen_edge_input`, keeping only the hops used.

    Args:
        adj: adjacency matrix (see :func:`floyd_warshall`).
        edge_feat: per-pair edge features (see :func:`gen_edge_input`).
        max_hops: keep at most this many hops; ``None`` or ``<= 0`` keeps all of them.
        legacy_atom0: released Transformer-M path convention.

    Returns:
        ``(dist, edge_input)``, equal to ``floyd_warshall(adj)[0]`` and
        ``gen_edge_input(H, path, edge_feat)`` with ``H = min(max reachable distance,
        max_hops)``. Unreachable pairs do not enlarge H, so a disconnected molecule never
        allocates 510 hop slots.

    Shapes:
        adj: [N, N]; edge_feat: [N, N, F]; dist: [N, N]; edge_input: [N, N, H, F] int64.

    Raises:
        ValueError: as :func:`floyd_warshall` and :func:`gen_edge_input`.
    """
    cdef cnp.ndarray a = _square_int64(adj, "adj")
    cdef Py_ssize_t i, n = a.shape[0], nn = n * n
    cdef cnp.ndarray e = _edge_feat_int64(edge_feat, n)
    cdef Py_ssize_t nfeat = e.shape[2]
    cdef Py_ssize_t limit = 0 if max_hops is None else max_hops
    cdef cnp.ndarray dist = _square_empty(n)
    cdef cnp.ndarray out
    cdef int16_t init = 0 if legacy_atom0 else -1
    cdef const int64_t* pa = _ptr(a)
    cdef const int64_t* pe = _ptr(e)
    cdef int64_t* pd = _ptr(dist)
    cdef int64_t* po
    cdef Py_ssize_t hops
    # one scratch block: order [nn] and start [n + 2] (int32), then dist, path, nhop (int16)
    cdef int32_t* order = <int32_t*> malloc(
        <size_t> (nn + n + 2) * sizeof(int32_t) + <size_t> (3 * nn) * sizeof(int16_t)
    )
    cdef int32_t* start = order + nn
    cdef int16_t* d16 = <int16_t*> (start + n + 2)
    cdef int16_t* p16 = d16 + nn
    cdef int16_t* nhop = p16 + nn
    if order == NULL:
        raise MemoryError()
    try:
        with nogil:
            hops = <Py_ssize_t> _fw_core(pa, d16, p16, n, init)
            for i in range(nn):
                pd[i] = d16[i]
        if 0 < limit < hops:
            hops = limit
        out = _filled_edge_input(n, hops, nfeat)
        po = _ptr(out)
        with nogil:
            _edge_input_dp(p16, pe, po, n, hops, nfeat, init, order, start, nhop)
    finally:
        free(order)
    return dist, out


# ----------------------------------------------------------------------------------------------
# stored molecular graphs -> model inputs (read path of the LMDB schema 2)
# ----------------------------------------------------------------------------------------------
# A stored graph is raw OGB atom features [N, 9], bonds [M, 2] (one row per undirected bond) and
# raw OGB bond features [M, 3], in any small integer dtype. The kernels below derive every model
# input of the record (keys.py: x, in_degree, spatial_pos, attn_edge_type, edge_input) from it,
# either into fresh per-record arrays (:func:`expand_graph`) or straight into the padded slots of a
# batch (:func:`collate_graphs`). Offsets are those of ``graphormer_ext.data.keys``; they are
# repeated here as C constants because the kernels run without the GIL, and a test ties them.
ctypedef fused out_t:
    int16_t
    int32_t
    int64_t

cdef enum:
    _NODE_F = 9          # keys.NUM_ATOM_FEATURES
    _BOND_F = 3          # keys.NUM_BOND_FEATURES
    _OFFSET = 512        # keys.FEATURE_OFFSET
    _X_SHIFT = 2         # keys.X_SHIFT
    _EDGE_SHIFT = 2      # keys.EDGE_TYPE_SHIFT
    _MAX_RAW = 509       # largest raw feature value whose shifted index stays in its block
    _GRAPH_BAD_BOND = -1
    _GRAPH_BAD_VALUE = -2

GRAPH_FEATURE_CONSTANTS = {
    "NUM_ATOM_FEATURES": _NODE_F, "NUM_BOND_FEATURES": _BOND_F, "FEATURE_OFFSET": _OFFSET,
    "X_SHIFT": _X_SHIFT, "EDGE_TYPE_SHIFT": _EDGE_SHIFT, "MAX_RAW_FEATURE": _MAX_RAW,
}
"""dict: the offsets compiled into the graph kernels (tested equal to ``keys``)."""


cdef inline int64_t _read(const char* p, int typ, Py_ssize_t k) noexcept nogil:
    """Element ``k`` of an integer buffer of numpy type ``typ`` (checked by :func:`_int_view`)."""
    if typ == cnp.NPY_UINT8:
        return (<const uint8_t*> p)[k]
    if typ == cnp.NPY_UINT16:
        return (<const uint16_t*> p)[k]
    if typ == cnp.NPY_INT16:
        return (<const int16_t*> p)[k]
    if typ == cnp.NPY_INT32:
        return (<const int32_t*> p)[k]
    return (<const int64_t*> p)[k]


cdef cnp.ndarray _int_view(object arr, Py_ssize_t ncols, str name):
    """``arr`` as a C-contiguous native integer array ``[rows, ncols]`` (no copy when it is)."""
    cdef int typ
    if cnp.PyArray_Check(arr):
        a = <cnp.ndarray> arr
        typ = cnp.PyArray_TYPE(a)
        if (
            (typ == cnp.NPY_UINT8 or typ == cnp.NPY_UINT16 or typ == cnp.NPY_INT16
             or typ == cnp.NPY_INT32 or typ == cnp.NPY_INT64)
            and cnp.PyArray_NDIM(a) == 2 and cnp.PyArray_DIMS(a)[1] == ncols
            and cnp.PyArray_IS_C_CONTIGUOUS(a) and cnp.PyArray_ISNOTSWAPPED(a)
        ):
            return a
    b = np.asarray(arr)
    if b.size == 0 and b.ndim <= 2:
        b = b.reshape(0, ncols)
    if b.ndim != 2 or b.shape[1] != ncols:
        raise ValueError(f"{name} must have shape [*, {ncols}], got {b.shape}")
    if b.dtype.kind not in "iu":
        raise ValueError(f"{name} must have an integer dtype, got {b.dtype}")
    return np.ascontiguousarray(b, dtype=np.int64)


cdef struct _Graph:
    Py_ssize_t n
    Py_ssize_t m
    const char* node
    const char* bond
    const char* bfeat
    int node_t
    int bond_t
    int bfeat_t
    int16_t* dist    # [n, n] scratch, owned by the caller
    int16_t* path    # [n, n]
    int64_t maxd


cdef int _graph_paths(_Graph* g, int16_t init) noexcept nogil:
    """Validate the stored arrays and run Floyd–Warshall (same tie-breaking as :func:`_fw_core`)."""
    cdef Py_ssize_t n = g.n, nn = n * n, i, k, e
    cdef int64_t a, b, v
    cdef int16_t d_ik
    cdef int16_t* dist = g.dist
    cdef int16_t* path = g.path
    for i in range(n * _NODE_F):
        v = _read(g.node, g.node_t, i)
        if v < 0 or v > _MAX_RAW:
            return _GRAPH_BAD_VALUE
    for i in range(g.m * _BOND_F):
        v = _read(g.bfeat, g.bfeat_t, i)
        if v < 0 or v > _MAX_RAW:
            return _GRAPH_BAD_VALUE
    for i in range(nn):
        dist[i] = _UNREACH
        path[i] = init
    for i in range(n):
        dist[i * n + i] = 0
    for e in range(g.m):
        a = _read(g.bond, g.bond_t, 2 * e)
        b = _read(g.bond, g.bond_t, 2 * e + 1)
        if a < 0 or b < 0 or a >= n or b >= n or a == b:
            return _GRAPH_BAD_BOND
        dist[a * n + b] = 1
        dist[b * n + a] = 1
    for k in range(n):
        for i in range(n):
            d_ik = dist[i * n + k]
            if d_ik >= _UNREACH or i == k:
                continue
            _relax_row(dist + i * n, path + i * n, dist + k * n, d_ik, <int16_t> k, n)
    g.maxd = 0
    for i in range(nn):
        if dist[i] >= _UNREACH:
            dist[i] = _UNREACH
            path[i] = _UNREACH
        elif dist[i] > g.maxd:
            g.maxd = dist[i]
    return 0


cdef void _graph_fill(const _Graph* g, int16_t no_mid, Py_ssize_t rs, Py_ssize_t hs,
                      Py_ssize_t hops, out_t* x, out_t* deg, out_t* sp, out_t* aet, out_t* ei,
                      int32_t* order, int32_t* start, int16_t* nhop) noexcept nogil:
    """Write one graph's model inputs into zero-filled outputs.

    ``rs`` is the row length of the pair outputs (the padded atom count), ``hs`` the hop
    length of ``ei`` and ``hops`` the number of hop slots to write (``<= hs``). Layout:
    x [n, 9], deg [n], sp [n, rs], aet [n, rs, 3], ei [n, rs, hs, 3] (row-major).
    """
    cdef Py_ssize_t n = g.n, i, j, f, e, q, c, a, b, m, ij, pij, src_off
    cdef int64_t k, u, w
    cdef int16_t cnt
    cdef const int16_t* dist = g.dist
    cdef const int16_t* path = g.path
    cdef out_t* dst
    cdef const out_t* src
    for i in range(n):
        for f in range(_NODE_F):
            x[i * _NODE_F + f] = <out_t> (_read(g.node, g.node_t, i * _NODE_F + f)
                                          + _X_SHIFT + _OFFSET * f)
        cnt = 0
        for j in range(n):
            sp[i * rs + j] = <out_t> (dist[i * n + j] + 1)
            cnt += dist[i * n + j] == 1
        deg[i] = <out_t> (cnt + 1)
    for e in range(g.m):
        u = _read(g.bond, g.bond_t, 2 * e)
        w = _read(g.bond, g.bond_t, 2 * e + 1)
        for f in range(_BOND_F):
            aet[(u * rs + w) * _BOND_F + f] = <out_t> (
                _read(g.bfeat, g.bfeat_t, e * _BOND_F + f) + _EDGE_SHIFT + _OFFSET * f)
            aet[(w * rs + u) * _BOND_F + f] = aet[(u * rs + w) * _BOND_F + f]
    if hops <= 0:
        return
    # Path-edge features by dynamic programming over pairs sorted by path value (see
    # _edge_input_dp): a direct hop reads attn_edge_type + 1 (1 for a legacy non-bond hop).
    for i in range(n + 2):
        start[i] = 0
    for ij in range(n * n):
        k = path[ij]
        if k != _UNREACH and ij % (n + 1) != 0:
            start[k + 2] += 1
    for i in range(2, n + 2):
        start[i] += start[i - 1]
    for ij in range(n * n):
        k = path[ij]
        if k != _UNREACH and ij % (n + 1) != 0:
            order[start[k + 1]] = <int32_t> ij
            start[k + 1] += 1
    m = start[n]
    for q in range(m):
        ij = order[q]
        i = ij // n
        j = ij - i * n
        k = path[ij]
        pij = i * rs + j
        dst = ei + pij * hs * _BOND_F
        if k == no_mid:
            for f in range(_BOND_F):
                dst[f] = aet[pij * _BOND_F + f] + 1
            nhop[ij] = 1
            continue
        a = nhop[i * n + k]
        src = ei + (i * rs + k) * hs * _BOND_F
        for c in range(a * _BOND_F):
            dst[c] = src[c]
        b = 0
        if a < hops:
            b = nhop[k * n + j]
            if b > hops - a:
                b = hops - a
            src = ei + (k * rs + j) * hs * _BOND_F
            for c in range(b * _BOND_F):
                dst[a * _BOND_F + c] = src[c]
        nhop[ij] = <int16_t> (a + b)


cdef int _graph_from(object node_feat, object bonds, object bond_feat, _Graph* g,
                     list keep) except -1:
    """Fill ``g`` from a stored graph's arrays (``keep`` holds converted arrays alive)."""
    cdef cnp.ndarray nf = _int_view(node_feat, _NODE_F, "node_feat")
    cdef cnp.ndarray bd = _int_view(bonds, 2, "bond_index")
    cdef cnp.ndarray bf = _int_view(bond_feat, _BOND_F, "bond_feat")
    keep.append(nf)
    keep.append(bd)
    keep.append(bf)
    g.n = nf.shape[0]
    g.m = bd.shape[0]
    if g.n == 0:
        raise ValueError("the graph has no atoms (N = 0)")
    if g.n > _UNREACH:
        raise ValueError(f"the graph has N = {g.n} atoms; at most {_UNREACH} are supported")
    if bf.shape[0] != g.m:
        raise ValueError(f"bond_index has {g.m} bonds but bond_feat has {bf.shape[0]} rows")
    g.node = <const char*> cnp.PyArray_DATA(nf)
    g.bond = <const char*> cnp.PyArray_DATA(bd)
    g.bfeat = <const char*> cnp.PyArray_DATA(bf)
    g.node_t = cnp.PyArray_TYPE(nf)
    g.bond_t = cnp.PyArray_TYPE(bd)
    g.bfeat_t = cnp.PyArray_TYPE(bf)
    return 0


cdef str _graph_error(int rc, Py_ssize_t n):
    if rc == _GRAPH_BAD_BOND:
        return f"bond_index has a self-loop or an atom index outside [0, {n - 1}]"
    return f"a raw feature value is outside [0, {_MAX_RAW}] (the shared vocabulary)"


cdef inline void* _data(object arr):
    return cnp.PyArray_DATA(<cnp.ndarray> arr)


cdef void _fill_batch(_Graph* gs, Py_ssize_t bsz, int16_t init, Py_ssize_t n_pad,
                      Py_ssize_t hops, Py_ssize_t fill_hops, out_t* px, out_t* pd, out_t* ps,
                      out_t* pa, out_t* pe, out_t* pn, int32_t* order, int32_t* start,
                      int16_t* nhop) noexcept:
    """:func:`_graph_fill` of ``bsz`` graphs into consecutive padded batch slots (``hops``
    slots per pair, the first ``fill_hops`` of them written). The outputs may hold garbage:
    each graph's slots are zeroed right before they are filled, while they are in cache
    (one pass over the batch memory instead of calloc's zeroing plus the fill). ``pn``, if
    not NULL, receives ``node_type_edge`` [B, n_pad, n_pad, 2]."""
    cdef Py_ssize_t b, i, j, n, nn = n_pad * n_pad
    cdef out_t ti, tj
    cdef out_t* t
    cdef size_t w = sizeof(out_t)
    cdef out_t* x
    cdef out_t* d
    cdef out_t* s
    cdef out_t* a
    cdef out_t* e
    with nogil:
        for b in range(bsz):
            x = px + b * n_pad * _NODE_F
            d = pd + b * n_pad
            s = ps + b * nn
            a = pa + b * nn * _BOND_F
            e = pe + b * nn * hops * _BOND_F
            memset(x, 0, n_pad * _NODE_F * w)
            memset(d, 0, n_pad * w)
            memset(s, 0, nn * w)
            memset(a, 0, nn * _BOND_F * w)
            memset(e, 0, nn * hops * _BOND_F * w)
            _graph_fill(&gs[b], init, n_pad, hops, fill_hops, x, d, s, a, e, order, start, nhop)
            if pn == NULL:
                continue
            # (x0_i + 1, x0_j + 513) on real pairs, (1, 513) elsewhere (keys.NODE_TYPE_*)
            t = pn + b * nn * 2
            n = gs[b].n
            for i in range(nn):
                t[2 * i] = 1
                t[2 * i + 1] = 1 + _OFFSET
            for i in range(n):
                ti = x[i * _NODE_F] + 1
                for j in range(n):
                    t[(i * n_pad + j) * 2] = ti
                    t[(i * n_pad + j) * 2 + 1] = x[j * _NODE_F] + 1 + _OFFSET


def expand_graph(node_feat, bond_index, bond_feat, max_hops=None, bint legacy_atom0=False):
    """Model inputs of one stored graph, as int16 arrays (the stored record layout of keys.py).

    Args:
        node_feat: raw OGB atom features [N, 9] (values in [0, 509]), any integer dtype.
        bond_index: one row ``(i, j)`` per undirected bond [M, 2].
        bond_feat: raw OGB bond features [M, 3] of each bond.
        max_hops: keep at most this many path hops; ``None`` or ``<= 0`` keeps all.
        legacy_atom0: released Transformer-M path convention (see :func:`floyd_warshall`).

    Returns:
        ``(x, in_degree, spatial_pos, attn_edge_type, edge_input)``: int16 [N, 9], [N],
        [N, N], [N, N, 3], [N, N, H, 3] with ``H = min(max reachable distance, max_hops)``,
        equal to ``graphormer_ext.featurize.graph.graph_to_record`` of the same graph.

    Raises:
        ValueError: N = 0 or N > UNREACHABLE, mismatched shapes, a bond index outside the
            graph or a self-loop, a feature value outside [0, 509].
    """
    cdef _Graph g
    cdef list keep = []
    _graph_from(node_feat, bond_index, bond_feat, &g, keep)
    cdef Py_ssize_t n = g.n, nn = n * n, limit = 0 if max_hops is None else max_hops
    cdef int16_t init = 0 if legacy_atom0 else -1
    cdef int rc
    cdef Py_ssize_t hops
    cdef int32_t* order = <int32_t*> malloc(
        <size_t> (nn + n + 2) * sizeof(int32_t) + <size_t> (3 * nn) * sizeof(int16_t)
    )
    if order == NULL:
        raise MemoryError()
    cdef int32_t* start = order + nn
    g.dist = <int16_t*> (start + n + 2)
    g.path = g.dist + nn
    cdef int16_t* nhop = g.path + nn
    try:
        with nogil:
            rc = _graph_paths(&g, init)
        if rc != 0:
            raise ValueError(_graph_error(rc, n))
        hops = g.maxd
        if 0 < limit < hops:
            hops = limit
        x = np.empty((n, _NODE_F), dtype=np.int16)
        deg = np.empty(n, dtype=np.int16)
        sp = np.empty((n, n), dtype=np.int16)
        aet = np.empty((n, n, _BOND_F), dtype=np.int16)
        ei = np.empty((n, n, hops, _BOND_F), dtype=np.int16)
        _fill_batch[int16_t](&g, 1, init, n, hops, hops, <int16_t*> _data(x),
                             <int16_t*> _data(deg),
                             <int16_t*> _data(sp), <int16_t*> _data(aet),
                             <int16_t*> _data(ei), NULL, order, start, nhop)
    finally:
        free(order)
    return x, deg, sp, aet, ei


def collate_graphs(list graphs, Py_ssize_t n_pad, Py_ssize_t max_hops, bint legacy_atom0=False,
                   Py_ssize_t min_hops=0, dtype=np.int32, bint node_type_edge=False):
    """Model inputs of a batch of stored graphs, written straight into padded batch arrays.

    Equal to padding the :func:`expand_graph` outputs of each graph (0 = padding), with
    ``H = max(min(max reachable distance over the batch, max_hops), min_hops)``.

    Args:
        graphs: ``(node_feat, bond_index, bond_feat)`` of each graph (see :func:`expand_graph`).
        n_pad: padded atom count, ``>=`` every graph's N.
        max_hops: hop cap (``>= 0``).
        legacy_atom0: released Transformer-M path convention.
        min_hops: lower bound of H (the collator's one all-padding hop for single atoms).
        dtype: ``np.int32`` or ``np.int64`` (or ``np.int16``).
        node_type_edge: also return ``node_type_edge`` (the 3D channel's atom-pair types).

    Returns:
        ``(x, in_degree, spatial_pos, attn_edge_type, edge_input, sizes, node_type_edge)``:
        [B, n_pad, 9], [B, n_pad], [B, n_pad, n_pad], [B, n_pad, n_pad, 3],
        [B, n_pad, n_pad, H, 3] of ``dtype``, the atom counts int64 [B], and
        ``node_type_edge`` [B, n_pad, n_pad, 2] of ``dtype`` = ``(x0_i + 1, x0_j + 513)`` on
        real pairs and ``(1, 513)`` elsewhere (``None`` unless asked for).

    Raises:
        ValueError: as :func:`expand_graph` (the message starts with ``graph <b>:``), or a
            graph larger than ``n_pad``.
    """
    cdef Py_ssize_t bsz = len(graphs), b, n, nmax = 0, total = 0, hops = 0, fill_hops, off
    cdef list keep = []
    cdef _Graph* gs
    cdef int16_t init = 0 if legacy_atom0 else -1
    cdef int rc
    if bsz == 0:
        raise ValueError("collate_graphs got no graphs")
    if max_hops < 0:
        raise ValueError(f"max_hops must be >= 0, got {max_hops}")
    dt = np.dtype(dtype)
    if dt != np.int16 and dt != np.int32 and dt != np.int64:
        raise ValueError(f"dtype must be int16, int32 or int64, got {dt}")
    gs = <_Graph*> malloc(<size_t> bsz * sizeof(_Graph))
    if gs == NULL:
        raise MemoryError()
    cdef int16_t* scratch = NULL
    cdef int32_t* order = NULL
    cdef int32_t* start
    cdef int16_t* nhop
    sizes = np.empty(bsz, dtype=np.int64)
    cdef int64_t[::1] sizes_v = sizes
    try:
        for b in range(bsz):
            node_feat, bond_index, bond_feat = graphs[b]
            try:
                _graph_from(node_feat, bond_index, bond_feat, &gs[b], keep)
            except ValueError as exc:
                raise ValueError(f"graph {b}: {exc}") from None
            n = gs[b].n
            if n > n_pad:
                raise ValueError(f"graph {b}: N = {n} atoms is more than n_pad = {n_pad}")
            sizes_v[b] = n
            nmax = n if n > nmax else nmax
            total += n * n
        scratch = <int16_t*> malloc(<size_t> (2 * total) * sizeof(int16_t))
        order = <int32_t*> malloc(
            <size_t> (nmax * nmax + nmax + 2) * sizeof(int32_t)
            + <size_t> (nmax * nmax) * sizeof(int16_t)
        )
        if scratch == NULL or order == NULL:
            raise MemoryError()
        start = order + nmax * nmax
        nhop = <int16_t*> (start + nmax + 2)
        off = 0
        rc = 0
        with nogil:
            for b in range(bsz):
                n = gs[b].n
                gs[b].dist = scratch + off
                gs[b].path = scratch + off + n * n
                off += 2 * n * n
                rc = _graph_paths(&gs[b], init)
                if rc != 0:
                    break
                if gs[b].maxd > hops:
                    hops = gs[b].maxd
        if rc != 0:
            raise ValueError(f"graph {b}: {_graph_error(rc, gs[b].n)}")
        if hops > max_hops:
            hops = max_hops
        fill_hops = hops
        if hops < min_hops:  # all-padding hop slots beyond the paths
            hops = min_hops
        x = np.empty((bsz, n_pad, _NODE_F), dtype=dt)
        deg = np.empty((bsz, n_pad), dtype=dt)
        sp = np.empty((bsz, n_pad, n_pad), dtype=dt)
        aet = np.empty((bsz, n_pad, n_pad, _BOND_F), dtype=dt)
        ei = np.empty((bsz, n_pad, n_pad, hops, _BOND_F), dtype=dt)
        nte = np.empty((bsz, n_pad, n_pad, 2), dtype=dt) if node_type_edge else None
        if dt == np.int32:
            _fill_batch[int32_t](gs, bsz, init, n_pad, hops, fill_hops, <int32_t*> _data(x),
                                 <int32_t*> _data(deg), <int32_t*> _data(sp),
                                 <int32_t*> _data(aet), <int32_t*> _data(ei),
                                 NULL if nte is None else <int32_t*> _data(nte), order, start, nhop)
        elif dt == np.int64:
            _fill_batch[int64_t](gs, bsz, init, n_pad, hops, fill_hops, <int64_t*> _data(x),
                                 <int64_t*> _data(deg), <int64_t*> _data(sp),
                                 <int64_t*> _data(aet), <int64_t*> _data(ei),
                                 NULL if nte is None else <int64_t*> _data(nte), order, start, nhop)
        else:
            _fill_batch[int16_t](gs, bsz, init, n_pad, hops, fill_hops, <int16_t*> _data(x),
                                 <int16_t*> _data(deg), <int16_t*> _data(sp),
                                 <int16_t*> _data(aet), <int16_t*> _data(ei),
                                 NULL if nte is None else <int16_t*> _data(nte), order, start, nhop)
    finally:
        free(gs)
        free(scratch)
        free(order)
    return x, deg, sp, aet, ei, sizes, nte
