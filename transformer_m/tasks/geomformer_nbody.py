"""Task ``geomformer_nbody``: charged 5-body system (EGNN protocol), predict positions 1,000 steps
ahead through GeoMFormer's equivariant head. Data: ``{train,valid,test}.npz`` written by
``scripts/make_nbody.py`` (:mod:`graphormer_ext.sources.nbody`)."""

import logging
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from fairseq.dataclass import FairseqDataclass
from fairseq.tasks import FairseqTask, register_task
from omegaconf import II

from graphormer_ext.data import keys
from graphormer_ext.data.base import GraphDataset
from graphormer_ext.sources.nbody import CHARGE, TARGET_POS, VEL, load_split
from transformer_m.tasks.graph_prediction import GraphPredictionDataset

logger = logging.getLogger(__name__)


class NBodyRecords:
    """Systems of one split as record dicts (``pos``, ``vel``, ``charge``, ``target_pos``)."""

    def __init__(self, path: str, limit: int = 0):
        self.path = path
        self.data = load_split(path)
        n = len(self.data["pos"])
        self.n = min(n, limit) if limit > 0 else n
        self.sizes = np.full(self.n, self.data["pos"].shape[1], dtype=np.int64)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return {k: v[i] for k, v in self.data.items()}


def collate_nbody(samples):
    """Records -> batch: ``idx`` [B], ``z`` int64 [B, N] (charge -1 -> 1, +1 -> 2), ``pos``,
    ``vel``, ``target_pos``/``y`` [B, N, 3], ``charge`` [B, N], ``atom_mask`` [B, N]."""
    pos = torch.from_numpy(np.stack([s["pos"] for s in samples]))
    charge = torch.from_numpy(np.stack([s[CHARGE] for s in samples]))
    target = torch.from_numpy(np.stack([s[TARGET_POS] for s in samples]))
    return {
        keys.IDX: torch.tensor([int(s[keys.IDX]) for s in samples], dtype=torch.int64),
        keys.Z: (charge > 0).long() + 1,
        keys.POS: pos,
        VEL: torch.from_numpy(np.stack([s[VEL] for s in samples])),
        CHARGE: charge,
        keys.ATOM_MASK: torch.ones(pos.shape[:2], dtype=torch.bool),
        TARGET_POS: target,
        keys.Y: target,
    }


@dataclass
class GeoMFormerNBodyConfig(FairseqDataclass):
    data_path: str = field(default="", metadata={"help": "directory with {train,valid,test}.npz"})
    train_limit: int = field(default=0, metadata={"help": "use only the first K training systems"})
    seed: int = II("common.seed")


@register_task("geomformer_nbody", dataclass=GeoMFormerNBodyConfig)
class GeoMFormerNBodyTask(FairseqTask):
    """Pair with ``--criterion geomformer_nbody``; the model is built with velocities."""

    needs_velocity = True

    @classmethod
    def setup_task(cls, cfg, **kwargs):
        if not cfg.data_path:
            raise ValueError("--data-path is required (run scripts/make_nbody.py first)")
        return cls(cfg)

    def load_dataset(self, split, combine=False, **kwargs):
        path = os.path.join(self.cfg.data_path, f"{split}.npz")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} missing: run `python scripts/make_nbody.py --out "
                                    f"{self.cfg.data_path}`")
        records = NBodyRecords(path, self.cfg.train_limit if split == "train" else 0)
        logger.info("%s: %d systems from %s", split, len(records), path)
        graphs = GraphDataset(records, collate_nbody, shuffle=split == "train", seed=self.cfg.seed)
        self.datasets[split] = GraphPredictionDataset(graphs)

    def max_positions(self):
        return 1 << 20

    @property
    def source_dictionary(self):
        return None

    @property
    def target_dictionary(self):
        return None
