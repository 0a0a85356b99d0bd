"""Stochastic depth (DropPath) for time-major ``T x B x C`` activations."""
import torch
import torch.nn as nn


class DropPath(nn.Module):
    """Drop a residual branch with probability ``prob``; kept ones scale by 1/(1-prob).

    By default the branch is dropped for whole molecules: the mask has shape
    ``(1, B, 1)`` on a ``T x B x C`` input. ``legacy_per_token=True`` reproduces the
    released Transformer-M / Graphormer quirk (spec §1.9): the mask is drawn with shape
    ``(x.shape[0], 1, 1)``, so whole *token positions* are dropped across the batch.

    Args:
        prob: drop probability; 0 makes the module the identity.
        legacy_per_token: use the released per-token mask shape.

    Shapes:
        x: [T, B, C] -> [T, B, C].
    """

    def __init__(self, prob: float = 0.0, *, legacy_per_token: bool = False) -> None:
        super().__init__()
        self.drop_prob = float(prob)
        self.legacy_per_token = bool(legacy_per_token)

    def mask_shape(self, x: torch.Tensor) -> tuple:
        """Shape of the random tensor drawn for ``x`` ([T, B, ...])."""
        if self.legacy_per_token:
            return (x.shape[0],) + (1,) * (x.dim() - 1)
        return (1, x.shape[1]) + (1,) * (x.dim() - 2)

    def _keep_mask(self, shape, like: torch.Tensor) -> torch.Tensor:
        # Same draw as the release: floor(keep_prob + U[0, 1)).
        keep_prob = 1.0 - self.drop_prob
        noise = torch.rand(shape, dtype=like.dtype, device=like.device)
        return (keep_prob + noise).floor_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        return x.div(keep_prob) * self._keep_mask(self.mask_shape(x), x)

    def forward_packed(
        self,
        x: torch.Tensor,
        num_tokens: int,
        batch_size: int,
        batch_index: torch.Tensor,
        token_index: torch.Tensor,
    ) -> torch.Tensor:
        """DropPath on packed tokens, with the same draw as on the ``T x B x C`` tensor.

        Args:
            x: [M, C], the real tokens of a ``T x B x C`` tensor, packed.
            num_tokens: T.
            batch_size: B.
            batch_index: int64 [M], molecule of each packed token.
            token_index: int64 [M], position of each packed token.

        Returns:
            [M, C].
        """
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        if self.legacy_per_token:
            mask = self._keep_mask((num_tokens,), x)[token_index]  # [M]
        else:
            mask = self._keep_mask((batch_size,), x)[batch_index]  # [M]
        return x.div(keep_prob) * mask.unsqueeze(-1)

    def extra_repr(self) -> str:
        return f"prob={self.drop_prob}, legacy_per_token={self.legacy_per_token}"
