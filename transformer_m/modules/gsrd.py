"""3D-GSRD (Wu et al., NeurIPS 2025) building blocks, dense ``[B, N, ...]`` tensors, no fairseq.

Spec: ``shared/spec/gsrd.md`` (section numbers B3..B7 below refer to it).

* :class:`ReTransEncoder` - the 3D relational transformer (B3): scalar stream ``h [B,N,d]`` and
  vector stream ``v [B,N,3,d]``, ExpNormal RBF distance filters, SiLU attention, LayerScale.
* :class:`Graph2DEncoder` - the 2D graph encoder phi_2d (B4), softmax attention on the complete graph.
* :class:`StructureFreeDecoder` - the structure-independent decoder (B6).
* heads (B7): :class:`EquivariantVectorOutput`, :class:`ScalarHead`, :class:`DipoleHead`,
  :class:`SpatialExtentHead`.

Masks: ``node_mask [B,N]`` bool marks the atoms a module may use (real, and for the 3D encoder
during pre-training also *visible*). With SiLU attention (no normalisation over neighbours) the
excluded atoms are removed by zeroing the attention weights and messages of every pair that
touches them (B3.4); their own outputs are garbage and must be ignored by the caller.

Fidelity switches (published behaviour -> physically correct choice):

* ``concat_pos``: raw coordinates concatenated to the node input (published; breaks rotation
  invariance). ``False`` = node input is the 60 atom features only.
* ``msg_cutoff``: cosine cutoff on the scalar messages (published for PCQM4Mv2 pre-training only).
* ``aniso_layerscale``: LayerScale of the vector stream per xyz component ``[3, d]`` (published;
  breaks equivariance once trained). ``False`` = one factor per channel ``[d]``.
* ``dist_eps_isotropic``: ``d = sqrt(|r|^2 + eps^2)`` instead of the published
  ``sqrt(sum (r + 1e-5)^2)`` (per-component offset, not rotation invariant at the 1e-5 level).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

NUM_GSRD_ATOM_FEATURES = 60
NUM_GSRD_EDGE_FEATURES = 5  # 4 bond types + self-loop flag


def mlp(d_in: int, d_hidden: int, d_out: int, act=nn.GELU) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), act(), nn.Linear(d_hidden, d_out))


def cosine_cutoff(d: torch.Tensor, cutoff: float) -> torch.Tensor:
    """``0.5 (cos(pi d / c) + 1)`` for ``d < c``, else 0."""
    return 0.5 * (torch.cos(d * math.pi / cutoff) + 1.0) * (d < cutoff).to(d.dtype)


class ExpNormalSmearing(nn.Module):
    """PhysNet radial basis (not trainable): ``f_cut(d) exp(-beta_k (exp(-alpha d) - mu_k)^2)``."""

    def __init__(self, num_rbf: int = 64, cutoff: float = 5.0):
        super().__init__()
        self.cutoff = cutoff
        self.alpha = 5.0 / cutoff
        start = math.exp(-cutoff)
        self.register_buffer("means", torch.linspace(start, 1.0, num_rbf), persistent=False)
        self.register_buffer(
            "betas", torch.full((num_rbf,), (2.0 / num_rbf * (1.0 - start)) ** -2),
            persistent=False,
        )

    def forward(self, d: torch.Tensor) -> torch.Tensor:
        d = d.unsqueeze(-1)
        return cosine_cutoff(d, self.cutoff) * torch.exp(
            -self.betas * (torch.exp(-self.alpha * d) - self.means) ** 2
        )


def pair_geometry(pos: torch.Tensor, isotropic_eps: bool):
    """Distances ``d [B,N,N]`` and unit vectors ``u [B,N,N,3]`` (``u_ij`` from target i to
    source j, i.e. ``(r_j - r_i)/d``; 0 on the diagonal)."""
    rel = pos.unsqueeze(1) - pos.unsqueeze(2)  # [B, i, j, 3] = r_j - r_i
    if isotropic_eps:
        d = torch.sqrt((rel * rel).sum(-1) + 1e-10)
    else:  # published: 1e-5 added per component
        d = torch.sqrt(((rel + 1e-5) ** 2).sum(-1))
    n = pos.shape[1]
    off = ~torch.eye(n, dtype=torch.bool, device=pos.device)
    u = rel / d.unsqueeze(-1) * off.unsqueeze(-1).to(pos.dtype)
    return d, u


def edge_features(bond: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``bond [B,N,N]`` int (0 none, 1..4 single/double/triple/aromatic) -> ``[B,N,N,5]``
    (bond one-hot + self-loop flag) in ``dtype`` (the model's), the complete graph of B2.2."""
    b, n, _ = bond.shape
    # == arange instead of F.one_hot: one_hot range-checks its input with a host read
    kinds = torch.arange(1, 5, device=bond.device)
    onehot = (bond.long().clamp(0, 4).unsqueeze(-1) == kinds).to(dtype)
    eye = torch.eye(n, dtype=dtype, device=bond.device).expand(b, n, n).unsqueeze(-1)
    return torch.cat([onehot, eye], dim=-1)


def safe_norm(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Euclidean norm with a zero (not NaN) gradient at 0."""
    s = (x * x).sum(dim)
    pos = s > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, s, torch.ones_like(s))), torch.zeros_like(s))


class _VectorUpdate(nn.Module):
    """TorchMD-ET style node update shared by encoder and decoder blocks (B3.2)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.dh = heads, dim // heads
        self.o_proj = nn.Linear(self.dh, 3 * self.dh)  # shared across heads
        self.vec_proj = nn.Linear(dim, 3 * dim, bias=False)

    def forward(self, m_agg, v):
        """m_agg ``[B,N,H,dh]``, v ``[B,N,3,d]`` -> (dh ``[B,N,d]``, dv_local ``[B,N,3,d]``)."""
        b, n = m_agg.shape[:2]
        o1, o2, o3 = self.o_proj(m_agg).split(self.dh, dim=-1)  # [B,N,H,dh] each
        w = self.vec_proj(v).view(b, n, 3, self.heads, 3 * self.dh)
        w1, w2, w3 = w.split(self.dh, dim=-1)  # [B,N,3,H,dh]
        dot = (w1 * w2).sum(2)  # [B,N,H,dh]
        dh = (o2 + o3 * dot).reshape(b, n, -1)
        dv = (w3 * o1.unsqueeze(2)).reshape(b, n, 3, -1)
        return dh, dv


class ReTransBlock(nn.Module):
    """One 3D-ReTrans block (``DMTBlock`` + ``TransLayerOptimV6``, B3.2). No FFN (v6)."""

    def __init__(self, dim=256, heads=8, edge_dim=64, num_rbf=64, layerscale_init=1e-2,
                 aniso_layerscale=True, attn_activation="silu"):
        super().__init__()
        assert dim % heads == 0
        self.dim, self.heads, self.dh = dim, heads, dim // heads
        self.attn_activation = attn_activation
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.edge_mlp = mlp(edge_dim, 2 * edge_dim, edge_dim)
        self.edge_norm = nn.LayerNorm(edge_dim, eps=1e-6)
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim + edge_dim, dim)
        self.v_proj = nn.Linear(dim + edge_dim, 3 * dim)
        self.dk_proj = mlp(num_rbf, 2 * num_rbf, dim, nn.SiLU)
        self.dv_proj = mlp(num_rbf, 2 * num_rbf, 3 * dim, nn.SiLU)
        self.update = _VectorUpdate(dim, heads)
        self.ls_h = nn.Parameter(torch.full((dim,), layerscale_init))
        self.ls_v = nn.Parameter(torch.full((3, dim) if aniso_layerscale else (dim,), layerscale_init))

    @staticmethod
    def _pair_linear(lin: nn.Linear, h: torch.Tensor, e: torch.Tensor, dim: int) -> torch.Tensor:
        """``lin([h_j || e_ij])`` without materialising the concatenation -> ``[B,N,N,out]``."""
        wh, we = lin.weight[:, :dim], lin.weight[:, dim:]
        return (h @ wh.t()).unsqueeze(1) + e @ we.t() + lin.bias

    def forward(self, h, v, e, rbf, u, pair_mask, cut=None):
        b, n, _ = h.shape
        hh = self.norm(h)
        ee = self.edge_norm(self.edge_mlp(e))
        q = self.q_proj(hh).view(b, n, 1, self.heads, self.dh)
        k = self._pair_linear(self.k_proj, hh, ee, self.dim) * self.dk_proj(rbf)
        val = self._pair_linear(self.v_proj, hh, ee, self.dim) * self.dv_proj(rbf)
        k = k.view(b, n, n, self.heads, self.dh)
        logits = (q * k).sum(-1) / math.sqrt(self.dh)  # [B,i,j,H]
        pm = pair_mask.unsqueeze(-1).to(h.dtype)
        if self.attn_activation == "softmax":
            logits = logits.masked_fill(~pair_mask.unsqueeze(-1), float("-inf"))
            alpha = torch.softmax(logits, dim=2).nan_to_num(0.0) * pm
        else:
            alpha = F.silu(logits) * pm
        if cut is not None:
            alpha = alpha * cut.unsqueeze(-1)
        s0, s1, s2 = val.view(b, n, n, self.heads, 3, self.dh).unbind(4)  # [B,i,j,H,dh]
        m_agg = torch.einsum("bijh,bijhc->bihc", alpha, s0)
        vj = v.view(b, n, 3, self.heads, self.dh)
        vec_agg = torch.einsum("bjxhc,bijhc->bixhc", vj, s1 * pm.unsqueeze(-1)) + torch.einsum(
            "bijx,bijhc->bixhc", u * pm, s2
        )
        dh, dv = self.update(m_agg, v)
        dv = dv + vec_agg.reshape(b, n, 3, self.dim)
        return h + dh * self.ls_h, v + dv * self.ls_v


class ReTransEncoder(nn.Module):
    """3D-ReTrans encoder (``RelaTransEncoder`` v6, B3). ``forward`` -> ``(h [B,N,d], v [B,N,3,d])``."""

    def __init__(self, num_layers=8, dim=256, heads=8, num_rbf=64, cutoff=5.0, node_hidden=1024,
                 concat_pos=True, msg_cutoff=False, aniso_layerscale=True,
                 dist_eps_isotropic=False, attn_activation="silu", layerscale_init=1e-2):
        super().__init__()
        self.dim = dim
        self.concat_pos = concat_pos
        self.msg_cutoff = msg_cutoff
        self.dist_eps_isotropic = dist_eps_isotropic
        self.cutoff = cutoff
        node_dim = NUM_GSRD_ATOM_FEATURES + (3 if concat_pos else 0)
        edge_dim = dim // 4
        self.node_embedding = mlp(node_dim, node_hidden, dim)
        self.neigh_embedding = mlp(node_dim, node_hidden, dim)
        self.distance_proj = nn.Linear(num_rbf, dim, bias=False)
        self.combine = nn.Linear(2 * dim, dim)
        self.edge_embedding = mlp(NUM_GSRD_EDGE_FEATURES, 2 * edge_dim, edge_dim)
        self.rbf = ExpNormalSmearing(num_rbf, cutoff)
        self.layers = nn.ModuleList(
            ReTransBlock(dim, heads, edge_dim, num_rbf, layerscale_init, aniso_layerscale,
                         attn_activation)
            for _ in range(num_layers)
        )
        self.out_norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, atom_feat, pos, bond, node_mask):
        """atom_feat ``[B,N,60]``, pos ``[B,N,3]``, bond ``[B,N,N]`` int, node_mask ``[B,N]`` bool.

        Inputs are cast to the dtype of the weights (``model.double()`` runs in float64)."""
        dtype = self.distance_proj.weight.dtype
        nm = node_mask.to(dtype)
        pos = pos.to(dtype) * nm.unsqueeze(-1)  # excluded atoms carry no coordinates
        x = atom_feat.to(dtype)
        if self.concat_pos:
            x = torch.cat([x, pos], dim=-1)
        x = x * nm.unsqueeze(-1)
        pair_mask = node_mask.unsqueeze(1) & node_mask.unsqueeze(2)  # [B,i,j], self-loops included
        pmf = pair_mask.to(pos.dtype)
        d, u = pair_geometry(pos, self.dist_eps_isotropic)
        rbf = self.rbf(d)  # [B,N,N,K]
        w = self.distance_proj(rbf) * pmf.unsqueeze(-1)
        x_nb = torch.einsum("bijc,bjc->bic", w, self.neigh_embedding(x))
        h = self.combine(torch.cat([self.node_embedding(x), x_nb], dim=-1))
        e = self.edge_embedding(edge_features(bond, dtype))
        v = h.new_zeros(h.shape[0], h.shape[1], 3, self.dim)
        cut = cosine_cutoff(d, self.cutoff) if self.msg_cutoff else None
        for layer in self.layers:
            h, v = layer(h, v, e, rbf, u, pair_mask, cut)
        h = self.out_norm(h)
        return h * nm.unsqueeze(-1), v * nm.view(*nm.shape, 1, 1)


class Graph2DBlock(nn.Module):
    """2D encoder block (``DMTBlock`` with v3 attention, B4): softmax over the complete graph."""

    def __init__(self, dim=64, heads=4, edge_dim=16, ffn_dim=256):
        super().__init__()
        self.dim, self.heads, self.dh = dim, heads, dim // heads
        self.edge_mlp = mlp(edge_dim, 2 * edge_dim, edge_dim)
        self.edge_norm = nn.LayerNorm(edge_dim, eps=1e-6)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.q_proj = nn.Linear(dim + edge_dim, dim)
        self.kv_proj = nn.Linear(dim + edge_dim, 2 * dim)
        self.out_proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.ffn = mlp(dim, ffn_dim, dim)

    def forward(self, h, e, pair_mask):
        b, n, _ = h.shape
        hh = self.norm1(h)
        ee = self.edge_norm(self.edge_mlp(e))
        wq = self.q_proj.weight
        q = (hh @ wq[:, : self.dim].t()).unsqueeze(2) + ee @ wq[:, self.dim:].t() + self.q_proj.bias
        kv = ReTransBlock._pair_linear(self.kv_proj, hh, ee, self.dim)
        k, val = kv.split(self.dim, dim=-1)
        q = q.view(b, n, n, self.heads, self.dh)
        k = k.reshape(b, n, n, self.heads, self.dh)
        val = val.reshape(b, n, n, self.heads, self.dh)
        logits = (q * k).sum(-1) / math.sqrt(self.dh)
        logits = logits.masked_fill(~pair_mask.unsqueeze(-1), float("-inf"))
        alpha = torch.softmax(logits, dim=2).nan_to_num(0.0)
        out = torch.einsum("bijh,bijhc->bihc", alpha, val).reshape(b, n, self.dim)
        h = h + self.out_proj(out)
        return h + self.ffn(self.norm2(h))


def masked_batch_norm(bn: nn.BatchNorm1d, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``bn`` over the real atoms only, without a host read: equal to ``bn(z[mask])`` scattered
    back into ``z`` (padded rows unchanged), including the running-statistics update.

    ``z[mask]`` would read the atom count back from the device every step. In training a
    batch with fewer than two real atoms is left as it is (``BatchNorm1d`` cannot normalise one
    row) and does not update the running statistics; in eval every real atom is normalised with
    the running statistics, whatever else is in the batch.

    Shapes:
        z: ``[B, N, C]``; mask: bool ``[B, N]``. Returns ``[B, N, C]``.
    """
    keep = mask.unsqueeze(-1)  # [B, N, 1]
    out_dtype = z.dtype
    z_in, z = z, z.to(torch.promote_types(z.dtype, torch.float32))  # statistics >= float32
    if bn.training or not bn.track_running_stats:
        m = keep.to(z.dtype)
        n = m.sum()  # real atoms, on the device
        ok = n > 1
        denom = n.clamp(min=1)
        mean = (z * m).sum(dim=(0, 1)) / denom  # [C]
        var = ((z - mean).square() * m).sum(dim=(0, 1)) / denom  # biased, as BatchNorm normalises
        if bn.training and bn.track_running_stats:
            with torch.no_grad():
                bn.num_batches_tracked.add_(ok.to(bn.num_batches_tracked.dtype))
                if bn.momentum is None:  # cumulative moving average
                    factor = 1.0 / bn.num_batches_tracked.clamp(min=1).to(z.dtype)
                else:
                    factor = bn.momentum
                unbiased = var * n / (n - 1).clamp(min=1)
                for buf, value in ((bn.running_mean, mean), (bn.running_var, unbiased)):
                    new = buf + factor * (value.detach().to(buf.dtype) - buf)
                    buf.copy_(torch.where(ok, new, buf))
        keep = keep & ok
    else:
        mean, var = bn.running_mean, bn.running_var
    y = (z - mean) * torch.rsqrt(var + bn.eps)
    if bn.affine:
        y = y * bn.weight + bn.bias
    return torch.where(keep, y.to(out_dtype), z_in)


class Graph2DEncoder(nn.Module):
    """phi_2d (``RelaTrans2DEncoder``, B4) on the full 2D graph (all atoms, no coordinates).

    Returns ``(rep_2d [B,N,out], h_2d [B,N,out])``: ``rep_2d`` = predictor (Linear, BatchNorm over
    real atoms, ReLU, Linear) for the distillation; ``h_2d`` = ``head`` (Linear) for the decoder.
    """

    def __init__(self, num_layers=8, dim=64, heads=4, edge_dim=16, out_dim=256):
        super().__init__()
        self.node_embedding = mlp(NUM_GSRD_ATOM_FEATURES, 256, dim)
        self.edge_embedding = mlp(NUM_GSRD_EDGE_FEATURES, 32, edge_dim)
        self.layers = nn.ModuleList(Graph2DBlock(dim, heads, edge_dim, 4 * dim) for _ in range(num_layers))
        self.pred_in = nn.Linear(dim, out_dim)
        self.pred_bn = nn.BatchNorm1d(out_dim)
        self.pred_out = nn.Linear(out_dim, out_dim)
        self.head = nn.Linear(dim, out_dim)

    def forward(self, atom_feat, bond, node_mask):
        pair_mask = node_mask.unsqueeze(1) & node_mask.unsqueeze(2)
        dtype = self.head.weight.dtype
        h = self.node_embedding(atom_feat.to(dtype))
        e = self.edge_embedding(edge_features(bond, dtype))
        for layer in self.layers:
            h = layer(h, e, pair_mask)
        z = self.pred_in(h)
        z = masked_batch_norm(self.pred_bn, z, node_mask)  # BatchNorm over real atoms only
        rep_2d = self.pred_out(F.relu(z))
        return rep_2d, self.head(h)


class DecoderBlock(nn.Module):
    """Structure-independent decoder block (``TransLayerOptimV7``, B6): no distances, no bonds."""

    def __init__(self, dim=256, heads=8):
        super().__init__()
        self.dim, self.heads, self.dh = dim, heads, dim // heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, 2 * dim)
        self.update = _VectorUpdate(dim, heads)

    def forward(self, h, v, pair_mask):
        b, n, _ = h.shape
        q = self.q_proj(h).view(b, n, self.heads, self.dh)
        k = self.k_proj(h).view(b, n, self.heads, self.dh)
        alpha = F.silu(torch.einsum("bihc,bjhc->bijh", q, k) / math.sqrt(self.dh))
        alpha = alpha * pair_mask.unsqueeze(-1).to(h.dtype)
        s0, s1 = self.v_proj(h).view(b, n, 2, self.heads, self.dh).unbind(2)  # [B,j,H,dh]
        m_agg = torch.einsum("bijh,bjhc->bihc", alpha, s0)
        vj = v.view(b, n, 3, self.heads, self.dh)
        vec_agg = torch.einsum("bij,bjxhc->bixhc", pair_mask.to(h.dtype), vj * s1.unsqueeze(2))
        dh, dv = self.update(m_agg, v)
        return h + dh, v + dv + vec_agg.reshape(b, n, 3, self.dim)


class EquivariantLayerNorm(nn.Module):
    """TorchMD-Net ELN over vector features ``[..., 3, C]`` (with its diag(1,2,3) regulariser)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, v):
        x = v.double()
        x = x - x.mean(-1, keepdim=True)
        cov = x @ x.transpose(-1, -2) / x.shape[-1]
        reg = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=x.dtype, device=x.device))
        evals, evecs = torch.linalg.eigh(cov + self.eps * reg)
        inv_sqrt = evecs @ torch.diag_embed(evals.clamp(min=1e-12).rsqrt()) @ evecs.transpose(-1, -2)
        return (inv_sqrt @ x).to(v.dtype) * self.weight


class StructureFreeDecoder(nn.Module):
    """B6: ``num_layers`` decoder blocks over all real atoms, then ELN(v), LN(h)."""

    def __init__(self, num_layers=2, dim=256, heads=8):
        super().__init__()
        self.layers = nn.ModuleList(DecoderBlock(dim, heads) for _ in range(num_layers))
        self.vec_norm = EquivariantLayerNorm(dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, h, v, node_mask):
        pair_mask = node_mask.unsqueeze(1) & node_mask.unsqueeze(2)
        for layer in self.layers:
            h, v = layer(h, v, pair_mask)
        return self.norm(h), self.vec_norm(v)


# --- heads (B7) ---------------------------------------------------------------------------------
class GatedEquivariantBlock(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.d_out = d_out
        self.vec1_proj = nn.Linear(d_in, d_in, bias=False)
        self.vec2_proj = nn.Linear(d_in, d_out, bias=False)
        self.update_net = mlp(2 * d_in, d_in, 2 * d_out, nn.SiLU)

    def forward(self, x, v):
        n1 = safe_norm(self.vec1_proj(v), dim=-2)  # norm over xyz: [...,d_in]
        w = self.vec2_proj(v)
        x, g = self.update_net(torch.cat([x, n1], dim=-1)).split(self.d_out, dim=-1)
        return F.silu(x), g.unsqueeze(-2) * w  # SiLU always applied (published)


class EquivariantVectorOutput(nn.Module):
    """Per-atom 3-vector ``[B,N,3]`` from ``(h, v)``."""

    def __init__(self, dim: int = 256):
        super().__init__()
        self.blocks = nn.ModuleList([GatedEquivariantBlock(dim, dim // 2), GatedEquivariantBlock(dim // 2, 1)])

    def forward(self, h, v):
        for blk in self.blocks:
            h, v = blk(h, v)
        return v.squeeze(-1)


class ScalarHead(nn.Module):
    """Per-atom MLP -> 1, summed over real atoms (``Scalar``, Xavier init, zero bias)."""

    def __init__(self, dim: int = 256):
        super().__init__()
        self.net = mlp(dim, dim // 2, 1, nn.SiLU)
        for m in self.net:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, h, v, pos, z, node_mask):
        return (self.net(h).squeeze(-1) * node_mask.to(h.dtype)).sum(-1)


def _atomic_masses(max_z: int = 119) -> torch.Tensor:
    try:
        from rdkit import Chem

        pt = Chem.GetPeriodicTable()
        return torch.tensor([0.0] + [pt.GetAtomicWeight(i) for i in range(1, max_z)])
    except ImportError:  # pragma: no cover
        return torch.ones(max_z)


def _center_of_mass(pos, z, masses, node_mask):
    m = masses[z.clamp(0, masses.numel() - 1)] * node_mask.to(pos.dtype)  # [B,N]
    return (m.unsqueeze(-1) * pos).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp(min=1e-9).unsqueeze(-1)


class DipoleHead(nn.Module):
    """QM9 mu (``EquivariantDipoleMoment``): ||sum_i q_i (r_i - r_COM) + v_i||."""

    def __init__(self, dim: int = 256):
        super().__init__()
        self.blocks = nn.ModuleList([GatedEquivariantBlock(dim, dim // 2), GatedEquivariantBlock(dim // 2, 1)])
        self.register_buffer("masses", _atomic_masses(), persistent=False)

    def forward(self, h, v, pos, z, node_mask):
        for blk in self.blocks:
            h, v = blk(h, v)
        c = _center_of_mass(pos, z, self.masses.to(pos.dtype), node_mask)
        per_atom = h * (pos - c) + v.squeeze(-1)
        dip = (per_atom * node_mask.unsqueeze(-1).to(pos.dtype)).sum(1)
        return safe_norm(dip, dim=-1)


class SpatialExtentHead(nn.Module):
    """QM9 R^2 (``EquivariantElectronicSpatialExtent``): sum_i s_i ||r_i - r_COM||^2."""

    def __init__(self, dim: int = 256):
        super().__init__()
        self.net = mlp(dim, dim // 2, 1, nn.SiLU)
        self.register_buffer("masses", _atomic_masses(), persistent=False)

    def forward(self, h, v, pos, z, node_mask):
        c = _center_of_mass(pos, z, self.masses.to(pos.dtype), node_mask)
        r2 = ((pos - c) ** 2).sum(-1)
        return (self.net(h).squeeze(-1) * r2 * node_mask.to(pos.dtype)).sum(-1)


def vector_norm_regulariser(v: torch.Tensor, node_mask: torch.Tensor, delta: float = 1000.0):
    """``mean over real atoms x 3 of ReLU(||v||_channels - delta)`` (B8; without the 0.01)."""
    n = safe_norm(v, dim=-1)  # [B,N,3]
    r = F.relu(n - delta) * node_mask.unsqueeze(-1).to(v.dtype)
    return r.sum() / (3 * node_mask.sum()).clamp(min=1)
