"""The interface between dataset readers and the featurize/LMDB pipeline."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

KINDS = ("smiles", "molblock", "xyz")
# Point clouds (e.g. MD17 frames) skip RDKit: ``SourceRecord.arrays`` holds z/pos/forces.
ARRAYS_KIND = "arrays"


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

    def checksum(self) -> str:
        """sha256 over the input files, in order (name and content)."""
        h = hashlib.sha256()
        for p in self.files():
            h.update(Path(p).name.encode())
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        return h.hexdigest()
