"""One Transformer-M encoder layer (post-LN by default, optional sandwich LN)."""
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .droppath import DropPath
from .fused_layer import ACTIVATIONS, PostAttention, Precision, QKVGather
from .multihead_attention import MultiheadAttention, TokenPacking, head_major
from .utils import check_implementation, dropout, get_activation_fn


class TransformerMEncoderLayer(nn.Module):
    """Transformer-M encoder layer (spec §1.9).

    Post-LN when ``sandwich_ln`` is False (the released default)::

        x = LN(x + Drop(Attn(x)));  x = LN(x + Drop(fc2(ActDrop(act(fc1(x))))))

    With ``sandwich_ln`` the LNs move before each sublayer and an extra LN normalises
    each sublayer output before the residual add. When ``droppath_prob > 0`` the
    residual-branch dropout is replaced by one ``DropPath`` used by both sublayers.

    Args:
        embed_dim: D.
        ffn_embed_dim: FFN width.
        num_heads: H.
        dropout: residual-branch dropout (unused when ``droppath_prob > 0``).
        attention_dropout: dropout on attention probabilities.
        act_dropout: dropout after the FFN activation.
        activation_fn: fairseq activation name (``gelu`` = float32 erf GELU).
        sandwich_ln: Pre-LN plus sublayer LNs instead of Post-LN.
        droppath_prob: stochastic-depth probability of this layer.
        legacy_droppath: per-token DropPath masks (released quirk), not per-molecule.
        implementation: ``"fast"`` (SDPA; packed tokens via ``forward_packed``) or
            ``"reference"``.

    Shapes:
        x: [T, B, D]; attn_bias: [B, H, T, T]; key_padding_mask: [B, T];
        output: [T, B, D].
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        ffn_embed_dim: int,
        num_heads: int,
        dropout: float = 0.1,
        attention_dropout: float = 0.1,
        act_dropout: float = 0.1,
        activation_fn: str = "relu",
        sandwich_ln: bool = False,
        droppath_prob: float = 0.0,
        legacy_droppath: bool = False,
        implementation: str = "fast",
    ) -> None:
        super().__init__()
        self.implementation = check_implementation(implementation)
        self.dropout = float(dropout)
        self.act_dropout = float(act_dropout)
        self.sandwich_ln = bool(sandwich_ln)
        self.activation_name = activation_fn
        self.activation_fn = get_activation_fn(activation_fn)
        self.droppath = None
        if droppath_prob > 0.0:
            self.droppath = DropPath(droppath_prob, legacy_per_token=legacy_droppath)
        self.self_attn = MultiheadAttention(
            embed_dim,
            num_heads,
            attention_dropout=attention_dropout,
            implementation=implementation,
        )
        self.self_attn_layer_norm = nn.LayerNorm(embed_dim)
        self.self_attn_sandwich_layer_norm = (
            nn.LayerNorm(embed_dim) if self.sandwich_ln else None
        )
        self.fc1 = nn.Linear(embed_dim, ffn_embed_dim)
        self.fc2 = nn.Linear(ffn_embed_dim, embed_dim)
        self.final_layer_norm = nn.LayerNorm(embed_dim)
        self.final_sandwich_layer_norm = (
            nn.LayerNorm(embed_dim) if self.sandwich_ln else None
        )

    def _residual_dropout(self, x: torch.Tensor) -> torch.Tensor:
        if self.droppath is not None:
            return self.droppath(x)
        return F.dropout(x, p=self.dropout, training=self.training)

    def _residual_dropout_packed(
        self, x: torch.Tensor, packing: TokenPacking
    ) -> torch.Tensor:
        if self.droppath is not None:
            return self.droppath.forward_packed(
                x,
                num_tokens=packing.num_tokens,
                batch_size=packing.batch_size,
                batch_index=packing.batch_index,
                token_index=packing.token_index,
            )
        return dropout(x, self.dropout, self.training)

    def _add_branch_packed(
        self,
        residual: torch.Tensor,
        branch: torch.Tensor,
        packing: TokenPacking,
        scale: Optional[torch.Tensor],
        sandwich_norm: Optional[nn.Module],
    ) -> torch.Tensor:
        """``residual + [LN](drop(branch))``; ``scale`` [M, 1] replaces the DropPath draw."""
        if scale is None:
            branch = self._residual_dropout_packed(branch, packing)
        elif sandwich_norm is None:
            return torch.addcmul(residual, branch, scale)
        else:
            branch = branch * scale
        if sandwich_norm is not None:
            branch = sandwich_norm(branch)
        return residual + branch

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        x = self.activation_fn(self.fc1(x))
        x = dropout(x, self.act_dropout, self.training)
        return self.fc2(x)

    def forward(
        self,
        x: torch.Tensor,
        attn_bias: Optional[torch.Tensor] = None,
        key_padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        residual = x
        if self.sandwich_ln:
            x = self.self_attn_layer_norm(x)
        x = self.self_attn(x, attn_bias, key_padding_mask)
        x = self._residual_dropout(x)
        if self.sandwich_ln:
            x = self.self_attn_sandwich_layer_norm(x)
        x = residual + x
        if not self.sandwich_ln:
            x = self.self_attn_layer_norm(x)

        residual = x
        if self.sandwich_ln:
            x = self.final_layer_norm(x)
        x = self._residual_dropout(self._ffn(x))
        if self.sandwich_ln:
            x = self.final_sandwich_layer_norm(x)
        x = residual + x
        if not self.sandwich_ln:
            x = self.final_layer_norm(x)
        return x

    def fused(self, droppath_scales) -> bool:
        """Whether :meth:`forward_packed` runs as the fused functions of
        :mod:`.fused_layer` (Post-LN, ReLU or GELU, DropPath factors given or not needed)."""
        return (
            not self.sandwich_ln
            and self.activation_name in ACTIVATIONS
            and (self.droppath is None or not self.training or bool(droppath_scales))
        )

    def forward_packed(
        self,
        x: torch.Tensor,
        attn_bias: torch.Tensor,
        packing: TokenPacking,
        droppath_scales: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        qkv_parameters: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> torch.Tensor:
        """The same layer on packed real tokens ``x`` [M, D] -> [M, D].

        ``attn_bias`` [B, H, T, T] must already hold ``-inf`` on padded keys (stored
        head-major, ``[H, B, T, T]`` transposed, it is used without a copy). Every
        operation but attention is per token, so padded tokens are not computed.
        ``droppath_scales``: the DropPath factors ``keep / (1 - p)`` [M, 1] of the
        attention and the FFN branch, drawn for all layers at once by the encoder
        (:meth:`MoleculeEncoder.droppath_scales`); None draws them here.
        ``qkv_parameters``: the stacked q/k/v weight and bias, if already made (the
        encoder stacks those of all layers at once).

        Three autograd nodes per layer (:mod:`.fused_layer`) where :meth:`fused` says so;
        otherwise :meth:`forward_packed_autograd`. Same values either way.
        """
        if not self.fused(droppath_scales):
            return self.forward_packed_autograd(x, attn_bias, packing, droppath_scales)
        scale_attn, scale_ffn = droppath_scales if droppath_scales else (None, None)
        precision = Precision.of(x)
        attn_mod = self.self_attn
        weight, bias = qkv_parameters or attn_mod.qkv_parameters()
        qkv = QKVGather.apply(x, weight, bias, packing.spread_index, attn_mod.num_heads,
                              precision.mm)  # fmt: skip
        attn = attn_mod.attend(qkv, head_major(attn_bias, precision.mm), packing.batch_size)
        training = self.training
        settings = (
            self.activation_name,
            self.act_dropout if training else 0.0,
            self.dropout if training and self.droppath is None else 0.0,
            (self.self_attn_layer_norm.eps, self.final_layer_norm.eps),
            precision.mm,
            precision.autocast,
        )
        ln1, ln2 = self.self_attn_layer_norm, self.final_layer_norm
        return PostAttention.apply(
            attn, x, packing.flat_index, scale_attn, scale_ffn,
            attn_mod.out_proj.weight, attn_mod.out_proj.bias, ln1.weight, ln1.bias,
            self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
            ln2.weight, ln2.bias, settings,
        )  # fmt: skip

    def forward_packed_autograd(
        self,
        x: torch.Tensor,
        attn_bias: torch.Tensor,
        packing: TokenPacking,
        droppath_scales: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> torch.Tensor:
        """:meth:`forward_packed` with autograd's own operators (the oracle of the fused
        functions; the path of Pre-LN/sandwich layers and other activations)."""
        scale_attn, scale_ffn = droppath_scales if droppath_scales else (None, None)
        residual = x
        if self.sandwich_ln:
            x = self.self_attn_layer_norm(x)
        x = self.self_attn.forward_packed_autograd(x, attn_bias, packing)
        x = self._add_branch_packed(
            residual, x, packing, scale_attn, self.self_attn_sandwich_layer_norm
        )
        if not self.sandwich_ln:
            x = self.self_attn_layer_norm(x)

        residual = x
        if self.sandwich_ln:
            x = self.final_layer_norm(x)
        x = self._add_branch_packed(
            residual, self._ffn(x), packing, scale_ffn, self.final_sandwich_layer_norm
        )
        if not self.sandwich_ln:
            x = self.final_layer_norm(x)
        return x
