"""fairseq model ``gsrd`` (3D-GSRD, NeurIPS 2025) and its presets ``gsrd_base`` and ``gsrd_small``.

One model class, two shapes chosen from the task: with ``gsrd_pretrain`` it is the masked graph
auto-encoder (3D-ReTrans encoder, 2D encoder, selective re-mask decoding, structure-independent
decoder, coordinate and denoising heads); with ``gsrd_md17`` / ``gsrd_qm9`` it is the 3D-ReTrans
encoder plus one property head (scalar sum, dipole or spatial extent). The encoder's state-dict
keys are ``encoder.*`` in both, so ``--pretrained-encoder`` loads a pre-training checkpoint.

Fidelity (spec ``gsrd.md`` §B12.5, §B3): ``--physical`` selects the physically correct encoder
(no coordinates in the node input, isotropic LayerScale, isotropic distance epsilon, no message
cutoff anywhere): energies are then exactly invariant and forces equivariant. Without it the
published quirks are reproduced; each can also be set on its own.
"""

import logging
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.models import BaseFairseqModel, register_model, register_model_architecture
from fairseq.utils import safe_getattr

from transformer_m.modules.gsrd import (
    DipoleHead,
    EquivariantVectorOutput,
    Graph2DEncoder,
    ReTransEncoder,
    ScalarHead,
    SpatialExtentHead,
    StructureFreeDecoder,
)

logger = logging.getLogger(__name__)

ENCODER_PREFIX = "encoder."
# prefixes of encoder weights in other checkpoints: ours, Lightning without / with torch.compile
FOREIGN_PREFIXES = ("encoder.", "model.encoder.", "model._orig_mod.encoder.")


@dataclass
class GsrdConfig(FairseqDataclass):
    encoder_layers: int = field(default=8, metadata={"help": "3D-ReTrans blocks (MD17 published: 12)"})
    encoder_embed_dim: int = field(default=256, metadata={"help": "hidden size d"})
    encoder_attention_heads: int = field(default=8, metadata={"help": "heads"})
    encoder_node_hidden: int = field(default=1024, metadata={"help": "node-embedding MLP width"})
    num_rbf: int = field(default=64, metadata={"help": "ExpNormal RBF count"})
    rbf_cutoff: float = field(default=5.0, metadata={"help": "RBF / cosine cutoff (Å)"})
    attn_activation: ChoiceEnum(["silu", "softmax"]) = field(default="silu", metadata={"help": "3D attention"})
    encoder_2d_layers: int = field(default=8, metadata={"help": "2D encoder blocks"})
    encoder_2d_embed_dim: int = field(default=64, metadata={"help": "2D encoder width"})
    encoder_2d_attention_heads: int = field(default=4, metadata={"help": "2D encoder heads"})
    encoder_2d_edge_dim: int = field(default=16, metadata={"help": "2D encoder edge width"})
    decoder_layers: int = field(default=2, metadata={"help": "structure-independent decoder blocks"})
    physical: bool = field(
        default=False,
        metadata={"help": "physically correct encoder: implies --no-concat-pos, --isotropic-layerscale, "
                  "--isotropic-dist-eps and --msg-cutoff never"},
    )
    no_concat_pos: bool = field(
        default=False, metadata={"help": "do not concatenate raw coordinates to the node input (published: concatenated)"}
    )
    isotropic_layerscale: bool = field(
        default=False, metadata={"help": "one vector LayerScale factor per channel (published: per xyz and channel)"}
    )
    isotropic_dist_eps: bool = field(
        default=False, metadata={"help": "d = sqrt(|r|^2 + eps) (published: 1e-5 added per component)"}
    )
    msg_cutoff: ChoiceEnum(["pretrain", "always", "never"]) = field(
        default="pretrain",
        metadata={"help": "cosine cutoff on scalar messages: 'pretrain' = only in pre-training (published)"},
    )
    train_2d_head: bool = field(
        default=False,
        metadata={"help": "also distil the decoder-side 2D projection (published: it gets no gradient)"},
    )
    head: ChoiceEnum(["auto", "scalar", "dipole", "spatial_extent"]) = field(
        default="auto", metadata={"help": "fine-tuning head; auto = from the QM9 target (scalar otherwise)"}
    )
    pretrained_encoder: str = field(
        default="", metadata={"help": "checkpoint whose encoder.* weights initialise the encoder"}
    )
    min_loaded_fraction: float = field(
        default=0.5,
        metadata={"help": "fail when fewer than this fraction of the encoder's tensors load from "
                  "--pretrained-encoder (always fails at zero)"},
    )


def _switches(cfg):
    phys = cfg.physical
    cutoff = "never" if phys else cfg.msg_cutoff
    return dict(
        concat_pos=not (phys or cfg.no_concat_pos),
        aniso_layerscale=not (phys or cfg.isotropic_layerscale),
        dist_eps_isotropic=phys or cfg.isotropic_dist_eps,
        cutoff_mode=cutoff,
    )


@register_model("gsrd", dataclass=GsrdConfig)
class GsrdModel(BaseFairseqModel):
    def __init__(self, cfg: GsrdConfig, pretrain: bool, head: str = "scalar"):
        super().__init__()
        sw = _switches(cfg)
        self.pretrain = pretrain
        self.train_2d_head = cfg.train_2d_head
        self.switches = sw
        msg_cutoff = sw["cutoff_mode"] == "always" or (sw["cutoff_mode"] == "pretrain" and pretrain)
        d = cfg.encoder_embed_dim
        self.encoder = ReTransEncoder(
            num_layers=cfg.encoder_layers, dim=d, heads=cfg.encoder_attention_heads,
            num_rbf=cfg.num_rbf, cutoff=cfg.rbf_cutoff, node_hidden=cfg.encoder_node_hidden,
            concat_pos=sw["concat_pos"], msg_cutoff=msg_cutoff,
            aniso_layerscale=sw["aniso_layerscale"], dist_eps_isotropic=sw["dist_eps_isotropic"],
            attn_activation=cfg.attn_activation,
        )
        if pretrain:
            self.encoder_2d = Graph2DEncoder(
                cfg.encoder_2d_layers, cfg.encoder_2d_embed_dim, cfg.encoder_2d_attention_heads,
                cfg.encoder_2d_edge_dim, out_dim=d,
            )
            if not cfg.train_2d_head:  # published: a fixed random projection (never trained)
                self.encoder_2d.head.requires_grad_(False)
            self.decoder_mask_token = nn.Parameter(torch.randn(d))
            self.decoder = StructureFreeDecoder(cfg.decoder_layers, d, cfg.encoder_attention_heads)
            self.coordinate_head = EquivariantVectorOutput(d)
            self.denoising_head = EquivariantVectorOutput(d)
        else:
            heads = {"scalar": ScalarHead, "dipole": DipoleHead, "spatial_extent": SpatialExtentHead}
            self.head_type = head
            self.head = heads[head](d)
        self.register_buffer("target_mean", torch.zeros(()))
        self.register_buffer("target_std", torch.ones(()))

    # ------------------------------------------------------------------------------------------
    @classmethod
    def build_model(cls, cfg: GsrdConfig, task):
        pretrain = bool(getattr(task, "pretrain", False))
        head = cfg.head
        if head == "auto":
            target = getattr(getattr(task, "cfg", None), "target", None)
            head = {"dipole_moment": "dipole", "electronic_spatial_extent": "spatial_extent"}.get(
                str(target), "scalar")
        model = cls(cfg, pretrain=pretrain, head=head)
        n = sum(p.numel() for p in model.parameters())
        logger.info("gsrd (%s, switches %s): %d parameters",
                    "pre-training" if pretrain else f"fine-tuning, head {head}", model.switches, n)
        if cfg.pretrained_encoder and not getattr(task, "building_from_checkpoint", False):
            model.load_pretrained_encoder(cfg.pretrained_encoder, cfg.min_loaded_fraction)
        return model

    def set_target_statistics(self, mean: float, std: float):
        self.target_mean.fill_(float(mean))
        self.target_std.fill_(float(std))
        logger.info("target standardisation: mean %.6g, std %.6g", mean, std)

    def load_pretrained_encoder(self, path: str, min_fraction: float = 0.5) -> dict:
        """Copy encoder weights from a checkpoint; report and check how many loaded (§B12.1).

        Accepts fairseq checkpoints (``{"model": state}``) and Lightning ones (``state_dict`` with
        ``model.encoder.`` or ``model._orig_mod.encoder.`` keys). Raises ``RuntimeError`` when no
        tensor (or less than ``min_fraction`` of the encoder's tensors) loads.
        """
        from transformer_m.checkpoint import load_checkpoint_file

        state = load_checkpoint_file(path, what="--pretrained-encoder")  # weights only
        if isinstance(state, dict) and "model" in state:
            state = state["model"]
        elif isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        report = load_encoder_state(self.encoder, state)
        own = len(self.encoder.state_dict())
        logger.info(
            "pretrained encoder %s: loaded %d/%d tensors (%d parameters) from prefix %r; "
            "shape mismatch %d, missing %d, e.g. %s",
            path, report["loaded"], own, report["loaded_params"], report["prefix"],
            len(report["mismatched"]), len(report["missing"]), report["missing"][:5],
        )
        print(f"| gsrd: loaded {report['loaded']}/{own} encoder tensors "
              f"({report['loaded_params']} parameters) from {path}", flush=True)
        if report["loaded"] == 0 or report["loaded"] < min_fraction * own:
            raise RuntimeError(
                f"--pretrained-encoder {path}: only {report['loaded']} of {own} encoder tensors "
                f"loaded (prefixes tried: {FOREIGN_PREFIXES}; mismatched shapes: "
                f"{report['mismatched'][:5]}). Refusing to fine-tune from an unloaded encoder."
            )
        self.pretrained_report = report
        return report

    # ------------------------------------------------------------------------------------------
    def forward(self, batch, pos=None):
        from transformer_m.tasks.gsrd import ATOM_FEAT, BOND, POS_MASK

        pos = batch["pos"] if pos is None else pos
        feat, bond, mask = batch[ATOM_FEAT], batch[BOND], batch["atom_mask"]
        if not self.pretrain:
            h, v = self.encoder(feat, pos, bond, mask)
            out = self.head(h, v, pos, batch["z"], mask)
            return {"pred": out * self.target_std + self.target_mean, "pred_std": out, "h": h, "v": v,
                    "mask": mask}
        masked = batch[POS_MASK] & mask
        visible = mask & ~masked
        h, v = self.encoder(feat, pos, bond, visible)
        rep_2d, h_2d = self.encoder_2d(feat, bond, mask)
        # selective re-mask decoding: masked atoms -> learnable token; + stop-grad 2D representation
        h_dec = torch.where(masked.unsqueeze(-1), self.decoder_mask_token.to(h.dtype), h)
        h_dec = h_dec + h_2d.detach()
        v_dec = v * visible.to(v.dtype).view(*visible.shape, 1, 1)
        hd, vd = self.decoder(h_dec, v_dec, mask)
        return {
            "h": h, "v": v, "rep_2d": rep_2d, "h_2d": h_2d, "visible": visible, "masked": masked,
            "coord": self.coordinate_head(hd, vd), "noise": self.denoising_head(hd, vd), "mask": mask,
        }

    def max_positions(self):
        return None


def load_encoder_state(encoder: nn.Module, state: dict) -> dict:
    """Load the matching tensors of ``state`` into ``encoder``; the prefix with most hits wins."""
    own = encoder.state_dict()
    best = None
    for prefix in FOREIGN_PREFIXES:
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        ok = {k: v for k, v in sub.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
        if best is None or len(ok) > len(best[1]):
            mism = [k for k, v in sub.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
            best = (prefix, ok, mism)
    prefix, ok, mism = best
    if ok:
        encoder.load_state_dict(ok, strict=False)
    return {
        "prefix": prefix, "loaded": len(ok), "loaded_params": int(sum(v.numel() for v in ok.values())),
        "mismatched": mism, "missing": sorted(set(own) - set(ok)),
    }


def _fill(args, **defaults):
    """Set each attribute only if the user did not (presets never override a flag)."""
    for name, value in defaults.items():
        setattr(args, name, safe_getattr(args, name, value))


@register_model_architecture("gsrd", "gsrd_base")
def gsrd_base(args):
    """Published defaults (spec §B9): encoder 8 x d256 H8 (RBF 64, 5 Å), 2D encoder 8 x d64 H4,
    decoder 2 blocks, SiLU attention."""
    _fill(
        args,
        encoder_layers=8, encoder_embed_dim=256, encoder_attention_heads=8, encoder_node_hidden=1024,
        num_rbf=64, rbf_cutoff=5.0, attn_activation="silu", encoder_2d_layers=8,
        encoder_2d_embed_dim=64, encoder_2d_attention_heads=4, encoder_2d_edge_dim=16,
        decoder_layers=2,
    )


@register_model_architecture("gsrd", "gsrd_small")
def gsrd_small(args):
    """CPU-sized: encoder 4 x d64 H4 (RBF 32), 2D encoder 2 x d32 H4, decoder 2 blocks."""
    _fill(
        args,
        encoder_layers=4, encoder_embed_dim=64, encoder_attention_heads=4, encoder_node_hidden=128,
        num_rbf=32, encoder_2d_layers=2, encoder_2d_embed_dim=32, encoder_2d_attention_heads=4,
        encoder_2d_edge_dim=8,
    )
    gsrd_base(args)
