"""Transformer-M as one plain ``nn.Module`` with the released state-dict names."""
import logging
from typing import Dict, Mapping, MutableMapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from .heads import ClassificationHead
from .transformer_m_encoder import MoleculeEncoder
from .utils import ModeGenerator, get_activation_fn, init_transformer_m_params

logger = logging.getLogger(__name__)

# Checkpoint keys dropped when a pre-trained model is loaded for fine-tuning.
FINETUNE_DROP_PATTERNS = (
    "embed_out.weight",
    "sentence_projection_layer.weight",
    "lm_output_learned_bias",
    "node_proc",
    "proj_out.ln",
)
# Keys a pre-training checkpoint may lack; they are taken from the fresh model.
FINETUNE_FILL_KEYS = (
    "encoder.proj_out.dense.weight",
    "encoder.proj_out.dense.bias",
    "encoder.proj_out.out_proj.weight",
    "encoder.proj_out.out_proj.bias",
    "encoder.lm_head_transform_weight.weight",
    "encoder.lm_head_transform_weight.bias",
    "encoder.layer_norm.weight",
    "encoder.layer_norm.bias",
)


class TransformerMEncoder(nn.Module):
    """``encoder``: molecule encoder plus output head (released ``TransformerM``).

    Pre-training head (``remove_head=False``):
    ``embed_out(LN(act(lm_head_transform_weight(h)))) + lm_output_learned_bias`` with
    ``embed_out = Linear(D, 1, bias=False)`` (one output, as released). Fine-tuning
    head (``remove_head=True``): ``proj_out``, a :class:`ClassificationHead`;
    ``lm_head_transform_weight`` and ``layer_norm`` are still built (they are in the
    released fine-tuning state dict) but unused. Heads run on every token.

    Args:
        molecule_encoder: the :class:`MoleculeEncoder`.
        embed_dim: D.
        activation_fn: activation of both heads.
        remove_head: use ``proj_out`` instead of the pre-training head.
        num_classes: outputs of ``proj_out``.
    """

    def __init__(
        self,
        *,
        molecule_encoder: MoleculeEncoder,
        embed_dim: int,
        activation_fn: str,
        remove_head: bool = False,
        num_classes: int = 1,
    ) -> None:
        super().__init__()
        self.remove_head = bool(remove_head)
        self.molecule_encoder = molecule_encoder
        self.lm_head_transform_weight = nn.Linear(embed_dim, embed_dim)
        self.activation_fn = get_activation_fn(activation_fn)
        self.layer_norm = nn.LayerNorm(embed_dim)
        if self.remove_head:
            self.proj_out = ClassificationHead(
                input_dim=embed_dim,
                inner_dim=embed_dim,
                num_classes=num_classes,
                activation_fn=activation_fn,
            )
        else:
            self.lm_output_learned_bias = nn.Parameter(torch.zeros(1))
            self.embed_out = nn.Linear(embed_dim, 1, bias=False)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Apply the output head to hidden states [..., D] -> [..., C]."""
        if self.remove_head:
            return self.proj_out(h)
        h = self.layer_norm(self.activation_fn(self.lm_head_transform_weight(h)))
        return self.embed_out(h) + self.lm_output_learned_bias

    def forward(
        self,
        batched_data: Dict[str, torch.Tensor],
        mode_choice: Optional[torch.Tensor] = None,
        generator: Optional[ModeGenerator] = None,
        return_intermediates: bool = False,
        return_all_hiddens: bool = True,
    ):
        inner_states, atom_output, extra = self.molecule_encoder(
            batched_data,
            mode_choice=mode_choice,
            generator=generator,
            return_intermediates=return_intermediates,
            return_all_hiddens=return_all_hiddens,
        )
        packing = extra.pop("packing", None)
        last_packed = extra.pop("last_packed", None)
        if packing is not None:
            # Head on real tokens only; padded tokens get 0.
            logits = packing.unpack(self.head(last_packed))  # [B, T, C]
        else:
            logits = self.head(inner_states[-1].transpose(0, 1))  # [B, T, C]
        out = {"inner_states": inner_states}
        out.update(extra)
        return logits, atom_output, out


class TransformerMNet(nn.Module):
    """Transformer-M: one Transformer for 2D and 3D molecules.

    Reimplements Luo et al., "One Transformer Can Understand Both 2D & 3D Molecular
    Data" (ICLR 2023), faithful to the released code (lsj2408/Transformer-M @ 45647e1):
    2D channel (degree, SPD and multi-hop edge encodings), 3D channel (Gaussian basis
    kernels on pair distances), per-molecule training modes {2D+3D, 2D, 3D}, Post-LN
    layers, the 3D denoising head ``atom_proc`` and the pre-training or fine-tuning
    head. ``state_dict()`` names equal the released checkpoints'
    (``encoder.molecule_encoder.*``, ``encoder.lm_head_transform_weight.*``, ...).

    Batch keys read (:mod:`graphormer_ext.data.keys`): ``x``, ``in_degree``,
    ``out_degree``, ``attn_bias``, ``spatial_pos``, ``edge_input`` (``attn_edge_type``
    with ``edge_type="direct"``), and for the 3D channel ``pos`` (Å) and
    ``node_type_edge``.

    Defaults are those of the released modules; the paper's ``transformer_m_base``
    sets ``activation_fn="gelu"``, ``encoder_normalize_before=True`` and
    ``apply_init=True``.

    Args:
        num_layers: L.
        embed_dim: D.
        ffn_embed_dim: FFN width.
        num_heads: H.
        num_3d_bias_kernel: K Gaussian kernels.
        add_3d: build the 3D channel; it runs when some position is non-zero.
        no_2d: disable the degree, SPD and edge encodings.
        dropout: hidden dropout.
        attention_dropout: attention-probability dropout.
        act_dropout: dropout after the FFN activation.
        droppath_prob: stochastic depth, linear over layers from 0.
        activation_fn: fairseq activation name (``gelu`` = float32 erf GELU).
        encoder_normalize_before: ``emb_layer_norm`` on the input embeddings.
        apply_init: the release's ``init_params`` (N(0, 0.02), zero biases and padding
            rows). False: the modules' own inits (xavier attention, the intended
            Gaussian init, N(0, 0.02) feature tables).
        mode_prob: probabilities of {2D+3D, 2D, 3D} in training (None: no mode
            masking, as in the released QM9 encoder).
        remove_head: fine-tuning head ``proj_out`` instead of the pre-training head.
        num_classes: outputs of ``proj_out`` (the pre-training head has one output).
        num_atoms: atom-feature vocabulary.
        num_edges: bond-feature vocabulary.
        num_in_degree: in-degree vocabulary.
        num_out_degree: out-degree vocabulary.
        num_spatial: SPD vocabulary.
        num_edge_dis: number of per-hop edge matrices.
        multi_hop_max_dist: hops of the edge bias.
        edge_type: ``"multi_hop"`` or ``"direct"``.
        sandwich_ln: Pre-LN + sublayer LNs.
        legacy_droppath: per-token DropPath masks (released quirk), not per-molecule.
        atom_head: build ``atom_proc``. False, with ``remove_head``, ``no_2d`` and
            ``encoder_normalize_before=False``, gives the released QM9 layout.
        atom_head_dropout: attention dropout of ``atom_proc`` (0.1 in the release).
        implementation: ``"fast"`` (SDPA, packed tokens and pairs, folded edge bias)
            or ``"reference"`` (the released code's computation).
        torch_compile: ``torch.compile`` mode of the fast path's layer stack
            (``"none"``, ``"default"``, ``"reduce-overhead"`` = with CUDA graphs).

    Shapes:
        ``forward`` returns ``logits`` [B, N+1, C] (token 0 = graph prediction;
        padded tokens are 0 in the fast path), ``atom_output`` float32 [B, N, 3] or
        None, and a dict with ``inner_states`` (L+1 tensors [N+1, B, D]),
        ``padding_mask`` [B, N+1] and ``mode_choice``.
    """

    def __init__(
        self,
        *,
        num_layers: int,
        embed_dim: int,
        ffn_embed_dim: int,
        num_heads: int,
        num_3d_bias_kernel: int = 128,
        add_3d: bool = False,
        no_2d: bool = False,
        dropout: float = 0.1,
        attention_dropout: float = 0.1,
        act_dropout: float = 0.1,
        droppath_prob: float = 0.0,
        activation_fn: str = "relu",
        encoder_normalize_before: bool = False,
        apply_init: bool = False,
        mode_prob: Optional[Union[str, Sequence[float]]] = "0.2,0.2,0.6",
        remove_head: bool = False,
        num_classes: int = 1,
        num_atoms: int = 4608,
        num_edges: int = 1536,
        num_in_degree: int = 512,
        num_out_degree: int = 512,
        num_spatial: int = 512,
        num_edge_dis: int = 128,
        multi_hop_max_dist: int = 5,
        edge_type: str = "multi_hop",
        sandwich_ln: bool = False,
        legacy_droppath: bool = False,
        atom_head: bool = True,
        atom_head_dropout: float = 0.1,
        implementation: str = "fast",
        torch_compile: str = "none",
    ) -> None:
        super().__init__()
        molecule_encoder = MoleculeEncoder(
            num_atoms=num_atoms,
            num_in_degree=num_in_degree,
            num_out_degree=num_out_degree,
            num_edges=num_edges,
            num_spatial=num_spatial,
            num_edge_dis=num_edge_dis,
            edge_type=edge_type,
            multi_hop_max_dist=multi_hop_max_dist,
            num_layers=num_layers,
            embed_dim=embed_dim,
            ffn_embed_dim=ffn_embed_dim,
            num_heads=num_heads,
            dropout=dropout,
            attention_dropout=attention_dropout,
            act_dropout=act_dropout,
            activation_fn=activation_fn,
            encoder_normalize_before=encoder_normalize_before,
            sandwich_ln=sandwich_ln,
            droppath_prob=droppath_prob,
            legacy_droppath=legacy_droppath,
            add_3d=add_3d,
            num_3d_bias_kernel=num_3d_bias_kernel,
            no_2d=no_2d,
            mode_prob=mode_prob,
            atom_head=atom_head,
            atom_head_dropout=atom_head_dropout,
            implementation=implementation,
            torch_compile=torch_compile,
        )
        self.encoder = TransformerMEncoder(
            molecule_encoder=molecule_encoder,
            embed_dim=embed_dim,
            activation_fn=activation_fn,
            remove_head=remove_head,
            num_classes=num_classes,
        )
        self.apply_init = bool(apply_init)
        if self.apply_init:
            self.apply(init_transformer_m_params)

    @property
    def molecule_encoder(self) -> MoleculeEncoder:
        return self.encoder.molecule_encoder

    def forward(
        self,
        batched_data: Dict[str, torch.Tensor],
        mode_choice: Optional[torch.Tensor] = None,
        generator: Optional[ModeGenerator] = None,
        return_intermediates: bool = False,
        return_all_hiddens: bool = True,
    ):
        """Run the model on a collated batch.

        Args:
            batched_data: the collated batch.
            mode_choice: int64 [B] training modes (drawn with ``generator`` when None;
                ignored in eval mode).
            generator: numpy Generator / RandomState or torch Generator for the draw.
            return_intermediates: add ``intermediates`` (channel outputs) to the dict.
            return_all_hiddens: ``inner_states`` holds every layer's output (L+1
                tensors); False: the last one only (less work in the fast path).

        Returns:
            ``(logits [B, T, C], atom_output [B, N, 3] or None,
            {"inner_states": [...], "padding_mask": ..., "mode_choice": ...})``.
        """
        return self.encoder(
            batched_data,
            mode_choice=mode_choice,
            generator=generator,
            return_intermediates=return_intermediates,
            return_all_hiddens=return_all_hiddens,
        )

    def upgrade_state_dict_named(
        self, state_dict: MutableMapping[str, torch.Tensor], name: str = ""
    ) -> MutableMapping[str, torch.Tensor]:
        """Fine-tuning upgrade of a checkpoint, as released (only with ``remove_head``).

        Drops pre-training-only keys and copies any missing ``proj_out``,
        ``lm_head_transform_weight`` and ``layer_norm`` entries from this (freshly
        initialised) model, so that ``load_state_dict(strict=True)`` passes.

        Args:
            state_dict: checkpoint state dict, keys ``{name}.encoder...``; modified.
            name: prefix of this module's keys in ``state_dict`` ("" for a bare model).

        Returns:
            ``state_dict``.
        """
        if self.encoder.remove_head:
            fresh = self.state_dict()
            upgrade_state_dict_for_finetuning(state_dict, fresh, prefix=name)
        return state_dict


def upgrade_state_dict_for_finetuning(
    state_dict: MutableMapping[str, torch.Tensor],
    fresh_state_dict: Mapping[str, torch.Tensor],
    prefix: str = "",
) -> MutableMapping[str, torch.Tensor]:
    """Drop pre-training head keys and fill missing fine-tuning head keys (as released).

    Args:
        state_dict: checkpoint state dict, modified in place.
        fresh_state_dict: state dict of a freshly built ``remove_head`` model (keys
            ``encoder...``).
        prefix: prefix of the model's keys inside ``state_dict``.

    Returns:
        ``state_dict``.
    """
    dot = prefix + "." if prefix else ""
    for key in list(state_dict.keys()):
        if any(pattern in key for pattern in FINETUNE_DROP_PATTERNS):
            logger.info("Removing %s (fine-tuning head)", key)
            del state_dict[key]
    for key in FINETUNE_FILL_KEYS:
        if dot + key not in state_dict:
            logger.info("Copying %s (from model initialization)", key)
            state_dict[dot + key] = fresh_state_dict[key].detach().clone()
    return state_dict
