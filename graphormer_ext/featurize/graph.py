"""OGB-style molecular graph -> stored record (model-ready indices, 0 = padding).

Pure numpy: no torch, RDKit, RNG or I/O. The index conventions are those of
:mod:`graphormer_ext.data.keys`; the shortest paths come from the compiled
:mod:`graphormer_ext.algos`. Relative to the official Transformer-M pipeline
(``preprocess_item`` + ``collator_3d``), every stored array already includes the collator's
shift, and ``edge_input`` is truncated to ``max_hops`` once, offline.
"""
from __future__ import annotations

import numpy as np

from graphormer_ext.data import keys

try:
    from graphormer_ext import algos as _algos
except ImportError as _exc:  # the Cython extension has not been compiled
    _algos = None
    _ALGOS_IMPORT_ERROR: ImportError | None = _exc
else:
    _ALGOS_IMPORT_ERROR = None

__all__ = ["graph_to_record"]

_LEGACY = "legacy"  # member of keys.PATH_CONVENTIONS: released Transformer-M atom-0 paths
# Largest raw feature value whose stored x / attn_edge_type index stays inside its 512-wide
# block of the shared vocabulary (510 would alias the next feature's padding-shifted range).
_MAX_RAW_ATOM = keys.FEATURE_OFFSET - keys.X_SHIFT - 1  # 509
_MAX_RAW_BOND = keys.FEATURE_OFFSET - keys.EDGE_TYPE_SHIFT - 1  # 509
# gen_edge_input writes attn_edge_type values (bond) or 0 (legacy non-bond hop) and -1 (no hop);
# the collator's +1 turns them into the stored edge_input indices.
_EDGE_INPUT_FROM_KERNEL = keys.EDGE_INPUT_SHIFT - keys.EDGE_TYPE_SHIFT


def _require_algos():
    if _algos is None:
        raise ImportError(
            "graphormer_ext.algos (the compiled Cython extension) is not built; build it "
            "with `pip install -e .` (or `bash bootstrap.sh`) in the repository root"
        ) from _ALGOS_IMPORT_ERROR
    return _algos


def _int_matrix(value, name: str, ncols: int) -> np.ndarray:
    arr = np.asarray(value)
    if arr.size == 0 and arr.ndim <= 2:
        arr = arr.reshape(0, ncols)
    if arr.ndim != 2 or arr.shape[1] != ncols:
        raise ValueError(f"{name} must have shape [*, {ncols}], got {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must have an integer dtype, got {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _check_vocab(raw: np.ndarray, name: str, max_raw: int) -> None:
    bad = (raw < 0) | (raw > max_raw)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise ValueError(
            f"{name}[{row}, {col}] = {raw[row, col]} is outside the vocabulary: raw feature "
            f"values must lie in [0, {max_raw}] so that the shifted index stays inside its "
            f"{keys.FEATURE_OFFSET}-wide block (a larger value collides with the next feature)"
        )


def _check_edges(edge_index, n: int, num_edges: int) -> tuple[np.ndarray, np.ndarray]:
    ei = np.asarray(edge_index)
    if ei.size == 0 and ei.ndim <= 2:
        ei = ei.reshape(2, 0)
    if ei.ndim != 2 or ei.shape[0] != 2:
        raise ValueError(f"edge_index must have shape [2, E], got {ei.shape}")
    if ei.dtype.kind not in "iu":
        raise ValueError(f"edge_index must have an integer dtype, got {ei.dtype}")
    if ei.shape[1] != num_edges:
        raise ValueError(
            f"edge_index has {ei.shape[1]} edges but edge_attr has {num_edges} rows"
        )
    src = ei[0].astype(np.int64)
    dst = ei[1].astype(np.int64)
    if num_edges == 0:
        return src, dst
    if src.min() < 0 or dst.min() < 0 or src.max() >= n or dst.max() >= n:
        raise ValueError(f"edge_index has node indices outside [0, {n - 1}] (N = {n})")
    if (src == dst).any():
        raise ValueError(f"edge_index has a self-loop at node {int(src[src == dst][0])}")
    code = src * n + dst
    if np.unique(code).size != code.size:
        raise ValueError("edge_index lists the same directed edge more than once")
    if not np.isin(dst * n + src, code).all():
        raise ValueError(
            "edge_index must list both directions of every bond (OGB convention)"
        )
    return src, dst


def graph_to_record(
    node_feat,
    edge_index,
    edge_attr,
    *,
    pos=None,
    y=None,
    max_hops: int | None = 5,
    path_convention: str = "fixed",
) -> dict[str, np.ndarray]:
    """Featurize one molecular graph into the stored LMDB record.

    Args:
        node_feat: raw OGB atom features (``atom_to_feature_vector``), integers in [0, 509].
        edge_index: directed edges, both directions of every bond, no self-loops.
        edge_attr: raw OGB bond features of each directed edge, integers in [0, 509].
        pos: optional atom coordinates in Å; must be finite.
        y: optional targets (scalar or 1-D); NaN marks a missing label.
        max_hops: number of path hops kept in ``edge_input`` (Transformer-M reads 5);
            ``None`` keeps all of them.
        path_convention: one of ``keys.PATH_CONVENTIONS``: ``"fixed"`` (Graphormer's fixed
            path reconstruction) or ``"legacy"`` (the released Transformer-M code, where a
            path through atom 0 reads as one hop over a non-bonded pair).

    Returns:
        ``{keys.X, keys.DEGREE, keys.SPATIAL_POS, keys.ATTN_EDGE_TYPE, keys.EDGE_INPUT}`` as
        int16 plus ``keys.POS`` and ``keys.Y`` (float32) when given. Values follow
        :mod:`graphormer_ext.data.keys`: ``x = raw + 2 + 512 f``; ``in_degree = degree + 1``;
        ``spatial_pos = spd + 1`` (511 unreachable); ``attn_edge_type = raw + 2 + 512 f`` on
        bonds, 0 elsewhere; ``edge_input = raw + 3 + 512 f`` per bond hop, 1 for a legacy
        non-bond hop, 0 for unused hops. ``H = min(max reachable spd, max_hops)``.

    Shapes:
        node_feat: [N, 9]; edge_index: [2, E]; edge_attr: [E, 3]; pos: [N, 3]; y: [T].
        Returns x [N, 9], in_degree [N], spatial_pos [N, N], attn_edge_type [N, N, 3],
        edge_input [N, N, H, 3], pos [N, 3], y [T].

    Raises:
        ValueError: empty graph, malformed shapes or edges, feature values outside the
            vocabulary, degree above ``keys.MAX_DEGREE``, bad ``pos``, ``max_hops`` or
            ``path_convention``.
        ImportError: if the ``graphormer_ext.algos`` extension has not been built.
    """
    algos = _require_algos()
    if path_convention not in keys.PATH_CONVENTIONS:
        raise ValueError(
            f"path_convention must be one of {keys.PATH_CONVENTIONS}, got {path_convention!r}"
        )
    if max_hops is not None and (
        isinstance(max_hops, bool) or not isinstance(max_hops, (int, np.integer)) or max_hops < 1
    ):
        raise ValueError(f"max_hops must be a positive int or None, got {max_hops!r}")

    raw_x = _int_matrix(node_feat, "node_feat", keys.NUM_ATOM_FEATURES)
    n = raw_x.shape[0]
    if n == 0:
        raise ValueError("the graph has no atoms (N = 0)")
    _check_vocab(raw_x, "node_feat", _MAX_RAW_ATOM)
    raw_e = _int_matrix(edge_attr, "edge_attr", keys.NUM_BOND_FEATURES)
    _check_vocab(raw_e, "edge_attr", _MAX_RAW_BOND)
    src, dst = _check_edges(edge_index, n, raw_e.shape[0])

    adj = np.zeros((n, n), dtype=np.int64)  # [N, N]
    adj[src, dst] = 1
    degree = adj.sum(axis=1)  # [N]
    if degree.max() > keys.MAX_DEGREE:
        atom = int(degree.argmax())
        raise ValueError(
            f"atom {atom} has degree {int(degree[atom])} > keys.MAX_DEGREE = {keys.MAX_DEGREE}"
        )
    if n > algos.UNREACHABLE:
        raise ValueError(
            f"the graph has N = {n} atoms; at most {algos.UNREACHABLE} are supported "
            "(algos.UNREACHABLE is the unreachable-distance sentinel)"
        )

    atom_offsets = keys.FEATURE_OFFSET * np.arange(keys.NUM_ATOM_FEATURES, dtype=np.int64)
    bond_offsets = keys.FEATURE_OFFSET * np.arange(keys.NUM_BOND_FEATURES, dtype=np.int64)
    attn_edge_type = np.zeros((n, n, keys.NUM_BOND_FEATURES), dtype=np.int64)  # [N, N, 3]
    attn_edge_type[src, dst] = raw_e + keys.EDGE_TYPE_SHIFT + bond_offsets

    dist, edge_input = algos.shortest_path_features(
        adj, attn_edge_type, max_hops, legacy_atom0=path_convention == _LEGACY
    )  # [N, N], [N, N, H, 3]

    record = {
        keys.X: (raw_x + keys.X_SHIFT + atom_offsets).astype(np.int16),
        keys.DEGREE: (degree + keys.DEGREE_SHIFT).astype(np.int16),
        keys.SPATIAL_POS: (dist + keys.SPATIAL_SHIFT).astype(np.int16),
        keys.ATTN_EDGE_TYPE: attn_edge_type.astype(np.int16),
        keys.EDGE_INPUT: (edge_input + _EDGE_INPUT_FROM_KERNEL).astype(np.int16),
    }
    if pos is not None:
        coords = np.asarray(pos, dtype=np.float32)
        if coords.shape != (n, 3):
            raise ValueError(f"pos must have shape [N, 3] = [{n}, 3], got {coords.shape}")
        if not np.isfinite(coords).all():
            raise ValueError("pos has NaN coordinates (or infinite ones)")
        record[keys.POS] = coords
    if y is not None:
        record[keys.Y] = np.asarray(y, dtype=np.float32).reshape(-1)
    return record
