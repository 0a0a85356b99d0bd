"""Task ``graph_prediction``: Transformer-M pre-training / property regression on LMDB splits."""

import logging
import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from fairseq.data import FairseqDataset
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.tasks import FairseqTask, register_task
from omegaconf import II

from graphormer_ext.data import keys
from graphormer_ext.data.base import GraphDataset
from graphormer_ext.data.collator import Collator
from graphormer_ext.data.lmdb_dataset import LMDBDataset
from transformer_m.data_facts import check_facts, split_facts, trained_channels
from transformer_m.modules.host_plan import add_host_plan
from transformer_m.modules.utils import parse_mode_prob

logger = logging.getLogger(__name__)

DATASET_NAMES = ChoiceEnum(["PCQM4M-LSC-V2-3D", "PCQM4M-LSC-V2", "PCQM4M-LSC-V2-TOY", "custom"])
TOY_TRAIN_SIZE = 5000  # PCQM4M-LSC-V2-TOY: the first 5,000 training molecules, as in the original


@dataclass
class GraphPredictionConfig(FairseqDataclass):
    data_path: str = field(
        default="",
        metadata={
            "help": "directory holding <split>.lmdb files written by `graphormer-ext-preprocess`"
        },
    )
    dataset_name: DATASET_NAMES = field(
        default="PCQM4M-LSC-V2-3D",
        metadata={
            "help": "PCQM4M-LSC-V2-3D uses the stored 3D positions; PCQM4M-LSC-V2 ignores them "
            "(2D only); PCQM4M-LSC-V2-TOY keeps the first 5,000 training molecules"
        },
    )
    num_classes: int = field(default=1, metadata={"help": "number of regression targets"})
    max_nodes: int = field(
        default=256,
        metadata={"help": "molecules with more atoms are left out of the epoch (counted, logged)"},
    )
    pad_to_multiple: int = field(
        default=1, metadata={"help": "pad the token count (atoms + graph token) to this multiple"}
    )
    pack_multiple: int = field(
        default=1,
        metadata={"help": "pad the batch's packed real-token count to this multiple with inert "
                  "rows (fast path): few distinct shapes for --torch-compile reduce-overhead"},
    )
    num_atoms: int = field(default=keys.NUM_ATOMS_VOCAB, metadata={"help": "atom vocabulary"})
    num_edges: int = field(default=keys.NUM_EDGES_VOCAB, metadata={"help": "bond vocabulary"})
    num_in_degree: int = field(default=keys.NUM_DEGREE_VOCAB, metadata={"help": "degree vocab"})
    num_out_degree: int = field(default=keys.NUM_DEGREE_VOCAB, metadata={"help": "degree vocab"})
    num_spatial: int = field(default=keys.NUM_SPATIAL_VOCAB, metadata={"help": "SPD vocabulary"})
    num_edge_dis: int = field(default=128, metadata={"help": "number of per-hop HxH matrices"})
    multi_hop_max_dist: int = field(default=5, metadata={"help": "path hops used by the model"})
    edge_type: ChoiceEnum(["multi_hop", "direct"]) = field(
        default="multi_hop", metadata={"help": "path-edge bias along shortest paths, or bonds only"}
    )
    max_positions: int = field(default=512, metadata={"help": "kept for compatibility"})
    no_3d_input: bool = field(
        default=False,
        metadata={"help": "ignore stored 3D positions: the model sees the 2D graph only"},
    )
    allow_data_mismatch: bool = field(
        default=False,
        metadata={
            "help": "go on (with a warning) when splits, or the checkpoint and the data, differ "
            "in path convention, max hops, featurizer version or hydrogens; by default that "
            "is an error"
        },
    )
    seed: int = II("common.seed")


class GraphPredictionDataset(FairseqDataset):
    """fairseq adapter around :class:`graphormer_ext.data.base.GraphDataset`.

    A sample is ``{"id", "nsamples", "nlabelled", "labelled", "net_input": {"batched_data":
    batch}, "target"}`` (plus ``natoms`` for point-cloud batches). The collater (run in the
    data loader's workers) also computes what the model and the loss would otherwise compute
    or read back on the device: the index plan of :mod:`transformer_m.modules.host_plan` (in
    ``batch``), ``labelled`` (bool [B], the molecules with a finite target) and
    ``nlabelled``, their number.
    """

    def __init__(self, graphs: GraphDataset, token_multiple: int = 1):
        self.graphs = graphs
        self.token_multiple = int(token_multiple)

    def __len__(self):
        return len(self.graphs)

    def __getitem__(self, index):
        return self.graphs[index]

    def collater(self, samples):
        batch = self.graphs.collater(samples)
        if not batch:
            return {}
        target = batch[keys.Y]
        labelled = torch.isfinite(target.view(target.shape[0], -1)).all(-1)
        sample = {
            "id": batch[keys.IDX],
            "nsamples": int(batch[keys.IDX].numel()),
            "nlabelled": int(labelled.sum()),
            "labelled": labelled,  # bool [B]: the loss needs no isfinite on the device
            "net_input": {
                "batched_data": add_host_plan(batch, self.token_multiple)
                if keys.X in batch else batch
            },
            "target": target,
        }
        if keys.ATOM_MASK in batch:  # point clouds (GeoMFormer): real atoms, counted here
            sample["natoms"] = int(batch[keys.ATOM_MASK].sum())
        return sample

    @property
    def sizes(self):
        return self.graphs.sizes

    def num_tokens(self, index):
        return self.graphs.num_tokens(index)

    def num_tokens_vec(self, indices):
        return self.graphs.num_tokens_vec(indices)

    def size(self, index):
        return self.graphs.size(index)

    def ordered_indices(self):
        return self.graphs.ordered_indices()

    def set_epoch(self, epoch):
        self.graphs.set_epoch(epoch)

    @property
    def can_reuse_epoch_itr_across_epochs(self):
        return self.graphs.can_reuse_epoch_itr_across_epochs

    @property
    def supports_prefetch(self):
        return False

    def filter_indices_by_size(self, indices, max_sizes):
        return self.graphs.filter_indices_by_size(indices, max_sizes)

    def batch_by_size(self, indices, max_tokens=None, max_sentences=None,
                      required_batch_size_multiple=1):
        return self.graphs.batch_by_size(
            indices, max_tokens=max_tokens, max_sentences=max_sentences,
            required_batch_size_multiple=required_batch_size_multiple,
        )


def split_path(data_path: str, split: str) -> str:
    """``<data_path>/<split>.lmdb``, with a clear error naming the preprocess command."""
    path = os.path.join(data_path, f"{split}.lmdb")
    if not os.path.isfile(path):
        found = sorted(f for f in os.listdir(data_path) if f.endswith(".lmdb")) if os.path.isdir(
            data_path) else []
        raise FileNotFoundError(
            f"split {split!r}: {path} does not exist (found: {found or 'no .lmdb files'}). "
            "Create the splits with `graphormer-ext-preprocess pcqm4mv2 --root <PCQM4Mv2 root> "
            f"--out {data_path or '<dir>'}` (or another source) and pass that directory as --data-path."
        )
    return path


def require_records(records: LMDBDataset, split: str) -> LMDBDataset:
    """``records``, or a clear error if the split holds no molecule (fairseq would fail later
    with "The dataset is empty", naming neither the split nor the file)."""
    if len(records) == 0:
        raise ValueError(
            f"split {split!r}: {records.path} holds no molecules (graphormer-ext-preprocess "
            "warned when it wrote it). Give that split molecules (more rows, other --split-"
            "fractions or a --split-column with that value), or do not use it: --valid-subset "
            "names the validation splits, --disable-validation skips validation"
        )
    return records


@register_task("graph_prediction", dataclass=GraphPredictionConfig)
class GraphPredictionTask(FairseqTask):
    """Graph-level regression (PCQM4Mv2 HOMO-LUMO gap pre-training) on LMDB splits.

    The training split of PCQM4Mv2 carries DFT 3D positions, valid/test do not (2D inference), as
    in the original release. A purely 2D dataset works too (no positions anywhere).
    """

    cfg: GraphPredictionConfig

    def __init__(self, cfg: GraphPredictionConfig):
        super().__init__(cfg)
        if cfg.num_classes <= 0:
            raise ValueError(f"--num-classes must be > 0, got {cfg.num_classes}")
        # data facts (transformer_m.data_facts): from the first split loaded, or the checkpoint
        self.data_facts: Optional[dict] = None
        self.facts_from: Optional[str] = None
        self.channels: Optional[dict] = None  # from the checkpoint, else built in state_dict
        self._model_channels: Optional[dict] = None  # add_3d / no_2d / mode draw of the model
        self._train_has_3d: Optional[bool] = None

    @classmethod
    def setup_task(cls, cfg, **kwargs):
        if not cfg.data_path:
            raise ValueError("--data-path is required (directory with <split>.lmdb files)")
        return cls(cfg)

    def check_split(self, split: str, records: LMDBDataset) -> None:
        """Record the split's data facts, or refuse a split built differently from the first
        one loaded (or from the checkpoint's training data); see :mod:`transformer_m.data_facts`.
        """
        facts = split_facts(records.meta, self.cfg.multi_hop_max_dist)
        where = f"split {split!r} ({records.path})"
        if self.data_facts is None:
            self.data_facts, self.facts_from = facts, where
        else:
            check_facts(self.data_facts, facts, expected_from=self.facts_from, found_from=where,
                        allow=self.cfg.allow_data_mismatch)
        if split == "train":
            stats = records.meta.get("stats") or {}
            self._train_has_3d = bool(stats.get("with_pos")) and self.uses_positions

    @property
    def uses_positions(self) -> bool:
        """Whether the collator passes stored positions to the model."""
        return self.cfg.dataset_name != "PCQM4M-LSC-V2" and not self.cfg.no_3d_input

    def load_dataset(self, split, combine=False, **kwargs):
        records = require_records(LMDBDataset(split_path(self.cfg.data_path, split)), split)
        self.check_split(split, records)
        meta = records.meta
        stored_hops = int(meta.get("max_hops", self.cfg.multi_hop_max_dist))
        if 0 < stored_hops < self.cfg.multi_hop_max_dist:
            logger.warning(
                "%s stores %d path hops but --multi-hop-max-dist is %d: the extra hops are padding",
                records.path, stored_hops, self.cfg.multi_hop_max_dist,
            )
        logger.info(
            "%s: %d molecules, path convention %s, source %s",
            split, len(records), meta.get("path_convention"), meta.get("source", {}).get("source"),
        )
        collator = Collator(
            max_hops=self.cfg.multi_hop_max_dist,
            pad_multiple=self.cfg.pad_to_multiple,
            with_pos=self.uses_positions,
        )
        is_train = split == "train"
        if is_train and self.cfg.dataset_name == "PCQM4M-LSC-V2-TOY":
            records = _Head(records, TOY_TRAIN_SIZE)
        graphs = GraphDataset(
            records, collator, shuffle=is_train, seed=self.cfg.seed, max_atoms=self.cfg.max_nodes
        )
        self.datasets[split] = GraphPredictionDataset(graphs, self.cfg.pack_multiple)

    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        self._model_channels = {
            "add_3d": bool(getattr(cfg, "add_3d", False)),
            "no_2d": bool(getattr(cfg, "no_2d", False)),
            "mode_prob": getattr(cfg, "mode_prob", None),
            "mode_masking": self.mode_masking,
        }
        return model

    @property
    def mode_masking(self) -> bool:
        """Whether the model draws a 2D/3D/2D+3D mode per molecule in training."""
        return True

    def trained_channels(self) -> Optional[dict]:
        """The input channels the model was trained with (``None`` before a model exists)."""
        if self.channels is not None:
            return self.channels
        if self._model_channels is None:
            return None
        mc = self._model_channels
        probs = parse_mode_prob(mc["mode_prob"]) if mc["mode_prob"] else None
        return trained_channels(add_3d=mc["add_3d"], no_2d=mc["no_2d"], mode_prob=probs,
                                mode_masking=mc["mode_masking"],
                                train_has_3d=self._train_has_3d)

    def state_dict(self):
        """Saved in every checkpoint (``task_state``): the data facts and channels."""
        state = dict(super().state_dict())
        if self.data_facts is not None:
            state["data"] = dict(self.data_facts, channels=self.trained_channels())
        return state

    def load_state_dict(self, state_dict):
        """Read back the training data's facts (``fairseq-validate``, predict)."""
        super().load_state_dict({k: v for k, v in (state_dict or {}).items() if k != "data"})
        data = (state_dict or {}).get("data")
        if data:
            data = dict(data)
            self.channels = data.pop("channels", None)
            self.data_facts = data
            self.facts_from = "the checkpoint's training data"

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        """fairseq's training step, less its ``model.train()`` walk over every module when the
        model already is in training mode (``Trainer.train_step`` has just set it)."""
        if not model.training:
            model.train()
        model.set_num_updates(update_num)
        with torch.autograd.profiler.record_function("forward"):
            loss, sample_size, logging_output = criterion(model, sample)
        if ignore_grad:
            loss *= 0
        with torch.autograd.profiler.record_function("backward"):
            optimizer.backward(loss)
        return loss, sample_size, logging_output

    def max_positions(self):
        return self.cfg.max_nodes

    @property
    def source_dictionary(self):
        return None

    @property
    def target_dictionary(self):
        return None


class _Head:
    """The first ``n`` records of a dataset (sizes sliced accordingly)."""

    def __init__(self, dataset, n: int):
        self.dataset = dataset
        self.n = min(n, len(dataset))
        self.sizes = np.asarray(dataset.sizes)[: self.n]
        self.meta = dataset.meta

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        if not 0 <= index < self.n:
            raise IndexError(index)
        return self.dataset[index]
