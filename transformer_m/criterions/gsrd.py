"""3D-GSRD criteria: ``gsrd_pretrain`` (§B8), ``gsrd_energy_force`` (MD17, §B11), ``gsrd_qm9`` (§B10)."""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import FairseqDataclass

from transformer_m.criterions.lazy_metrics import log_scalar, loggable, sum_logs
from transformer_m.modules.gsrd import vector_norm_regulariser
from transformer_m.tasks.gsrd import NOISE, POS_LABEL


def _sum_logs(logs, key):
    return sum_logs(logs, key)  # tensors stay on the device (lazy_metrics)


# ---------------------------------------------------------------------------------------------
@dataclass
class GsrdPretrainCriterionConfig(FairseqDataclass):
    distill_weight: float = field(default=1.0, metadata={"help": "weight of the 2D<-3D cosine distillation"})
    denoising_weight: float = field(default=0.1, metadata={"help": "weight of the noise prediction MSE"})
    vec_reg_weight: float = field(default=0.01, metadata={"help": "weight of mean ReLU(||v|| - delta)"})
    vec_reg_delta: float = field(default=1000.0, metadata={"help": "vector-norm threshold delta"})


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``values[mask].mean()`` for ``values, mask [B, N]``, without the boolean-mask index
    (it waits for the device to learn the size of its result)."""
    return torch.where(mask, values, 0.0).sum() / mask.sum()


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``F.mse_loss(pred[mask], target[mask])`` for ``pred, target [B, N, C]``, ``mask [B, N]``,
    without the boolean-mask index; rows left out may hold anything (their difference is
    replaced before it is squared, so no NaN reaches the gradient)."""
    diff = torch.where(mask.unsqueeze(-1), pred - target, 0.0)
    return (diff * diff).sum() / (mask.sum() * pred.shape[-1])


def pretrain_losses(out, batch, train_2d_head: bool = False, delta: float = 1000.0) -> dict:
    """The four pre-training terms (unweighted), each a scalar tensor.

    * ``mask``: MSE of the predicted vs. clean coordinates of the masked atoms (mean over M x 3);
    * ``distill``: ``-mean cos(rep_2d, stopgrad(h_3d))`` over the visible atoms;
    * ``denoise``: MSE of the predicted vs. the unit-variance noise on the visible atoms;
    * ``vec``: mean ReLU(||v_enc|| - delta) over visible atoms x 3.
    """
    masked, visible = out["masked"], out["visible"]
    mask_loss = masked_mse(out["coord"], batch[POS_LABEL], masked)
    target = out["h"].detach()
    distill = -masked_mean(F.cosine_similarity(out["rep_2d"], target, dim=-1), visible)
    if train_2d_head:
        distill = distill - masked_mean(F.cosine_similarity(out["h_2d"], target, dim=-1), visible)
    denoise = masked_mse(out["noise"], batch[NOISE], visible)
    vec = vector_norm_regulariser(out["v"], visible, delta)
    return {"mask": mask_loss, "distill": distill, "denoise": denoise, "vec": vec}


@register_criterion("gsrd_pretrain", dataclass=GsrdPretrainCriterionConfig)
class GsrdPretrainCriterion(FairseqCriterion):
    """``L_mask + 1.0 * L_distill + 0.1 * L_denoise + 0.01 * L_vec`` (spec §B8). Logged ``loss`` is
    the weighted total per batch; ``mask_mse`` is the published "test_MAE" (an MSE in Å^2)."""

    def __init__(self, task, distill_weight=1.0, denoising_weight=0.1, vec_reg_weight=0.01,
                 vec_reg_delta=1000.0):
        super().__init__(task)
        self.weights = {"mask": 1.0, "distill": distill_weight, "denoise": denoising_weight,
                        "vec": vec_reg_weight}
        self.delta = vec_reg_delta

    def forward(self, model, sample, reduce=True):
        batch = sample["net_input"]["batch"]
        out = model(batch)
        terms = pretrain_losses(out, batch, getattr(model, "train_2d_head", False), self.delta)
        loss = sum(self.weights[k] * v for k, v in terms.items())
        bsz = int(sample["nsamples"])
        log = {"loss": loss.detach() * bsz, "sample_size": bsz, "nsentences": bsz, "ntokens": bsz}
        for k, v in terms.items():
            log[f"{k}_loss"] = v.detach() * bsz
        # sample_size 1: the loss is already a batch mean
        return loss, 1, loggable(log, getattr(model, "training", True))

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        n = max(_sum_logs(logging_outputs, "nsentences"), 1)
        log_scalar("loss", _sum_logs(logging_outputs, "loss") / n, n, round=5)
        for k in ("mask", "distill", "denoise", "vec"):
            log_scalar(f"{k}_loss", _sum_logs(logging_outputs, f"{k}_loss") / n, n, round=5)
        log_scalar("mask_mse", _sum_logs(logging_outputs, "mask_loss") / n, n, round=5)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True


# ---------------------------------------------------------------------------------------------
@dataclass
class GsrdEnergyForceCriterionConfig(FairseqDataclass):
    energy_weight: float = field(default=0.2, metadata={"help": "weight of the energy L1"})
    force_weight: float = field(default=0.8, metadata={"help": "weight of the force L1"})
    ema_alpha_energy: float = field(
        default=0.05, metadata={"help": "energy L1 EMA: L <- a L + (1-a) stopgrad(prev); 1 = off"}
    )
    ema_alpha_force: float = field(default=1.0, metadata={"help": "force L1 EMA (published: 1 = off)"})
    vec_reg_weight: float = field(default=1e-4, metadata={"help": "weight of mean ReLU(||v|| - delta)"})
    vec_reg_delta: float = field(default=1000.0, metadata={"help": "vector-norm threshold delta"})


def energy_and_forces(model, batch):
    """``(E [B], F [B,N,3], out)`` with ``F = -dE/dR`` by autograd (graph kept for training)."""
    with torch.enable_grad():
        pos = batch["pos"].detach().clone().requires_grad_(True)
        out = model(batch, pos=pos)
        energy = out["pred"]
        (grad,) = torch.autograd.grad(energy.sum(), pos, create_graph=model.training)
    forces = -grad * batch["atom_mask"].unsqueeze(-1).to(grad.dtype)
    return energy, forces, out


@register_criterion("gsrd_energy_force", dataclass=GsrdEnergyForceCriterionConfig)
class GsrdEnergyForceCriterion(FairseqCriterion):
    """MD17: ``0.2 * EMA_0.05(L1_E) + 0.8 * L1_F + 1e-4 * L_vec`` (spec §B11), forces by autograd.

    The EMA keeps the published gradient scale: the energy term's gradient is multiplied by
    ``ema_alpha_energy`` (it is applied in training only; the state is not checkpointed). Logged:
    ``energy_mae`` (kcal/mol) and ``force_mae`` (kcal/mol/Å, mean over atoms and components).
    """

    def __init__(self, task, energy_weight=0.2, force_weight=0.8, ema_alpha_energy=0.05,
                 ema_alpha_force=1.0, vec_reg_weight=1e-4, vec_reg_delta=1000.0):
        super().__init__(task)
        self.energy_weight, self.force_weight = energy_weight, force_weight
        self.alpha_e, self.alpha_f = ema_alpha_energy, ema_alpha_force
        self.vec_reg_weight, self.delta = vec_reg_weight, vec_reg_delta
        self._ema = {}

    def _smooth(self, name, value, alpha):
        if alpha >= 1.0:
            return value
        prev = self._ema.get(name)
        smoothed = value if prev is None else alpha * value + (1.0 - alpha) * prev
        self._ema[name] = smoothed.detach()
        return smoothed

    def forward(self, model, sample, reduce=True):
        batch = sample["net_input"]["batch"]
        energy, forces, out = energy_and_forces(model, batch)
        mask = batch["atom_mask"]
        e_l1 = (energy - batch["y"]).abs().mean()
        natoms = sample.get("natoms")  # the task's collater counts them on the host
        if natoms is None:
            natoms = int(mask.sum())
        f_sum = torch.where(mask.unsqueeze(-1), forces - batch["forces"], 0.0).abs().sum()
        f_l1 = f_sum / (3 * natoms)
        e_term, f_term = e_l1, f_l1
        if model.training:
            e_term = self._smooth("energy", e_l1, self.alpha_e)
            f_term = self._smooth("force", f_l1, self.alpha_f)
        vec = vector_norm_regulariser(out["v"], mask, self.delta)
        loss = self.energy_weight * e_term + self.force_weight * f_term + self.vec_reg_weight * vec
        bsz = int(sample["nsamples"])
        log = {
            "loss": loss.detach() * bsz, "energy_abs": (energy - batch["y"]).abs().sum().detach(),
            "force_abs": f_sum.detach(), "force_count": 3 * natoms,
            "sample_size": bsz, "nsentences": bsz, "ntokens": natoms,
        }
        return loss, 1, loggable(log, getattr(model, "training", True))

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        n = max(_sum_logs(logging_outputs, "nsentences"), 1)
        nf = max(_sum_logs(logging_outputs, "force_count"), 1)
        log_scalar("loss", _sum_logs(logging_outputs, "loss") / n, n, round=5)
        log_scalar("energy_mae", _sum_logs(logging_outputs, "energy_abs") / n, n, round=5)
        log_scalar("force_mae", _sum_logs(logging_outputs, "force_abs") / nf, nf, round=5)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True


# ---------------------------------------------------------------------------------------------
@dataclass
class GsrdQM9CriterionConfig(FairseqDataclass):
    vec_reg_weight: float = field(default=1e-4, metadata={"help": "weight of mean ReLU(||v|| - delta)"})
    vec_reg_delta: float = field(default=1000.0, metadata={"help": "vector-norm threshold delta"})


@register_criterion("gsrd_qm9", dataclass=GsrdQM9CriterionConfig)
class GsrdQM9Criterion(FairseqCriterion):
    """QM9: MSE on the standardised target (or raw, per §B10) + 1e-4 L_vec; logs ``mae`` in
    dataset units (de-standardised)."""

    def __init__(self, task, vec_reg_weight=1e-4, vec_reg_delta=1000.0):
        super().__init__(task)
        self.vec_reg_weight, self.delta = vec_reg_weight, vec_reg_delta

    def forward(self, model, sample, reduce=True):
        batch = sample["net_input"]["batch"]
        out = model(batch)
        y = batch["y"].float().view(-1)
        ok = sample.get("labelled")  # host-made by the task's collater: no read-back
        ok = torch.isfinite(y) if ok is None else ok.view(-1)
        bsz = sample.get("nlabelled")
        if bsz is None:
            bsz = int(ok.sum())
        std, mean = model.target_std, model.target_mean
        # unlabelled rows: zero error and zero gradient (torch.where: NaN * 0 would be NaN);
        # no labelled row: a zero loss
        err = torch.where(ok, out["pred_std"] - (y - mean) / std, 0.0)
        mse = (err * err).sum() / max(bsz, 1)
        loss = mse + self.vec_reg_weight * vector_norm_regulariser(out["v"], out["mask"], self.delta)
        abs_err = torch.where(ok, out["pred"] - y, 0.0).abs().sum().detach()
        log = {"loss": loss.detach() * max(bsz, 1), "abs": abs_err,
               "sample_size": bsz, "nsentences": int(y.numel()), "ntokens": int(y.numel())}
        return loss, 1, loggable(log, getattr(model, "training", True))

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        n = max(_sum_logs(logging_outputs, "sample_size"), 1)
        log_scalar("loss", _sum_logs(logging_outputs, "loss") / n, n, round=6)
        log_scalar("mae", _sum_logs(logging_outputs, "abs") / n, n, round=6)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True


__all__ = ["GsrdPretrainCriterion", "GsrdEnergyForceCriterion", "GsrdQM9Criterion"]
