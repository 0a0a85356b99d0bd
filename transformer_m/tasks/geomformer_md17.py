"""Tasks ``geomformer_md17`` (energy + forces) and ``geomformer_graph_prediction`` (PCQM4Mv2 / QM9
HOMO-LUMO gap from 3D input) on point-cloud LMDB splits.

Both read ``<data_path>/<split>.lmdb`` written by ``graphormer-ext-preprocess`` (``md17``: records
``z``, ``pos``, ``y``, ``forces``; ``pcqm4mv2`` / ``qm9``: Transformer-M graph records, from which
:class:`graphormer_ext.data.collator_3d.PointCloudCollator` recovers ``z``) and collate with
:class:`PointCloudCollator`. A batch is ``{"id", "nsamples", "net_input": {"batched_data": batch},
"target"}``.
"""

import logging
import math
from dataclasses import dataclass, field

import numpy as np
from fairseq.dataclass import FairseqDataclass
from fairseq.tasks import FairseqTask, register_task
from omegaconf import II

from graphormer_ext.data import keys
from graphormer_ext.data.base import GraphDataset
from graphormer_ext.data.collator_3d import PointCloudCollator
from graphormer_ext.data.lmdb_dataset import LMDBDataset
from transformer_m.tasks.graph_prediction import (
    GraphPredictionDataset,
    require_records,
    split_path,
)

logger = logging.getLogger(__name__)


def target_stats(records, target_index: int = 0) -> tuple:
    """Mean and std (float64) of target ``y[target_index]`` over a split (NaN labels ignored)."""
    ys = np.asarray([float(np.asarray(records[i][keys.Y]).reshape(-1)[target_index])
                     for i in range(len(records))], dtype=np.float64)
    ys = ys[np.isfinite(ys)]
    if ys.size == 0:
        return 0.0, 1.0
    std = float(ys.std())
    return float(ys.mean()), std if std > 0 else 1.0


@dataclass
class GeoMFormerMD17Config(FairseqDataclass):
    data_path: str = field(
        default="", metadata={"help": "directory with {train,valid,test}.lmdb (md17 source)"}
    )
    energy_mean: float = field(
        default=math.nan,
        metadata={"help": "energy normalisation mean (kcal/mol); NaN = train-split mean"},
    )
    energy_std: float = field(
        default=math.nan,
        metadata={"help": "energy normalisation std (kcal/mol); NaN = train-split std"},
    )
    target_index: int = field(
        default=0,
        metadata={"help": "column of a multi-target y (QM9 packs 19 targets: pass the gap's "
                  "column); ignored for scalar y"},
    )
    max_nodes: int = field(default=512, metadata={"help": "larger molecules are left out"})
    center: bool = field(default=False, metadata={"help": "centre each molecule's positions"})
    seed: int = II("common.seed")


class _SelectTarget:
    """Collator wrapper: a ``[B, T]`` target becomes ``[B]`` (column ``index``)."""

    def __init__(self, collator, index: int):
        self.collator, self.index = collator, int(index)

    def __call__(self, samples):
        batch = self.collator(samples)
        if batch[keys.Y].dim() == 2:
            batch[keys.Y] = batch[keys.Y][:, self.index].contiguous()
        return batch


class _PointCloudTask(FairseqTask):
    """LMDB splits -> :class:`PointCloudCollator` batches; energy statistics from ``train``."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.energy_mean = cfg.energy_mean
        self.energy_std = cfg.energy_std
        if not (math.isfinite(self.energy_mean) and math.isfinite(self.energy_std)):
            mean, std = self._train_stats()
            self.energy_mean = mean if not math.isfinite(self.energy_mean) else self.energy_mean
            self.energy_std = std if not math.isfinite(self.energy_std) else self.energy_std
        logger.info("energy normalisation: mean %.6f std %.6f", self.energy_mean, self.energy_std)

    def _train_stats(self):
        try:
            records = LMDBDataset(split_path(self.cfg.data_path, "train"))
        except FileNotFoundError:
            logger.warning("no train split: energy normalisation mean 0, std 1")
            return 0.0, 1.0
        return target_stats(records, self.cfg.target_index)

    @classmethod
    def setup_task(cls, cfg, **kwargs):
        if not cfg.data_path:
            raise ValueError("--data-path is required (directory with <split>.lmdb files)")
        return cls(cfg)

    def load_dataset(self, split, combine=False, **kwargs):
        records = require_records(LMDBDataset(split_path(self.cfg.data_path, split)), split)
        logger.info("%s: %d structures from %s", split, len(records), records.path)
        graphs = GraphDataset(
            records, _SelectTarget(PointCloudCollator(center=self.cfg.center),
                                   self.cfg.target_index), shuffle=split == "train",
            seed=self.cfg.seed, max_atoms=self.cfg.max_nodes,
        )
        self.datasets[split] = GraphPredictionDataset(graphs)

    def max_positions(self):
        return self.cfg.max_nodes

    @property
    def source_dictionary(self):
        return None

    @property
    def target_dictionary(self):
        return None


@register_task("geomformer_md17", dataclass=GeoMFormerMD17Config)
class GeoMFormerMD17Task(_PointCloudTask):
    """MD17 / rMD17 energies (``y``, kcal/mol) and forces (``forces``, kcal/mol/Å).

    Pair with ``--criterion geomformer_md17``. The model predicts the normalised energy
    ``(E - mean) / std``; forces are ``std`` times its negative gradient (``--force-mode grad``) or
    ``std`` times the equivariant head (``--force-mode direct``).
    """


@dataclass
class GeoMFormerGraphPredictionConfig(GeoMFormerMD17Config):
    pass


@register_task("geomformer_graph_prediction", dataclass=GeoMFormerGraphPredictionConfig)
class GeoMFormerGraphPredictionTask(_PointCloudTask):
    """HOMO-LUMO gap (eV) on the Transformer-M PCQM4Mv2 / QM9 LMDB splits, 3D input only.

    Every split used must carry positions (PCQM4Mv2: the training split has DFT positions, its
    valid/test splits have none; use a held-out part of train, or QM9, for validation).
    Pair with ``--criterion geomformer_graph_prediction`` (L1 on the gap).
    """
