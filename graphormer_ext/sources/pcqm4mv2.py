"""PCQM4Mv2 in its official on-disk layout (OGB-LSC), with the optional 3D train SDF.

Layout (``root`` is what ``ogb.lsc.PCQM4Mv2Dataset(root)`` takes)::

    root/pcqm4m-v2/raw/data.csv.gz     idx,smiles,homolumogap (eV; NaN for test rows)
    root/pcqm4m-v2/split_dict.pt       split name -> index tensor
    root/pcqm4m-v2/RELEASE_v1.txt      release marker (without it ogb asks on stdin)
    root/pcqm4m-v2-train.sdf[.tar.gz]  optional DFT geometries: SDF record i = row i

Train molecules read from the SDF take both the graph and the positions from the SDF
molecule (its atom order may differ from the SMILES), as Transformer-M does. Every SDF
record is checked against its CSV SMILES by heavy-atom formula in
:func:`~graphormer_ext.featurize.pipeline.featurize_record`. All other splits are 2D,
from SMILES.
"""
from __future__ import annotations

import codecs
import collections
import csv
import gzip
import logging
import math
import pickle
import zipfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from graphormer_ext.sources.base import Source, SourceError, SourceRecord

logger = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test-dev", "test-challenge")
DOWNLOAD_URL = (
    "https://dgl-data.s3-accelerate.amazonaws.com/dataset/OGB-LSC/pcqm4m-v2.zip"
)
SDF_URL = "http://ogb-data.stanford.edu/data/lsc/pcqm4m-v2-train.sdf.tar.gz"
SDF_NAMES = (
    "pcqm4m-v2-train.sdf",
    "pcqm4m-v2-train.sdf.tar.gz",
    "pcqm4m-v2-train.sdf.gz",
)
TARGET = "homolumogap"
UNIT = "eV"


# torch storage class name -> numpy dtype (the integer and bool storages a split dict uses)
_STORAGE_DTYPES = {
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _TorchZipUnpickler(pickle.Unpickler):
    """Reads the ``data.pkl`` of a ``torch.save`` zip file without torch, allowing only
    integer tensors, dicts/lists and numpy arrays: anything else is an ``UnpicklingError``
    (nothing is executed)."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, byteorder: str):
        super().__init__(file)
        self._archive = archive
        self._prefix = prefix
        self._byteorder = "<" if byteorder == "little" else ">"

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return np.dtype(_STORAGE_DTYPES[name])
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "_reconstruct":
            return _numpy_reconstruct()
        if (module, name) in (("numpy", "ndarray"), ("numpy", "dtype")):
            return getattr(np, name)
        if (module, name) == ("_codecs", "encode"):  # array bytes in protocol-2 pickles
            return codecs.encode
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a split dict")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, dtype, key, _, numel = pid
        if not isinstance(dtype, np.dtype):
            raise pickle.UnpicklingError(f"unexpected storage type {dtype!r}")
        raw = self._archive.read(f"{self._prefix}/data/{key}")
        arr = np.frombuffer(raw, dtype=dtype.newbyteorder(self._byteorder))
        if arr.size < int(numel):
            raise pickle.UnpicklingError(f"storage {key}: {arr.size} of {numel} elements")
        return arr[: int(numel)]


def _numpy_reconstruct():
    """numpy's array unpickling helper (what ``np.ndarray.__reduce__`` names)."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _rebuild_tensor(storage, offset, size, stride, *_):
    """``torch._utils._rebuild_tensor_v2`` as a numpy array (a copy)."""
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[int(offset):], shape=tuple(size), strides=tuple(int(s) * item for s in stride)
    )
    return np.array(view, dtype=storage.dtype.newbyteorder("="))


def _read_torch_zip(path: Path):
    """The object saved by ``torch.save`` in ``path`` (zip format), read without torch."""
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl")]
        if len(pkl) != 1:
            raise pickle.UnpicklingError("not a torch zip file (no single data.pkl)")
        prefix = pkl[0][: -len("/data.pkl")]
        byteorder = "little"
        if f"{prefix}/byteorder" in names:
            byteorder = archive.read(f"{prefix}/byteorder").decode().strip()
        with archive.open(pkl[0]) as f:
            return _TorchZipUnpickler(f, archive, prefix, byteorder).load()


def _torch_load(path: Path):
    """``torch.load`` (weights only, numpy arrays allow-listed): for files the torch-free
    reader does not understand."""
    import torch

    allowed = [np.ndarray, np.dtype, _numpy_reconstruct()]
    int_types = (np.int64, np.int32, np.int16, np.uint8, np.bool_)
    allowed += [type(np.dtype(t)) for t in int_types]
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True)


def load_split_dict(path: Path) -> dict[str, np.ndarray]:
    """Read ``split_dict.pt`` without executing code, and without importing torch when it
    is a plain ``torch.save`` zip of integer tensors (the OGB file): preprocessing starts
    in well under a second. Other layouts fall back to ``torch.load(weights_only=True)``.

    Values may be tensors, numpy arrays (allow-listed for the safe unpickler) or lists.

    Args:
        path: the ``split_dict.pt`` file.

    Returns:
        split name -> int64 indices ``[n]``.

    Raises:
        SourceError: an unreadable file, or not a dict of 1-D integer indices.
    """
    try:
        try:
            raw = _read_torch_zip(Path(path))
        except (pickle.UnpicklingError, zipfile.BadZipFile, KeyError) as exc:
            logger.debug("%s: reading with torch (%s)", path, exc)
            raw = _torch_load(path)
    except Exception as e:
        raise SourceError(
            f"{path}: cannot read the split dict ({type(e).__name__}: {e})"
        ) from e
    if not isinstance(raw, dict):
        raise SourceError(
            f"{path}: expected a dict of split name -> indices, got "
            f"{type(raw).__name__}"
        )
    out = {}
    for name, value in raw.items():
        arr = value.numpy() if hasattr(value, "numpy") else np.asarray(value)
        if arr.ndim != 1 or not (arr.size == 0 or np.issubdtype(arr.dtype, np.integer)):
            raise SourceError(
                f"{path}: split {name!r} must be 1-D integer indices, got dtype "
                f"{arr.dtype} shape {arr.shape}"
            )
        out[str(name)] = arr.astype(np.int64)
    return out


def _read_csv(path: Path) -> tuple[list[str], np.ndarray]:
    """``data.csv.gz`` -> (SMILES per row, gap [eV] per row); checks ``idx == row``."""
    smiles: list[str] = []
    gaps: list[float] = []
    need = ("idx", "smiles", TARGET)
    try:
        with gzip.open(path, "rt", newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None or any(c not in header for c in need):
                raise SourceError(
                    f"{path}: expected columns {list(need)}, found {header}; is this "
                    "the official pcqm4m-v2 data.csv.gz?"
                )
            c_idx, c_smi, c_gap = (header.index(c) for c in need)
            for row_no, row in enumerate(reader):
                if int(row[c_idx]) != row_no:
                    raise SourceError(
                        f"{path}: row {row_no} has idx {row[c_idx]}; the rows must be "
                        "in idx order 0..n-1"
                    )
                smiles.append(row[c_smi])
                value = row[c_gap].strip()
                gaps.append(float(value) if value else math.nan)
    except SourceError:
        raise
    except (OSError, EOFError, ValueError, IndexError, csv.Error) as e:
        raise SourceError(
            f"{path}: cannot read the CSV ({type(e).__name__}: {e})"
        ) from e
    return smiles, np.asarray(gaps, dtype=np.float32)


class PCQM4Mv2Source(Source):
    """Reader of the official PCQM4Mv2 files (OGB-LSC); target: HOMO-LUMO gap in eV.

    Args:
        root: the folder holding ``pcqm4m-v2/`` (the ``root`` of
            ``ogb.lsc.PCQM4Mv2Dataset``); the ``pcqm4m-v2`` folder itself works too.
        sdf_path: the train SDF (``.sdf``, ``.sdf.gz`` or the official ``.sdf.tar.gz``).
            ``None`` looks for :data:`SDF_NAMES` in ``root``; without one, train is 2D.
        splits: the splits to read, from :data:`SPLITS`.
        use_sdf: ``False`` ignores any train SDF and reads train from SMILES (2D).
        limit: read at most this many records per split (smoke runs). Only with a
            limit may the SDF be longer than the train split, or shorter (as long as it
            covers the limit).

    Raises:
        SourceError: a missing file (named, with the fix), a bad CSV, split indices
            that are out of range, duplicated or in two splits, or (with an SDF) a
            train split that is not rows ``0..n-1``.
    """

    name = "pcqm4m-v2"

    def __init__(
        self,
        root,
        sdf_path=None,
        splits: Sequence[str] = SPLITS,
        *,
        use_sdf: bool = True,
        limit: int | None = None,
    ):
        root = Path(root)
        if root.name == "pcqm4m-v2" and not (root / "pcqm4m-v2").is_dir():
            root = root.parent
        self.root = root
        self.folder = root / "pcqm4m-v2"
        self.csv_path = self.folder / "raw" / "data.csv.gz"
        self.split_path = self.folder / "split_dict.pt"
        self.release_path = self.folder / "RELEASE_v1.txt"
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        self.limit = limit
        self._check_files()

        all_splits = load_split_dict(self.split_path)
        self.split_names = tuple(splits)
        unknown = [s for s in self.split_names if s not in all_splits]
        if unknown:
            raise SourceError(
                f"{self.split_path}: no split {unknown}; it has {sorted(all_splits)}"
            )
        self.smiles, self.gap = _read_csv(self.csv_path)
        self._check_splits(all_splits)
        self.indices = {s: all_splits[s] for s in self.split_names}

        self.sdf_path = self._find_sdf(sdf_path) if use_sdf else None
        if self.sdf_path is not None and "train" in self.indices:
            train = self.indices["train"]
            if not np.array_equal(train, np.arange(len(train))):
                raise SourceError(
                    f"{self.split_path}: the train split is not rows "
                    f"0..{len(train) - 1} in order, so SDF record i cannot be matched "
                    "to train row i; pass use_sdf=False to read train as 2D"
                )
        logger.info(
            "pcqm4m-v2 at %s: %d CSV rows, splits %s, train %s",
            self.folder,
            len(self.smiles),
            self.splits(),
            f"3D from {self.sdf_path}" if self.sdf_path else "2D (no SDF)",
        )

    def _check_files(self) -> None:
        if not self.csv_path.is_file():
            raise SourceError(
                f"{self.csv_path} not found: download and unzip {DOWNLOAD_URL} into "
                f"{self.root}"
            )
        if not self.split_path.is_file():
            raise SourceError(
                f"{self.split_path} not found: it ships in {DOWNLOAD_URL}; unzip it "
                f"into {self.root}"
            )
        if not self.release_path.is_file():
            raise SourceError(
                f"{self.release_path} not found: it ships in the official zip "
                f"({DOWNLOAD_URL}); without it ogb's PCQM4Mv2Dataset asks on stdin and "
                "fails in batch jobs. Re-extract the zip, or create the file if you "
                "assembled this folder yourself"
            )

    def _check_splits(self, all_splits: dict[str, np.ndarray]) -> None:
        n = len(self.smiles)
        owner = np.full(n, -1, dtype=np.int64)  # split number holding each row
        names = list(all_splits)
        for k, name in enumerate(names):
            idx = all_splits[name]
            out_of_range = (idx < 0) | (idx >= n)
            if out_of_range.any():
                raise SourceError(
                    f"{self.split_path}: split {name!r} has index "
                    f"{idx[out_of_range][0]}, outside the {n} rows of "
                    f"{self.csv_path.name}"
                )
            uniq, counts = np.unique(idx, return_counts=True)
            if (counts > 1).any():
                raise SourceError(
                    f"{self.split_path}: split {name!r} lists index "
                    f"{uniq[counts > 1][0]} more than once"
                )
            clash = idx[owner[idx] >= 0]
            if clash.size:
                other = names[owner[clash[0]]]
                raise SourceError(
                    f"{self.split_path}: index {clash[0]} is in both {other!r} and "
                    f"{name!r}"
                )
            owner[idx] = k

    def _find_sdf(self, sdf_path) -> Path | None:
        if sdf_path is not None:
            path = Path(sdf_path)
            if not path.is_file():
                raise SourceError(f"train SDF not found: {path} (download {SDF_URL})")
            return path
        for name in SDF_NAMES:
            for folder in (self.root, self.folder):
                if (folder / name).is_file():
                    return folder / name
        return None

    def _count(self, split: str) -> int:
        n = len(self.indices[split])
        return n if self.limit is None else min(n, self.limit)

    def splits(self) -> dict[str, int]:
        """Split name -> number of records (after ``limit``)."""
        return {s: self._count(s) for s in self.split_names}

    def iter_split(self, split: str) -> Iterator[SourceRecord]:
        """Yield the split's records in split order.

        Train records come from the SDF when there is one (``kind="molblock"``,
        ``use_3d=True``, ``check_smiles`` = the CSV SMILES); all others are
        ``kind="smiles"``. ``y`` is ``[gap]`` in eV, NaN for hidden test labels.

        Raises:
            SourceError: an unknown split, or an SDF shorter or longer than the train
                split (raised when the stream reaches the mismatch).
        """
        if split not in self.indices:
            raise SourceError(
                f"split {split!r} not loaded; loaded: {list(self.indices)}"
            )
        idx = self.indices[split][: self._count(split)]
        if split == "train" and self.sdf_path is not None:
            yield from self._iter_train_sdf(idx)
            return
        for k, row in enumerate(idx.tolist()):
            yield SourceRecord(
                split=split,
                index=k,
                item=f"pcqm4m-v2 idx {row} ({split} #{k})",
                kind="smiles",
                text=self.smiles[row],
                y=self.gap[row : row + 1].copy(),
            )

    def _iter_train_sdf(self, idx: np.ndarray) -> Iterator[SourceRecord]:
        from graphormer_ext.featurize.molecules import iter_sdf

        n_train = len(self.indices["train"])
        blocks = iter_sdf(self.sdf_path)
        for k, row in enumerate(idx.tolist()):
            block = next(blocks, None)
            if block is None:
                raise SourceError(
                    f"{self.sdf_path}: only {k} records, but the train split has "
                    f"{n_train} rows; use the complete {SDF_NAMES[1]}, or pass "
                    f"limit={k} or use_sdf=False"
                )
            yield SourceRecord(
                split="train",
                index=k,
                item=f"pcqm4m-v2 idx {row} (train #{k}, SDF record {k})",
                kind="molblock",
                text=block,
                y=self.gap[row : row + 1].copy(),
                use_3d=True,
                check_smiles=self.smiles[row],
            )
        if self.limit is None and next(blocks, None) is not None:
            raise SourceError(
                f"{self.sdf_path}: more records than the {n_train} train rows, so it "
                "is not the train SDF of this data.csv.gz (pass limit=... to read a "
                "prefix on purpose)"
            )
        blocks.close()

    def files(self) -> list[Path]:
        """The CSV, the split dict, the release marker and (if used) the train SDF."""
        out = [self.csv_path, self.split_path, self.release_path]
        if self.sdf_path is not None and "train" in self.indices:
            out.append(self.sdf_path)
        return out

    def describe(self) -> dict:
        """Dataset version, target name and unit, and the origin of train's 3D."""
        return {
            "source": self.name,
            "dataset_version": f"pcqm4m-v2 ({self.release_path.name})",
            "targets": [TARGET],
            "units": [UNIT],
            "train_3d": self.sdf_path is not None and "train" in self.indices,
            "train_sdf": self.sdf_path.name if self.sdf_path is not None else None,
            "limit": self.limit,
            "splits": self.splits(),
        }
