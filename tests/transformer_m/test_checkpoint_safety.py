"""No checkpoint flag runs code from the file; broken files get a one-line error (issue 10 items 1, 7).

A payload checkpoint (a pickle whose ``__reduce__`` writes a marker file) is planted behind every
flag that takes a checkpoint: ``transformer-m-predict --checkpoint`` (ours and ``--released``),
``finetune_user --pretrained``, ``gsrd --pretrained-encoder``, the evaluation scripts, and
fairseq's own ``--restore-file``, ``checkpoint_last.pt`` in ``--save-dir``,
``--finetune-from-model`` and ``fairseq-validate --path`` (subprocesses, with
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``, which turns fairseq's plain ``torch.load`` into full
unpickling). Each must refuse with one line naming the file, and the marker must not appear.
"""
from __future__ import annotations

import importlib.util
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fairseq")
torch = pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[2]
PLUGIN_DIR = REPO / "transformer_m"
VENV_BIN = Path(sys.executable).parent
TIMEOUT = 300
TINY = [
    "--arch", "transformer_m_small", "--encoder-layers", "1", "--encoder-embed-dim", "16",
    "--encoder-ffn-embed-dim", "16", "--encoder-attention-heads", "2",
    "--num-3d-bias-kernel", "4",
]  # fmt: skip


class Payload:
    """Unpickling this writes ``marker``: proof that code from the file ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('payload ran')",))


def plant(path: Path, marker: Path, *, legacy_layout: bool = False) -> Path:
    """A checkpoint-shaped file with the payload inside (fairseq keys, or released ones)."""
    if legacy_layout:
        state = {"args": Payload(marker), "model": {"w": torch.zeros(1)}}
    else:
        state = {"args": None, "cfg": {"x": Payload(marker)}, "model": {"w": torch.zeros(1)}}
    torch.save(state, path)
    return path


def one_error_line(text: str, needle: str) -> str:
    """The single line of ``text`` containing ``needle``; no traceback anywhere."""
    assert "Traceback" not in text, text[-3000:]
    hits = [ln for ln in text.splitlines() if needle in ln]
    assert len(hits) == 1, text[-3000:]
    return hits[0]


# --- in process: our own flags ----------------------------------------------------------------
def test_loader_refuses_payloads_and_names_the_fix(tmp_path):
    from transformer_m.checkpoint import CheckpointLoadError, load_checkpoint_file

    marker = tmp_path / "MARKER"
    for layout in (False, True):
        bad = plant(tmp_path / f"bad{layout}.pt", marker, legacy_layout=layout)
        with pytest.raises(CheckpointLoadError) as err:
            load_checkpoint_file(bad)
        msg = str(err.value)
        assert "\n" not in msg and str(bad) in msg and "builtins.exec" in msg
        assert "refused" in msg
    legacy = tmp_path / "legacy_format.pt"
    torch.save({"x": Payload(marker)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointLoadError, match="builtins.exec"):
        load_checkpoint_file(legacy)
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps({"model": Payload(marker)}))
    with pytest.raises(CheckpointLoadError, match="plain pickle .* torch.save"):
        load_checkpoint_file(raw)
    assert not marker.exists()


def test_loader_reads_what_real_checkpoints_hold(tmp_path):
    """argparse.Namespace (released files), numpy meter values, omegaconf containers."""
    import argparse

    import numpy as np
    from omegaconf import OmegaConf

    from transformer_m.checkpoint import load_checkpoint_file

    state = {
        "args": argparse.Namespace(arch="transformer_m_base", lr=[2e-4]),
        "cfg": OmegaConf.create({"model": {"_name": "x", "dims": [1, 2]}, "none": None}),
        "extra_state": {"best": np.float64(0.5), "hist": np.arange(3), "n": np.int64(7)},
        "model": {"w": torch.ones(2)},
    }
    path = tmp_path / "ok.pt"
    torch.save(state, path)
    back = load_checkpoint_file(path)
    assert back["args"].arch == "transformer_m_base"
    assert back["cfg"]["model"]["dims"][1] == 2
    assert float(back["extra_state"]["best"]) == 0.5 and back["extra_state"]["hist"][2] == 2


def test_truncated_empty_and_foreign_files_get_one_line(tmp_path):
    from transformer_m.checkpoint import CheckpointLoadError, load_checkpoint_file

    good = tmp_path / "good.pt"
    torch.save({"model": {"w": torch.zeros(1000)}}, good)
    data = good.read_bytes()
    cases = {
        "trunc.pt": (data[: len(data) // 2], "truncated or corrupt"),
        "empty.pt": (b"", "empty"),
        "text.pt": (b"hello\n", "not a torch checkpoint"),
    }
    for name, (content, expected) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointLoadError) as err:
            load_checkpoint_file(tmp_path / name)
        msg = str(err.value)
        assert expected in msg and str(tmp_path / name) in msg and "\n" not in msg, msg
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint_file(tmp_path / "missing.pt")


def test_predict_refuses_payload_and_raw_pickle(tmp_path, capsys):
    from transformer_m.predict import main

    marker = tmp_path / "MARKER"
    bad = plant(tmp_path / "bad.pt", marker)
    released = plant(tmp_path / "L12.pt", marker, legacy_layout=True)
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps({"model": {}}))
    for argv, path in (
        (["--checkpoint", str(bad)], bad),
        (["--checkpoint", str(released), "--released", "L12"], released),
        (["--checkpoint", str(raw)], raw),
    ):
        assert main([*argv, "--smiles", "CCO"]) == 2
        err = capsys.readouterr().err
        line = one_error_line(err, "cannot load")
        assert str(path) in line
    assert "plain pickle" in line
    assert not marker.exists()


def test_finetune_user_pretrained_refuses_payload_before_any_work(tmp_path, capsys):
    from transformer_m import finetune_user

    marker = tmp_path / "MARKER"
    bad = plant(tmp_path / "bad.pt", marker)
    csv = tmp_path / "m.csv"
    csv.write_text("smiles,y\nCCO,1\nCCC,2\nCCN,3\n")
    with pytest.raises(SystemExit) as err:
        finetune_user.main(["--csv", str(csv), "--label-columns", "y", "--pretrained", str(bad),
                            "--out", str(tmp_path / "out"), "--workers", "1"])
    assert err.value.code not in (0, None)
    assert "cannot load --pretrained" in str(err.value) and str(bad) in str(err.value)
    assert not marker.exists()
    assert not (tmp_path / "out" / "lmdb").exists()  # refused before preprocessing


def test_gsrd_pretrained_encoder_refuses_payload(tmp_path):
    from transformer_m.checkpoint import CheckpointLoadError
    from transformer_m.models.gsrd import GsrdConfig, GsrdModel

    marker = tmp_path / "MARKER"
    bad = plant(tmp_path / "bad.pt", marker)
    model = GsrdModel(GsrdConfig(encoder_layers=1, encoder_embed_dim=16, encoder_attention_heads=2,
                                 encoder_node_hidden=16, num_rbf=8, encoder_2d_layers=1,
                                 encoder_2d_embed_dim=8, encoder_2d_edge_dim=4), pretrain=False)
    with pytest.raises(CheckpointLoadError, match="cannot load --pretrained-encoder"):
        model.load_pretrained_encoder(str(bad))
    assert not marker.exists()


def _script(name: str):
    path = REPO / "scripts" / "evaluate" / name
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_evaluation_scripts_refuse_payload(tmp_path):
    from transformer_m.checkpoint import CheckpointLoadError

    marker = tmp_path / "MARKER"
    bad = plant(tmp_path / "bad.pt", marker)
    ev = _script("evaluate_pcqm4mv2.py")
    args = ev.build_parser().parse_args(["--checkpoint", str(bad), "--data-path", str(tmp_path)])
    with pytest.raises(CheckpointLoadError):
        ev.load_checkpoint(args, "cpu")
    pdb = _script("pdbbind_metrics.py")
    args = pdb.build_parser().parse_args(["--checkpoint", str(bad), "--data-path", str(tmp_path)])
    with pytest.raises(CheckpointLoadError):
        pdb.evaluate_checkpoint(args)
    assert not marker.exists()


# --- subprocesses: fairseq's own flags ---------------------------------------------------------
def test_fairseq_checkpoint_flags_refuse_payload_in_one_line(tmp_path, e2e_data_2d, e2e_env):
    """--restore-file, checkpoint_last.pt in --save-dir, --finetune-from-model, validate --path.

    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` makes fairseq's own ``torch.load`` unpickle anything;
    the plugin's loader passes ``weights_only=True`` explicitly, which the variable cannot undo.
    """
    marker = tmp_path / "MARKER"
    bad = plant(tmp_path / "bad.pt", marker)
    resume_dir = tmp_path / "resume"
    resume_dir.mkdir()
    plant(resume_dir / "checkpoint_last.pt", marker)
    trunc_dir = tmp_path / "trunc"
    trunc_dir.mkdir()
    good = tmp_path / "good.pt"
    torch.save({"model": {"w": torch.zeros(4096)}}, good)
    (trunc_dir / "checkpoint_last.pt").write_bytes(good.read_bytes()[:3000])
    env = dict(e2e_env, TMPDIR=str(tmp_path), TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1")
    train = [
        str(VENV_BIN / "fairseq-train"), "--user-dir", str(PLUGIN_DIR),
        "--data-path", str(e2e_data_2d), "--task", "graph_prediction",
        "--criterion", "graph_prediction", "--num-classes", "1", *TINY,
        "--optimizer", "adam", "--lr", "1e-3", "--batch-size", "16", "--max-update", "1",
        "--cpu", "--num-workers", "0", "--no-progress-bar", "--disable-validation",
    ]  # fmt: skip
    jobs = {
        "restore": ([*train, "--save-dir", str(tmp_path / "a"), "--restore-file", str(bad)], bad),
        "save_dir_last": ([*train, "--save-dir", str(resume_dir)],
                          resume_dir / "checkpoint_last.pt"),
        "finetune": ([*train, "--save-dir", str(tmp_path / "b"), "--finetune-from-model",
                      str(bad)], bad),
        "validate": ([str(VENV_BIN / "fairseq-validate"), "--user-dir", str(PLUGIN_DIR),
                      "--path", str(bad), "--task", "graph_prediction", "--data-path",
                      str(e2e_data_2d), "--cpu", "--batch-size", "8"], bad),
        "truncated_last": ([*train, "--save-dir", str(trunc_dir)],
                           trunc_dir / "checkpoint_last.pt"),
    }
    procs = {
        name: subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=env, cwd=tmp_path)
        for name, (argv, _) in jobs.items()
    }
    outputs = {}
    try:
        for name, proc in procs.items():
            outputs[name] = proc.communicate(timeout=TIMEOUT)[0]
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert not marker.exists(), "a checkpoint payload ran"
    for name, (_, path) in jobs.items():
        assert procs[name].returncode == 1, (name, outputs[name][-3000:])
        line = one_error_line(outputs[name], "cannot load checkpoint")
        assert str(path) in line, (name, line)
        if name == "truncated_last":
            assert "truncated or corrupt" in line and "--restore-file" in line
        else:
            assert "builtins.exec" in line and "refused" in line, (name, line)
