"""Which input row each record came from, and which split every input row went to.

User datasets (the CSV and SDF sources) store, with each record, the input SMILES, the
file line or SDF record number and, when given, the user's ID
(:data:`keys.PROVENANCE_KEYS`). Each split's meta record lists every input row assigned
to the split, written or skipped (``meta["source_rows"]``). The command
``graphormer-ext-preprocess export DIR`` writes both as one CSV; this module is its
library side.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np

from graphormer_ext.data import keys as K

__all__ = ["encode_text", "decode_text", "record_provenance", "iter_provenance"]


def encode_text(text: str) -> np.ndarray:
    """A string as a uint8 array of its UTF-8 bytes (the codec stores arrays only).

    Returns:
        uint8 ``[L]``.
    """
    return np.frombuffer(str(text).encode("utf-8"), dtype=np.uint8).copy()


def decode_text(array: np.ndarray) -> str:
    """The string stored by :func:`encode_text`.

    Raises:
        ValueError: the array is not uint8 or its bytes are not UTF-8.
    """
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"a text array is uint8, got {array.dtype}")
    return array.tobytes().decode("utf-8")


def record_provenance(record: dict) -> dict:
    """The provenance of one decoded record.

    Args:
        record: ``LMDBDataset(path)[i]``.

    Returns:
        ``{"smiles": str | None, "source_id": str | None, "source_row": int | None}``;
        ``None`` where the record does not store the key (datasets written by other
        sources, or before provenance was stored).
    """
    smiles = record.get(K.SMILES)
    source_id = record.get(K.SOURCE_ID)
    row = record.get(K.SOURCE_ROW)
    return {
        "smiles": decode_text(smiles) if smiles is not None else None,
        "source_id": decode_text(source_id) if source_id is not None else None,
        "source_row": int(np.asarray(row).reshape(-1)[0]) if row is not None else None,
    }


def iter_provenance(path: str | os.PathLike) -> Iterator[dict]:
    """Every input row assigned to one split file, in split order, written or skipped.

    Args:
        path: a split file ``<out>/<split>.lmdb``.

    Yields:
        ``{"split", "source_row", "status", "index", "smiles", "source_id", "reason"}``:
        ``status`` is ``"written"`` (``index`` = the record's key) or ``"skipped"``
        (``reason`` from ``<split>.skipped.tsv``; ``index``, ``smiles`` and
        ``source_id`` are ``None``). Splits without ``meta["source_rows"]`` yield their
        records only.
    """
    from graphormer_ext.data.lmdb_dataset import LMDBDataset
    from graphormer_ext.data.lmdb_writer import skip_list_path

    ds = LMDBDataset(path)
    split = ds.meta.get("split") or Path(path).stem
    written = {int(pos): i for i, pos in enumerate(ds.source_index.tolist())}
    rows = ds.meta.get("source_rows")
    positions = range(len(rows)) if rows is not None else sorted(written)
    reasons = iter(_skip_reasons(skip_list_path(path)))
    for pos in positions:
        i = written.get(pos)
        if i is None:
            # the skip list holds the skipped rows in split order, like source_rows
            yield {"split": split, "source_row": rows[pos], "status": "skipped",
                   "index": None, "smiles": None, "source_id": None,
                   "reason": next(reasons, None)}  # fmt: skip
            continue
        prov = record_provenance(ds[i])
        row = prov["source_row"]
        if row is None and rows is not None:
            row = rows[pos]
        yield {"split": split, "source_row": row, "status": "written", "index": i,
               "smiles": prov["smiles"], "source_id": prov["source_id"],
               "reason": None}  # fmt: skip


def _skip_reasons(path: Path) -> list[str]:
    """The reason column of a skip list (empty if there is none)."""
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()[1:]
    return [line.split("\t", 1)[1] if "\t" in line else "" for line in lines]
