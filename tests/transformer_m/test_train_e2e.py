"""End-to-end training through fairseq's own CLIs on a tiny model (CPU, subprocesses).

Data: ``e2e_data_3d`` (64 molecules with conformers for train, 16 without for valid) and
``e2e_data_2d`` (no positions anywhere), built in ``conftest.py``. Model: ``transformer_m_small``
shrunk by flags to L2 D32 H4 K8. Each fairseq process spends most of its time importing
fairseq (about 8 s here); the training itself takes about a second.

Checks: (a) training runs, saves checkpoints and the loss falls; (b) ``fairseq-validate`` on
``checkpoint_best.pt`` reproduces the valid MAE logged in training; (c) stopping mid-epoch and
resuming from ``checkpoint_last.pt`` reproduces the continuous run update by update;
(d) 2-process data-parallel training on CPU (gloo) via torchrun; (e) a dataset without any
positions trains with ``--add-3d`` (the release crashed with ``KeyError: 'pos'``).
"""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("fairseq")
torch = pytest.importorskip("torch")

REPO_ROOT = Path(__file__).resolve().parents[2]
PLUGIN_DIR = REPO_ROOT / "transformer_m"
VENV_BIN = Path(sys.executable).parent
TIMEOUT = 300  # s per fairseq process

N_TRAIN = 64  # train molecules of the e2e_data_* fixtures (conftest.E2E_TRAIN_SIZE)
BATCH = 16  # -> 4 updates per epoch
EPOCHS = 4
UPDATES = EPOCHS * N_TRAIN // BATCH

TINY_MODEL = [
    "--arch", "transformer_m_small", "--encoder-layers", "2", "--encoder-embed-dim", "32",
    "--encoder-ffn-embed-dim", "32", "--encoder-attention-heads", "4",
    "--num-3d-bias-kernel", "8",
]  # fmt: skip


def train_args(data: Path, save_dir: Path, *extra: str) -> list[str]:
    """A tiny pre-training run in the released style (3D, denoising, droppath) on CPU."""
    return [
        "--user-dir", str(PLUGIN_DIR), "--data-path", str(data),
        "--task", "graph_prediction", "--criterion", "graph_prediction", "--num-classes", "1",
        *TINY_MODEL, "--add-3d", "--mode-prob", "0.2,0.2,0.6", "--noise-scale", "0.2",
        "--droppath-prob", "0.1",
        "--optimizer", "adam", "--adam-betas", "(0.9, 0.999)", "--adam-eps", "1e-8",
        "--clip-norm", "5.0", "--lr", "5e-3", "--lr-scheduler", "polynomial_decay",
        "--warmup-updates", "4", "--total-num-update", "100", "--end-learning-rate", "1e-9",
        "--batch-size", str(BATCH), "--max-epoch", str(EPOCHS), "--seed", "1",
        "--save-dir", str(save_dir), "--cpu", "--num-workers", "0",
        "--log-format", "json", "--log-interval", "1", "--no-progress-bar",
        *extra,
    ]  # fmt: skip


def run_parallel(jobs: dict[str, tuple[list[str], Path]], env: dict, cwd: Path) -> dict:
    """Run commands side by side (each mostly waits on imports); ``{name: output}``.

    ``jobs`` maps a name to ``(argv, log file)``; a failure shows the tail of its log.
    """
    procs = {}
    try:
        for name, (argv, log) in jobs.items():
            fh = open(log, "w")
            procs[name] = (subprocess.Popen(
                argv, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=cwd
            ), fh)  # fmt: skip
        for proc, _ in procs.values():
            proc.wait(timeout=TIMEOUT)
    finally:
        for proc, fh in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            fh.close()
    out = {}
    for name, (proc, _) in procs.items():
        argv, log = jobs[name]
        out[name] = log.read_text()
        assert proc.returncode == 0, (
            f"{name}: {argv[0]} failed ({proc.returncode}):\n{out[name][-4000:]}"
        )
    return out


def run(argv: list[str], env: dict, cwd: Path, log: Path) -> str:
    """Run one command, keep its output in ``log``, fail with the tail of it on error."""
    return run_parallel({"run": (argv, log)}, env, cwd)["run"]


def json_records(text: str, kind: str) -> list[dict]:
    """The JSON stats fairseq logs under logger ``kind`` (train_inner, train, valid).

    fairseq_cli's format is ``... | INFO | <kind> | {...}``; logging's default format (a
    driver that configured logging first) is ``INFO:<kind>:{...}``.
    """
    pattern = re.compile(r"(?:\| |INFO:)" + re.escape(kind) + r"(?: \| |:)(\{.*\})\s*$")
    return [json.loads(m.group(1)) for m in map(pattern.search, text.splitlines()) if m]


def fairseq_env(e2e_env: dict, tmp: Path) -> dict:
    env = dict(e2e_env)
    env["TMPDIR"] = str(tmp)  # fairseq leaves pymp-* directories behind
    return env


RESUME_STOP = UPDATES // 2 - 2  # 6: inside epoch 2


@pytest.fixture(scope="module")
def e2e_runs(e2e_data_3d, e2e_env, tmp_path_factory):
    """Side by side: a continuous run of ``UPDATES`` updates and the first part of a resumed run
    (stopped after ``RESUME_STOP`` updates). ``{name: (save_dir, log text)}``."""
    tmp = tmp_path_factory.mktemp("e2e_runs")
    train = str(VENV_BIN / "fairseq-train")
    jobs = {
        "continuous": [train, *train_args(e2e_data_3d, tmp / "continuous")],
        "first_part": [
            train, *train_args(e2e_data_3d, tmp / "resumed", "--max-update", str(RESUME_STOP))
        ],
    }
    logs = run_parallel(
        {name: (argv, tmp / f"{name}.log") for name, argv in jobs.items()},
        fairseq_env(e2e_env, tmp), tmp,
    )
    return {
        "continuous": (tmp / "continuous", logs["continuous"]),
        "first_part": (tmp / "resumed", logs["first_part"]),
    }


@pytest.fixture(scope="module")
def e2e_continuous(e2e_runs):
    return e2e_runs["continuous"]


# --- (a) -----------------------------------------------------------------------------------
def test_train_saves_checkpoints_and_loss_falls(e2e_continuous):
    save, text = e2e_continuous
    for name in ("checkpoint_last.pt", "checkpoint_best.pt", f"checkpoint{EPOCHS}.pt"):
        assert (save / name).is_file(), name
    inner = json_records(text, "train_inner")
    assert [int(r["num_updates"]) for r in inner] == list(range(1, UPDATES + 1))
    for r in inner:
        assert math.isfinite(float(r["loss"])) and math.isfinite(float(r["denoise_loss"]))
    # the 3D train split exercises the denoising head (3D-only molecules)
    assert any(float(r["denoise_loss"]) > 0 for r in inner)
    epochs = json_records(text, "train")
    assert len(epochs) == EPOCHS
    losses = [float(r["train_loss"]) for r in epochs]
    assert losses[-1] < losses[0] - 0.5, losses
    valid = [float(r["valid_loss"]) for r in json_records(text, "valid")]
    assert len(valid) == EPOCHS and all(math.isfinite(v) for v in valid)
    # the checkpoint loads with torch's safe loader (no pickled classes)
    state = torch.load(save / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    assert state["cfg"]["model"]["encoder_layers"] == 2
    assert state["optimizer_history"][-1]["num_updates"] == UPDATES


# --- (b) -----------------------------------------------------------------------------------
def test_validate_reproduces_logged_valid_mae(e2e_continuous, e2e_data_3d, e2e_env, tmp_path):
    save, text = e2e_continuous
    valid = json_records(text, "valid")
    best = min(float(r["valid_loss"]) for r in valid)
    assert float(valid[-1]["valid_best_loss"]) == best
    out = run(
        [
            str(VENV_BIN / "fairseq-validate"), "--user-dir", str(PLUGIN_DIR),
            "--path", str(save / "checkpoint_best.pt"), "--task", "graph_prediction",
            "--data-path", str(e2e_data_3d), "--valid-subset", "valid", "--cpu",
            "--num-workers", "0", "--batch-size", str(BATCH), "--log-format", "json",
        ],
        fairseq_env(e2e_env, tmp_path), tmp_path, tmp_path / "validate.log",
    )  # fmt: skip
    (record,) = json_records(out, "valid")
    assert abs(float(record["valid_loss"]) - best) <= 1e-5, (record, best)
    assert float(record["valid_mae_ev"]) == float(record["valid_loss"])


# --- (c) -----------------------------------------------------------------------------------
def test_resume_equals_continuous(e2e_runs, e2e_data_3d, e2e_env, tmp_path):
    """Stop after 6 updates (mid-epoch 2), resume from checkpoint_last.pt: same updates.

    Exact because every source of randomness is torch's global RNG, which the trainer reseeds
    per update (seed + num_updates): mode draw, dropout, droppath, coordinate noise; batch
    order comes from (seed, epoch) and the iterator position is in the checkpoint.
    """
    save_full, text_full = e2e_runs["continuous"]
    save, first = e2e_runs["first_part"]
    state = torch.load(save / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    assert state["optimizer_history"][-1]["num_updates"] == RESUME_STOP
    iterator = state["extra_state"]["train_iterator"]
    assert iterator["iterations_in_epoch"] == RESUME_STOP % (N_TRAIN // BATCH)  # mid-epoch
    second = run(
        [str(VENV_BIN / "fairseq-train"), *train_args(e2e_data_3d, save)],
        fairseq_env(e2e_env, tmp_path), tmp_path, tmp_path / "second.log",
    )
    assert "Loaded checkpoint" in second

    def per_update(text):
        return {
            int(r["num_updates"]): (r["loss"], r["denoise_loss"], r["gnorm"], r["lr"])
            for r in json_records(text, "train_inner")
        }

    resumed = {**per_update(first), **per_update(second)}
    assert sorted(resumed) == list(range(1, UPDATES + 1))
    assert resumed == per_update(text_full)
    # and bit-identical parameters at the end
    a = torch.load(save_full / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    b = torch.load(save / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


# --- (d) -----------------------------------------------------------------------------------
# Runs under torchrun: wraps checkpoint saving so that every rank also dumps its parameters,
# then calls the console-script entry point (which passes the ranks explicitly on CPU).
RANK_DUMP_DRIVER = textwrap.dedent(
    """
    import os, sys
    import torch
    from fairseq import checkpoint_utils

    _save = checkpoint_utils.save_checkpoint

    def save_and_dump(cfg, trainer, epoch_itr, val_loss):
        out = _save(cfg, trainer, epoch_itr, val_loss)
        params = {k: v.detach().clone() for k, v in trainer.get_model().state_dict().items()}
        rank = trainer.data_parallel_rank
        torch.save(params, os.path.join(os.environ["E2E_DUMP_DIR"], f"params-rank{rank}.pt"))
        return out

    checkpoint_utils.save_checkpoint = save_and_dump
    from transformer_m.cli import train

    sys.argv[0] = "transformer-m-train"
    train()
    """
)


def test_distributed_data_parallel_cpu_gloo(e2e_data_3d, e2e_env, tmp_path):
    """``torchrun --nproc_per_node 2 transformer-m-train ... --distributed-world-size 2``."""
    driver = tmp_path / "driver.py"
    driver.write_text(RANK_DUMP_DRIVER)
    dump = tmp_path / "dump"
    dump.mkdir()
    save = tmp_path / "ckpt"
    env = fairseq_env(e2e_env, tmp_path)
    env["E2E_DUMP_DIR"] = str(dump)
    args = train_args(
        e2e_data_3d, save, "--distributed-world-size", "2", "--distributed-backend", "gloo",
        "--ddp-backend", "legacy_ddp",
    )  # fmt: skip
    args[args.index("--max-epoch") + 1] = "2"
    args[args.index("--batch-size") + 1] = str(BATCH // 2)  # 2 x 8 per update
    text = run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(driver), *args],
        env, tmp_path, tmp_path / "ddp.log",
    )  # fmt: skip
    assert "distributed init (rank 1)" in text and "training on 2 devices" in text
    inner = json_records(text, "train_inner")
    assert len(inner) == 2 * N_TRAIN // BATCH  # one log line per update (master only)
    assert all(float(r["bsz"]) == BATCH for r in inner)  # both ranks' molecules counted
    assert all(math.isfinite(float(r["loss"])) for r in inner)
    # checkpoints are written once, by rank 0
    assert text.count("Saved checkpoint") == 2
    assert sorted(p.name for p in save.iterdir()) == [
        "checkpoint1.pt", "checkpoint2.pt", "checkpoint_best.pt", "checkpoint_last.pt"
    ]
    # both ranks end with identical parameters, equal to the saved checkpoint
    p0 = torch.load(dump / "params-rank0.pt", weights_only=True)
    p1 = torch.load(dump / "params-rank1.pt", weights_only=True)
    saved = torch.load(save / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    for key in p0:
        assert torch.equal(p0[key], p1[key]), key
        assert torch.equal(p0[key], saved["model"][key]), key


# --- (e) -----------------------------------------------------------------------------------
def test_2d_only_dataset_trains_with_add_3d(e2e_data_2d, e2e_env, tmp_path):
    """No positions anywhere: the 3D channel and the denoising loss switch off, no KeyError.

    ``PCQM4M-LSC-V2-3D`` collates all-zero ``pos``; ``PCQM4M-LSC-V2`` has no ``pos`` key at all
    (the released 2D collator, which crashed the released criterion).
    """
    jobs = {}
    for name in ("PCQM4M-LSC-V2-3D", "PCQM4M-LSC-V2"):
        args = train_args(e2e_data_2d, tmp_path / name, "--dataset-name", name)
        args[args.index("--max-epoch") + 1] = "2"
        jobs[name] = ([str(VENV_BIN / "fairseq-train"), *args], tmp_path / f"{name}.log")
    logs = run_parallel(jobs, fairseq_env(e2e_env, tmp_path), tmp_path)
    for name, text in logs.items():
        inner = json_records(text, "train_inner")
        assert len(inner) == 2 * N_TRAIN // BATCH, name
        assert all(math.isfinite(float(r["loss"])) for r in inner), name
        assert all(float(r["denoise_loss"]) == 0.0 for r in inner), name
        assert (tmp_path / name / "checkpoint_last.pt").is_file(), name
