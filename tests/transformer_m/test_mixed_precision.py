"""Half precision: the model runs forward and backward in bf16/fp16 (what `--bf16`/`--fp16` do on a
GPU) with finite gradients and outputs close to fp32; on a CUDA machine, fairseq-train runs with the
flags themselves (`-m gpu`)."""
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from transformer_m.modules import TransformerMNet

GOLDEN = Path(__file__).resolve().parents[2].parent / "shared" / "golden" / "tm_golden_small_fixedpaths.pt"
CONFIG = dict(
    num_layers=2, embed_dim=64, ffn_embed_dim=64, num_heads=4, num_3d_bias_kernel=16, add_3d=True,
    dropout=0.0, attention_dropout=0.0, act_dropout=0.0, activation_fn="gelu",
    encoder_normalize_before=True, apply_init=True,
)


@pytest.mark.parametrize("implementation", ["fast", "reference"])
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 0.1), (torch.float16, 0.02)])
def test_half_precision_forward_backward(implementation, dtype, tol):
    if not GOLDEN.exists():
        pytest.skip(f"golden file not found: {GOLDEN}")
    g = torch.load(GOLDEN, weights_only=True)
    net = TransformerMNet(**CONFIG, implementation=implementation)
    net.load_state_dict(g["state_dict"])
    net.eval()
    with torch.no_grad():
        ref = net(g["batch"])[0][:, 0].float()  # [B, 1]
    half = copy.deepcopy(net).to(dtype)
    batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in g["batch"].items()}
    half.train()
    logits, atom_output, _ = half(batch)
    assert logits.dtype == dtype
    (logits[:, 0].float().sum() + atom_output.float().sum()).backward()
    grads = [p.grad for p in half.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(gr).all() for gr in grads)
    half.eval()
    with torch.no_grad():
        out = half(batch)[0][:, 0].float()
    assert torch.isfinite(out).all()
    assert float((out - ref).abs().max()) < tol


@pytest.mark.gpu
@pytest.mark.parametrize("flag", ["--fp16", "--bf16"])
def test_fairseq_train_half_precision_on_cuda(flag, e2e_data_3d, e2e_env, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    cmd = [
        sys.executable, "-m", "fairseq_cli.train", "--user-dir",
        str(Path(__file__).resolve().parents[2] / "transformer_m"),
        "--data-path", str(e2e_data_3d), "--task", "graph_prediction",
        "--criterion", "graph_prediction", "--arch", "transformer_m_small", "--num-classes", "1",
        "--add-3d", "--noise-scale", "0.2", "--optimizer", "adam", "--lr", "1e-4",
        "--batch-size", "16", "--max-epoch", "1", "--save-dir", str(tmp_path / "ckpt"),
        "--num-workers", "0", flag,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=e2e_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "ckpt" / "checkpoint_last.pt").exists()
