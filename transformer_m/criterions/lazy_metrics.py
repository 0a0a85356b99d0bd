"""Metric logging that never reads a device value back to the host during training.

fairseq's trainer reduces and averages the logged values of every update, and rounds them
(``safe_round`` calls ``.item()``) when a meter has a ``round``: one host synchronisation per
logged tensor per update. During training updates (fairseq-train's ``train`` aggregator is
active) tensors are logged *without* ``round`` and stay on the device until fairseq prints a
line (every ``--log-interval`` updates). Everywhere else (validation, fairseq-validate, other
drivers) values are read back and rounded as before, so validation output and the
best-checkpoint bookkeeping keep plain floats (data-parallel runs all-reduce logs into tensors).
fairseq's progress bars print a one-element tensor as its full repr (``loss=6.5055999755859375``);
:func:`install_log_format` makes them print it as they print a float (``{:g}``), reading it back
only when the line is printed.
"""
from typing import Iterable, Mapping

import torch
from fairseq import metrics


def sum_logs(logging_outputs: Iterable[Mapping], key: str):
    """Sum of ``key`` over the logging outputs, tensors kept as tensors (0 if absent)."""
    return sum(log.get(key, 0) for log in logging_outputs)


def in_training_updates() -> bool:
    """Whether fairseq-train is running training updates: its ``train`` aggregator is active
    (validation opens a new root aggregator without it)."""
    train = metrics.get_meters("train")
    return train is not None and any(agg is train for agg in metrics.get_active_aggregators())


def log_scalar(key: str, value, weight=1, round=None, priority: int = 10) -> None:
    """``metrics.log_scalar``: a tensor in training updates is logged unrounded (rounding would
    read it back every update); otherwise tensors become floats, rounded as before."""
    if torch.is_tensor(value):
        if in_training_updates():
            round = None
        else:
            value = float(value)
    if torch.is_tensor(weight):
        weight = float(weight)
    metrics.log_scalar(key, value, weight, priority=priority, round=round)


def loggable(log: dict, training: bool) -> dict:
    """A criterion's logging output: tensors as they are in training (read lazily), plain
    floats otherwise (validation: rounded as before, and the best-checkpoint bookkeeping
    compares floats)."""
    if training:
        return log
    return {k: float(v) if torch.is_tensor(v) and v.numel() == 1 else v for k, v in log.items()}


def install_log_format() -> None:
    """Let fairseq's progress bars format one-element tensors as numbers (``{:g}``)."""
    from fairseq.logging import progress_bar

    if getattr(progress_bar.format_stat, "tensor_as_number", False):
        return
    original = progress_bar.format_stat

    def format_stat(stat):
        if torch.is_tensor(stat) and stat.numel() == 1:
            stat = stat.item()  # once per printed line (every --log-interval updates)
        return original(stat)

    format_stat.tensor_as_number = True
    progress_bar.format_stat = format_stat
