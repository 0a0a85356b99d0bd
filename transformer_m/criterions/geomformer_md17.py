"""Criteria ``geomformer_md17`` (energy + forces), ``geomformer_graph_prediction`` (gap L1) and
``geomformer_nbody`` (position MSE)."""

from dataclasses import dataclass, field

import torch
from fairseq import metrics
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import ChoiceEnum, FairseqDataclass

from graphormer_ext.data import keys
from transformer_m.criterions.lazy_metrics import log_scalar, loggable, sum_logs


def _num_atoms(sample, batch) -> int:
    """Real atoms of the batch: the host count of the task's collater, else read back."""
    n = sample.get("natoms")
    return int(batch[keys.ATOM_MASK].sum().item()) if n is None else n


def _labelled(sample, target: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(ok [B] bool, count)``: the molecules with a finite target, with the host-made mask and
    count of the task's collater when there (no read-back), else computed here."""
    ok = sample.get("labelled")
    ok = torch.isfinite(target) if ok is None else ok.view(-1)
    n = sample.get("nlabelled")
    return ok, int(ok.sum()) if n is None else n


def _err(diff: torch.Tensor, kind: str) -> torch.Tensor:
    return diff.abs() if kind == "l1" else diff * diff


@dataclass
class GeoMFormerMD17CriterionConfig(FairseqDataclass):
    energy_weight: float = field(default=0.2, metadata={"help": "weight of the energy loss"})
    force_weight: float = field(default=0.8, metadata={"help": "weight of the force loss"})
    loss_type: ChoiceEnum(["l1", "mse"]) = field(
        default="l1", metadata={"help": "per-component error of both terms"}
    )


@register_criterion("geomformer_md17", dataclass=GeoMFormerMD17CriterionConfig)
class GeoMFormerMD17Criterion(FairseqCriterion):
    """``w_E * err((E_pred - E)/std) + w_F * mean_atoms,xyz err((F_pred - F)/std)`` per structure,
    summed over the batch (``sample_size`` = structures).

    ``E_pred = std * energy + mean`` and ``F_pred = std * forces`` from the model dict (forces from
    ``-dE/dR`` or the equivariant head, see the model's ``--force-mode``). Logs ``energy_mae``
    (kcal/mol) and ``force_mae`` (kcal/mol/Å, per component over real atoms).
    """

    def __init__(self, task, energy_weight=0.2, force_weight=0.8, loss_type="l1"):
        super().__init__(task)
        self.energy_weight = energy_weight
        self.force_weight = force_weight
        self.loss_type = str(loss_type)

    def forward(self, model, sample, reduce=True):
        batch = sample["net_input"]["batched_data"]
        mean = float(getattr(self.task, "energy_mean", 0.0))
        std = float(getattr(self.task, "energy_std", 1.0))
        use_forces = self.force_weight > 0 and keys.FORCES in batch
        out = model(batch, force_mode=None if use_forces else "none")
        energy = out["energy"].float()  # normalised
        target = batch[keys.Y].float().view(-1)
        e_err = _err(energy - (target - mean) / std, self.loss_type)  # [B]
        loss = self.energy_weight * e_err.sum()
        e_abs = ((energy * std + mean) - target).abs().sum().detach()
        log = {"energy_abs": e_abs, "nsentences": target.numel(), "sample_size": target.numel()}
        if use_forces:
            mask = batch[keys.ATOM_MASK].unsqueeze(-1).float()  # [B, N, 1]
            f_pred = out["forces"].float()  # normalised units
            f_diff = (f_pred - batch[keys.FORCES].float() / std) * mask
            per_struct = _err(f_diff, self.loss_type).sum((1, 2)) / (3 * mask.sum((1, 2)))
            loss = loss + self.force_weight * per_struct.sum()
            log["force_abs"] = (f_diff.abs().sum() * std).detach()
            log["force_count"] = 3 * _num_atoms(sample, batch)
        log["loss"] = loss.detach()
        log["ntokens"] = _num_atoms(sample, batch)
        return loss, target.numel(), loggable(log, getattr(model, "training", True))

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        n = sum(log.get("sample_size", 0) for log in logging_outputs)
        loss = sum_logs(logging_outputs, "loss")
        e_abs = sum_logs(logging_outputs, "energy_abs")
        f_abs = sum_logs(logging_outputs, "force_abs")
        f_cnt = sum(log.get("force_count", 0) for log in logging_outputs)
        log_scalar("loss", loss / max(n, 1), n, round=5)
        log_scalar("energy_mae", e_abs / max(n, 1), n, round=5)
        if f_cnt:
            log_scalar("force_mae", f_abs / f_cnt, f_cnt, round=5)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True


@dataclass
class GeoMFormerGraphCriterionConfig(FairseqDataclass):
    pass


@register_criterion("geomformer_graph_prediction", dataclass=GeoMFormerGraphCriterionConfig)
class GeoMFormerGraphCriterion(FairseqCriterion):
    """L1 on the (normalised) invariant readout; logs ``mae`` in target units (eV for the gap).
    Molecules with a NaN target are left out."""

    def forward(self, model, sample, reduce=True):
        batch = sample["net_input"]["batched_data"]
        mean = float(getattr(self.task, "energy_mean", 0.0))
        std = float(getattr(self.task, "energy_std", 1.0))
        out = model(batch, force_mode="none")
        pred = out["energy"].float()
        target = batch[keys.Y].float().view(-1)
        ok, n = _labelled(sample, target)
        # unlabelled rows: a zero difference (torch.where: NaN * 0 would be NaN) and a zero
        # gradient, without a boolean-mask index (it waits for the device)
        loss = torch.where(ok, pred - (target - mean) / std, 0.0).abs().sum()
        mae = torch.where(ok, (pred * std + mean) - target, 0.0).abs().sum().detach()
        log = {"loss": loss.detach(), "mae": mae, "sample_size": n,
               "nsentences": target.numel(), "ntokens": target.numel()}
        return loss, max(n, 1), loggable(log, getattr(model, "training", True))

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        n = sum(log.get("sample_size", 0) for log in logging_outputs)
        loss = sum_logs(logging_outputs, "loss")
        mae = sum_logs(logging_outputs, "mae")
        log_scalar("loss", loss / max(n, 1), n, round=5)
        log_scalar("mae", mae / max(n, 1), n, round=5)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True


@dataclass
class GeoMFormerNBodyCriterionConfig(FairseqDataclass):
    pass


@register_criterion("geomformer_nbody", dataclass=GeoMFormerNBodyCriterionConfig)
class GeoMFormerNBodyCriterion(FairseqCriterion):
    """MSE between predicted and true positions after 1,000 steps, averaged over particles and
    coordinates (the EGNN metric); loss = sum over systems of the per-system MSE."""

    def forward(self, model, sample, reduce=True):
        batch = sample["net_input"]["batched_data"]
        out = model(batch, force_mode="none")
        if "pos_pred" not in out:
            raise RuntimeError("the model gave no pos_pred: build it with --use-velocity")
        mask = batch[keys.ATOM_MASK].unsqueeze(-1).float()
        diff = (out["pos_pred"].float() - sample["target"].float()) * mask
        per_sys = (diff * diff).sum((1, 2)) / (3 * mask.sum((1, 2)))
        loss = per_sys.sum()
        b = per_sys.numel()
        log = {"loss": loss.detach(), "sample_size": b, "nsentences": b,
               "ntokens": _num_atoms(sample, batch)}
        return loss, b, log

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        n = sum(log.get("sample_size", 0) for log in logging_outputs)
        loss = sum(float(log.get("loss", 0)) for log in logging_outputs)
        metrics.log_scalar("loss", loss / max(n, 1), n, round=6)
        metrics.log_scalar("mse", loss / max(n, 1), n, round=6)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
