"""Plain ``nn.Module`` blocks of Transformer-M (no fairseq, no config objects)."""
from .droppath import DropPath
from .host_plan import PairIndex, add_host_plan, host_plan
from .heads import ClassificationHead
from .multihead_attention import MultiheadAttention, TokenPacking
from .transformer_m_encoder import MERGED_3D_FEATURE_SCALE, MoleculeEncoder
from .transformer_m_encoder_layer import TransformerMEncoderLayer
from .transformer_m_layers import (
    AtomFeature,
    AtomTaskHead,
    GaussianLayer,
    Molecule3DBias,
    MoleculeAttnBias,
    NonLinear,
    gaussian_basis,
)
from .transformer_m_net import (
    FINETUNE_DROP_PATTERNS,
    FINETUNE_FILL_KEYS,
    TransformerMEncoder,
    TransformerMNet,
    upgrade_state_dict_for_finetuning,
)
from .utils import (
    DEFAULT_MODE_PROB,
    IMPLEMENTATIONS,
    MODE_2D,
    MODE_2D_3D,
    MODE_3D,
    draw_mode_choice,
    get_activation_fn,
    init_feature_params,
    init_transformer_m_params,
    mode_masks,
    parse_mode_prob,
)

__all__ = [
    "AtomFeature",
    "AtomTaskHead",
    "ClassificationHead",
    "DEFAULT_MODE_PROB",
    "DropPath",
    "FINETUNE_DROP_PATTERNS",
    "FINETUNE_FILL_KEYS",
    "GaussianLayer",
    "IMPLEMENTATIONS",
    "MERGED_3D_FEATURE_SCALE",
    "MODE_2D",
    "MODE_2D_3D",
    "MODE_3D",
    "Molecule3DBias",
    "MoleculeAttnBias",
    "MoleculeEncoder",
    "MultiheadAttention",
    "NonLinear",
    "PairIndex",
    "TokenPacking",
    "TransformerMEncoder",
    "TransformerMEncoderLayer",
    "TransformerMNet",
    "add_host_plan",
    "draw_mode_choice",
    "gaussian_basis",
    "get_activation_fn",
    "host_plan",
    "init_feature_params",
    "init_transformer_m_params",
    "mode_masks",
    "parse_mode_prob",
    "upgrade_state_dict_for_finetuning",
]
