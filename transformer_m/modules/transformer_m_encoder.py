"""The Transformer-M molecule encoder (``encoder.molecule_encoder`` in checkpoints)."""
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from graphormer_ext.data import keys

from .host_plan import PLAN_ANY_POS, PLAN_PAIRS, PairIndex, plan_of
from .multihead_attention import TokenPacking
from .transformer_m_encoder_layer import TransformerMEncoderLayer
from .transformer_m_layers import (
    AtomFeature,
    AtomTaskHead,
    Molecule3DBias,
    MoleculeAttnBias,
)
from .fused_layer import cast
from .utils import (
    DEFAULT_MODE_PROB,
    MODE_MASKS,
    draw_modes,
    ModeGenerator,
    check_implementation,
    draw_mode_choice,
    dropout,
    parse_mode_prob,
)

# Scale of the 3D atom term added to the atom tokens (spec §1.7).
MERGED_3D_FEATURE_SCALE = 0.01
# torch.compile modes of the layer stack ("none": eager). reduce-overhead adds CUDA graphs.
COMPILE_MODES = ("none", "default", "reduce-overhead")
# Compiled layer-stack functions by (mode, backend), shared by all encoders (the encoder is an
# argument: no reference to a module is kept, copies and pickles of modules stay plain).
_COMPILED: Dict[Tuple[str, str], object] = {}


def _run_layers(encoder: "MoleculeEncoder", *tensors: torch.Tensor) -> torch.Tensor:
    return encoder.run_layers(*tensors)


class MoleculeEncoder(nn.Module):
    """Atom tokens, 2D/3D attention biases, L encoder layers, 3D denoising head.

    Mirrors the released ``TransformerMEncoder`` (spec §1.1, §1.8). The same
    ``attn_bias`` is used by every layer. The 3D channel runs when ``add_3d`` is set
    and some position of the batch is non-zero. In training each molecule draws a mode
    {0: 2D+3D, 1: 2D, 2: 3D} with ``mode_prob``: ``mask_2d = 0`` zeroes the degree
    embedding, the SPD bias and the edge bias; ``mask_3d = 0`` zeroes the merged 3D atom
    term, ``delta_pos`` and the finite 3D bias; the denoising output is kept for
    3D-only molecules only. As released, the draw happens in training whether or not
    ``add_3d`` is set, and ``atom_proc`` is built even without ``add_3d``.

    With ``implementation="fast"`` the layers run on packed real tokens (padded tokens
    are never computed; their hidden states come back as zeros) with SDPA attention,
    and the 2D/3D biases are evaluated on real atom pairs only. Outputs at real tokens
    equal those of the reference path.

    Args:
        num_atoms: atom-feature vocabulary (4608).
        num_in_degree: in-degree vocabulary (512).
        num_out_degree: out-degree vocabulary (512).
        num_edges: bond-feature vocabulary (1536).
        num_spatial: SPD vocabulary (512).
        num_edge_dis: number of per-hop matrices (128).
        edge_type: ``"multi_hop"`` or ``"direct"``.
        multi_hop_max_dist: hops used by the edge bias.
        num_layers: L.
        embed_dim: D.
        ffn_embed_dim: FFN width.
        num_heads: H.
        dropout: hidden dropout (embeddings and residual branches).
        attention_dropout: attention-probability dropout.
        act_dropout: dropout after the FFN activation.
        activation_fn: fairseq activation name.
        encoder_normalize_before: LayerNorm ``emb_layer_norm`` on the embeddings.
        sandwich_ln: Pre-LN + sublayer-LN layers instead of Post-LN.
        droppath_prob: stochastic depth, linear over layers from 0 to this value.
        legacy_droppath: per-token DropPath masks (released quirk), not per-molecule.
        add_3d: build the 3D channel.
        num_3d_bias_kernel: K.
        no_2d: disable the degree, SPD and edge encodings.
        mode_prob: probabilities of {2D+3D, 2D, 3D} (string or three floats; invalid
            values fall back to 0.2, 0.2, 0.6). None: no mode masking in training
            (the released QM9 encoder).
        atom_head: build the denoising head ``atom_proc`` (False: the released QM9
            encoder's layout; ``atom_output`` is then None).
        atom_head_dropout: attention dropout of ``atom_proc`` (0.1 in the release).
        implementation: ``"fast"`` or ``"reference"``.
        torch_compile: ``torch.compile`` mode of the fast path's layer stack (one compiled
            region for the L layers, dynamic shapes), one of ``COMPILE_MODES``; ``"none"``
            runs it eagerly. Used when only the last hidden state is requested.
        compile_backend: ``torch.compile`` backend (``"inductor"``; ``"eager"`` traces
            without generating code, for tests).
    """

    def __init__(
        self,
        *,
        num_atoms: int = 4608,
        num_in_degree: int = 512,
        num_out_degree: int = 512,
        num_edges: int = 1536,
        num_spatial: int = 512,
        num_edge_dis: int = 128,
        edge_type: str = "multi_hop",
        multi_hop_max_dist: int = 5,
        num_layers: int,
        embed_dim: int,
        ffn_embed_dim: int,
        num_heads: int,
        dropout: float = 0.1,
        attention_dropout: float = 0.1,
        act_dropout: float = 0.1,
        activation_fn: str = "relu",
        encoder_normalize_before: bool = False,
        sandwich_ln: bool = False,
        droppath_prob: float = 0.0,
        legacy_droppath: bool = False,
        add_3d: bool = False,
        num_3d_bias_kernel: int = 128,
        no_2d: bool = False,
        mode_prob: Optional[Union[str, Sequence[float]]] = "0.2,0.2,0.6",
        atom_head: bool = True,
        atom_head_dropout: float = 0.1,
        implementation: str = "fast",
        torch_compile: str = "none",
        compile_backend: str = "inductor",
    ) -> None:
        super().__init__()
        self.implementation = check_implementation(implementation)
        torch_compile = str(torch_compile)
        if torch_compile not in COMPILE_MODES:
            raise ValueError(f"torch_compile must be one of {COMPILE_MODES}, got {torch_compile!r}")
        self.torch_compile = torch_compile
        self.compile_backend = compile_backend
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.dropout = float(dropout)
        self.mode_prob = None if mode_prob is None else parse_mode_prob(mode_prob)
        self.atom_feature = AtomFeature(
            num_atoms=num_atoms,
            num_in_degree=num_in_degree,
            num_out_degree=num_out_degree,
            embed_dim=embed_dim,
            num_layers=num_layers,
            no_2d=no_2d,
        )
        self.molecule_attn_bias = MoleculeAttnBias(
            num_heads=num_heads,
            num_edges=num_edges,
            num_spatial=num_spatial,
            num_edge_dis=num_edge_dis,
            edge_type=edge_type,
            multi_hop_max_dist=multi_hop_max_dist,
            num_layers=num_layers,
            no_2d=no_2d,
            implementation=implementation,
        )
        self.molecule_3d_bias = None
        if add_3d:
            self.molecule_3d_bias = Molecule3DBias(
                num_heads=num_heads,
                num_edges=num_edges,
                embed_dim=embed_dim,
                num_kernels=num_3d_bias_kernel,
                implementation=implementation,
            )
        self.atom_proc = None
        if atom_head:
            self.atom_proc = AtomTaskHead(
                embed_dim=embed_dim,
                num_heads=num_heads,
                attention_dropout=atom_head_dropout,
                implementation=implementation,
            )
        self.emb_layer_norm = None
        if encoder_normalize_before:
            self.emb_layer_norm = nn.LayerNorm(embed_dim)
        droppath_probs = torch.linspace(
            0, droppath_prob, num_layers, device="cpu"
        ).tolist()
        self.layers = nn.ModuleList(
            TransformerMEncoderLayer(
                embed_dim=embed_dim,
                ffn_embed_dim=ffn_embed_dim,
                num_heads=num_heads,
                dropout=dropout,
                attention_dropout=attention_dropout,
                act_dropout=act_dropout,
                activation_fn=activation_fn,
                sandwich_ln=sandwich_ln,
                droppath_prob=droppath_probs[layer],
                legacy_droppath=legacy_droppath,
                implementation=implementation,
            )
            for layer in range(num_layers)
        )
        # Tensors the forward pass needs on the device; as buffers they move with the
        # module, so no host-to-device copy (which waits for the device) per update.
        # Not persistent: the state dict keeps the released names only.
        # cumulative (p0, p0 + p1) of the mode probabilities: draws by inversion (draw_modes)
        cdf = np.cumsum(np.asarray(self.mode_prob or DEFAULT_MODE_PROB, dtype=np.float64))[:2]
        self.register_buffer("mode_cdf", torch.tensor(cdf, dtype=torch.float32), persistent=False)
        # rows of MODE_MASKS: (mask_2d, mask_3d) of each mode, looked up in one gather
        self.register_buffer(
            "mode_mask_table", torch.tensor(MODE_MASKS, dtype=torch.float32), persistent=False
        )
        keep = [1.0 - p for p in droppath_probs if p > 0.0]
        self.register_buffer(
            "droppath_keep", torch.tensor(keep, dtype=torch.float32), persistent=False
        )

    def droppath_scales(
        self, packing: TokenPacking, dtype: torch.dtype
    ) -> List[Optional[Tuple[torch.Tensor, torch.Tensor]]]:
        """DropPath factors of every layer's two residual branches, drawn at once.

        One ``rand`` for all layers instead of two small draws per layer: per molecule
        (or per token position with ``legacy_droppath``) ``floor(keep + U) / keep``, as
        :class:`DropPath` draws it, then gathered to the packed tokens.

        Returns:
            Per layer: None (no DropPath, or eval mode), or the ``[M, 1]`` factors of the
            attention and the FFN branch.
        """
        layers = [i for i, layer in enumerate(self.layers) if layer.droppath is not None]
        if not self.training or not layers:
            return [None] * len(self.layers)
        legacy = self.layers[layers[0]].droppath.legacy_per_token
        if legacy:
            n, index = packing.num_tokens, packing.token_index
        else:
            n, index = packing.batch_size, packing.batch_index
        keep = self.droppath_keep.float().view(-1, 1, 1)  # [A, 1, 1]
        noise = torch.rand(len(layers), 2, n, device=keep.device)  # [A, 2, n]
        scale = (keep + noise).floor_().div_(keep).to(dtype)  # 0 or 1 / keep
        scale = scale.index_select(2, index).unsqueeze(-1)  # [A, 2, M, 1]
        out: List[Optional[Tuple[torch.Tensor, torch.Tensor]]] = [None] * len(self.layers)
        for a, layer in enumerate(layers):
            out[layer] = (scale[a, 0], scale[a, 1])
        return out

    def run_layers(
        self,
        xs: torch.Tensor,
        bias: torch.Tensor,
        flat_index: torch.Tensor,
        batch_index: torch.Tensor,
        token_index: torch.Tensor,
        gather_index: torch.Tensor,
        spread_index: torch.Tensor,
    ) -> torch.Tensor:
        """The L layers on packed tokens ``xs`` [M, D], DropPath draws included.

        Tensors in, tensor out (the fields of :class:`TokenPacking` passed one by one, B
        and T read from ``bias`` [B, H, T, T]): the region ``torch.compile`` compiles.
        """
        packing = TokenPacking(flat_index, batch_index, token_index, gather_index,
                               spread_index, bias.shape[0], bias.shape[-1])  # fmt: skip
        scales = self.droppath_scales(packing, xs.dtype)
        for layer, layer_scales, qkv in zip(self.layers, scales, self.qkv_parameters()):
            xs = layer.forward_packed(xs, bias, packing, layer_scales, qkv)
        return xs

    def qkv_parameters(self) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Every layer's stacked q/k/v weight [3D, D] and bias [3D], made with two
        concatenations for all layers (instead of two per layer)."""
        attns = [layer.self_attn for layer in self.layers]
        weights = torch.cat([p.weight for a in attns for p in (a.q_proj, a.k_proj, a.v_proj)])
        biases = torch.cat([p.bias for a in attns for p in (a.q_proj, a.k_proj, a.v_proj)])
        n = len(attns)
        return list(zip(weights.view(n, -1, weights.shape[-1]).unbind(0),
                        biases.view(n, -1).unbind(0)))  # fmt: skip

    def _compiled_layers(self):
        key = (self.torch_compile, self.compile_backend)
        if key not in _COMPILED:
            mode = None if self.torch_compile == "default" else self.torch_compile
            _COMPILED[key] = torch.compile(
                _run_layers, mode=mode, dynamic=True, backend=self.compile_backend
            )
        compiled = _COMPILED[key]
        return lambda *tensors: compiled(self, *tensors)

    def forward(
        self,
        batched_data: Dict[str, torch.Tensor],
        mode_choice: Optional[torch.Tensor] = None,
        generator: Optional[ModeGenerator] = None,
        return_intermediates: bool = False,
        return_all_hiddens: bool = True,
    ) -> Tuple[List[torch.Tensor], Optional[torch.Tensor], Dict[str, object]]:
        """Encode a collated batch.

        Args:
            batched_data: collated batch (keys of :mod:`graphormer_ext.data.keys`), plus
                optionally the host-side index plan of :mod:`.host_plan` (then the fast
                path never synchronises with the device).
            mode_choice: int64 [B] training modes {0: 2D+3D, 1: 2D, 2: 3D}; drawn
                with ``generator`` when None (unless ``mode_prob`` is None). Ignored
                in eval mode (no masks there, as released).
            generator: randomness of the mode draw (numpy Generator or RandomState,
                torch Generator, or None for torch's global generator of the device).
            return_intermediates: also return the channel outputs.
            return_all_hiddens: return the states after every layer; False: only the
                last (the fast path then skips unpacking the others).

        Returns:
            ``inner_states``: L+1 tensors [T, B, D] (entry 0: the embeddings after
            ``emb_layer_norm``), or only the last one; ``atom_output``: float32
            [B, N, 3], or None when the 3D channel did not run; ``extra``: dict with
            ``padding_mask`` [B, T], ``mode_choice`` (or None), in the fast path
            ``packing`` and ``last_packed`` (final states of the real tokens, [M, D]),
            and ``intermediates`` when requested.
        """
        x_in = batched_data[keys.X]
        n_mol, n_atoms = x_in.shape[:2]
        pos = batched_data.get(keys.POS)
        plan = plan_of(batched_data)
        padding_mask = torch.cat(
            [x_in.new_zeros(n_mol, 1, dtype=torch.bool), x_in[:, :, 0].eq(0)], dim=1
        )  # [B, T]
        fast = self.implementation == "fast"
        pairs = None
        if fast and plan is not None:
            pairs = PairIndex(plan[PLAN_PAIRS], n_atoms)
        elif fast:
            pairs = PairIndex.from_padding_mask(padding_mask[:, 1:])

        mask_2d = mask_3d = None
        training_masks = mode_choice is not None or self.mode_prob is not None
        if self.training and training_masks:
            if mode_choice is None and generator is None:
                mode_choice = draw_modes(n_mol, self.mode_cdf)
            elif mode_choice is None:
                mode_choice = draw_mode_choice(n_mol, self.mode_prob, generator)
            like = pos if pos is not None else self.atom_feature.graph_token.weight
            table = self.mode_mask_table
            masks = table.index_select(0, mode_choice.to(table.device))  # [B, 2]
            mask_2d, mask_3d = cast(masks, like.dtype).unbind(1)
        else:
            mode_choice = None

        x = self.atom_feature(batched_data, mask_2d=mask_2d)  # [B, T, D]
        bias_kwargs = {"pairs": pairs} if fast else {}
        attn_bias_2d = self.molecule_attn_bias(
            batched_data, mask_2d=mask_2d, **bias_kwargs
        )
        attn_bias = attn_bias_2d  # [B, H, T, T]
        inter: Dict[str, Optional[torch.Tensor]] = {}
        if return_intermediates:
            inter.update(
                atom_feature=x, attn_bias_2d=attn_bias_2d, padding_mask=padding_mask
            )

        delta_pos = None
        use_3d = self.molecule_3d_bias is not None and pos is not None
        if use_3d:
            if plan is not None and PLAN_ANY_POS in plan:
                use_3d = bool(plan[PLAN_ANY_POS])  # a host bool: no device read
            else:
                use_3d = not bool((pos == 0).all())
        if use_3d:
            bias_3d, merged, delta_pos = self.molecule_3d_bias(batched_data, **bias_kwargs)
            if return_intermediates:
                inter.update(
                    bias_3d=bias_3d, merged_edge_features=merged, delta_pos=delta_pos
                )
            if mask_3d is not None:
                merged = merged * mask_3d[:, None, None]
                delta_pos = delta_pos * mask_3d[:, None, None, None]
                if fast:  # finite everywhere (0 on padded pairs)
                    bias_3d = bias_3d * mask_3d.view(-1, 1, 1, 1).to(bias_3d.dtype)
                else:
                    finite = bias_3d != float("-inf")
                    off = finite & (mask_3d == 0)[:, None, None, None]
                    bias_3d = bias_3d.masked_fill(off, 0.0)
            if fast:  # padded head-major, as the 2D bias
                padded = F.pad(bias_3d.transpose(0, 1), (1, 0, 1, 0)).transpose(0, 1)
            else:
                padded = F.pad(bias_3d, (1, 0, 1, 0))
            attn_bias = attn_bias + padded  # [B, H, T, T]
            atoms = x[:, 1:] + merged * MERGED_3D_FEATURE_SCALE
            x = torch.cat([x[:, :1], atoms], dim=1)

        if return_intermediates:
            inter["emb_layer_norm_in"] = x
        if self.emb_layer_norm is not None:
            x = self.emb_layer_norm(x)
        if return_intermediates:
            inter["emb_layer_norm_out"] = x
        x = dropout(x, self.dropout, self.training)

        extra: Dict[str, object] = {
            "padding_mask": padding_mask,
            "mode_choice": mode_choice,
        }
        if not fast:
            layer_bias = attn_bias
            x = x.transpose(0, 1)  # [T, B, D]
            inner_states = [x]
            for layer in self.layers:
                x = layer(x, attn_bias=layer_bias, key_padding_mask=padding_mask)
                inner_states.append(x)
        else:
            # -inf on padded keys once, instead of a key_padding_mask in every layer;
            # cast once to the attention dtype (autocast would cast in every layer).
            pad_keys = padding_mask[:, None, None, :]
            layer_bias = attn_bias.masked_fill(pad_keys, float("-inf"))
            if plan is not None:
                packing = TokenPacking.from_plan(plan, n_mol, n_atoms + 1)
            else:
                packing = TokenPacking.from_padding_mask(padding_mask)
            xs = packing.pack(x)  # [M, D]
            attn_dtype = _attention_dtype(xs)
            bias_in = layer_bias.to(attn_dtype)
            if return_all_hiddens:
                inner_states = [packing.unpack(xs).transpose(0, 1)]
                scales = self.droppath_scales(packing, xs.dtype)
                qkvs = self.qkv_parameters()
                for layer, layer_scales, qkv in zip(self.layers, scales, qkvs):
                    xs = layer.forward_packed(xs, bias_in, packing, layer_scales, qkv)
                    inner_states.append(packing.unpack(xs).transpose(0, 1))  # [T, B, D]
            else:
                run = self.run_layers if self.torch_compile == "none" else self._compiled_layers()
                xs = run(xs, bias_in, packing.flat_index, packing.batch_index,
                         packing.token_index, packing.gather_index, packing.spread_index)
                inner_states = [packing.unpack(xs).transpose(0, 1)]  # [T, B, D]
            x = inner_states[-1]
            extra.update(packing=packing, last_packed=xs)
        if not return_all_hiddens:
            inner_states = inner_states[-1:]
        if return_intermediates:
            inter["layer_attn_bias"] = layer_bias

        atom_output = None
        if delta_pos is not None and self.atom_proc is not None:
            atom_bias = layer_bias[:, :, 1:, 1:]  # [B, H, N, N]
            if fast:
                atom_spread = packing.spread_index.view(n_mol, n_atoms + 1)[:, 1:].reshape(-1)
                atom_output = self.atom_proc.forward_packed(xs, atom_spread, atom_bias, delta_pos)
            else:
                atom_output = self.atom_proc(x[1:], atom_bias, delta_pos)  # [B, N, 3]
            if return_intermediates:
                inter["atom_proc_raw"] = atom_output
            if mode_choice is not None:  # kept for 3D-only molecules: mask_2d == 0
                only_3d = torch.rsub(cast(mask_2d, atom_output.dtype), 1.0)  # [B]
                atom_output = atom_output * only_3d.view(-1, 1, 1)

        if return_intermediates:
            inter.update(mask_2d=mask_2d, mask_3d=mask_3d)
            extra["intermediates"] = inter
        return inner_states, atom_output, extra


def _attention_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the attention runs in: autocast's for ``x``'s device, if on, else x's."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype
