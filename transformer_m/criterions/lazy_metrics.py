"""Metric logging that never reads a device value back to the host during training.

fairseq's trainer reduces and averages the logged values of every update, and rounds them
(``safe_round`` calls ``.item()``) when a meter has a ``round``: one host synchronisation per
logged tensor per update. Logging tensors *without* ``round`` keeps them on the device until
fairseq prints a line (every ``--log-interval`` updates); floats (validation, where reading
back is free) keep their rounding.
"""
from typing import Iterable, Mapping

import torch
from fairseq import metrics


def sum_logs(logging_outputs: Iterable[Mapping], key: str):
    """Sum of ``key`` over the logging outputs, tensors kept as tensors (0 if absent)."""
    return sum(log.get(key, 0) for log in logging_outputs)


def log_scalar(key: str, value, weight=1, round=None, priority: int = 10) -> None:
    """``metrics.log_scalar``, without rounding for tensors (rounding would read them back)."""
    digits = None if torch.is_tensor(value) else round
    metrics.log_scalar(key, value, weight, priority=priority, round=digits)


def loggable(log: dict, training: bool) -> dict:
    """A criterion's logging output: tensors as they are in training (read lazily), plain
    floats otherwise (validation: rounded as before, and the best-checkpoint bookkeeping
    compares floats)."""
    if training:
        return log
    return {k: float(v) if torch.is_tensor(v) and v.numel() == 1 else v for k, v in log.items()}
