"""Helpers of the Transformer-M modules: activations, initialisation, mode sampling.

Nothing here reads a config: every function takes explicit arguments.
"""
import math
from typing import Callable, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

IMPLEMENTATIONS = ("fast", "reference")

# Training modes (paper §3.2; released ``mask_dict``): index -> (mask_2d, mask_3d).
MODE_2D_3D = 0
MODE_2D = 1
MODE_3D = 2
MODE_MASKS = ((1.0, 1.0), (1.0, 0.0), (0.0, 1.0))
DEFAULT_MODE_PROB = (0.2, 0.2, 0.6)  # order {2D+3D, 2D, 3D}

ModeGenerator = Union[torch.Generator, np.random.Generator, np.random.RandomState]


def check_implementation(implementation: str) -> str:
    """Validate an ``implementation`` argument (``"fast"`` or ``"reference"``)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}"
        )
    return implementation


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 if it is half precision, else unchanged (float64 stays float64).

    Where the release computes in float32 (GELU, softmax, Gaussian basis), half-precision
    inputs are upcast as released, and a ``model.double()`` keeps its float64 precision.
    """
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _gelu_fp32(x: torch.Tensor) -> torch.Tensor:
    # fairseq `gelu`: exact erf GELU evaluated in float32 (float64 stays float64; no casts then).
    if x.dtype in (torch.float32, torch.float64):
        return F.gelu(x)
    return F.gelu(x.float()).type_as(x)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    # fairseq `gelu_accurate` / `gelu_fast`: tanh approximation.
    if x.dtype in (torch.float32, torch.float64):
        return F.gelu(x, approximate="tanh")
    return F.gelu(x.float(), approximate="tanh").type_as(x)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``F.dropout`` as one operator on every device.

    ``F.dropout`` uses the fused ``native_dropout`` on GPUs only; on the CPU it runs four
    operators (mask, Bernoulli draw, scale, product). Same distribution, one kernel.
    """
    if not training or p <= 0.0:
        return x
    return torch.native_dropout(x, p, True)[0]


def _linear(x: torch.Tensor) -> torch.Tensor:
    return x


_ACTIVATIONS = {
    "relu": F.relu,
    "gelu": _gelu_fp32,
    "gelu_accurate": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "tanh": torch.tanh,
    "linear": _linear,
    "swish": F.silu,
}


def get_activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Return the activation called ``name`` with fairseq's semantics.

    Args:
        name: one of relu, gelu, gelu_accurate, gelu_fast, tanh, linear, swish.

    Returns:
        A function tensor -> tensor.
    """
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        choices = sorted(_ACTIVATIONS)
        message = f"unknown activation {name!r}; choose from {choices}"
        raise ValueError(message) from None


def parse_mode_prob(
    mode_prob: Union[str, Sequence[float]]
) -> Tuple[float, float, float]:
    """Parse ``mode_prob``: probabilities of the training modes {2D+3D, 2D, 3D}.

    A string ``"p1,p2,p3"`` or three floats, non-negative, summing to 1 within 1e-6. The
    released encoder silently fell back to ``(0.2, 0.2, 0.6)`` for anything else (including
    ``"0.1,0.2,0.7"``, whose float sum is not exactly 1.0); here that is an error, since no
    checkpoint depends on the fallback.

    Args:
        mode_prob: the probabilities, as a string or a sequence.

    Returns:
        A tuple of three floats.

    Raises:
        ValueError: not three numbers, a negative value, or a sum other than 1.
    """
    try:
        items = mode_prob.split(",") if isinstance(mode_prob, str) else list(mode_prob)
        values = [float(item) for item in items]
    except (TypeError, ValueError):
        values = []
    if len(values) != 3 or min(values) < 0 or abs(sum(values) - 1.0) > 1e-6:
        raise ValueError(
            f"mode_prob {mode_prob!r}: expected three non-negative probabilities of the modes "
            "{2D+3D, 2D, 3D} summing to 1, e.g. '0.2,0.2,0.6'"
        )
    return tuple(values)


def draw_mode_choice(
    num_molecules: int,
    mode_prob: Sequence[float],
    generator: Optional[ModeGenerator] = None,
) -> torch.Tensor:
    """Draw one training mode per molecule.

    The release calls ``np.random.choice(3, B, p=mode_prob)`` on numpy's global state.
    Here the randomness is explicit: a numpy ``Generator`` or ``RandomState`` (its
    ``choice`` is used, so ``RandomState(seed)`` reproduces the official draw after
    ``np.random.seed(seed)``), a ``torch.Generator``, or None for torch's global RNG.

    Args:
        num_molecules: B.
        mode_prob: probabilities of {2D+3D, 2D, 3D}.
        generator: where the randomness comes from.

    Returns:
        int64 tensor [B] with values in {0, 1, 2} (see ``MODE_*``), on the CPU (the encoder
        draws on its own device with :func:`draw_modes`).
    """
    if isinstance(generator, (np.random.Generator, np.random.RandomState)):
        p = np.asarray(mode_prob, dtype=np.float64)
        choice = generator.choice(3, num_molecules, p=p)
        return torch.as_tensor(np.asarray(choice), dtype=torch.long)
    # float32: a sum that rounds just below 1 in float64 is 1, so a zero-probability
    # 3D mode is never drawn
    cdf = np.cumsum(np.asarray(mode_prob, dtype=np.float64))[:2]
    return draw_modes(num_molecules, torch.tensor(cdf, dtype=torch.float32), generator)


def draw_modes(
    num_molecules: int, cdf: torch.Tensor, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Modes by inversion of the cumulative probabilities ``cdf`` = (p0, p0 + p1): one
    uniform draw per molecule on ``cdf``'s device, three small kernels (``multinomial``
    is one of the slowest CPU operators and several kernels on a GPU)."""
    u = torch.rand(num_molecules, device=cdf.device, dtype=cdf.dtype, generator=generator)
    return (u.unsqueeze(1) >= cdf).sum(1)


def mode_masks(
    mode_choice: torch.Tensor, like: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Map per-molecule modes to the ``(mask_2d, mask_3d)`` vectors of spec §1.8.

    Args:
        mode_choice: int64 [B] with values in {0 = 2D+3D, 1 = 2D, 2 = 3D}.
        like: tensor whose dtype and device the masks take (the release uses ``pos``).

    Returns:
        ``mask_2d`` [B] and ``mask_3d`` [B], 0/1 floats (the rows of ``MODE_MASKS``).
    """
    mode_choice = mode_choice.to(like.device)
    mask_2d = (mode_choice != MODE_3D).to(like.dtype)  # 2D off only in 3D-only mode
    mask_3d = (mode_choice != MODE_2D).to(like.dtype)  # 3D off only in 2D-only mode
    return mask_2d, mask_3d


def init_transformer_m_params(module: nn.Module) -> None:
    """The official ``apply_init`` initialisation (``init_params`` of the encoder).

    Linear weights N(0, 0.02) and zero biases; Embedding weights N(0, 0.02) with the
    padding row zeroed. LayerNorms and bare parameters keep their values. Use with
    ``model.apply(...)``; the attention q/k/v projections are covered as Linear layers.
    """
    if isinstance(module, nn.Linear):
        module.weight.data.normal_(mean=0.0, std=0.02)
        if module.bias is not None:
            module.bias.data.zero_()
    if isinstance(module, nn.Embedding):
        module.weight.data.normal_(mean=0.0, std=0.02)
        if module.padding_idx is not None:
            module.weight.data[module.padding_idx].zero_()


def init_feature_params(module: nn.Module, num_layers: int) -> None:
    """Construction-time init of AtomFeature and MoleculeAttnBias in the release.

    Linear weights N(0, 0.02/sqrt(L)) with zero bias, Embedding weights N(0, 0.02).
    As released, padding rows are *not* zeroed here (``apply_init`` zeroes them).
    """
    if isinstance(module, nn.Linear):
        module.weight.data.normal_(mean=0.0, std=0.02 / math.sqrt(num_layers))
        if module.bias is not None:
            module.bias.data.zero_()
    if isinstance(module, nn.Embedding):
        module.weight.data.normal_(mean=0.0, std=0.02)
