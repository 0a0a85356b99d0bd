"""``scripts/finetune_user.sh`` for real on tiny data, and the parts of ``finetune_user``.

The script runs without an activated virtualenv (PATH without the venv, no ``VIRTUAL_ENV``):
it must find the project's Python itself (issue 12 item 3). Its report (summary, per-molecule
predictions with SMILES, parity plot, the model beside the train mean and a random forest) is
checked, and ``transformer-m-predict`` on its checkpoint is compared with the real
``fairseq-validate`` of the same run (item 1). In process: live streaming of a command's output
to console and log (item 4), ``--target`` checked before preprocessing (item 6), reuse of an
existing LMDB (item 8), the thread default (item 9), metrics and baselines (item 5).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fairseq")
pytest.importorskip("rdkit")
pytest.importorskip("sklearn")

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "finetune_user.sh"
TIMEOUT = 420
TINY = ["--encoder-layers", "2", "--encoder-embed-dim", "32", "--encoder-ffn-embed-dim", "32",
        "--encoder-attention-heads", "4"]  # fmt: skip
SMILES = [
    "CCO", "CCN", "CCC", "CCCl", "c1ccccc1", "c1ccncc1", "CC(=O)O", "CC(=O)N", "CCOC",
    "CCCC", "CCCO", "CCCN", "OCCO", "NCCN", "CC#N", "C1CCCCC1", "C1CCOC1", "Cc1ccccc1",
    "Oc1ccccc1", "Nc1ccccc1", "CC(C)O", "CC(C)N", "CC(C)C", "FC(F)F",
]  # fmt: skip


def write_user_csv(path: Path) -> Path:
    """24 molecules: logS-like label (one missing), a split column."""
    from rdkit import Chem

    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["name", "smiles", "logS", "split"])
        for i, smi in enumerate(SMILES):
            mol = Chem.MolFromSmiles(smi)
            value = 1.5 - 0.4 * mol.GetNumAtoms() + 0.6 * sum(
                a.GetSymbol() in "NO" for a in mol.GetAtoms())
            split = "train" if i % 4 else ("valid" if i % 8 == 0 else "test")
            w.writerow([f"mol{i}", smi, "" if i == 5 else f"{value:.3f}", split])
    return path


def clean_env(tmp_path: Path) -> dict:
    """No activated venv: PATH without the venv's bin, no VIRTUAL_ENV. The code under test is
    this checkout (PYTHONPATH); the interpreter is found by the script (the project's .venv) or,
    in a checkout without one, given as $PYTHON."""
    venv_bin = str(Path(sys.executable).parent)
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != venv_bin]
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHON")}
    env.update(PATH=os.pathsep.join(path or ["/usr/bin", "/bin"]), PYTHONPATH=str(REPO),
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONWARNINGS="ignore", TMPDIR=str(tmp_path))
    if not (REPO / ".venv" / "bin" / "python").exists():
        env["PYTHON"] = sys.executable
    return env


@pytest.fixture(scope="module")
def user_run(tmp_path_factory):
    """One real run of scripts/finetune_user.sh with the README's flags (--id-column,
    --conformers): (out dir, console text, csv)."""
    tmp = tmp_path_factory.mktemp("finetune_user")
    data = write_user_csv(tmp / "mols.csv")
    out = tmp / "run"
    argv = ["bash", str(SCRIPT), "--csv", str(data), "--smiles-column", "smiles",
            "--label-columns", "logS", "--split-column", "split", "--id-column", "name",
            "--conformers", "--out", str(out),
            "--workers", "1", "--max-epoch", "3", "--batch-size", "8", "--cpu", "--", *TINY]
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=clean_env(tmp), cwd=tmp, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return out, proc.stdout, data


def test_script_writes_checkpoint_report_and_files(user_run):
    out, console, data = user_run
    assert (out / "checkpoints" / "checkpoint_best.pt").is_file()
    assert '"valid_mae"' in (out / "validate.log").read_text()
    assert '| train |' in (out / "train.log").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["target"] == "logS" and summary["kind"] == "regression"
    assert summary["data"]["train"] == {"molecules": 18, "labelled": 17, "missing": 1}
    scores = summary["scores"]
    assert set(scores) == {"Transformer-M", "train mean", "RF on RDKit descriptors"}
    for predictor in scores.values():
        for split in ("valid", "test"):
            assert set(predictor[split]) >= {"mae", "rmse", "n"}
            assert predictor[split]["rmse"] >= predictor[split]["mae"] > 0
    assert scores["train mean"]["test"]["n"] == 3
    assert summary["verdict"].startswith("Transformer-M MAE on test is ")
    # the missing label is in the printed data table, and so is the report
    table = [ln.split() for ln in console.splitlines() if ln.split()[:1] == ["train"]]
    assert ["train", "18", "0", "18", "17", "1"] in table, console[-3000:]  # all embedded
    assert summary["channels"] == "2d3d"
    assert "train mean" in console and "RF on RDKit descriptors" in console
    assert (out / "parity_test.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(out / "predictions_test.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    with open(data, newline="") as fh:
        test_rows = [(line, r) for line, r in enumerate(csv.DictReader(fh), start=2)
                     if r["split"] == "test"]
    assert [r["smiles"] for r in rows] == [r["smiles"] for _, r in test_rows]
    assert [r["id"] for r in rows] == [r["name"] for _, r in test_rows]  # --id-column
    assert [int(r["source_row"]) for r in rows] == [line for line, _ in test_rows]
    assert all(math.isfinite(float(r["y_pred"])) and r["rf_pred"] for r in rows)


def test_predict_equals_fairseq_validate_of_the_run(user_run, capsys):
    """transformer-m-predict on the run's checkpoint reproduces fairseq-validate's test MAE."""
    from transformer_m.predict import main

    out, _, _ = user_run
    with open(out / "predictions_test.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    capsys.readouterr()
    code = main(["--checkpoint", str(out / "checkpoints" / "checkpoint_best.pt"),
                 "--smiles", *[r["smiles"] for r in rows]])
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out), delimiter="\t"))
    assert code == 0 and "logS" in table[0]
    pred = np.array([float(r["logS"]) for r in table])
    y = np.array([float(r["y_true"]) for r in rows])
    validate = [json.loads(ln[ln.index("{"):]) for ln in (out / "validate.log").read_text()
                .splitlines() if "| test |" in ln]
    assert np.abs(pred - y).mean() == pytest.approx(float(validate[-1]["test_mae"]), abs=2e-4)


def test_make_user_example_writes_the_chembl_set(tmp_path):
    out = tmp_path / "pic50.csv"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "make_user_example.py"),
                           "--out", str(out), "--limit", "5"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 5 and list(rows[0]) == ["chembl_id", "smiles", "pIC50"]
    assert rows[0]["chembl_id"].startswith("CHEMBL") and 4.0 < float(rows[0]["pIC50"]) < 10.0
    from rdkit import Chem

    assert all(Chem.MolFromSmiles(r["smiles"]) is not None for r in rows)


# --- in process ----------------------------------------------------------------------------------
def test_run_live_streams_while_the_command_runs(tmp_path, capsys):
    from transformer_m.finetune_user import run_live

    gate = tmp_path / "gate"
    code = ("import os, sys, time\nprint('first' + ' line', flush=True)\n"
            f"while not os.path.exists({str(gate)!r}): time.sleep(0.05)\n"
            "print('second' + ' line')\n")  # the log also holds the command: split the words
    log = tmp_path / "train.log"
    result = {}
    worker = threading.Thread(target=lambda: result.update(
        text=run_live([sys.executable, "-c", code], log, dict(os.environ))))
    worker.start()
    try:
        deadline = time.time() + 60
        while time.time() < deadline and "first line" not in (
                log.read_text() if log.exists() else ""):
            time.sleep(0.05)
        assert "first line" in log.read_text()  # in the log while the command still runs
        assert "second line" not in log.read_text()
    finally:
        gate.touch()
        worker.join(timeout=60)
    assert "second line" in result["text"] and "second line" in log.read_text()
    assert "first line" in capsys.readouterr().out


def test_bad_target_is_refused_before_preprocessing(tmp_path, capsys):
    from transformer_m import finetune_user

    data = write_user_csv(tmp_path / "mols.csv")
    with pytest.raises(SystemExit) as err:
        finetune_user.main(["--csv", str(data), "--label-columns", "logS", "--target", "logP",
                            "--out", str(tmp_path / "out"), "--workers", "1"])
    assert err.value.code == 2
    msg = capsys.readouterr().err
    assert "--target 'logP' is not one of the labels" in msg and "logS" in msg
    assert not (tmp_path / "out").exists()


def test_existing_lmdb_is_reused_or_refused(tmp_path, capsys):
    from transformer_m import finetune_user as fu

    data = write_user_csv(tmp_path / "mols.csv")
    argv = ["--csv", str(data), "--label-columns", "logS", "--split-column", "split",
            "--out", str(tmp_path / "out"), "--workers", "1"]
    args = fu.build_parser().parse_args(argv)
    lmdb = fu.prepare_data(args, tmp_path / "out")
    stamp = (lmdb / "train.lmdb").stat().st_mtime_ns
    assert fu.prepare_data(args, tmp_path / "out") == lmdb
    assert "reusing" in capsys.readouterr().out
    assert (lmdb / "train.lmdb").stat().st_mtime_ns == stamp  # not rebuilt
    other = fu.build_parser().parse_args(argv[:-4] + ["--split-fractions", "0.6", "0.2", "0.2",
                                                      *argv[-4:]])
    other.split_column = None
    with pytest.raises(SystemExit, match="built differently"):
        fu.prepare_data(other, tmp_path / "out")
    direct = fu.build_parser().parse_args(["--lmdb", str(lmdb), "--out", str(tmp_path / "o2")])
    assert fu.prepare_data(direct, tmp_path / "o2") == lmdb


def test_thread_default():
    from transformer_m.threads import default_threads

    assert default_threads({"OMP_NUM_THREADS": "3"}, 16, 0.0) == (3, "OMP_NUM_THREADS")
    assert default_threads({}, 2, 0.0)[0] == 1  # small machine
    assert default_threads({}, 16, 12.0)[0] == 1  # busy machine
    assert default_threads({}, 16, 2.0)[0] == 14  # the idle cores


def test_metrics_baselines_and_verdict():
    from transformer_m import user_report as ur

    y = np.array([1.0, 2.0, np.nan, 4.0])
    m = ur.metrics("regression", y, np.array([1.5, 2.0, 9.0, 3.0]))
    assert m == {"n": 3, "n_missing": 1, "mae": pytest.approx(0.5),
                 "rmse": pytest.approx(math.sqrt(1.25 / 3))}
    pred, _ = ur.trivial_baseline("regression", np.array([1.0, 3.0, np.nan]), 2)
    assert pred.tolist() == [2.0, 2.0]
    pred, prob = ur.trivial_baseline("binary", np.array([1, 1, 0.0]), 2)
    assert pred.tolist() == [1.0, 1.0] and prob[0] == pytest.approx(2 / 3)
    b = ur.metrics("binary", np.array([0, 1, 1, 0.0]), np.array([0, 1, 0, 0.0]),
                   np.array([0.1, 0.9, 0.4, 0.2]))
    assert b["accuracy"] == 0.75 and b["roc_auc"] == 1.0 and b["pr_auc"] == 1.0
    scores = {"M": {"test": {"mae": 0.5}}, "mean": {"test": {"mae": 1.0}},
              "rf": {"test": {"mae": 0.4}}}
    text = ur.verdict("regression", scores, "test", "M", ["mean", "rf"])
    assert "beats mean" in text and "does not beat rf" in text
    table = ur.format_report("regression", scores)
    assert table.splitlines()[0].split()[:3] == ["predictor", "test", "MAE"]


def test_forest_baseline_learns_a_descriptor_property():
    from rdkit import Chem
    from rdkit.Chem import Descriptors

    from transformer_m import user_report as ur

    smiles = SMILES * 2
    y = np.array([Descriptors.MolWt(Chem.MolFromSmiles(s)) for s in smiles])
    out = ur.random_forest_baseline("regression", smiles[:30], y[:30], {"t": smiles[30:]},
                                    n_estimators=50)
    assert np.abs(out["t"][0] - y[30:]).mean() < 0.5 * np.abs(y[30:] - y[:30].mean()).mean()
