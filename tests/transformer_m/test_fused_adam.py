"""Optimizer ``fused_adam``: the same updates as fairseq's ``adam``, in multi-tensor kernels.

fairseq's ``adam`` (without apex) is a Python loop of ~10 kernels per parameter; ``fused_adam``
wraps ``torch.optim.AdamW`` (fused or foreach). The updates agree up to where ``eps`` enters
(see ``transformer_m/optim/fused_adam.py``), and the gradient clipping agrees exactly in value.
"""
import copy
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("fairseq")
from fairseq.optim.adam import FairseqAdam  # noqa: E402
from fairseq.optim.fp16_optimizer import FP16Optimizer  # noqa: E402

from transformer_m.optim import FusedAdam  # noqa: E402


def _cfg(impl="auto", weight_decay=0.01, betas="(0.9, 0.98)", eps=1e-8, lr=1e-3):
    return SimpleNamespace(adam_betas=betas, adam_eps=eps, weight_decay=weight_decay,
                           adam_impl=impl, lr=[lr], use_old_adam=True, fp16_adam_stats=False,
                           tpu=False)  # fmt: skip


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (5,), (3, 4, 2), (1,)]
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def _grads(params, step):
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 0.1


@pytest.mark.parametrize("impl", ["fused", "foreach", "for_loop"])
def test_updates_match_fairseq_adam(impl):
    ours_params, ref_params = _params(), _params()
    ours = FusedAdam(_cfg(impl), ours_params)
    ref = FairseqAdam(_cfg(), ref_params)
    assert ours.impl == impl
    for step in range(20):
        for params, opt in ((ours_params, ours), (ref_params, ref)):
            _grads(params, step)
            opt.set_lr(1e-3 * (step + 1) / 20)  # as an lr scheduler does
            opt.step()
            opt.zero_grad()
    for a, b, start in zip(ours_params, ref_params, _params()):
        # eps enters after (torch) or before (fairseq) the bias correction: < 1e-6 here
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=1e-6)
        assert (a.detach() - start.detach()).abs().min() > 1e-5  # every entry moved


def test_auto_picks_fused_for_cpu_and_cuda_parameters():
    assert FusedAdam(_cfg("auto"), _params()).impl == "fused"


@pytest.mark.parametrize("max_norm", [0.0, 0.05, 100.0])
def test_clip_grad_norm_equals_fairseq(max_norm):
    ours_params, ref_params = _params(), _params()
    _grads(ours_params, 0)
    _grads(ref_params, 0)
    ours = FusedAdam(_cfg(), ours_params)
    ref = FairseqAdam(_cfg(), ref_params)
    norm_ours = ours.clip_grad_norm(max_norm)
    norm_ref = ref.clip_grad_norm(max_norm)
    assert norm_ours.dtype == torch.float32
    torch.testing.assert_close(norm_ours, norm_ref, rtol=1e-6, atol=0)
    # the optimizer's (flat) gradient is the clipped one
    clipped = torch.cat([p.grad.reshape(-1) for p in ref_params])
    torch.testing.assert_close(_optimizer_grad(ours), clipped, rtol=1e-6, atol=1e-9)


def _optimizer_grad(opt):
    """The gradient the optimizer steps with, flattened."""
    return torch.cat([p.grad.reshape(-1) for p in opt.params])


def test_clip_reads_nothing_back_to_the_host(monkeypatch):
    params = _params()
    _grads(params, 0)
    opt = FusedAdam(_cfg(), params)

    def forbidden(*a, **k):
        raise AssertionError("host synchronisation in clip_grad_norm")

    monkeypatch.setattr(torch.Tensor, "item", forbidden)
    monkeypatch.setattr(torch.Tensor, "__bool__", forbidden)
    monkeypatch.setattr(torch.Tensor, "__float__", forbidden)
    opt.clip_grad_norm(0.05)
    opt.step()


def _fp16_run(flatten: bool, device: str):
    params = [torch.nn.Parameter(p.detach().half().to(device)) for p in _params()]
    cfg = SimpleNamespace(
        optimizer=SimpleNamespace(_name="fused_adam", **vars(_cfg())),
        common=SimpleNamespace(fp16_init_scale=4, fp16_scale_window=None,
                               fp16_scale_tolerance=0.0, threshold_loss_scale=None,
                               min_loss_scale=1e-4, fp16_no_flatten_grads=not flatten,
                               bf16=False, model_parallel_size=1),
        distributed_training=SimpleNamespace(distributed_world_size=1),
        optimization=SimpleNamespace(update_freq=[1]),
    )  # fmt: skip
    fp32 = FP16Optimizer.build_fp32_params(cfg.optimizer, params, flatten=flatten)
    inner = FusedAdam(_cfg(), list(fp32.values()) if flatten else fp32)
    opt = FP16Optimizer(cfg, params, inner, fp32)
    before = copy.deepcopy([p.detach() for p in params])
    opt.backward(sum((p.float() * 0.5).sum() for p in params))  # loss-scaled backward
    opt.clip_grad_norm(5.0)
    opt.step()
    assert all(not torch.equal(a, p.detach()) for a, p in zip(before, params))
    assert all(p.dtype == torch.float16 for p in params)
    return inner


def test_fp32_master_weights_under_fp16_optimizer():
    """``--fp16``: fairseq's FP16Optimizer keeps fp32 copies; fused_adam updates them."""
    _fp16_run(flatten=False, device="cpu")


@pytest.mark.gpu
def test_flat_fp32_master_weights_under_fp16_optimizer_cuda():
    """The default ``--fp16`` path: one flat fp32 master tensor, fused kernel on CUDA."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    inner = _fp16_run(flatten=True, device="cuda")
    assert inner.impl == "fused" and len(inner.params) == 1


@pytest.mark.parametrize("factor", [0.25, torch.tensor(0.25)])
def test_multiply_grads_equals_fairseq(factor):
    ours_params, ref_params = _params(), _params()
    _grads(ours_params, 3)
    _grads(ref_params, 3)
    ours = FusedAdam(_cfg(), ours_params)
    ours.multiply_grads(factor)
    FairseqAdam(_cfg(), ref_params).multiply_grads(factor)
    assert torch.equal(_optimizer_grad(ours), torch.cat([p.grad.reshape(-1) for p in ref_params]))


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def _train(model, opt, steps=5, replace_grads=False):
    g = torch.Generator().manual_seed(9)
    for step in range(steps):
        opt.zero_grad()
        x = torch.randn(4, 5, generator=g)
        loss = model(x).pow(2).sum()
        opt.backward(loss)
        if replace_grads:  # e.g. a wrapper that assigns .grad: caught, copied into the buffer
            for p in model.parameters():
                p.grad = p.grad.clone()
        opt.multiply_grads(0.5)
        opt.clip_grad_norm(0.3)
        opt.set_lr(1e-2)
        opt.step()


@pytest.mark.parametrize("replace_grads", [False, True])
def test_flat_parameters_update_like_separate_tensors(replace_grads):
    flat_model, plain_model = _model(), _model()
    flat = FusedAdam(_cfg(), list(flat_model.parameters()))
    plain = FusedAdam(SimpleNamespace(**vars(_cfg()), no_flat_params=True),
                      list(plain_model.parameters()))  # fmt: skip
    assert flat.flat is not None and plain.flat is None and len(list(flat.params)) == 1
    _train(flat_model, flat, replace_grads=replace_grads)
    _train(plain_model, plain)
    buffer = flat.flat.param
    for a, b in zip(flat_model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
        assert a.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()


def test_flat_parameters_without_a_gradient_count_as_zero():
    model = _model()
    opt = FusedAdam(_cfg(weight_decay=0.0), list(model.parameters()))
    frozen = [p.detach().clone() for p in model[2].parameters()]
    for _ in range(3):
        opt.zero_grad()
        opt.backward(model[0](torch.randn(2, 5)).sum())  # model[2] gets no gradient
        opt.clip_grad_norm(1.0)
        opt.step()
    for p, before in zip(model[2].parameters(), frozen):
        assert p.grad is None and torch.equal(p.detach(), before)  # zero Adam step, no decay


def test_flat_optimizer_is_one_kernel_per_operation():
    """multiply_grads, clip_grad_norm, step and zero_grad cost a few kernels, not a few per
    parameter tensor (and the backward pass none)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(30)])  # 60 tensors
    opt = FusedAdam(_cfg(), list(model.parameters()))
    opt.backward(model(torch.randn(2, 4)).sum())
    calls = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view:  # views launch no kernel (gathering makes one per tensor)
                calls.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with Count():
        opt.multiply_grads(0.5)
        opt.clip_grad_norm(1.0)
        opt.step()
        opt.zero_grad()
    assert len(calls) < 20, calls


def test_optimizer_state_converts_between_flat_and_per_tensor_checkpoints():
    plain_model, flat_model, again = _model(), _model(), _model()
    plain_cfg = SimpleNamespace(**vars(_cfg()), no_flat_params=True)
    plain = FusedAdam(plain_cfg, list(plain_model.parameters()))
    _train(plain_model, plain)
    flat_model.load_state_dict(plain_model.state_dict())
    flat = FusedAdam(_cfg(), list(flat_model.parameters()))
    flat.load_state_dict(copy.deepcopy(plain.state_dict()))  # per-tensor -> flat
    back = FusedAdam(plain_cfg, list(again.parameters()))
    back.load_state_dict(copy.deepcopy(flat.state_dict()))  # flat -> per-tensor
    _train(plain_model, plain, steps=2)
    _train(flat_model, flat, steps=2)
    for a, b in zip(plain_model.parameters(), flat_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    state = back.state_dict()["state"]
    assert len(state) == len(list(again.parameters()))
    for i, p in enumerate(again.parameters()):
        assert state[i]["exp_avg"].shape == state[i]["exp_avg_sq"].shape == p.shape
