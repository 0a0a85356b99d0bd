"""All three model families run in float64 after ``model.double()`` (equivariance and gradient
checks are done there): Transformer-M (golden small model), GeoMFormer and 3D-GSRD (both its
fine-tuning and pre-training shapes). Each gives float64 outputs equal to its float32 outputs
up to float32 rounding, and its position gradient passes ``torch.autograd.gradcheck``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("fairseq")

from golden_fixture import golden  # noqa: E402
from tm_modules_testutils import build_small, scenario_batch  # noqa: E402

from graphormer_ext.data import keys  # noqa: E402

GSRD_TINY = dict(encoder_layers=2, encoder_embed_dim=16, encoder_attention_heads=4,
                 encoder_node_hidden=16, num_rbf=8, encoder_2d_layers=1,
                 encoder_2d_embed_dim=16, encoder_2d_edge_dim=8)  # fmt: skip


def _double(batch: dict) -> dict:
    return {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
            for k, v in batch.items()}  # fmt: skip


def _assert_float64_and_close(out64, out32, rtol=1e-4):
    assert out64.dtype == torch.float64 and torch.isfinite(out64).all()
    scale = max(1.0, float(out32.abs().max()))
    assert float((out64 - out32.double()).abs().max()) <= rtol * scale


# --- Transformer-M ----------------------------------------------------------------------------
@pytest.mark.parametrize("implementation", ["fast", "reference"])
def test_transformer_m_float64(implementation):
    batch = scenario_batch("out_3d")
    net32 = build_small(implementation)
    net64 = build_small(implementation).double()
    with torch.no_grad():
        logits64, atoms64, _ = net64(_double(batch))
    _assert_float64_and_close(logits64[:, 0, 0], golden()["out_3d"]["graph_pred"])
    _assert_float64_and_close(atoms64, net32(batch)[1].detach())

    one = {k: v[:1] for k, v in _double(batch).items()}  # one molecule, 3D branch on
    pos = one[keys.POS][:, :4].clone().requires_grad_(True)

    def graph_pred(p):
        b = dict(one)
        b[keys.POS] = torch.cat([p, one[keys.POS][:, 4:]], dim=1)
        return net64(b)[0][:, 0, 0]

    assert torch.autograd.gradcheck(graph_pred, (pos,), eps=1e-6, atol=1e-6)


# --- GeoMFormer --------------------------------------------------------------------------------
def test_geomformer_float64():
    from transformer_m.models.geomformer import GeoMFormerConfig, build_geomformer_net

    cfg = GeoMFormerConfig(encoder_layers=2, encoder_embed_dim=16, encoder_ffn_embed_dim=16,
                           encoder_attention_heads=4, num_kernel=8, attention_dropout=0.0,
                           act_dropout=0.0, force_mode="grad")  # fmt: skip
    torch.manual_seed(0)
    net32 = build_geomformer_net(cfg).eval()
    net64 = build_geomformer_net(cfg).eval()
    net64.load_state_dict(net32.state_dict())
    net64.double()
    g = torch.Generator().manual_seed(0)
    z = torch.tensor([[6, 6, 8, 1, 1, 0]])
    mask = z > 0
    pos = torch.randn(1, 6, 3, generator=g, dtype=torch.float64) * 1.2 * mask[..., None]
    out32 = net32({keys.Z: z, keys.POS: pos.float(), keys.ATOM_MASK: mask})
    out64 = net64({keys.Z: z, keys.POS: pos, keys.ATOM_MASK: mask})
    _assert_float64_and_close(out64["energy"], out32["energy"].detach())
    _assert_float64_and_close(out64["forces"], out32["forces"].detach())

    def energy(p):
        return net64({keys.Z: z, keys.POS: p, keys.ATOM_MASK: mask}, force_mode="none")["energy"]

    assert torch.autograd.gradcheck(energy, (pos.clone().requires_grad_(True),), eps=1e-6,
                                    atol=1e-6)  # fmt: skip


# --- 3D-GSRD ------------------------------------------------------------------------------------
def _gsrd_batch(pretrain: bool) -> dict:
    from transformer_m.tasks.gsrd import ATOM_FEAT, BOND, POS_MASK

    g = torch.Generator().manual_seed(1)
    z = torch.tensor([[6, 6, 8, 1, 1, 1], [6, 8, 1, 1, 0, 0]])
    mask = z > 0
    feat = torch.zeros(2, 6, 60)
    feat[..., 0] = z.float()  # any fixed float32 features (as the collater gives)
    bond = torch.zeros(2, 6, 6, dtype=torch.long)
    bond[0, 0, 1] = bond[0, 1, 0] = bond[0, 1, 2] = bond[0, 2, 1] = 1
    batch = {
        keys.Z: z, keys.ATOM_MASK: mask, ATOM_FEAT: feat, BOND: bond,
        keys.POS: torch.randn(2, 6, 3, generator=g) * 1.3 * mask[..., None],
    }  # fmt: skip
    if pretrain:
        batch[POS_MASK] = torch.zeros(2, 6, dtype=torch.bool)
        batch[POS_MASK][:, 0] = True
    return batch


@pytest.mark.parametrize("head", ["scalar", "dipole", "spatial_extent", "pretrain"])
def test_gsrd_float64(head):
    """``model.double()`` runs on the float32 batches of the collater (the encoder casts its
    inputs to the weights' dtype); energies, forces and pre-training outputs are float64."""
    from transformer_m.criterions.gsrd import energy_and_forces
    from transformer_m.models.gsrd import GsrdConfig, GsrdModel

    pretrain = head == "pretrain"
    torch.manual_seed(0)
    cfg = GsrdConfig(physical=True, **GSRD_TINY)
    m32 = GsrdModel(cfg, pretrain=pretrain, head="scalar" if pretrain else head).eval()
    m64 = GsrdModel(cfg, pretrain=pretrain, head="scalar" if pretrain else head).eval()
    m64.load_state_dict(m32.state_dict())
    m64.double()
    batch = _gsrd_batch(pretrain)
    with torch.no_grad():
        out32, out64 = m32(batch), m64(batch)
    names = ("coord", "noise", "rep_2d", "h") if pretrain else ("pred", "h", "v")
    for name in names:
        _assert_float64_and_close(out64[name], out32[name])
    if pretrain:
        return
    e64, f64, _ = energy_and_forces(m64, _double(batch))
    assert e64.dtype == f64.dtype == torch.float64

    def energy(p):
        return m64(_double(batch), pos=p)["pred"]

    pos = _double(batch)[keys.POS].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(energy, (pos,), eps=1e-6, atol=1e-6)
    np.testing.assert_allclose(f64.numpy(), energy_and_forces(m32, batch)[1].double().numpy(),
                               rtol=1e-4, atol=1e-4)  # fmt: skip
