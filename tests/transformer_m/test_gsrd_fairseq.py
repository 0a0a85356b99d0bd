"""3D-GSRD through fairseq's CLIs (CPU subprocesses, tiny model): pre-training, MD17 fine-tuning from
the pre-trained encoder, fairseq-validate on the checkpoint, QM9 fine-tuning, recipes' dry runs."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from suite_env import subprocess_env

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
USER_DIR = str(REPO / "transformer_m")
TINY = ["--arch", "gsrd_small", "--encoder-layers", "2", "--encoder-embed-dim", "32",
        "--encoder-attention-heads", "4", "--encoder-node-hidden", "32", "--num-rbf", "16",
        "--encoder-2d-layers", "1", "--encoder-2d-embed-dim", "16", "--encoder-2d-edge-dim", "8"]
COMMON = ["--user-dir", USER_DIR, "--cpu", "--num-workers", "0", "--seed", "1", "--log-format",
          "simple", "--log-interval", "1", "--no-epoch-checkpoints", "--optimizer", "adam",
          "--lr-scheduler", "fixed", "--no-progress-bar"]


def _env():
    return subprocess_env()


def _run(tool, args, log):
    proc = subprocess.run([str(BIN / tool), *args], cwd=REPO, env=_env(), capture_output=True, text=True)
    log.write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc.stdout + proc.stderr


def _metric(text, name, kind="train"):
    """Values of ``name`` on epoch summary lines of ``kind`` (train | valid)."""
    pat = re.compile(rf"\| {kind} \| .*?\| {name} (-?[0-9.]+)")
    return [float(m.group(1)) for m in pat.finditer(text)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("gsrd_data")
    pre = [str(BIN / "graphormer-ext-preprocess")]
    opts = ["--workers", "1", "--no-progress"]
    subprocess.run(pre + ["pcqm4mv2", "--root", str(REPO / "data/pcqm4m-v2-qm9"), "--limit", "32",
                          "--splits", "train", "--out", str(root / "pcq")] + opts,
                   check=True, cwd=REPO, capture_output=True, env=_env())
    subprocess.run(pre + ["md17", "--path", str(REPO / "data/md17-xtb/md17_ethanol_xtb.npz"), "--train", "32",
                          "--valid", "16", "--test", "16", "--out", str(root / "md17")] + opts,
                   check=True, cwd=REPO, capture_output=True, env=_env())
    # QM9-layout splits (19 PyG-ordered targets) from the demo graph records, labels synthetic
    from graphormer_ext.data.lmdb_dataset import LMDBDataset
    from graphormer_ext.data.lmdb_writer import write_split

    recs = LMDBDataset(root / "pcq" / "train.lmdb")
    rng = np.random.default_rng(0)
    (root / "qm9").mkdir()
    for split, rows in (("train", range(0, 20)), ("valid", range(20, 26)), ("test", range(26, 32))):
        items = []
        for i in rows:
            r = {k: np.array(v) for k, v in recs[i].items()}
            r["y"] = rng.normal(size=19).astype(np.float32)
            r["y"][2] = -0.2 * len(r["node_feat"]) + 0.01 * rng.normal()  # "homo" ~ atom count (learnable)
            items.append(r)
        write_split(root / "qm9" / f"{split}.lmdb", items, split=split, progress=False, workers=1)
    return root


def test_pretrain_then_md17_finetune_then_validate(data, tmp_path):
    pt = tmp_path / "pt"
    out = _run("fairseq-train", COMMON + TINY + [
        "--task", "gsrd_pretrain", "--data-path", str(data / "pcq"), "--valid-from-train", "8",
        "--criterion", "gsrd_pretrain", "--lr", "2e-3", "--batch-size", "8", "--max-epoch", "3",
        "--save-dir", str(pt)], tmp_path / "pt.log")
    losses = _metric(out, "loss")
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    for term in ("mask_loss", "distill_loss", "denoise_loss", "vec_loss"):
        assert _metric(out, term, "valid"), term
    assert (pt / "checkpoint_best.pt").is_file()

    ft = tmp_path / "ft"
    out = _run("fairseq-train", COMMON + TINY + [
        "--task", "gsrd_md17", "--data-path", str(data / "md17"), "--criterion", "gsrd_energy_force",
        "--pretrained-encoder", str(pt / "checkpoint_best.pt"), "--lr", "2e-3", "--batch-size", "8",
        "--max-epoch", "3", "--best-checkpoint-metric", "force_mae", "--save-dir", str(ft)],
        tmp_path / "ft.log")
    m = re.search(r"gsrd: loaded (\d+)/(\d+) encoder tensors \((\d+) parameters\)", out)
    assert m and int(m.group(1)) == int(m.group(2)) > 0 and int(m.group(3)) > 0, out[-2000:]
    fmae = _metric(out, "force_mae")
    assert len(fmae) == 3 and fmae[-1] < fmae[0], fmae

    out = _run("fairseq-validate", ["--user-dir", USER_DIR, "--cpu", "--num-workers", "0",
                                    "--task", "gsrd_md17", "--data-path", str(data / "md17"),
                                    "--path", str(ft / "checkpoint_best.pt"), "--valid-subset", "test",
                                    "--batch-size", "16"], tmp_path / "val.log")
    m = re.search(r"valid on 'test' subset \|.*force_mae ([0-9.]+)", out)
    assert m and np.isfinite(float(m.group(1)))
    # the same validation on the pre-training checkpoint works too
    out = _run("fairseq-validate", ["--user-dir", USER_DIR, "--cpu", "--num-workers", "0",
                                    "--task", "gsrd_pretrain", "--data-path", str(data / "pcq"),
                                    "--valid-from-train", "8", "--path", str(pt / "checkpoint_best.pt"),
                                    "--batch-size", "8"], tmp_path / "val_pt.log")
    assert re.search(r"valid on 'valid' subset \|.*mask_mse [0-9.]+", out)


def test_qm9_finetune_and_validate(data, tmp_path):
    out = _run("fairseq-train", COMMON + TINY + [
        "--task", "gsrd_qm9", "--data-path", str(data / "qm9"), "--target", "homo",
        "--criterion", "gsrd_qm9", "--lr", "3e-3", "--batch-size", "8", "--max-epoch", "3",
        "--best-checkpoint-metric", "mae", "--physical", "--save-dir", str(tmp_path / "q")],
        tmp_path / "q.log")
    assert "target standardisation" in out  # homo is standardised (§B10)
    losses = _metric(out, "loss")
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    out = _run("fairseq-validate", ["--user-dir", USER_DIR, "--cpu", "--num-workers", "0",
                                    "--task", "gsrd_qm9", "--data-path", str(data / "qm9"),
                                    "--target", "homo", "--path", str(tmp_path / "q" / "checkpoint_best.pt"),
                                    "--valid-subset", "test", "--batch-size", "8"], tmp_path / "qv.log")
    assert re.search(r"valid on 'test' subset \|.*mae [0-9.]+", out)


@pytest.mark.parametrize("recipe", ["gsrd_pretrain.sh", "gsrd_finetune_md17.sh", "gsrd_finetune_qm9.sh"])
def test_recipes_dry_run(recipe, tmp_path):
    env = subprocess_env(DRY_RUN="1")
    proc = subprocess.run(["bash", str(REPO / "scripts/recipes" / recipe), str(tmp_path / "lmdb"),
                           str(tmp_path / "save"), "none"] if recipe != "gsrd_pretrain.sh" else
                          ["bash", str(REPO / "scripts/recipes" / recipe), str(tmp_path / "lmdb"),
                           str(tmp_path / "save")], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "fairseq-train" in proc.stdout and "--arch gsrd_base" in proc.stdout
    assert not (tmp_path / "save").exists()
