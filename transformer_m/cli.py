"""Console scripts that run fairseq's CLIs with this plugin loaded.

``transformer-m-train`` / ``transformer-m-validate`` insert ``--user-dir <installed transformer_m>``
unless the command line already has one, because spawned distributed ranks re-import plugins only
from ``common.user_dir``.

Under ``torchrun`` on a machine without CUDA devices (CPU tests, gloo) they also pass the rank
explicitly (``--distributed-init-method env:// --distributed-rank $RANK --distributed-no-spawn``):
fairseq 0.12.3 infers torchrun ranks with ``rank % torch.cuda.device_count()``, a
ZeroDivisionError without GPUs. With GPUs fairseq's own inference is used unchanged.
"""
from __future__ import annotations

import os
import sys

PLUGIN_DIR = os.path.dirname(os.path.abspath(__file__))


def with_user_dir(argv: list[str]) -> list[str]:
    """Return ``argv`` with ``--user-dir PLUGIN_DIR`` inserted after the program name if absent."""
    if any(a == "--user-dir" or a.startswith("--user-dir=") for a in argv[1:]):
        return list(argv)
    return [argv[0], "--user-dir", PLUGIN_DIR, *argv[1:]]


def _has_flag(argv: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv[1:])


def with_cpu_torchrun(argv: list[str], environ=None, cuda_devices: int | None = None) -> list[str]:
    """Return ``argv`` with explicit distributed flags when run by torchrun without CUDA.

    Args:
        argv: the command line (program name first).
        environ: environment (default ``os.environ``); torchrun sets ``RANK``, ``WORLD_SIZE``,
            ``MASTER_ADDR`` and ``MASTER_PORT``.
        cuda_devices: number of CUDA devices (default ``torch.cuda.device_count()``).

    Returns:
        ``argv`` unchanged unless all four variables are set, no CUDA device is visible and the
        command line has no ``--distributed-init-method``.
    """
    environ = os.environ if environ is None else environ
    launched = all(k in environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))
    if not launched or _has_flag(argv, "--distributed-init-method"):
        return list(argv)
    if cuda_devices is None:
        import torch

        cuda_devices = torch.cuda.device_count()
    if cuda_devices > 0:
        return list(argv)
    return [
        *argv,
        "--distributed-init-method", "env://",
        "--distributed-world-size", str(int(environ["WORLD_SIZE"])),
        "--distributed-rank", str(int(environ["RANK"])),
        "--distributed-no-spawn",
    ]


def train() -> None:
    """Entry point of ``transformer-m-train`` (``fairseq-train`` + plugin)."""
    from fairseq_cli.train import cli_main

    sys.argv = with_cpu_torchrun(with_user_dir(sys.argv))
    cli_main()


def validate() -> None:
    """Entry point of ``transformer-m-validate`` (``fairseq-validate`` + plugin)."""
    from fairseq_cli.validate import cli_main

    sys.argv = with_cpu_torchrun(with_user_dir(sys.argv))
    cli_main()
