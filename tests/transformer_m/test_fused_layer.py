"""The fused encoder layer (``transformer_m/modules/fused_layer.py``) computes what autograd's
own operators compute: equal outputs and gradients without dropout (float32, and bfloat16
autocast), exact gradients with dropout and DropPath (float64 ``gradcheck`` with the random
draws fixed), and a layer is three autograd nodes."""
import itertools

import pytest
import torch

from transformer_m.modules.multihead_attention import TokenPacking
from transformer_m.modules.transformer_m_encoder_layer import TransformerMEncoderLayer

B, T, D, H, FFN = 3, 7, 16, 4, 24


def _packing():
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[0, 5:] = True
    pad[2, 3:] = True
    return pad, TokenPacking.from_padding_mask(pad)


def _layer(activation="gelu", p=0.0, droppath=0.0, training=True, dtype=torch.float32):
    torch.manual_seed(0)
    layer = TransformerMEncoderLayer(
        embed_dim=D, ffn_embed_dim=FFN, num_heads=H, dropout=p, attention_dropout=p,
        act_dropout=p, activation_fn=activation, droppath_prob=droppath,
    )  # fmt: skip
    return layer.to(dtype).train(training)


def _inputs(pad, packing, dtype=torch.float32, droppath=False, neg=float("-inf")):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(len(packing.flat_index), D, generator=g, dtype=dtype).requires_grad_()
    bias = torch.randn(B, H, T, T, generator=g, dtype=dtype)
    bias = bias.masked_fill(pad[:, None, None, :], neg).requires_grad_()
    scales = None
    if droppath:
        keep = (torch.rand(len(x), 1, generator=g) > 0.3).to(dtype)
        scales = (keep / 0.7, torch.full((len(x), 1), 1 / 0.7, dtype=dtype))
    return x, bias, scales


def _run(fn, layer, x, bias, packing, scales):
    torch.manual_seed(5)
    y = fn(x, bias, packing, scales)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=y.dtype)
    inputs = [x, bias] + list(layer.parameters())
    return y, torch.autograd.grad(y, inputs, g, allow_unused=True)


@pytest.mark.parametrize(
    "activation,droppath,training",
    list(itertools.product(["gelu", "relu"], [0.0, 0.2], [True, False])),
)
def test_fused_layer_equals_autograd_layer(activation, droppath, training):
    pad, packing = _packing()
    layer = _layer(activation, 0.0, droppath, training)
    x, bias, scales = _inputs(pad, packing, droppath=droppath > 0 and training)
    assert layer.fused(scales)
    fused = _run(layer.forward_packed, layer, x, bias, packing, scales)
    plain = _run(layer.forward_packed_autograd, layer, x, bias, packing, scales)
    torch.testing.assert_close(fused[0], plain[0], rtol=0, atol=1e-6)
    for a, b in zip(fused[1], plain[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_fused_layer_under_bf16_autocast_equals_autograd_layer():
    """Autocast's choices made explicitly: products in bfloat16, LayerNorm and the residual
    stream in float32, float32 gradients of the float32 weights."""
    pad, packing = _packing()
    layer = _layer("gelu", 0.0, 0.2, True)
    x, bias, scales = _inputs(pad, packing, droppath=True)
    outs = []
    for fn in (layer.forward_packed, layer.forward_packed_autograd):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs.append(_run(fn, layer, x, bias, packing, scales))
    assert outs[0][0].dtype == outs[1][0].dtype == torch.float32
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=0, atol=1e-6)
    for a, b in zip(outs[0][1], outs[1][1]):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("activation,droppath", [("gelu", 0.0), ("relu", 0.2)])
def test_fused_layer_gradients_with_dropout(activation, droppath):
    """Dropout on the attention probabilities, after the activation and (without DropPath) on
    the residual branches: analytic gradients equal numerical ones (float64, draws fixed)."""
    pad, packing = _packing()
    layer = _layer(activation, 0.3, droppath, True, torch.float64)
    x, bias, scales = _inputs(pad, packing, torch.float64, droppath > 0, neg=-1e9)
    assert layer.fused(scales)

    def f(x, bias, *params):
        torch.manual_seed(3)
        return layer.forward_packed(x, bias, packing, scales)

    assert torch.autograd.gradcheck(f, (x, bias, *layer.parameters()), eps=1e-6, atol=1e-5)


def test_dropout_is_drawn_and_scaled():
    pad, packing = _packing()
    layer = _layer("gelu", 0.5, 0.0, True)
    x, bias, _ = _inputs(pad, packing)
    torch.manual_seed(0)
    a = layer.forward_packed(x, bias, packing)
    torch.manual_seed(0)
    b = layer.forward_packed(x, bias, packing)
    c = layer.forward_packed(x, bias, packing)
    assert torch.equal(a, b) and not torch.equal(b, c)
    assert torch.equal(layer.eval().forward_packed(x, bias, packing),
                       layer.forward_packed_autograd(x, bias, packing))  # fmt: skip


def _graph_nodes(tensor):
    seen, stack = set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(fn for fn, _ in node.next_functions)
    return {type(n).__name__ for n in seen}, len(seen)


def test_a_layer_is_three_autograd_nodes():
    pad, packing = _packing()
    layer = _layer("gelu", 0.1, 0.0, True)
    x, bias, _ = _inputs(pad, packing)
    names, count = _graph_nodes(layer.forward_packed(x, bias, packing))
    assert {"QKVGatherBackward", "BiasedAttentionBackward", "PostAttentionBackward"} <= names
    # the three nodes, the head-major bias view and the 16 parameters' AccumulateGrad
    assert count <= 3 + 3 + 2 + 16 + 6, names
    _, plain = _graph_nodes(layer.forward_packed_autograd(x, bias, packing))
    assert plain > 2 * count


def test_sandwich_layers_take_the_autograd_path():
    layer = TransformerMEncoderLayer(embed_dim=D, ffn_embed_dim=FFN, num_heads=H,
                                     sandwich_ln=True)  # fmt: skip
    assert not layer.fused(None)
    droppath = _layer("gelu", 0.0, 0.2, True)
    assert not droppath.fused(None) and droppath.eval().fused(None)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_rotated_attention_gradients(p):
    """The denoising head's attention node: exact gradients (float64, draws fixed), also for
    the unit vectors."""
    from transformer_m.modules.fused_layer import RotatedAttention

    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(3, H * B, 5, 4, generator=g, dtype=torch.float64).requires_grad_()
    bias = torch.randn(H * B, 5, 5, generator=g, dtype=torch.float64).requires_grad_()
    delta = torch.randn(B, 5, 5, 3, generator=g, dtype=torch.float64).requires_grad_()

    def f(qkv, bias, delta):
        torch.manual_seed(3)
        return RotatedAttention.apply(qkv, bias, delta, 0.5, p)

    assert torch.autograd.gradcheck(f, (qkv, bias, delta), eps=1e-6, atol=1e-6)


def test_atom_head_on_packed_tokens_equals_the_release_layout():
    """``AtomTaskHead.forward_packed`` (packed tokens, head-major bias) computes
    ``forward`` (the release's [N, B, D] layout): outputs and parameter gradients."""
    from transformer_m.modules.transformer_m_layers import AtomTaskHead

    torch.manual_seed(0)
    head = AtomTaskHead(embed_dim=D, num_heads=H, attention_dropout=0.0).train()
    pad, packing = _packing()
    n = T - 1
    g = torch.Generator().manual_seed(4)
    xs = torch.randn(len(packing.flat_index), D, generator=g, requires_grad=True)
    bias = torch.randn(B, H, n, n, generator=g)
    bias = bias.masked_fill(pad[:, None, None, 1:], float("-inf"))
    delta = torch.nn.functional.normalize(torch.randn(B, n, n, 3, generator=g), dim=-1)
    spread = packing.spread_index.view(B, T)[:, 1:].reshape(-1)
    packed = head.forward_packed(xs, spread, bias, delta)
    grid = packing.unpack(xs).transpose(0, 1)[1:]  # [N, B, D] atom tokens
    plain = head(grid, bias, delta)
    real = ~pad[:, 1:]
    torch.testing.assert_close(packed[real], plain[real], rtol=0, atol=1e-6)
    w = torch.randn(B, n, 3, generator=g) * real[..., None]
    grads = [torch.autograd.grad((out * w).sum(), [xs] + list(head.parameters()))
             for out in (packed, plain)]  # fmt: skip
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("scenario", ["out_train_modes", "out_mixed"])
def test_fast_model_equals_reference_in_float64(scenario):
    """The whole fast model (fused layers, packed denoising head) in float64 and training
    mode, dropout off: outputs and every parameter gradient equal the reference path's to
    float64 rounding. The golden batch pads its 16 molecules to the largest; the modes mix
    2D+3D, 2D and 3D; ``out_mixed`` has molecules without coordinates."""
    from golden_fixture import golden
    from tm_modules_testutils import atom_mask, build_small, scenario_batch, token_mask

    batch = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
             for k, v in scenario_batch(scenario).items()}  # fmt: skip
    choice = torch.tensor(golden()["out_train_modes"]["mode_choice"])
    assert set(choice.tolist()) == {0, 1, 2}
    tokens, atoms = token_mask(batch), atom_mask(batch)
    runs = {}
    for implementation in ("fast", "reference"):
        model = build_small(implementation).double().train()
        logits, atom_output, _ = model(batch, mode_choice=choice)
        assert logits.dtype == atom_output.dtype == torch.float64
        g = torch.Generator().manual_seed(0)
        w_logits = torch.randn(logits.shape, generator=g, dtype=torch.float64) * tokens[..., None]
        w_atoms = torch.randn(atom_output.shape, generator=g, dtype=torch.float64)
        loss = (logits * w_logits).sum() + (atom_output * w_atoms * atoms[..., None]).sum()
        loss.backward()
        grads = {k: p.grad for k, p in model.named_parameters()}
        runs[implementation] = (logits[tokens], atom_output[atoms], grads)
    fast, ref = runs["fast"], runs["reference"]
    torch.testing.assert_close(fast[0], ref[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(fast[1], ref[1], rtol=0, atol=1e-10)
    for name, want in ref[2].items():
        got = fast[2][name]
        assert (got is None) == (want is None), name
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("scenario", ["out_train_modes", "out_mixed"])
def test_fast_model_equals_reference_on_cuda(scenario):
    """The same comparison on a CUDA device in float32: the fused layers' hand-written backward
    passes and the packed denoising head run there as on the CPU."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from golden_fixture import golden
    from tm_modules_testutils import atom_mask, build_small, scenario_batch, token_mask

    dev = torch.device("cuda")
    batch = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in scenario_batch(scenario).items()}
    choice = torch.tensor(golden()["out_train_modes"]["mode_choice"], device=dev)
    tokens, atoms = token_mask(batch), atom_mask(batch)
    runs = {}
    for implementation in ("fast", "reference"):
        model = build_small(implementation).to(dev).train()
        logits, atom_output, _ = model(batch, mode_choice=choice)
        g = torch.Generator().manual_seed(0)
        w_logits = torch.randn(logits.shape, generator=g).to(dev) * tokens[..., None]
        w_atoms = torch.randn(atom_output.shape, generator=g).to(dev)
        loss = (logits.float() * w_logits).sum() + (atom_output.float() * w_atoms
                                                     * atoms[..., None]).sum()
        loss.backward()
        grads = {k: p.grad for k, p in model.named_parameters()}
        runs[implementation] = (logits[tokens], atom_output[atoms], grads)
    fast, ref = runs["fast"], runs["reference"]
    torch.testing.assert_close(fast[0], ref[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast[1], ref[1], rtol=1e-4, atol=1e-4)
    for name, want in ref[2].items():
        got = fast[2][name]
        assert (got is None) == (want is None), name
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4, msg=name)
