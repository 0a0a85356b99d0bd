"""Self-attention with an additive per-head bias, in fairseq's parameter layout."""
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fused_layer import BiasedAttention, QKVGather, cast, softmax_dtype
from .utils import at_least_float32, check_implementation, dropout


class TokenPacking(NamedTuple):
    """Where the real tokens of a padded ``[B, T]`` grid sit once packed into [M] rows.

    Attributes:
        flat_index: int64 [M], ``b * T + t`` of each real token, in row-major order.
        batch_index: int64 [M], ``b`` of each real token.
        token_index: int64 [M], ``t`` of each real token.
        gather_index: int64 [B * T], packed row of each grid position (M = padding).
        spread_index: int64 [B * T], like ``gather_index`` but padding points at a real
            row (the last one): for attention inputs, where padded positions are masked.
        batch_size: B.
        num_tokens: T.
    """

    flat_index: torch.Tensor
    batch_index: torch.Tensor
    token_index: torch.Tensor
    gather_index: torch.Tensor
    spread_index: torch.Tensor
    batch_size: int
    num_tokens: int

    @classmethod
    def from_padding_mask(cls, padding_mask: torch.Tensor) -> "TokenPacking":
        """Packing of the tokens where ``padding_mask`` ([B, T] bool) is False.

        Computed on ``padding_mask``'s device with ``nonzero`` (a host synchronisation on
        a GPU); the training data path precomputes it on the host instead
        (:func:`transformer_m.modules.host_plan.host_plan`, :meth:`from_plan`).
        """
        batch_size, num_tokens = padding_mask.shape
        device = padding_mask.device
        flat_index = (~padding_mask).reshape(-1).nonzero().squeeze(-1)  # [M]
        num_real = flat_index.shape[0]
        gather_index = torch.full(
            (batch_size * num_tokens,), num_real, dtype=torch.long, device=device
        )
        gather_index[flat_index] = torch.arange(num_real, device=device)
        return cls(
            flat_index=flat_index,
            batch_index=torch.div(flat_index, num_tokens, rounding_mode="floor"),
            token_index=flat_index % num_tokens,
            gather_index=gather_index,
            spread_index=gather_index.clamp(max=num_real - 1),
            batch_size=batch_size,
            num_tokens=num_tokens,
        )

    @classmethod
    def from_plan(cls, plan: dict, batch_size: int, num_tokens: int) -> "TokenPacking":
        """The packing stored in a batch by :func:`~transformer_m.modules.host_plan.host_plan`
        (index tensors computed on the host; no device work, no synchronisation)."""
        from .host_plan import PLAN_BATCH, PLAN_GATHER, PLAN_SPREAD, PLAN_TOKEN, PLAN_TOKENS

        return cls(
            flat_index=plan[PLAN_TOKENS],
            batch_index=plan[PLAN_BATCH],
            token_index=plan[PLAN_TOKEN],
            gather_index=plan[PLAN_GATHER],
            spread_index=plan[PLAN_SPREAD],
            batch_size=batch_size,
            num_tokens=num_tokens,
        )

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, ...] -> [M, ...]."""
        flat = x.reshape((self.batch_size * self.num_tokens,) + x.shape[2:])
        return flat.index_select(0, self.flat_index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """[M, ...] -> [B, T, ...] with zeros at padded positions.

        A gather from ``x`` plus one zero row, so that autograd keeps only indices
        alive (an ``index_copy`` would save ``x`` for its backward).
        """
        padded = torch.cat([x, x.new_zeros((1,) + x.shape[1:])], dim=0)  # [M+1, ...]
        out = padded.index_select(0, self.gather_index)  # [B*T, ...]
        return out.view((self.batch_size, self.num_tokens) + x.shape[1:])

    def spread(self, x: torch.Tensor) -> torch.Tensor:
        """[M, ...] -> [B, T, ...] where padded positions hold a copy of some real row.

        One gather and no zero row: for attention inputs only, where padded keys carry
        ``-inf`` bias (weight exactly 0, and the copied row is finite) and padded
        queries are dropped again by :meth:`pack`; their gradients are exactly 0.
        """
        out = x.index_select(0, self.spread_index)  # [B*T, ...]
        return out.view((self.batch_size, self.num_tokens) + x.shape[1:])


class MultiheadAttention(nn.Module):
    """Multi-head self-attention with an additive bias ``[B, H, T, T]`` on the logits.

    Parameter names (``k_proj``, ``v_proj``, ``q_proj``, ``out_proj``, in this order)
    and the maths follow the Transformer-M release (spec §1.9): ``q`` is scaled by
    ``head_dim**-0.5`` after its bias, logits are ``q k^T + bias``, padded keys get
    ``-inf``, the softmax runs in float32, then attention dropout and ``out_proj``.

    Args:
        embed_dim: D.
        num_heads: H; D must be divisible by H.
        attention_dropout: dropout on the attention probabilities.
        implementation: ``"reference"`` computes logits, softmax and product explicitly
            as the release does; ``"fast"`` calls ``F.scaled_dot_product_attention``
            with the bias as a float mask (``key_padding_mask`` is folded into it).

    Shapes:
        query: [T, B, D]; attn_bias: [B, H, T, T]; key_padding_mask: [B, T]
        (True = padding); output: [T, B, D].
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        attention_dropout: float = 0.0,
        implementation: str = "fast",
    ) -> None:
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim {embed_dim} not divisible by {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = float(attention_dropout)
        self.implementation = check_implementation(implementation)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """fairseq's init: xavier (gain 1/sqrt 2) q/k/v; xavier + zero bias out_proj."""
        gain = 2**-0.5
        nn.init.xavier_uniform_(self.k_proj.weight, gain=gain)
        nn.init.xavier_uniform_(self.v_proj.weight, gain=gain)
        nn.init.xavier_uniform_(self.q_proj.weight, gain=gain)
        nn.init.xavier_uniform_(self.out_proj.weight)
        nn.init.constant_(self.out_proj.bias, 0.0)

    def forward(
        self,
        query: torch.Tensor,
        attn_bias: Optional[torch.Tensor],
        key_padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if self.implementation == "reference":
            return self._forward_reference(query, attn_bias, key_padding_mask)
        return self._forward_sdpa(query, attn_bias, key_padding_mask)

    def _forward_reference(self, query, attn_bias, key_padding_mask):
        tgt_len, bsz, embed_dim = query.shape
        heads = bsz * self.num_heads
        q = self.q_proj(query) * self.scaling
        k = self.k_proj(query)
        v = self.v_proj(query)
        q = q.contiguous().view(tgt_len, heads, self.head_dim).transpose(0, 1)
        k = k.contiguous().view(tgt_len, heads, self.head_dim).transpose(0, 1)
        v = v.contiguous().view(tgt_len, heads, self.head_dim).transpose(0, 1)
        attn_weights = torch.bmm(q, k.transpose(1, 2))  # [B*H, T, T]
        if attn_bias is not None:
            attn_weights += attn_bias.reshape(heads, tgt_len, tgt_len)
        if key_padding_mask is not None:
            attn_weights = attn_weights.view(bsz, self.num_heads, tgt_len, tgt_len)
            attn_weights = attn_weights.masked_fill(
                key_padding_mask[:, None, None, :].to(torch.bool), float("-inf")
            )
            attn_weights = attn_weights.view(heads, tgt_len, tgt_len)
        attn_probs = F.softmax(at_least_float32(attn_weights), dim=-1).type_as(attn_weights)
        attn_probs = F.dropout(
            attn_probs, p=self.attention_dropout, training=self.training
        )
        attn = torch.bmm(attn_probs, v)  # [B*H, T, hd]
        attn = attn.transpose(0, 1).contiguous().view(tgt_len, bsz, embed_dim)
        return self.out_proj(attn)

    def _sdpa(self, q, k, v, attn_bias, scale: float = 1.0):
        # q, k, v: [B, H, T, hd]; scale 1: q is already scaled
        if attn_bias is not None and attn_bias.dtype != q.dtype:
            attn_bias = attn_bias.to(q.dtype)
        p = self.attention_dropout if self.training else 0.0
        if p > 0.0 and q.device.type == "cpu" and attn_bias is not None:
            return self._attention_cpu(q, k, v, attn_bias, scale, p)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_bias, dropout_p=p, scale=scale
        )

    @staticmethod
    def _attention_cpu(q, k, v, attn_bias, scale: float, p: float):
        """Softmax attention with dropout in four operators, for the CPU.

        There SDPA has no fused kernel with dropout and falls back to a decomposition of
        about fifteen operators. Same maths (float32 softmax, as the release).
        """
        bsz, heads, tgt_len, head_dim = q.shape
        rows = bsz * heads
        logits = torch.baddbmm(
            attn_bias.reshape(rows, tgt_len, tgt_len),
            q.reshape(rows, tgt_len, head_dim),
            k.reshape(rows, tgt_len, head_dim).transpose(1, 2),
            alpha=scale,
        )  # [B*H, T, T]
        probs = F.softmax(logits, dim=-1, dtype=softmax_dtype(logits.dtype)).type_as(logits)
        probs = dropout(probs, p, True)
        out = torch.bmm(probs, v.reshape(rows, tgt_len, head_dim))
        return out.view(bsz, heads, tgt_len, head_dim)

    def _forward_sdpa(self, query, attn_bias, key_padding_mask):
        tgt_len, bsz, embed_dim = query.shape
        if key_padding_mask is not None:
            pad = key_padding_mask[:, None, None, :].to(torch.bool)
            if attn_bias is None:
                attn_bias = query.new_zeros(bsz, 1, 1, tgt_len)
            attn_bias = attn_bias.masked_fill(pad, float("-inf"))
        shape = (tgt_len, bsz, self.num_heads, self.head_dim)
        q = (self.q_proj(query) * self.scaling).view(shape).permute(1, 2, 0, 3)
        k = self.k_proj(query).view(shape).permute(1, 2, 0, 3)
        v = self.v_proj(query).view(shape).permute(1, 2, 0, 3)  # [B, H, T, hd]
        attn = self._sdpa(q, k, v, attn_bias)  # [B, H, T, hd]
        attn = attn.permute(2, 0, 1, 3).reshape(tgt_len, bsz, embed_dim)
        return self.out_proj(attn)

    def qkv_parameters(self):
        """The q, k and v projections stacked: weight [3D, D] and bias [3D]."""
        projections = (self.q_proj, self.k_proj, self.v_proj)
        weight = torch.cat([p.weight for p in projections], dim=0)
        bias = torch.cat([p.bias for p in projections], dim=0)
        return weight, bias

    def attend(self, qkv: torch.Tensor, bias: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Attention of head-major padded q, k, v with a head-major bias.

        Args:
            qkv: [3, H, B*T, hd] (from :class:`~.fused_layer.QKVGather`).
            bias: [H*B, T, T], ``-inf`` on padded keys, in the dtype of ``qkv``.
            batch_size: B.

        Returns:
            [B*T, H, hd] per padded position (a view; padded queries hold finite values).
        """
        _, heads, n_pos, head_dim = qkv.shape
        n_tok = n_pos // batch_size
        p = self.attention_dropout if self.training else 0.0
        if p > 0.0 and qkv.device.type == "cpu":
            # no fused CPU kernel with dropout: one node with a hand-written backward
            rows = qkv.view(3, heads * batch_size, n_tok, head_dim)
            out = BiasedAttention.apply(rows, bias, self.scaling, p)  # [H*B, T, hd]
            return out.view(heads, n_pos, head_dim).transpose(0, 1)
        q, k, v = qkv.view(3, heads, batch_size, n_tok, head_dim).transpose(1, 2).unbind(0)
        mask = bias.view(heads, batch_size, n_tok, n_tok).transpose(0, 1)  # [B, H, T, T]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=p, scale=self.scaling
        )  # [B, H, T, hd]
        return out.transpose(1, 2).reshape(n_pos, heads, head_dim)

    def forward_packed(
        self, x: torch.Tensor, attn_bias: torch.Tensor, packing: TokenPacking
    ) -> torch.Tensor:
        """Attention over packed real tokens (the fast encoder path).

        Args:
            x: [M, D] real tokens, packed with ``packing``.
            attn_bias: [B, H, T, T], with ``-inf`` already on padded keys (head-major
                storage, ``[H, B, T, T]`` transposed, avoids a copy).
            packing: the token packing of ``x``.

        Returns:
            [M, D].
        """
        dtype = _attention_dtype(x)
        weight, bias = self.qkv_parameters()
        qkv = QKVGather.apply(x, weight, bias, packing.spread_index, self.num_heads, dtype)
        attn = self.attend(qkv, head_major(attn_bias, dtype), packing.batch_size)
        attn = attn.index_select(0, packing.flat_index).reshape(-1, self.embed_dim)  # [M, D]
        return self.out_proj(attn)

    def forward_packed_autograd(
        self, x: torch.Tensor, attn_bias: torch.Tensor, packing: TokenPacking
    ) -> torch.Tensor:
        """:meth:`forward_packed` with autograd's own operators (padded-grid layout, no
        hand-written backward): the oracle of the fused functions, and the path of
        configurations they do not cover."""
        bsz, tgt_len = packing.batch_size, packing.num_tokens
        weight, bias = self.qkv_parameters()
        qkv = packing.spread(F.linear(x, weight, bias))  # [B, T, 3D]
        qkv = qkv.view(bsz, tgt_len, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, T, hd] each
        # the release scales q before q k^T; SDPA's scale does the same multiplication
        attn = self._sdpa(q, k, v, attn_bias, scale=self.scaling)  # [B, H, T, hd]
        attn = packing.pack(attn.transpose(1, 2)).reshape(-1, self.embed_dim)  # [M, D]
        return self.out_proj(attn)


def head_major(attn_bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[B, H, T, T]`` -> ``[H*B, T, T]`` in ``dtype`` (no copy when its storage already is
    head-major and of that dtype)."""
    bsz, heads, n_tok, _ = attn_bias.shape
    return cast(attn_bias.transpose(0, 1).reshape(heads * bsz, n_tok, n_tok), dtype)


def _attention_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the attention runs in: autocast's for ``x``'s device, if on, else x's."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype
