"""Index tensors of a collated batch, computed on the host where the batch is made.

The fast path needs the positions of the real tokens and of the real atom pairs. Computed
on the GPU they cost a ``nonzero`` each, i.e. a host synchronisation that stalls the launch
queue; computed here, with numpy in the data loader's worker, they travel with the batch
and the forward pass never waits for the device. The model uses them when the batch has
them (the ``graph_prediction`` tasks add them in their collater) and computes the same
indices on the device otherwise (direct calls, inference).

Keys (added to the batch dict, next to those of :mod:`graphormer_ext.data.keys`; values
are CPU tensors that fairseq moves to the device with the batch, plus one Python bool):

* ``PLAN_TOKENS`` int64 [M]: ``b * T + t`` of the real tokens (graph token + atoms),
  ``T = N + 1``, row-major;
* ``PLAN_BATCH``, ``PLAN_TOKEN`` int64 [M]: their ``b`` and ``t``;
* ``PLAN_GATHER`` int64 [B * T]: packed row of every grid position, ``M`` for padding;
* ``PLAN_SPREAD`` int64 [B * T]: the same with padding pointing at row ``M - 1``;
* ``PLAN_PAIRS`` int64 [P]: ``(b * N + i) * N + j`` of the pairs of real atoms;
* ``PLAN_ANY_POS`` bool: whether any position of the batch is non-zero (the 3D channel
  runs), or absent when the batch has no ``pos``.

With ``token_multiple > 1`` the packed rows are padded to a multiple of it with inert rows
(copies of the graph token of molecule 0 that no real row ever reads: their outputs are
dropped and their gradients are zero), so that the layer stack sees few distinct shapes, as
``torch.compile`` with CUDA graphs needs.
"""
from typing import Mapping, MutableMapping, Optional

import numpy as np
import torch

from graphormer_ext.data import keys

PLAN_TOKENS = "tm_plan_tokens"
PLAN_BATCH = "tm_plan_token_batch"
PLAN_TOKEN = "tm_plan_token_position"
PLAN_GATHER = "tm_plan_gather"
PLAN_SPREAD = "tm_plan_spread"
PLAN_PAIRS = "tm_plan_pairs"
PLAN_ANY_POS = "tm_plan_any_pos"
PLAN_KEYS = (PLAN_TOKENS, PLAN_BATCH, PLAN_TOKEN, PLAN_GATHER, PLAN_SPREAD, PLAN_PAIRS,
             PLAN_ANY_POS)  # fmt: skip


def host_plan(batch: Mapping[str, torch.Tensor], token_multiple: int = 1) -> dict:
    """The plan of a collated CPU batch (see the module docstring).

    Args:
        batch: collated batch with ``x`` int [B, N, 9] (0 = padding atom) and optionally
            ``pos`` float [B, N, 3], on the CPU.
        token_multiple: pad the packed rows to a multiple of this with inert rows.

    Returns:
        dict of the ``PLAN_*`` entries.
    """
    x0 = batch[keys.X][:, :, 0].numpy()  # [B, N]
    real = x0 != keys.PAD
    bsz, n_atoms = real.shape
    n_tok = n_atoms + 1
    tokens = np.concatenate([np.ones((bsz, 1), bool), real], axis=1)  # [B, T]
    flat = np.flatnonzero(tokens)  # [M], row-major like torch.nonzero
    n_real = len(flat)
    gather = np.full(bsz * n_tok, n_real, dtype=np.int64)
    gather[flat] = np.arange(n_real)
    spread = np.minimum(gather, n_real - 1)
    if token_multiple > 1:
        # inert rows: packed from grid position 0, never gathered by a real position
        n_rows = -(-n_real // token_multiple) * token_multiple
        flat = np.concatenate([flat, np.zeros(n_rows - n_real, np.int64)])
        gather[gather == n_real] = n_rows  # unpack's zero row now follows the inert rows
    pairs = np.flatnonzero(real[:, :, None] & real[:, None, :])  # [P]
    plan = {
        PLAN_TOKENS: torch.from_numpy(flat),
        PLAN_BATCH: torch.from_numpy(flat // n_tok),
        PLAN_TOKEN: torch.from_numpy(flat % n_tok),
        PLAN_GATHER: torch.from_numpy(gather),
        PLAN_SPREAD: torch.from_numpy(spread),
        PLAN_PAIRS: torch.from_numpy(pairs.astype(np.int64)),
    }
    pos = batch.get(keys.POS)
    if pos is not None:
        plan[PLAN_ANY_POS] = bool(pos.numpy().any())
    return plan


def add_host_plan(
    batch: MutableMapping[str, torch.Tensor], token_multiple: int = 1
) -> MutableMapping:
    """Add :func:`host_plan` to ``batch`` (in place) and return it."""
    batch.update(host_plan(batch, token_multiple))
    return batch


def plan_of(batch: Mapping) -> Optional[dict]:
    """The plan entries of ``batch``, or None when it has none."""
    if PLAN_TOKENS not in batch:
        return None
    return {k: batch[k] for k in PLAN_KEYS if k in batch}


class PairIndex:
    """The real atom pairs of a ``[B, N, N]`` grid as flat indices (plus derived views).

    Attributes:
        flat: int64 [P], ``(b * N + i) * N + j`` in row-major order.
        num_atoms: N.
    """

    def __init__(self, flat: torch.Tensor, num_atoms: int):
        self.flat = flat
        self.num_atoms = num_atoms
        self._row = None
        self._batch = None

    @classmethod
    def from_padding_mask(cls, padding_mask: torch.Tensor) -> "PairIndex":
        """Pairs of real atoms of ``padding_mask`` ([B, N] bool), with ``nonzero`` on its
        device (a synchronisation on a GPU)."""
        real = ~padding_mask
        pairs = real.unsqueeze(2) & real.unsqueeze(1)  # [B, N, N]
        return cls(pairs.reshape(-1).nonzero().squeeze(-1), padding_mask.shape[1])

    @property
    def row(self) -> torch.Tensor:
        """int64 [P], ``b * N + i`` (the query atom of each pair)."""
        if self._row is None:
            self._row = torch.div(self.flat, self.num_atoms, rounding_mode="floor")
        return self._row

    @property
    def batch(self) -> torch.Tensor:
        """int64 [P], ``b``."""
        if self._batch is None:
            self._batch = torch.div(self.row, self.num_atoms, rounding_mode="floor")
        return self._batch

    def gather(self, grid: torch.Tensor) -> torch.Tensor:
        """``grid`` [B, N, N, ...] -> [P, ...] at the real pairs."""
        n = self.num_atoms
        flat = grid.reshape((grid.shape[0] * n * n,) + grid.shape[3:])
        return flat.index_select(0, self.flat)

    def scatter_heads(self, values: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Per-pair rows ``values`` [P, H] into a zero grid, as [H, B, N, N] (a permuted view
        of [B, N, N, H]: an ``index_copy`` along dim 0 is the fast one on every device)."""
        return self.scatter(values, batch_size).permute(3, 0, 1, 2)

    def scatter(self, values: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Per-pair rows ``values`` [P, C] into a zero grid [B, N, N, C]."""
        n = self.num_atoms
        out = values.new_zeros(batch_size * n * n, values.shape[-1])
        out = out.index_copy(0, self.flat, values)
        return out.view(batch_size, n, n, values.shape[-1])
