"""Registered fairseq models and architectures."""
from .transformer_m import TransformerMConfig, TransformerMModel
from .geomformer import GeoMFormerConfig, GeoMFormerModel  # noqa: F401  (GeoMFormer)
from .gsrd import GsrdConfig, GsrdModel  # noqa: F401  (3D-GSRD)

__all__ = ["TransformerMConfig", "TransformerMModel"]
