"""Registered fairseq models and architectures."""
from .transformer_m import TransformerMConfig, TransformerMModel

__all__ = ["TransformerMConfig", "TransformerMModel"]
