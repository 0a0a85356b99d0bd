"""Criterion ``affinity_regression``: PDBbind -logKd/Ki fine-tuning with R, MAE, RMSE, SD.

Used with the task ``graph_prediction`` on LMDB splits written by
``graphormer-ext-preprocess pdbbind`` (ligand + pocket graphs, spec ``transformer_m.md``
§5.2). The loss is computed on standardized targets; the metrics on the original scale.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from fairseq import metrics
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import ChoiceEnum, FairseqDataclass

from graphormer_ext.metrics import METRIC_NAMES, SUM_KEYS, metrics_from_sums

_SUM_PREFIX = "_aff_"  # fairseq hides "_"-prefixed meters from the printed stats


@dataclass
class AffinityRegressionConfig(FairseqDataclass):
    target_mean: float = field(
        default=0.0,
        metadata={
            "help": "mean of the training targets (-logKd/Ki): the model predicts "
            "(y - mean) / std. The recipe reads it from train.lmdb's meta record"
        },
    )
    target_std: float = field(
        default=1.0, metadata={"help": "std of the training targets (see --target-mean)"}
    )
    loss_fn: ChoiceEnum(["mse", "l1", "smooth_l1"]) = field(
        default="mse", metadata={"help": "loss on the standardized targets"}
    )


@register_criterion("affinity_regression", dataclass=AffinityRegressionConfig)
class AffinityRegressionCriterion(FairseqCriterion):
    """Regression of one binding affinity per complex from the graph token.

    Reads ``sample["net_input"]["batched_data"]`` and ``sample["target"]`` ``[B, 1]``
    (-logKd/Ki). Complexes with a NaN target are left out. Logs ``loss`` (per complex,
    standardized scale) and, from the summed statistics of all batches (and workers) of
    the epoch or log interval, ``pearson_r``, ``mae``, ``rmse`` and ``sd`` in -logKd/Ki
    units (:mod:`graphormer_ext.metrics`). For checkpoint selection by R use
    ``--best-checkpoint-metric pearson_r --maximize-best-checkpoint-metric``.
    """

    def __init__(
        self, task, target_mean: float = 0.0, target_std: float = 1.0, loss_fn: str = "mse"
    ):
        super().__init__(task)
        if not target_std > 0:
            raise ValueError(f"--target-std must be > 0, got {target_std}")
        self.target_mean = float(target_mean)
        self.target_std = float(target_std)
        self.loss_fn = str(loss_fn)

    def forward(self, model, sample, reduce=True):
        logits, _, _ = model(sample["net_input"]["batched_data"])
        pred = logits[:, 0, 0].float()  # [B] graph token, standardized scale
        target = sample["target"].float().view(pred.shape[0], -1)[:, 0]  # [B]
        labelled = torch.isfinite(target)
        n = int(labelled.sum())
        pred, target = pred[labelled], target[labelled]
        z = (target - self.target_mean) / self.target_std
        if self.loss_fn == "mse":
            loss = F.mse_loss(pred, z, reduction="sum")
        elif self.loss_fn == "l1":
            loss = F.l1_loss(pred, z, reduction="sum")
        else:
            loss = F.smooth_l1_loss(pred, z, reduction="sum")
        with torch.no_grad():
            y = target.double()
            p = pred.detach().double() * self.target_std + self.target_mean  # [n]
            sums = {
                "n": float(n), "sy": y.sum().item(), "sp": p.sum().item(),
                "syy": (y * y).sum().item(), "spp": (p * p).sum().item(),
                "syp": (y * p).sum().item(), "sabs": (y - p).abs().sum().item(),
                "ssq": ((y - p) ** 2).sum().item(),
            }  # fmt: skip
        logging_output = {
            "loss": loss.detach(),
            "sample_size": n,
            "nsentences": int(logits.shape[0]),
            "ntokens": int(logits.shape[0]),
            **{_SUM_PREFIX + k: v for k, v in sums.items()},
        }
        return loss, max(n, 1), logging_output

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        sample_size = sum(log.get("sample_size", 0) for log in logging_outputs)
        loss = sum(float(log.get("loss", 0)) for log in logging_outputs)
        metrics.log_scalar("loss", loss / max(sample_size, 1), sample_size, round=5)
        for k in SUM_KEYS:
            total = sum(float(log.get(_SUM_PREFIX + k, 0.0)) for log in logging_outputs)
            metrics.log_scalar_sum(_SUM_PREFIX + k, total)
        for name in METRIC_NAMES:
            metrics.log_derived(name, _derived(name), priority=200)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True


def _derived(name: str):
    def fn(meters) -> float:
        sums = {k: float(meters[_SUM_PREFIX + k].sum) for k in SUM_KEYS}
        value = metrics_from_sums(sums)[name]
        return round(value, 5) if value == value else value

    return fn
