"""README command (a), the main job, runs end to end (at 4 of its 30 epochs).

``scripts/demo.py`` preprocesses the shipped PCQM4Mv2-layout data, trains ``transformer_m_small``
with ``fairseq-train``, validates ``checkpoint_best.pt`` with ``fairseq-validate`` and compares the
valid MAE with the train-mean baseline; it exits non-zero unless the model is clearly better
(MAE < 0.8 × baseline). About 30 s on one core.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from suite_env import REPO_ROOT, subprocess_env

pytest.importorskip("fairseq")


def test_demo_beats_the_mean_baseline(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "demo.py"), "--out", str(out),
         "--max-epoch", "4"],
        capture_output=True, text=True, timeout=900, env=subprocess_env(), cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "threads per process: 1 (OMP_NUM_THREADS" in proc.stdout
    for step in ("== 1/4", "== 2/4", "== 3/4", "== 4/4"):
        assert step in proc.stdout
    result = json.loads((out / "result.json").read_text())
    assert result["valid_molecules"] == 500
    assert 0 < result["valid_mae_ev"] < 0.8 * result["train_mean_baseline_mae_ev"]
    assert (out / "checkpoints" / "checkpoint_best.pt").is_file()
    assert {"train.lmdb", "valid.lmdb"} <= {p.name for p in (out / "lmdb").glob("*.lmdb")}
