"""Criterion ``graph_prediction``: HOMO-LUMO gap L1 plus 3D noise-direction denoising (spec §1.11-1.12)."""

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from fairseq import metrics
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import FairseqDataclass

from graphormer_ext.data import keys
from transformer_m.criterions.lazy_metrics import log_scalar, sum_logs


@dataclass
class GraphPredictionCriterionConfig(FairseqDataclass):
    noise_scale: float = field(
        default=0.01,
        metadata={
            "help": "std (Å) of the Gaussian noise added to every 3D coordinate during training; "
            "atoms at exactly (0,0,0) (padding, molecules without 3D) get none. "
            "Transformer-M pre-training uses 0.2"
        },
    )
    denoise_weight: float = field(
        default=1.0, metadata={"help": "weight of the cosine noise-direction loss"}
    )


def add_position_noise(
    pos: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gaussian noise on the atoms that have 3D coordinates.

    Args:
        pos: ``[B, N, 3]`` coordinates in Å; all-zero rows mean "no 3D / padding".
        scale: noise standard deviation in Å.

    Returns:
        ``(noisy_pos, noise, has_3d)``: ``[B, N, 3]``, ``[B, N, 3]`` (0 on atoms without 3D)
        and bool ``[B, N]``.
    """
    has_3d = (pos != 0).any(dim=-1)  # [B, N]
    noise = torch.randn_like(pos).mul_(has_3d.unsqueeze(-1).to(pos.dtype) * scale)
    return pos + noise, noise, has_3d


def denoise_cosine_loss(
    pred: torch.Tensor, noise: torch.Tensor, atom_ok: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Sum over molecules of the per-molecule mean of ``1 - cos(pred, noise)``.

    Atoms count only where the noise is non-zero (atom has 3D; ``atom_ok`` [B, N] if known)
    and the molecule's prediction is not all zero (the model zeroes molecules that are not in
    3D-only mode).

    Shapes:
        pred, noise: ``[B, N, 3]``. Returns a scalar.
    """
    pred = pred.float()
    if atom_ok is None:
        atom_ok = (noise != 0).any(-1)  # [B, N]
    mol_ok = (pred != 0).flatten(1).any(-1, keepdim=True)  # [B, 1]
    mask = atom_ok & mol_ok
    cos = F.cosine_similarity(pred, noise.float(), dim=-1, eps=1e-6)  # [B, N]
    per_atom = (1.0 - cos) * mask
    count = mask.sum(-1).clamp(min=1)
    return (per_atom.sum(-1) / count).sum()


@register_criterion("graph_prediction", dataclass=GraphPredictionCriterionConfig)
class GraphPredictionCriterion(FairseqCriterion):
    """L1 on the graph-token prediction (eV, summed) + ``denoise_weight`` x cosine denoising loss.

    Reads ``sample["net_input"]["batched_data"]`` (collated batch, see ``graphormer_ext.data.keys``)
    and ``sample["target"]`` ``[B]``. Molecules with a NaN target (hidden test labels) are left out
    of the loss and of ``sample_size``. The logged ``loss`` is the MAE in eV over labelled molecules.

    In training nothing is read back from the device: ``sample_size`` comes from the host-side
    count ``sample["nlabelled"]`` of the task's collater, unlabelled molecules are masked rather
    than selected, and the logged values stay tensors (fairseq averages them lazily and reads them
    only when it prints a log line).
    """

    def __init__(self, task, noise_scale: float = 0.01, denoise_weight: float = 1.0):
        super().__init__(task)
        self.noise_scale = noise_scale
        self.denoise_weight = denoise_weight

    def forward(self, model, sample, reduce=True):
        batch = dict(sample["net_input"]["batched_data"])
        noise = has_3d = None
        if model.training and self.noise_scale > 0 and keys.POS in batch:
            batch[keys.POS], noise, has_3d = add_position_noise(batch[keys.POS], self.noise_scale)
        logits, atom_output, _ = model(batch)
        pred = logits[:, 0, :].float()  # [B, C] graph token
        target = sample["target"].float().view(pred.shape[0], -1)  # [B, C]
        check_label_width(target.shape[1], pred.shape[1])
        labelled = sample.get("labelled")  # the task's collater: bool [B], made on the host
        if labelled is None:
            labelled = torch.isfinite(target).all(-1)
        labelled = labelled.view(-1, 1)  # [B, 1]
        # Unlabelled rows get target = prediction: |0| adds nothing and, unlike a NaN
        # masked afterwards, back-propagates a zero gradient.
        target = torch.where(labelled, target, pred.detach())
        l1 = (pred - target).abs().sum()
        n_labelled = sample.get("nlabelled")
        if n_labelled is None:  # a batch not made by the task's collater
            n_labelled = int(labelled.sum())

        denoise = pred.new_zeros(())
        if noise is not None and atom_output is not None and self.denoise_weight > 0:
            denoise = denoise_cosine_loss(atom_output, noise, has_3d)
        loss = l1 + self.denoise_weight * denoise

        logging_output = {
            "loss": _loggable(l1, model.training),
            "denoise_loss": _loggable(denoise, model.training),
            "sample_size": n_labelled,
            "nsentences": pred.shape[0],
            "ntokens": pred.shape[0],
        }
        return loss, max(n_labelled, 1), logging_output

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        sample_size = sum(log.get("sample_size", 0) for log in logging_outputs)
        nsent = sum(log.get("nsentences", 0) for log in logging_outputs)
        l1 = sum_logs(logging_outputs, "loss")
        dn = sum_logs(logging_outputs, "denoise_loss")
        # in training updates tensors stay on the device (lazy_metrics)
        log_scalar("loss", l1 / max(sample_size, 1), sample_size, round=5)
        # the same value: derived when printed, not one more meter to update every step
        metrics.log_derived("mae_ev", _mae_ev)
        log_scalar("denoise_loss", dn / max(nsent, 1), nsent, round=4)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True


def check_label_width(stored: int, predicted: int) -> None:
    """Refuse a batch whose molecules carry a different number of labels than the model
    predicts (``[B, k]`` against ``[B, C]`` would broadcast into a wrong loss)."""
    if stored != predicted:
        raise ValueError(
            f"the data stores {stored} label value(s) per molecule but the model predicts "
            f"{predicted}: pass --num-classes {stored} --remove-head to regress all stored "
            "labels, or re-run graphormer-ext-preprocess with only the label "
            "column(s) to train on (--label-columns)"
        )


def _mae_ev(meters):
    """``mae_ev``: the ``loss`` average (the L1 in eV per labelled molecule); rounded when it is
    a float, left on the device when it is a tensor (training updates, see lazy_metrics)."""
    value = meters["loss"].avg
    return value if torch.is_tensor(value) else round(float(value), 5)


def _loggable(value: torch.Tensor, training: bool):
    """A logged value: the detached tensor in training (no host read), a float otherwise."""
    return value.detach() if training else float(value)
