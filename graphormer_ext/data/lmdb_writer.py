"""Write one split to one LMDB file: parallel featurization, chunked commits, meta last.

Layout of a split file (``subdir=False``; schema :data:`keys.SCHEMA_VERSION`):

- :func:`keys.record_key` ``(0) .. (n-1)``: zero-padded ASCII decimal keys, contiguous over
  the *kept* molecules and appended in order (full LMDB pages), each a record encoded with
  :func:`graphormer_ext.data.codec.encode` (``dict[str, np.ndarray]`` under :mod:`keys` names,
  with a crc32): the stored graph (``node_feat``, ``bond_index``, ``bond_feat``, ``pos``,
  ``y``, ...) or a point cloud (``z``, ``pos``, ...);
- :data:`keys.INDEX_KEY`: a codec record with :data:`keys.SIZES` (atom counts) and
  :data:`keys.SOURCE_INDEX` (position of each kept record in the source split), both
  int64 ``[n]``;
- :data:`keys.META_KEY` (written last): JSON with ``schema_version``, ``num_entries``,
  the featurization settings, counts, source name/checksum/description and statistics.

The file is built under ``<path>.tmp-<pid>`` and renamed to ``<path>`` only on success,
so a crash never leaves a half-written file at the final name. Molecules that cannot be
used (:class:`MoleculeError`) are counted and listed, with the reason, in
``<split>.skipped.tsv`` beside the LMDB; a :class:`SourceError` aborts the run.

Writers exclude each other: :func:`output_lock` holds an exclusive ``flock`` on
``<dir>/.graphormer-ext.lock`` while a split (or, from ``graphormer-ext-preprocess``, a
whole run) is written, so a second writer on the same folder fails at once with
:class:`OutputBusyError`. Under the lock, temporary files left by a killed writer are
removed (and logged), and the final rename refuses to replace a file that appeared
during the write unless ``overwrite`` is set.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import functools
import gc
import itertools
import logging
import math
import multiprocessing
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import lmdb
import numpy as np

from graphormer_ext.data import codec
from graphormer_ext.data import keys as K
from graphormer_ext.sources.base import MoleculeError, Source, SourceError, SourceRecord

logger = logging.getLogger(__name__)

__all__ = [
    "write_split",
    "skip_list_path",
    "output_lock",
    "WriteError",
    "OutputBusyError",
    "LOCK_NAME",
]

_INITIAL_MAP_SIZE = 1 << 30  # grows by doubling on MapFullError
_OK, _SKIP, _FATAL, _ERROR = 0, 1, 2, 3
LOCK_NAME = ".graphormer-ext.lock"
# temporary files of _SplitWriter: <split>.lmdb.tmp-<pid>, <split>.skipped.tsv.tmp-<pid>
_TEMP_NAME = re.compile(r".+\.(?:lmdb|skipped\.tsv)\.tmp-(\d+)")


class WriteError(RuntimeError):
    """An unexpected failure while featurizing or writing (a bug, not a bad input)."""


class OutputBusyError(RuntimeError):
    """Another process is writing to the same output folder."""


# folder -> [open lock file, depth, pid]: the lock is re-entrant within a process (a
# preprocess run holds it for all splits; write_split takes it again for each split)
_HELD_LOCKS: dict[str, list] = {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _remove_stale_temp_files(directory: Path) -> None:
    """Delete temporary files of other writers (called with the folder lock held)."""
    for p in sorted(directory.iterdir()):
        m = _TEMP_NAME.fullmatch(p.name)
        if m is None or int(m.group(1)) == os.getpid() or not p.is_file():
            continue
        pid = int(m.group(1))
        state = "still running, but not holding the lock" if _pid_alive(pid) else "gone"
        logger.warning(
            "removing %s: a temporary file left by an interrupted writer (pid %d, %s)",
            p,
            pid,
            state,
        )
        p.unlink()


@contextlib.contextmanager
def output_lock(directory: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive lock on an output folder (created if missing).

    The lock is an ``fcntl.flock`` on ``<directory>/.graphormer-ext.lock`` (released by
    the kernel if the process dies; the file is removed on release), re-entrant within a
    process. Once it is held, temporary files of interrupted writers in the folder are
    removed, with a warning.

    Args:
        directory: the output folder.

    Yields:
        The folder.

    Raises:
        OutputBusyError: another process holds the lock (the message names its pid).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key = str(directory.resolve())
    held = _HELD_LOCKS.get(key)
    if held is not None and held[2] == os.getpid():
        held[1] += 1
        try:
            yield directory
        finally:
            held[1] -= 1
        return
    lock_path = directory / LOCK_NAME
    f = _acquire(lock_path, directory)
    try:
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        _HELD_LOCKS[key] = [f, 1, os.getpid()]
        try:
            _remove_stale_temp_files(directory)
            yield directory
        finally:
            del _HELD_LOCKS[key]
            lock_path.unlink()  # still locked: _acquire re-checks the file it locked
    finally:
        f.close()  # releases the flock


def _acquire(lock_path: Path, directory: Path):
    """Open and ``flock`` the lock file; retry if it was replaced meanwhile."""
    import fcntl

    for _ in range(100):
        f = open(lock_path, "a+", encoding="utf-8")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            owner = f.read().strip() or "unknown"
            f.close()
            raise OutputBusyError(
                f"{directory} is being written by another process (pid {owner}); wait "
                "for it to finish, or choose another output folder"
            ) from None
        except BaseException:
            f.close()
            raise
        # the holder unlinks the file before releasing it: a lock on an unlinked file
        # excludes nobody, so lock the file now at that path instead
        try:
            same = os.stat(lock_path).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return f
        f.close()
    raise OutputBusyError(f"{directory}: could not take the lock {lock_path}")


def _holding_output_lock(fn: Callable) -> Callable:
    """Run ``fn(path, ...)`` holding :func:`output_lock` on ``path``'s folder."""

    @functools.wraps(fn)
    def wrapper(path, *args, **kwargs):
        with output_lock(Path(path).parent):
            return fn(path, *args, **kwargs)

    return wrapper


def skip_list_path(path: str | os.PathLike) -> Path:
    """Path of the skip list beside an LMDB split: ``<dir>/<split>.skipped.tsv``."""
    p = Path(path)
    stem = p.name[: -len(".lmdb")] if p.name.endswith(".lmdb") else p.name
    return p.with_name(stem + ".skipped.tsv")


# --- worker side ----------------------------------------------------------------------
_WORKER_CFG: dict[str, Any] = {}


def _init_worker(featurize: Callable | None, kwargs: dict) -> None:
    _WORKER_CFG["featurize"] = featurize
    _WORKER_CFG["kwargs"] = kwargs


def _default_featurize() -> Callable:
    # imported in the workers only: RDKit is needed only where molecules are parsed
    from graphormer_ext.featurize.pipeline import featurize_stored

    return featurize_stored


def _to_stored(rec: dict, kwargs: dict) -> dict:
    """The record to encode: a stored graph without ``path_spec`` (a meta fact), or a point
    cloud as it is. A model record is turned into its stored graph, checked exactly."""
    if K.NODE_FEAT in rec:
        spec = rec.get(K.PATH_SPEC)
        want = K.path_spec(kwargs["max_hops"], kwargs["path_convention"])
        if spec is not None and not np.array_equal(spec, want):
            raise ValueError(
                f"featurized with path settings {list(spec)} but the split uses "
                f"{list(want)} (max_hops, legacy)"
            )
        return {k: v for k, v in rec.items() if k != K.PATH_SPEC}
    if K.X in rec:
        from graphormer_ext.featurize.graph import model_to_stored

        stored = model_to_stored(
            rec, max_hops=kwargs["max_hops"], path_convention=kwargs["path_convention"]
        )
        return {k: v for k, v in stored.items() if k != K.PATH_SPEC}
    return rec


def _process_one(item: Any, featurize: Callable | None, kwargs: dict) -> tuple:
    """Featurize (for a :class:`SourceRecord`) and encode one item.

    Returns ``(_OK, bytes, n_atoms, has_pos, y)`` or ``(_SKIP | _FATAL | _ERROR, item,
    reason)``.
    """
    name = item.item if isinstance(item, SourceRecord) else "record"
    try:
        if isinstance(item, SourceRecord):
            if featurize is None:
                featurize = _default_featurize()
                _WORKER_CFG["featurize"] = featurize
            rec = featurize(item, **kwargs)
        elif isinstance(item, dict):
            rec = item
        else:
            raise TypeError(
                f"expected a SourceRecord or a record dict, got {type(item).__name__}"
            )
        # point-cloud records (z + pos, e.g. MD17) have no graph keys
        point_cloud = K.Z in rec and K.X not in rec and K.NODE_FEAT not in rec
        if point_cloud:
            required = K.POINT_CLOUD_KEYS
        else:
            required = K.GRAPH_KEYS if K.NODE_FEAT in rec else K.MODEL_KEYS
        missing = [k for k in required if k not in rec]
        if missing:
            raise KeyError(f"featurized record lacks required keys {missing}")
        rec = _to_stored(rec, kwargs)
        buf = codec.encode(rec)
        y = rec.get(K.Y)
        y = (
            np.asarray(y, dtype=np.float64).reshape(-1)
            if y is not None
            else np.zeros(0)
        )
        if point_cloud:
            return (_OK, buf, int(rec[K.Z].shape[0]), True, y)
        return (_OK, buf, int(rec[K.NODE_FEAT].shape[0]), K.POS in rec, y)
    except MoleculeError as exc:
        return (_SKIP, exc.item, exc.reason)
    except SourceError as exc:
        return (_FATAL, name, str(exc))
    except Exception as exc:  # noqa: BLE001 - reported with the item; the run stops
        return (_ERROR, name, f"{type(exc).__name__}: {exc}")


def _work_chunk(chunk: list) -> list[tuple]:
    featurize = _WORKER_CFG.get("featurize")
    kwargs = _WORKER_CFG.get("kwargs", {})
    return [_process_one(it, featurize, kwargs) for it in chunk]


# --- statistics -----------------------------------------------------------------------
class _Stats:
    """Running statistics of kept records (float64 sums; std with ddof=1 like torch)."""

    def __init__(self) -> None:
        self.atoms_sum = 0
        self.atoms_max = 0
        self.with_pos = 0
        self.y_sum: np.ndarray | None = None
        self.y_sq = None
        self.y_n = None
        self.num_targets: int | None = None

    def add(self, n_atoms: int, has_pos: bool, y: np.ndarray) -> None:
        self.atoms_sum += n_atoms
        self.atoms_max = max(self.atoms_max, n_atoms)
        self.with_pos += bool(has_pos)
        if self.y_sum is None:
            self.num_targets = y.size
            self.y_sum = np.zeros(y.size)
            self.y_sq = np.zeros(y.size)
            self.y_n = np.zeros(y.size, dtype=np.int64)
        if y.size != self.num_targets:
            raise SourceError(
                "records have different numbers of targets "
                f"({self.num_targets} and {y.size})"
            )
        finite = np.isfinite(y)
        v = np.where(finite, y, 0.0)
        self.y_sum += v
        self.y_sq += v * v
        self.y_n += finite

    def to_meta(self, kept: int) -> dict:
        out: dict[str, Any] = {
            "num_atoms_mean": (self.atoms_sum / kept) if kept else None,
            "num_atoms_max": self.atoms_max,
            "with_pos": self.with_pos,
            "num_targets": self.num_targets or 0,
        }
        if self.y_sum is not None and self.num_targets:
            n = self.y_n.astype(np.float64)
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = self.y_sum / n
                var = (self.y_sq - n * mean * mean) / (n - 1)
            out["y_count"] = [int(c) for c in self.y_n]
            out["y_mean"] = [
                float(m) if c > 0 else None for m, c in zip(mean, self.y_n)
            ]
            out["y_std"] = [
                float(math.sqrt(max(v, 0.0))) if c > 1 else None
                for v, c in zip(var, self.y_n)
            ]
        return out


# --- writer ---------------------------------------------------------------------------
class _LMDBSink:
    """Buffered puts into a fresh LMDB file, committed in chunks; grows a full map."""

    def __init__(self, path: Path, map_size: int):
        self.path = path
        self.map_size = map_size
        self.env = lmdb.open(
            str(path),
            subdir=False,
            map_size=map_size,
            lock=False,
            readahead=False,
            meminit=False,
            sync=False,
            metasync=False,
            max_dbs=0,
        )
        self.buffer: list[tuple[bytes, bytes, bool]] = []

    def put(self, key: bytes, value: bytes, append: bool = False) -> None:
        """Buffer one put; ``append`` promises that ``key`` sorts after every key so far
        (LMDB then fills pages instead of splitting them)."""
        self.buffer.append((key, value, append))

    def commit(self) -> None:
        if not self.buffer:
            return
        while True:
            txn = self.env.begin(write=True)
            try:
                for key, value, append in self.buffer:
                    txn.put(key, value, overwrite=True, append=append)
                txn.commit()
                break
            except lmdb.MapFullError:
                txn.abort()
                self.map_size *= 2
                logger.debug(
                    "LMDB map full; growing map_size to %d bytes", self.map_size
                )
                self.env.set_mapsize(self.map_size)
            except BaseException:
                txn.abort()
                raise
        self.buffer.clear()

    def close(self) -> None:
        if self.env is not None:
            self.env.sync(True)
            self.env.close()
            self.env = None


def _featurizer_version() -> str | None:
    import importlib

    for module in (
        "graphormer_ext.featurize.pipeline",
        "graphormer_ext.featurize.ogb_features",
    ):
        try:
            version = getattr(
                importlib.import_module(module), "FEATURIZER_VERSION", None
            )
        except Exception:  # noqa: BLE001 - no RDKit: pre-featurized records only
            continue
        if version is not None:
            return str(version)
    return None


def _package_version() -> str:
    import graphormer_ext

    return str(getattr(graphormer_ext, "__version__", "unknown"))


def _batched(it: Iterable, n: int) -> Iterable[list]:
    it = iter(it)
    while True:
        chunk = list(itertools.islice(it, n))
        if not chunk:
            return
        yield chunk


@_holding_output_lock
def write_split(
    path: str | os.PathLike,
    records: Iterable[SourceRecord | dict] | Source,
    *,
    split: str | None = None,
    source: Source | None = None,
    source_checksum: str | None = None,
    max_hops: int = 5,
    path_convention: str = "fixed",
    max_atoms: int | None = None,
    remove_hs: bool = True,
    featurize: Callable | None = None,
    workers: int | None = None,
    chunksize: int | None = None,
    commit_every: int = 2000,
    limit: int | None = None,
    total: int | None = None,
    overwrite: bool = False,
    map_size: int = _INITIAL_MAP_SIZE,
    progress: bool = True,
    extra_meta: dict | None = None,
) -> dict:
    """Featurize and write one split to ``path`` (a single LMDB file).

    Args:
        path: output file, conventionally ``<out>/<split>.lmdb``.
        records: the split's items in order: :class:`SourceRecord` items (featurized in
            the workers by ``featurize``) and/or featurized record dicts (encoded as
            they are). A :class:`Source` may be passed instead, together with
            ``split``.
        split: split name (meta, skip list, messages); taken from the first SourceRecord
            if omitted.
        source: the dataset reader, for the meta record (name, checksum,
            ``describe()``).
        source_checksum: precomputed ``source.checksum()`` (hashing large inputs once
            per run).
        max_hops: path hops the model records keep (meta ``max_hops``; the reader
            derives ``edge_input`` with it). Passed to ``featurize``.
        path_convention: ``"fixed"`` or ``"legacy"`` shortest-path edge reconstruction.
        max_atoms: molecules with more atoms are skipped by ``featurize``; ``None`` = no
            limit.
        remove_hs: drop explicit hydrogens while featurizing.
        featurize: ``featurize(rec, *, max_hops, path_convention, max_atoms, remove_hs)
            -> dict``; defaults to
            :func:`graphormer_ext.featurize.pipeline.featurize_stored`. A featurizer that
            returns model records (``featurize_record``) works too: each is stored as its
            graph after checking that the graph derives it exactly. Must be
            picklable (a module-level function) when ``workers > 1``.
        workers: worker processes (default: all cores); ``<= 1`` featurizes in this
            process.
        chunksize: records per worker task (default: tuned from ``total`` and
            ``workers``).
        commit_every: records per LMDB write transaction.
        limit: keep only the first ``limit`` items of the split (demos).
        total: number of items expected (progress bar only).
        overwrite: replace an existing ``path``; otherwise refuse (``--overwrite`` on
            the CLI).
        map_size: initial LMDB map size in bytes; doubled whenever the map is full.
        progress: show a tqdm progress bar.
        extra_meta: more JSON-able entries for the meta record.

    Returns:
        The meta dict written under :data:`keys.META_KEY`.

    Raises:
        FileExistsError: ``path`` exists (or appears during the write) and
            ``overwrite`` is false.
        OutputBusyError: another process is writing to ``path``'s folder.
        SourceError: the dataset is unusable; nothing is written at ``path``.
        WriteError: an unexpected error while featurizing an item (names the item).
    """
    if path_convention not in K.PATH_CONVENTIONS:
        raise ValueError(
            f"path_convention must be one of {K.PATH_CONVENTIONS}, "
            f"got {path_convention!r}"
        )
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"{path} already exists; pass --overwrite (overwrite=True) to replace it"
        )
    if path.is_dir():
        raise IsADirectoryError(
            f"{path} is a directory; a split is written to a single file"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    source_rows = None
    if isinstance(records, Source):
        if split is None:
            raise ValueError("write_split(path, source, ...) needs split=")
        source = source or records
        if total is None:
            total = records.splits().get(split)
        source_rows = records.split_rows(split)
        records = records.iter_split(split)
    if limit is not None:
        records = itertools.islice(records, limit)
        total = limit if total is None else min(total, limit)
        if source_rows is not None:
            source_rows = source_rows[:limit]
    workers = (os.cpu_count() or 1) if workers is None else max(int(workers), 1)
    if chunksize is None:
        # enough tasks per worker to balance load, big enough to amortise IPC
        chunksize = (
            64 if not total else int(min(256, max(8, total // (workers * 16) or 1)))
        )
    if source is not None and source_checksum is None:
        source_checksum = source.checksum()
    fkwargs = dict(
        max_hops=max_hops,
        path_convention=path_convention,
        max_atoms=max_atoms,
        remove_hs=remove_hs,
    )

    if featurize is None and workers > 1:
        # import RDKit here, once (~0.1 s CPU): forked workers inherit it instead of each
        # importing it again, for every split
        featurize = _default_featurize()
        try:
            import rdkit.Chem  # noqa: F401
        except ImportError:  # pre-featurized records only
            pass
    writer = _SplitWriter(path, split, map_size, commit_every, overwrite)
    results = _ordered_results(records, featurize, fkwargs, workers, chunksize)
    bar = None
    try:
        if progress:
            from tqdm import tqdm

            bar = tqdm(
                total=total, desc=split or path.stem, unit="mol", dynamic_ncols=True
            )
        for n, (item, result) in enumerate(results):
            if writer.split is None and isinstance(item, SourceRecord):
                writer.split = item.split
            writer.add(result, _position_of(item, n))
            if bar is not None:
                bar.update(1)
                if n % 1000 == 0:
                    bar.set_postfix(skipped=writer.counts["skipped"], refresh=False)
        meta = {
            "schema_version": K.SCHEMA_VERSION,
            "num_entries": writer.counts["kept"],
            "split": writer.split,
            "featurizer_version": _featurizer_version(),
            "path_convention": path_convention,
            "max_hops": max_hops,
            "max_atoms": max_atoms,
            "remove_hs": remove_hs,
            "counts": dict(writer.counts),
            "source": {
                "name": getattr(source, "name", None),
                "checksum": source_checksum,
                "describe": source.describe() if source is not None else None,
            },
            "stats": writer.stats.to_meta(writer.counts["kept"]),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"
            ),
            "package_version": _package_version(),
            **(extra_meta or {}),
        }
        if source_rows is not None:
            # every input row of the split, written or skipped (data/provenance.py)
            meta["source_rows"] = [int(r) for r in source_rows]
        writer.finish(meta)
    except BaseException:
        writer.discard()
        raise
    finally:
        results.close()  # terminates the worker pool on failure
        if bar is not None:
            bar.close()
    c = writer.counts
    logger.info(
        "%s: wrote %d records (%d read, %d skipped%s)",
        path,
        c["kept"],
        c["read"],
        c["skipped"],
        f", listed in {writer.skip_path}" if c["skipped"] else "",
    )
    return meta


def _ordered_results(
    records: Iterable,
    featurize: Callable | None,
    fkwargs: dict,
    workers: int,
    chunksize: int,
) -> Iterator[tuple[Any, tuple]]:
    """Yield ``(item, result)`` in input order, featurizing in a pool of ``workers``.

    At most ``4 * workers`` chunks are in flight: ``Pool.imap`` would read the whole
    input eagerly (its feeder thread has no back-pressure), gigabytes for millions of
    SDF blocks. The pool is terminated if the consumer stops early or fails.
    """
    if workers <= 1:
        _init_worker(featurize, fkwargs)
        for chunk in _batched(records, chunksize):
            yield from zip(chunk, _work_chunk(chunk))
        return
    # Frozen objects are left alone by the children's garbage collector, so forked workers
    # do not copy every page of a large parent (copy-on-write) as they run.
    gc.freeze()
    try:
        pool = multiprocessing.get_context().Pool(
            workers, initializer=_init_worker, initargs=(featurize, fkwargs)
        )
    finally:
        gc.unfreeze()
    try:
        pending: collections.deque = collections.deque()
        for chunk in _batched(records, chunksize):
            pending.append((chunk, pool.apply_async(_work_chunk, (chunk,))))
            while len(pending) >= 4 * workers:
                chunk_items, result = pending.popleft()
                yield from zip(chunk_items, result.get())
        while pending:
            chunk_items, result = pending.popleft()
            yield from zip(chunk_items, result.get())
        pool.close()
    finally:
        pool.terminate()
        pool.join()


class _SplitWriter:
    """Kept records -> ``<path>.tmp-<pid>``, skips -> skip list; renamed on success."""

    def __init__(
        self,
        path: Path,
        split: str | None,
        map_size: int,
        commit_every: int,
        overwrite: bool = False,
    ):
        self.path = path
        self.split = split
        self.overwrite = overwrite
        self.skip_path = skip_list_path(path)
        self.tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        self.tmp_skip = self.skip_path.with_name(
            f"{self.skip_path.name}.tmp-{os.getpid()}"
        )
        self.commit_every = commit_every
        self.counts = {"read": 0, "kept": 0, "skipped": 0}
        self.stats = _Stats()
        self.sizes: list[int] = []
        self.source_index: list[int] = []
        for p in (self.tmp, self.tmp_skip):
            if p.exists():  # left by a killed run of a process with the same pid
                p.unlink()
        self.sink = _LMDBSink(self.tmp, map_size)
        self.skip_file = open(self.tmp_skip, "w", encoding="utf-8")
        self.skip_file.write("item\treason\n")

    def add(self, result: tuple, position: int) -> None:
        """Store one worker result (see :func:`_process_one`)."""
        self.counts["read"] += 1
        status = result[0]
        if status == _OK:
            _, buf, n_atoms, has_pos, y = result
            self.sink.put(K.record_key(self.counts["kept"]), buf, append=True)
            self.stats.add(n_atoms, has_pos, y)
            self.sizes.append(n_atoms)
            self.source_index.append(position)
            self.counts["kept"] += 1
            if len(self.sink.buffer) >= self.commit_every:
                self.sink.commit()
        elif status == _SKIP:
            self.counts["skipped"] += 1
            self.skip_file.write(f"{_tsv(result[1])}\t{_tsv(result[2])}\n")
        elif status == _FATAL:
            raise SourceError(f"split {self.split!r}: {result[2]}")
        else:
            raise WriteError(
                f"split {self.split!r}: unexpected error featurizing {result[1]}: "
                f"{result[2]}"
            )

    def finish(self, meta: dict) -> None:
        """Write the index record, then the meta record (last); rename into place."""
        self.sink.commit()
        index = {
            K.SIZES: np.asarray(self.sizes, dtype=np.int64),
            K.SOURCE_INDEX: np.asarray(self.source_index, dtype=np.int64),
        }
        self.sink.put(K.INDEX_KEY, codec.encode(index))
        self.sink.commit()
        self.sink.put(K.META_KEY, codec.encode_meta(meta))  # present = file complete
        self.sink.commit()
        self.sink.close()
        self.skip_file.close()
        if self.overwrite:
            os.replace(self.tmp, self.path)
        else:
            self._link_new()
        os.replace(self.tmp_skip, self.skip_path)

    def _link_new(self) -> None:
        """Give the file its final name only if that name is still free (atomic)."""
        try:
            os.link(self.tmp, self.path)
        except FileExistsError:
            raise FileExistsError(
                f"{self.path} appeared while this run was writing it (another "
                "writer?); it was left as it is; pass --overwrite (overwrite=True) to "
                "replace it"
            ) from None
        except OSError:  # no hard links on this file system: check, then rename
            if self.path.exists():
                raise FileExistsError(
                    f"{self.path} appeared while this run was writing it; it was left "
                    "as it is; pass --overwrite (overwrite=True) to replace it"
                ) from None
            os.replace(self.tmp, self.path)
            return
        self.tmp.unlink()

    def discard(self) -> None:
        """Remove the temporary files after a failure (nothing gets the final name)."""
        self.skip_file.close()
        try:
            self.sink.close()
        except lmdb.Error:
            pass
        for p in (self.tmp, self.tmp_skip):
            if p.exists():
                p.unlink()


def _position_of(item: Any, position: int) -> int:
    """Index of an item in its source split: ``SourceRecord.index``, or its position."""
    return int(item.index) if isinstance(item, SourceRecord) else position


def _tsv(text: Any) -> str:
    return str(text).replace("\t", " ").replace("\r", " ").replace("\n", " ")
