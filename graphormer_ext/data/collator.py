"""The one collator: records -> the Transformer-M batch, by a per-key pad table.

Two record layouts are accepted (see :mod:`graphormer_ext.data.keys`):

* **stored graphs** (what :class:`~graphormer_ext.data.lmdb_dataset.LMDBDataset` returns): the
  model arrays are derived in one compiled pass per batch
  (:func:`graphormer_ext.algos.collate_graphs`: degrees, shortest paths, path-edge features)
  and written straight into their padded batch slots;
* **model records** (from :func:`~graphormer_ext.featurize.graph.graph_to_record`): padded key
  by key from the pad table.

Both give the same batch. Index offsets are applied before collation, so padding is 0 everywhere;
``node_type_edge`` is derived from ``x[:, 0]`` exactly as the official ``collator_3d`` does. The
values equal the official batch bit for bit (Transformer-M spec §3.3; checked against the golden
file in ``tests/graphormer_ext/test_collator.py``). Index tensors are int32 by default (embedding
lookups accept it; half the bytes of the official int64).

Each batch array is allocated once with numpy and handed to torch without a copy
(``torch.from_numpy``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from graphormer_ext.data import keys as K

logger = logging.getLogger(__name__)

__all__ = [
    "Collator",
    "PadSpec",
    "PAD_TABLE",
    "split_samples",
    "batch_bytes",
    "DEFAULT_MAX_BATCH_BYTES",
]

# A batch above this many bytes is refused with an error (never truncated): batch by size
# (GraphDataset) or pass a larger cap. 256 batched PCQM4Mv2 molecules of 51 atoms take ~60 MB.
DEFAULT_MAX_BATCH_BYTES = 1 << 28


def batch_bytes(
    batch_size: int, n_pad: int, hops: int, with_pos: bool, itemsize: int = 4
) -> int:
    """Bytes of a collated batch of ``batch_size`` molecules padded to ``n_pad`` atoms.

    Counts every batch array (pair arrays dominate: ``B * N**2 * (3 H + 4 [+ 2])``).
    """
    b, n = int(batch_size), int(n_pad)
    pair_items = 1 + 3 + 3 * int(hops) + (2 if with_pos else 0)
    node_items = 9 + 2
    total = b * n * n * pair_items * itemsize + b * n * node_items * itemsize
    total += b * (n + 1) * (n + 1) * 4 + (b * n * 3 * 4 if with_pos else 0) + b * 8
    return total


def _fill_nodes(out: np.ndarray, b: int, arr: np.ndarray, n: int, h: int) -> None:
    """Pad the node axis: ``[n, ...]`` into ``out[b]`` of shape ``[N, ...]``."""
    out[b, :n] = arr


def _fill_pairs(out: np.ndarray, b: int, arr: np.ndarray, n: int, h: int) -> None:
    """Pad both node axes: ``[n, n, ...]`` into ``out[b]`` of shape ``[N, N, ...]``."""
    out[b, :n, :n] = arr


def _fill_hops(out: np.ndarray, b: int, arr: np.ndarray, n: int, h: int) -> None:
    """Pad ``[n, n, H_i, 3]`` into ``[N, N, H, 3]``, keeping at most ``H`` hops."""
    hi = min(arr.shape[2], h)
    if hi:
        out[b, :n, :n, :hi] = arr[:, :, :hi]


def split_samples(samples: Sequence[Any]) -> tuple[np.ndarray, list[dict]]:
    """Indices and records of a list of samples, each ``(index, record)`` or a record dict that
    carries :data:`keys.IDX` (shared by every collator).

    Returns:
        ``(idx int64 [B], records)``.
    """
    idx = np.empty(len(samples), dtype=np.int64)
    records = []
    for b, s in enumerate(samples):
        if isinstance(s, dict):
            if K.IDX not in s:
                raise KeyError(
                    f"sample {b} has no {K.IDX!r}; pass (index, record) tuples "
                    "or records with "
                    f"{K.IDX!r}"
                )
            idx[b] = int(s[K.IDX])
            records.append(s)
        else:
            i, rec = s
            idx[b] = int(i)
            records.append(rec)
    return idx, records


@dataclass(frozen=True)
class PadSpec:
    """How one stored key is batched.

    Attributes:
        fill: ``fill(out, b, arr, n, h)`` copies record ``b``'s array (``n`` atoms) into
            the batch array ``out``; ``h`` is the batch's hop count (used by
            ``edge_input`` only).
        pad_value: value of every padded entry.
        dtype: numpy dtype of the batch array; ``None`` = the collator's index dtype.
        pair: ``True`` if the key has two node axes (``[N, N, ...]``).
    """

    fill: Callable[[np.ndarray, int, np.ndarray, int, int], None]
    pad_value: Any
    dtype: Any
    pair: bool


# Model key -> pad spec. Integer pad 0 is the padding index of every embedding
# (keys.PAD); pos (Å) pads with 0.0 and is all zeros for records without it.
PAD_TABLE: dict[str, PadSpec] = {
    K.X: PadSpec(_fill_nodes, K.PAD, None, pair=False),  # [B, N, 9]
    K.DEGREE: PadSpec(_fill_nodes, K.PAD, None, pair=False),  # [B, N]
    K.SPATIAL_POS: PadSpec(_fill_pairs, K.PAD, None, pair=True),  # [B, N, N]
    K.ATTN_EDGE_TYPE: PadSpec(_fill_pairs, K.PAD, None, pair=True),  # [B, N, N, 3]
    K.EDGE_INPUT: PadSpec(_fill_hops, K.PAD, None, pair=True),  # [B, N, N, H, 3]
    K.POS: PadSpec(_fill_nodes, 0.0, np.float32, pair=False),  # [B, N, 3]
}


def _alloc(shape: tuple[int, ...], dtype: Any, pad_value: Any) -> np.ndarray:
    if pad_value == 0:
        return np.zeros(shape, dtype=dtype)
    return np.full(shape, pad_value, dtype=dtype)


class Collator:
    """Pad records into one Transformer-M batch (the official ``collator_3d``).

    Args:
        max_hops: keep at most this many hops of ``edge_input`` (``multi_hop_max_dist``;
            default 5). Stored graphs also keep at most their split's ``max_hops``.
        pad_multiple: pad the token count ``N + 1`` (atoms + graph token) up to a
            multiple of this (8 helps tensor cores); ``1`` gives the official dynamic
            padding. Extra positions are pure padding (0 / ``-inf`` key columns), so
            model outputs on real tokens are unchanged.
        with_pos: also emit ``pos`` and ``node_type_edge`` (the 3D inputs).
        index_dtype: dtype of the index tensors, ``torch.int32`` (default) or
            ``torch.int64`` (the official collator's).
        max_batch_bytes: refuse (``ValueError``) a batch whose arrays would exceed this
            many bytes instead of allocating it; ``None`` = no limit. Batch by size
            upstream (:meth:`GraphDataset.batch_by_size
            <graphormer_ext.data.base.GraphDataset.batch_by_size>` keeps every batch under
            the same budget).

    Call it on a list of samples, each either ``(index, record)`` or a record dict that
    carries :data:`keys.IDX`; records may be stored graphs or model records. No sample is
    ever dropped; an empty list raises ``ValueError``.

    Returns a dict of tensors (``B`` records, ``N`` = largest atom count, padded as
    above, ``H`` = min(max hop count over the batch, ``max_hops``), ``T`` targets; "int"
    is ``index_dtype``):

    - ``idx`` int64 [B]
    - ``x`` int [B, N, 9]; ``in_degree``, ``out_degree`` int [B, N] (same values)
    - ``spatial_pos`` int [B, N, N]; ``attn_edge_type`` int [B, N, N, 3]
    - ``edge_input`` int [B, N, N, H, 3]
    - ``attn_bias`` float32 [B, N+1, N+1]: 0 on real key columns (incl. the graph
      token), ``-inf`` on padded key columns in every row
    - ``y`` float32 [B] if T <= 1 (NaN where a record has no label) else [B, T]
    - ``pos`` float32 [B, N, 3] (zeros for records without ``pos``), ``node_type_edge``
      int [B, N, N, 2] = (x0_i + 1, x0_j + 513) on real pairs, (1, 513) on padded
      pairs (if ``with_pos``)
    """

    def __init__(
        self,
        max_hops: int = 5,
        pad_multiple: int = 1,
        with_pos: bool = True,
        index_dtype: torch.dtype = torch.int32,
        max_batch_bytes: int | None = DEFAULT_MAX_BATCH_BYTES,
    ):
        if max_hops < 0:
            raise ValueError(f"max_hops must be >= 0, got {max_hops}")
        if pad_multiple < 1:
            raise ValueError(f"pad_multiple must be >= 1, got {pad_multiple}")
        if index_dtype not in (torch.int32, torch.int64):
            raise ValueError(f"index_dtype must be torch.int32 or torch.int64, got {index_dtype}")
        self.max_hops = int(max_hops)
        self.pad_multiple = int(pad_multiple)
        self.with_pos = bool(with_pos)
        self.index_dtype = index_dtype
        self._np_index = np.int32 if index_dtype == torch.int32 else np.int64
        self.max_batch_bytes = None if max_batch_bytes is None else int(max_batch_bytes)

    def __repr__(self) -> str:
        return (
            f"Collator(max_hops={self.max_hops}, pad_multiple={self.pad_multiple}, "
            f"with_pos={self.with_pos}, index_dtype={self.index_dtype}, "
            f"max_batch_bytes={self.max_batch_bytes})"
        )

    def __call__(self, samples: Sequence[Any]) -> dict[str, torch.Tensor]:
        if len(samples) == 0:
            raise ValueError("Collator got an empty list of samples")
        idx, records = split_samples(samples)
        bsz = len(records)
        stored = [K.NODE_FEAT in r for r in records]
        if all(stored):
            sizes = np.fromiter(
                (r[K.NODE_FEAT].shape[0] for r in records), dtype=np.int64, count=bsz
            )
        else:
            if any(stored):  # a mixed batch: derive the stored ones one by one
                from graphormer_ext.featurize.graph import expand_record

                records = [expand_record(r) if s else r for r, s in zip(records, stored)]
            for b, r in enumerate(records):
                if K.X not in r:
                    raise KeyError(
                        f"record idx={int(idx[b])} is neither a stored graph ({K.NODE_FEAT!r}) "
                        f"nor a model record ({K.X!r}); it has {sorted(r)}"
                    )
            sizes = np.fromiter((r[K.X].shape[0] for r in records), dtype=np.int64, count=bsz)
        n_max = int(sizes.max())
        # token count N + 1 padded to the multiple; N counts atoms only
        n_pad = -(-(n_max + 1) // self.pad_multiple) * self.pad_multiple - 1
        self._check_size(idx, bsz, n_pad, n_max)
        if all(stored):
            arrays = self._derive(idx, records, n_pad)
        else:
            arrays = self._pad(idx, records, sizes, n_pad)

        batch: dict[str, torch.Tensor] = {K.IDX: torch.from_numpy(idx)}
        for key in K.MODEL_KEYS:
            batch[key] = torch.from_numpy(arrays[key])
        batch[K.OUT_DEGREE] = torch.from_numpy(arrays[K.DEGREE].copy())

        # padded key columns are -inf in every row (padded queries too: no NaN rows)
        cols = np.arange(n_pad + 1)
        pad_cols = cols[None, :] > sizes[:, None]  # [B, N+1]; column 0 is the graph token
        attn_bias = np.where(pad_cols, np.float32(-np.inf), np.float32(0.0))
        batch[K.ATTN_BIAS] = torch.from_numpy(
            np.ascontiguousarray(
                np.broadcast_to(attn_bias[:, None, :], (bsz, n_pad + 1, n_pad + 1))
            )
        )
        batch[K.Y] = torch.from_numpy(self._targets(records))

        if self.with_pos:
            spec = PAD_TABLE[K.POS]
            pos = _alloc((bsz, n_pad, 3), spec.dtype, spec.pad_value)
            for b, rec in enumerate(records):
                p = rec.get(K.POS)
                if p is not None:  # no 3D: zeros
                    spec.fill(pos, b, p, p.shape[0], 0)
            batch[K.POS] = torch.from_numpy(pos)
            nte = arrays.get(K.NODE_TYPE_EDGE)
            if nte is None:
                nte = self._node_type_edge(arrays[K.X][:, :, 0], sizes, n_pad)
            batch[K.NODE_TYPE_EDGE] = torch.from_numpy(nte)
        return batch

    def batch_nbytes(self, batch_size: int, max_atoms: int) -> int:
        """Upper bound of the bytes of a batch of ``batch_size`` molecules whose largest has
        ``max_atoms`` atoms (padding and the hop count as this collator sets them)."""
        n_pad = -(-(max_atoms + 1) // self.pad_multiple) * self.pad_multiple - 1
        hops = max(min(self.max_hops, max_atoms - 1), min(1, self.max_hops))  # <= N - 1
        itemsize = np.dtype(self._np_index).itemsize
        return batch_bytes(batch_size, n_pad, hops, self.with_pos, itemsize)

    def _check_size(self, idx: np.ndarray, bsz: int, n_pad: int, n_max: int) -> None:
        if self.max_batch_bytes is None:
            return
        size = self.batch_nbytes(bsz, n_max)
        if size > self.max_batch_bytes:
            raise ValueError(
                f"a batch of {bsz} molecules padded to {n_pad} atoms (idx {int(idx[0])}, ...) "
                f"needs ~{size / 2**20:.0f} MiB, above max_batch_bytes = "
                f"{self.max_batch_bytes / 2**20:.0f} MiB: batch by size "
                "(GraphDataset.batch_by_size / --max-tokens), use smaller batches, leave out "
                "large molecules upstream (--max-nodes), or raise max_batch_bytes"
            )

    def _derive(self, idx: np.ndarray, records: list[dict], n_pad: int) -> dict[str, np.ndarray]:
        """Model arrays of stored graphs, computed into the padded batch (one kernel call)."""
        from graphormer_ext.featurize.graph import _require_algos

        algos = _require_algos()
        spec = records[0].get(K.PATH_SPEC)
        for b, rec in enumerate(records):
            s = rec.get(K.PATH_SPEC)
            if s is None:
                raise KeyError(
                    f"stored graph record idx={int(idx[b])} has no {K.PATH_SPEC!r}: read "
                    "records through LMDBDataset or graph_to_stored (which attach it)"
                )
            if s is not spec and not np.array_equal(s, spec):
                raise ValueError(
                    f"records idx={int(idx[0])} and idx={int(idx[b])} have different path "
                    f"settings (max_hops, legacy) {spec.tolist()} and {s.tolist()}: a batch "
                    "mixes splits built with different --max-hops / --path-convention"
                )
        split_hops, legacy = int(spec[0]), bool(spec[1])
        cap = self.max_hops if split_hops == 0 else min(self.max_hops, split_hops)
        graphs = [(r[K.NODE_FEAT], r[K.BOND_INDEX], r[K.BOND_FEAT]) for r in records]
        try:
            out = algos.collate_graphs(
                graphs, n_pad, cap, legacy, min(1, self.max_hops), self._np_index,
                self.with_pos,
            )
        except ValueError as exc:  # "graph <b>: ..." -> name the record
            text = str(exc)
            if text.startswith("graph "):
                b = int(text.split(":", 1)[0].split()[1])
                text = f"record idx={int(idx[b])}:{text.split(':', 1)[1]}"
            raise ValueError(f"invalid stored graph, {text}") from None
        arrays = dict(zip(K.MODEL_KEYS, out[:5]))
        if self.with_pos:
            arrays[K.NODE_TYPE_EDGE] = out[6]
        return arrays

    def _pad(
        self, idx: np.ndarray, records: list[dict], sizes: np.ndarray, n_pad: int
    ) -> dict[str, np.ndarray]:
        """Model arrays of model records, padded key by key."""
        bsz = len(records)
        hops = min(max(r[K.EDGE_INPUT].shape[2] for r in records), self.max_hops)
        # A batch of single atoms has no path hop; one all-padding hop (index 0, which embeds to
        # zero) keeps the edge-bias shapes valid and adds nothing. The release crashed here.
        hops = max(hops, min(1, self.max_hops))
        arrays: dict[str, np.ndarray] = {}
        first = records[0]
        n_list = sizes.tolist()
        for key in K.MODEL_KEYS:
            spec = PAD_TABLE[key]
            if key == K.EDGE_INPUT:
                trailing: tuple[int, ...] = (hops, first[key].shape[3])
            else:
                trailing = first[key].shape[2 if spec.pair else 1 :]
            lead = (bsz, n_pad, n_pad) if spec.pair else (bsz, n_pad)
            dtype = self._np_index if spec.dtype is None else spec.dtype
            out = _alloc(lead + tuple(trailing), dtype, spec.pad_value)
            fill = spec.fill
            for b, rec in enumerate(records):
                arr = rec.get(key)
                if arr is None:
                    raise KeyError(f"record idx={int(idx[b])} has no {key!r}")
                fill(out, b, arr, n_list[b], hops)
            arrays[key] = out
        return arrays

    @staticmethod
    def _targets(records: list[dict]) -> np.ndarray:
        ys = [r.get(K.Y) for r in records]
        lengths = {v.size for v in ys if v is not None and v.size}
        if len(lengths) > 1:
            raise ValueError(
                f"records in a batch have different target counts {sorted(lengths)}"
            )
        t = lengths.pop() if lengths else 1
        missing = np.full(t, np.nan, dtype=np.float32)
        y = np.concatenate(
            [v.reshape(t) if v is not None and v.size else missing for v in ys]
        )
        y = y.astype(np.float32, copy=False).reshape(len(records), t)
        return y[:, 0].copy() if t == 1 else y  # [B] or [B, T]

    @staticmethod
    def _node_type_edge(x0: np.ndarray, sizes: np.ndarray, n_pad: int) -> np.ndarray:
        """``[B, N, N, 2]`` from the model atomic-number column ``x0`` [B, N]."""
        out = np.empty((len(sizes), n_pad, n_pad, 2), dtype=x0.dtype)
        # padded pairs; filled per channel because broadcasting a pair is ~10x slower
        out[..., 0] = K.NODE_TYPE_I_SHIFT
        out[..., 1] = K.NODE_TYPE_J_SHIFT
        ti = x0 + K.NODE_TYPE_I_SHIFT
        tj = x0 + K.NODE_TYPE_J_SHIFT
        for b, n in enumerate(sizes.tolist()):
            out[b, :n, :n, 0] = ti[b, :n, None]
            out[b, :n, :n, 1] = tj[b, None, :n]
        return out
