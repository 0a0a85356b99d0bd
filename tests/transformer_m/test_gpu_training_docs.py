"""The commands of the README's "GPU training" section run (CPU, tiny data and model).

The ``transformer-m-train`` command is taken from the README itself, its data and save paths
replaced, the model shrunk and two updates run; the recipe line is resolved with ``DRY_RUN=1``
and parsed by fairseq's own parser.
"""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fairseq")
torch = pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
TINY = ["--encoder-layers", "2", "--encoder-embed-dim", "32", "--encoder-ffn-embed-dim", "32",
        "--encoder-attention-heads", "4", "--num-3d-bias-kernel", "8"]  # fmt: skip


def gpu_section_commands() -> list[list[str]]:
    """The shell commands of the first code block of the README's GPU section."""
    text = (REPO / "README.md").read_text()
    section = text.split("## GPU training", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    lines = [ln for ln in block.replace("\\\n", " ").splitlines() if ln and ln[0] != "#"]
    return [shlex.split(ln) for ln in lines]


def test_readme_gpu_command_trains(e2e_data_3d, e2e_env, tmp_path):
    train = next(c for c in gpu_section_commands() if c[0] == "transformer-m-train")
    args = train[1:]
    args[args.index("--data-path") + 1] = str(e2e_data_3d)
    args[args.index("--save-dir") + 1] = str(tmp_path / "ckpt")
    assert {"--optimizer", "fused_adam", "--bf16-autocast"} <= set(args)
    cmd = [str(VENV_BIN / "transformer-m-train"), *args, *TINY, "--max-update", "2", "--cpu",
           "--num-workers", "0", "--batch-size", "16"]  # fmt: skip
    env = dict(e2e_env, PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env,
                          cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = torch.load(tmp_path / "ckpt" / "checkpoint_last.pt", weights_only=True)
    assert state["cfg"]["model"]["bf16_autocast"] is True
    assert state["cfg"]["optimizer"]["_name"] == "fused_adam"
    assert state["optimizer_history"][-1]["num_updates"] == 2


def test_readme_recipe_line_resolves(tmp_path):
    recipe = next(c for c in gpu_section_commands() if c[0].startswith("FP16=0"))
    assert recipe[1].endswith("pcqm4mv2_pretrain_L12.sh")
    extra = recipe[5:]
    env = dict(os.environ, DRY_RUN="1", FP16="0", PYTHON=sys.executable,
               PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")  # fmt: skip
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        ["bash", str(REPO / recipe[1]), "root", str(tmp_path / "lmdb"), str(tmp_path / "s"),
         *extra],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (train,) = [shlex.split(ln) for ln in proc.stdout.splitlines() if "transformer-m-train" in ln]
    args = train[[os.path.basename(t) for t in train].index("transformer-m-train") + 1:]
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    parser = options.get_training_parser()
    parsed = options.parse_args_and_arch(
        parser, input_args=["--user-dir", str(REPO / "transformer_m"), *args]
    )
    cfg = convert_namespace_to_omegaconf(parsed)
    assert cfg.optimizer._name == "fused_adam" and cfg.model.bf16_autocast is True
    assert cfg.common.fp16 is False and cfg.optimizer.adam_betas == "(0.9, 0.999)"
