"""Input channels and the denoising head of Transformer-M (Luo et al., ICLR 2023).

``AtomFeature`` (atom tokens), ``MoleculeAttnBias`` (2D channel), ``Molecule3DBias``
with ``GaussianLayer``/``NonLinear`` (3D channel) and ``AtomTaskHead`` (``atom_proc``).
Parameter names match the released checkpoints. Batch keys are read through
:mod:`graphormer_ext.data.keys`.

Notation: B molecules, N atoms (padded), T = N + 1 tokens, D hidden, H heads,
K Gaussian kernels, P real atom pairs.
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from graphormer_ext.data import keys

from .fused_layer import Precision, QKVGather, RotatedAttention, cast, softmax_dtype
from .host_plan import PairIndex
from .utils import at_least_float32, check_implementation, init_feature_params

# Constants of the released Gaussian basis (spec §1.7, golden quirk 5).
GAUSSIAN_PI = 3.14159
GAUSSIAN_STD_OFFSET = 0.01
DELTA_POS_EPS = 1e-5

class AtomFeature(nn.Module):
    """Atom tokens: summed atom-feature embeddings, degree embeddings, a graph token.

    ``atom_encoder(x).sum(-2)`` over the 9 OGB atom features, plus
    ``in_degree_encoder`` and ``out_degree_encoder`` (skipped with ``no_2d``;
    multiplied by ``mask_2d`` per molecule), and a learned graph token prepended at
    position 0 (spec §1.2-1.4).

    Args:
        num_atoms: shared atom-feature vocabulary (``num_atoms + 1`` table rows).
        num_in_degree: rows of ``in_degree_encoder``.
        num_out_degree: rows of ``out_degree_encoder``.
        embed_dim: D.
        num_layers: L, used only by the construction-time init N(0, 0.02).
        no_2d: drop the degree encoding.

    Shapes:
        batched_data: x int64 [B, N, 9]; in_degree, out_degree int64 [B, N].
        mask_2d: [B]. Output: [B, N+1, D].
    """

    def __init__(
        self,
        *,
        num_atoms: int,
        num_in_degree: int,
        num_out_degree: int,
        embed_dim: int,
        num_layers: int,
        no_2d: bool = False,
    ) -> None:
        super().__init__()
        self.no_2d = bool(no_2d)
        self.atom_encoder = nn.Embedding(num_atoms + 1, embed_dim, padding_idx=0)
        self.in_degree_encoder = nn.Embedding(num_in_degree, embed_dim, padding_idx=0)
        self.out_degree_encoder = nn.Embedding(num_out_degree, embed_dim, padding_idx=0)
        self.graph_token = nn.Embedding(1, embed_dim)
        self.apply(lambda m: init_feature_params(m, num_layers))

    def forward(
        self, batched_data: dict, mask_2d: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        x = batched_data[keys.X]
        n_graph = x.shape[0]
        node_feature = self.atom_encoder(x).sum(dim=-2)  # [B, N, D]
        if not self.no_2d:
            degree_feature = self.in_degree_encoder(batched_data[keys.DEGREE])
            degree_feature = degree_feature + self.out_degree_encoder(
                batched_data[keys.OUT_DEGREE]
            )  # [B, N, D]
            if mask_2d is not None:
                degree_feature = degree_feature * mask_2d[:, None, None]
            node_feature = node_feature + degree_feature
        graph_token = self.graph_token.weight.unsqueeze(0).expand(n_graph, -1, -1)
        return torch.cat([graph_token, node_feature], dim=1)  # [B, N+1, D]


class MoleculeAttnBias(nn.Module):
    """2D channel: per-head bias from shortest paths and bonds (spec §1.4-1.6).

    The bias [B, H, N+1, N+1] is the collated ``attn_bias`` (0 / -inf) plus the SPD
    embedding, the graph-token virtual distance ``t`` (row 0 and column 0) and the edge
    bias; the collated ``attn_bias`` is added once more at the end, as released.

    Multi-hop edge bias:
    ``c_ij = (1/min(d_ij, 5)) sum_{k<min(d_ij,5)} mean_f(E[e_kf]) W_k``.
    ``reference`` follows the released code (embed ``[B, N, N, hops, 3, H]``, mean, one
    ``bmm`` per hop). ``fast`` folds ``W_k`` into the table first (``T_k = E W_k``,
    ``[hops, V, H]``) and sums rows of ``T`` with one ``embedding_bag`` over the real
    atom pairs only: mathematically identical. The padding row of ``edge_encoder`` is
    detached before folding, so it still receives no gradient.

    Args:
        num_heads: H.
        num_edges: bond-feature vocabulary (``num_edges + 1`` rows in the table).
        num_spatial: rows of ``spatial_pos_encoder``.
        num_edge_dis: number of per-hop H x H matrices in ``edge_dis_encoder``.
        edge_type: ``"multi_hop"``, or anything else for the direct-bond bias.
        multi_hop_max_dist: hops used (<= 0: no truncation).
        num_layers: L, used only by the construction-time init.
        no_2d: keep only the graph-token distance.
        implementation: ``"fast"`` or ``"reference"``.

    Shapes:
        batched_data: attn_bias [B, N+1, N+1], spatial_pos [B, N, N], x [B, N, 9],
        edge_input [B, N, N, hops, 3], attn_edge_type [B, N, N, 3]. mask_2d: [B].
        Output: [B, H, N+1, N+1].
    """

    def __init__(
        self,
        *,
        num_heads: int,
        num_edges: int,
        num_spatial: int,
        num_edge_dis: int,
        edge_type: str = "multi_hop",
        multi_hop_max_dist: int = 5,
        num_layers: int,
        no_2d: bool = False,
        implementation: str = "fast",
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.multi_hop_max_dist = multi_hop_max_dist
        self.no_2d = bool(no_2d)
        self.edge_type = edge_type
        self.implementation = check_implementation(implementation)
        self.edge_encoder = nn.Embedding(num_edges + 1, num_heads, padding_idx=0)
        if edge_type == "multi_hop":
            num_weights = num_edge_dis * num_heads * num_heads
            self.edge_dis_encoder = nn.Embedding(num_weights, 1)
        self.spatial_pos_encoder = nn.Embedding(num_spatial, num_heads, padding_idx=0)
        self.graph_token_virtual_distance = nn.Embedding(1, num_heads)
        self.apply(lambda m: init_feature_params(m, num_layers))
        # hop index k of each path hop (fast path); not in the state dict
        hops = max(multi_hop_max_dist, 1) if multi_hop_max_dist > 0 else num_edge_dis
        self.register_buffer("hop_offsets", torch.arange(hops), persistent=False)

    def forward(
        self,
        batched_data: dict,
        mask_2d: Optional[torch.Tensor] = None,
        pairs: Optional[PairIndex] = None,
    ) -> torch.Tensor:
        """The bias [B, H, N+1, N+1]; ``pairs`` (fast path): the real atom pairs, if
        already known (computed from the padding otherwise)."""
        if self.implementation == "reference":
            return self._forward_reference(batched_data, mask_2d)
        return self._forward_fast(batched_data, mask_2d, pairs)

    # ----- reference: the released code's structure ----------------------------------
    def _forward_reference(self, batched_data, mask_2d):
        attn_bias = batched_data[keys.ATTN_BIAS]
        spatial_pos = batched_data[keys.SPATIAL_POS]
        n_graph, n_node = batched_data[keys.X].shape[:2]
        H = self.num_heads
        graph_attn_bias = attn_bias.clone().unsqueeze(1).repeat(1, H, 1, 1)  # [B,H,T,T]

        if not self.no_2d:
            spatial_bias = self.spatial_pos_encoder(spatial_pos).permute(0, 3, 1, 2)
            if mask_2d is not None:
                spatial_bias = spatial_bias * mask_2d[:, None, None, None]
            graph_attn_bias[:, :, 1:, 1:] = graph_attn_bias[:, :, 1:, 1:] + spatial_bias

        t = self.graph_token_virtual_distance.weight.view(1, H, 1)
        graph_attn_bias[:, :, 1:, 0] = graph_attn_bias[:, :, 1:, 0] + t
        graph_attn_bias[:, :, 0, :] = graph_attn_bias[:, :, 0, :] + t

        if not self.no_2d:
            if self.edge_type == "multi_hop":
                edge_input = batched_data[keys.EDGE_INPUT]
                spatial_pos_ = spatial_pos.clone()
                spatial_pos_[spatial_pos_ == 0] = 1  # padding -> 1
                spatial_pos_ = torch.where(
                    spatial_pos_ > 1, spatial_pos_ - 1, spatial_pos_
                )
                if self.multi_hop_max_dist > 0:
                    spatial_pos_ = spatial_pos_.clamp(0, self.multi_hop_max_dist)
                    edge_input = edge_input[:, :, :, : self.multi_hop_max_dist, :]
                edge_input = self.edge_encoder(edge_input).mean(-2)  # [B,N,N,hops,H]
                max_dist = edge_input.size(-2)
                edge_flat = edge_input.permute(3, 0, 1, 2, 4).reshape(max_dist, -1, H)
                hop_matrices = self.edge_dis_encoder.weight.reshape(-1, H, H)
                edge_flat = torch.bmm(edge_flat, hop_matrices[:max_dist])  # [K,BNN,H]
                edge_input = edge_flat.reshape(max_dist, n_graph, n_node, n_node, H)
                edge_input = edge_input.permute(1, 2, 3, 0, 4)  # [B, N, N, hops, H]
                edge_input = edge_input.sum(-2) / spatial_pos_.float().unsqueeze(-1)
                edge_input = edge_input.permute(0, 3, 1, 2)  # [B, H, N, N]
            else:
                edge_input = self.edge_encoder(batched_data[keys.ATTN_EDGE_TYPE])
                edge_input = edge_input.mean(-2).permute(0, 3, 1, 2)  # [B, H, N, N]
            if mask_2d is not None:
                edge_input = edge_input * mask_2d[:, None, None, None]
            graph_attn_bias[:, :, 1:, 1:] = graph_attn_bias[:, :, 1:, 1:] + edge_input

        return graph_attn_bias + attn_bias.unsqueeze(1)  # [B, H, T, T]

    # ----- fast: real pairs only, folded hop matrices ---------------------------------
    def folded_edge_table(self, num_hops: int, num_feat: int = 1) -> torch.Tensor:
        """``T_k = E W_k / num_feat`` for the first ``num_hops`` hops, as [V*hops, H]: row
        ``e * hops + k`` is ``T_k[e]`` (one matrix product, no copy of the result)."""
        H = self.num_heads
        weight = self.edge_encoder.weight  # [V, H]
        # The padding row keeps its value but, as with padding_idx, gets no gradient.
        weight = torch.cat([weight[:1].detach(), weight[1:]], dim=0)
        hop_matrices = self.edge_dis_encoder.weight.view(-1, H, H)[:num_hops]  # [hops, H, H]
        stacked = hop_matrices.permute(1, 0, 2).reshape(H, num_hops * H)  # [H, hops*H]
        if num_feat != 1:
            stacked = stacked / num_feat
        return torch.mm(weight, stacked).view(-1, H)  # [V*hops, H]

    def _pair_edge_bias(
        self, batched_data: dict, pairs: PairIndex, spd: torch.Tensor
    ) -> torch.Tensor:
        """The edge bias [P, H] of the real pairs; ``spd`` [P]: their ``spatial_pos``."""
        if self.edge_type != "multi_hop":
            edge_type = pairs.gather(batched_data[keys.ATTN_EDGE_TYPE])  # [P, 3]
            return self.edge_encoder(edge_type).mean(-2)  # [P, H]
        # Divisor rule of the release: 0 (padding) -> 1, x > 1 -> x - 1, clamp to hops.
        max_dist = self.multi_hop_max_dist
        divisor = (spd - 1).clamp(1, max_dist if max_dist > 0 else None)
        edge_input = pairs.gather(batched_data[keys.EDGE_INPUT])  # [P, hops, 3]
        if max_dist > 0:
            edge_input = edge_input[:, :max_dist, :]
        num_hops, num_feat = edge_input.shape[-2:]
        # row e * hops + k of the folded table; mean over the 3 features folded into it
        rows = edge_input * num_hops + self.hop_offsets[:num_hops].view(1, -1, 1)
        table = self.folded_edge_table(num_hops, num_feat)  # [V*hops, H]
        # a gather and a sum (its backward is one index_add; embedding_bag's sorts)
        summed = table.index_select(0, rows.view(-1)).view(-1, num_hops * num_feat, self.num_heads)
        return summed.sum(1) / divisor.unsqueeze(-1)

    def _forward_fast(self, batched_data, mask_2d, pairs=None):
        attn_bias = batched_data[keys.ATTN_BIAS]  # [B, T, T]
        x = batched_data[keys.X]
        n_graph, n_node = x.shape[:2]
        H = self.num_heads
        if not self.no_2d:
            if pairs is None:
                pairs = PairIndex.from_padding_mask(x[:, :, 0].eq(0))
            spd = pairs.gather(batched_data[keys.SPATIAL_POS])  # [P]
            pair = self.spatial_pos_encoder(spd) + self._pair_edge_bias(
                batched_data, pairs, spd
            )  # [P, H]
            grid = pairs.scatter_heads(pair, n_graph)  # [H, B, N, N]
            if mask_2d is not None:
                grid = grid * mask_2d.view(1, -1, 1, 1).to(grid.dtype)
        else:
            weight = self.graph_token_virtual_distance.weight
            grid = weight.new_zeros(H, n_graph, n_node, n_node)
        bias = with_graph_token(grid, self.graph_token_virtual_distance.weight)
        # The release adds the collated bias at the start and again at the end. Stored
        # head-major ([H, B, T, T]): the layers use it without a copy.
        return torch.add(bias, attn_bias.unsqueeze(0), alpha=2.0).transpose(0, 1)


def with_graph_token(grid: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
    """``[H, B, N, N]`` atom-pair bias -> ``[H, B, T, T]`` with the graph-token virtual
    distance ``t`` ([1, H]) on all of row 0 and on column 0 of rows 1..N."""
    H, n_graph, n_node, _ = grid.shape
    t = distance.view(H, 1, 1, 1).to(grid.dtype)
    rows = torch.cat([t.expand(H, n_graph, n_node, 1), grid], dim=3)  # [H, B, N, T]
    return torch.cat([t.expand(H, n_graph, 1, n_node + 1), rows], dim=2)  # [H, B, T, T]


def gaussian_basis(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor):
    """The release's Gaussian, operation for operation (``pi = 3.14159``)."""
    a = (2 * GAUSSIAN_PI) ** 0.5
    return torch.exp(-0.5 * (((x - mean) / std) ** 2)) / (a * std)


class _GaussianBasis(torch.autograd.Function):
    """``gaussian_basis(u.expand(K), mean, |std_raw| + 0.01)`` saving only inputs.

    The K-wide intermediates are recomputed in backward instead of being kept.
    """

    @staticmethod
    def forward(ctx, u, mean, std_raw):
        # u [..., 1]; mean, std_raw [K]
        ctx.save_for_backward(u, mean, std_raw)
        return gaussian_basis(u, mean, std_raw.abs() + GAUSSIAN_STD_OFFSET)  # [..., K]

    @staticmethod
    def backward(ctx, grad_out):
        u, mean, std_raw = ctx.saved_tensors
        std = std_raw.abs() + GAUSSIAN_STD_OFFSET
        z = (u - mean) / std  # [..., K]
        # d psi/du = -psi z / sigma; d psi/d mu = psi z / sigma;
        # d psi/d sigma = psi (z^2 - 1) / sigma.
        g = grad_out * gaussian_basis(u, mean, std) / std
        grad_u = grad_mean = grad_std = None
        if ctx.needs_input_grad[0]:
            grad_u = -(g * z).sum(-1, keepdim=True)
        flat_g = g.reshape(-1, g.shape[-1])
        flat_z = z.reshape(-1, z.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_mean = (flat_g * flat_z).sum(0)
        if ctx.needs_input_grad[2]:
            grad_std = (flat_g * (flat_z * flat_z - 1.0)).sum(0) * torch.sign(std_raw)
        return grad_u, grad_mean, grad_std


class GaussianLayer(nn.Module):
    """Gaussian basis of pair distances with per-atom-type affine maps (spec §1.7).

    ``u_ij = (mul[t_i] + mul[t_j]) d_ij + (bias[t_i] + bias[t_j])`` and
    ``psi_k = exp(-((u - mu_k) / sigma_k)^2 / 2) / (sqrt(2 pi) sigma_k)`` with
    ``sigma = |stds| + 0.01`` and the release's ``pi = 3.14159``, in float32.

    Args:
        num_kernels: K.
        num_edge_types: rows of ``mul`` and ``bias`` (1536 in the release).
        fused: use a memory-lean autograd function that saves only ``u`` and
            recomputes the K-wide intermediates in backward (identical values).

    Shapes:
        dist: [...]; edge_types: int64 [..., 2]; output: [..., K].
    """

    def __init__(
        self, num_kernels: int = 128, num_edge_types: int = 1536, *, fused: bool = False
    ) -> None:
        super().__init__()
        self.num_kernels = num_kernels
        self.fused = bool(fused)
        self.means = nn.Embedding(1, num_kernels)
        self.stds = nn.Embedding(1, num_kernels)
        self.mul = nn.Embedding(num_edge_types, 1, padding_idx=0)
        self.bias = nn.Embedding(num_edge_types, 1, padding_idx=0)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Intended init of the release: means, stds ~ U(0, 3), mul = 1, bias = 0."""
        nn.init.uniform_(self.means.weight, 0, 3)
        nn.init.uniform_(self.stds.weight, 0, 3)
        nn.init.constant_(self.bias.weight, 0)
        nn.init.constant_(self.mul.weight, 1)

    def forward(self, dist: torch.Tensor, edge_types: torch.Tensor) -> torch.Tensor:
        mul = self.mul(edge_types).sum(dim=-2)  # [..., 1]
        bias = self.bias(edge_types).sum(dim=-2)  # [..., 1]
        u = mul * dist.unsqueeze(-1) + bias  # [..., 1]
        mean = at_least_float32(self.means.weight).view(-1)  # [K]
        std_raw = at_least_float32(self.stds.weight).view(-1)  # [K]
        u = u.to(mean.dtype)
        if self.fused:
            out = _GaussianBasis.apply(u, mean, std_raw)
        else:
            u = u.expand(*u.shape[:-1], self.num_kernels)
            out = gaussian_basis(u, mean, std_raw.abs() + GAUSSIAN_STD_OFFSET)
        return out.type_as(self.means.weight)  # [..., K]


class NonLinear(nn.Module):
    """``Linear(in, hidden) -> GELU -> Linear(hidden, out)``; hidden defaults to in."""

    def __init__(
        self, in_features: int, out_features: int, hidden: Optional[int] = None
    ) -> None:
        super().__init__()
        hidden = in_features if hidden is None else hidden
        self.layer1 = nn.Linear(in_features, hidden)
        self.layer2 = nn.Linear(hidden, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer2(F.gelu(self.layer1(x)))


class Molecule3DBias(nn.Module):
    """3D channel: Gaussian-kernel pair features -> bias and atom features (spec §1.7).

    Returns the 3D bias ``gbf_proj(psi)`` [B, H, N, N] with ``-inf`` on padded keys,
    the merged atom term ``edge_proj(sum_j psi_ij)`` [B, N, D] (padded j excluded; the
    caller scales it by 0.01) and the unit vectors
    ``delta_pos[b, i, j] = (pos_j - pos_i) / (|pos_j - pos_i| + 1e-5)`` [B, N, N, 3].

    ``reference`` evaluates every (i, j) of the padded grid like the release. ``fast``
    evaluates real pairs only (sum_b n_b^2 rows instead of B N^2) with the fused
    Gaussian; entries of padded atoms (keys too) are then 0 instead of the release's
    unused values or ``-inf`` (the encoder puts ``-inf`` on padded keys of the summed
    bias), the bias is stored head-major (``[H, B, N, N]`` transposed), and real entries
    are identical.

    Args:
        num_heads: H.
        num_edges: rows of the Gaussian type tables (1536).
        embed_dim: D.
        num_kernels: K. When K == D the release builds no ``edge_proj`` and crashes
            in forward; here the merged term is then used unprojected (identity).
        implementation: ``"fast"`` or ``"reference"``.

    Shapes:
        batched_data: pos float [B, N, 3] in Å, x [B, N, 9],
        node_type_edge [B, N, N, 2].
    """

    def __init__(
        self,
        *,
        num_heads: int,
        num_edges: int,
        embed_dim: int,
        num_kernels: int,
        implementation: str = "fast",
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kernels = num_kernels
        self.implementation = check_implementation(implementation)
        self.gbf = GaussianLayer(num_kernels, num_edges, fused=implementation == "fast")
        self.gbf_proj = NonLinear(num_kernels, num_heads)
        self.edge_proj = None
        if num_kernels != embed_dim:
            self.edge_proj = nn.Linear(num_kernels, embed_dim)

    def _project(self, summed: torch.Tensor) -> torch.Tensor:
        # [B, N, K] -> [B, N, D]; identity when K == D (no edge_proj, as released).
        return summed if self.edge_proj is None else self.edge_proj(summed)

    @staticmethod
    def unit_delta_pos(pos: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Unit vectors ``(p_j - p_i) / (|p_j - p_i| + 1e-5)`` and distances."""
        delta_pos = pos.unsqueeze(1) - pos.unsqueeze(2)  # [B, N, N, 3]
        dist = delta_pos.norm(dim=-1)  # [B, N, N]
        return delta_pos / (dist.unsqueeze(-1) + DELTA_POS_EPS), dist

    def forward(self, batched_data: dict, pairs: Optional[PairIndex] = None):
        """``(bias, merged, delta_pos)``; ``pairs`` (fast path) as in
        :meth:`MoleculeAttnBias.forward`."""
        if self.implementation == "reference":
            return self._forward_reference(batched_data)
        return self._forward_fast(batched_data, pairs)

    def _forward_reference(self, batched_data):
        pos, x = batched_data[keys.POS], batched_data[keys.X]
        node_type_edge = batched_data[keys.NODE_TYPE_EDGE]
        padding_mask = x.eq(0).all(dim=-1)  # [B, N]
        delta_pos, dist = self.unit_delta_pos(pos)
        edge_feature = self.gbf(dist, node_type_edge.long())  # [B, N, N, K]
        bias = self.gbf_proj(edge_feature).permute(0, 3, 1, 2).contiguous()  # [B,H,N,N]
        bias = bias.masked_fill(padding_mask[:, None, None, :], float("-inf"))
        edge_feature = edge_feature.masked_fill(padding_mask[:, None, :, None], 0.0)
        merged = self._project(edge_feature.sum(dim=-2))  # [B, N, D]
        return bias, merged, delta_pos

    def _forward_fast(self, batched_data, pairs=None):
        pos, x = batched_data[keys.POS], batched_data[keys.X]
        n_graph, n_node = x.shape[:2]
        delta_pos, dist = self.unit_delta_pos(pos)
        if pairs is None:
            pairs = PairIndex.from_padding_mask(x[:, :, 0].eq(0))
        node_types = pairs.gather(batched_data[keys.NODE_TYPE_EDGE]).long()  # [P, 2]
        psi = self.gbf(pairs.gather(dist), node_types)  # [P, K]
        grid = pairs.scatter_heads(self.gbf_proj(psi), n_graph)  # [H, B, N, N]
        # 0 on padded pairs: the encoder puts -inf on padded keys of the summed bias
        bias = grid.transpose(0, 1)  # [B, H, N, N], stored head-major
        summed = psi.new_zeros(n_graph * n_node, self.num_kernels)
        summed = summed.index_add(0, pairs.row, psi)  # [B*N, K]
        merged = self._project(summed.view(n_graph, n_node, -1))  # [B, N, D]
        return bias, merged, delta_pos


class _RotatedAttention(torch.autograd.Function):
    """``out[b, h, c] = (A[b, h] * rhat[b, :, :, c]) @ v[b, h]`` without the 3x product.

    Same values as the release's ``(A.unsqueeze(-1) * rhat.unsqueeze(1)).permute(...)
    @ v``; the backward recomputes ``A * rhat_c`` per coordinate instead of keeping a
    ``[B, H, 3, N, N]`` tensor alive.
    """

    @staticmethod
    def forward(ctx, attn_probs, delta_pos, v):
        # attn_probs [B, H, N, N]; delta_pos [B, N, N, 3]; v [B, H, N, hd]
        ctx.save_for_backward(attn_probs, delta_pos, v)
        outs = [(attn_probs * delta_pos[:, None, :, :, c]) @ v for c in range(3)]
        return torch.stack(outs, dim=2)  # [B, H, 3, N, hd]

    @staticmethod
    def backward(ctx, grad_out):
        attn_probs, delta_pos, v = ctx.saved_tensors
        need_a, need_r, need_v = ctx.needs_input_grad
        grad_a = grad_v = None
        grad_rs = []
        for c in range(3):
            r_c = delta_pos[:, None, :, :, c]  # [B, 1, N, N]
            g_c = grad_out[:, :, c]  # [B, H, N, hd]
            if need_a or need_r:
                g_rot = g_c @ v.transpose(-1, -2)  # [B, H, N, N]
                if need_a:
                    grad_a = g_rot * r_c if grad_a is None else grad_a + g_rot * r_c
                if need_r:
                    grad_rs.append((g_rot * attn_probs).sum(1))  # [B, N, N]
            if need_v:
                term = (attn_probs * r_c).transpose(-1, -2) @ g_c
                grad_v = term if grad_v is None else grad_v + term
        grad_r = torch.stack(grad_rs, dim=-1) if need_r else None
        return grad_a, grad_r, grad_v


class AtomTaskHead(nn.Module):
    """3D denoising head ``atom_proc`` (spec §1.11): [B, N, 3] from unit vectors.

    ``o^c_i = sum_j A_ij rhat^c_ij v_j`` per head, then ``force_proj{1,2,3}`` map the
    x/y/z channels to one scalar each. The released head hard-codes its attention
    dropout to 0.1.

    Args:
        embed_dim: D.
        num_heads: H.
        attention_dropout: dropout on its attention probabilities (release: 0.1).
        implementation: ``"reference"`` (the release's broadcast product) or ``"fast"``
            (same values; an autograd function that does not keep the
            ``[B, H, 3, N, N]`` product).

    Shapes:
        query: [N, B, D] (atom tokens, graph token excluded); attn_bias: [B, H, N, N];
        delta_pos: [B, N, N, 3]; output: float32 [B, N, 3].
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        num_heads: int,
        attention_dropout: float = 0.1,
        implementation: str = "fast",
    ) -> None:
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim {embed_dim} not divisible by {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.scaling = (embed_dim // num_heads) ** -0.5
        self.attention_dropout = float(attention_dropout)
        self.implementation = check_implementation(implementation)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.force_proj1 = nn.Linear(embed_dim, 1)
        self.force_proj2 = nn.Linear(embed_dim, 1)
        self.force_proj3 = nn.Linear(embed_dim, 1)

    def forward_packed(
        self,
        tokens: torch.Tensor,
        spread_index: torch.Tensor,
        attn_bias: torch.Tensor,
        delta_pos: torch.Tensor,
    ) -> torch.Tensor:
        """The head on the fast path's packed tokens (same values as :meth:`forward`).

        q/k/v of all heads in one product, gathered straight to head-major atom rows; the
        attention and the rotation are one autograd node (:class:`~.fused_layer.RotatedAttention`);
        the three force projections one batched product.

        Args:
            tokens: [M, D] final hidden states of the packed tokens.
            spread_index: int64 [B*N], the packed row of each padded atom position (padding:
                some real row; masked as a key, its output dropped by the loss).
            attn_bias: [B, H, N, N] atom-pair bias, ``-inf`` on padded keys (head-major
                storage avoids a copy).
            delta_pos: [B, N, N, 3].

        Returns:
            [B, N, 3]: float32 (float64 in a float64 model).
        """
        bsz, H, n_node, _ = attn_bias.shape
        precision = Precision.of(tokens)
        projections = (self.q_proj, self.k_proj, self.v_proj)
        weight = torch.cat([p.weight for p in projections], dim=0)  # [3D, D]
        bias = torch.cat([p.bias for p in projections], dim=0)
        qkv = QKVGather.apply(tokens, weight, bias, spread_index, H, precision.mm)
        rows = qkv.view(3, H * bsz, n_node, -1)  # [3, H*B, N, hd]
        bias_hb = cast(attn_bias.transpose(0, 1).reshape(H * bsz, n_node, n_node), precision.mm)
        p = self.attention_dropout if self.training else 0.0
        out = RotatedAttention.apply(rows, bias_hb, delta_pos, self.scaling, p)  # [H*B, 3N, hd]
        # x[c, b*N + i] = concat_h out[h, b, c, i]: the inputs of force_proj{1,2,3}
        x = out.view(H, bsz, 3, n_node, -1).permute(2, 1, 3, 0, 4).reshape(3, bsz * n_node, -1)
        forces = (self.force_proj1, self.force_proj2, self.force_proj3)
        w = torch.stack([f.weight for f in forces]).transpose(1, 2)  # [3, D, 1]
        b = torch.stack([f.bias for f in forces]).unsqueeze(-1)  # [3, 1, 1]
        x, w, b = cast(x, precision.mm), cast(w, precision.mm), cast(b, precision.mm)
        f = torch.baddbmm(b, x, w)  # [3, B*N, 1]
        f = f.view(3, bsz, n_node).permute(1, 2, 0)  # [B, N, 3]
        return cast(f, softmax_dtype(f.dtype))  # float32 as released, float64 kept

    def forward(
        self, query: torch.Tensor, attn_bias: torch.Tensor, delta_pos: torch.Tensor
    ) -> torch.Tensor:
        query = query.contiguous().transpose(0, 1)  # [B, N, D]
        bsz, n_node, _ = query.shape
        H = self.num_heads
        q = self.q_proj(query).view(bsz, n_node, H, -1).transpose(1, 2) * self.scaling
        k = self.k_proj(query).view(bsz, n_node, H, -1).transpose(1, 2)
        v = self.v_proj(query).view(bsz, n_node, H, -1).transpose(1, 2)  # [B,H,N,hd]
        attn = q @ k.transpose(-1, -2)  # [B, H, N, N]
        logits = attn.view(-1, n_node, n_node) + attn_bias.contiguous().view(
            -1, n_node, n_node
        )
        attn_probs = F.softmax(at_least_float32(logits), dim=-1).type_as(attn)
        attn_probs = F.dropout(
            attn_probs, p=self.attention_dropout, training=self.training
        ).view(bsz, H, n_node, n_node)
        delta_pos = delta_pos.type_as(attn_probs)
        if self.implementation == "fast":
            x = _RotatedAttention.apply(attn_probs, delta_pos, v)  # [B, H, 3, N, hd]
        else:
            rot = attn_probs.unsqueeze(-1) * delta_pos.unsqueeze(1)  # [B, H, N, N, 3]
            x = rot.permute(0, 1, 4, 2, 3) @ v.unsqueeze(2)  # [B, H, 3, N, hd]
        x = x.permute(0, 3, 2, 1, 4).contiguous().view(bsz, n_node, 3, -1)  # [B,N,3,D]
        f1 = self.force_proj1(x[:, :, 0, :]).view(bsz, n_node, 1)
        f2 = self.force_proj2(x[:, :, 1, :]).view(bsz, n_node, 1)
        f3 = self.force_proj3(x[:, :, 2, :]).view(bsz, n_node, 1)
        return at_least_float32(torch.cat([f1, f2, f3], dim=-1))  # [B, N, 3]
