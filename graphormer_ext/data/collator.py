"""The one collator: stored records -> the Transformer-M batch, by a per-key pad table.

Records hold model-ready indices (see :mod:`graphormer_ext.data.keys`), so collation
only pads; no value is shifted here except ``node_type_edge``, which is derived from
``x[:, 0]`` exactly as the official ``collator_3d`` does. The result equals the official
batch bit for bit (Transformer-M spec §3.3; checked against the golden file in
``tests/graphormer_ext/test_collator.py``).

Each batch array is allocated once with numpy and filled slice by slice, then handed to
torch without a copy (``torch.from_numpy``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from graphormer_ext.data import keys as K

logger = logging.getLogger(__name__)

__all__ = ["Collator", "PadSpec", "PAD_TABLE", "split_samples"]


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
        dtype: numpy dtype of the batch array.
        pair: ``True`` if the key has two node axes (``[N, N, ...]``).
    """

    fill: Callable[[np.ndarray, int, np.ndarray, int, int], None]
    pad_value: Any
    dtype: Any
    pair: bool


# Stored key -> pad spec. Integer pad 0 is the padding index of every embedding
# (keys.PAD); pos (Å) pads with 0.0 and is all zeros for records without it.
PAD_TABLE: dict[str, PadSpec] = {
    K.X: PadSpec(_fill_nodes, K.PAD, np.int64, pair=False),  # [B, N, 9]
    K.DEGREE: PadSpec(_fill_nodes, K.PAD, np.int64, pair=False),  # [B, N]
    K.SPATIAL_POS: PadSpec(_fill_pairs, K.PAD, np.int64, pair=True),  # [B, N, N]
    K.ATTN_EDGE_TYPE: PadSpec(_fill_pairs, K.PAD, np.int64, pair=True),  # [B, N, N, 3]
    K.EDGE_INPUT: PadSpec(_fill_hops, K.PAD, np.int64, pair=True),  # [B, N, N, H, 3]
    K.POS: PadSpec(_fill_nodes, 0.0, np.float32, pair=False),  # [B, N, 3]
}


def _alloc(shape: tuple[int, ...], dtype: Any, pad_value: Any) -> np.ndarray:
    if pad_value == 0:
        return np.zeros(shape, dtype=dtype)
    return np.full(shape, pad_value, dtype=dtype)


class Collator:
    """Pad stored records into one Transformer-M batch (the official ``collator_3d``).

    Args:
        max_hops: keep at most this many hops of ``edge_input`` (``multi_hop_max_dist``;
            default 5).
        pad_multiple: pad the token count ``N + 1`` (atoms + graph token) up to a
            multiple of this (8 helps tensor cores); ``1`` gives the official dynamic
            padding. Extra positions are pure padding (0 / ``-inf`` key columns), so
            model outputs on real tokens are unchanged.
        with_pos: also emit ``pos`` and ``node_type_edge`` (the 3D inputs).

    Call it on a list of samples, each either ``(index, record)`` or a record dict that
    carries :data:`keys.IDX`. No sample is ever dropped; an empty list raises
    ``ValueError``.

    Returns a dict of tensors (``B`` records, ``N`` = largest atom count, padded as
    above, ``H`` = min(max stored hops, ``max_hops``), ``T`` targets):

    - ``idx`` int64 [B]
    - ``x`` int64 [B, N, 9]; ``in_degree``, ``out_degree`` int64 [B, N] (same values)
    - ``spatial_pos`` int64 [B, N, N]; ``attn_edge_type`` int64 [B, N, N, 3]
    - ``edge_input`` int64 [B, N, N, H, 3]
    - ``attn_bias`` float32 [B, N+1, N+1]: 0 on real key columns (incl. the graph
      token), ``-inf`` on padded key columns in every row
    - ``y`` float32 [B] if T <= 1 (NaN where a record has no label) else [B, T]
    - ``pos`` float32 [B, N, 3] (zeros for records without ``pos``), ``node_type_edge``
      int64 [B, N, N, 2] = (x0_i + 1, x0_j + 513) on real pairs, (1, 513) on padded
      pairs (if ``with_pos``)
    """

    def __init__(self, max_hops: int = 5, pad_multiple: int = 1, with_pos: bool = True):
        if max_hops < 0:
            raise ValueError(f"max_hops must be >= 0, got {max_hops}")
        if pad_multiple < 1:
            raise ValueError(f"pad_multiple must be >= 1, got {pad_multiple}")
        self.max_hops = int(max_hops)
        self.pad_multiple = int(pad_multiple)
        self.with_pos = bool(with_pos)

    def __repr__(self) -> str:
        return (
            f"Collator(max_hops={self.max_hops}, pad_multiple={self.pad_multiple}, "
            f"with_pos={self.with_pos})"
        )


    def __call__(self, samples: Sequence[Any]) -> dict[str, torch.Tensor]:
        if len(samples) == 0:
            raise ValueError("Collator got an empty list of samples")
        idx, records = split_samples(samples)
        bsz = len(records)
        sizes = np.fromiter(
            (r[K.X].shape[0] for r in records), dtype=np.int64, count=bsz
        )
        n_max = int(sizes.max())
        # token count N + 1 padded to the multiple; N counts atoms only
        n_pad = -(-(n_max + 1) // self.pad_multiple) * self.pad_multiple - 1
        hops = min(max(r[K.EDGE_INPUT].shape[2] for r in records), self.max_hops)
        # A batch of single atoms has no path hop; one all-padding hop (index 0, which embeds to
        # zero) keeps the edge-bias shapes valid and adds nothing. The release crashed here.
        hops = max(hops, min(1, self.max_hops))

        batch: dict[str, torch.Tensor] = {K.IDX: torch.from_numpy(idx)}
        out_keys = list(K.STORED_KEYS) + ([K.POS] if self.with_pos else [])
        arrays: dict[str, np.ndarray] = {}
        first = records[0]
        n_list = sizes.tolist()
        for key in out_keys:
            spec = PAD_TABLE[key]
            if key == K.POS:
                trailing: tuple[int, ...] = (3,)
            elif key == K.EDGE_INPUT:
                trailing = (hops, first[key].shape[3])
            else:
                trailing = first[key].shape[2 if spec.pair else 1 :]
            lead = (bsz, n_pad, n_pad) if spec.pair else (bsz, n_pad)
            out = _alloc(lead + tuple(trailing), spec.dtype, spec.pad_value)
            fill = spec.fill
            for b, rec in enumerate(records):
                arr = rec.get(key)
                if arr is None:
                    if key == K.POS:
                        continue
                    raise KeyError(f"record idx={int(idx[b])} has no {key!r}")
                fill(out, b, arr, n_list[b], hops)
            arrays[key] = out

        for key in K.STORED_KEYS:
            batch[key] = torch.from_numpy(arrays[key])
        batch[K.OUT_DEGREE] = torch.from_numpy(arrays[K.DEGREE].copy())

        # padded key columns are -inf in every row (padded queries too: no NaN rows)
        cols = np.arange(n_pad + 1)
        pad_cols = (
            cols[None, :] > sizes[:, None]
        )  # [B, N+1]; column 0 is the graph token
        attn_bias = np.where(pad_cols, np.float32(-np.inf), np.float32(0.0)).astype(
            np.float32
        )
        batch[K.ATTN_BIAS] = torch.from_numpy(
            np.ascontiguousarray(
                np.broadcast_to(attn_bias[:, None, :], (bsz, n_pad + 1, n_pad + 1))
            )
        )
        batch[K.Y] = torch.from_numpy(self._targets(records))

        if self.with_pos:
            batch[K.POS] = torch.from_numpy(arrays[K.POS])
            batch[K.NODE_TYPE_EDGE] = torch.from_numpy(
                self._node_type_edge(arrays[K.X][:, :, 0], sizes, n_pad)
            )
        return batch

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
        """``[B, N, N, 2]`` from the stored atomic-number column ``x0`` [B, N]."""
        out = np.empty((len(sizes), n_pad, n_pad, 2), dtype=np.int64)
        # padded pairs; filled per channel because broadcasting a pair is ~10x slower
        out[..., 0] = K.NODE_TYPE_I_SHIFT
        out[..., 1] = K.NODE_TYPE_J_SHIFT
        ti = x0 + K.NODE_TYPE_I_SHIFT
        tj = x0 + K.NODE_TYPE_J_SHIFT
        for b, n in enumerate(sizes.tolist()):
            out[b, :n, :n, 0] = ti[b, :n, None]
            out[b, :n, :n, 1] = tj[b, None, :n]
        return out
