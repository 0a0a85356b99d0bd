"""The GeoMFormer and 3D-GSRD losses read nothing back from the device in a training step
(no ``.item()``, ``int(tensor)`` or boolean-mask index) and compute what their earlier
boolean-mask formulas computed: losses, logged values and gradients (issue 9, item 4)."""
import pytest
import torch
import torch.nn.functional as F
from test_host_overhead import HostReadGuard

from graphormer_ext.data import keys
from transformer_m.criterions.geomformer_md17 import (
    GeoMFormerGraphCriterion,
    GeoMFormerNBodyCriterion,
)
from transformer_m.criterions.gsrd import (
    GsrdEnergyForceCriterion,
    GsrdQM9Criterion,
    pretrain_losses,
)
from transformer_m.tasks.gsrd import NOISE, POS_LABEL

B, N = 5, 7


class _Task:
    energy_mean, energy_std = 5.0, 2.0


class _Model(torch.nn.Module):
    """Returns fixed outputs scaled by one parameter ``w``: its gradient checks the loss's."""

    def __init__(self, outputs, **attrs):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(1.3))
        self.outputs = outputs
        for name, value in attrs.items():
            setattr(self, name, value)

    def forward(self, batch, **kwargs):
        return {k: v * self.w if torch.is_tensor(v) and v.is_floating_point() else v
                for k, v in self.outputs.items()}  # fmt: skip


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float32)  # fmt: skip


def _atom_mask():
    sizes = torch.tensor([7, 3, 5, 1, 6])
    return torch.arange(N)[None, :] < sizes[:, None]  # [B, N]


def _close(a, b):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float64),
                               torch.as_tensor(b, dtype=torch.float64), rtol=1e-6, atol=1e-6)  # fmt: skip


def _step(criterion, model, sample):
    """The criterion under the guard: ``(loss, sample_size, log, dloss/dw)``."""
    model.train()
    guard = HostReadGuard()
    with guard:
        loss, sample_size, log = criterion(model, sample)
        (grad,) = torch.autograd.grad(loss, model.w)
    assert guard.reads == []
    return loss, sample_size, log, grad


def _grad(value, model):
    return torch.autograd.grad(value, model.w)[0]


@pytest.mark.parametrize("host_mask", [True, False])
def test_geomformer_graph_loss(host_mask):
    pred = _rand(B, seed=0)
    target = _rand(B, seed=1) * 2 + 5
    target[[1, 4]] = float("nan")
    ok = torch.isfinite(target)
    sample = {"net_input": {"batched_data": {keys.Y: target}}}
    if host_mask:  # the task's collater (GraphPredictionDataset) provides them
        sample.update(labelled=ok, nlabelled=3)
    model = _Model({"energy": pred})
    criterion = GeoMFormerGraphCriterion(_Task())
    if host_mask:
        loss, n, log, grad = _step(criterion, model, sample)
    else:  # a batch from elsewhere: counted on the device, as before
        loss, n, log = criterion(model.train(), sample)
        grad = _grad(loss, model)
    p = model(None)["energy"]
    want = (p[ok] - (target[ok] - 5.0) / 2.0).abs().sum()  # the boolean-mask formula
    _close(loss, want)
    _close(grad, _grad(want, model))
    assert n == log["sample_size"] == 3
    _close(log["mae"], ((p[ok] * 2.0 + 5.0) - target[ok]).abs().sum())


def test_geomformer_nbody_counts_atoms_on_the_host():
    mask = _atom_mask()
    batch = {keys.ATOM_MASK: mask}
    sample = {"net_input": {"batched_data": batch}, "target": _rand(B, N, 3, seed=2),
              "natoms": int(mask.sum())}  # fmt: skip
    model = _Model({"pos_pred": _rand(B, N, 3, seed=3)})
    loss, _, log, _ = _step(GeoMFormerNBodyCriterion(_Task()), model, sample)
    assert log["ntokens"] == 22
    m = mask.unsqueeze(-1).double()
    diff = (model(None)["pos_pred"] - sample["target"]) * m
    _close(loss, ((diff * diff).sum((1, 2)) / (3 * m.sum((1, 2)))).sum())


@pytest.mark.parametrize("train_2d_head", [False, True])
def test_gsrd_pretrain_losses(train_2d_head):
    mask = _atom_mask()
    masked = mask & (_rand(B, N, seed=4) > 0.3)
    visible = mask & ~masked
    out = {"masked": masked, "visible": visible, "coord": _rand(B, N, 3, seed=5),
           "h": _rand(B, N, 8, seed=6), "rep_2d": _rand(B, N, 8, seed=7),
           "h_2d": _rand(B, N, 8, seed=8), "noise": _rand(B, N, 3, seed=9),
           "v": _rand(B, N, 3, 8, seed=10)}  # fmt: skip
    batch = {POS_LABEL: _rand(B, N, 3, seed=11), NOISE: _rand(B, N, 3, seed=12)}
    model = _Model(out)
    o = model(None)
    guard = HostReadGuard()
    with guard:
        terms = pretrain_losses(o, batch, train_2d_head)
        total = sum(terms.values())
        total.backward()
    assert guard.reads == []
    # the boolean-mask formulas, on a fresh graph
    o = model(None)
    want_mask = F.mse_loss(o["coord"][masked], batch[POS_LABEL][masked])
    target = o["h"].detach()[visible]
    want_distill = -F.cosine_similarity(o["rep_2d"][visible], target, dim=-1).mean()
    if train_2d_head:
        want_distill = want_distill - F.cosine_similarity(o["h_2d"][visible], target,
                                                          dim=-1).mean()  # fmt: skip
    want_denoise = F.mse_loss(o["noise"][visible], batch[NOISE][visible])
    for name, want in (("mask", want_mask), ("distill", want_distill),
                       ("denoise", want_denoise)):  # fmt: skip
        _close(terms[name], want)
    vec = pretrain_losses(o, batch, train_2d_head)["vec"]  # unchanged code
    want_grad = _grad(want_mask + want_distill + want_denoise + vec, model)
    _close(model.w.grad, want_grad)


def test_gsrd_energy_force_loss():
    mask = _atom_mask()
    energy = _rand(B, seed=13)
    forces_pred = _rand(B, N, 3, seed=14) * mask.unsqueeze(-1)
    batch = {"atom_mask": mask, "y": _rand(B, seed=15), "pos": _rand(B, N, 3, seed=16),
             "forces": _rand(B, N, 3, seed=17) * mask.unsqueeze(-1)}  # fmt: skip
    sample = {"net_input": {"batch": batch}, "nsamples": B, "natoms": int(mask.sum())}
    model = _Model({"v": _rand(B, N, 3, 8, seed=18)})

    def fake_energy_and_forces(model, batch):
        w = model.w
        return energy * w, forces_pred * w, model(batch)

    import transformer_m.criterions.gsrd as gsrd

    saved = gsrd.energy_and_forces
    gsrd.energy_and_forces = fake_energy_and_forces
    try:
        criterion = GsrdEnergyForceCriterion(_Task(), ema_alpha_energy=1.0)
        loss, _, log, grad = _step(criterion, model, sample)
    finally:
        gsrd.energy_and_forces = saved
    w = model.w
    f_abs = (forces_pred * w - batch["forces"]).abs()[mask]  # the boolean-mask formula
    from transformer_m.modules.gsrd import vector_norm_regulariser

    want = (0.2 * (energy * w - batch["y"]).abs().mean() + 0.8 * f_abs.mean()
            + 1e-4 * vector_norm_regulariser(model(None)["v"], mask, 1000.0))  # fmt: skip
    _close(loss, want)
    _close(grad, _grad(want, model))
    _close(log["force_abs"], f_abs.sum())
    assert log["force_count"] == f_abs.numel() and log["ntokens"] == int(mask.sum())


@pytest.mark.parametrize("labels", ["some", "none"])
def test_gsrd_qm9_loss(labels):
    from transformer_m.modules.gsrd import vector_norm_regulariser

    mask = _atom_mask()
    y = _rand(B, seed=19)
    y[[0, 3]] = float("nan")
    if labels == "none":
        y[:] = float("nan")
    ok = torch.isfinite(y)
    pred_std = _rand(B, seed=20)
    std, mean = 2.0, -1.0
    model = _Model({"pred_std": pred_std, "pred": pred_std * std + mean,
                    "v": _rand(B, N, 3, 8, seed=21), "mask": mask},
                   target_std=std, target_mean=mean)  # fmt: skip
    sample = {"net_input": {"batch": {"y": y}}, "labelled": ok, "nlabelled": int(ok.sum())}
    loss, _, log, grad = _step(GsrdQM9Criterion(_Task()), model, sample)
    o = model(None)
    vec = 1e-4 * vector_norm_regulariser(o["v"], mask, 1000.0)
    if ok.any():  # the boolean-mask formula
        want = F.mse_loss(o["pred_std"][ok], ((y - mean) / std)[ok]) + vec
    else:
        want = o["pred"].sum() * 0 + vec
    _close(loss, want)
    _close(grad, _grad(want, model))
    assert log["sample_size"] == int(ok.sum())
    _close(log["abs"], (o["pred"] - y)[ok].abs().sum())


def test_gsrd_collater_counts_on_the_host():
    """The 3D-GSRD task's collater gives the atom count and, for one label per molecule, the
    labelled mask and count that the losses use (made on the host)."""
    from types import SimpleNamespace

    import numpy as np

    from graphormer_ext.data import keys as K
    from transformer_m.tasks.gsrd import GsrdDataset

    def item(i, m, y):
        return {K.IDX: i, K.POS: np.zeros((m, 3), np.float32), K.Y: np.array([y], np.float32),
                "z": np.full(m, 6), "feat": np.zeros((m, 60), np.float32),
                "bond": np.zeros((m, m), np.int64)}  # fmt: skip

    samples = [item(0, 3, 1.0), item(1, 5, float("nan")), item(2, 2, -2.0)]
    sample = GsrdDataset.collater(SimpleNamespace(pretrain=False), samples)
    assert sample["natoms"] == 10 and sample["nsamples"] == 3
    assert sample["labelled"].tolist() == [True, False, True] and sample["nlabelled"] == 2
