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
from libc.stdint cimport int16_t, int32_t, int64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memset

cnp.import_array()

cdef enum:
    _UNREACH = 510

UNREACHABLE = _UNREACH
"""int: distance and path value of an unreachable pair (the official sentinel)."""

__all__ = ["UNREACHABLE", "floyd_warshall", "gen_edge_input", "shortest_path_features"]


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
