"""The reproduction studies of ``scripts/experiments/`` run end to end on tiny settings: they
train through fairseq, resume after an interruption instead of restarting, refuse to mix
protocols in one directory, and write their CSVs and plots (``docs/reproduction.md``)."""

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fairseq")
pytest.importorskip("matplotlib")

REPO = Path(__file__).resolve().parents[2]
EXP = REPO / "scripts" / "experiments"


def _run(script, args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(EXP / script), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)
    return proc


def _ok(proc):
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _train_epochs(log):
    epochs = []
    for line in Path(log).read_text().splitlines():
        if "| INFO | train | {" in line:
            epochs.append(json.loads(line.split("| train | ", 1)[1])["epoch"])
    return epochs


NBODY_TINY = ["--train", 32, "--valid", 16, "--test", 16, "--validate-interval", 1, "--layers", 1,
              "--embed-dim", 16, "--heads", 2, "--kernels", 8, "--batch-size", 16]


def test_nbody_study_resumes_and_reports(tmp_path):
    out = tmp_path / "nb"
    _ok(_run("nbody_geomformer.py", ["--out", out, "--seeds", 1, "--max-epoch", 1, *NBODY_TINY],
             tmp_path))
    first = json.loads((out / "runs" / "seed1" / "result.json").read_text())
    assert first["epochs"] == 1 and first["stop"] == "epoch budget"
    # a larger budget continues the finished run from its checkpoint: epoch 1 is not redone
    stdout = _ok(_run("nbody_geomformer.py", ["--out", out, "--seeds", 1, "--max-epoch", 2,
                                              *NBODY_TINY], tmp_path))
    assert _train_epochs(out / "runs" / "seed1" / "train.log") == [1, 2]
    rows = {r["model"]: r for r in _rows(out / "nbody_results.csv")}
    ours = rows["GeoMFormer (ours)"]
    assert ours["epochs"] == "2" and ours["commit"]
    # fairseq-validate of checkpoint_best agrees with the test MSE logged at the best epoch
    assert float(ours["test_mse_validate"]) == pytest.approx(float(ours["test_mse"]), rel=1e-4)
    assert "constant velocity (x + v)" in rows and "GeoMFormer (paper, Table 6)" in rows
    assert float(rows["GeoMFormer (paper, Table 6)"]["test_mse"]) == 0.0047
    curves = _rows(out / "nbody_curves.csv")
    assert [c["epoch"] for c in curves] == ["1", "2"]
    assert (out / "nbody.png").stat().st_size > 1000
    assert "GeoMFormer (ours)" in stdout
    # a finished run is skipped; another protocol in the same directory is refused
    again = _ok(_run("nbody_geomformer.py", ["--out", out, "--seeds", 1, "--max-epoch", 2,
                                             *NBODY_TINY], tmp_path))
    assert _train_epochs(out / "runs" / "seed1" / "train.log") == [1, 2], again
    # seeds compared at a smaller budget; the run trained beyond it gets its own row
    _ok(_run("nbody_geomformer.py", ["--out", out, "--seeds", 1, "--max-epoch", 2, *NBODY_TINY,
                                     "--report-only", "--table-epochs", 1], tmp_path))
    rows = _rows(out / "nbody_results.csv")
    assert [(r["model"], r["epochs"]) for r in rows if r["seed"] == "1"] == [
        ("GeoMFormer (ours)", "1"), ("GeoMFormer (ours), longest run: 2 epochs", "2")]
    longest = next(r for r in rows if r["model"].startswith("GeoMFormer (ours), longest"))
    assert longest["stop"] == "epoch budget" and longest["test_mse_validate"]
    # a run stopped early (patience) before its budget is reported as such, not "interrupted"
    result = out / "runs" / "seed1" / "result.json"
    res = json.loads(result.read_text())
    result.write_text(json.dumps(dict(res, max_epoch=10000, stop="early stop (patience 20)")))
    _ok(_run("nbody_geomformer.py", ["--out", out, "--seeds", 1, "--max-epoch", 2, *NBODY_TINY,
                                     "--report-only", "--table-epochs", 1], tmp_path))
    longest = next(r for r in _rows(out / "nbody_results.csv")
                   if r["model"].startswith("GeoMFormer (ours), longest"))
    assert longest["stop"] == "early stop (patience 20)"
    assert float(longest["test_mse_validate"]) == pytest.approx(float(longest["test_mse"]),
                                                                rel=1e-4)
    result.write_text(json.dumps(res))
    bad = _run("nbody_geomformer.py", ["--out", out, "--seeds", 1, "--max-epoch", 2,
                                       *NBODY_TINY[:-2], "--batch-size", 8], tmp_path)
    assert bad.returncode != 0 and "other settings" in bad.stderr


def _qm9pack_rows(folder: Path, n: int) -> Path:
    """The first ``n`` rows of the installed qm9pack, spread over its three CSV names."""
    spec = importlib.util.find_spec("qm9pack")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("qm9pack is not installed")
    src = Path(list(spec.submodule_search_locations)[0]) / "data" / "qm9_part1.csv"
    with open(src, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows = [next(reader) for _ in range(n)]
    folder.mkdir()
    thirds = [rows[: n // 3], rows[n // 3: 2 * n // 3], rows[2 * n // 3:]]
    for i, part in enumerate(thirds, 1):
        with open(folder / f"qm9_part{i}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(part)
    return folder


def test_tm_ablation_study_tiny(tmp_path):
    pack = _qm9pack_rows(tmp_path / "qm9pack", 90)
    out = tmp_path / "tma"
    args = ["--out", out, "--csv-dir", pack, "--seeds", 1, "--conditions", "2d", "joint",
            "--train", 32, "--valid", 12, "--test", 12, "--max-update", 4,
            "--validate-interval-updates", 2, "--batch-size", 8, "--layers", 1, "--embed-dim", 16,
            "--ffn-dim", 16, "--heads", 2, "--kernels", 4]
    stdout = _ok(_run("tm_ablation_qm9.py", args, tmp_path))
    from graphormer_ext.data.lmdb_dataset import LMDBDataset
    from graphormer_ext.data import keys

    lmdb = out / "data" / "lmdb"
    train, test = LMDBDataset(str(lmdb / "train.lmdb")), LMDBDataset(str(lmdb / "test-dev.lmdb"))
    assert (len(train), len(LMDBDataset(str(lmdb / "valid.lmdb"))), len(test)) == (32, 12, 12)
    # PCQM4Mv2 layout: 3D only in train; the test split is labelled
    assert keys.POS in train[0] and keys.POS not in test[0]
    summary = {r["condition"]: r for r in _rows(out / "tm_ablation_summary.csv")}
    assert set(summary) == {"2d", "joint"}
    assert float(summary["2d"]["test_mae_mean"]) > 0
    results = _rows(out / "tm_ablation_results.csv")
    assert {(r["condition"], r["mode_prob"], r["denoise_weight"]) for r in results} == {
        ("2d", "0,1,0", "0"), ("joint", "0.2,0.2,0.6", "1")}
    curves = _rows(out / "tm_ablation_curves.csv")
    assert sorted({c["num_updates"] for c in curves}) == ["2", "4"]
    assert (out / "tm_ablation.png").stat().st_size > 1000
    assert "(b) joint + denoising" in stdout


def test_md17_init_study_tiny(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_geomformer_train import _md17_npz

    npz = tmp_path / "toy.npz"
    _md17_npz(npz)
    out = tmp_path / "md"
    _ok(_run("geomformer_md17_init.py", [
        "--out", out, "--npz", npz, "--train", 32, "--valid", 8, "--max-update", 4,
        "--validate-interval-updates", 2, "--log-interval", 1, "--arch", "geomformer_tiny",
        "--variants", "published", "defaults"], tmp_path))
    rows = {r["variant"]: r for r in _rows(out / "md17_init_results.csv")}
    assert set(rows) == {"published", "defaults", "zero forces, train-mean energy"}
    # the untrained default model starts at the zero-force baseline; training moves it
    assert float(rows["defaults"]["gnorm_mean_first50"]) > 0
    assert rows["published"]["flags"] == "--gbf-std-offset 1e-5 --energy-head-init default"
    assert len(_rows(out / "md17_init_curves.csv")) == 8
    assert (out / "md17_init.png").stat().st_size > 1000
