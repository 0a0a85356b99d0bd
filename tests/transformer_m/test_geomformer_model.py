"""GeoMFormer fairseq model: presets, heads, forces (-dE/dR and direct) and N-body positions
under O(3) transforms, translations and permutations."""

import argparse

import pytest
import torch

pytest.importorskip("fairseq")

from graphormer_ext.data import keys
from graphormer_ext.sources.nbody import VEL, simulate_charged
from transformer_m.models.geomformer import (
    GeoMFormerConfig,
    build_geomformer_net,
    geomformer_base,
    geomformer_small,
    geomformer_tiny,
)

from test_geomformer_equivariance import TOL, err, molecule, rand_o3, rel_err, rot


def tiny_cfg(**over):
    cfg = GeoMFormerConfig(encoder_layers=2, encoder_embed_dim=32, encoder_ffn_embed_dim=32,
                           encoder_attention_heads=4, num_kernel=16, attention_dropout=0.0,
                           act_dropout=0.0)
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


def net(dtype=torch.float64, **over):
    torch.manual_seed(0)
    return build_geomformer_net(tiny_cfg(**over)).to(dtype).eval()


def batch_of(z, pos, mask, **extra):
    return {keys.Z: z, keys.POS: pos, keys.ATOM_MASK: mask, **extra}


def test_presets_fill_only_unset():
    args = argparse.Namespace(encoder_layers=3)
    geomformer_small(args)
    assert args.encoder_layers == 3 and args.encoder_embed_dim == 128 and args.num_kernel == 32
    base = argparse.Namespace()
    geomformer_base(base)
    assert (base.encoder_layers, base.encoder_embed_dim, base.encoder_ffn_embed_dim,
            base.encoder_attention_heads, base.num_kernel) == (8, 512, 512, 32, 128)
    tiny = argparse.Namespace()
    geomformer_tiny(tiny)
    assert tiny.encoder_embed_dim == 32 and tiny.cross_attn_mode == "parallel"


@pytest.mark.parametrize("force_mode", ["grad", "direct"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_energy_invariant_forces_equivariant(force_mode, dtype):
    model = net(dtype, force_mode=force_mode)
    z, pos, mask = molecule(dtype)
    out = model(batch_of(z, pos, mask))
    assert out["energy"].shape == (3,) and out["forces"].shape == pos.shape
    for seed, reflect in [(21, False), (22, True)]:
        q = rand_o3(seed, reflect)
        pos2 = ((rot(pos, q) + torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64))
                * mask[..., None]).to(dtype)
        out2 = model(batch_of(z, pos2, mask))
        assert rel_err(out["energy"], out2["energy"]) <= TOL[dtype]
        assert rel_err(rot(out["forces"], q), out2["forces"]) <= TOL[dtype]
        assert rel_err(rot(out["vector"], q), out2["vector"]) <= TOL[dtype]
    perm = torch.randperm(z.shape[1], generator=torch.Generator().manual_seed(3))
    out3 = model(batch_of(z[:, perm], pos[:, perm], mask[:, perm]))
    assert rel_err(out["energy"], out3["energy"]) <= TOL[dtype]
    assert rel_err(out["forces"][:, perm], out3["forces"]) <= TOL[dtype]


def test_grad_forces_are_minus_energy_gradient():
    model = net(torch.float64, force_mode="grad")
    z, pos, mask = molecule(torch.float64)
    out = model(batch_of(z, pos, mask))
    h = 1e-5
    b, i, c = 0, 2, 1
    pp, pm = pos.clone(), pos.clone()
    pp[b, i, c] += h
    pm[b, i, c] -= h
    e_p = model(batch_of(z, pp, mask), force_mode="none")["energy"][b]
    e_m = model(batch_of(z, pm, mask), force_mode="none")["energy"][b]
    fd = -(e_p - e_m) / (2 * h)
    assert abs(fd.item() - out["forces"][b, i, c].item()) < 1e-6
    assert out["forces"][~mask].abs().max() == 0
    # net force of a translation-invariant energy vanishes
    assert out["forces"].sum(1).abs().max() < 1e-9


def test_grad_forces_train_mode_double_backward():
    model = build_geomformer_net(tiny_cfg(force_mode="grad"))
    model.train()
    z, pos, mask = molecule(torch.float32)
    out = model(batch_of(z, pos, mask))
    loss = out["energy"].pow(2).sum() + out["forces"].pow(2).sum()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    # the force term reaches the parameters (create_graph)
    assert model.encoder.gbf.stds.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("vec_init", ["relative", "centered"])
@pytest.mark.parametrize("mode", ["parallel", "alternate"])
def test_nbody_positions_equivariant(vec_init, mode):
    model = net(torch.float64, use_velocity=True, force_mode="none", vec_init=vec_init,
                cross_attn_mode=mode)
    d = simulate_charged(2, seed=0, frame_in=0, frame_out=1, sample_freq=10)
    pos = torch.from_numpy(d["pos"]).double()
    vel = torch.from_numpy(d["vel"]).double()
    z = (torch.from_numpy(d["charge"]) > 0).long() + 1
    mask = torch.ones(z.shape, dtype=torch.bool)
    out = model(batch_of(z, pos, mask, **{VEL: vel}))
    q = rand_o3(31, True)
    t = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    out2 = model(batch_of(z, rot(pos, q) + t, mask, **{VEL: rot(vel, q)}))
    assert err(rot(out["pos_pred"], q) + t, out2["pos_pred"]) <= 1e-9


def test_simulator_shapes_and_protocol():
    d = simulate_charged(4, seed=1, frame_in=1, frame_out=3, sample_freq=50)
    assert d["pos"].shape == (4, 5, 3) and d["target_pos"].shape == (4, 5, 3)
    assert set(torch.from_numpy(d["charge"]).unique().tolist()) <= {-1.0, 1.0}
    # frame_out - frame_in = 2 frames of 50 steps: 100 leapfrog steps of dt = 1e-3 with |v| ~ 0.5
    shift = abs(d["target_pos"] - d["pos"]).max()
    assert 0 < shift < 1.0
