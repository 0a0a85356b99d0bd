"""Point-cloud collator: atoms + coordinates (+ energy, forces) for 3D models.

GeoMFormer, 3D-GSRD and the MD17 energy/force tasks read atomic numbers and positions
only, not the Transformer-M graph keys. :class:`PointCloudCollator` pads such records into one
batch. It accepts both record layouts of the data layer:

- point-cloud records (e.g. MD17): ``z`` int16 [N] (raw atomic numbers) and ``pos``;
- stored graph records: ``node_feat`` [N, 9] and ``pos``; the atomic number is
  ``node_feat[:, 0] + 1`` (OGB's raw index is ``Z - 1``);
- Transformer-M model records: ``x`` int16 [N, 9] and ``pos``; the atomic number is
  recovered as ``x[:, 0] - keys.Z_FROM_X0`` (model ``x0 = (Z - 1) + 2``, see
  :mod:`graphormer_ext.data.keys`).

Each batch array is allocated once and filled slice by slice, then handed to torch
without a copy (``torch.from_numpy``).
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch

from graphormer_ext.data import keys as K
from graphormer_ext.data.collator import split_samples

logger = logging.getLogger(__name__)

__all__ = ["PointCloudCollator", "atomic_numbers"]


def atomic_numbers(record: dict, idx: int | None = None) -> np.ndarray:
    """Atomic numbers ``[N]`` (int64, H = 1) of a point-cloud or graph record.

    Args:
        record: a record with ``z``, ``node_feat`` or ``x``.
        idx: record index, used in error messages only.

    Raises:
        KeyError: the record has none of ``z``, ``node_feat``, ``x``.
        ValueError: an atomic number is < 1.
    """
    if K.Z in record:
        z = np.asarray(record[K.Z]).reshape(-1).astype(np.int64)
    elif K.NODE_FEAT in record:
        z = np.asarray(record[K.NODE_FEAT])[:, 0].astype(np.int64) + K.Z_FROM_NODE_FEAT
    elif K.X in record:
        z = np.asarray(record[K.X])[:, 0].astype(np.int64) - K.Z_FROM_X0
    else:
        raise KeyError(
            f"record idx={idx} has none of {K.Z!r}, {K.NODE_FEAT!r}, {K.X!r}; "
            f"have {sorted(record)}"
        )
    if z.size and int(z.min()) < 1:
        raise ValueError(
            f"record idx={idx}: atomic numbers must be >= 1, got {z.min()}"
        )
    return z


class PointCloudCollator:
    """Pad point-cloud records into a batch for 3D models.

    Args:
        pad_multiple: pad the atom axis ``N`` up to a multiple of this (there is no
            graph token here); extra positions are padding (``z = 0``,
            ``atom_mask = False``).
        center: subtract each molecule's centroid (unweighted mean of its real atoms'
            positions) from its positions. Energies and forces are translation
            invariant, so targets are unchanged.

    Call it on a list of samples, each either ``(index, record)`` or a record dict that
    carries :data:`keys.IDX`. No sample is ever dropped; an empty list raises
    ``ValueError``; a record without ``pos`` raises ``ValueError`` naming its index.

    Returns a dict of tensors (``B`` records, ``N`` = largest atom count rounded up to
    ``pad_multiple``, ``T`` targets):

    - ``idx`` int64 [B]
    - ``z`` int64 [B, N]: atomic numbers, 0 = padding
    - ``pos`` float32 [B, N, 3]: Å, 0 on padding (centred per molecule if ``center``)
    - ``atom_mask`` bool [B, N]: True on real atoms
    - ``y`` float32 [B] if T <= 1 else [B, T]; NaN where a record has no label
    - ``forces`` float32 [B, N, 3], 0 on padding: only if every record has ``forces``
      (a batch where only some records have forces raises ``ValueError``)
    """

    def __init__(self, pad_multiple: int = 1, center: bool = False):
        if pad_multiple < 1:
            raise ValueError(f"pad_multiple must be >= 1, got {pad_multiple}")
        self.pad_multiple = int(pad_multiple)
        self.center = bool(center)

    def __repr__(self) -> str:
        return (
            f"PointCloudCollator(pad_multiple={self.pad_multiple}, "
            f"center={self.center})"
        )

    def __call__(self, samples: Sequence[Any]) -> dict[str, torch.Tensor]:
        if len(samples) == 0:
            raise ValueError("PointCloudCollator got an empty list of samples")
        idx, records = split_samples(samples)
        bsz = len(records)
        zs = []
        for b, rec in enumerate(records):
            i = int(idx[b])
            if rec.get(K.POS) is None:
                raise ValueError(
                    f"record idx={i} has no {K.POS!r}: 3D model needs positions; "
                    "preprocess with 3D"
                )
            z = atomic_numbers(rec, i)
            pos_shape = np.shape(rec[K.POS])
            if pos_shape != (z.shape[0], 3):
                raise ValueError(
                    f"record idx={i}: {K.POS!r} has shape {pos_shape}, expected "
                    f"({z.shape[0]}, 3)"
                )
            zs.append(z)
        sizes = [z.shape[0] for z in zs]
        n_max = max(sizes)
        n_pad = max(-(-n_max // self.pad_multiple) * self.pad_multiple, 1)

        has_forces = [rec.get(K.FORCES) is not None for rec in records]
        with_forces = all(has_forces)
        if any(has_forces) and not with_forces:
            missing = [int(idx[b]) for b, h in enumerate(has_forces) if not h]
            raise ValueError(
                f"records idx={missing} have no {K.FORCES!r} but others in the batch do"
            )

        z_out = np.zeros((bsz, n_pad), dtype=np.int64)  # [B, N]
        pos_out = np.zeros((bsz, n_pad, 3), dtype=np.float32)  # [B, N, 3] Å
        mask = np.zeros((bsz, n_pad), dtype=bool)  # [B, N]
        f_out = np.zeros((bsz, n_pad, 3), dtype=np.float32) if with_forces else None
        for b, (rec, z, n) in enumerate(zip(records, zs, sizes)):
            z_out[b, :n] = z
            mask[b, :n] = True
            pos = rec[K.POS]
            if self.center and n:
                pos = np.asarray(pos, dtype=np.float64)
                pos = pos - pos.mean(axis=0, keepdims=True)
            pos_out[b, :n] = pos
            if f_out is not None:
                f = rec[K.FORCES]
                if np.shape(f) != (n, 3):
                    raise ValueError(
                        f"record idx={int(idx[b])}: {K.FORCES!r} has shape "
                        f"{np.shape(f)}, expected ({n}, 3)"
                    )
                f_out[b, :n] = f

        batch: dict[str, torch.Tensor] = {
            K.IDX: torch.from_numpy(idx),
            K.Z: torch.from_numpy(z_out),
            K.POS: torch.from_numpy(pos_out),
            K.ATOM_MASK: torch.from_numpy(mask),
            K.Y: torch.from_numpy(self._targets(records)),
        }
        if f_out is not None:
            batch[K.FORCES] = torch.from_numpy(f_out)
        return batch

    @staticmethod
    def _targets(records: list[dict]) -> np.ndarray:
        """``[B]`` (one target) or ``[B, T]``; NaN for records without ``y``."""
        ys = [r.get(K.Y) for r in records]
        lengths = {np.size(v) for v in ys if v is not None and np.size(v)}
        if len(lengths) > 1:
            raise ValueError(
                f"records in a batch have different target counts {sorted(lengths)}"
            )
        t = lengths.pop() if lengths else 1
        y = np.full((len(records), t), np.nan, dtype=np.float32)
        for b, v in enumerate(ys):
            if v is not None and np.size(v):
                y[b] = np.asarray(v).reshape(t)
        return y[:, 0].copy() if t == 1 else y
