"""Epoch-aware datasets speaking fairseq's duck-typed dataset protocol, without fairseq.

fairseq's ``task.get_batch_iterator`` only calls methods on the dataset
(``ordered_indices``, ``filter_indices_by_size``, ``batch_by_size``, ``collater``,
``set_epoch``, ...), so a plain ``torch.utils.data.Dataset`` that implements them is
accepted as a ``FairseqDataset``.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import numpy as np
import torch

from graphormer_ext.data import keys as K

logger = logging.getLogger(__name__)

__all__ = ["EpochDataset", "GraphDataset", "batch_by_size", "size_bucket", "is_long_tailed"]

# Size buckets grow geometrically by this factor: a batch drawn from one bucket pads its
# molecules by < 25 % (< 56 % more pair memory than no padding).
BUCKET_RATIO = 1.25
# "auto" buckets a split whose largest molecule exceeds this many times the median one: a
# random batch that catches it is padded to > 4x the typical size (> 16x the pair memory).
LONG_TAIL_FACTOR = 4.0


def size_bucket(sizes: np.ndarray) -> np.ndarray:
    """Geometric size bucket of each atom count: ``floor(log(n) / log(1.25))``."""
    n = np.maximum(np.asarray(sizes, dtype=np.float64), 1.0)
    return np.floor(np.log(n) / np.log(BUCKET_RATIO) + 1e-9).astype(np.int64)


def is_long_tailed(sizes: np.ndarray) -> bool:
    """True if the largest size exceeds :data:`LONG_TAIL_FACTOR` times the median size."""
    sizes = np.asarray(sizes)
    return bool(sizes.size) and float(sizes.max()) > LONG_TAIL_FACTOR * float(
        np.median(sizes)
    )


def _max_size(max_sizes: Any) -> float | None:
    """Reduce fairseq's ``max_positions`` (number, tuple or None) to one number."""
    if max_sizes is None:
        return None
    if isinstance(max_sizes, (tuple, list)):
        vals = [v for v in (_max_size(m) for m in max_sizes) if v is not None]
        return min(vals) if vals else None
    if isinstance(max_sizes, dict):
        return _max_size(list(max_sizes.values()))
    return float(max_sizes)


def batch_by_size(
    indices: np.ndarray,
    num_tokens: np.ndarray,
    max_tokens: int | None = None,
    max_sentences: int | None = None,
    required_batch_size_multiple: int = 1,
    max_bytes: int | None = None,
    batch_nbytes: Callable[[int, int], int] | None = None,
) -> list[np.ndarray]:
    """Greedy batching in the given order; every index lands in exactly one batch.

    A batch costs ``max(num_tokens) * len(batch)`` tokens (padded size times count) and
    ``batch_nbytes(len(batch), max(num_tokens))`` bytes. When the next index would
    overflow ``max_tokens``, ``max_sentences`` or ``max_bytes``, the batch is closed at
    the largest multiple of ``required_batch_size_multiple`` (fairseq's rule) and the
    remainder starts the next batch.

    Args:
        indices: int64 ``[M]`` dataset indices, in batching order.
        num_tokens: int64 ``[M]`` tokens of each entry of ``indices`` (aligned with
            ``indices``).
        max_tokens: token budget per batch (``None`` or ``<= 0``: unlimited).
        max_sentences: items per batch (``None`` or ``<= 0``: unlimited).
        required_batch_size_multiple: preferred batch-size multiple.
        max_bytes: byte budget per batch (``None`` or ``<= 0``: unlimited); needs
            ``batch_nbytes``.
        batch_nbytes: ``batch_nbytes(count, max_tokens_in_batch) -> bytes``.

    Returns:
        List of int64 index arrays.

    Raises:
        ValueError: one item alone exceeds ``max_tokens`` or ``max_bytes`` (filter it
            upstream, e.g. with ``filter_indices_by_size``).
    """
    indices = np.asarray(indices, dtype=np.int64)
    num_tokens = np.asarray(num_tokens, dtype=np.int64)
    max_tokens = int(max_tokens) if max_tokens and max_tokens > 0 else 0
    max_sentences = int(max_sentences) if max_sentences and max_sentences > 0 else 0
    mult = max(int(required_batch_size_multiple), 1)
    max_bytes = int(max_bytes) if max_bytes and max_bytes > 0 and batch_nbytes else 0
    if len(indices) == 0:
        return []
    if max_bytes:
        big = int(num_tokens.max())
        if batch_nbytes(1, big) > max_bytes:
            bad = int(indices[int(np.argmax(num_tokens))])
            raise ValueError(
                f"item {bad} ({big} atoms) alone needs {batch_nbytes(1, big)} bytes, more "
                f"than max_bytes={max_bytes}; leave it out upstream or raise the budget"
            )
    if max_tokens and int(num_tokens.max()) > max_tokens:
        bad = int(indices[int(np.argmax(num_tokens))])
        raise ValueError(
            f"item {bad} has {int(num_tokens.max())} tokens, more than "
            f"max_tokens={max_tokens}; remove it with filter_indices_by_size "
            "(--skip-invalid-size-inputs-valid-test) or raise --max-tokens"
        )
    if not max_tokens and not max_bytes:
        if not max_sentences:
            return [indices.copy()]
        step = max(mult * (max_sentences // mult), max_sentences % mult)
        return [indices[i : i + step].copy() for i in range(0, len(indices), step)]

    batches: list[np.ndarray] = []
    start = 0  # current batch = indices[start:pos]
    cur_max = 0
    tok = num_tokens.tolist()
    for pos in range(len(tok)):
        n = tok[pos]
        new_max = n if n > cur_max else cur_max
        count = pos - start
        while count and (
            (max_sentences and count + 1 > max_sentences)
            or (max_tokens and (count + 1) * new_max > max_tokens)
            or (max_bytes and batch_nbytes(count + 1, new_max) > max_bytes)
        ):
            keep = max(mult * (count // mult), count % mult)
            batches.append(indices[start : start + keep].copy())
            start += keep
            count = pos - start
            cur_max = max(tok[start:pos], default=0)
            new_max = n if n > cur_max else cur_max
        cur_max = new_max
    if start < len(tok):
        batches.append(indices[start:].copy())
    return batches


class EpochDataset(torch.utils.data.Dataset):
    """Base of graph datasets: fairseq's protocol, epoch-keyed shuffling, size batching.

    Subclasses implement ``__len__``, ``__getitem__``, ``collater`` and the ``sizes``
    property; a wrapper stores its inner dataset in ``self.dataset`` so that
    :meth:`set_epoch` reaches it.

    Args:
        shuffle: permute :meth:`ordered_indices` with ``np.random.default_rng((seed,
            epoch))``.
        seed: base seed of the permutation.
        sort_by_size: order by size (stable, so ties keep the shuffled order), like
            fairseq.
    """

    supports_prefetch = False
    supports_fetch_outside_dataloader = True

    def __init__(
        self, *, shuffle: bool = False, seed: int = 0, sort_by_size: bool = False
    ):
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.sort_by_size = bool(sort_by_size)
        self.epoch = 1  # fairseq counts epochs from 1

    # --- to implement -----------------------------------------------------------------
    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> Any:
        raise NotImplementedError

    def collater(self, samples: list) -> dict:
        """Merge a list of items into a batch."""
        raise NotImplementedError

    @property
    def sizes(self) -> np.ndarray:
        """int64 ``[len]`` item sizes (atoms)."""
        raise NotImplementedError

    # --- fairseq protocol -------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Record the epoch (keys the shuffle) and pass it to the wrapped dataset."""
        self.epoch = int(epoch)
        inner = getattr(self, "dataset", None)
        if inner is not None and hasattr(inner, "set_epoch"):
            inner.set_epoch(epoch)

    @property
    def can_reuse_epoch_itr_across_epochs(self) -> bool:
        """Batches can be reused only when the order does not change with the epoch."""
        return not self.shuffle

    def num_tokens(self, index: int) -> int:
        """Tokens of item ``index`` (its atom count), for ``--max-tokens`` batching."""
        return int(self.sizes[index])

    def num_tokens_vec(self, indices: np.ndarray) -> np.ndarray:
        """Vectorised :meth:`num_tokens`."""
        return np.asarray(self.sizes, dtype=np.int64)[
            np.asarray(indices, dtype=np.int64)
        ]

    def size(self, index: int) -> int:
        """Size of item ``index`` compared with ``max_positions``."""
        return int(self.sizes[index])

    def ordered_indices(self) -> np.ndarray:
        """Iteration order for this epoch: int64 ``[len]``."""
        n = len(self)
        if self.shuffle:
            order = (
                np.random.default_rng((self.seed, self.epoch))
                .permutation(n)
                .astype(np.int64)
            )
        else:
            order = np.arange(n, dtype=np.int64)
        if self.sort_by_size:
            order = order[np.argsort(np.asarray(self.sizes)[order], kind="stable")]
        return order

    def prefetch(self, indices: Sequence[int]) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not support prefetch")

    def attr(self, attr: str, index: int) -> Any:
        return getattr(self, attr, None)

    def get_batch_shapes(self) -> None:
        return None

    def filter_indices_by_size(
        self, indices: np.ndarray, max_sizes: Any
    ) -> tuple[np.ndarray, list[int]]:
        """Split ``indices`` into those with ``size <= max_sizes`` and the rest.

        Returns:
            ``(kept int64 array, ignored list of int)``; order is preserved.
        """
        indices = np.asarray(indices, dtype=np.int64)
        limit = _max_size(max_sizes)
        if limit is None:
            return indices, []
        too_big = np.asarray(self.sizes)[indices] > limit
        return indices[~too_big], indices[too_big].tolist()

    def batch_by_size(
        self,
        indices: np.ndarray,
        max_tokens: int | None = None,
        max_sentences: int | None = None,
        required_batch_size_multiple: int = 1,
    ) -> list[np.ndarray]:
        """Group ``indices`` (in order) into batches; see :func:`batch_by_size`."""
        indices = np.asarray(indices, dtype=np.int64)
        return batch_by_size(
            indices,
            self.num_tokens_vec(indices),
            max_tokens=max_tokens,
            max_sentences=max_sentences,
            required_batch_size_multiple=required_batch_size_multiple,
        )


class GraphDataset(EpochDataset):
    """Stored records -> collated Transformer-M batches.

    Args:
        dataset: an indexable of record dicts with ``sizes`` (e.g.
            :class:`LMDBDataset`).
        collator: ``collator(list of items) -> batch`` (e.g. :class:`Collator`). If it
            has ``max_batch_bytes`` and ``batch_nbytes(count, max_atoms)`` (as
            :class:`Collator`), :meth:`batch_by_size` keeps every batch under that budget.
        shuffle: shuffle per epoch (see :class:`EpochDataset`).
        seed: shuffle seed.
        max_atoms: leave molecules with more atoms out of :meth:`ordered_indices`
            (counted and logged once); ``None`` keeps all. The collator never drops a
            molecule.
        sort_by_size: see :class:`EpochDataset`.
        size_buckets: when shuffling, group the shuffled order by geometric size bucket
            (:func:`size_bucket`), so that a batch holds molecules of similar size (fairseq
            shuffles the batches); ``"auto"`` (default) does it for long-tailed data only
            (:func:`is_long_tailed`), so that e.g. PCQM4Mv2 keeps the release's random
            batches; ``True``/``False`` force it.

    ``dataset[i]`` is the record dict plus ``idx`` (= ``i``).
    """

    def __init__(
        self,
        dataset: Any,
        collator: Callable[[list], dict],
        shuffle: bool = False,
        seed: int = 0,
        max_atoms: int | None = None,
        sort_by_size: bool = False,
        size_buckets: bool | str = "auto",
    ):
        super().__init__(shuffle=shuffle, seed=seed, sort_by_size=sort_by_size)
        self.dataset = dataset
        self.collator = collator
        self.max_atoms = max_atoms
        self._sizes = np.asarray(dataset.sizes, dtype=np.int64)
        self._warned: set[str] = set()
        if size_buckets == "auto":
            kept = self._sizes if max_atoms is None else self._sizes[self._sizes <= max_atoms]
            size_buckets = is_long_tailed(kept)
            if size_buckets and shuffle:
                logger.info(
                    "%s: long-tailed sizes (median %d, max %d atoms): batches are drawn "
                    "from size buckets",
                    dataset, int(np.median(kept)), int(kept.max()),
                )
        elif size_buckets not in (True, False):
            raise ValueError(f"size_buckets must be True, False or 'auto', got {size_buckets!r}")
        self.size_buckets = bool(size_buckets)
        self._max_bytes = getattr(collator, "max_batch_bytes", None)
        self._batch_nbytes = getattr(collator, "batch_nbytes", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item = dict(self.dataset[index])
        item[K.IDX] = int(index)
        return item

    @property
    def sizes(self) -> np.ndarray:
        return self._sizes

    def collater(self, samples: list) -> dict:
        """Collate items; fairseq expects an empty dict for an empty list."""
        if len(samples) == 0:
            return {}
        return self.collator(samples)

    def _leave_out(self, order: np.ndarray, keep: np.ndarray, why: str) -> np.ndarray:
        if not keep.all() and why not in self._warned:
            logger.warning(
                "%s: leaving out %d of %d molecules %s",
                self.dataset, int((~keep).sum()), len(order), why,
            )
            self._warned.add(why)
        return order[keep]

    def ordered_indices(self) -> np.ndarray:
        order = super().ordered_indices()
        sizes = self._sizes[order]
        if self.max_atoms is not None:
            keep = sizes <= self.max_atoms
            order = self._leave_out(order, keep, f"with more than {self.max_atoms} atoms")
            sizes = sizes[keep]
        if self._max_bytes and self._batch_nbytes and len(order):
            alone = np.array([self._batch_nbytes(1, int(n)) for n in np.unique(sizes)])
            too_big = np.unique(sizes)[alone > self._max_bytes]
            if too_big.size:
                keep = ~np.isin(sizes, too_big)
                order = self._leave_out(
                    order, keep, f"larger than a batch of max_batch_bytes={self._max_bytes}"
                )
                sizes = sizes[keep]
        if self.shuffle and self.size_buckets and not self.sort_by_size:
            order = order[np.argsort(size_bucket(sizes), kind="stable")]
        return order

    def batch_by_size(
        self,
        indices: np.ndarray,
        max_tokens: int | None = None,
        max_sentences: int | None = None,
        required_batch_size_multiple: int = 1,
    ) -> list[np.ndarray]:
        """Group ``indices`` (in order) into batches, each within the collator's byte
        budget as well; see :func:`batch_by_size`. With size buckets, a batch never spans
        two buckets (the tail's few large molecules would pad a whole batch)."""
        indices = np.asarray(indices, dtype=np.int64)
        kwargs = dict(
            max_tokens=max_tokens,
            max_sentences=max_sentences,
            required_batch_size_multiple=required_batch_size_multiple,
            max_bytes=self._max_bytes,
            batch_nbytes=self._batch_nbytes,
        )
        if not (self.shuffle and self.size_buckets and not self.sort_by_size):
            return batch_by_size(indices, self.num_tokens_vec(indices), **kwargs)
        buckets = size_bucket(self._sizes[indices])
        cuts = np.flatnonzero(np.diff(buckets)) + 1
        batches: list[np.ndarray] = []
        for run in np.split(indices, cuts):
            batches += batch_by_size(run, self.num_tokens_vec(run), **kwargs)
        return batches
