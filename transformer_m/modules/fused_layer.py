"""The fast path's encoder layer as three autograd functions with hand-written backward passes.

Autograd records every operator of a layer: about 40 nodes per layer in the forward pass and
some 95 operator calls in the backward pass of a Post-LN Transformer-M layer, each with its own
host-side bookkeeping. On a GPU the host time per update is what limits a small model, and that
bookkeeping is most of it. Here one layer is three nodes:

1. :class:`QKVGather`: the fused q/k/v projection of the packed tokens, gathered straight into
   head-major padded layout ``[3, H, B*T, hd]`` (one ``addmm``, one ``index_select``);
2. the attention itself: ``F.scaled_dot_product_attention`` (one node), or, on the CPU in
   training, :class:`BiasedAttention` (``baddbmm``, softmax, dropout, ``bmm``: SDPA has no fused
   CPU kernel with dropout);
3. :class:`PostAttention`: packing back to real tokens, ``out_proj``, residual (dropout or
   DropPath), LayerNorm, FFN, residual, LayerNorm.

The operators are those of the autograd path (:meth:`TransformerMEncoderLayer.forward_packed_autograd`)
in the same order, with the same dtypes (autocast's choices are made explicitly: matrix products
in the autocast dtype, LayerNorm in float32), and the same random draws, so the values equal the
autograd path's (tested in ``tests/transformer_m/test_fused_layer.py``). The attention bias is
head-major, ``[H*B, T, T]``: q, k, v and the bias are then plain batched matrices with no copy.
"""
from typing import NamedTuple, Optional

import torch


class Precision(NamedTuple):
    """Dtypes of a layer's computation.

    Attributes:
        mm: dtype of the matrix products (autocast's dtype if autocast is on, else the input's).
        autocast: autocast is on: LayerNorm runs in float32 (autocast's float32 list).
    """

    mm: torch.dtype
    autocast: bool

    @classmethod
    def of(cls, x: torch.Tensor) -> "Precision":
        device = x.device.type
        if torch.is_autocast_enabled(device):
            return cls(torch.get_autocast_dtype(device), True)
        return cls(x.dtype, False)


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, without an operator call when it already has that dtype."""
    return t if t.dtype == dtype else t.to(dtype)


def softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    """The attention softmax and GELU run in float32 (as released), or wider."""
    return torch.promote_types(dtype, torch.float32)


ACTIVATIONS = ("gelu", "relu")  # handled here; others run on the autograd path


def _activation(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "relu":
        return torch.relu(x)
    # fairseq "gelu": exact erf GELU in float32 (or wider)
    return cast(torch.ops.aten.gelu(cast(x, softmax_dtype(x.dtype))), x.dtype)


def _activation_backward(name: str, grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
    if name == "relu":
        return torch.ops.aten.threshold_backward(grad, y, 0)
    wide = softmax_dtype(x.dtype)
    return cast(torch.ops.aten.gelu_backward(cast(grad, wide), cast(x, wide)), x.dtype)


def _dropout(x: torch.Tensor, p: float):
    """``native_dropout`` (the draw of :func:`utils.dropout`), or ``(x, None)`` when off."""
    if p <= 0.0:
        return x, None
    return torch.native_dropout(x, p, True)


def _dropout_backward(grad: torch.Tensor, mask: Optional[torch.Tensor], p: float):
    if mask is None:
        return grad
    return torch.ops.aten.native_dropout_backward(grad, mask, 1.0 / (1.0 - p))


def _linear_backward(grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor, need_x: bool = True):
    """Gradients of ``addmm(b, x, w.t())``: (x, w, b)."""
    grad_x = grad.mm(w) if need_x else None
    return grad_x, grad.t().mm(x), grad.sum(0)


class QKVGather(torch.autograd.Function):
    """``addmm(b, x, w.t())`` of the packed tokens, gathered to head-major padded rows.

    Args (of ``apply``):
        x: [M, D] packed tokens.
        weight: [3D, D] (q, k, v stacked); bias: [3D].
        spread_index: int64 [B*T], the packed row of each padded position (padding: a real
            row; its keys are masked by the bias, its queries dropped when packing back).
        num_heads: H.
        mm_dtype: dtype of the product.

    Returns:
        [3, H, B*T, hd] in ``mm_dtype``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, spread_index, num_heads, mm_dtype):
        xc, wc = cast(x, mm_dtype), cast(weight, mm_dtype)
        y = torch.addmm(cast(bias, mm_dtype), xc, wc.t())  # [M, 3D]
        n_rows, width = y.shape
        head_dim = width // (3 * num_heads)
        view = y.view(n_rows, 3, num_heads, head_dim).permute(1, 2, 0, 3)  # [3, H, M, hd]
        ctx.save_for_backward(xc, wc, spread_index)
        ctx.shape = (n_rows, num_heads, head_dim)
        return view.index_select(2, spread_index)

    @staticmethod
    def backward(ctx, grad):
        xc, wc, spread_index = ctx.saved_tensors
        n_rows, num_heads, head_dim = ctx.shape
        # zeros laid out [M, 3, H, hd], summed into as [3, H, M, hd]
        grad_y = grad.new_zeros(n_rows, 3, num_heads, head_dim)
        if torch.compiler.is_compiling():  # a mutation through a permuted view does not trace
            summed = grad_y.permute(1, 2, 0, 3).index_add(2, spread_index, grad)
            grad_y = summed.permute(2, 0, 1, 3)
        else:
            grad_y.permute(1, 2, 0, 3).index_add_(2, spread_index, grad)
        grad_y = grad_y.reshape(n_rows, -1)
        grad_x, grad_w, grad_b = _linear_backward(grad_y, xc, wc, ctx.needs_input_grad[0])
        return grad_x, grad_w, grad_b, None, None, None


class BiasedAttention(torch.autograd.Function):
    """Softmax attention with an additive bias and dropout on the probabilities.

    ``softmax(scale * q k^T + bias)`` in float32 (as released), dropout, ``@ v``: the four
    operators of the CPU training path, one autograd node.

    Args (of ``apply``):
        qkv: [3, R, T, hd] (R = H*B rows, head-major).
        bias: [R, T, T], ``-inf`` on padded keys, dtype of ``qkv``.
        scale: factor of ``q k^T``.
        p: dropout probability (0: none).

    Returns:
        [R, T, hd].
    """

    @staticmethod
    def forward(ctx, qkv, bias, scale, p):
        q, k, v = qkv.unbind(0)
        logits = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=scale)  # [R, T, T]
        probs32 = torch.softmax(logits, -1, dtype=softmax_dtype(logits.dtype))
        probs = cast(probs32, logits.dtype)
        dropped, mask = _dropout(probs, p)
        ctx.save_for_backward(qkv, probs32, dropped, mask)
        ctx.scale, ctx.p = scale, p
        return torch.bmm(dropped, v)

    @staticmethod
    def backward(ctx, grad):
        qkv, probs32, dropped, mask = ctx.saved_tensors
        q, k, v = qkv.unbind(0)
        grad_qkv = torch.empty_like(qkv)
        torch.bmm(dropped.transpose(1, 2), grad, out=grad_qkv[2])  # dv
        grad_probs = _dropout_backward(torch.bmm(grad, v.transpose(1, 2)), mask, ctx.p)
        grad_logits = torch.ops.aten._softmax_backward_data(
            cast(grad_probs, probs32.dtype), probs32, -1, probs32.dtype
        )
        grad_logits = cast(grad_logits, qkv.dtype)
        torch.bmm(grad_logits, k, out=grad_qkv[0])  # dq / scale
        torch.bmm(grad_logits.transpose(1, 2), q, out=grad_qkv[1])  # dk / scale
        grad_qkv[:2].mul_(ctx.scale)
        return grad_qkv, grad_logits, None, None


class PostAttention(torch.autograd.Function):
    """Pack the attention output to real tokens, ``out_proj``, residual, LN, FFN, residual, LN.

    Post-LN (the released layer): ``x1 = LN1(x + r1(out_proj(a)))``,
    ``out = LN2(x1 + r2(fc2(drop(act(fc1(x1))))))`` where ``r`` is DropPath with the given
    per-token factors, or residual dropout with probability ``p_residual``.

    Args (of ``apply``):
        attn: [B*T, H, hd] attention output per padded position (any strides).
        x: [M, D] the layer input (packed).
        flat_index: int64 [M], padded position of each packed token.
        scale_attn, scale_ffn: [M, 1] DropPath factors, or None.
        params: ``(w_o, b_o, ln1_w, ln1_b, w1, b1, w2, b2, ln2_w, ln2_b)``.
        settings: ``(activation, p_act, p_residual, (eps1, eps2), mm_dtype, autocast)``.

    Returns:
        [M, D].
    """

    @staticmethod
    def forward(ctx, attn, x, flat_index, scale_attn, scale_ffn, w_o, b_o, ln1_w, ln1_b,
                w1, b1, w2, b2, ln2_w, ln2_b, settings):  # fmt: skip
        activation, p_act, p_res, eps, mm_dtype, autocast = settings
        n_rows, width = x.shape
        a = attn.index_select(0, flat_index).view(n_rows, width)  # [M, D]
        woc, w1c, w2c = cast(w_o, mm_dtype), cast(w1, mm_dtype), cast(w2, mm_dtype)
        y = torch.addmm(cast(b_o, mm_dtype), a, woc.t())
        h, mask_r1 = _residual(x, y, scale_attn, p_res)
        ln_in = cast(h, torch.float32) if autocast else h
        x1, mean1, rstd1 = torch.native_layer_norm(ln_in, (width,), ln1_w, ln1_b, eps[0])
        x1c = cast(x1, mm_dtype)
        f1 = torch.addmm(cast(b1, mm_dtype), x1c, w1c.t())
        act = _activation(activation, f1)
        act_d, mask_act = _dropout(act, p_act)
        f2 = torch.addmm(cast(b2, mm_dtype), act_d, w2c.t())
        h2, mask_r2 = _residual(x1, f2, scale_ffn, p_res)
        ln2_in = cast(h2, torch.float32) if autocast else h2
        out, mean2, rstd2 = torch.native_layer_norm(ln2_in, (width,), ln2_w, ln2_b, eps[1])
        ctx.save_for_backward(
            flat_index, scale_attn, scale_ffn, a, woc, ln_in, mean1, rstd1, ln1_w,
            ln1_b, x1c, w1c, f1, act, act_d, w2c, ln2_in, mean2, rstd2, ln2_w, ln2_b,
            mask_r1, mask_act, mask_r2,
        )  # fmt: skip
        ctx.settings = settings
        ctx.x_dtype, ctx.x1_dtype = x.dtype, x1.dtype
        # the layout of attn, for its gradient (the attention's backward then gets its own
        # output layout back); the tensor itself is not kept
        ctx.attn_layout = (attn.shape, attn.stride(), attn.dtype, attn.device)
        return out

    @staticmethod
    def backward(ctx, grad):
        (flat_index, scale_attn, scale_ffn, a, woc, ln_in, mean1, rstd1, ln1_w, ln1_b,
         x1c, w1c, f1, act, act_d, w2c, ln2_in, mean2, rstd2, ln2_w, ln2_b, mask_r1, mask_act,
         mask_r2) = ctx.saved_tensors  # fmt: skip
        activation, p_act, p_res, eps, mm_dtype, autocast = ctx.settings
        width = a.shape[1]
        need = ctx.needs_input_grad
        g_h2, g_ln2_w, g_ln2_b = torch.ops.aten.native_layer_norm_backward(
            cast(grad, ln2_in.dtype), ln2_in, (width,), mean2, rstd2, ln2_w, ln2_b,
            (True, need[13], need[14]),
        )  # fmt: skip
        g_x1, g_f2 = _residual_backward(g_h2, scale_ffn, mask_r2, p_res)
        g_f2 = cast(g_f2, mm_dtype)
        g_act_d, g_w2, g_b2 = _linear_backward(g_f2, act_d, w2c)
        g_act = _dropout_backward(g_act_d, mask_act, p_act)
        g_f1 = _activation_backward(activation, g_act, f1, act)
        g_x1c, g_w1, g_b1 = _linear_backward(g_f1, x1c, w1c)
        g_x1 = cast(g_x1 + g_x1c, ctx.x1_dtype)
        g_h, g_ln1_w, g_ln1_b = torch.ops.aten.native_layer_norm_backward(
            cast(g_x1, ln_in.dtype), ln_in, (width,), mean1, rstd1, ln1_w, ln1_b,
            (True, need[7], need[8]),
        )  # fmt: skip
        g_x, g_y = _residual_backward(g_h, scale_attn, mask_r1, p_res)
        g_a, g_w_o, g_b_o = _linear_backward(cast(g_y, mm_dtype), a, woc)
        g_attn = None
        if need[0]:
            shape, stride, dtype, device = ctx.attn_layout
            g_attn = torch.empty_strided(shape, stride, dtype=dtype, device=device).zero_()
            # an add, not a copy: inert rows (--pack-multiple) repeat position 0
            g_attn.index_add_(0, flat_index, g_a.view((len(flat_index),) + shape[1:]))
        return (g_attn, cast(g_x, ctx.x_dtype), None, None, None, g_w_o, g_b_o, g_ln1_w, g_ln1_b,
                g_w1, g_b1, g_w2, g_b2, g_ln2_w, g_ln2_b, None)  # fmt: skip


def _residual(x, branch, scale, p):
    """``x + scale * branch`` (DropPath factors) or ``x + dropout(branch)``; and the mask."""
    if scale is not None:
        return torch.addcmul(x, branch, scale), None
    dropped, mask = _dropout(branch, p)
    return x + dropped, mask


def _residual_backward(grad, scale, mask, p):
    """Gradients of :func:`_residual` for (x, branch)."""
    if scale is not None:
        return grad, grad * scale
    return grad, _dropout_backward(grad, mask, p)


class RotatedAttention(torch.autograd.Function):
    """The denoising head's attention: ``out[h, b, c] = (A[h, b] * rhat[b, c]) @ v[h, b]`` with
    ``A = dropout(softmax(scale * q k^T + bias))`` (softmax in float32, as released).

    One node with a hand-written backward; the ``[H, B, 3, N, N]`` product of the probabilities
    and the unit vectors exists only while it is multiplied (recomputed in backward).

    Args (of ``apply``):
        qkv: [3, H*B, N, hd] (head-major rows ``h * B + b``).
        bias: [H*B, N, N] in the dtype of ``qkv`` (any strides).
        delta_pos: [B, N, N, 3] unit vectors ``rhat_ij``.
        scale: factor of ``q k^T``.
        p: dropout probability on the attention probabilities (0: none).

    Returns:
        [H*B, 3*N, hd]: rows ``(c, i)`` of each head and molecule.
    """

    @staticmethod
    def forward(ctx, qkv, bias, delta_pos, scale, p):
        q, k, v = qkv.unbind(0)
        rows, n, _ = q.shape
        bsz = delta_pos.shape[0]
        logits = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=scale)  # [R, N, N]
        probs32 = torch.softmax(logits, -1, dtype=softmax_dtype(logits.dtype))
        dropped, mask = _dropout(cast(probs32, logits.dtype), p)
        rhat = cast(delta_pos, dropped.dtype).permute(0, 3, 1, 2).contiguous()  # [B, 3, N, N]
        rotated = dropped.view(rows // bsz, bsz, 1, n, n) * rhat.unsqueeze(0)  # [H, B, 3, N, N]
        ctx.save_for_backward(qkv, probs32, dropped, mask, rhat)
        ctx.scale, ctx.p = scale, p
        return torch.bmm(rotated.reshape(rows, 3 * n, n), v)

    @staticmethod
    def backward(ctx, grad):
        qkv, probs32, dropped, mask, rhat = ctx.saved_tensors
        q, k, v = qkv.unbind(0)
        rows, n, _ = q.shape
        bsz = rhat.shape[0]
        split = dropped.view(rows // bsz, bsz, 1, n, n)
        rotated = (split * rhat.unsqueeze(0)).reshape(rows, 3 * n, n)
        grad_qkv = torch.empty_like(qkv)
        torch.bmm(rotated.transpose(1, 2), grad, out=grad_qkv[2])  # dv
        grad_rot = torch.bmm(grad, v.transpose(1, 2)).view(rows // bsz, bsz, 3, n, n)
        # (the [B, 3, N, N] layout of rhat is its own: grad_delta is permuted back below)
        grad_delta = None
        if ctx.needs_input_grad[2]:
            grad_delta = (grad_rot * split).sum(0).permute(0, 2, 3, 1)  # [B, N, N, 3]
        grad_dropped = (grad_rot * rhat.unsqueeze(0)).sum(2).view(rows, n, n)
        grad_probs = _dropout_backward(grad_dropped, mask, ctx.p)
        grad_logits = torch.ops.aten._softmax_backward_data(
            cast(grad_probs, probs32.dtype), probs32, -1, probs32.dtype
        )
        grad_logits = cast(grad_logits, qkv.dtype)
        torch.bmm(grad_logits, k, out=grad_qkv[0])
        torch.bmm(grad_logits.transpose(1, 2), q, out=grad_qkv[1])
        grad_qkv[:2].mul_(ctx.scale)
        return grad_qkv, grad_logits, grad_delta, None, None
