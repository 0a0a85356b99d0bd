"""GeoMFormer building blocks (Chen, Luo et al., ICML 2024; spec ``../shared/spec/geomformer.md`` Part A).

Plain ``nn.Module`` code, no fairseq. Two streams per atom:

- invariant ``x``  ``[B, N, d]``;
- equivariant ``vec`` ``[B, N, 3, d]`` (``d`` Cartesian 3-vectors; a rotation ``Q`` acts as
  ``vec -> einsum("ij,bnjd->bnid", Q, vec)``).

Every linear map on ``vec`` acts on the channel axis only and has no bias; the only non-linearity
that touches vectors is a multiplication by an invariant gate. Padded atoms (``atom_mask`` False)
are kept at exactly zero in both streams; padded keys are masked with ``-inf``.

The equivariant layer norm (:class:`EquivariantLayerNorm`) whitens each atom's 3x3 channel
covariance with an **isotropic** regulariser ``eps * I`` (spec §A6: the published
``eps * diag(1, 2, 3)`` breaks equivariance; available as ``isotropic=False`` for comparison).
``C^{-1/2}`` is computed by a batched coupled Newton-Schulz iteration in float64: every iterate is
a matrix polynomial of ``C``, so the result is exactly equivariant at any iteration count, has no
eigen-gap singularities in backward (unlike SVD/eigh with degenerate spectra, e.g. padded atoms
where ``C = eps I``) and is twice differentiable (forces as ``-dE/dR`` trained with
``create_graph``).
"""

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .transformer_m_layers import GaussianLayer

__all__ = [
    "GEOMFORMER_GBF_STD_OFFSET",
    "LEGACY_GBF_STD_OFFSET",
    "BiasFreeLinear",
    "EquCrossAttention",
    "EquFFN",
    "EquSelfAttention",
    "EquivariantHead",
    "EquivariantLayerNorm",
    "GeoGaussianLayer",
    "GeoMFormerEncoder",
    "GeoMFormerLayer",
    "InvCrossAttention",
    "InvFFN",
    "InvSelfAttention",
    "InvariantHead",
    "inv_sqrt_spd3",
    "pair_geometry",
]

# Narrowest Gaussian-basis width (units of u = (gamma_a + gamma_b) d, i.e. 2 d in Å at init).
# The SFM / Graphormer-3D offset of 1e-5 (spec §A2.1; Transformer-M: 1e-2) lets a kernel drawn
# with |s| ~ 0.006 (K = 32 widths ~ U(0, 3)) have slopes ~ 1/sigma^2 ~ 1e4: forces -dE/dR then
# reach hundreds of target stds on the few frames where a distance meets that kernel, and the
# gradient norm of GeoMFormer-small on aspirin spiked to 1e3-4e4 (issue 11 item 8).
GEOMFORMER_GBF_STD_OFFSET = 0.1
LEGACY_GBF_STD_OFFSET = 1e-5  # the published code's value (``--gbf-std-offset 1e-5``)
UNIT_EPS = 1e-5  # u_ij = r_ij / (|r_ij| + 1e-5), spec §A1
DIST_SQ_FLOOR = 1e-10  # |r_ii| is evaluated as 1e-5 so that d|r|/dr is finite (value unused)


# ------------------------------------------------------------------------------------------------
# Linear maps
# ------------------------------------------------------------------------------------------------
class BiasFreeLinear(nn.Module):
    """``y = x W^T`` on the last axis: the channel map of the equivariant stream (spec §A1).

    Unlike ``nn.Linear(bias=False)`` it registers no ``bias`` entry at all: fairseq's trainer
    catalogues parameters by identity and reports every ``None`` entry as one parameter shared
    across the model ("detected shared parameter ... <- None"). Same weight init and
    state-dict name (``weight``) as ``nn.Linear``, so seeded models and checkpoints are unchanged.

    Shapes: ``x [..., in_features]`` -> ``[..., out_features]``.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's init

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias=False"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def _linear(in_features: int, out_features: int, bias: bool = True) -> nn.Module:
    """``nn.Linear`` with a bias, :class:`BiasFreeLinear` without one."""
    if bias:
        return nn.Linear(in_features, out_features)
    return BiasFreeLinear(in_features, out_features)


# ------------------------------------------------------------------------------------------------
# Equivariant layer norm
# ------------------------------------------------------------------------------------------------
def inv_sqrt_spd3(c: torch.Tensor, iters: int = 10) -> torch.Tensor:
    """``C^{-1/2}`` of symmetric positive-definite 3x3 matrices by coupled Newton-Schulz.

    ``A = C / ||C||_F`` has eigenvalues in (0, 1]; ``Y <- Y T``, ``Z <- T Z`` with
    ``T = (3 I - Z Y) / 2`` gives ``Z -> A^{-1/2}``. An eigenvalue ``a`` of ``A`` converges after
    about ``log(1/a) / log(2.25) + 5`` iterations; fewer iterations leave the result a (still
    exactly equivariant) partial whitening.

    Shapes: ``c [..., 3, 3]`` -> ``[..., 3, 3]`` (same dtype; use float64).
    """
    norm = c.flatten(-2).norm(dim=-1).clamp_min(torch.finfo(c.dtype).tiny)[..., None, None]
    y = c / norm
    eye = torch.eye(3, dtype=c.dtype, device=c.device)
    z = eye.expand_as(y)
    for _ in range(iters):
        t = 1.5 * eye - 0.5 * (z @ y)
        y = y @ t
        z = t @ z
    return z / norm.sqrt()


class EquivariantLayerNorm(nn.Module):
    """ELN (spec §A6) over the channel axis of ``[..., 3, d]`` vectors.

    Per atom: centre over channels, ``C = v v^T / d + eps R``, ``v <- C^{-1/2} v``, times a
    per-channel weight (no bias). ``R = I`` (``isotropic=True``, exact equivariance) or the
    published ``diag(1, 2, 3)`` (``isotropic=False``; breaks equivariance when ``C`` is nearly
    singular, kept only to demonstrate that). Computed in float64, returned in the input dtype.
    """

    def __init__(self, dim: int, eps: float = 1e-5, isotropic: bool = True, iters: int = 10,
                 affine: bool = True, shrink: float = 0.0) -> None:
        super().__init__()
        self.dim = dim
        self.eps = float(eps)
        self.shrink = float(shrink)
        self.isotropic = bool(isotropic)
        self.iters = int(iters)
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None
        reg = [1.0, 1.0, 1.0] if self.isotropic else [1.0, 2.0, 3.0]
        self.register_buffer("reg", torch.diag(torch.tensor(reg, dtype=torch.float64)),
                             persistent=False)

    def extra_repr(self) -> str:
        return (f"{self.dim}, eps={self.eps}, isotropic={self.isotropic}, iters={self.iters}, "
                f"shrink={self.shrink}")

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        dtype = v.dtype
        x = v.double()
        x = x - x.mean(dim=-1, keepdim=True)
        cov = x @ x.transpose(-1, -2) / self.dim  # [..., 3, 3]
        reg = self.eps * self.reg
        if self.shrink > 0:  # isotropic shrinkage towards the mean variance (rotation-invariant)
            tr = cov.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None] / 3
            reg = reg + self.shrink * tr * torch.eye(3, dtype=cov.dtype, device=cov.device)
        cov = cov + reg
        out = (inv_sqrt_spd3(cov, self.iters) @ x).to(dtype)
        if self.weight is not None:
            out = out * self.weight
        return out


# ------------------------------------------------------------------------------------------------
# Input layer
# ------------------------------------------------------------------------------------------------
class GeoGaussianLayer(GaussianLayer):
    """Gaussian basis of spec §A2.1 on Transformer-M's :class:`GaussianLayer` parameters.

    Same pair-type handling (``x = (gamma_a + gamma_b) d + (beta_a + beta_b)``, atom-type
    embeddings summed over the pair, padding index 0) and init; differs only in
    ``sigma = |s| + std_offset`` (see :data:`GEOMFORMER_GBF_STD_OFFSET`) and the exact ``pi``. Computed in float32 or wider (float64 inputs
    stay float64, for exactness tests).

    Args:
        num_kernels: K.
        num_edge_types: rows of the per-atom-type ``mul`` / ``bias`` embeddings.
        std_offset: ``sigma = |s| + std_offset``, the narrowest kernel width (in units of
            ``u``, i.e. ``2 d`` in Å at init).

    Shapes: ``dist [...]``, ``types`` int64 ``[..., 2]`` -> ``[..., K]``.
    """

    def __init__(self, num_kernels: int = 128, num_edge_types: int = 1536,
                 std_offset: float = GEOMFORMER_GBF_STD_OFFSET) -> None:
        super().__init__(num_kernels, num_edge_types)
        self.std_offset = float(std_offset)

    def extra_repr(self) -> str:
        return f"num_kernels={self.num_kernels}, std_offset={self.std_offset}"

    def forward(self, dist: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
        ct = torch.promote_types(dist.dtype, torch.float32)
        mul = self.mul(types).sum(dim=-2).to(ct)
        bias = self.bias(types).sum(dim=-2).to(ct)
        u = mul * dist.unsqueeze(-1).to(ct) + bias  # [..., 1]
        mean = self.means.weight.view(-1).to(ct)
        std = self.stds.weight.view(-1).to(ct).abs() + self.std_offset
        return torch.exp(-0.5 * ((u - mean) / std) ** 2) / (math.sqrt(2 * math.pi) * std)


def pair_geometry(pos: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``r_ij = r_i - r_j`` ``[B, N, N, 3]`` and ``|r_ij|`` ``[B, N, N]`` (safe at ``i = j``)."""
    rel = pos.unsqueeze(2) - pos.unsqueeze(1)
    dist = (rel * rel).sum(-1).clamp_min(DIST_SQ_FLOOR).sqrt()
    return rel, dist


# ------------------------------------------------------------------------------------------------
# Attention
# ------------------------------------------------------------------------------------------------
def _split_inv(x: torch.Tensor, h: int) -> torch.Tensor:
    """``[B, N, d]`` -> ``[B, H, N, d/H]``."""
    b, n, d = x.shape
    return x.view(b, n, h, d // h).transpose(1, 2)


def _merge_inv(x: torch.Tensor) -> torch.Tensor:
    b, h, n, dh = x.shape
    return x.transpose(1, 2).reshape(b, n, h * dh)


def _split_equ(v: torch.Tensor, h: int) -> torch.Tensor:
    """``[B, N, 3, d]`` -> ``[B, H, N, 3 * d/H]`` (spatial components flattened with channels)."""
    b, n, _, d = v.shape
    return v.view(b, n, 3, h, d // h).permute(0, 3, 1, 2, 4).reshape(b, h, n, 3 * (d // h))


def _merge_equ(v: torch.Tensor) -> torch.Tensor:
    b, h, n, f = v.shape
    dh = f // 3
    return v.view(b, h, n, 3, dh).permute(0, 2, 3, 1, 4).reshape(b, n, 3, h * dh)


def attend(q, k, v, attn_bias, scale: float, dropout: float, training: bool):
    """``softmax(q k^T * scale + bias) v`` with the softmax in float32 (or float64).

    Shapes: ``q, k [B, H, N, F]``, ``v [B, H, N, Fv]``, ``attn_bias [B, H, N, N]`` (``-inf``
    on padded keys) -> ``[B, H, N, Fv]``.
    """
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale + attn_bias
    ct = torch.promote_types(logits.dtype, torch.float32)
    probs = torch.softmax(logits.to(ct), dim=-1).to(q.dtype)
    probs = F.dropout(probs, p=dropout, training=training)
    return torch.matmul(probs, v)


class InvSelfAttention(nn.Module):
    """Inv-Self-Attn (spec §A4.1): invariant Q/K/V, heads merged -> LN -> W_O."""

    def __init__(self, dim: int, heads: int, attention_dropout: float = 0.0, bias: bool = True):
        super().__init__()
        self.heads, self.dropout = heads, attention_dropout
        self.scale = (dim // heads) ** -0.5
        self.q_proj = _linear(dim, dim, bias)
        self.k_proj = _linear(dim, dim, bias)
        self.v_proj = _linear(dim, dim, bias)
        self.sub_ln = nn.LayerNorm(dim)
        self.out_proj = _linear(dim, dim, bias)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor) -> torch.Tensor:
        h = self.heads
        o = attend(_split_inv(self.q_proj(x), h), _split_inv(self.k_proj(x), h),
                   _split_inv(self.v_proj(x), h), attn_bias, self.scale, self.dropout,
                   self.training)
        return self.out_proj(self.sub_ln(_merge_inv(o)))


class EquSelfAttention(nn.Module):
    """Equ-Self-Attn (spec §A4.2): bias-free equivariant Q/K/V, logit = trace(Q_i K_j^T)/sqrt(3 d_h)."""

    def __init__(self, dim: int, heads: int, attention_dropout: float = 0.0, **eln_kw):
        super().__init__()
        self.heads, self.dropout = heads, attention_dropout
        self.scale = (3 * (dim // heads)) ** -0.5
        self.q_proj = BiasFreeLinear(dim, dim)
        self.k_proj = BiasFreeLinear(dim, dim)
        self.v_proj = BiasFreeLinear(dim, dim)
        self.sub_eln = EquivariantLayerNorm(dim, **eln_kw)
        self.out_proj = BiasFreeLinear(dim, dim)

    def forward(self, vec: torch.Tensor, attn_bias: torch.Tensor) -> torch.Tensor:
        h = self.heads
        o = attend(_split_equ(self.q_proj(vec), h), _split_equ(self.k_proj(vec), h),
                   _split_equ(self.v_proj(vec), h), attn_bias, self.scale, self.dropout,
                   self.training)
        return self.out_proj(self.sub_eln(_merge_equ(o)))


class InvCrossAttention(nn.Module):
    """Inv-Cross-Attn (spec §A4.3): invariant queries; K_i = <X^E_i W_K1, X^E_i W_K2> / sqrt(3)
    (channel-wise inner product over x, y, z), V likewise; output invariant."""

    def __init__(self, dim: int, heads: int, attention_dropout: float = 0.0, bias: bool = True):
        super().__init__()
        self.heads, self.dropout = heads, attention_dropout
        self.scale = (dim // heads) ** -0.5
        self.q_proj = _linear(dim, dim, bias)
        self.k1_proj = BiasFreeLinear(dim, dim)
        self.k2_proj = BiasFreeLinear(dim, dim)
        self.v1_proj = BiasFreeLinear(dim, dim)
        self.v2_proj = BiasFreeLinear(dim, dim)
        self.sub_ln = nn.LayerNorm(dim)
        self.out_proj = _linear(dim, dim, bias)

    def forward(self, x: torch.Tensor, vec: torch.Tensor, attn_bias: torch.Tensor) -> torch.Tensor:
        h = self.heads
        k = (self.k1_proj(vec) * self.k2_proj(vec)).sum(-2) * 3 ** -0.5  # [B, N, d]
        v = (self.v1_proj(vec) * self.v2_proj(vec)).sum(-2) * 3 ** -0.5
        o = attend(_split_inv(self.q_proj(x), h), _split_inv(k, h), _split_inv(v, h), attn_bias,
                   self.scale, self.dropout, self.training)
        return self.out_proj(self.sub_ln(_merge_inv(o)))


class EquCrossAttention(nn.Module):
    """Equ-Cross-Attn (spec §A4.4): equivariant queries; K_i = (X^E_i W_K1) * (X^I_i W_K2) with
    the invariant factor broadcast over x, y, z (bias only on the invariant factor); V likewise."""

    def __init__(self, dim: int, heads: int, attention_dropout: float = 0.0, bias: bool = True,
                 **eln_kw):
        super().__init__()
        self.heads, self.dropout = heads, attention_dropout
        self.scale = (3 * (dim // heads)) ** -0.5
        self.q_proj = BiasFreeLinear(dim, dim)
        self.k1_proj = BiasFreeLinear(dim, dim)  # on vec
        self.k2_proj = _linear(dim, dim, bias)  # on x
        self.v1_proj = BiasFreeLinear(dim, dim)
        self.v2_proj = _linear(dim, dim, bias)
        self.sub_eln = EquivariantLayerNorm(dim, **eln_kw)
        self.out_proj = BiasFreeLinear(dim, dim)

    def forward(self, vec: torch.Tensor, x: torch.Tensor, attn_bias: torch.Tensor) -> torch.Tensor:
        h = self.heads
        k = self.k1_proj(vec) * self.k2_proj(x).unsqueeze(-2)  # [B, N, 3, d]
        v = self.v1_proj(vec) * self.v2_proj(x).unsqueeze(-2)
        o = attend(_split_equ(self.q_proj(vec), h), _split_equ(k, h), _split_equ(v, h), attn_bias,
                   self.scale, self.dropout, self.training)
        return self.out_proj(self.sub_eln(_merge_equ(o)))


# ------------------------------------------------------------------------------------------------
# Feed-forward networks
# ------------------------------------------------------------------------------------------------
class InvFFN(nn.Module):
    """GELU(Y W_1) -> activation dropout -> LN(d_ff) -> W_2 (spec §A5)."""

    def __init__(self, dim: int, ffn_dim: int, activation_dropout: float = 0.0, bias: bool = True):
        super().__init__()
        self.fc1 = _linear(dim, ffn_dim, bias)
        self.act_dropout = activation_dropout
        self.inner_ln = nn.LayerNorm(ffn_dim)
        self.fc2 = _linear(ffn_dim, dim, bias)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        h = F.dropout(F.gelu(self.fc1(y)), p=self.act_dropout, training=self.training)
        return self.fc2(self.inner_ln(h))


class EquFFN(nn.Module):
    """Gated equivariant FFN (spec §A5): ``(Y^E W_1 * GELU(Y^I W_2)) -> ELN(d_ff) -> W_3``;
    W_1, W_3 bias-free (vectors), the invariant gate is broadcast over x, y, z."""

    def __init__(self, dim: int, ffn_dim: int, bias: bool = True, **eln_kw):
        super().__init__()
        self.fc1 = BiasFreeLinear(dim, ffn_dim)
        self.gate = _linear(dim, ffn_dim, bias)
        self.inner_eln = EquivariantLayerNorm(ffn_dim, **eln_kw)
        self.fc2 = BiasFreeLinear(ffn_dim, dim)

    def forward(self, y_vec: torch.Tensor, y_inv: torch.Tensor) -> torch.Tensor:
        h = self.fc1(y_vec) * F.gelu(self.gate(y_inv)).unsqueeze(-2)
        return self.fc2(self.inner_eln(h))


# ------------------------------------------------------------------------------------------------
# Block
# ------------------------------------------------------------------------------------------------
class GeoMFormerLayer(nn.Module):
    """One GeoMFormer block (spec §A3), pre-LN.

    ``parallel`` (paper): all four attentions read the layer-l streams,
    ``x'' = x + InvSelf(LN x) + InvCross(LN x, ELN vec)``,
    ``vec'' = vec + EquSelf(ELN vec) + EquCross(ELN vec, LN x)``; then
    ``x' = x'' + InvFFN(LN x'')``, ``vec' = vec'' + EquFFN(ELN vec'', LN x'')``.
    ``alternate`` (SFM code): even layers run only the self-attentions, odd layers only the
    cross-attentions. Residual dropout on invariant updates only (spec §A4.5).
    """

    def __init__(self, dim: int, ffn_dim: int, heads: int, dropout: float = 0.0,
                 attention_dropout: float = 0.0, activation_dropout: float = 0.0,
                 bias: bool = True, cross_attn_mode: str = "parallel", layer_index: int = 0,
                 eln_eps: float = 1e-5, eln_isotropic: bool = True, eln_iters: int = 10,
                 eln_shrink: float = 1.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"embed dim {dim} is not divisible by {heads} heads")
        if cross_attn_mode not in ("parallel", "alternate"):
            raise ValueError(f"cross_attn_mode must be parallel or alternate, got {cross_attn_mode}")
        eln_kw = dict(eps=eln_eps, isotropic=eln_isotropic, iters=eln_iters, shrink=eln_shrink)
        self.dropout = dropout
        self.use_self = cross_attn_mode == "parallel" or layer_index % 2 == 0
        self.use_cross = cross_attn_mode == "parallel" or layer_index % 2 == 1
        self.attn_ln = nn.LayerNorm(dim)
        self.attn_eln = EquivariantLayerNorm(dim, **eln_kw)
        if self.use_self:
            self.inv_self_attn = InvSelfAttention(dim, heads, attention_dropout, bias)
            self.equ_self_attn = EquSelfAttention(dim, heads, attention_dropout, **eln_kw)
        if self.use_cross:
            self.inv_cross_attn = InvCrossAttention(dim, heads, attention_dropout, bias)
            self.equ_cross_attn = EquCrossAttention(dim, heads, attention_dropout, bias, **eln_kw)
        self.ffn_ln = nn.LayerNorm(dim)
        self.ffn_eln = EquivariantLayerNorm(dim, **eln_kw)
        self.inv_ffn = InvFFN(dim, ffn_dim, activation_dropout, bias)
        self.equ_ffn = EquFFN(dim, ffn_dim, bias, **eln_kw)

    def forward(self, x: torch.Tensor, vec: torch.Tensor, attn_bias: torch.Tensor,
                atom_mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        m = atom_mask.unsqueeze(-1).to(x.dtype)  # [B, N, 1]
        xi, ve = self.attn_ln(x), self.attn_eln(vec)
        dx, dv = 0, 0
        if self.use_self:
            dx = dx + self.inv_self_attn(xi, attn_bias)
            dv = dv + self.equ_self_attn(ve, attn_bias)
        if self.use_cross:
            dx = dx + self.inv_cross_attn(xi, ve, attn_bias)
            dv = dv + self.equ_cross_attn(ve, xi, attn_bias)
        x = x + F.dropout(dx, p=self.dropout, training=self.training)
        vec = vec + dv
        yi, ye = self.ffn_ln(x), self.ffn_eln(vec)
        x = x + F.dropout(self.inv_ffn(yi), p=self.dropout, training=self.training)
        vec = vec + self.equ_ffn(ye, yi)
        return x * m, vec * m.unsqueeze(-1)


# ------------------------------------------------------------------------------------------------
# Encoder and heads
# ------------------------------------------------------------------------------------------------
class GeoMFormerEncoder(nn.Module):
    """Embeddings (spec §A2) + ``num_layers`` :class:`GeoMFormerLayer` + final LN / ELN.

    Args:
        vec_init: ``relative`` (``Z^E_i = (sum_j u_ij (x) psi_ij) W_v``, default) or ``centered``
            (``r_bar_i (x) (psi'(|r_bar_i|) W_v)`` with a node-level GBF keyed by atom type).
        use_velocity: add per-atom velocities ``v_i`` to the equivariant stream
            (``v_i (x) w``) and ``|v_i|`` to the invariant one (N-body).

    forward(z int64 [B, N] (0 = pad), pos [B, N, 3], atom_mask bool [B, N], vel [B, N, 3] | None)
    -> ``(x [B, N, d], vec [B, N, 3, d])``.
    """

    def __init__(self, num_layers: int = 8, dim: int = 512, ffn_dim: int = 512, heads: int = 32,
                 num_kernels: int = 128, num_atom_types: int = 128, dropout: float = 0.0,
                 attention_dropout: float = 0.1, activation_dropout: float = 0.1,
                 bias: bool = True, cross_attn_mode: str = "parallel", vec_init: str = "relative",
                 eln_eps: float = 1e-5, eln_isotropic: bool = True, eln_iters: int = 10,
                 eln_shrink: float = 1.0, use_velocity: bool = False,
                 geometry_fp64: bool = True, gbf_std_offset: float = GEOMFORMER_GBF_STD_OFFSET):
        super().__init__()
        if vec_init not in ("relative", "centered"):
            raise ValueError(f"vec_init must be relative or centered, got {vec_init}")
        self.heads, self.vec_init, self.num_atom_types = heads, vec_init, num_atom_types
        self.atom_emb = nn.Embedding(num_atom_types, dim, padding_idx=0)
        self.gbf = GeoGaussianLayer(num_kernels, num_atom_types, gbf_std_offset)
        self.bias_proj = nn.Linear(num_kernels, heads)
        self.centrality_proj = BiasFreeLinear(num_kernels, dim)
        if vec_init == "relative":
            self.vec_proj = BiasFreeLinear(num_kernels, dim)
        else:
            self.node_gbf = GeoGaussianLayer(num_kernels, num_atom_types, gbf_std_offset)
            self.vec_proj = nn.Linear(num_kernels, dim)  # scales r_bar_i: a bias is harmless
        self.geometry_fp64 = bool(geometry_fp64)
        self.use_velocity = bool(use_velocity)
        if self.use_velocity:
            self.vel_weight = nn.Parameter(torch.ones(dim))
            self.vel_norm_proj = nn.Linear(1, dim)
        self.layers = nn.ModuleList(
            GeoMFormerLayer(dim, ffn_dim, heads, dropout, attention_dropout, activation_dropout,
                            bias, cross_attn_mode, i, eln_eps, eln_isotropic, eln_iters, eln_shrink)
            for i in range(num_layers)
        )
        self.final_ln = nn.LayerNorm(dim)
        self.final_eln = EquivariantLayerNorm(dim, eln_eps, eln_isotropic, eln_iters,
                                              shrink=eln_shrink)

    def embed(self, z, pos, atom_mask, vel=None):
        """Input layer: ``(x, vec, attn_bias [B, H, N, N])``."""
        if z.device.type == "cpu":  # a host read costs nothing here: a clear message
            if int(z.max()) >= self.num_atom_types:
                raise ValueError(
                    f"atom type {int(z.max())} >= num_atom_types={self.num_atom_types}")
        else:  # checked on the device, without stopping the host to read the maximum
            torch._assert_async((z < self.num_atom_types).all(),
                                f"an atom type is >= num_atom_types={self.num_atom_types}")
        b, n = z.shape
        dtype = self.atom_emb.weight.dtype
        # geometry (differences, distances, GBF, unit vectors) in float64: cheap, and it keeps
        # fp32 rounding of r_i - r_j out of the sharp Gaussians (fp32 exactness)
        pos = pos.to(torch.float64) if self.geometry_fp64 else pos.to(dtype)
        rel, dist = pair_geometry(pos)  # [B, N, N, 3], [B, N, N]
        pair_types = torch.stack([z.unsqueeze(2).expand(b, n, n), z.unsqueeze(1).expand(b, n, n)], -1)
        pair_mask = (atom_mask.unsqueeze(2) & atom_mask.unsqueeze(1)).unsqueeze(-1)
        psi64 = self.gbf(dist, pair_types) * pair_mask  # [B, N, N, K]
        psi = psi64.to(dtype)
        attn_bias = self.bias_proj(psi).permute(0, 3, 1, 2)  # [B, H, N, N]
        attn_bias = attn_bias.masked_fill(~atom_mask[:, None, None, :], float("-inf"))
        m = atom_mask.unsqueeze(-1).to(dtype)
        x = self.atom_emb(z) + self.centrality_proj(psi.sum(2))
        if self.vec_init == "relative":
            # u_ii = 0; masking i = j explicitly also removes the large, cancelling gradients
            # of r_ii / (|r_ii| + eps) (exact net force / force equivariance under -dE/dR)
            offdiag = ~torch.eye(n, dtype=torch.bool, device=z.device)
            unit = rel / (dist.unsqueeze(-1) + UNIT_EPS) * offdiag.unsqueeze(-1)
            vec = self.vec_proj(torch.einsum("bijc,bijk->bick", unit, psi64).to(dtype))
        else:
            cnt = m.sum(1, keepdim=True).clamp_min(1)
            rbar = (pos - (pos * m).sum(1, keepdim=True) / cnt) * m  # [B, N, 3]
            nrm = (rbar * rbar).sum(-1).clamp_min(DIST_SQ_FLOOR).sqrt()
            psi_n = self.node_gbf(nrm, torch.stack([z, torch.zeros_like(z)], -1)).to(dtype)
            vec = rbar.to(dtype).unsqueeze(-1) * self.vec_proj(psi_n).unsqueeze(-2)
        if self.use_velocity:
            if vel is None:
                raise ValueError("this encoder was built with use_velocity but got no velocities")
            vel = vel.to(dtype)
            vec = vec + vel.unsqueeze(-1) * self.vel_weight
            x = x + self.vel_norm_proj(vel.norm(dim=-1, keepdim=True))
        return x * m, vec * m.unsqueeze(-1), attn_bias

    def forward(self, z, pos, atom_mask, vel=None):
        x, vec, attn_bias = self.embed(z, pos, atom_mask, vel)
        for layer in self.layers:
            x, vec = layer(x, vec, attn_bias, atom_mask)
        m = atom_mask.unsqueeze(-1).to(x.dtype)
        return self.final_ln(x) * m, self.final_eln(vec) * m.unsqueeze(-1)


class InvariantHead(nn.Module):
    """Per-atom MLP d -> d -> 1 (GELU, dropout) summed (or averaged) over real atoms -> ``[B]``.

    Args:
        zero_init: start the output layer at zero, so that the untrained model predicts the
            normalised target's mean (0) and zero forces ``-dE/dR``; otherwise ``nn.Linear``'s
            init, whose per-atom offset is multiplied by the atom count under ``sum``.
    """

    def __init__(self, dim: int, dropout: float = 0.0, readout: str = "sum",
                 zero_init: bool = False):
        super().__init__()
        if readout not in ("sum", "mean"):
            raise ValueError(f"readout must be sum or mean, got {readout}")
        self.readout, self.dropout = readout, dropout
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, 1)
        if zero_init:
            nn.init.zeros_(self.fc2.weight)
            nn.init.zeros_(self.fc2.bias)

    def atom_scalars(self, x: torch.Tensor) -> torch.Tensor:
        x = F.dropout(x, p=self.dropout, training=self.training)
        return self.fc2(F.gelu(self.fc1(x))).squeeze(-1)  # [B, N]

    def forward(self, x: torch.Tensor, atom_mask: torch.Tensor) -> torch.Tensor:
        m = atom_mask.to(x.dtype)
        out = (self.atom_scalars(x) * m).sum(-1)
        if self.readout == "mean":
            out = out / m.sum(-1).clamp_min(1)
        return out


class EquivariantHead(nn.Module):
    """``ELN(Z^E) W_out`` with a bias-free ``W_out: d -> 1`` -> per-atom vectors ``[B, N, 3]``
    (spec §A7 option (a); the encoder already applies the final ELN)."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = BiasFreeLinear(dim, 1)

    def forward(self, vec: torch.Tensor) -> torch.Tensor:
        return self.proj(vec).squeeze(-1)


def rotate_vec(vec: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Apply a 3x3 matrix to the spatial axis of ``[B, N, 3, d]`` (or ``[B, N, 3]``) tensors."""
    if vec.dim() == 3:
        return vec @ q.T.to(vec.dtype)
    return torch.einsum("ij,bnjd->bnid", q.to(vec.dtype), vec)


def stream_dict(x, vec) -> Dict[str, torch.Tensor]:  # small helper for tests/benchmarks
    return {"x": x, "vec": vec}
