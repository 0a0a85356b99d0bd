"""fairseq model ``Transformer-M`` and its presets ``transformer_m``, ``transformer_m_base``,
``transformer_m_small``. This file only maps config to :class:`TransformerMNet` arguments."""

import logging
from dataclasses import dataclass, field

import torch
from fairseq import utils
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.models import BaseFairseqModel, register_model, register_model_architecture
from fairseq.utils import safe_getattr
from omegaconf import II

from graphormer_ext.data import keys
from transformer_m.modules import TransformerMNet
from transformer_m.modules.precision import autocast_bf16

logger = logging.getLogger(__name__)


@dataclass
class TransformerMConfig(FairseqDataclass):
    encoder_layers: int = field(default=12, metadata={"help": "number of layers L"})
    encoder_embed_dim: int = field(default=768, metadata={"help": "hidden size D"})
    encoder_ffn_embed_dim: int = field(default=768, metadata={"help": "FFN width"})
    encoder_attention_heads: int = field(default=32, metadata={"help": "attention heads H"})
    dropout: float = field(default=0.0, metadata={"help": "hidden dropout"})
    attention_dropout: float = field(default=0.1, metadata={"help": "attention dropout"})
    act_dropout: float = field(default=0.1, metadata={"help": "dropout after the FFN activation"})
    droppath_prob: float = field(
        default=0.0, metadata={"help": "stochastic depth, linear over layers from 0"}
    )
    legacy_droppath: bool = field(
        default=False,
        metadata={"help": "drop whole token positions across the batch (released quirk) instead "
                  "of whole molecules"},
    )
    activation_fn: ChoiceEnum(utils.get_available_activation_fns()) = field(
        default="gelu", metadata={"help": "activation function"}
    )
    # bool fields default to False: fairseq turns a True default into a `store_false` flag, so
    # `--apply-init` would switch the option *off*. The presets set both (base: True).
    encoder_normalize_before: bool = field(
        default=False,
        metadata={"help": "LayerNorm on the input embeddings (emb_layer_norm); "
                  "transformer_m_base sets it"},
    )
    apply_init: bool = field(
        default=False,
        metadata={"help": "BERT-style N(0, 0.02) initialisation of the release; "
                  "transformer_m_base sets it"},
    )
    add_3d: bool = field(default=False, metadata={"help": "build the 3D (Gaussian distance) channel"})
    no_2d: bool = field(default=False, metadata={"help": "drop the degree/SPD/path-edge encodings"})
    num_3d_bias_kernel: int = field(default=128, metadata={"help": "Gaussian basis kernels K"})
    mode_prob: str = field(
        default="0.2,0.2,0.6",
        metadata={"help": "training-mode probabilities p(2D+3D),p(2D),p(3D); must sum to 1"},
    )
    remove_head: bool = field(
        default=False, metadata={"help": "fine-tuning head proj_out instead of the pre-training head"}
    )
    atom_head_dropout: float = field(
        default=0.1, metadata={"help": "attention dropout of the denoising head (0.1 in the release)"}
    )
    implementation: ChoiceEnum(["fast", "reference"]) = field(
        default="fast",
        metadata={"help": "fast: fused attention and folded edge bias; reference: the release's "
                  "computation (numerically equivalent, slower)"},
    )
    sandwich_ln: bool = field(default=False, metadata={"help": "Pre-LN plus sublayer LayerNorms"})
    bf16_autocast: bool = field(
        default=False,
        metadata={"help": "run the model under torch.autocast(bfloat16) with float32 weights "
                  "and optimizer (mixed precision for GPUs with bf16; fairseq's own --bf16 "
                  "means TPU). Not with --fp16"},
    )
    torch_compile: ChoiceEnum(["none", "default", "reduce-overhead"]) = field(
        default="none",
        metadata={"help": "torch.compile the fast path's layer stack (dynamic shapes); "
                  "reduce-overhead adds CUDA graphs (use --pack-multiple and --pad-to-multiple "
                  "for few shapes). Compiles on the first batches"},
    )
    num_classes: int = II("task.num_classes")
    num_atoms: int = II("task.num_atoms")
    num_edges: int = II("task.num_edges")
    num_in_degree: int = II("task.num_in_degree")
    num_out_degree: int = II("task.num_out_degree")
    num_spatial: int = II("task.num_spatial")
    num_edge_dis: int = II("task.num_edge_dis")
    multi_hop_max_dist: int = II("task.multi_hop_max_dist")
    edge_type: str = II("task.edge_type")
    max_nodes: int = II("task.max_nodes")


@register_model("Transformer-M", dataclass=TransformerMConfig)
class TransformerMModel(BaseFairseqModel):
    """Transformer-M (Luo et al., ICLR 2023) in fairseq; see :class:`TransformerMNet`.

    ``forward(batched_data)`` returns ``(logits [B, N+1, C], atom_output [B, N, 3] | None, extra)``;
    ``logits[:, 0]`` is the molecule prediction. State-dict keys equal the released checkpoints'.
    """

    def __init__(self, net: TransformerMNet, max_nodes: int = 512, bf16_autocast: bool = False):
        super().__init__()
        self.encoder = net.encoder  # keys "encoder.*", as in the released checkpoints
        self.max_nodes = max_nodes
        self.bf16_autocast = bool(bf16_autocast)
        self._update_listeners = None

    @classmethod
    def build_model(cls, cfg: TransformerMConfig, task):
        if cfg.num_classes != 1 and not cfg.remove_head:
            raise ValueError(
                f"--num-classes {cfg.num_classes} needs --remove-head: the pre-training head "
                "has one output (as in the release); --remove-head builds the fine-tuning head "
                "with --num-classes outputs"
            )
        if cfg.add_3d and cfg.num_3d_bias_kernel == cfg.encoder_embed_dim:
            logger.info("num_3d_bias_kernel == encoder_embed_dim: edge_proj is the identity")
        net = TransformerMNet(
            num_layers=cfg.encoder_layers,
            embed_dim=cfg.encoder_embed_dim,
            ffn_embed_dim=cfg.encoder_ffn_embed_dim,
            num_heads=cfg.encoder_attention_heads,
            num_3d_bias_kernel=cfg.num_3d_bias_kernel,
            add_3d=cfg.add_3d,
            no_2d=cfg.no_2d,
            dropout=cfg.dropout,
            attention_dropout=cfg.attention_dropout,
            act_dropout=cfg.act_dropout,
            droppath_prob=cfg.droppath_prob,
            activation_fn=cfg.activation_fn,
            encoder_normalize_before=cfg.encoder_normalize_before,
            apply_init=cfg.apply_init,
            mode_prob=cfg.mode_prob,
            remove_head=cfg.remove_head,
            num_classes=cfg.num_classes,
            num_atoms=cfg.num_atoms,
            num_edges=cfg.num_edges,
            num_in_degree=cfg.num_in_degree,
            num_out_degree=cfg.num_out_degree,
            num_spatial=cfg.num_spatial,
            num_edge_dis=cfg.num_edge_dis,
            multi_hop_max_dist=cfg.multi_hop_max_dist,
            edge_type=cfg.edge_type,
            sandwich_ln=cfg.sandwich_ln,
            legacy_droppath=cfg.legacy_droppath,
            atom_head_dropout=cfg.atom_head_dropout,
            implementation=cfg.implementation,
            torch_compile=cfg.torch_compile,
        )
        model = cls(net, max_nodes=cfg.max_nodes, bf16_autocast=cfg.bf16_autocast)
        logger.info("Transformer-M: %d parameters", sum(p.numel() for p in model.parameters()))
        return model

    def forward(self, batched_data, return_all_hiddens: bool = False, **kwargs):
        """Run the model; ``inner_states`` holds only the last layer's output unless
        ``return_all_hiddens`` (as fairseq's encoders do)."""
        if self.bf16_autocast:
            weight = self.encoder.lm_head_transform_weight.weight
            if weight.dtype != torch.float32:
                raise ValueError(
                    f"--bf16-autocast needs float32 weights, got {weight.dtype}: it runs the "
                    "model in bfloat16 itself; drop --fp16 / --bf16 / --memory-efficient-fp16"
                )
        with autocast_bf16(self.bf16_autocast, batched_data[keys.X].device):
            return self.encoder(batched_data, return_all_hiddens=return_all_hiddens, **kwargs)

    def train(self, mode: bool = True):
        """``nn.Module.train``, skipped when every submodule already is in ``mode``: fairseq
        calls it on every update, and the recursive walk over the ~165 modules of L12 costs
        ~0.7 ms of host time (a check of the flags ~0.2 ms)."""
        if all(m.training == mode for m in self.modules()):
            return self
        return super().train(mode)

    def set_num_updates(self, num_updates):
        """Pass the update count to the submodules that take it. fairseq calls this every
        update and its default walks all ~170 modules each time; the (usually empty) list
        of those that take it is made once."""
        if self._update_listeners is None:
            self._update_listeners = [
                m for m in self.modules() if m is not self and hasattr(m, "set_num_updates")
            ]
        for module in self._update_listeners:
            module.set_num_updates(num_updates)

    def max_positions(self):
        return self.max_nodes

    def upgrade_state_dict_named(self, state_dict, name):
        from transformer_m.modules.transformer_m_net import upgrade_state_dict_for_finetuning

        if self.encoder.remove_head:
            upgrade_state_dict_for_finetuning(state_dict, self.state_dict(), prefix=name)
        return super().upgrade_state_dict_named(state_dict, name)


def _fill(args, **defaults):
    """Set each attribute only if the user did not (presets never override a flag)."""
    for name, value in defaults.items():
        setattr(args, name, safe_getattr(args, name, value))


@register_model_architecture("Transformer-M", "transformer_m")
def base_architecture(args):
    """The release's ``transformer_m`` (its base_architecture): L6 D1024 FFN4096 H8, ReLU,
    no embedding LayerNorm, no BERT re-initialisation (used by its QM9 fine-tuning script)."""
    _fill(
        args,
        dropout=0.1, attention_dropout=0.1, act_dropout=0.0,
        encoder_ffn_embed_dim=4096, encoder_layers=6, encoder_attention_heads=8,
        encoder_embed_dim=1024, activation_fn="relu", encoder_normalize_before=False,
        apply_init=False, sandwich_ln=False, droppath_prob=0.0,
    )


@register_model_architecture("Transformer-M", "transformer_m_base")
def transformer_m_base(args):
    """The PCQM4Mv2 pre-training model: L12 D768 FFN768 H32, GELU, embedding LayerNorm, BERT init."""
    _fill(
        args,
        encoder_embed_dim=768, encoder_layers=12, encoder_attention_heads=32,
        encoder_ffn_embed_dim=768, activation_fn="gelu", encoder_normalize_before=True,
        apply_init=True, add_3d=False, num_3d_bias_kernel=128, no_2d=False,
        mode_prob="0.2,0.2,0.6",
    )
    base_architecture(args)


@register_model_architecture("Transformer-M", "transformer_m_small")
def transformer_m_small(args):
    """A CPU-sized variant for demos and tests: L4 D128 FFN256 H8 K32 (same structure as base)."""
    _fill(
        args,
        encoder_embed_dim=128, encoder_layers=4, encoder_attention_heads=8,
        encoder_ffn_embed_dim=256, num_3d_bias_kernel=32,
    )
    transformer_m_base(args)
