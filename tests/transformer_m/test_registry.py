"""Registered names, presets, config <-> CLI, console scripts and package boundaries (tier B).

The registered names are public API (STYLE §4): they mirror the original release so that a
published command line runs unchanged. fairseq keeps the *first* task/model registered under a
name silently, so each name is checked to resolve to this plugin's class.
"""
from __future__ import annotations

import dataclasses
import enum
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
from suite_env import subprocess_env

pytest.importorskip("fairseq")

from fairseq import options  # noqa: E402
from fairseq.dataclass.utils import convert_namespace_to_omegaconf  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
PLUGIN_DIR = REPO_ROOT / "transformer_m"
VENV_BIN = Path(sys.executable).parent

ARCHS = ("transformer_m", "transformer_m_base", "transformer_m_small")
BASE_ARGS = [
    "--user-dir", str(PLUGIN_DIR),
    "--task", "graph_prediction",
    "--criterion", "graph_prediction",
    "--data-path", "X",
]  # fmt: skip


@pytest.fixture(scope="module")
def plugin():
    """Load the plugin the way fairseq does for ``--user-dir``."""
    from fairseq.utils import import_user_module

    import_user_module(Namespace(user_dir=str(PLUGIN_DIR)))
    import transformer_m

    return transformer_m


def parse(*extra: str, arch: str = "transformer_m_base"):
    """fairseq's training parser on ``BASE_ARGS + --arch arch + extra``: ``(args, cfg)``."""
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, input_args=[*BASE_ARGS, "--arch", arch, *extra])
    return args, convert_namespace_to_omegaconf(args)


# --- registered names --------------------------------------------------------------------
def test_task_name_resolves_to_our_class(plugin):
    from fairseq.tasks import TASK_DATACLASS_REGISTRY, TASK_REGISTRY

    from transformer_m.tasks import GraphPredictionConfig, GraphPredictionTask

    assert TASK_REGISTRY["graph_prediction"] is GraphPredictionTask
    assert TASK_DATACLASS_REGISTRY["graph_prediction"] is GraphPredictionConfig
    assert GraphPredictionTask.__module__ == "transformer_m.tasks.graph_prediction"


def test_criterion_name_resolves_to_our_class(plugin):
    from fairseq.criterions import CRITERION_DATACLASS_REGISTRY, CRITERION_REGISTRY

    from transformer_m.criterions import (
        GraphPredictionCriterion,
        GraphPredictionCriterionConfig,
    )

    assert CRITERION_REGISTRY["graph_prediction"] is GraphPredictionCriterion
    assert CRITERION_DATACLASS_REGISTRY["graph_prediction"] is GraphPredictionCriterionConfig


def test_model_and_arch_names_resolve_to_our_class(plugin):
    from fairseq.models import (
        ARCH_MODEL_NAME_REGISTRY,
        ARCH_MODEL_REGISTRY,
        MODEL_DATACLASS_REGISTRY,
        MODEL_REGISTRY,
    )

    from transformer_m.models import TransformerMConfig, TransformerMModel

    assert MODEL_REGISTRY["Transformer-M"] is TransformerMModel
    assert MODEL_DATACLASS_REGISTRY["Transformer-M"] is TransformerMConfig
    for arch in ARCHS:
        assert ARCH_MODEL_REGISTRY[arch] is TransformerMModel, arch
        assert ARCH_MODEL_NAME_REGISTRY[arch] == "Transformer-M", arch


def test_parsed_command_builds_our_components(plugin):
    """What a command line resolves to end to end (task object, criterion class)."""
    from fairseq import tasks

    from transformer_m.criterions import GraphPredictionCriterion
    from transformer_m.tasks import GraphPredictionTask

    _, cfg = parse("--num-classes", "1")
    task = tasks.setup_task(cfg.task)
    assert type(task) is GraphPredictionTask
    assert type(task.build_criterion(cfg.criterion)) is GraphPredictionCriterion


# --- presets -----------------------------------------------------------------------------
EXPECTED_PRESETS = {
    # L, D, FFN, H, activation, embedding LayerNorm, BERT init (spec §2.4)
    "transformer_m_base": dict(
        encoder_layers=12, encoder_embed_dim=768, encoder_ffn_embed_dim=768,
        encoder_attention_heads=32, activation_fn="gelu", encoder_normalize_before=True,
        apply_init=True, num_3d_bias_kernel=128, mode_prob="0.2,0.2,0.6", add_3d=False,
        no_2d=False, sandwich_ln=False, dropout=0.1, attention_dropout=0.1, act_dropout=0.0,
        droppath_prob=0.0,
    ),
    "transformer_m": dict(
        encoder_layers=6, encoder_embed_dim=1024, encoder_ffn_embed_dim=4096,
        encoder_attention_heads=8, activation_fn="relu", encoder_normalize_before=False,
        apply_init=False, sandwich_ln=False, dropout=0.1, attention_dropout=0.1,
        act_dropout=0.0, droppath_prob=0.0,
    ),
    "transformer_m_small": dict(
        encoder_layers=4, encoder_embed_dim=128, encoder_ffn_embed_dim=256,
        encoder_attention_heads=8, num_3d_bias_kernel=32, activation_fn="gelu",
        encoder_normalize_before=True, apply_init=True,
    ),
}  # fmt: skip


@pytest.mark.parametrize("arch", ARCHS)
def test_preset_sizes(plugin, arch):
    _, cfg = parse(arch=arch)
    got = {k: cfg.model[k] for k in EXPECTED_PRESETS[arch]}
    got = {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in got.items()}
    assert got == EXPECTED_PRESETS[arch]
    assert cfg.model._name == arch


USER_FLAGS = {
    "--encoder-layers": ("encoder_layers", "3", 3),
    "--encoder-embed-dim": ("encoder_embed_dim", "48", 48),
    "--encoder-ffn-embed-dim": ("encoder_ffn_embed_dim", "40", 40),
    "--encoder-attention-heads": ("encoder_attention_heads", "6", 6),
    "--activation-fn": ("activation_fn", "tanh", "tanh"),
    "--dropout": ("dropout", "0.3", 0.3),
    "--act-dropout": ("act_dropout", "0.2", 0.2),
    "--droppath-prob": ("droppath_prob", "0.05", 0.05),
    "--num-3d-bias-kernel": ("num_3d_bias_kernel", "16", 16),
    "--mode-prob": ("mode_prob", "0,1,0", "0,1,0"),
}


@pytest.mark.parametrize("arch", ARCHS)
def test_presets_never_override_user_flags(plugin, arch):
    extra = [tok for flag, (_, value, _) in USER_FLAGS.items() for tok in (flag, value)]
    args, cfg = parse(*extra, arch=arch)
    for flag, (name, _, expected) in USER_FLAGS.items():
        assert getattr(args, name) == expected, flag
        value = cfg.model[name]
        assert (value.value if isinstance(value, enum.Enum) else value) == expected, flag
    # untouched sizes still come from the preset
    assert cfg.model.encoder_normalize_before == EXPECTED_PRESETS[arch]["encoder_normalize_before"]


def test_boolean_flags_switch_on_under_every_preset(plugin):
    """``--apply-init`` / ``--encoder-normalize-before`` turn the option on (not off)."""
    flags = ("--apply-init", "--encoder-normalize-before", "--sandwich-ln")
    _, cfg = parse(*flags, arch="transformer_m")
    assert cfg.model.apply_init is True
    assert cfg.model.encoder_normalize_before is True
    assert cfg.model.sandwich_ln is True


@pytest.mark.parametrize("arch", ARCHS)
def test_preset_functions_fill_only_unset_attributes(plugin, arch):
    from fairseq.models import ARCH_CONFIG_REGISTRY

    args = Namespace(encoder_layers=3, activation_fn="tanh", apply_init=False)
    ARCH_CONFIG_REGISTRY[arch](args)
    assert (args.encoder_layers, args.activation_fn, args.apply_init) == (3, "tanh", False)
    assert args.encoder_embed_dim == EXPECTED_PRESETS[arch]["encoder_embed_dim"]


def test_l18_is_base_with_18_layers(plugin):
    _, cfg = parse("--encoder-layers", "18")
    assert cfg.model.encoder_layers == 18
    assert (cfg.model.encoder_embed_dim, cfg.model.encoder_attention_heads) == (768, 32)


# --- config dataclasses <-> CLI ----------------------------------------------------------
def _component_configs():
    from transformer_m.criterions import GraphPredictionCriterionConfig
    from transformer_m.models import TransformerMConfig
    from transformer_m.tasks import GraphPredictionConfig

    return {
        "task": GraphPredictionConfig,
        "criterion": GraphPredictionCriterionConfig,
        "model": TransformerMConfig,
    }


def _interpolation(dc, name):
    default = dc()._get_default(name)
    if isinstance(default, str) and default.startswith("${"):
        return default[2:-1]  # e.g. "task.num_classes"
    return None


def _test_value(dc, name):
    """A CLI string and the parsed value, different from the field's default."""
    from fairseq.dataclass.utils import interpret_dc_type

    inst = dc()
    default = inst._get_default(name)
    typ = interpret_dc_type(inst._get_type(name))
    if isinstance(typ, type) and issubclass(typ, enum.Enum):
        choices = [c.value for c in typ]
        default = default.value if isinstance(default, enum.Enum) else default
        value = next(c for c in choices if c != default)
        return value, value
    if typ is bool:
        assert default is False, f"{name}: a True bool default makes fairseq invert the flag"
        return None, True
    if typ is int:
        return str(default + 3), default + 3
    if typ is float:
        return "0.375", 0.375
    if typ is str:
        value = {"mode_prob": "0.1,0.3,0.6"}.get(name, "some_value")
        return value, value
    raise AssertionError(f"{dc.__name__}.{name}: untested type {typ}")


def test_every_config_field_is_a_cli_flag_with_its_name(plugin):
    parser = options.get_training_parser()
    options.parse_args_and_arch(  # adds the task, criterion and model flags to `parser`
        parser, input_args=[*BASE_ARGS, "--arch", "transformer_m_base"]
    )
    flags = set(parser._option_string_actions)
    for section, dc in _component_configs().items():
        for f in dataclasses.fields(dc):
            if f.name.startswith("_"):
                continue
            flag = "--" + f.name.replace("_", "-")
            assert flag in flags, f"{section}.{f.name}: no CLI flag {flag}"
            assert dc()._get_help(f.name) or _interpolation(dc, f.name), f"{f.name}: no help"


def test_config_cli_round_trip(plugin):
    """Every field takes a non-default value from its flag and lands in ``cfg.<section>``."""
    extra, expected = [], {}
    for section, dc in _component_configs().items():
        for f in dataclasses.fields(dc):
            if f.name.startswith("_") or _interpolation(dc, f.name):
                continue
            text, value = _test_value(dc, f.name)
            flag = "--" + f.name.replace("_", "-")
            extra += [flag] if text is None else [flag, text]
            expected[(section, f.name)] = value
    _, cfg = parse(*extra)
    for (section, name), value in expected.items():
        got = cfg[section][name]
        got = got.value if isinstance(got, enum.Enum) else got
        assert got == value, f"{section}.{name}: {got!r} != {value!r}"
    # interpolated fields follow their source (model reads the task's vocabularies, seeds)
    for section, dc in _component_configs().items():
        for f in dataclasses.fields(dc):
            source = _interpolation(dc, f.name)
            if source:
                top, key = source.split(".")
                assert cfg[section][f.name] == cfg[top][key], f"{section}.{f.name}"


def test_original_published_flags_parse(plugin):
    args, cfg = parse(
        "--num-classes", "1", "--add-3d", "--no-2d", "--num-3d-bias-kernel", "128",
        "--mode-prob", "0.2,0.2,0.6", "--noise-scale", "0.2", "--droppath-prob", "0.1",
        "--remove-head", "--dataset-name", "PCQM4M-LSC-V2-3D", "--data-path", "X",
    )  # fmt: skip
    m, t, c = cfg.model, cfg.task, cfg.criterion
    assert (m.add_3d, m.no_2d, m.remove_head) == (True, True, True)
    assert (m.num_3d_bias_kernel, m.mode_prob, m.droppath_prob) == (128, "0.2,0.2,0.6", 0.1)
    assert c.noise_scale == 0.2
    assert (str(t.dataset_name), t.data_path, t.num_classes) == ("PCQM4M-LSC-V2-3D", "X", 1)
    assert m.num_classes == 1


def test_released_train_sh_command_parses(plugin):
    """The hyperparameters of the released ``train.sh`` (spec §2.1) in one command line."""
    _, cfg = parse(
        "--num-workers", "16", "--ddp-backend", "legacy_ddp", "--dataset-name",
        "PCQM4M-LSC-V2-3D", "--num-classes", "1", "--batch-size", "256",
        "--data-buffer-size", "20", "--encoder-layers", "12", "--encoder-embed-dim", "768",
        "--encoder-ffn-embed-dim", "768", "--encoder-attention-heads", "32",
        "--add-3d", "--num-3d-bias-kernel", "128", "--optimizer", "adam",
        "--adam-betas", "(0.9, 0.999)", "--adam-eps", "1e-8", "--clip-norm", "5.0",
        "--weight-decay", "0.0", "--lr-scheduler", "polynomial_decay", "--power", "1",
        "--warmup-updates", "150000", "--total-num-update", "1500000", "--lr", "2e-4",
        "--end-learning-rate", "1e-9", "--dropout", "0.0", "--attention-dropout", "0.1",
        "--act-dropout", "0.1", "--max-update", "1500000", "--seed", "1", "--fp16",
        "--mode-prob", "0.2,0.2,0.6", "--noise-scale", "0.2", "--droppath-prob", "0.1",
        "--save-dir", "ckpt",
    )  # fmt: skip
    assert cfg.lr_scheduler.warmup_updates == 150000
    assert cfg.model.dropout == 0.0 and cfg.model.act_dropout == 0.1
    assert cfg.common.fp16 is True and cfg.task.seed == 1


# --- console scripts and package boundaries (subprocesses) -------------------------------
def test_console_scripts_help():
    """``transformer-m-train --help`` / ``transformer-m-validate --help`` run, with the plugin
    loaded by the script itself (fairseq's help lists registered criteria, not task flags)."""
    procs = {
        name: subprocess.Popen(
            [str(VENV_BIN / name), "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=subprocess_env(),
        )
        for name in ("transformer-m-train", "transformer-m-validate")
    }  # fmt: skip
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, f"{name}: {err[-2000:]}"
        assert "--user-dir" in out and "--criterion" in out, name
        assert "graph_prediction" in out, f"{name}: plugin criterion not registered"


def test_algos_imports_from_outside_the_repo(tmp_path):
    code = (
        "import numpy as np, graphormer_ext.algos as a\n"
        "adj = np.array([[0, 1, 0], [1, 0, 1], [0, 1, 0]], dtype=np.int64)\n"
        "d, _ = a.floyd_warshall(adj)\n"
        "assert d[0, 2] == 2, d\n"
        "print(a.__file__)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
        timeout=120, env=subprocess_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith((".so", ".pyd")), proc.stdout


def test_graphormer_ext_never_imports_fairseq(tmp_path):
    """Import every graphormer_ext module; neither fairseq nor the plugin may come along."""
    code = (
        "import importlib, pkgutil, sys\n"
        "import graphormer_ext\n"
        "walk = pkgutil.walk_packages(graphormer_ext.__path__, 'graphormer_ext.')\n"
        "names = [m.name for m in walk]\n"
        "skipped = []\n"
        "for name in names:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ImportError as exc:\n"
        "        if 'fairseq' in str(exc): raise\n"
        "        skipped.append(f'{name}: {exc}')\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in\n"
        "             ('fairseq', 'fairseq_cli', 'transformer_m', 'hydra'))\n"
        "assert not bad, bad\n"
        "print(len(names), 'modules;', 'skipped:', skipped)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
        timeout=180, env=subprocess_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    n_modules = int(proc.stdout.split()[0])
    assert n_modules >= 10, proc.stdout


def test_cli_inserts_user_dir_and_cpu_torchrun_ranks():
    from transformer_m.cli import PLUGIN_DIR as CLI_PLUGIN_DIR
    from transformer_m.cli import with_cpu_torchrun, with_user_dir

    assert Path(CLI_PLUGIN_DIR) == PLUGIN_DIR
    assert with_user_dir(["prog", "--cpu"]) == ["prog", "--user-dir", CLI_PLUGIN_DIR, "--cpu"]
    assert with_user_dir(["prog", "--user-dir=x"]) == ["prog", "--user-dir=x"]

    torchrun = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "localhost", "MASTER_PORT": "1"}
    argv = ["prog", "--cpu"]
    assert with_cpu_torchrun(argv, environ={}, cuda_devices=0) == argv  # not under torchrun
    assert with_cpu_torchrun(argv, environ=torchrun, cuda_devices=4) == argv  # fairseq infers
    explicit = [*argv, "--distributed-init-method", "tcp://h:1"]
    assert with_cpu_torchrun(explicit, environ=torchrun, cuda_devices=0) == explicit
    assert with_cpu_torchrun(argv, environ=torchrun, cuda_devices=0) == [
        *argv, "--distributed-init-method", "env://", "--distributed-world-size", "2",
        "--distributed-rank", "1", "--distributed-no-spawn",
    ]  # fmt: skip
