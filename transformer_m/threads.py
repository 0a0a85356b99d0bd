"""The default thread count of the project's CLIs (``finetune_user``, ``transformer-m-predict``).

On a busy 2-core machine, torch's default (one thread per core, in every process) ran a
fine-tuning job 4x slower than ``OMP_NUM_THREADS=1``: the threads of concurrent processes
oversubscribe the cores. The CLIs therefore start from :func:`default_threads` and say which count
they use and how to change it (``--threads N`` or ``OMP_NUM_THREADS``).
"""
from __future__ import annotations

import os
from typing import Mapping, Optional

__all__ = ["default_threads"]


def default_threads(
    environ: Optional[Mapping[str, str]] = None,
    cpu_count: Optional[int] = None,
    load: Optional[float] = None,
) -> tuple[int, str]:
    """The thread count for training on CPU, and why.

    ``OMP_NUM_THREADS`` wins when set. Otherwise one thread on a small (at most 4 cores) or busy
    (1-minute load above half the cores) machine, where oversubscribed torch threads ran a job
    4x slower than one; else the cores not already busy.
    """
    environ = os.environ if environ is None else environ
    if environ.get("OMP_NUM_THREADS", "").strip().isdigit():
        n = max(1, int(environ["OMP_NUM_THREADS"]))
        return n, "OMP_NUM_THREADS"
    cores = cpu_count or os.cpu_count() or 1
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):  # no load average on this platform
            load = 0.0
    if cores <= 4 or load > cores / 2:
        return 1, f"{cores} cores, load {load:.1f}"
    return max(1, min(cores, int(cores - load))), f"{cores} cores, load {load:.1f}"
