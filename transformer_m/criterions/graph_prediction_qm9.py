"""Criterion ``graph_prediction_qm9``: fine-tuning loss and metrics in the paper's units.

Behaviour comes from the task config (``--loss-type``, ``--std-type``, ``--readout-type``), as in
the release. With ``mean``/``std`` the training statistics of the selected target:

* regression, ``std_logits``: ``pred = out * std + mean`` against the raw target;
  ``std_labels``: ``out`` against ``(target - mean) / std``; ``no_std``: ``out`` against the raw
  target. The training loss is L1 or L2 (summed; fairseq divides by ``sample_size``).
* Every split logs ``mae`` in the paper's units (QM9: meV for eV targets, spec §3.5), also under
  ``mae_<unit>`` (``mae_meV``). In evaluation (valid/test) ``loss`` *is* that MAE, as in the
  release, so ``checkpoint_best`` is chosen by it.
* classification: ``BCE`` (one logit, labels 0/1) or ``CE`` (K logits, class-index labels);
  metrics ``accuracy`` and, in evaluation, ``roc_auc`` (binary: over the whole split).

Molecules without the selected label (NaN) are left out of loss and metrics and counted
(``n_missing``).
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from fairseq import metrics
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import FairseqDataclass

from graphormer_ext.data import keys
from transformer_m.tasks.graph_prediction_qm9 import CLASSIFICATION_LOSSES, readout

_MAE_PREFIX = "mae_sum__"


@dataclass
class GraphPredictionQM9CriterionConfig(FairseqDataclass):
    pass


def atom_mask_of(batch: dict) -> torch.Tensor:
    """bool ``[B, N]``: real atoms (atom feature 0 is never padding for a real atom)."""
    return batch[keys.X][:, :, 0].ne(keys.PAD)


def regression_loss(
    out: torch.Tensor, target: torch.Tensor, mean: float, std: float, std_type: str,
    loss_type: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training loss (summed) and the physical prediction.

    Args:
        out: ``[M]`` model readout of the labelled molecules.
        target: ``[M]`` raw targets (stored units).
        mean, std: training statistics of the target (ignored for ``no_std``).
        std_type: ``no_std``, ``std_labels`` or ``std_logits``.
        loss_type: ``L1`` or ``L2``.

    Returns:
        ``(loss, pred)``: the summed loss on the scale of ``std_type`` and ``pred`` ``[M]`` in
        the stored units.
    """
    if std_type == "std_logits":
        pred = out * std + mean
        a, b = pred, target
    elif std_type == "std_labels":
        pred = out * std + mean
        a, b = out, (target - mean) / std
    elif std_type == "no_std":
        pred = out
        a, b = out, target
    else:
        raise ValueError(f"unknown --std-type {std_type!r}")
    if loss_type == "L1":
        loss = (a - b).abs().sum()
    elif loss_type == "L2":
        loss = ((a - b) ** 2).sum()
    else:
        raise ValueError(f"unknown regression --loss-type {loss_type!r}")
    return loss, pred


@register_criterion("graph_prediction_qm9", dataclass=GraphPredictionQM9CriterionConfig)
class GraphPredictionQM9Criterion(FairseqCriterion):
    """See the module docstring. Needs the task ``graph_prediction_qm9``."""

    def __init__(self, task):
        super().__init__(task)
        for name in ("loss_type", "std_type", "readout_type"):
            if not hasattr(task.cfg, name):
                raise ValueError(
                    f"criterion graph_prediction_qm9 needs --task graph_prediction_qm9 "
                    f"(the task config has no {name})"
                )

    def logging_outputs_can_be_summed(self) -> bool:  # instance method: the trainer calls it so
        # ROC-AUC needs every score of the split, which cannot be summed
        return self.task.cfg.loss_type not in CLASSIFICATION_LOSSES

    def forward(self, model, sample, reduce=True):
        cfg = self.task.cfg
        batch = sample["net_input"]["batched_data"]
        logits, _, _ = model(batch)
        out = readout(logits.float(), atom_mask_of(batch), cfg.readout_type)  # [B, C]
        target = sample["target"].float().view(-1)  # [B]
        labelled = torch.isfinite(target)
        n = int(labelled.sum())
        bsz = out.shape[0]
        log = {
            "nsentences": bsz,
            "ntokens": bsz,
            "sample_size": n,
            "n_missing": bsz - n,
        }
        if cfg.loss_type in CLASSIFICATION_LOSSES:
            loss = self._classification(out[labelled], target[labelled], cfg.loss_type, log)
        else:
            mean, std = self.task.statistics()
            loss, pred = regression_loss(
                out[labelled, 0], target[labelled], mean, std, cfg.std_type, cfg.loss_type
            )
            mae = (pred - target[labelled]).abs().sum().detach() * self.task.unit_scale
            log["train_loss_sum"] = loss.detach()
            log["mae_sum"] = mae
            suffix = self.task.metric_suffix
            if suffix:
                log[_MAE_PREFIX + suffix] = mae
            # valid/test: loss = MAE in the paper's units (the release logs loss = L1)
            log["loss"] = log["train_loss_sum"] if model.training else mae
        return loss, max(n, 1), log

    @staticmethod
    def _classification(out, target, loss_type, log) -> torch.Tensor:
        if loss_type == "BCE":
            if ((target != 0) & (target != 1)).any():
                bad = target[(target != 0) & (target != 1)][:3].tolist()
                raise ValueError(f"--loss-type BCE needs labels 0/1, got {bad}")
            logit = out[:, 0]
            loss = F.binary_cross_entropy_with_logits(logit, target, reduction="sum")
            correct = ((logit > 0).float() == target).sum()
            score = torch.sigmoid(logit)
        else:
            k = out.shape[1]
            cls = target.long()
            if (cls.float() != target).any() or (cls < 0).any() or (cls >= k).any():
                raise ValueError(
                    f"--loss-type CE needs class indices 0..{k - 1} (--num-classes {k}), "
                    f"got {target[:5].tolist()}"
                )
            loss = F.cross_entropy(out, cls, reduction="sum")
            correct = (out.argmax(-1) == cls).sum()
            score = torch.softmax(out, -1)[:, 1] if k == 2 else None
        log["loss"] = loss.detach()
        log["correct"] = correct.detach()
        if score is not None:
            log["scores"] = score.detach().cpu().numpy().astype(np.float64)
            log["labels"] = target.detach().cpu().numpy().astype(np.int64)
        return loss

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        def total(key):
            return sum(float(log.get(key, 0)) for log in logging_outputs)

        n = total("sample_size")
        denom = max(n, 1)
        metrics.log_scalar("loss", total("loss") / denom, n, round=6)
        metrics.log_scalar_sum("n_missing", total("n_missing"), round=0)
        if any("mae_sum" in log for log in logging_outputs):
            metrics.log_scalar("mae", total("mae_sum") / denom, n, round=6)
            names = {k for log in logging_outputs for k in log if k.startswith(_MAE_PREFIX)}
            for key in sorted(names):
                metrics.log_scalar("mae_" + key[len(_MAE_PREFIX):], total(key) / denom, n,
                                   round=6)
            metrics.log_scalar("objective", total("train_loss_sum") / denom, n, round=6)
        if any("correct" in log for log in logging_outputs):
            metrics.log_scalar("accuracy", total("correct") / denom, n, round=5)
            scores = [log["scores"] for log in logging_outputs if "scores" in log]
            if scores:
                s = np.concatenate(scores)
                y = np.concatenate([log["labels"] for log in logging_outputs if "labels" in log])
                auc = roc_auc(s, y)
                if not math.isnan(auc):
                    metrics.log_scalar("roc_auc", auc, len(y), round=5)


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC-AUC of binary ``labels`` (NaN when only one class is present)."""
    labels = np.asarray(labels).astype(np.int64)
    if labels.size == 0 or labels.min() == labels.max():
        return float("nan")
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, np.asarray(scores, dtype=np.float64)))
