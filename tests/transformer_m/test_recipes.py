"""The paper recipes in ``scripts/recipes/``: syntax, house rules (STYLE §10) and that the
commands they resolve (``DRY_RUN=1``) parse with fairseq's own parser and carry the released
hyperparameters (spec §2.1)."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
RECIPES = REPO_ROOT / "scripts" / "recipes"
PLUGIN_DIR = REPO_ROOT / "transformer_m"
VENV_BIN = Path(sys.executable).parent

TRAIN_RECIPES = {  # recipe: (layers, target valid MAE in eV)
    "pcqm4mv2_pretrain_L12.sh": (12, "0.0785"),
    "pcqm4mv2_pretrain_L18.sh": (18, "0.0772"),
}
ALL_RECIPES = [*TRAIN_RECIPES, "evaluate_released.sh"]


def recipe_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.update(
        DRY_RUN="1", PYTHON=sys.executable, PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore",
    )  # fmt: skip
    env.update(extra)
    return env


def dry_run(recipe: str, *args: str, **env: str) -> list[list[str]]:
    """The commands a recipe would run, one token list per printed line."""
    proc = subprocess.run(
        ["bash", str(RECIPES / recipe), *args], capture_output=True, text=True, timeout=120,
        env=recipe_env(**env),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.splitlines() if line.strip()]


def command_after(commands: list[list[str]], program: str) -> list[str]:
    """Arguments following ``program`` (matched by basename) in the one command that runs it."""
    found = [
        cmd[i + 1 :] for cmd in commands for i, tok in enumerate(cmd)
        if os.path.basename(tok) == program
    ]  # fmt: skip
    assert len(found) == 1, (program, commands)
    return found[0]


def fairseq_cfg(train_args: list[str]):
    pytest.importorskip("fairseq")
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(
        parser, input_args=["--user-dir", str(PLUGIN_DIR), *train_args]
    )
    return convert_namespace_to_omegaconf(args)


# --- syntax and house rules --------------------------------------------------------------
@pytest.mark.parametrize("recipe", [*ALL_RECIPES, "_lib.sh"])
def test_bash_syntax(recipe):
    proc = subprocess.run(["bash", "-n", str(RECIPES / recipe)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("recipe", ALL_RECIPES)
def test_house_rules(recipe):
    text = (RECIPES / recipe).read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "\nset -euo pipefail\n" in text
    assert "/home" not in text
    header = text.split("set -euo pipefail")[0]
    for fact in ("PCQM4Mv2", "OGB-LSC 2021", "3,378,606", "73,545", "GPU", "Time", "Target"):
        assert fact in header, f"{recipe}: header lacks {fact!r}"
    assert "MAE" in header
    targets = [TRAIN_RECIPES[recipe][1]] if recipe in TRAIN_RECIPES else ["0.0785", "0.0772"]
    for target in targets:
        assert target in header, f"{recipe}: header lacks the target {target}"
    # every hyperparameter is an overridable variable: VAR=${VAR:-default}
    assignments = re.findall(r"^([A-Z][A-Z0-9_]*)=(.*)$", text, flags=re.M)
    assert assignments
    for name, value in assignments:
        if name in ("HERE", "ROOT"):
            continue  # derived: the script's folder, positional arguments
        assert value.startswith(f"${{{name}:-"), f"{recipe}: {name}={value}"


def test_recipes_are_executable():
    for recipe in ALL_RECIPES:
        assert os.access(RECIPES / recipe, os.X_OK), recipe


@pytest.mark.parametrize("recipe", ALL_RECIPES)
def test_usage_without_arguments(recipe):
    env = recipe_env()
    env.pop("DRY_RUN")
    proc = subprocess.run(["bash", str(RECIPES / recipe)], capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert "Usage" in proc.stderr and "Target" in proc.stderr


# --- resolved commands -------------------------------------------------------------------
@pytest.mark.parametrize("recipe", TRAIN_RECIPES)
def test_train_recipe_resolves_to_the_released_hyperparameters(recipe, tmp_path):
    layers, _ = TRAIN_RECIPES[recipe]
    lmdb, save = tmp_path / "lmdb", tmp_path / "save"
    commands = dry_run(recipe, str(tmp_path / "pcqm4mv2"), str(lmdb), str(save))
    assert not save.exists(), "DRY_RUN must not write anything"

    pre = command_after(commands, "graphormer-ext-preprocess")
    from graphormer_ext.preprocess import build_parser

    pre_args = build_parser().parse_args(pre)
    assert pre_args.command == "pcqm4mv2" and pre_args.path_convention == "fixed"
    assert pre_args.splits == ["train", "valid"] and pre_args.out == str(lmdb)

    launcher = next(c for c in commands if "transformer-m-train" in " ".join(c))
    assert os.path.basename(launcher[0]) == "torchrun" and "--nproc_per_node" in launcher
    assert launcher[launcher.index("--nproc_per_node") + 1] == "4"
    cfg = fairseq_cfg(command_after(commands, "transformer-m-train"))
    m, t, c, o = cfg.model, cfg.task, cfg.criterion, cfg.optimization
    assert m._name == "transformer_m_base" and t._name == "graph_prediction"
    assert c._name == "graph_prediction"
    assert (m.encoder_layers, m.encoder_embed_dim, m.encoder_ffn_embed_dim) == (layers, 768, 768)
    assert (m.encoder_attention_heads, str(m.activation_fn)) == (32, "gelu")
    assert m.encoder_normalize_before and m.apply_init
    assert (m.add_3d, m.no_2d, m.num_3d_bias_kernel) == (True, False, 128)
    assert m.mode_prob == "0.2,0.2,0.6"
    assert (m.dropout, m.attention_dropout, m.act_dropout, m.droppath_prob) == (0.0, 0.1, 0.1, 0.1)
    assert m.legacy_droppath is False and m.sandwich_ln is False
    assert (c.noise_scale, c.denoise_weight) == (0.2, 1.0)
    assert (str(t.dataset_name), t.data_path, t.num_classes) == ("PCQM4M-LSC-V2-3D", str(lmdb), 1)
    assert cfg.optimizer._name == "adam"
    assert tuple(eval(cfg.optimizer.adam_betas)) == (0.9, 0.999)
    assert (cfg.optimizer.adam_eps, cfg.optimizer.weight_decay) == (1e-8, 0.0)
    s = cfg.lr_scheduler
    assert (s._name, s.power, s.end_learning_rate) == ("polynomial_decay", 1.0, 1e-9)
    assert (s.warmup_updates, s.total_num_update) == (150000, 1500000)
    assert list(o.lr) == [2e-4] and o.max_update == 1500000 and o.clip_norm == 5.0
    assert list(o.update_freq) == [1]
    assert cfg.dataset.batch_size == 256 and cfg.common.fp16 and cfg.common.seed == 1
    d = cfg.distributed_training
    assert d.ddp_backend == "legacy_ddp" and d.distributed_world_size == 4
    assert cfg.checkpoint.save_dir == str(save)


def test_train_recipe_overrides_and_extra_flags(tmp_path):
    commands = dry_run(
        "pcqm4mv2_pretrain_L12.sh", str(tmp_path / "r"), str(tmp_path / "l"), str(tmp_path / "s"),
        "--max-epoch", "3",
        LAYERS="6", N_GPU="2", FP16="0", LEGACY_DROPPATH="1", PATH_CONVENTION="legacy",
    )  # fmt: skip
    pre = command_after(commands, "graphormer-ext-preprocess")
    assert pre[pre.index("--path-convention") + 1] == "legacy"
    cfg = fairseq_cfg(command_after(commands, "transformer-m-train"))
    assert cfg.model.encoder_layers == 6 and cfg.model.legacy_droppath is True
    assert cfg.common.fp16 is False and cfg.optimization.max_epoch == 3
    assert cfg.distributed_training.distributed_world_size == 2


def test_train_recipe_checks_existing_lmdb(e2e_data_3d, e2e_data_2d, tmp_path):
    """Existing splits are reused (no preprocessing) if their convention matches and train has
    3D; a 2D train split or the other convention is refused."""
    commands = dry_run("pcqm4mv2_pretrain_L12.sh", "root", str(e2e_data_3d), str(tmp_path / "s"))
    assert len(commands) == 1 and any("transformer-m-train" in tok for tok in commands[0])
    for data, env, message in (
        (e2e_data_2d, {}, "no 3D positions"),
        (e2e_data_3d, {"PATH_CONVENTION": "legacy"}, "--path-convention fixed"),
    ):
        proc = subprocess.run(
            ["bash", str(RECIPES / "pcqm4mv2_pretrain_L12.sh"), "root", str(data), "save"],
            capture_output=True, text=True, timeout=120, env=recipe_env(**env), cwd=tmp_path,
        )  # fmt: skip
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_evaluate_released_resolves(tmp_path):
    lmdb = tmp_path / "lmdb"
    commands = dry_run("evaluate_released.sh", "root", str(lmdb), "ckpts", str(tmp_path / "out"))
    pre = command_after(commands, "graphormer-ext-preprocess")
    from graphormer_ext.preprocess import build_parser

    pre_args = build_parser().parse_args(pre)
    assert pre_args.path_convention == "legacy" and pre_args.splits == ["valid"]
    evals = [c for c in commands if any(t.endswith("evaluate_pcqm4mv2.py") for t in c)]
    assert [c[c.index("--released") + 1] for c in evals] == ["L12", "L18"]
    for cmd, model in zip(evals, ("L12", "L18")):
        assert cmd[cmd.index("--checkpoint") + 1] == f"ckpts/{model}.pt"
        assert cmd[cmd.index("--data-path") + 1] == str(lmdb)
        assert cmd[cmd.index("--split") + 1] == "valid"
    assert not (tmp_path / "out").exists()


def test_evaluate_released_refuses_fixed_paths(e2e_data_3d):
    proc = subprocess.run(
        ["bash", str(RECIPES / "evaluate_released.sh"), "root", str(e2e_data_3d), "c", "o"],
        capture_output=True, text=True, timeout=120, env=recipe_env(),
    )  # fmt: skip
    assert proc.returncode == 2 and "needs legacy" in proc.stderr, proc.stderr


# --- real runs with stand-in programs ------------------------------------------------------
def test_train_recipe_saves_the_resolved_command(e2e_data_3d, tmp_path):
    """Without DRY_RUN the recipe writes SAVE_DIR/command.sh, then runs the launcher (here
    ``echo``, standing in for torchrun)."""
    save = tmp_path / "save"
    env = recipe_env(TORCHRUN="echo")
    env.pop("DRY_RUN")
    proc = subprocess.run(
        ["bash", str(RECIPES / "pcqm4mv2_pretrain_L18.sh"), "root", str(e2e_data_3d), str(save)],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    saved = (save / "command.sh").read_text()
    assert saved.startswith("# resolved by ")
    (command,) = [line for line in saved.splitlines() if not line.startswith("#")]
    tokens = shlex.split(command)
    assert tokens[0] == "echo" and "--encoder-layers" in tokens
    assert tokens[tokens.index("--encoder-layers") + 1] == "18"
    assert proc.stdout.strip() == " ".join(tokens[1:])  # what ran is what was saved
    assert subprocess.run(["bash", "-n", str(save / "command.sh")]).returncode == 0


def _legacy_valid_lmdb(root: Path) -> Path:
    """A 2-molecule valid split written with the legacy path convention (no RDKit needed)."""
    import numpy as np

    from graphormer_ext.data.lmdb_writer import write_split
    from graphormer_ext.featurize.graph import graph_to_record

    edge_index = np.array([[0, 1, 1, 2], [1, 0, 2, 1]])
    records = [
        graph_to_record(np.zeros((3, 9), dtype=np.int64), edge_index,
                        np.zeros((4, 3), dtype=np.int64), y=[float(i)],
                        path_convention="legacy")
        for i in range(2)
    ]  # fmt: skip
    write_split(root / "valid.lmdb", records, split="valid", path_convention="legacy",
                workers=1, progress=False)  # fmt: skip
    return root


def test_evaluate_released_runs_the_evaluator(tmp_path):
    lmdb = _legacy_valid_lmdb(tmp_path / "lmdb")
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    for model in ("L12", "L18"):
        (ckpts / f"{model}.pt").write_bytes(b"")
    stub = tmp_path / "evaluate_stub.py"
    stub.write_text(textwrap.dedent(
        """
        import json, os, sys
        print("EVALUATOR", *sys.argv[1:])
        out = sys.argv[sys.argv.index("--out") + 1]
        os.makedirs(out)
        with open(os.path.join(out, "valid_metrics.json"), "w") as f:
            json.dump({"mae": 0.0123}, f)
        """
    ))  # fmt: skip
    out = tmp_path / "out"
    env = recipe_env(EVALUATOR=str(stub), DEVICE="cpu")
    env.pop("DRY_RUN")
    proc = subprocess.run(
        ["bash", str(RECIPES / "evaluate_released.sh"), "root", str(lmdb), str(ckpts), str(out),
         "--extra-flag"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for model, target in (("L12", "0.0785"), ("L18", "0.0772")):
        log = (out / f"eval_{model}.log").read_text()
        assert f"expected valid MAE {target} eV" in log
        args = log.split("EVALUATOR", 1)[1].splitlines()[0].split()
        assert args[args.index("--released") + 1] == model
        assert args[args.index("--device") + 1] == "cpu" and args[-1] == "--extra-flag"
        assert args[args.index("--out") + 1] == str(out / model)
        assert f"{model}: valid MAE 0.0123 eV (expected {target})" in log
        assert (out / f"command_{model}.sh").is_file()
