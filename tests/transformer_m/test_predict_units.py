"""Predictions in label units, channels and data facts in checkpoints (issue 12 items 1-2,
issue 10 items 6 and 8).

Tiny checkpoints are built in process (fairseq's config parsing, task, model with perturbed
weights, saved as ``Trainer.state_dict`` saves them, ``task_state`` included) on a 24-molecule
CSV with a regression label (mean ~6, std ~2: a standardised output is far from it), a binary
and a three-class label. For every task / loss / std-type / readout combination,
``fairseq-validate`` (its ``main``, in process) and ``transformer-m-predict`` run on the same
molecules and must agree: the validate MAE (or accuracy) equals the one computed from the
predict table.
"""
from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fairseq")
pytest.importorskip("rdkit")
torch = pytest.importorskip("torch")

from graphormer_ext.data import keys as K  # noqa: E402
from graphormer_ext.data.lmdb_dataset import LMDBDataset  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PLUGIN_DIR = REPO / "transformer_m"
TINY = [
    "--arch", "transformer_m_small", "--encoder-layers", "2", "--encoder-embed-dim", "16",
    "--encoder-ffn-embed-dim", "16", "--encoder-attention-heads", "2",
    "--num-3d-bias-kernel", "4",
]  # fmt: skip
SMILES = [
    "CCO", "CCN", "CCC", "CCCl", "c1ccccc1", "c1ccncc1", "CC(=O)O", "CC(=O)N", "CCOC",
    "CCCC", "CCCO", "CCCN", "OCCO", "NCCN", "CC#N", "C1CCCCC1", "C1CCOC1", "Cc1ccccc1",
    "Oc1ccccc1", "Nc1ccccc1", "CC(C)O", "CC(C)N", "CC(C)C", "FC(F)F",
]  # fmt: skip


def _rows():
    from rdkit import Chem

    rows = []
    for i, smi in enumerate(SMILES):
        mol = Chem.MolFromSmiles(smi)
        n = mol.GetNumAtoms()
        hetero = sum(a.GetSymbol() != "C" for a in mol.GetAtoms())
        split = "train" if i % 3 else "valid"
        rows.append((smi, 2.0 + 0.8 * n + 0.5 * hetero, int(hetero > 0), n % 3, split))
    return rows


def _write_csv(path: Path) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["smiles", "y", "active", "cls3", "split"])
        w.writerows(_rows())
    return path


def _preprocess(csv_path: Path, out: Path, *extra: str, labels: str = "y,active,cls3") -> Path:
    from graphormer_ext import preprocess

    argv = ["csv", "--path", str(csv_path), "--smiles-column", "smiles", "--label-columns",
            labels, "--split-column", "split", "--out", str(out), "--workers", "1",
            "--no-progress", *extra]
    assert preprocess.main(argv) == 0
    return out


@pytest.fixture(scope="module")
def units_data(tmp_path_factory):
    """``{"2d": lmdb dir, "3d": lmdb dir with conformers, "legacy": lmdb dir (legacy paths),
    "hops3": lmdb dir (--max-hops 3), "y": only the regression label (for graph_prediction,
    whose criterion compares every stored label column)}``."""
    root = tmp_path_factory.mktemp("units")
    src = _write_csv(root / "mols.csv")
    return {
        "2d": _preprocess(src, root / "lmdb2d"),
        "3d": _preprocess(src, root / "lmdb3d", "--conformers"),
        "legacy": _preprocess(src, root / "legacy", "--path-convention", "legacy"),
        "hops3": _preprocess(src, root / "hops3", "--max-hops", "3"),
        "y": _preprocess(src, root / "y", labels="y"),
    }


def make_checkpoint(path: Path, data: Path, *flags: str, seed: int = 3) -> Path:
    """Build task + model from fairseq flags, perturb the weights, save as the trainer does."""
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from omegaconf import OmegaConf

    argv = ["--user-dir", str(PLUGIN_DIR), "--data-path", str(data), *TINY, "--optimizer",
            "adam", "--lr", "1e-4", "--cpu", "--seed", str(seed), *flags]
    args = options.parse_args_and_arch(options.get_training_parser(), input_args=argv)
    cfg = convert_namespace_to_omegaconf(args)
    torch.manual_seed(seed)
    task = tasks.setup_task(cfg.task)
    task.load_dataset("valid")  # fairseq-train's order: valid, model, then train
    model = task.build_model(cfg.model)
    task.load_dataset("train")
    with torch.no_grad():  # predictions differ per molecule, and from the mean
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
        for m in model.modules():  # padding rows stay zero, as training keeps them
            if isinstance(m, torch.nn.Embedding) and m.padding_idx is not None:
                m.weight[m.padding_idx].zero_()
    state = {
        "args": None,
        "cfg": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
        "model": model.state_dict(),
        "criterion": None,
        "optimizer_history": [{"criterion_name": "x", "optimizer_name": "FairseqAdam",
                               "lr_scheduler_state": {"best": None}, "num_updates": 1}],
        "task_state": task.state_dict(),
        "extra_state": {"val_loss": 0.0},
    }
    torch.save(state, path)
    return path


def run_validate(ckpt: Path, data: Path, *flags: str) -> dict:
    """``fairseq-validate`` (its ``main``, in process) on ``valid``; the logged stats."""
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq_cli import validate

    task = torch.load(ckpt, weights_only=True)["cfg"]["task"]["_name"]
    argv = ["--user-dir", str(PLUGIN_DIR), "--path", str(ckpt), "--task", task,
            "--data-path", str(data), "--valid-subset", "valid", "--cpu", "--batch-size", "5",
            "--log-format", "json",
            *flags]
    args = options.parse_args_and_arch(options.get_validation_parser(), input_args=argv)
    override = options.parse_args_and_arch(options.get_validation_parser(), input_args=argv,
                                           suppress_defaults=True)
    # fairseq prints the stats through its progress-bar logger (renamed to the subset)
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    bar_logger = logging.getLogger("fairseq.logging.progress_bar")
    bar_logger.addHandler(handler)
    level = bar_logger.level
    bar_logger.setLevel(logging.INFO)
    try:
        validate.main(convert_namespace_to_omegaconf(args), override)
    finally:
        bar_logger.removeHandler(handler)
        bar_logger.setLevel(level)
    stats = [json.loads(r.getMessage()) for r in records
             if r.getMessage().startswith('{"valid_')]
    assert stats, [r.getMessage() for r in records]
    return {k: float(v) for k, v in stats[-1].items()}


def run_predict(capsys, ckpt: Path, *argv: str) -> tuple[int, list[dict], str]:
    from transformer_m.predict import main

    capsys.readouterr()  # drop what fairseq printed before
    code = main(["--checkpoint", str(ckpt), *argv])
    out = capsys.readouterr()
    rows = list(csv.DictReader(io.StringIO(out.out), delimiter="\t"))
    return code, rows, out.err


def valid_smiles_and_labels(data: Path) -> tuple[list[str], np.ndarray]:
    ds = LMDBDataset(data / "valid.lmdb")
    rows = [r for r in _rows() if r[-1] == "valid"]
    assert len(rows) == len(ds)
    return [r[0] for r in rows], np.stack([ds[i][K.Y] for i in range(len(ds))])


REGRESSION = [
    ("graph_prediction", ["--task", "graph_prediction", "--criterion", "graph_prediction",
                          "--dataset-name", "custom", "--num-classes", "1"], "y", "loss"),
    ("L1-no_std-cls", ["--loss-type", "L1", "--std-type", "no_std"], "y", "mae"),
    ("L2-std_logits-cls", ["--loss-type", "L2", "--std-type", "std_logits"], "y", "mae"),
    ("L1-std_labels-mean", ["--loss-type", "L1", "--std-type", "std_labels",
                            "--readout-type", "mean"], "y", "mae"),
    ("L2-std_logits-sum", ["--loss-type", "L2", "--std-type", "std_logits",
                           "--readout-type", "sum"], "y", "mae"),
]
QM9_TASK = ["--task", "graph_prediction_qm9", "--criterion", "graph_prediction_qm9",
            "--dataset-name", "custom", "--num-classes", "1", "--load-qm9", "--remove-head"]


@pytest.mark.parametrize("name,flags,column,metric", REGRESSION, ids=[r[0] for r in REGRESSION])
def test_predict_equals_validate_in_label_units(
    tmp_path, capsys, units_data, name, flags, column, metric
):
    data = units_data["y" if name == "graph_prediction" else "2d"]
    flags = flags if flags[0] == "--task" else [*QM9_TASK, *flags]
    ckpt = make_checkpoint(tmp_path / "ckpt.pt", data, *flags)
    stats = run_validate(ckpt, data)
    smiles, y = valid_smiles_and_labels(data)
    code, rows, _ = run_predict(capsys, ckpt, "--smiles", *smiles)
    assert code == 0 and [r["id"] for r in rows] == smiles
    assert column in rows[0], rows[0]  # named after the target
    pred = np.array([float(r[column]) for r in rows])
    mae = np.abs(pred - y[:, 0]).mean()
    assert mae == pytest.approx(stats[f"valid_{metric}"], rel=2e-4, abs=2e-4), (mae, stats)
    if "std_" in name:  # the standardisation is undone: label = raw * std + mean
        from transformer_m.inference import load_predictor, predict

        p = load_predictor(ckpt)
        ds = LMDBDataset(data / "valid.lmdb")
        raw = predict(p.model, [ds[i] for i in range(len(ds))], readout=p.spec.readout)[:, 0]
        assert p.spec.std > 1.0 and p.spec.mean > 4.0
        np.testing.assert_allclose(pred, raw * p.spec.std + p.spec.mean, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("loss,classes,column,index", [("BCE", 1, "active", 1),
                                                       ("CE", 3, "cls3", 2)])
def test_predict_classes_equal_validate_accuracy(
    tmp_path, capsys, units_data, loss, classes, column, index
):
    data = units_data["2d"]
    flags = [*QM9_TASK, "--loss-type", loss, "--std-type", "no_std", "--task-idx", str(index)]
    flags[flags.index("--num-classes") + 1] = str(classes)
    ckpt = make_checkpoint(tmp_path / "ckpt.pt", data, *flags)
    stats = run_validate(ckpt, data)
    smiles, y = valid_smiles_and_labels(data)
    code, rows, _ = run_predict(capsys, ckpt, "--smiles", *smiles)
    assert code == 0
    cls = np.array([float(r[column]) for r in rows])
    assert set(cls) <= set(range(max(classes, 2)))
    acc = (cls == y[:, index]).mean()
    assert acc == pytest.approx(stats["valid_accuracy"], abs=1e-4)
    if loss == "BCE":
        prob = np.array([float(r[f"{column}_prob"]) for r in rows])
        assert ((prob > 0.5) == (cls == 1)).all() and ((0 <= prob) & (prob <= 1)).all()
    else:
        probs = np.array([[float(r[f"{column}_prob{k}"]) for k in range(3)] for r in rows])
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
        assert (probs.argmax(1) == cls).all()


# --- channels (issue 12 item 2) -------------------------------------------------------------
def test_3d_only_checkpoint_generates_conformers_or_refuses(
    tmp_path, capsys, units_data
):
    data = units_data["3d"]
    ckpt = make_checkpoint(tmp_path / "ckpt3d.pt", data, *QM9_TASK, "--loss-type", "L2",
                           "--std-type", "std_logits", "--add-3d", "--no-2d")
    state = torch.load(ckpt, weights_only=True)
    channels = state["task_state"]["data"]["channels"]
    assert channels == {"2d": False, "3d": True, "modes": ["3D"], "needs_3d": True}
    smiles, y = valid_smiles_and_labels(data)
    code, rows, err = run_predict(capsys, ckpt, "--smiles", *smiles[:3])
    assert code == 0 and [r["mode"] for r in rows] == ["3D"] * 3
    assert "only trained on molecules with 3D coordinates" in err and "generated RDKit" in err
    assert "3 input(s)" in err
    code, rows, err = run_predict(capsys, ckpt, "--no-conformer", "--smiles", *smiles[:2])
    assert code == 1 and [r["mode"] for r in rows] == ["ERROR", "ERROR"]
    assert "only trained on molecules with 3D coordinates" in rows[0]["error"]
    # a 2D-trained checkpoint keeps plain SMILES in 2D and records it
    ckpt2d = make_checkpoint(tmp_path / "ckpt2d.pt", units_data["2d"], *QM9_TASK,
                             "--loss-type", "L2", "--std-type", "std_logits", "--add-3d")
    ch = torch.load(ckpt2d, weights_only=True)["task_state"]["data"]["channels"]
    assert ch["modes"] == ["2D"] and not ch["3d"] and not ch["needs_3d"]
    code, rows, err = run_predict(capsys, ckpt2d, "--smiles", "CCO")
    assert code == 0 and rows[0]["mode"] == "2D" and "conformer" not in err


# --- data facts (issue 10 item 6) -------------------------------------------------------------
def test_checkpoint_stores_data_facts(tmp_path, units_data):
    ckpt = make_checkpoint(tmp_path / "c.pt", units_data["2d"], *QM9_TASK, "--loss-type", "L2",
                           "--std-type", "std_logits")
    data = torch.load(ckpt, weights_only=True)["task_state"]["data"]
    assert data["path_convention"] == "fixed" and data["max_hops"] == 5
    assert data["featurizer_version"].startswith("ogb-") and data["remove_hs"] is True
    assert data["targets"] == ["y", "active", "cls3"]
    target = data["target"]
    assert target["name"] == "y" and target["index"] == 0 and target["std"] > 1.0
    assert target["std_type"] == "std_logits"


@pytest.mark.parametrize("other", ["legacy", "hops3"])
def test_mixed_splits_are_refused_unless_overridden(tmp_path, units_data, other):
    import shutil

    from transformer_m.data_facts import DataMismatchError
    from transformer_m.tasks.graph_prediction_qm9 import (
        GraphPredictionQM9Config,
        GraphPredictionQM9Task,
    )

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(units_data["2d"] / "train.lmdb", mixed / "train.lmdb")
    shutil.copy(units_data[other] / "valid.lmdb", mixed / "valid.lmdb")

    def task(**kw):
        from omegaconf import OmegaConf

        cfg = OmegaConf.structured(GraphPredictionQM9Config(data_path=str(mixed), seed=1, **kw))
        return GraphPredictionQM9Task(cfg)

    t = task()
    t.load_dataset("train")
    with pytest.raises(DataMismatchError) as err:
        t.load_dataset("valid")
    msg = str(err.value)
    assert "\n" not in msg and "valid.lmdb" in msg and "--allow-data-mismatch" in msg
    assert ("path_convention 'fixed' vs 'legacy'" in msg) if other == "legacy" else (
        "max_hops 5 vs 3" in msg)
    ok = task(allow_data_mismatch=True)
    ok.load_dataset("train")
    ok.load_dataset("valid")  # a warning, not an error


def test_validate_and_predict_refuse_data_of_another_convention(
    tmp_path, capsys, units_data
):
    from transformer_m.data_facts import DataMismatchError

    ckpt = make_checkpoint(tmp_path / "c.pt", units_data["2d"], *QM9_TASK, "--loss-type", "L1",
                           "--std-type", "no_std")
    with pytest.raises(DataMismatchError, match="the checkpoint's training data"):
        run_validate(ckpt, units_data["legacy"])
    stats = run_validate(ckpt, units_data["legacy"], "--allow-data-mismatch")
    assert np.isfinite(stats["valid_mae"])
    code, _, err = run_predict(capsys, ckpt, "--smiles", "CCO", "--path-convention", "legacy")
    assert code == 2 and "path_convention 'fixed' vs 'legacy'" in err
    assert len([ln for ln in err.splitlines() if ln.startswith("error:")]) == 1
    code, rows, err = run_predict(capsys, ckpt, "--smiles", "CCO", "--path-convention",
                                  "legacy", "--allow-data-mismatch")
    assert code == 0 and rows[0]["mode"] == "2D"
    # the checkpoint's convention is the default: a legacy-trained model reads legacy inputs
    legacy_ckpt = make_checkpoint(tmp_path / "l.pt", units_data["legacy"], *QM9_TASK,
                                  "--loss-type", "L1", "--std-type", "no_std")
    from transformer_m.predict import _featurization_settings, build_parser
    from transformer_m.inference import load_predictor

    args = build_parser().parse_args(["--checkpoint", str(legacy_ckpt), "--smiles", "C"])
    assert _featurization_settings(args, load_predictor(legacy_ckpt)) == []
    assert args.path_convention == "legacy" and args.max_hops == 5


# --- real CSV/TSV (issue 10 item 8) -----------------------------------------------------------
def test_predict_table_quotes_titles(tmp_path, capsys, units_data):
    from rdkit import Chem
    from rdkit.Chem import AllChem

    ckpt = make_checkpoint(tmp_path / "c.pt", units_data["2d"], *QM9_TASK, "--loss-type", "L1",
                           "--std-type", "no_std")
    sdf = tmp_path / "t.sdf"
    with Chem.SDWriter(str(sdf)) as w:
        for title in ("tab\there", 'comma, "quote"'):
            mol = Chem.AddHs(Chem.MolFromSmiles("CCO"))
            AllChem.EmbedMolecule(mol, randomSeed=1)
            mol.SetProp("_Name", title)
            w.write(mol)
    code, rows, _ = run_predict(capsys, ckpt, "--sdf", str(sdf))
    assert code == 0 and [r["id"] for r in rows] == ["tab\there", 'comma, "quote"']
    assert all(r["mode"] == "2D" and r["error"] == "" for r in rows)  # 2D-trained model
    out = tmp_path / "p.csv"
    assert run_predict(capsys, ckpt, "--sdf", str(sdf), "--out", str(out))[0] == 0
    with open(out, newline="") as f:
        back = list(csv.DictReader(f))
    assert [r["id"] for r in back] == ["tab\there", 'comma, "quote"']
    assert set(back[0]) == {"id", "mode", "y", "error"}


def test_no_3d_input_trains_and_predicts_2d_on_3d_data(tmp_path, capsys, units_data):
    """--no-3d-input: positions stay in the LMDB but never reach the model (2D channels)."""
    data = units_data["3d"]
    ckpt = make_checkpoint(tmp_path / "c.pt", data, *QM9_TASK, "--loss-type", "L1",
                           "--std-type", "no_std", "--add-3d", "--no-3d-input")
    channels = torch.load(ckpt, weights_only=True)["task_state"]["data"]["channels"]
    assert channels["modes"] == ["2D"] and not channels["3d"]
    stats = run_validate(ckpt, data)
    smiles, y = valid_smiles_and_labels(data)
    code, rows, err = run_predict(capsys, ckpt, "--smiles", *smiles, "--conformer")
    assert code == 0 and {r["mode"] for r in rows} == {"2D"}
    assert "coordinates are ignored" in err
    pred = np.array([float(r["y"]) for r in rows])
    assert np.abs(pred - y[:, 0]).mean() == pytest.approx(stats["valid_mae"], abs=2e-4)


def test_checkpoint_of_an_earlier_version_loads_and_validates(tmp_path, capsys, units_data):
    """A checkpoint without the config fields added since (--torch-compile, --no-3d-input, ...)
    and without stored data facts still predicts and validates (their defaults are filled)."""
    data = units_data["2d"]
    ckpt = make_checkpoint(tmp_path / "c.pt", data, *QM9_TASK, "--loss-type", "L1",
                           "--std-type", "no_std")
    state = torch.load(ckpt, weights_only=True)
    for section, name in (("model", "torch_compile"), ("task", "no_3d_input"),
                          ("task", "allow_data_mismatch")):
        del state["cfg"][section][name]
    del state["task_state"]["data"]
    old = tmp_path / "old.pt"
    torch.save(state, old)
    stats = run_validate(old, data)
    smiles, y = valid_smiles_and_labels(data)
    code, rows, _ = run_predict(capsys, old, "--smiles", *smiles)
    assert code == 0
    pred = np.array([float(r["target0"]) for r in rows])  # no stored target name
    assert np.abs(pred - y[:, 0]).mean() == pytest.approx(stats["valid_mae"], abs=2e-4)
