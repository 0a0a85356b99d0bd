"""Optimizer ``fused_adam``: torch's multi-tensor AdamW behind fairseq's optimizer API.

fairseq's own ``adam`` falls back, without NVIDIA apex, to a Python loop over the
parameters (about ten small kernels per parameter tensor: some 2,300 launches per update
for Transformer-M L12), and its gradient-norm clipping takes one norm per gradient. This
optimizer runs the same AdamW update as one fused kernel (``torch.optim.AdamW(fused=True)``)
or a few multi-tensor (``foreach``) kernels, and clips with one multi-tensor norm. It
never reads a value back to the host.

With ``--fp16`` fairseq wraps it in ``FP16Optimizer``, which keeps one flat fp32 master
copy of the weights (``supports_flat_params``); with fp32 weights (the default, or the
model's ``--bf16-autocast``) it updates the weights directly, and by default makes them flat
itself (:class:`FlatParameters`): every parameter becomes a view into one buffer and the
gradients are concatenated into one (one kernel), so that scaling, clipping and the Adam update
are one kernel each, whatever the number of parameter tensors (a multi-tensor kernel still
works per tensor: on the CPU it is a loop of per-tensor operators, on a GPU a launch per chunk
of tensors). The scaled and clipped gradient is the flat one; ``p.grad`` keeps what backward
made, as fairseq's ``--fp16`` keeps the fp16 gradients. As with fairseq's flat ``--fp16``
master weights, a parameter that got no gradient in an update has a zero gradient rather than
none (Adam then still decays it); ``--no-flat-params`` keeps the per-tensor update that skips
such parameters.

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
from torch._utils import _flatten_dense_tensors
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
    no_flat_params: bool = field(
        default=False,
        metadata={
            "help": "keep the parameters and gradients as separate tensors (by default they "
            "become views into one buffer: one kernel per optimizer operation)"
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


class FlatParameters:
    """Parameters made views into one buffer, their gradients gathered into one per update.

    ``p.data`` of every parameter becomes a view into :attr:`param`, so that the optimizer
    updates all of them with one kernel. Gradients stay what autograd makes them (no kernel
    in the backward pass); :meth:`gather_grads` concatenates them into ``param.grad`` with one
    kernel (a parameter without a gradient counts as a zero gradient).

    Args:
        params: dense floating-point tensors of one device and dtype.
    """

    def __init__(self, params: List[torch.Tensor]):
        self.params = list(params)
        first = self.params[0]
        total = sum(p.numel() for p in self.params)
        self.param = torch.empty(total, dtype=first.dtype, device=first.device)
        offset = 0
        with torch.no_grad():
            for p in self.params:
                n = p.numel()
                view = self.param[offset : offset + n].view_as(p)
                view.copy_(p)
                p.data = view
                offset += n
        self.gathered = False

    @staticmethod
    def supported(params: List[torch.Tensor]) -> bool:
        """Dense floating-point tensors on one device, of one dtype, more than one."""
        if len(params) < 2:
            return False
        first = params[0]
        return all(
            p.layout == torch.strided and p.dtype == first.dtype and p.device == first.device
            and torch.is_floating_point(p) and p.is_contiguous()
            for p in params
        )  # fmt: skip

    def gather_grads(self) -> torch.Tensor:
        """``param.grad``: the parameters' gradients concatenated (once per backward pass)."""
        if not self.gathered:
            grads = [p.grad for p in self.params]
            if any(g is None for g in grads):
                grads = [torch.zeros_like(p) if g is None else g
                         for p, g in zip(self.params, grads)]  # fmt: skip
            self.param.grad = _flatten_dense_tensors(grads)
            self.gathered = True
        return self.param.grad

    def zero_grad(self) -> None:
        """Drop all gradients (autograd makes new ones)."""
        for p in self.params:
            p.grad = None
        self.param.grad = None
        self.gathered = False


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
        self.flat = None
        plain = not any(isinstance(item, dict) for item in params)
        if plain and not getattr(cfg, "no_flat_params", False) and FlatParameters.supported(flat):
            self.flat = FlatParameters(flat)
            params = [self.flat.param]
        self._optimizer = torch.optim.AdamW(
            params,
            **self.optimizer_config,
            fused=impl == "fused",
            foreach=impl == "foreach",
        )
        logger.info(
            "fused_adam: torch.optim.AdamW, %s implementation, %s", impl,
            f"{len(flat)} parameter tensors in one flat buffer" if self.flat else "per tensor",
        )  # fmt: skip

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

    def _grads(self) -> List[torch.Tensor]:
        """The gradients to scale and clip: the flat buffer, or each tensor's."""
        if self.flat is not None:
            return [self.flat.gather_grads()]
        return [p.grad for p in self.params if p.grad is not None]

    def zero_grad(self):
        """Set the gradients to None."""
        if self.flat is not None:
            self.flat.zero_grad()
        else:
            super().zero_grad()

    def backward(self, loss):
        """``loss.backward()``; new gradients are gathered again."""
        if self.flat is not None:
            self.flat.gathered = False
        super().backward(loss)

    def step(self, closure=None, scale=1.0, groups=None):
        """One AdamW update (``scale``: the gradients are divided by it first)."""
        if self.flat is not None:
            self.flat.gather_grads()
        super().step(closure, scale, groups)

    def state_dict(self):
        return self._optimizer.state_dict()

    def load_state_dict(self, state_dict, optimizer_overrides=None):
        """Load a checkpoint's optimizer state, converting between the flat and the per-tensor
        layout when it was saved with the other one (same parameters, same order)."""
        ours = [p for group in self.param_groups for p in group["params"]]
        theirs = [i for group in state_dict["param_groups"] for i in group["params"]]
        if len(theirs) != len(ours):
            if self.flat is not None and len(theirs) == len(self.flat.params):
                state_dict = _flatten_state(state_dict, self.flat.params)
            elif self.flat is None and len(theirs) == 1:
                state_dict = _split_state(state_dict, ours)
        super().load_state_dict(state_dict, optimizer_overrides)

    def multiply_grads(self, c):
        """Multiply the gradients by ``c`` (number or tensor) in one (multi-tensor) kernel."""
        grads = self._grads()
        if grads:
            torch._foreach_mul_(grads, c.to(grads[0].device) if torch.is_tensor(c) else c)

    def clip_grad_norm(self, max_norm, aggregate_norm_fn=None):
        """Total L2 norm of the gradients (float32 tensor), clipped to ``max_norm`` if > 0.

        Same result as fairseq's ``utils.clip_grad_norm_`` with two multi-tensor kernels
        instead of one norm per gradient; nothing is read back to the host.
        """
        grads = self._grads()  # no autograd history
        if not grads:
            params = list(self.params)
            return params[0].new_tensor(0.0) if params else torch.tensor(0.0)
        # One process per device in fairseq: all gradients share a device.
        if len(grads) == 1:
            total_norm = torch.linalg.vector_norm(grads[0], 2, dtype=torch.float32)
        else:
            norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
            total_norm = torch.linalg.vector_norm(torch.stack(norms))
        if aggregate_norm_fn is not None:
            total_norm = aggregate_norm_fn(total_norm)
        if max_norm > 0:
            clip_coef = (float(max_norm) / (total_norm + 1e-6)).clamp_(max=1)
            if len(grads) == 1:
                grads[0].mul_(clip_coef.to(grads[0].dtype))
            else:
                torch._foreach_mul_(grads, clip_coef)
        return total_norm


def _flatten_state(state_dict: dict, params: List[torch.Tensor]) -> dict:
    """A per-tensor AdamW state dict (one group, ``params`` in order) as the flat layout's."""
    group = state_dict["param_groups"][0]
    ids = group["params"]
    states = [state_dict["state"].get(i, {}) for i in ids]
    flat_state = {}
    if all(states):
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if key in states[0]:
                flat_state[key] = torch.cat([s[key].reshape(-1) for s in states])
        flat_state["step"] = states[0]["step"]
    logger.info("fused_adam: per-tensor optimizer state of %d tensors made flat", len(ids))
    return {"state": {0: flat_state} if flat_state else {},
            "param_groups": [dict(group, params=[0])]}  # fmt: skip


def _split_state(state_dict: dict, params: List[torch.Tensor]) -> dict:
    """A flat AdamW state dict as the per-tensor layout's (``params`` in order)."""
    group = state_dict["param_groups"][0]
    flat_state = state_dict["state"].get(group["params"][0], {})
    state, offset = {}, 0
    for i, p in enumerate(params):
        n = p.numel()
        if flat_state:
            state[i] = {k: (v[offset : offset + n].view_as(p) if k != "step" else v)
                        for k, v in flat_state.items()}  # fmt: skip
        offset += n
    logger.info("fused_adam: flat optimizer state split into %d tensors", len(params))
    return {"state": state, "param_groups": [dict(group, params=list(range(len(params))))]}
