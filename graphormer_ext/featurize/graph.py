"""OGB-style molecular graph -> stored graph (LMDB) -> model record (0 = padding).

Pure numpy: no torch, RDKit, RNG or I/O. :func:`graph_to_stored` checks an OGB graph and keeps
what cannot be derived (raw features, one row per bond, positions, targets);
:func:`expand_record` derives the model record from it with the compiled
:mod:`graphormer_ext.algos` (degrees, shortest paths, path-edge features, offsets);
:func:`graph_to_record` is the two in a row. The index conventions are those of
:mod:`graphormer_ext.data.keys`: relative to the official Transformer-M pipeline
(``preprocess_item`` + ``collator_3d``), every model array already includes the collator's
shift, and ``edge_input`` keeps at most ``max_hops`` hops.
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

__all__ = [
    "graph_to_record",
    "graph_to_stored",
    "stored_from_bonds",
    "expand_record",
    "model_to_stored",
]

# Largest raw feature value whose stored x / attn_edge_type index stays inside its 512-wide
# block of the shared vocabulary (510 would alias the next feature's padding-shifted range).
_MAX_RAW_ATOM = keys.FEATURE_OFFSET - keys.X_SHIFT - 1  # 509
_MAX_RAW_BOND = keys.FEATURE_OFFSET - keys.EDGE_TYPE_SHIFT - 1  # 509
_UNREACHABLE = 510  # algos.UNREACHABLE (tested equal): checked without loading the extension


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


def _bonds(edge_index, edge_attr: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Directed OGB edges -> one ``(i, j)`` row per bond and its features.

    Checks: shape, integer dtype, node range, no self-loops, no repeated edge, both
    directions of every bond present with equal features.
    """
    ei = np.asarray(edge_index)
    num_edges = edge_attr.shape[0]
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
    if num_edges == 0:
        return np.zeros((0, 2), dtype=np.int64), np.zeros((0, keys.NUM_BOND_FEATURES), np.int64)
    src = ei[0].astype(np.int64, copy=False)
    dst = ei[1].astype(np.int64, copy=False)
    if src.min() < 0 or dst.min() < 0 or src.max() >= n or dst.max() >= n:
        raise ValueError(f"edge_index has node indices outside [0, {n - 1}] (N = {n})")
    loops = src == dst
    if loops.any():
        raise ValueError(f"edge_index has a self-loop at node {int(src[loops][0])}")
    # One slot per ordered pair (N <= 510, so at most 260k slots): repeated edges and missing
    # reverse edges show up without sorting.
    code = src * n + dst
    slot = np.full(n * n, -1, dtype=np.int64)
    slot[code] = np.arange(num_edges)
    if (slot[code] != np.arange(num_edges)).any():
        raise ValueError("edge_index lists the same directed edge more than once")
    reverse = slot[dst * n + src]
    if (reverse < 0).any():
        raise ValueError(
            "edge_index must list both directions of every bond (OGB convention)"
        )
    forward = np.flatnonzero(src < dst)
    feats = edge_attr[forward]
    if not np.array_equal(feats, edge_attr[reverse[forward]]):
        bad = forward[(feats != edge_attr[reverse[forward]]).any(axis=1)][0]
        raise ValueError(
            f"edge_attr differs between the two directions of the bond "
            f"({int(src[bad])}, {int(dst[bad])}); a bond has one feature row"
        )
    return np.stack([src[forward], dst[forward]], axis=1), feats


def _small_uint(arr: np.ndarray) -> np.ndarray:
    """``arr`` (non-negative, <= 509) as uint8 when it fits, else uint16: the stored width."""
    if arr.size == 0 or int(arr.max()) <= 0xFF:
        return arr.astype(np.uint8)
    return arr.astype(np.uint16)


def graph_to_stored(
    node_feat,
    edge_index,
    edge_attr,
    *,
    pos=None,
    y=None,
    max_hops: int | None = 5,
    path_convention: str = "fixed",
) -> dict[str, np.ndarray]:
    """Check one OGB molecular graph and return its stored form (LMDB schema 2).

    Args:
        node_feat: raw OGB atom features (``atom_to_feature_vector``), integers in [0, 509].
        edge_index: directed edges, both directions of every bond, no self-loops.
        edge_attr: raw OGB bond features of each directed edge, integers in [0, 509]; both
            directions of a bond must carry the same features.
        pos: optional atom coordinates in Å; must be finite.
        y: optional targets (scalar or 1-D); NaN marks a missing label.
        max_hops: path hops the model record will keep (``None``: all); goes into
            ``path_spec`` only, nothing is computed here.
        path_convention: one of ``keys.PATH_CONVENTIONS`` (see :func:`graph_to_record`).

    Returns:
        ``{node_feat, bond_index, bond_feat, path_spec}`` plus ``pos`` (float32) and ``y``
        (float32) when given: raw features as uint8 (uint16 if a value exceeds 255), one
        bond per row ``(i, j)`` with ``i < j``, and :func:`keys.path_spec`. The LMDB writer
        stores everything except ``path_spec`` (a split-level fact kept in its meta record).

    Shapes:
        node_feat: [N, 9]; edge_index: [2, E]; edge_attr: [E, 3]; pos: [N, 3]; y: [T].
        Returns node_feat [N, 9], bond_index [E/2, 2], bond_feat [E/2, 3], pos [N, 3],
        y [T], path_spec [2].

    Raises:
        ValueError: empty graph, more than ``algos.UNREACHABLE`` atoms, malformed shapes or
            edges, feature values outside the vocabulary, degree above
            ``keys.MAX_DEGREE``, bad ``pos``, ``max_hops`` or ``path_convention``.
    """
    raw_x = _int_matrix(node_feat, "node_feat", keys.NUM_ATOM_FEATURES)
    n = raw_x.shape[0]
    if n == 0:
        raise ValueError("the graph has no atoms (N = 0)")
    raw_e = _int_matrix(edge_attr, "edge_attr", keys.NUM_BOND_FEATURES)
    _check_vocab(raw_e, "edge_attr", _MAX_RAW_BOND)
    bonds, bond_feat = _bonds(edge_index, raw_e, n)
    return stored_from_bonds(
        raw_x, bonds, bond_feat, pos=pos, y=y, max_hops=max_hops,
        path_convention=path_convention,
    )


def stored_from_bonds(
    node_feat,
    bond_index,
    bond_feat,
    *,
    pos=None,
    y=None,
    max_hops: int | None = 5,
    path_convention: str = "fixed",
) -> dict[str, np.ndarray]:
    """The stored graph of raw atom features and one row per bond (the featurizer's fast
    path: no directed edge list is built or matched).

    Args:
        node_feat: raw OGB atom features [N, 9], integers in [0, 509].
        bond_index: ``(i, j)`` atoms of each bond [M, 2]; each bond once.
        bond_feat: raw OGB features of each bond [M, 3], integers in [0, 509].
        pos, y, max_hops, path_convention: as :func:`graph_to_stored`.

    Returns:
        As :func:`graph_to_stored` (bond rows as given).

    Raises:
        ValueError: as :func:`graph_to_stored` (a bond listed twice is an error there only).
    """
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
    if raw_x.min() < 0 or raw_x.max() > _MAX_RAW_ATOM:
        _check_vocab(raw_x, "node_feat", _MAX_RAW_ATOM)
    bonds = _int_matrix(bond_index, "bond_index", 2)
    raw_e = _int_matrix(bond_feat, "bond_feat", keys.NUM_BOND_FEATURES)
    if raw_e.shape[0] != bonds.shape[0]:
        raise ValueError(
            f"bond_index has {bonds.shape[0]} bonds but bond_feat has {raw_e.shape[0]} rows"
        )
    if bonds.shape[0]:
        if raw_e.min() < 0 or raw_e.max() > _MAX_RAW_BOND:
            _check_vocab(raw_e, "bond_feat", _MAX_RAW_BOND)
        if bonds.min() < 0 or bonds.max() >= n:
            raise ValueError(f"bond_index has atom indices outside [0, {n - 1}] (N = {n})")
        loops = bonds[:, 0] == bonds[:, 1]
        if loops.any():
            raise ValueError(f"bond_index has a self-loop at atom {int(bonds[loops][0, 0])}")
        degree = np.bincount(bonds.ravel(), minlength=n)
        if degree.max() > keys.MAX_DEGREE:
            atom = int(degree.argmax())
            raise ValueError(
                f"atom {atom} has degree {int(degree[atom])} > keys.MAX_DEGREE = {keys.MAX_DEGREE}"
            )
    if n > _UNREACHABLE:
        raise ValueError(
            f"the graph has N = {n} atoms; at most {_UNREACHABLE} are supported "
            "(algos.UNREACHABLE is the unreachable-distance sentinel)"
        )
    record = {
        keys.NODE_FEAT: _small_uint(raw_x),
        keys.BOND_INDEX: bonds.astype(np.uint8 if n <= 0x100 else np.uint16),
        keys.BOND_FEAT: _small_uint(raw_e),
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
    record[keys.PATH_SPEC] = keys.path_spec(max_hops, path_convention)
    return record


def expand_record(stored: dict) -> dict[str, np.ndarray]:
    """The model record of a stored graph record (eager, one molecule; the collator batches).

    Args:
        stored: a record with :data:`keys.GRAPH_KEYS` and :data:`keys.PATH_SPEC` (as
            returned by :func:`graph_to_stored` or
            :class:`~graphormer_ext.data.lmdb_dataset.LMDBDataset`); other keys (``pos``,
            ``y``, per-record bytes) are passed through.

    Returns:
        ``{x, in_degree, spatial_pos, attn_edge_type, edge_input}`` as int16 (see
        :func:`graph_to_record`) plus the passed-through keys.

    Raises:
        KeyError: a graph key or ``path_spec`` is missing.
        ValueError: the stored arrays are inconsistent (see :func:`algos.expand_graph`).
        ImportError: if the ``graphormer_ext.algos`` extension has not been built.
    """
    algos = _require_algos()
    missing = [k for k in (*keys.GRAPH_KEYS, keys.PATH_SPEC) if k not in stored]
    if missing:
        raise KeyError(f"not a stored graph record: no {missing}; have {sorted(stored)}")
    hops, legacy = (int(v) for v in stored[keys.PATH_SPEC])
    arrays = algos.expand_graph(
        stored[keys.NODE_FEAT], stored[keys.BOND_INDEX], stored[keys.BOND_FEAT],
        hops or None, bool(legacy),
    )
    out = dict(zip(keys.MODEL_KEYS, arrays))
    skip = (*keys.GRAPH_KEYS, keys.PATH_SPEC)
    out.update((k, v) for k, v in stored.items() if k not in skip)
    return out


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
    """Featurize one molecular graph into its model record: :func:`graph_to_stored`, then
    :func:`expand_record`.

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
        ValueError: as :func:`graph_to_stored`.
        ImportError: if the ``graphormer_ext.algos`` extension has not been built.
    """
    _require_algos()
    return expand_record(
        graph_to_stored(
            node_feat, edge_index, edge_attr, pos=pos, y=y, max_hops=max_hops,
            path_convention=path_convention,
        )
    )


def model_to_stored(record: dict, *, max_hops: int | None, path_convention: str) -> dict:
    """The stored graph of a model record, checked to derive exactly that record again.

    For featurizers that still return model records (:func:`graph_to_record` output): the
    raw features and bonds are read back from ``x`` and ``attn_edge_type``, and the model
    arrays re-derived with ``max_hops`` / ``path_convention`` must equal the given ones, so
    that storing the graph instead of the arrays changes nothing.

    Args:
        record: a model record (:data:`keys.MODEL_KEYS`, optional ``pos``, ``y``, ...).
        max_hops: the split's hop limit (``None``: all).
        path_convention: the split's path convention.

    Returns:
        The stored graph record with :data:`keys.PATH_SPEC` (other keys passed through).

    Raises:
        ValueError: the model arrays are not those of a graph under these settings (e.g.
            hand-made ``edge_input`` values, or another path convention).
    """
    x = np.asarray(record[keys.X], dtype=np.int64)
    raw_x = x - keys.X_SHIFT - keys.FEATURE_OFFSET * np.arange(keys.NUM_ATOM_FEATURES)
    aet = np.asarray(record[keys.ATTN_EDGE_TYPE], dtype=np.int64)  # [N, N, 3]
    i, j = np.nonzero(np.triu(aet[:, :, 0] != keys.PAD, k=1))
    raw_e = aet[i, j] - keys.EDGE_TYPE_SHIFT - keys.FEATURE_OFFSET * np.arange(
        keys.NUM_BOND_FEATURES
    )
    edge_index = np.stack([np.r_[i, j], np.r_[j, i]])
    edge_attr = np.concatenate([raw_e, raw_e])
    try:
        stored = graph_to_stored(
            raw_x, edge_index, edge_attr, max_hops=max_hops, path_convention=path_convention
        )
    except ValueError as exc:
        raise ValueError(f"the model record does not describe a graph: {exc}") from None
    derived = expand_record(stored)
    for key in keys.MODEL_KEYS:
        given = np.asarray(record[key])
        if given.shape != derived[key].shape or not np.array_equal(given, derived[key]):
            raise ValueError(
                f"the record's {key!r} differs from the one derived from its graph with "
                f"max_hops={max_hops}, path_convention={path_convention!r}; stored graphs keep "
                "only derivable arrays (featurize with these settings)"
            )
    skip = set(keys.MODEL_KEYS)
    stored.update((k, v) for k, v in record.items() if k not in skip)
    return stored
