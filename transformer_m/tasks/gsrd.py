"""3D-GSRD tasks: ``gsrd_pretrain`` (PCQM4Mv2-layout LMDB, 3D train molecules), ``gsrd_md17``
(energy + forces, MD17-format LMDB) and ``gsrd_qm9`` (one QM9 target).

Data (spec ``gsrd.md`` §B2): records of the shared LMDB layer (graph records with ``x`` /
``attn_edge_type`` or point-cloud records with ``z``), GSRD 2D features computed on the fly
(:mod:`graphormer_ext.featurize.gsrd_features`). Per item: mean-centring, in training a
uniform random rotation (positions, labels and forces rotate together; ``--no-rotation`` turns it
off), and for pre-training the masking (``max(1, floor(N * ratio + 1))`` atoms, at least one atom
stays visible) and the noise ``0.04 * eps`` on visible atoms.

Randomness is keyed by ``(seed, epoch, index)`` in training. Evaluation is deterministic: no
rotation, and the pre-training masks and noise of a valid/test molecule are keyed by its index
only, so ``fairseq-validate`` gives the same numbers for every ``--seed`` and every run. The
published collaters also rotate valid/test molecules at random, which makes the published
(non-``--physical``) model's test error depend on the draw; ``--eval-rotation`` restores that
augmentation as a fixed rotation per molecule (still independent of ``--seed``).
"""

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

from graphormer_ext.data import keys as K
from graphormer_ext.data.base import EpochDataset
from graphormer_ext.data.collator_3d import atomic_numbers
from graphormer_ext.data.lmdb_dataset import LMDBDataset
from graphormer_ext.featurize.gsrd_features import GsrdFeaturizer
from transformer_m.tasks.graph_prediction import require_records

logger = logging.getLogger(__name__)

# QM9 task names of the published code -> PyG target index (spec §B2.3) and standardisation (§B10)
QM9_TASKS = {
    "dipole_moment": 0, "isotropic_polarizability": 1, "homo": 2, "lumo": 3, "gap": 4,
    "electronic_spatial_extent": 5, "zpve": 6, "heat_capacity": 11, "energy_U0": 12,
    "energy_U": 13, "enthalpy_H": 14, "free_energy": 15,
}
QM9_STANDARDIZE = {"isotropic_polarizability", "homo", "lumo", "gap", "zpve", "heat_capacity"}

# batch keys of this module (in addition to keys.IDX, Z, POS, Y, FORCES, ATOM_MASK)
ATOM_FEAT = "gsrd_atom_feat"  # float32 [B, N, 60]
BOND = "gsrd_bond"  # int64 [B, N, N], 0 none, 1..4 bond types
POS_MASK = "gsrd_pos_mask"  # bool [B, N], masked (re-masked) atoms
POS_LABEL = "gsrd_pos_label"  # float32 [B, N, 3], clean centred coordinates
NOISE = "gsrd_noise"  # float32 [B, N, 3], unit-variance noise eps (0 on masked atoms)
EVAL_SEED = 0  # evaluation randomness (pre-training masks, --eval-rotation): not the run's --seed


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniform random rotation matrix (Haar, det +1)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def num_masked(n: int, ratio: float) -> int:
    """Published count ``max(1, int(n * ratio + 1))``, capped so that one atom stays visible."""
    return int(min(max(1, int(n * ratio + 1)), max(n - 1, 1)))


class GsrdDataset(EpochDataset, FairseqDataset):
    """Records -> GSRD items -> padded batches (``sample["net_input"]["batch"]``)."""

    def __init__(self, records, *, pretrain: bool, train: bool, seed: int = 1,
                 mask_ratio: float = 0.25, noise_scale: float = 0.04, rotate: bool = True,
                 eval_rotation: bool = False, indices: Optional[np.ndarray] = None,
                 target_index: Optional[int] = None, max_atoms: Optional[int] = None):
        super().__init__(shuffle=train, seed=seed)
        self.dataset = records
        self.pretrain = pretrain
        self.train = train
        self.mask_ratio = mask_ratio
        self.noise_scale = noise_scale
        # training: random rotation per (seed, epoch, index); evaluation: none, or one fixed
        # rotation per molecule with eval_rotation
        self.rotate = rotate if train else eval_rotation
        self.target_index = target_index
        self.featurizer = GsrdFeaturizer()
        all_sizes = np.asarray(records.sizes, dtype=np.int64)
        self.indices = np.arange(len(records)) if indices is None else np.asarray(indices)
        if max_atoms is not None:
            self.indices = self.indices[all_sizes[self.indices] <= max_atoms]
        self._sizes = all_sizes[self.indices]

    def __len__(self):
        return len(self.indices)

    @property
    def sizes(self):
        return self._sizes

    def item_rng(self, index: int) -> np.random.Generator:
        """Training: keyed by ``(seed, epoch, index)``; evaluation: by ``index`` only."""
        if self.train:
            return np.random.default_rng((self.seed, self.epoch, int(index)))
        return np.random.default_rng((EVAL_SEED, int(index)))

    def __getitem__(self, index):
        rec = self.dataset[int(self.indices[index])]
        if rec.get(K.POS) is None:
            raise ValueError(f"{self.dataset}: record {index} has no 3D positions")
        feat, bond = self.featurizer(rec)
        pos = np.asarray(rec[K.POS], dtype=np.float64)
        pos = pos - pos.mean(0, keepdims=True)
        n = pos.shape[0]
        rng = self.item_rng(index)
        forces = rec.get(K.FORCES)
        if self.rotate:
            rot = random_rotation(rng)
            pos = pos @ rot.T
            if forces is not None:
                forces = np.asarray(forces, dtype=np.float64) @ rot.T
        item = {K.IDX: int(index), "feat": feat, "bond": bond, K.POS: pos, "z": _z_of(rec)}
        y = rec.get(K.Y)
        if y is not None:
            y = np.asarray(y, dtype=np.float32).reshape(-1)
            if self.target_index is not None:
                y = y[self.target_index: self.target_index + 1]
        item[K.Y] = y
        if forces is not None:
            item[K.FORCES] = forces
        if self.pretrain:
            masked = np.zeros(n, dtype=bool)
            masked[rng.choice(n, num_masked(n, self.mask_ratio), replace=False)] = True
            eps = rng.standard_normal((n, 3)) * (~masked)[:, None]
            item["label"] = pos
            item[K.POS] = pos + self.noise_scale * eps
            item["noise"] = eps
            item["masked"] = masked
        return item

    def collater(self, samples):
        if not samples:
            return {}
        b = len(samples)
        n = max(s[K.POS].shape[0] for s in samples)
        out = {
            K.IDX: torch.tensor([s[K.IDX] for s in samples], dtype=torch.long),
            K.Z: torch.zeros(b, n, dtype=torch.long),
            K.POS: torch.zeros(b, n, 3),
            K.ATOM_MASK: torch.zeros(b, n, dtype=torch.bool),
            ATOM_FEAT: torch.zeros(b, n, 60),
            BOND: torch.zeros(b, n, n, dtype=torch.long),
        }
        has_y = all(s[K.Y] is not None for s in samples)
        if has_y:
            out[K.Y] = torch.from_numpy(np.stack([s[K.Y] for s in samples])).float().squeeze(-1)
        if all(K.FORCES in s for s in samples):
            out[K.FORCES] = torch.zeros(b, n, 3)
        if self.pretrain:
            out[POS_MASK] = torch.zeros(b, n, dtype=torch.bool)
            out[POS_LABEL] = torch.zeros(b, n, 3)
            out[NOISE] = torch.zeros(b, n, 3)
        for i, s in enumerate(samples):
            m = s[K.POS].shape[0]
            out[K.Z][i, :m] = torch.from_numpy(s["z"])
            out[K.POS][i, :m] = torch.from_numpy(s[K.POS]).float()
            out[K.ATOM_MASK][i, :m] = True
            out[ATOM_FEAT][i, :m] = torch.from_numpy(s["feat"]).float()
            out[BOND][i, :m, :m] = torch.from_numpy(s["bond"].astype(np.int64))
            if K.FORCES in out:
                out[K.FORCES][i, :m] = torch.from_numpy(np.array(s[K.FORCES], dtype=np.float32))
            if self.pretrain:
                out[POS_MASK][i, :m] = torch.from_numpy(s["masked"])
                out[POS_LABEL][i, :m] = torch.from_numpy(s["label"]).float()
                out[NOISE][i, :m] = torch.from_numpy(s["noise"]).float()
        sample = {
            "id": out[K.IDX],
            "nsamples": b,
            # counted here, on the host: the losses then read nothing back from the device
            "natoms": int(out[K.ATOM_MASK].sum()),
            "net_input": {"batch": out},
            "target": out.get(K.Y),
        }
        if has_y and out[K.Y].dim() == 1:  # one label per molecule: which ones are known
            labelled = torch.isfinite(out[K.Y])
            sample.update(labelled=labelled, nlabelled=int(labelled.sum()))
        return sample


def _z_of(rec) -> np.ndarray:
    return atomic_numbers(rec)


def _split_file(data_path: str, split: str) -> str:
    path = os.path.join(data_path, f"{split}.lmdb")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} does not exist; create the splits with `graphormer-ext-preprocess "
            "pcqm4mv2|md17|qm9 ... --out DIR` and pass DIR as --data-path"
        )
    return path


@dataclass
class GsrdBaseConfig(FairseqDataclass):
    data_path: str = field(default="", metadata={"help": "directory with <split>.lmdb files"})
    max_nodes: int = field(default=128, metadata={"help": "leave out molecules with more atoms"})
    no_rotation: bool = field(
        default=False,
        metadata={"help": "switch off the random rotation of training molecules (on in the published code)"},
    )
    eval_rotation: bool = field(
        default=False,
        metadata={"help": "rotate valid/test molecules too, as the published collaters do (at random "
                  "there); here one fixed rotation per molecule, the same for every --seed. Off: "
                  "evaluation sees the molecules as stored"},
    )
    reuse_dataloader: bool = field(
        default=False,
        metadata={"help": "keep the DataLoader (and its persistent workers) across epochs. Off: the "
                  "per-item rotation/masking/noise are keyed by the epoch, which persistent workers "
                  "would not see"},
    )
    seed: int = II("common.seed")


@dataclass
class GsrdPretrainConfig(GsrdBaseConfig):
    mask_ratio: float = field(default=0.25, metadata={"help": "fraction of atoms masked"})
    noise_scale: float = field(default=0.04, metadata={"help": "Å noise on visible atoms"})
    valid_from_train: int = field(
        default=100,
        metadata={"help": "when the valid split has no 3D (PCQM4Mv2), hold out the last N "
                  "3D train molecules as the valid split (published: 100)"},
    )
    train_limit: int = field(default=0, metadata={"help": "use only the first N train molecules (0 = all)"})


class _GsrdTaskBase(FairseqTask):
    pretrain = False

    def __init__(self, cfg):
        super().__init__(cfg)

    @classmethod
    def setup_task(cls, cfg, **kwargs):
        if not cfg.data_path:
            raise ValueError("--data-path is required (directory with <split>.lmdb files)")
        return cls(cfg)

    def _make(self, records, split, indices=None, target_index=None):
        is_train = split == "train"
        ds = GsrdDataset(
            records, pretrain=self.pretrain, train=is_train, seed=self.cfg.seed,
            mask_ratio=getattr(self.cfg, "mask_ratio", 0.25),
            noise_scale=getattr(self.cfg, "noise_scale", 0.04),
            rotate=not self.cfg.no_rotation, eval_rotation=self.cfg.eval_rotation,
            indices=indices, target_index=target_index, max_atoms=self.cfg.max_nodes,
        )
        logger.info("%s: %d molecules (%s)", split, len(ds), records.path)
        self.datasets[split] = ds
        return ds

    def build_model(self, cfg, from_checkpoint=False):
        # the model skips --pretrained-encoder when the weights come from a checkpoint anyway
        self.building_from_checkpoint = from_checkpoint
        try:
            return super().build_model(cfg, from_checkpoint)
        finally:
            self.building_from_checkpoint = False

    def max_positions(self):
        return self.cfg.max_nodes

    @property
    def source_dictionary(self):
        return None

    @property
    def target_dictionary(self):
        return None


@register_task("gsrd_pretrain", dataclass=GsrdPretrainConfig)
class GsrdPretrainTask(_GsrdTaskBase):
    """Masked 3D graph auto-encoding pre-training (spec §B8) on 3D molecules."""

    pretrain = True

    def load_dataset(self, split, combine=False, **kwargs):
        train_path = _split_file(self.cfg.data_path, "train")
        path = os.path.join(self.cfg.data_path, f"{split}.lmdb")
        records = LMDBDataset(path) if os.path.isfile(path) else None
        has_3d = records is not None and len(records) > 0 and records[0].get(K.POS) is not None
        hold = self.cfg.valid_from_train
        if split == "train" or (not has_3d and hold > 0):
            train = LMDBDataset(train_path)
            n = len(train) if self.cfg.train_limit <= 0 else min(len(train), self.cfg.train_limit)
            hold = min(hold, max(n - 1, 0))
            if split == "train":
                idx = np.arange(n - hold) if hold > 0 and not _has_3d_split(self.cfg.data_path, "valid") else np.arange(n)
            else:
                idx = np.arange(n - hold, n)
                logger.info("%s has no 3D positions: using the last %d train molecules", split, hold)
            return self._make(train, split, indices=idx)
        if records is None:
            _split_file(self.cfg.data_path, split)
        return self._make(records, split)


def _has_3d_split(data_path, split) -> bool:
    path = os.path.join(data_path, f"{split}.lmdb")
    if not os.path.isfile(path):
        return False
    r = LMDBDataset(path)
    return len(r) > 0 and r[0].get(K.POS) is not None


@dataclass
class GsrdMD17Config(GsrdBaseConfig):
    train_limit: int = field(default=0, metadata={"help": "use only the first N train frames (0 = all)"})


def _target_stats(records, target_index=None, limit: int = 200000):
    ys = []
    for i in range(min(len(records), limit)):
        y = records[i].get(K.Y)
        if y is not None:
            y = np.asarray(y, dtype=np.float64).reshape(-1)
            ys.append(y[target_index] if target_index is not None else y[0])
    if not ys:
        return 0.0, 1.0
    ys = np.asarray(ys)
    std = float(ys.std())
    return float(ys.mean()), std if std > 0 else 1.0


@register_task("gsrd_md17", dataclass=GsrdMD17Config)
class GsrdMD17Task(_GsrdTaskBase):
    """MD17 energy + forces (spec §B11) on an MD17-format LMDB (``graphormer-ext-preprocess md17``).

    Energy standardisation ``E = pred * std + mean`` uses train-split statistics, computed at
    ``build_model`` and stored in the model's buffers (so they travel with the checkpoint).
    """

    def load_dataset(self, split, combine=False, **kwargs):
        records = require_records(LMDBDataset(_split_file(self.cfg.data_path, split)), split)
        idx = None
        if split == "train" and self.cfg.train_limit > 0:
            idx = np.arange(min(len(records), self.cfg.train_limit))
        return self._make(records, split, indices=idx)

    def target_statistics(self):
        path = os.path.join(self.cfg.data_path, "train.lmdb")
        if not os.path.isfile(path):
            return None
        return _target_stats(LMDBDataset(path))

    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        stats = self.target_statistics()
        if stats is not None and hasattr(model, "set_target_statistics"):
            model.set_target_statistics(*stats)
        return model


@dataclass
class GsrdQM9Config(GsrdBaseConfig):
    target: ChoiceEnum(list(QM9_TASKS)) = field(
        default="homo", metadata={"help": "QM9 target (published task names, PyG order and units)"}
    )


@register_task("gsrd_qm9", dataclass=GsrdQM9Config)
class GsrdQM9Task(_GsrdTaskBase):
    """QM9 single-target regression (spec §B10); records carry all 19 PyG-ordered targets."""

    @property
    def target_index(self) -> int:
        return QM9_TASKS[self.cfg.target]

    @property
    def standardize(self) -> bool:
        return self.cfg.target in QM9_STANDARDIZE

    def load_dataset(self, split, combine=False, **kwargs):
        records = require_records(LMDBDataset(_split_file(self.cfg.data_path, split)), split)
        return self._make(records, split, target_index=self.target_index)

    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        path = os.path.join(self.cfg.data_path, "train.lmdb")
        if self.standardize and os.path.isfile(path) and hasattr(model, "set_target_statistics"):
            model.set_target_statistics(*_target_stats(LMDBDataset(path), self.target_index))
        return model
