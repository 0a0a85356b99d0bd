"""The interface between dataset readers and the featurize/LMDB pipeline."""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

KINDS = ("smiles", "molblock", "xyz")
# Point clouds (e.g. MD17 frames) skip RDKit: ``SourceRecord.arrays`` holds z/pos/forces.
ARRAYS_KIND = "arrays"
# A split name becomes a file name (``<out>/<split>.lmdb``): a letter or digit, then letters, digits,
# ``_``, ``-`` or ``.``; no path separator, no leading dot, so it can never leave the output folder.
SPLIT_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class MoleculeError(ValueError):
    """A single molecule cannot be used. The writer counts it as a skip and lists it with the reason.

    Args:
        item: where the molecule comes from, e.g. ``"data.csv.gz row 17 (valid #3)"``.
        reason: what is wrong and, where there is one, the fix.
    """

    def __init__(self, item: str, reason: str):
        super().__init__(f"{item}: {reason}")
        self.item = item
        self.reason = reason


class SourceError(ValueError):
    """A dataset as a whole is unusable (missing file, misaligned SDF, bad split): the run stops."""


def check_split_name(name: str, where: str) -> str:
    """Return ``name`` if it is a safe split (file) name, else raise.

    Args:
        name: a split name read from the data (a CSV column, an SDF property).
        where: the item the name comes from, e.g. ``"data.csv line 7 column 'fold'"``.

    Raises:
        SourceError: ``name`` does not match :data:`SPLIT_NAME_PATTERN` (it could name a
            path outside the output folder, or a hidden file).
    """
    if not SPLIT_NAME_PATTERN.fullmatch(name):
        raise SourceError(
            f"{where}: split name {name!r} is not allowed (it becomes the file name "
            "<out>/<split>.lmdb); use 1-64 letters, digits, '_', '-' or '.', starting "
            "with a letter or digit, e.g. train/valid/test"
        )
    return name


@dataclass(frozen=True)
class SourceRecord:
    """One raw molecule as read from disk, before featurization (picklable, sent to worker processes).

    Attributes:
        split: split name (``train``, ``valid``, ...).
        index: position within the split, 0-based; becomes the LMDB key.
        item: human-readable origin used in error messages and the skip list.
        kind: one of ``smiles``, ``molblock`` (an SDF/MOL record, 3D kept) or ``xyz``.
        text: the SMILES string, MOL block or XYZ block.
        y: float32 targets ``[T]``; NaN marks a hidden label.
        use_3d: keep the coordinates of a molblock/xyz as ``pos``.
        check_smiles: if set, the parsed molecule's heavy-atom formula must equal this SMILES' formula
            (catches a misaligned SDF); a mismatch is a :class:`SourceError`.
        charge: total charge for bond perception from XYZ.
        template_smiles: bond-order template for XYZ perception fallback.
        arrays: for ``kind="arrays"`` (:data:`ARRAYS_KIND`) only: the point-cloud arrays
            ``{"z": [N] atomic numbers, "pos": [N, 3] Å, "forces": [N, 3] (optional)}``
            under :mod:`graphormer_ext.data.keys` names; ``text`` is then unused (``""``).
        source_row: where the molecule is in its input file, as ``item`` names it (CSV: the
            1-based file line, header = line 1; SDF: the 1-based record number). When set, the
            record stores its provenance (:data:`keys.SOURCE_ROW`, :data:`keys.SMILES`, and
            :data:`keys.SOURCE_ID` if ``source_id`` is set).
        source_id: the user's identifier of the molecule (an ID column, an SDF title).
        smiles: the SMILES to store as provenance; ``None`` stores RDKit's canonical SMILES
            of the parsed molecule.
    """

    split: str
    index: int
    item: str
    kind: str
    text: str
    y: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    use_3d: bool = False
    check_smiles: str | None = None
    charge: int = 0
    template_smiles: str | None = None
    arrays: dict | None = None
    source_row: int | None = None
    source_id: str | None = None
    smiles: str | None = None


class Source:
    """Base class of dataset readers.

    Subclasses set :attr:`name` and implement :meth:`splits`, :meth:`iter_split` and :meth:`files`.
    """

    name = "source"

    def splits(self) -> dict[str, int]:
        """Split name -> number of records."""
        raise NotImplementedError

    def iter_split(self, split: str) -> Iterator[SourceRecord]:
        """Yield the split's records in index order."""
        raise NotImplementedError

    def files(self) -> list[Path]:
        """Input files whose checksum goes into the LMDB meta record."""
        raise NotImplementedError

    def describe(self) -> dict:
        """JSON-able facts for the meta record (target names and units, dataset version)."""
        return {"source": self.name}

    def split_rows(self, split: str) -> list[int] | None:
        """Input rows of a split, in split order (``SourceRecord.source_row``), or ``None``.

        Stored in the split's meta record, so the assignment of every input row (written
        or skipped) to a split can be read back. Sources whose records carry no
        ``source_row`` return ``None``.
        """
        return None

    def checksum(self) -> str:
        """sha256 over the input files, in order (name and content)."""
        h = hashlib.sha256()
        for p in self.files():
            h.update(Path(p).name.encode())
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        return h.hexdigest()
