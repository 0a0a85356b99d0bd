"""Environment of the subprocesses the tests start (fairseq CLIs, recipes, scripts).

A subprocess must run the code under test: this checkout's ``transformer_m`` and
``graphormer_ext`` (with the extension built in place), whatever else is installed. fairseq's
``--user-dir REPO/transformer_m`` and the packages imported through ``PYTHONPATH`` must be
the same copy, or fairseq stops with "module name (transformer_m) is not globally unique".
So ``PYTHONPATH`` starts with this checkout's root, never with whatever the caller had.
Threads are pinned to one, and no GPU is visible, so that results do not depend on the
machine.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PLUGIN_DIR = REPO_ROOT / "transformer_m"
VENV_BIN = Path(sys.executable).parent


def subprocess_env(threads: int = 1, **extra: str) -> dict:
    """``os.environ`` for a test subprocess: this checkout first on ``PYTHONPATH``,
    ``threads`` OpenMP/MKL threads, no CUDA device, quiet warnings, fixed hash seed,
    the venv's ``bin/`` first on ``PATH``; ``extra`` variables on top."""
    env = dict(os.environ)
    paths = [str(REPO_ROOT)] + [
        p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p) != REPO_ROOT
    ]
    env.update(
        PYTHONPATH=os.pathsep.join(paths),
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        CUDA_VISIBLE_DEVICES="",
        PYTHONWARNINGS="ignore",
        PYTHONHASHSEED="0",
    )
    env.update(extra)
    return env
