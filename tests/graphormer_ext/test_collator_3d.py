"""PointCloudCollator: shapes, pad values, Z from graph records, centring, errors."""

import numpy as np
import pytest
import torch

from graphormer_ext.data import keys as K
from graphormer_ext.data.collator_3d import PointCloudCollator, atomic_numbers


def _cloud(n, seed, forces=True, y=True):
    rng = np.random.default_rng(seed)
    rec = {
        K.Z: rng.integers(1, 10, size=n).astype(np.int16),
        K.POS: (rng.normal(size=(n, 3)) + 5.0).astype(np.float32),
    }
    if y:
        rec[K.Y] = np.array([float(seed)], np.float32)
    if forces:
        rec[K.FORCES] = rng.normal(size=(n, 3)).astype(np.float32)
    return rec


def test_public_keys():
    assert (K.Z, K.FORCES, K.ATOM_MASK, K.ENERGY) == ("z", "forces", "atom_mask", "y")
    assert K.POINT_CLOUD_KEYS == ("z", "pos")


def test_shapes_pad_values_and_content():
    recs = [_cloud(3, 0), _cloud(5, 1)]
    batch = PointCloudCollator()([(7, recs[0]), (2, recs[1])])
    assert set(batch) == {K.IDX, K.Z, K.POS, K.ATOM_MASK, K.Y, K.FORCES}
    assert batch[K.IDX].tolist() == [7, 2]
    assert batch[K.Z].dtype == torch.int64 and batch[K.Z].shape == (2, 5)
    assert batch[K.POS].dtype == torch.float32 and batch[K.POS].shape == (2, 5, 3)
    assert batch[K.FORCES].shape == (2, 5, 3)
    assert batch[K.ATOM_MASK].dtype == torch.bool
    assert batch[K.ATOM_MASK].sum(1).tolist() == [3, 5]
    assert batch[K.Y].shape == (2,) and batch[K.Y].tolist() == [0.0, 1.0]
    np.testing.assert_array_equal(batch[K.Z][0, :3].numpy(), recs[0][K.Z])
    assert batch[K.Z][0, 3:].eq(0).all()
    assert batch[K.POS][0, 3:].eq(0).all() and batch[K.FORCES][0, 3:].eq(0).all()
    np.testing.assert_array_equal(batch[K.POS][1].numpy(), recs[1][K.POS])
    np.testing.assert_array_equal(batch[K.FORCES][1].numpy(), recs[1][K.FORCES])


def test_pad_multiple_center_and_records_with_idx():
    recs = [dict(_cloud(3, 0), idx=0), dict(_cloud(5, 1), idx=1)]
    batch = PointCloudCollator(pad_multiple=8, center=True)(recs)
    assert batch[K.Z].shape == (2, 8)
    mask = batch[K.ATOM_MASK]
    for b in range(2):
        centroid = batch[K.POS][b][mask[b]].mean(0)
        assert torch.allclose(centroid, torch.zeros(3), atol=1e-5)
        # centring is a translation: pairwise distances unchanged
        p = batch[K.POS][b][mask[b]].double()
        ref = torch.from_numpy(recs[b][K.POS]).double()
        assert torch.allclose(torch.cdist(p, p), torch.cdist(ref, ref), atol=1e-5)
    assert batch[K.POS][:, 5:].eq(0).all()


def test_graph_records_give_z_from_x():
    # stored x0 = (Z - 1) + 2 (keys.py offsets)
    z = np.array([6, 8, 1], np.int64)
    x = np.zeros((3, 9), np.int16)
    x[:, 0] = z - 1 + K.X_SHIFT
    pos = np.zeros((3, 3), np.float32)
    rec = {K.X: x, K.POS: pos, K.Y: np.array([1.5], np.float32)}
    np.testing.assert_array_equal(atomic_numbers(rec), z)
    batch = PointCloudCollator()([(0, rec)])
    assert batch[K.Z][0].tolist() == [6, 8, 1]
    assert K.FORCES not in batch


def test_multi_target_and_missing_label():
    a = _cloud(2, 0, y=False)
    b = _cloud(2, 1, y=False)
    b[K.Y] = np.array([1.0, 2.0], np.float32)
    y = PointCloudCollator()([(0, a), (1, b)])[K.Y]
    assert y.shape == (2, 2) and torch.isnan(y[0]).all() and y[1].tolist() == [1.0, 2.0]


def test_errors():
    col = PointCloudCollator()
    no_pos = _cloud(3, 0)
    del no_pos[K.POS]
    with pytest.raises(ValueError, match=r"idx=4 .*3D model needs positions"):
        col([(4, no_pos)])
    with pytest.raises(ValueError, match="empty"):
        col([])
    with pytest.raises(ValueError, match=r"idx=\[1\].*forces"):
        col([(0, _cloud(2, 0)), (1, _cloud(2, 1, forces=False))])
    bad = _cloud(3, 0)
    bad[K.POS] = bad[K.POS][:2]
    with pytest.raises(ValueError, match="shape"):
        col([(0, bad)])
    with pytest.raises(ValueError, match="pad_multiple"):
        PointCloudCollator(pad_multiple=0)
