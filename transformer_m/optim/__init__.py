"""Registered fairseq optimizers."""
from .fused_adam import FusedAdam, FusedAdamConfig

__all__ = ["FusedAdam", "FusedAdamConfig"]
