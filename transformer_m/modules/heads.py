"""Output heads of Transformer-M."""
import torch
import torch.nn as nn

from .utils import get_activation_fn


class ClassificationHead(nn.Module):
    """Fine-tuning head ``proj_out`` (``--remove-head``).

    Dropout, ``dense``, activation, dropout, ``out_proj``; applied to every token like
    the release (a fairseq RoBERTa-style head without pooling).

    Args:
        input_dim: D of the encoder output.
        inner_dim: width of ``dense``.
        num_classes: outputs of ``out_proj``.
        activation_fn: fairseq activation name (the release passes the model's).
        pooler_dropout: dropout before ``dense`` and before ``out_proj`` (release: 0).

    Shapes:
        features: [..., input_dim] -> [..., num_classes].
    """

    def __init__(
        self,
        *,
        input_dim: int,
        inner_dim: int,
        num_classes: int,
        activation_fn: str = "gelu",
        pooler_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.dense = nn.Linear(input_dim, inner_dim)
        self.activation_fn = get_activation_fn(activation_fn)
        self.dropout = nn.Dropout(p=pooler_dropout)
        self.out_proj = nn.Linear(inner_dim, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.dropout(features)
        x = self.activation_fn(self.dense(x))
        x = self.dropout(x)
        return self.out_proj(x)
