"""Plain NumPy/Python reference of :mod:`graphormer_ext.algos` (used by tests; slow).

Same signatures, conventions and outputs as the compiled kernels; see that module for the
meaning of the fixed and legacy (``legacy_atom0``) path conventions. The implementation is
deliberately different from the compiled one: the Floyd–Warshall relaxation is vectorised
over (i, j) for each k, and node paths are rebuilt by repeatedly inserting intermediates
between consecutive nodes until none is left.
"""
from __future__ import annotations

import numpy as np

UNREACHABLE = 510
"""int: distance and path value of an unreachable pair."""

__all__ = ["UNREACHABLE", "floyd_warshall", "gen_edge_input", "shortest_path_features"]


def _check_square(mat, name: str) -> np.ndarray:
    a = np.asarray(mat)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"{name} must be a square [N, N] matrix, got shape {a.shape}")
    if a.shape[0] == 0:
        raise ValueError(f"{name} is empty (N = 0): a graph needs at least one node")
    if a.shape[0] > UNREACHABLE:
        raise ValueError(f"{name} has N = {a.shape[0]} > {UNREACHABLE} nodes")
    return a


def floyd_warshall(adj, legacy_atom0: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Reference all-pairs hop distances and Floyd–Warshall intermediates.

    Args:
        adj: adjacency matrix; nonzero off-diagonal entries are edges of length 1.
        legacy_atom0: initialise ``path`` with 0 instead of -1.

    Returns:
        ``(dist, path)`` as :func:`graphormer_ext.algos.floyd_warshall`.

    Shapes:
        adj: [N, N]; dist, path: [N, N] int64.
    """
    a = _check_square(adj, "adj")
    n = a.shape[0]
    dist = np.where(a != 0, 1, UNREACHABLE).astype(np.int64)
    np.fill_diagonal(dist, 0)
    path = np.full((n, n), 0 if legacy_atom0 else -1, dtype=np.int64)
    for k in range(n):
        # Row k and column k do not change during step k, so updating all (i, j) at once
        # equals the sequential in-place loop, strict improvement included.
        cost = dist[:, k, None] + dist[None, k, :]
        better = cost < dist
        dist[better] = cost[better]
        path[better] = k
    unreachable = dist >= UNREACHABLE
    dist[unreachable] = UNREACHABLE
    path[unreachable] = UNREACHABLE
    return dist, path


def _node_sequence(path: np.ndarray, i: int, j: int, no_mid: int) -> list[int]:
    nodes = [i, j]
    changed = True
    while changed:
        changed = False
        expanded = [nodes[0]]
        for a, b in zip(nodes[:-1], nodes[1:]):
            k = int(path[a, b])
            if k != no_mid:
                if not 0 <= k < path.shape[0] or len(nodes) > path.shape[0]:
                    raise ValueError("path is not a Floyd–Warshall intermediate matrix")
                expanded.append(k)
                changed = True
            expanded.append(b)
        nodes = expanded
    return nodes


def gen_edge_input(max_dist: int, path, edge_feat, legacy_atom0: bool = False) -> np.ndarray:
    """Reference per-hop edge features along every reconstructed path.

    Args:
        max_dist: hop slots; hops beyond it are dropped.
        path: [N, N] intermediates from :func:`floyd_warshall` (same convention).
        edge_feat: [N, N, F] edge features.
        legacy_atom0: read path value 0 as "no intermediate".

    Returns:
        As :func:`graphormer_ext.algos.gen_edge_input`.

    Shapes:
        returns [N, N, max_dist, F] int64.
    """
    if max_dist < 0:
        raise ValueError(f"max_dist must be >= 0, got {max_dist}")
    p = _check_square(path, "path").astype(np.int64)
    n = p.shape[0]
    e = np.asarray(edge_feat, dtype=np.int64)
    if e.ndim != 3 or e.shape[:2] != (n, n):
        raise ValueError(f"edge_feat must have shape [N, N, F] with N = {n}, got {e.shape}")
    out = np.full((n, n, max_dist, e.shape[2]), -1, dtype=np.int64)
    no_mid = 0 if legacy_atom0 else -1
    for i in range(n):
        for j in range(n):
            if i == j or p[i, j] == UNREACHABLE:
                continue
            nodes = _node_sequence(p, i, j, no_mid)
            for h in range(min(len(nodes) - 1, max_dist)):
                out[i, j, h] = e[nodes[h], nodes[h + 1]]
    return out


def shortest_path_features(
    adj, edge_feat, max_hops, legacy_atom0: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Reference of the fused kernel: distances and the first ``H`` hops of edge features.

    Args:
        adj: [N, N] adjacency.
        edge_feat: [N, N, F] edge features.
        max_hops: hop cap; ``None`` or ``<= 0`` keeps all hops.
        legacy_atom0: released Transformer-M path convention.

    Returns:
        ``(dist, edge_input)`` with ``H = min(max reachable distance, max_hops)``.

    Shapes:
        dist: [N, N]; edge_input: [N, N, H, F] int64.
    """
    dist, path = floyd_warshall(adj, legacy_atom0)
    reachable = dist[dist < UNREACHABLE]
    hops = int(reachable.max())
    if max_hops is not None and max_hops > 0:
        hops = min(hops, int(max_hops))
    return dist, gen_edge_input(hops, path, edge_feat, legacy_atom0)
