"""Optimizer ``fused_adam``: torch's multi-tensor AdamW behind fairseq's optimizer API.

fairseq's own ``adam`` falls back, without NVIDIA apex, to a Python loop over the
parameters (about ten small kernels per parameter tensor: some 2,300 launches per update
for Transformer-M L12), and its gradient-norm clipping takes one norm per gradient. This
optimizer runs the same AdamW update as one fused kernel (``torch.optim.AdamW(fused=True)``)
or a few multi-tensor (``foreach``) kernels, and clips with one multi-tensor norm. It
never reads a value back to the host.

With ``--fp16`` fairseq wraps it in ``FP16Optimizer``, which keeps one flat fp32 master
copy of the weights (``supports_flat_params``); with fp32 weights (the default, or the
model's ``--bf16-autocast``) it updates the weights directly.

Numerics: the update is fairseq's ``adam`` (AdamW: decoupled weight decay) except for
where ``eps`` enters: fairseq divides by ``sqrt(v) + eps`` before the bias correction of
``v``, torch by ``sqrt(v / (1 - beta2^t)) + eps``. The two differ by ``eps * (1 -
sqrt(1 - beta2^t))`` in the denominator, i.e. only where ``sqrt(v)`` is itself of the
order of ``eps`` (tested in ``tests/transformer_m/test_fused_adam.py``).
"""
import ast
import logging
from dataclasses import dataclass, field
from typing import Any, List, Tuple

import torch
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.optim import FairseqOptimizer, register_optimizer
from omegaconf import II, OmegaConf

logger = logging.getLogger(__name__)

ADAM_IMPLS = ("auto", "fused", "foreach", "for_loop")


@dataclass
class FusedAdamConfig(FairseqDataclass):
    adam_betas: Any = field(
        default=(0.9, 0.999), metadata={"help": "betas of Adam, e.g. '(0.9, 0.999)'"}
    )
    adam_eps: float = field(default=1e-8, metadata={"help": "epsilon of Adam"})
    weight_decay: float = field(
        default=0.0, metadata={"help": "decoupled weight decay (AdamW, as fairseq's adam)"}
    )
    adam_impl: ChoiceEnum(ADAM_IMPLS) = field(
        default="auto",
        metadata={
            "help": "fused: one kernel for all parameters (torch.optim.AdamW(fused=True)); "
            "foreach: multi-tensor kernels; for_loop: one parameter at a time (reference); "
            "auto: fused where torch supports it for the parameters, else foreach"
        },
    )
    lr: List[float] = II("optimization.lr")


def parse_betas(betas: Any) -> Tuple[float, float]:
    """``adam_betas`` as given on the command line (``"(0.9, 0.999)"``) or in a config."""
    if isinstance(betas, str):
        betas = ast.literal_eval(betas)
    elif not isinstance(betas, (tuple, list)):
        betas = OmegaConf.to_container(betas)
    beta1, beta2 = (float(b) for b in betas)
    return beta1, beta2


def fused_supported(params: List[torch.Tensor]) -> bool:
    """Whether ``torch.optim.AdamW(fused=True)`` accepts these parameters."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:  # a private helper of torch; CUDA has had fused AdamW since 2.0
        devices = {"cuda"}
    return all(
        p.device.type in devices and torch.is_floating_point(p) for p in params
    )


@register_optimizer("fused_adam", dataclass=FusedAdamConfig)
class FusedAdam(FairseqOptimizer):
    """AdamW for fairseq as one fused or a few multi-tensor kernels (see the module doc).

    Args:
        cfg: :class:`FusedAdamConfig`.
        params: the parameters (or parameter groups) to optimize.
    """

    def __init__(self, cfg: FusedAdamConfig, params):
        super().__init__(cfg)
        params = list(params)
        flat = [
            p for item in params
            for p in (item["params"] if isinstance(item, dict) else [item])
        ]  # fmt: skip
        impl = str(cfg.adam_impl)
        if impl == "auto":
            impl = "fused" if fused_supported(flat) else "foreach"
        self.impl = impl
        self._optimizer = torch.optim.AdamW(
            params,
            **self.optimizer_config,
            fused=impl == "fused",
            foreach=impl == "foreach",
        )
        logger.info("fused_adam: torch.optim.AdamW, %s implementation", impl)

    @property
    def optimizer_config(self):
        """Keyword arguments of the wrapped optimizer; used to override the values in a
        checkpoint when resuming (``--optimizer-overrides``)."""
        return {
            "lr": self.cfg.lr[0],
            "betas": parse_betas(self.cfg.adam_betas),
            "eps": self.cfg.adam_eps,
            "weight_decay": self.cfg.weight_decay,
        }

    @property
    def supports_flat_params(self):
        return True

    def multiply_grads(self, c):
        """Multiply the gradients by ``c`` (number or tensor) in one multi-tensor kernel."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, c.to(grads[0].device) if torch.is_tensor(c) else c)

    def clip_grad_norm(self, max_norm, aggregate_norm_fn=None):
        """Total L2 norm of the gradients (float32 tensor), clipped to ``max_norm`` if > 0.

        Same result as fairseq's ``utils.clip_grad_norm_`` with two multi-tensor kernels
        instead of one norm per gradient; nothing is read back to the host.
        """
        grads = [p.grad for p in self.params if p.grad is not None]  # no autograd history
        if not grads:
            params = list(self.params)
            return params[0].new_tensor(0.0) if params else torch.tensor(0.0)
        # One process per device in fairseq: all gradients share a device.
        norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
        total_norm = torch.linalg.vector_norm(torch.stack(norms))
        if aggregate_norm_fn is not None:
            total_norm = aggregate_norm_fn(total_norm)
        if max_norm > 0:
            clip_coef = (float(max_norm) / (total_norm + 1e-6)).clamp_(max=1)
            torch._foreach_mul_(grads, clip_coef)
        return total_norm
