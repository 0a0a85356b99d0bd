"""Half precision: the model runs forward and backward in bf16/fp16 with finite gradients and
outputs close to fp32; ``--bf16-autocast`` (bfloat16 compute, float32 weights) trains through
fairseq-train on the CPU; on a CUDA machine (``-m gpu``) fairseq-train runs with ``--fp16`` and
with ``--bf16-autocast`` (fairseq's own ``--bf16`` means TPU and crashes on CUDA)."""
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from golden_fixture import golden
from torch.utils._python_dispatch import TorchDispatchMode

from transformer_m.modules import TransformerMNet
from transformer_m.modules.precision import autocast_bf16

CONFIG = dict(
    num_layers=2, embed_dim=64, ffn_embed_dim=64, num_heads=4, num_3d_bias_kernel=16, add_3d=True,
    dropout=0.0, attention_dropout=0.0, act_dropout=0.0, activation_fn="gelu",
    encoder_normalize_before=True, apply_init=True,
)
PLUGIN = str(Path(__file__).resolve().parents[2] / "transformer_m")


def _golden_net(implementation):
    g = golden()
    net = TransformerMNet(**CONFIG, implementation=implementation)
    net.load_state_dict(g["state_dict"])
    return net.eval(), g["batch"]


@pytest.mark.parametrize("implementation", ["fast", "reference"])
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 0.1), (torch.float16, 0.02)])
def test_half_precision_forward_backward(implementation, dtype, tol):
    net, batch = _golden_net(implementation)
    with torch.no_grad():
        ref = net(batch)[0][:, 0].float()  # [B, 1]
    half = copy.deepcopy(net).to(dtype)
    batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}
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


@pytest.mark.parametrize("implementation", ["fast", "reference"])
def test_bf16_autocast_keeps_float32_weights(implementation):
    """What --bf16-autocast does (on the CPU here): bf16 compute, fp32 weights and gradients."""
    net, batch = _golden_net(implementation)
    with torch.no_grad():
        ref = net(batch)[0][:, 0].float()
    net.train()
    seen = []

    class MatmulDtypes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket.__name__ in ("addmm", "mm"):  # the linear layers
                seen.append(out.dtype)
            return out

    with autocast_bf16(True, torch.device("cpu")), MatmulDtypes():
        logits, atom_output, _ = net(batch)
    assert len(seen) > 10 and set(seen) == {torch.bfloat16}  # linear layers in bfloat16
    assert atom_output.dtype == torch.float32
    (logits[:, 0].float().sum() + atom_output.sum()).backward()
    assert all(p.dtype == torch.float32 for p in net.parameters())
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    net.eval()
    with torch.no_grad(), autocast_bf16(True, torch.device("cpu")):
        out = net(batch)[0][:, 0].float()
    assert float((out - ref).abs().max()) < 0.1


def _train_cmd(data, save, *flags):
    return [
        sys.executable, "-m", "fairseq_cli.train", "--user-dir", PLUGIN,
        "--data-path", str(data), "--task", "graph_prediction",
        "--criterion", "graph_prediction", "--arch", "transformer_m_small", "--num-classes", "1",
        "--encoder-layers", "2", "--encoder-embed-dim", "32", "--encoder-ffn-embed-dim", "32",
        "--encoder-attention-heads", "4", "--num-3d-bias-kernel", "8",
        "--add-3d", "--noise-scale", "0.2", "--lr", "1e-4", "--batch-size", "16",
        "--max-update", "3", "--save-dir", str(save), "--num-workers", "0",
        "--log-format", "json", "--log-interval", "1", "--no-progress-bar", *flags,
    ]  # fmt: skip


def test_fairseq_train_bf16_autocast_on_cpu(e2e_data_3d, e2e_env, tmp_path):
    """``--bf16-autocast --optimizer fused_adam`` trains through fairseq-train; the checkpoint's
    weights stay float32; combined with --fp16 it stops with a message naming the fix."""
    proc = subprocess.run(
        _train_cmd(e2e_data_3d, tmp_path / "ckpt", "--cpu", "--bf16-autocast",
                   "--optimizer", "fused_adam"),
        capture_output=True, text=True, timeout=600, env=e2e_env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    inner = [json.loads(line.split("train_inner | ")[1]) for line in proc.stdout.splitlines()
             if "train_inner | " in line]  # fmt: skip
    assert len(inner) == 3 and all(float(r["loss"]) == float(r["loss"]) for r in inner)
    state = torch.load(tmp_path / "ckpt" / "checkpoint_last.pt", weights_only=True)
    assert state["cfg"]["model"]["bf16_autocast"] is True
    assert all(v.dtype == torch.float32 for v in state["model"].values() if v.is_floating_point())


@pytest.mark.gpu
@pytest.mark.parametrize("flags", [["--fp16"], ["--bf16-autocast", "--optimizer", "fused_adam"],
                                   ["--fp16", "--optimizer", "fused_adam"]])
def test_fairseq_train_half_precision_on_cuda(flags, e2e_data_3d, e2e_env, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    env = dict(e2e_env)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    if "--optimizer" not in flags:
        flags = [*flags, "--optimizer", "adam"]
    proc = subprocess.run(_train_cmd(e2e_data_3d, tmp_path / "ckpt", *flags),
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "ckpt" / "checkpoint_last.pt").exists()


@pytest.mark.gpu
def test_bf16_autocast_on_cuda_close_to_fp32():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    net, batch = _golden_net("fast")
    net = net.cuda()
    batch = {k: v.cuda() for k, v in batch.items()}
    with torch.no_grad():
        ref = net(batch)[0][:, 0].float()
        with autocast_bf16(True, torch.device("cuda")):
            out = net(batch)[0][:, 0].float()
    assert float((out - ref).abs().max()) < 0.1


def test_bf16_autocast_refuses_half_weights():
    """--bf16-autocast with --fp16 (weights converted to float16): a clear error, not a
    silent mix of the two."""
    pytest.importorskip("fairseq")
    from transformer_m.models.transformer_m import TransformerMModel

    net, batch = _golden_net("fast")
    model = TransformerMModel(net, bf16_autocast=True).half()
    with pytest.raises(ValueError, match="--bf16-autocast needs float32 weights"):
        model(batch)

