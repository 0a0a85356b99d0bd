"""End to end: ``fairseq-train`` trains GeoMFormer (tiny) on an MD17-format LMDB (energy + forces,
forces as -dE/dR) and on a tiny N-body set; the training loss falls."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from suite_env import subprocess_env

pytest.importorskip("fairseq")

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _train(args, tmp_path, name):
    cmd = [str(BIN / "fairseq-train"), "--user-dir", str(REPO / "transformer_m"), "--cpu",
           "--num-workers", "0", "--log-format", "simple", "--log-interval", "1", "--seed", "1",
           "--no-save", "--optimizer", "adam", "--arch", "geomformer_tiny",
           "--attention-dropout", "0", "--act-dropout", "0", *args]
    proc = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    (tmp_path / f"{name}.log").write_text(log)
    assert proc.returncode == 0, log[-3000:]
    epochs = [float(m.group(1)) for m in re.finditer(r"\| train \| epoch \d+ \| loss ([\d.eE+-]+)", log)]
    assert len(epochs) >= 2, log[-3000:]
    # bias-free maps registered as None parameters made fairseq report ~58 shared parameters
    assert "detected shared parameter" not in log
    return epochs, log


def _md17_npz(path: Path, frames: int = 48, seed: int = 0):
    """sGDML-layout trajectory of a 5-atom molecule with a pairwise harmonic energy (kcal/mol)."""
    rng = np.random.default_rng(seed)
    z = np.array([6, 8, 1, 1, 1])
    ref = np.array([[0, 0, 0], [1.2, 0, 0], [-0.6, 0.9, 0], [-0.6, -0.5, 0.8], [-0.5, -0.4, -0.9]])
    d0 = np.linalg.norm(ref[:, None] - ref[None], axis=-1)
    r = ref[None] + 0.1 * rng.standard_normal((frames, 5, 3))
    diff = r[:, :, None] - r[:, None]
    d = np.linalg.norm(diff, axis=-1) + np.eye(5)
    k = 50.0
    e = 0.5 * k * ((d - d0 - np.eye(5)) ** 2 * (1 - np.eye(5))).sum((1, 2)) / 2
    # F_i = -dE/dr_i = -k sum_j (d_ij - d0_ij) (r_i - r_j) / d_ij
    coef = k * (d - d0 - np.eye(5)) * (1 - np.eye(5)) / d
    f = -(coef[..., None] * diff).sum(2)
    np.savez(path, z=z, R=r, E=e[:, None] - 100.0, F=f, name="toy", theory="harmonic")


@pytest.fixture(scope="module")
def md17_lmdb(tmp_path_factory):
    root = tmp_path_factory.mktemp("gm_md17")
    _md17_npz(root / "toy.npz")
    out = root / "lmdb"
    proc = subprocess.run(
        [str(BIN / "graphormer-ext-preprocess"), "md17", "--path", str(root / "toy.npz"),
         "--train", "32", "--valid", "8", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env=subprocess_env(),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def test_fairseq_train_md17_energy_forces(md17_lmdb, tmp_path):
    epochs, log = _train(
        ["--task", "geomformer_md17", "--data-path", str(md17_lmdb),
         "--criterion", "geomformer_md17", "--force-mode", "grad", "--lr", "3e-3",
         "--batch-size", "8", "--max-epoch", "5", "--disable-validation"],
        tmp_path, "md17",
    )
    assert epochs[-1] < epochs[0], epochs
    assert "force_mae" in log and "energy_mae" in log


def test_fairseq_train_nbody(tmp_path):
    from graphormer_ext.sources.nbody import make_splits

    data = tmp_path / "nbody"
    make_splits(data, {"train": 48, "valid": 16, "test": 16})
    epochs, log = _train(
        ["--task", "geomformer_nbody", "--data-path", str(data), "--criterion", "geomformer_nbody",
         "--lr", "3e-3", "--batch-size", "16", "--max-epoch", "5"],
        tmp_path, "nbody",
    )
    assert epochs[-1] < epochs[0], epochs
    assert re.search(r"\| valid \| epoch \d+ \| .*mse", log), log[-2000:]


def test_fairseq_train_gap_on_transformer_m_lmdb(e2e_data_3d, tmp_path):
    """PCQM4Mv2-style graph LMDB (Transformer-M records, 3D train split) -> GeoMFormer gap L1."""
    epochs, log = _train(
        ["--task", "geomformer_graph_prediction", "--data-path", str(e2e_data_3d),
         "--criterion", "geomformer_graph_prediction", "--force-mode", "none", "--lr", "3e-3",
         "--batch-size", "16", "--max-epoch", "4", "--disable-validation"],
        tmp_path, "gap",
    )
    assert epochs[-1] < epochs[0], epochs
