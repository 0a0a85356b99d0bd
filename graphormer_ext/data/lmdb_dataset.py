"""Read one LMDB split written by :mod:`graphormer_ext.data.lmdb_writer`.

Records come back as stored: a graph record holds ``node_feat``, ``bond_index``,
``bond_feat`` (+ ``pos``, ``y``, ...) and gets the split's :data:`keys.PATH_SPEC` attached;
the :class:`~graphormer_ext.data.collator.Collator` derives the model arrays, or
:func:`graphormer_ext.featurize.graph.expand_record` for one record. Every record's crc32
is checked on read: a changed byte is an error naming the file and the record, never a
silently different molecule. No torch import: the preprocessing CLI reads meta records too.

The constructor reads and checks the meta and index records only (no key scan). The file
is opened read-only and lock-free (``readonly``, ``lock=False``, ``readahead=False``,
``meminit=False``) once per process and file, shared by all datasets on it, and opened
again in a new process when ``os.getpid()`` changes (a forked ``DataLoader`` worker
releases the parent's handle first). Pickling drops the handle, so spawned workers are
safe too. A dataset is not meant to be read from several threads at once.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import lmdb
import numpy as np

from graphormer_ext.data import codec
from graphormer_ext.data import keys as K
from graphormer_ext.data.codec import ChecksumError, RecordFormatError

logger = logging.getLogger(__name__)

__all__ = [
    "LMDBDataset",
    "DatasetFormatError",
    "SchemaVersionError",
    "RecordFormatError",
    "ChecksumError",
    "close_envs",
]

_PREPROCESS_HINT = (
    "create it with `graphormer-ext-preprocess <source> --out DIR ...` "
    "(see `graphormer-ext-preprocess --help`)"
)
_RESERVED_ENTRIES = 2  # META_KEY and INDEX_KEY


class DatasetFormatError(ValueError):
    """Not a usable LMDB split (not LMDB, truncated, no meta record, inconsistent)."""


class SchemaVersionError(DatasetFormatError):
    """The split was written with another :data:`keys.SCHEMA_VERSION`."""


def _open_env(path: str) -> lmdb.Environment:
    return lmdb.open(
        path, subdir=False, readonly=True, lock=False, readahead=False, meminit=False
    )


def _file_sig(path: str) -> tuple[int, int, int, int]:
    """(device, inode, size, mtime): identifies one version of one file."""
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


# One read-only environment (and one long-lived read transaction) per file and process,
# shared by every dataset on that file: py-lmdb refuses to open the same file twice in a
# process, and a forked child must not use (and cannot re-open while holding) its
# parent's environments. Keyed by (device, inode); the entry also records size and
# mtime, so a file modified or replaced since it was opened is detected instead of being
# read through a stale mapping.
_ENVS: dict[tuple[int, int], tuple[tuple, lmdb.Environment, object]] = {}
_STATE = {"pid": None, "generation": 0}


def _reset_if_forked() -> None:
    pid = os.getpid()
    if _STATE["pid"] != pid:
        # inherited from the parent: release them without touching the parent's state
        for _, env, _ in _ENVS.values():
            try:
                env.close()
            except lmdb.Error:
                pass
        _ENVS.clear()
        _STATE["pid"] = pid
        _STATE["generation"] += 1


def _evict(key: tuple[int, int]) -> None:
    entry = _ENVS.pop(key, None)
    if entry is not None:
        entry[1].close()
        _STATE["generation"] += 1


def _shared_env(path: str, sig: tuple) -> tuple[lmdb.Environment, object]:
    """The process-wide ``(env, read txn)`` of the file version ``sig``."""
    _reset_if_forked()
    key = sig[:2]
    entry = _ENVS.get(key)
    if entry is not None and entry[0] != sig:
        _evict(key)
        entry = None
    if entry is None:
        if _file_sig(path) != sig:
            raise DatasetFormatError(
                f"{path} was modified or replaced after the dataset was opened; "
                "create the dataset again"
            )
        env = _open_env(path)
        try:
            entry = (sig, env, env.begin(write=False))
        except BaseException:
            env.close()
            raise
        _ENVS[key] = entry
    return entry[1], entry[2]


def close_envs() -> None:
    """Close every LMDB environment this process opened for reading.

    Datasets re-open their file lazily on the next access.
    Needed only before modifying or deleting a split file from the same process.
    """
    for _, env, _ in _ENVS.values():
        env.close()
    _ENVS.clear()
    _STATE["generation"] += 1


def rebuild_hint(meta: dict | None, path: str) -> str:
    """The command that rebuilds the split at ``path`` (from its recorded arguments)."""
    args = (meta or {}).get("preprocess_args") or {}
    command = args.get("command") or "<source>"
    out = args.get("out") or str(Path(path).parent)
    return (
        f"rebuild it with `graphormer-ext-preprocess {command} ... --out {out} "
        "--overwrite` (the same arguments as before)"
    )


class LMDBDataset:
    """One split file: ``dataset[i]`` is the decoded record ``i`` (a map-style dataset).

    Records are dicts of read-only numpy arrays under :mod:`keys` names: stored graphs
    with :data:`keys.PATH_SPEC` attached, or point clouds.

    Args:
        path: the split file, e.g. ``<out>/train.lmdb``.
        keys: record keys to return (default: all keys of the record). ``pos`` and ``y``
            may be absent from a record; any other missing key is an error.

    Attributes:
        path: the split file.
        sizes: int64 ``[len]`` atom counts (from the index record; no record is
            decoded).
        source_index: int64 ``[len]`` position of each record in its source split.

    Raises:
        FileNotFoundError: ``path`` does not exist (the message names the preprocessing
            command).
        DatasetFormatError: not an LMDB file, truncated, no meta or index record, or
            ``num_entries`` disagrees with the file.
        SchemaVersionError: the file's schema version differs from
            :data:`keys.SCHEMA_VERSION` (the message says how to rebuild it).

    Reading a record raises :class:`ChecksumError` (a :class:`RecordFormatError`) naming
    the file and the record when its bytes changed after they were written.
    """

    def __init__(self, path: str | os.PathLike, keys: Sequence[str] | None = None):
        self.path = str(path)
        self.keys = tuple(keys) if keys is not None else None
        # a stored graph travels with its path settings (the collator needs them)
        self._selected = (
            self.keys + (K.PATH_SPEC,) if self.keys and K.NODE_FEAT in self.keys else self.keys
        )
        self._txn = None
        self._pid: int | None = None
        self._generation = -1
        p = Path(self.path)
        if not p.exists():
            raise FileNotFoundError(
                f"LMDB split {self.path} does not exist; {_PREPROCESS_HINT}"
            )
        if p.is_dir():
            raise DatasetFormatError(
                f"{self.path} is a directory; pass a split file such as "
                f"{p / 'train.lmdb'}"
            )
        self._sig = _file_sig(self.path)
        self._meta, self.sizes, self.source_index = self._read_header()
        self._len = int(self._meta["num_entries"])

    # --- construction-time checks -----------------------------------------------------
    def _read_header(self) -> tuple[dict, np.ndarray, np.ndarray]:
        try:
            env, txn = _shared_env(self.path, self._sig)
        except lmdb.Error as exc:
            raise DatasetFormatError(
                f"{self.path} is not a readable LMDB file ({exc}); re-run preprocessing"
            ) from None
        try:
            return self._check_header(env, txn)
        except lmdb.Error as exc:
            _evict(self._sig[:2])
            raise DatasetFormatError(
                f"{self.path} is a corrupt LMDB file ({exc}); re-run preprocessing"
            ) from None
        except BaseException:
            _evict(self._sig[:2])
            raise

    def _check_header(self, env, txn) -> tuple[dict, np.ndarray, np.ndarray]:
        file_size = os.path.getsize(self.path)
        info, stat = env.info(), env.stat()
        needed = (info["last_pgno"] + 1) * stat["psize"]
        if file_size < needed:
            raise DatasetFormatError(
                f"{self.path} is truncated: {file_size} bytes on disk, the LMDB needs "
                f"{needed}; "
                "re-run preprocessing (or copy the file again)"
            )
        raw_meta = txn.get(K.META_KEY)
        if raw_meta is None:
            raise DatasetFormatError(
                f"{self.path} has no {K.META_KEY.decode()} record: the write did not "
                "finish or "
                "this is not a graphormer_ext split; re-run preprocessing"
            )
        try:
            meta = codec.decode_meta(raw_meta)
        except RecordFormatError as exc:
            raise DatasetFormatError(
                f"{self.path}: {exc}; {rebuild_hint(None, self.path)}"
            ) from None
        version = meta.get("schema_version")
        if version != K.SCHEMA_VERSION:
            raise SchemaVersionError(
                f"{self.path} has LMDB schema version {version}, this code reads "
                f"version {K.SCHEMA_VERSION} (stored graphs with per-record checksums); "
                f"{rebuild_hint(meta, self.path)}"
            )
        n = meta.get("num_entries")
        if not isinstance(n, int) or n < 0:
            raise DatasetFormatError(
                f"{self.path}: invalid num_entries {n!r} in the meta record"
            )
        if stat["entries"] != n + _RESERVED_ENTRIES:
            raise DatasetFormatError(
                f"{self.path}: the meta record says {n} records but the file holds "
                f"{stat['entries'] - _RESERVED_ENTRIES}; the file is truncated or was "
                "modified, "
                "re-run preprocessing"
            )
        raw_index = txn.get(K.INDEX_KEY)
        if raw_index is None:
            raise DatasetFormatError(
                f"{self.path} has no {K.INDEX_KEY.decode()} record"
            )
        try:
            index = codec.decode(raw_index)
            sizes = np.array(index[K.SIZES], dtype=np.int64)
            source_index = np.array(index[K.SOURCE_INDEX], dtype=np.int64)
        except (RecordFormatError, KeyError) as exc:
            raise DatasetFormatError(
                f"{self.path}: corrupt index record ({exc}); {rebuild_hint(meta, self.path)}"
            ) from None
        if sizes.shape != (n,) or source_index.shape != (n,):
            raise DatasetFormatError(
                f"{self.path}: index record has {sizes.shape[0]} sizes for {n} records"
            )
        sizes.flags.writeable = False
        source_index.flags.writeable = False
        try:
            self._spec = K.path_spec(meta.get("max_hops"), meta.get("path_convention"))
        except (TypeError, ValueError) as exc:
            raise DatasetFormatError(f"{self.path}: invalid meta record ({exc})") from None
        return meta, sizes, source_index

    # --- per-process environment ------------------------------------------------------
    def _connect(self):
        """This process's read transaction (opened lazily, again after a fork)."""
        pid = os.getpid()
        if self._pid != pid or self._generation != _STATE["generation"]:
            self._txn = _shared_env(self.path, self._sig)[1]
            self._pid = pid
            self._generation = _STATE["generation"]
        return self._txn

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_txn"] = state["_pid"] = None  # never pickle an environment handle
        state["_generation"] = -1
        return state

    # --- access -----------------------------------------------------------------------
    @property
    def meta(self) -> dict:
        """The split's meta record (a copy is not made: do not modify)."""
        return self._meta

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        i = int(index)
        if not 0 <= i < self._len:
            raise IndexError(
                f"index {index} out of range for {self.path} ({self._len} records)"
            )
        try:
            buf = self._connect().get(K.record_key(i))
        except lmdb.Error as exc:  # a corrupt page; the shared txn is unusable now
            _evict(self._sig[:2])
            raise DatasetFormatError(
                f"{self.path}: record {i} cannot be read ({type(exc).__name__}: "
                f"{exc}); the file is corrupt, re-run preprocessing"
            ) from None
        if buf is None:
            raise DatasetFormatError(
                f"{self.path}: record {i} is missing (meta says {self._len} records); "
                f"{rebuild_hint(self._meta, self.path)}"
            )
        try:
            rec = codec.decode(buf)
        except RecordFormatError as exc:
            kind = "is corrupt" if isinstance(exc, ChecksumError) else "does not decode"
            raise type(exc)(
                f"{self.path}: record {i} (source index {int(self.source_index[i])}) "
                f"{kind}: {exc}; the file changed after it was written: "
                f"{rebuild_hint(self._meta, self.path)}, or restore a good copy"
            ) from None
        if K.NODE_FEAT in rec:
            rec[K.PATH_SPEC] = self._spec
        if self.keys is not None:
            try:
                rec = {
                    k: rec[k]
                    for k in self._selected
                    if k in rec or k not in K.OPTIONAL_KEYS + (K.PATH_SPEC,)
                }
            except KeyError as exc:
                raise DatasetFormatError(
                    f"{self.path}: record {i} has no key {exc}"
                ) from None
        return rec

    def __repr__(self) -> str:
        return f"LMDBDataset({self.path!r}, n={self._len})"
