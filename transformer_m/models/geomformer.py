"""fairseq model ``geomformer`` (GeoMFormer, ICML 2024) and its presets ``geomformer_base`` and
``geomformer_small``. The network lives in :mod:`transformer_m.modules.geomformer`."""

import logging
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
import torch.nn as nn
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.models import BaseFairseqModel, register_model, register_model_architecture
from fairseq.utils import safe_getattr

from graphormer_ext.data import keys
from graphormer_ext.sources.nbody import VEL  # batch key of N-body velocities [B, N, 3]
from transformer_m.checkpoint import CHECKPOINT_DEFAULT
from transformer_m.modules.geomformer import (
    GEOMFORMER_GBF_STD_OFFSET,
    LEGACY_GBF_STD_OFFSET,
    EquivariantHead,
    GeoMFormerEncoder,
    InvariantHead,
)

logger = logging.getLogger(__name__)

@dataclass
class GeoMFormerConfig(FairseqDataclass):
    encoder_layers: int = field(default=8, metadata={"help": "number of GeoMFormer blocks"})
    encoder_embed_dim: int = field(default=512, metadata={"help": "hidden width d"})
    encoder_ffn_embed_dim: int = field(default=512, metadata={"help": "FFN width d_ff"})
    encoder_attention_heads: int = field(default=32, metadata={"help": "attention heads H"})
    num_kernel: int = field(default=128, metadata={"help": "Gaussian basis kernels K"})
    num_atom_types: int = field(
        default=128, metadata={"help": "atom-type vocabulary (atomic number; 0 = padding)"}
    )
    dropout: float = field(default=0.0, metadata={"help": "residual dropout (invariant stream)"})
    attention_dropout: float = field(default=0.1, metadata={"help": "attention-probability dropout"})
    act_dropout: float = field(default=0.1, metadata={"help": "dropout after the FFN activation"})
    head_dropout: float = field(default=0.0, metadata={"help": "dropout before the energy MLP"})
    vec_init: ChoiceEnum(["relative", "centered"]) = field(
        default="relative",
        metadata={"help": "equivariant-stream init: relative = sum_j u_ij (x) GBF_ij W; "
                  "centered = centred position (x) node-GBF W (spec §A2.4)"},
    )
    cross_attn_mode: ChoiceEnum(["parallel", "alternate"]) = field(
        default="parallel",
        metadata={"help": "parallel: all four attentions in every block (paper); alternate: "
                  "self-attention in even blocks, cross-attention in odd blocks (SFM code)"},
    )
    no_linear_bias: bool = field(
        default=False, metadata={"help": "no biases on the invariant linear maps either"}
    )
    eln_eps: float = field(default=1e-5, metadata={"help": "ELN regulariser eps (times I)"})
    eln_shrink: float = field(
        default=1.0,
        metadata={"help": "ELN isotropic shrinkage: C + (eps + shrink * tr(C)/3) I bounds the "
                  "whitening gain so that fp32 rounding along a degenerate direction (planar "
                  "or linear structures) is not amplified; 0 = the plain eps I of the spec"},
    )
    eln_iters: int = field(
        default=10,
        metadata={"help": "Newton-Schulz iterations for C^-1/2 (converged for shrink >= 0.1; "
                  "use ~30 with shrink 0)"},
    )
    eln_anisotropic: bool = field(
        default=False,
        metadata={"help": "published eps*diag(1,2,3) regulariser (NOT equivariant; for study only)"},
    )
    gbf_std_offset: float = field(
        default=GEOMFORMER_GBF_STD_OFFSET,
        metadata={"help": "narrowest Gaussian-basis width, sigma_k = |s_k| + offset (units of "
                  "2 x distance at init). 1e-5 = SFM / Graphormer-3D: near-zero widths make "
                  "-dE/dR spike (see docs/reproduction.md)",
                  CHECKPOINT_DEFAULT: LEGACY_GBF_STD_OFFSET},
    )
    energy_head_init: ChoiceEnum(["zero", "default"]) = field(
        default="zero",
        metadata={"help": "output layer of the energy head: zero = the untrained model predicts "
                  "the train mean and zero forces; default = nn.Linear init (a per-atom offset "
                  "multiplied by the atom count)",
                  CHECKPOINT_DEFAULT: "default"},
    )
    readout: ChoiceEnum(["sum", "mean"]) = field(
        default="sum", metadata={"help": "energy readout over atoms"}
    )
    force_mode: ChoiceEnum(["grad", "direct", "none"]) = field(
        default="grad",
        metadata={"help": "forces as -dE/dR (autograd, create_graph while training) or directly "
                  "from the equivariant head"},
    )
    use_velocity: bool = field(
        default=False, metadata={"help": "feed per-atom velocities (batch key 'vel'; N-body)"}
    )
    max_nodes: int = field(default=512, metadata={"help": "max atoms per molecule"})


class GeoMFormerNet(nn.Module):
    """Encoder + invariant (energy) head + equivariant (vector) head.

    ``forward(batch, force_mode)`` with ``batch`` holding ``z`` int64 [B, N] (0 = pad), ``pos``
    [B, N, 3], optional ``atom_mask`` bool [B, N] (default ``z > 0``) and ``vel`` [B, N, 3], returns
    a dict:

    - ``energy`` [B]: invariant readout;
    - ``vector`` [B, N, 3]: equivariant head (0 on padding);
    - ``forces`` [B, N, 3]: ``-dE/dR`` (``grad``) or ``vector`` (``direct``); absent for ``none``;
    - ``pos_pred`` [B, N, 3] (only with velocities): ``pos + vel * s_i + vector`` with an
      invariant per-atom scalar ``s_i`` (N-body position prediction; translation-equivariant).
    """

    def __init__(self, encoder: GeoMFormerEncoder, dim: int, head_dropout: float = 0.0,
                 readout: str = "sum", force_mode: str = "grad", energy_head_zero_init: bool = False):
        super().__init__()
        self.encoder = encoder
        self.energy_head = InvariantHead(dim, head_dropout, readout, energy_head_zero_init)
        self.vector_head = EquivariantHead(dim)
        self.force_mode = force_mode
        if encoder.use_velocity:
            self.vel_scale_head = nn.Linear(dim, 1)

    def forward(self, batch: Dict[str, torch.Tensor],
                force_mode: Optional[str] = None) -> Dict[str, torch.Tensor]:
        force_mode = self.force_mode if force_mode is None else force_mode
        z = batch[keys.Z]
        pos = batch[keys.POS]
        mask = batch.get(keys.ATOM_MASK)
        if mask is None:
            mask = z > 0
        vel = batch.get(VEL)
        want_grad = force_mode == "grad"
        with torch.set_grad_enabled(torch.is_grad_enabled() or want_grad):
            if want_grad:
                pos = pos.detach().to(self.energy_head.fc1.weight.dtype).requires_grad_(True)
            x, vec = self.encoder(z, pos, mask, vel)
            energy = self.energy_head(x, mask)
            m = mask.unsqueeze(-1).to(x.dtype)
            vector = self.vector_head(vec) * m
            out = {"energy": energy, "vector": vector}
            if want_grad:
                (grad,) = torch.autograd.grad(
                    energy.sum(), pos, create_graph=self.training, retain_graph=self.training
                )
                out["forces"] = -grad * m
            elif force_mode == "direct":
                out["forces"] = vector
        if not self.training and want_grad:
            out = {k: v.detach() for k, v in out.items()}
        if vel is not None and self.encoder.use_velocity:
            scale = self.vel_scale_head(x).to(vector.dtype)  # [B, N, 1], invariant
            out["pos_pred"] = (batch[keys.POS].to(vector.dtype) + vel.to(vector.dtype) * scale
                               + vector) * m
        return out


def build_geomformer_net(cfg) -> GeoMFormerNet:
    encoder = GeoMFormerEncoder(
        num_layers=cfg.encoder_layers,
        dim=cfg.encoder_embed_dim,
        ffn_dim=cfg.encoder_ffn_embed_dim,
        heads=cfg.encoder_attention_heads,
        num_kernels=cfg.num_kernel,
        num_atom_types=cfg.num_atom_types,
        dropout=cfg.dropout,
        attention_dropout=cfg.attention_dropout,
        activation_dropout=cfg.act_dropout,
        bias=not cfg.no_linear_bias,
        cross_attn_mode=str(cfg.cross_attn_mode),
        vec_init=str(cfg.vec_init),
        eln_eps=cfg.eln_eps,
        eln_isotropic=not cfg.eln_anisotropic,
        eln_iters=cfg.eln_iters,
        eln_shrink=cfg.eln_shrink,
        use_velocity=cfg.use_velocity,
        # configs saved before these fields existed keep the behaviour they were trained with
        gbf_std_offset=safe_getattr(cfg, "gbf_std_offset", LEGACY_GBF_STD_OFFSET),
    )
    zero_head = str(safe_getattr(cfg, "energy_head_init", "default")) == "zero"
    return GeoMFormerNet(encoder, cfg.encoder_embed_dim, cfg.head_dropout, str(cfg.readout),
                         str(cfg.force_mode), zero_head)


@register_model("geomformer", dataclass=GeoMFormerConfig)
class GeoMFormerModel(BaseFairseqModel):
    """GeoMFormer in fairseq; ``forward(batched_data)`` returns :class:`GeoMFormerNet`'s dict."""

    def __init__(self, net: GeoMFormerNet, max_nodes: int = 512):
        super().__init__()
        self.net = net
        self.max_nodes = max_nodes

    @classmethod
    def build_model(cls, cfg: GeoMFormerConfig, task):
        if getattr(task, "needs_velocity", False) and not cfg.use_velocity:
            logger.info("task %s feeds velocities: enabling --use-velocity", type(task).__name__)
            cfg.use_velocity = True
        model = cls(build_geomformer_net(cfg), max_nodes=cfg.max_nodes)
        logger.info("GeoMFormer: %d parameters", sum(p.numel() for p in model.parameters()))
        return model

    def forward(self, batched_data, **kwargs):
        return self.net(batched_data, **kwargs)

    def max_positions(self):
        return self.max_nodes


def _fill(args, **defaults):
    """Set each attribute only if the user did not (presets never override a flag)."""
    for name, value in defaults.items():
        setattr(args, name, safe_getattr(args, name, value))


@register_model_architecture("geomformer", "geomformer_base")
def geomformer_base(args):
    """PCQM4Mv2 model of the paper (spec §A10): L8 d512 d_ff512 H32 K128, attn-dropout 0.1."""
    _fill(
        args,
        encoder_layers=8, encoder_embed_dim=512, encoder_ffn_embed_dim=512,
        encoder_attention_heads=32, num_kernel=128, dropout=0.0, attention_dropout=0.1,
        act_dropout=0.1, vec_init="relative", cross_attn_mode="parallel",
    )


@register_model_architecture("geomformer", "geomformer_small")
def geomformer_small(args):
    """CPU-sized: L4 d128 d_ff128 H8 K32 (same structure as base)."""
    _fill(
        args,
        encoder_layers=4, encoder_embed_dim=128, encoder_ffn_embed_dim=128,
        encoder_attention_heads=8, num_kernel=32, attention_dropout=0.0, act_dropout=0.0,
    )
    geomformer_base(args)


@register_model_architecture("geomformer", "geomformer_tiny")
def geomformer_tiny(args):
    """Test-sized: L2 d32 d_ff32 H4 K16."""
    _fill(
        args,
        encoder_layers=2, encoder_embed_dim=32, encoder_ffn_embed_dim=32,
        encoder_attention_heads=4, num_kernel=16,
    )
    geomformer_small(args)
