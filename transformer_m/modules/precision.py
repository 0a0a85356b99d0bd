"""Mixed precision without fairseq's ``--bf16`` (which means TPU in fairseq 0.12)."""
import contextlib

import torch


def autocast_bf16(enabled: bool, device: torch.device):
    """``torch.autocast(bfloat16)`` on ``device`` when ``enabled``, else a no-op context.

    Weights, gradients and optimizer state stay float32; matrix products and attention
    run in bfloat16 (same exponent range as float32: no loss scaling needed). Softmaxes,
    LayerNorms and the Gaussian basis stay float32 (autocast's rules and the modules'
    explicit casts). Works on CUDA and on the CPU.
    """
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
