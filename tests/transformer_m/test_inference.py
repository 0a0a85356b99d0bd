"""Inference API, ``transformer-m-predict`` and the PCQM4Mv2 evaluation script.

A tiny checkpoint in fairseq's format (what ``Trainer.state_dict`` saves) is built in
process; the released-checkpoint tests use a synthetic "released" file (tiny
``TransformerMNet`` weights saved with an ``argparse.Namespace``).
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
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
from graphormer_ext.data.lmdb_writer import write_split  # noqa: E402
from graphormer_ext.featurize.pipeline import featurize_record  # noqa: E402
from graphormer_ext.sources.base import SourceRecord  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
EVAL_SCRIPT = REPO / "scripts" / "evaluate" / "evaluate_pcqm4mv2.py"
PLUGIN_DIR = REPO / "transformer_m"

INFERENCE_SMILES = [
    "CCO",
    "c1ccccc1O",
    "CC(=O)N",
    "C#N",
    "OCC(O)CO",
    "CN1C=NC2=C1C(=O)N(C)C(=O)N2C",
]
INFERENCE_TINY_NET = dict(
    num_layers=2,
    embed_dim=16,
    ffn_embed_dim=16,
    num_heads=2,
    num_3d_bias_kernel=8,
    add_3d=True,
    activation_fn="gelu",
    encoder_normalize_before=True,
    apply_init=True,
)
WATER_XYZ = (
    "3\nwater\nO 0.000 0.000 0.117\nH 0.000 0.757 -0.467\nH 0.000 -0.757 -0.467\n"
)
# a checkpoint without stored data facts: the output is not named after a target
HEADER = ["id", "mode", "prediction", "error"]


class InferencePayload:
    """A class on no allow-list: a checkpoint holding one must not be unpickled."""


def _smiles_record(smi: str) -> dict:
    return featurize_record(SourceRecord("t", 0, smi, "smiles", smi))


def _conformer_record(smi: str, seed: int = 0) -> dict:
    from transformer_m.predict import generate_conformer

    block = generate_conformer(smi, smi, seed=seed)
    rec = SourceRecord("t", 0, smi, "molblock", block, use_3d=True)
    return featurize_record(rec)


def _load_eval_script():
    spec = importlib.util.spec_from_file_location("evaluate_pcqm4mv2", EVAL_SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# --- fixtures -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def inference_checkpoint(tmp_path_factory):
    """``(path, model)``: a tiny Transformer-M (2 layers, D 16, 3D channel) saved as
    fairseq's ``Trainer.state_dict`` saves it, and the in-memory model."""
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from omegaconf import OmegaConf

    argv = [
        "--user-dir", str(PLUGIN_DIR), "--task", "graph_prediction",
        "--data-path", "/nonexistent/data", "--criterion", "graph_prediction",
        "--arch", "transformer_m_small", "--num-classes", "1", "--add-3d",
        "--encoder-layers", "2", "--encoder-embed-dim", "16",
        "--encoder-ffn-embed-dim", "16", "--encoder-attention-heads", "2",
        "--num-3d-bias-kernel", "8", "--optimizer", "adam", "--lr", "1e-4",
        "--cpu", "--seed", "3",
    ]  # fmt: skip
    args = options.parse_args_and_arch(options.get_training_parser(), input_args=argv)
    cfg = convert_namespace_to_omegaconf(args)
    torch.manual_seed(3)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    with torch.no_grad():  # a non-trivial model: predictions differ per molecule
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("inference_ckpt") / "checkpoint_best.pt"
    history = {
        "criterion_name": "GraphPredictionCriterion",
        "optimizer_name": "FairseqAdam",
        "lr_scheduler_state": {"best": None},
        "num_updates": 7,
    }
    state = {
        "args": None,
        "cfg": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
        "model": model.state_dict(),
        "criterion": None,
        "optimizer_history": [history],
        "task_state": {},
        "extra_state": {"previous_training_time": 1.5, "val_loss": 0.25},
    }
    torch.save(state, path)
    return path, model.eval()


@pytest.fixture(scope="module")
def inference_released(tmp_path_factory):
    """``(path, net)``: a synthetic released checkpoint (tiny weights, Namespace)."""
    from transformer_m.modules import TransformerMNet

    torch.manual_seed(5)
    net = TransformerMNet(**INFERENCE_TINY_NET)
    path = tmp_path_factory.mktemp("inference_released") / "L12.pt"
    state = {
        "args": argparse.Namespace(arch="transformer_m_base", encoder_layers=12),
        "model": {k: v.half() for k, v in net.state_dict().items()},  # as --fp16
        "optimizer_history": [{"num_updates": 1}],
        "extra_state": {},
    }
    torch.save(state, path)
    return path, net.eval()


@pytest.fixture(scope="module")
def inference_lmdb(tmp_path_factory):
    """A directory with ``valid.lmdb`` (labelled) and ``test-dev.lmdb`` (hidden)."""
    out = tmp_path_factory.mktemp("inference_lmdb")
    rng = np.random.default_rng(0)
    splits = {
        "valid": [
            SourceRecord(
                "valid", i, f"valid {i}", "smiles", s,
                y=np.array([5.0 + rng.normal()], np.float32),
            )
            for i, s in enumerate(INFERENCE_SMILES)
        ],
        "test-dev": [
            SourceRecord(
                "test-dev", i, f"test {i}", "smiles", s,
                y=np.array([np.nan], np.float32),
            )
            for i, s in enumerate(INFERENCE_SMILES[:4])
        ],
    }  # fmt: skip
    for name, recs in splits.items():
        write_split(out / f"{name}.lmdb", recs, split=name, workers=1, progress=False)
    return out


# --- inference API ------------------------------------------------------------------
def test_load_model_round_trip(inference_checkpoint):
    from graphormer_ext.data.collator import Collator
    from transformer_m.inference import load_model, predict
    from transformer_m.models import TransformerMModel

    path, ref = inference_checkpoint
    model, cfg = load_model(path)
    assert isinstance(model, TransformerMModel) and not model.training
    assert cfg.model.encoder_layers == 2 and cfg.model.add_3d
    got_state, ref_state = model.state_dict(), ref.state_dict()
    assert list(got_state) == list(ref_state)
    assert all(torch.equal(got_state[k], ref_state[k]) for k in ref_state)

    records = [_smiles_record(s) for s in INFERENCE_SMILES]
    got = predict(model, records, batch_size=4)
    assert got.shape == (len(records), 1) and got.dtype == np.float32
    with torch.no_grad():
        batch = Collator(max_hops=5, with_pos=False)(list(enumerate(records)))
        want = ref(batch)[0][:, 0, :].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.ptp(got) > 0


def test_predict_keeps_order_and_separates_2d_3d(inference_checkpoint):
    from transformer_m.inference import predict, record_mode

    _, model = inference_checkpoint
    recs_3d = [_conformer_record(s) for s in INFERENCE_SMILES[:3]]
    recs_2d = [_smiles_record(s) for s in INFERENCE_SMILES[:3]]
    mixed = [recs_3d[0], recs_2d[0], recs_2d[1], recs_3d[1], recs_3d[2], recs_2d[2]]
    modes = [record_mode(r, model) for r in mixed]
    assert modes == ["3D", "2D", "2D", "3D", "3D", "2D"]
    together = predict(model, mixed, batch_size=4)
    alone = np.concatenate([predict(model, [r], batch_size=1) for r in mixed])
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-5)
    # the 3D channel changes the prediction of the same molecule
    assert abs(together[0, 0] - together[1, 0]) > 1e-6
    assert predict(model, [], batch_size=2).shape == (0, 1)


def test_predict_single_atom_molecules(inference_checkpoint):
    from transformer_m.inference import predict

    _, model = inference_checkpoint
    methane, ethane = _smiles_record("C"), _smiles_record("CC")
    assert methane[K.EDGE_INPUT].shape[2] == 0  # no path at all
    alone = predict(model, [methane, methane], batch_size=2)
    with_neighbour = predict(model, [methane, ethane], batch_size=2)
    np.testing.assert_allclose(alone[0], with_neighbour[0], rtol=1e-5, atol=1e-6)


def test_load_model_rejects_released_and_unsafe_files(tmp_path, inference_released):
    from transformer_m.inference import CheckpointLoadError, load_model

    with pytest.raises(CheckpointLoadError, match="load_released_model"):
        load_model(inference_released[0])  # no cfg

    bad = tmp_path / "bad.pt"
    torch.save({"model": {}, "cfg": {}, "extra": InferencePayload()}, bad)
    with pytest.raises(CheckpointLoadError, match="outside the allow-list"):
        load_model(bad)
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing.pt")


# --- released checkpoints -----------------------------------------------------------
def test_load_released_state_dict_weights_only(tmp_path, inference_released):
    from transformer_m.inference import (
        CheckpointLoadError,
        load_released_model,
        load_released_state_dict,
    )
    from transformer_m.modules import TransformerMNet

    path, net = inference_released
    state = load_released_state_dict(path)
    assert set(state) == set(net.state_dict())
    assert any(k.startswith("encoder.molecule_encoder.atom_proc.") for k in state)

    model = load_released_model(path, model=TransformerMNet(**INFERENCE_TINY_NET))
    assert not model.training
    for k, v in model.state_dict().items():
        assert v.dtype == torch.float32
        torch.testing.assert_close(v, net.state_dict()[k].half().float())

    unsafe = tmp_path / "unsafe.pt"
    torch.save({"args": InferencePayload(), "model": net.state_dict()}, unsafe)
    with pytest.raises(CheckpointLoadError, match="outside the allow-list"):
        load_released_state_dict(unsafe)

    smaller = TransformerMNet(**dict(INFERENCE_TINY_NET, num_layers=1))
    with pytest.raises(CheckpointLoadError, match="Unexpected key"):
        load_released_model(path, model=smaller)


def test_build_released_model_sizes():
    from transformer_m.inference import build_released_model

    net = build_released_model(12)
    enc = net.molecule_encoder
    assert len(enc.layers) == 12 and enc.embed_dim == 768 and enc.num_heads == 32
    assert enc.emb_layer_norm is not None and enc.molecule_3d_bias is not None
    n = sum(p.numel() for p in net.parameters())
    assert 49.0e6 < n < 50.2e6  # spec §1.14: about 49.6M with both heads
    with pytest.raises(ValueError):
        build_released_model(6)


# --- transformer-m-predict ----------------------------------------------------------
def _run_predict(capsys, argv):
    """Exit code, rows as ``[id, mode, value or error]``, stderr."""
    from transformer_m.predict import main

    code = main(argv)
    out = capsys.readouterr()
    table = list(csv.reader(io.StringIO(out.out), delimiter="\t"))
    assert table[0] == HEADER
    rows = [[r[0], r[1], r[3] if r[1] == "ERROR" else r[2]] for r in table[1:]]
    return code, rows, out.err


def test_predict_cli_inputs(tmp_path, capsys, inference_checkpoint):
    from rdkit import Chem
    from rdkit.Chem import AllChem

    from transformer_m.inference import predict

    path, model = inference_checkpoint
    xyz = tmp_path / "water.xyz"
    xyz.write_text(WATER_XYZ)
    missing = tmp_path / "missing.xyz"
    sdf = tmp_path / "mols.sdf"
    mol3d = Chem.AddHs(Chem.MolFromSmiles("CC(=O)N"))
    AllChem.EmbedMolecule(mol3d, randomSeed=1)
    mol3d.SetProp("_Name", "acetamide")
    flat = Chem.MolFromSmiles("CCN")
    AllChem.Compute2DCoords(flat)
    flat.SetProp("_Name", "flat")
    with Chem.SDWriter(str(sdf)) as w:
        w.write(mol3d)
        w.write(flat)

    argv = ["--checkpoint", str(path), "--smiles", "CCO", "C1CC(", "c1ccccc1O"]
    argv += ["--sdf", str(sdf), "--xyz", str(xyz), str(missing)]
    code, rows, err = _run_predict(capsys, argv)
    assert code == 1
    assert [r[:2] for r in rows] == [
        ["CCO", "2D"],
        ["C1CC(", "ERROR"],
        ["c1ccccc1O", "2D"],
        ["acetamide", "3D"],
        ["flat", "2D"],
        [str(xyz), "3D"],
        [str(missing), "ERROR"],
    ]
    assert "unparsable SMILES" in rows[1][2] and "cannot read" in rows[6][2]
    assert "2 of 7" in err and "flat 2D coordinates" in err
    want = predict(model, [_smiles_record("CCO"), _smiles_record("c1ccccc1O")])
    assert float(rows[0][2]) == pytest.approx(float(want[0, 0]), abs=1e-4)
    assert float(rows[2][2]) == pytest.approx(float(want[1, 0]), abs=1e-4)

    code, rows, _ = _run_predict(capsys, ["--checkpoint", str(path), "--smiles", "C"])
    assert code == 0 and rows[0][:2] == ["C", "2D"]


def test_predict_cli_conformer_and_smiles_file(tmp_path, capsys, inference_checkpoint):
    path, _ = inference_checkpoint
    smi = tmp_path / "in.smi"
    smi.write_text("# comment\nCCO ethanol\n\nc1ccccc1O\n")
    argv = ["--checkpoint", str(path), "--smiles-file", str(smi)]
    code, rows, _ = _run_predict(capsys, argv + ["--conformer"])
    assert code == 0
    assert [r[:2] for r in rows] == [["ethanol", "3D"], [f"{smi}:4", "3D"]]
    _, again, _ = _run_predict(capsys, argv + ["--conformer"])
    assert again == rows  # seeded: the same conformers
    _, rows_2d, _ = _run_predict(capsys, argv)
    assert rows_2d[0][1] == "2D" and rows_2d[0][2] != rows[0][2]


def test_predict_cli_conformer_failure(capsys, monkeypatch, inference_checkpoint):
    from rdkit.Chem import AllChem

    calls = []

    def failing_embed(mol, params):
        calls.append(params.useRandomCoords)
        return -1

    monkeypatch.setattr(AllChem, "EmbedMolecule", failing_embed)
    argv = ["--checkpoint", str(inference_checkpoint[0]), "--smiles", "CCO"]
    code, rows, _ = _run_predict(capsys, argv + ["--conformer"])
    assert code == 1 and rows[0][:2] == ["CCO", "ERROR"]
    assert "conformer generation failed" in rows[0][2]
    assert calls == [False, True]  # retried from random coordinates


# --- evaluation script --------------------------------------------------------------
def test_evaluate_valid_and_test_dev(
    tmp_path, capsys, inference_checkpoint, inference_lmdb
):
    from transformer_m.inference import predict

    mod = _load_eval_script()
    path, model = inference_checkpoint
    out = tmp_path / "eval"
    base = ["--checkpoint", str(path), "--data-path", str(inference_lmdb)]
    base += ["--out", str(out), "--batch-size", "4", "--device", "cpu", "--no-progress"]

    assert mod.main(base + ["--split", "valid"]) == 0
    stdout = capsys.readouterr().out
    with open(out / "valid_predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["idx"]) for r in rows] == list(range(len(INFERENCE_SMILES)))
    y_true = np.array([float(r["y_true"]) for r in rows])
    y_pred = np.array([float(r["y_pred"]) for r in rows])
    ds = LMDBDataset(inference_lmdb / "valid.lmdb")
    np.testing.assert_allclose(y_pred, predict(model, ds)[:, 0], atol=1e-5)
    metrics = json.loads((out / "valid_metrics.json").read_text())
    assert metrics["mae"] == pytest.approx(np.abs(y_true - y_pred).mean(), abs=1e-5)
    assert metrics["num_molecules"] == len(INFERENCE_SMILES)
    assert f"MAE = {metrics['mae']:.5f}" in stdout
    assert (out / "valid_parity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert mod.main(base + ["--split", "test-dev"]) == 0
    stdout = capsys.readouterr().out
    assert "NOT a valid OGB submission" in stdout and "147,037" in stdout
    with np.load(out / "y_pred_pcqm4m-v2_test-dev.npz") as sub:
        assert sub["y_pred"].shape == (4,) and sub["y_pred"].dtype == np.float32
    with open(out / "test-dev_predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and all(r["y_true"] == "" for r in rows)
    assert not (out / "test-dev_parity.png").exists()
    metrics = json.loads((out / "test-dev_metrics.json").read_text())
    assert metrics["submission_valid"] is False and metrics["mae"] is None


def test_evaluate_full_size_submission_uses_ogb(tmp_path):
    mod = _load_eval_script()
    y = np.linspace(3, 9, mod.SUBMISSION_SIZES["test-dev"]).astype(np.float32)
    target, valid = mod.write_submission(tmp_path, "test-dev", y)
    assert valid and target.name == "y_pred_pcqm4m-v2_test-dev.npz"
    with np.load(target) as sub:
        np.testing.assert_array_equal(sub["y_pred"], y)


def test_evaluate_released_refuses_fixed_paths_unless_allowed(
    tmp_path, capsys, caplog, monkeypatch, inference_released, inference_lmdb
):
    from transformer_m.inference import RELEASED_FACTS, load_released_model
    from transformer_m.modules import TransformerMNet

    mod = _load_eval_script()
    path, _ = inference_released

    def load_tiny(args, device):  # the real L12 sizes are too large for a unit test
        model = load_released_model(args.checkpoint, model=TransformerMNet(**INFERENCE_TINY_NET))
        return model, dict(RELEASED_FACTS)

    monkeypatch.setattr(mod, "load_checkpoint", load_tiny)
    argv = ["--checkpoint", str(path), "--released", "L12", "--split", "valid"]
    argv += ["--data-path", str(inference_lmdb), "--out", str(tmp_path / "eval")]
    argv += ["--no-progress", "--no-plot", "--device", "cpu"]
    assert mod.main(argv) == 2
    err = capsys.readouterr().err
    assert "path_convention 'legacy' vs 'fixed'" in err and "--path-convention legacy" in err
    assert not (tmp_path / "eval").exists()  # refused before writing anything
    with caplog.at_level(logging.WARNING):
        assert mod.main(argv + ["--allow-data-mismatch"]) == 0
    messages = [r.getMessage() for r in caplog.records]
    assert any("legacy" in m and "'fixed'" in m for m in messages)


def test_evaluate_refuses_data_built_unlike_the_checkpoints(
    tmp_path, capsys, inference_checkpoint, inference_lmdb
):
    """Our checkpoints carry their training data's facts: a split with another path
    convention or fewer hops is refused, with the flags that rebuild it."""
    mod = _load_eval_script()
    state = torch.load(inference_checkpoint[0], weights_only=True)
    state["task_state"] = {"data": {"path_convention": "legacy", "max_hops": 5}}
    ckpt = tmp_path / "checkpoint_legacy.pt"
    torch.save(state, ckpt)
    argv = ["--checkpoint", str(ckpt), "--data-path", str(inference_lmdb), "--split", "valid",
            "--out", str(tmp_path / "eval"), "--no-progress", "--no-plot", "--device", "cpu"]
    assert mod.main(argv) == 2
    err = capsys.readouterr().err
    assert "path_convention 'legacy' vs 'fixed'" in err
    assert "--path-convention legacy --max-hops 5" in err
    assert mod.main([*argv, "--allow-data-mismatch"]) == 0
    # the checkpoint's own convention: evaluated without a word
    assert mod.main([*argv[:1], str(inference_checkpoint[0]), *argv[2:]]) == 0


def test_single_atom_only_batch_matches_mixed_batch():
    """Methane alone (no path hop in the batch) predicts what it predicts next to ethanol."""
    from graphormer_ext.data.collator import Collator
    from graphormer_ext.featurize.graph import graph_to_record
    from graphormer_ext.featurize.molecules import mol_from_smiles
    from graphormer_ext.featurize.ogb_features import mol_to_graph
    from transformer_m.modules import TransformerMNet

    def rec(smiles, idx):
        g = mol_to_graph(mol_from_smiles(smiles, smiles))
        return dict(graph_to_record(g["node_feat"], g["edge_index"], g["edge_attr"]), idx=idx)

    torch.manual_seed(0)
    for impl in ("fast", "reference"):
        net = TransformerMNet(num_layers=2, embed_dim=16, ffn_embed_dim=16, num_heads=4,
                              num_3d_bias_kernel=8, add_3d=True, implementation=impl).eval()
        with torch.no_grad():
            alone = net(Collator()([rec("C", 0)]))[0][:, 0]
            mixed = net(Collator()([rec("C", 0), rec("CCO", 1)]))[0][:1, 0]
        torch.testing.assert_close(alone, mixed, rtol=0, atol=1e-4)
