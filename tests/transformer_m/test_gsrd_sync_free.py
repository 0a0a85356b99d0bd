"""3D-GSRD's 2D encoder without host reads: the masked BatchNorm and the bond one-hot equal the
formulas they replace (``bn(z[mask])`` scattered back; ``F.one_hot``), running statistics
included, and the encoder's forward and backward make no host read."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_host_overhead import HostReadGuard

from transformer_m.modules.gsrd import Graph2DEncoder, edge_features, masked_batch_norm


def _reference(bn, z, mask):
    """The former computation: BatchNorm1d on the real rows, scattered back."""
    zf = z[mask]
    return z.masked_scatter(mask.unsqueeze(-1), bn(zf)) if zf.shape[0] > 1 else z


def _mask(rows):
    mask = torch.zeros(len(rows), 6, dtype=torch.bool)
    for i, n in enumerate(rows):
        mask[i, :n] = True
    return mask


@pytest.mark.parametrize("momentum", [0.1, None])
def test_masked_batch_norm_equals_batchnorm_on_the_real_rows(momentum):
    torch.manual_seed(0)
    ours, ref = nn.BatchNorm1d(8, momentum=momentum), nn.BatchNorm1d(8, momentum=momentum)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5), ours.bias.uniform_(-0.5, 0.5)
    ref.load_state_dict(ours.state_dict())
    for step, rows in enumerate([[6, 3, 1], [2, 5, 4], [1, 0, 0], [4, 4, 6]]):
        mask = _mask(rows)
        z = torch.randn(3, 6, 8, dtype=torch.float64) * (step + 1) + step
        za, zb = z.clone().requires_grad_(), z.clone().requires_grad_()
        ours.double(), ref.double()
        a, b = masked_batch_norm(ours, za, mask), _reference(ref, zb, mask)
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
        g = torch.randn_like(a)
        (a * g).sum().backward()
        (b * g).sum().backward()
        torch.testing.assert_close(za.grad, zb.grad, rtol=1e-9, atol=1e-10)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(ours, name), getattr(ref, name), rtol=1e-10,
                                       atol=1e-12)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad, rtol=1e-9, atol=1e-10)
    assert int(ours.num_batches_tracked) == 3  # the one-atom batch updated nothing

    ours.eval(), ref.eval()  # running statistics for every real row, any batch
    z = torch.randn(3, 6, 8, dtype=torch.float64)
    mask = _mask([6, 2, 1])
    expected = torch.where(mask.unsqueeze(-1), ref(z.reshape(-1, 8)).reshape(3, 6, 8), z)
    torch.testing.assert_close(masked_batch_norm(ours, z, mask), expected)
    single = _mask([1, 0, 0])  # the former code left a lone atom unnormalised in eval
    out = masked_batch_norm(ours, z, single)
    torch.testing.assert_close(out[0, 0], ref(z[0, :1])[0])
    torch.testing.assert_close(out[~single], z[~single])


def test_bf16_input_keeps_its_dtype_and_float32_statistics():
    torch.manual_seed(1)
    bn = nn.BatchNorm1d(4)
    z = torch.randn(2, 6, 4).to(torch.bfloat16)
    mask = _mask([5, 3])
    out = masked_batch_norm(bn, z, mask)
    assert out.dtype == torch.bfloat16 and bn.running_mean.dtype == torch.float32
    ref = nn.BatchNorm1d(4)
    expected = _reference(ref, z.float(), mask)
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(bn.running_var, ref.running_var, rtol=1e-5, atol=1e-6)


def test_edge_features_equal_one_hot():
    bond = torch.randint(0, 6, (2, 5, 5))  # 5: out of range, clamped to 4 as before
    onehot = F.one_hot(bond.long().clamp(0, 4), 5)[..., 1:].float()
    out = edge_features(bond)
    torch.testing.assert_close(out[..., :4], onehot)
    torch.testing.assert_close(out[..., 4], torch.eye(5).expand(2, 5, 5))


def test_2d_encoder_reads_nothing_back():
    torch.manual_seed(2)
    enc = Graph2DEncoder(num_layers=1, dim=16, heads=2, edge_dim=8, out_dim=16).train()
    feat = torch.randint(0, 2, (3, 6, enc.node_embedding[0].in_features))
    bond = torch.randint(0, 5, (3, 6, 6))
    mask = _mask([6, 3, 2])
    guard = HostReadGuard()
    with guard:
        rep, head = enc(feat, bond, mask)
        (rep.sum() + head.sum()).backward()
    assert guard.reads == []
