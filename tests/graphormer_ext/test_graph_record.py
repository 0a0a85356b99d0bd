"""graph_to_record: stored index conventions, golden collated batch, legacy paths, bad input.

Tier A: CPU only, no fairseq.
"""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from graphormer_ext.data import keys
from graphormer_ext.featurize import graph as graph_mod
from graphormer_ext.featurize.graph import graph_to_record

REPO = Path(__file__).resolve().parents[2]
INT_KEYS = (keys.X, keys.DEGREE, keys.SPATIAL_POS, keys.ATTN_EDGE_TYPE, keys.EDGE_INPUT)


@pytest.fixture(scope="module")
def golden():
    from golden_fixture import golden

    return golden()


def _raw(mol):
    return mol["node_feat"].numpy(), mol["edge_index"].numpy(), mol["edge_attr"].numpy()


def _ethanol():
    """C-C-O, OGB-style raw features (values only need to be in range)."""
    node_feat = np.array([[5, 0, 4, 5, 3, 0, 4, 0, 0], [5, 0, 4, 5, 2, 0, 4, 0, 0],
                          [7, 0, 2, 5, 1, 0, 4, 0, 0]], dtype=np.int64)
    edge_index = np.array([[0, 1, 1, 2], [1, 0, 2, 1]], dtype=np.int64)
    edge_attr = np.zeros((4, 3), dtype=np.int64)
    return node_feat, edge_index, edge_attr


# --- golden --------------------------------------------------------------------------------------
def test_golden_batch_slices_fixed(golden):
    batch = golden["batch"]
    for idx, mol in enumerate(golden["molecules"]):
        rec = graph_to_record(*_raw(mol), pos=np.asarray(mol["pos"]), y=mol["y"], max_hops=5)
        n = mol["num_atoms"]
        hops = rec[keys.EDGE_INPUT].shape[2]
        assert hops == min(mol["max_shortest_path"], 5), idx
        msg = f"mol {idx}"
        np.testing.assert_array_equal(rec[keys.X], batch[keys.X][idx, :n].numpy(), msg)
        np.testing.assert_array_equal(rec[keys.DEGREE], batch[keys.DEGREE][idx, :n].numpy(), msg)
        for key in (keys.SPATIAL_POS, keys.ATTN_EDGE_TYPE):
            np.testing.assert_array_equal(rec[key], batch[key][idx, :n, :n].numpy(), msg)
        golden_ei = batch[keys.EDGE_INPUT][idx, :n, :n].numpy()  # padded to 5 hops with zeros
        np.testing.assert_array_equal(rec[keys.EDGE_INPUT], golden_ei[:, :, :hops], msg)
        assert (golden_ei[:, :, hops:] == keys.PAD).all(), msg
        np.testing.assert_array_equal(rec[keys.POS], batch[keys.POS][idx, :n].numpy(), msg)
        np.testing.assert_array_equal(rec[keys.Y], batch[keys.Y][idx : idx + 1].numpy(), msg)


def test_golden_all_hops_equals_preprocessed_plus_collator_shift(golden):
    for idx, (mol, pre) in enumerate(zip(golden["molecules"], golden["preprocessed"])):
        rec = graph_to_record(*_raw(mol), max_hops=None)
        np.testing.assert_array_equal(rec[keys.EDGE_INPUT], pre["edge_input"].numpy() + 1, idx)
        np.testing.assert_array_equal(rec[keys.X], pre["x"].numpy() + 1)
        np.testing.assert_array_equal(rec[keys.SPATIAL_POS], pre["spatial_pos"].numpy() + 1)


def test_golden_legacy_reproduces_atom0_defect(golden):
    documented = {5: {(1, 5), (5, 1)}, 7: {(1, 3), (3, 1)}, 14: {(1, 6), (6, 1)}}
    for idx, mol in enumerate(golden["molecules"]):
        fixed = graph_to_record(*_raw(mol), max_hops=None)
        legacy = graph_to_record(*_raw(mol), max_hops=None, path_convention="legacy")
        for key in INT_KEYS[:-1]:
            np.testing.assert_array_equal(legacy[key], fixed[key])
        a, b = fixed[keys.EDGE_INPUT], legacy[keys.EDGE_INPUT]
        assert a.shape == b.shape
        differs = {tuple(p) for p in np.argwhere((a != b).any(-1).any(-1)).tolist()}
        assert differs == documented.get(idx, set()), idx
        for i, j in differs:  # one hop over a non-bonded pair, nothing after it
            assert (b[i, j, 0] == keys.EDGE_INPUT_NO_BOND).all()
            assert (b[i, j, 1:] == keys.PAD).all()
    mol5 = graph_to_record(*_raw(golden["molecules"][5]), path_convention="legacy")
    official_plus_one = [[1, 1, 1], [0, 0, 0], [0, 0, 0]]  # README: [[0,0,0],[-1,..],[-1,..]] + 1
    assert mol5[keys.EDGE_INPUT][1, 5].tolist() == official_plus_one
    assert mol5[keys.EDGE_INPUT][5, 1].tolist() == official_plus_one


# --- conventions on hand-made graphs -------------------------------------------------------------
def test_record_dtypes_keys_and_values():
    node_feat, edge_index, edge_attr = _ethanol()
    edge_attr[:, 0] = [1, 1, 0, 0]
    rec = graph_to_record(node_feat, edge_index, edge_attr)
    assert set(rec) == set(keys.MODEL_KEYS)
    for key in INT_KEYS:
        assert rec[key].dtype == np.int16, key
    offsets = keys.FEATURE_OFFSET * np.arange(keys.NUM_ATOM_FEATURES)
    np.testing.assert_array_equal(rec[keys.X], node_feat + keys.X_SHIFT + offsets)
    np.testing.assert_array_equal(rec[keys.DEGREE], [2, 3, 2])
    np.testing.assert_array_equal(rec[keys.SPATIAL_POS], [[1, 2, 3], [2, 1, 2], [3, 2, 1]])
    assert rec[keys.ATTN_EDGE_TYPE][0, 1].tolist() == [3, 514, 1026]
    assert rec[keys.ATTN_EDGE_TYPE][1, 2].tolist() == [2, 514, 1026]
    assert (rec[keys.ATTN_EDGE_TYPE][0, 2] == keys.PAD).all()
    ei = rec[keys.EDGE_INPUT]
    assert ei.shape == (3, 3, 2, 3)
    assert ei[0, 2].tolist() == [[4, 515, 1027], [3, 515, 1027]]
    assert ei[0, 1].tolist() == [[4, 515, 1027], [0, 0, 0]]
    assert (ei[[0, 1, 2], [0, 1, 2]] == keys.PAD).all()


def test_optional_keys_and_single_atom():
    rec = graph_to_record(
        np.zeros((1, 9), dtype=np.int64), np.zeros((2, 0), dtype=np.int64),
        np.zeros((0, 3), dtype=np.int64), pos=[[0.0, 1.0, 2.0]], y=1.5,
    )
    assert rec[keys.POS].dtype == rec[keys.Y].dtype == np.float32
    assert rec[keys.POS].shape == (1, 3) and rec[keys.Y].tolist() == [1.5]
    assert rec[keys.EDGE_INPUT].shape == (1, 1, 0, 3)
    assert rec[keys.DEGREE].tolist() == [keys.DEGREE_SHIFT]
    nan_y = graph_to_record(*_ethanol(), y=[np.nan, 2.0])[keys.Y]  # NaN = missing label: allowed
    assert np.isnan(nan_y[0]) and nan_y[1] == 2.0


def test_disconnected_molecule():
    node_feat, edge_index, edge_attr = _ethanol()
    node_feat = np.vstack([node_feat, node_feat[:1]])  # + an isolated atom (a salt ion)
    rec = graph_to_record(node_feat, edge_index, edge_attr, max_hops=5)
    assert rec[keys.SPATIAL_POS][3, 0] == rec[keys.SPATIAL_POS][0, 3] == 511
    assert rec[keys.EDGE_INPUT].shape == (4, 4, 2, 3)  # hops of the reachable pairs only
    assert (rec[keys.EDGE_INPUT][3] == keys.PAD).all()
    assert rec[keys.DEGREE][3] == keys.DEGREE_SHIFT


def test_max_hops_truncates():
    n = 9
    chain = np.array([[i, i + 1] for i in range(n - 1)] + [[i + 1, i] for i in range(n - 1)]).T
    args = (np.zeros((n, 9), dtype=np.int64), chain, np.zeros((chain.shape[1], 3), dtype=np.int64))
    full = graph_to_record(*args, max_hops=None)[keys.EDGE_INPUT]
    assert full.shape[2] == n - 1
    for hops in (1, 5, 8, 20):
        ei = graph_to_record(*args, max_hops=hops)[keys.EDGE_INPUT]
        np.testing.assert_array_equal(ei, full[:, :, : min(hops, n - 1)])


# --- bad input -----------------------------------------------------------------------------------
def test_bad_inputs():
    node_feat, edge_index, edge_attr = _ethanol()
    with pytest.raises(ValueError, match="N = 0"):
        graph_to_record(np.zeros((0, 9), dtype=np.int64), np.zeros((2, 0), dtype=np.int64),
                        np.zeros((0, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="outside"):
        graph_to_record(node_feat, edge_index + 1, edge_attr)
    with pytest.raises(ValueError, match="edge_index"):
        graph_to_record(node_feat, edge_index[:1], edge_attr)
    with pytest.raises(ValueError, match="edges but edge_attr"):
        graph_to_record(node_feat, edge_index, edge_attr[:3])
    with pytest.raises(ValueError, match="both directions"):
        graph_to_record(node_feat, edge_index[:, :3], edge_attr[:3])
    with pytest.raises(ValueError, match="self-loop"):
        graph_to_record(node_feat, np.array([[0, 0], [0, 0]]), np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="more than once"):
        graph_to_record(node_feat, np.hstack([edge_index, edge_index[:, :2]]),
                        np.zeros((6, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="shape"):
        graph_to_record(node_feat[:, :8], edge_index, edge_attr)
    with pytest.raises(ValueError, match="integer"):
        graph_to_record(node_feat.astype(float), edge_index, edge_attr)


@pytest.mark.parametrize("value", [510, 4000, -1])
def test_feature_values_outside_vocabulary(value):
    node_feat, edge_index, edge_attr = _ethanol()
    bad_x = node_feat.copy()
    bad_x[1, 4] = value
    with pytest.raises(ValueError, match=r"node_feat\[1, 4\].*vocabulary"):
        graph_to_record(bad_x, edge_index, edge_attr)
    bad_e = edge_attr.copy()
    bad_e[2, 1] = value
    with pytest.raises(ValueError, match=r"edge_attr\[2, 1\].*vocabulary"):
        graph_to_record(node_feat, edge_index, bad_e)
    ok_x = node_feat.copy()
    ok_x[1, 4] = 509  # the largest value that stays inside its block
    assert graph_to_record(ok_x, edge_index, edge_attr)[keys.X][1, 4] == 509 + 2 + 4 * 512


def test_degree_above_vocabulary():
    n = keys.MAX_DEGREE + 2  # a star whose centre has MAX_DEGREE + 1 bonds
    leaves = np.arange(1, n)
    centre = np.zeros(n - 1, dtype=np.int64)
    edge_index = np.vstack([np.r_[centre, leaves], np.r_[leaves, centre]])
    with pytest.raises(ValueError, match="MAX_DEGREE"):
        graph_to_record(np.zeros((n, 9), dtype=np.int64), edge_index,
                        np.zeros((edge_index.shape[1], 3), dtype=np.int64))


def test_bad_pos_options():
    args = _ethanol()
    with pytest.raises(ValueError, match="shape"):
        graph_to_record(*args, pos=np.zeros((2, 3)))
    pos = np.zeros((3, 3))
    pos[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN coordinates"):
        graph_to_record(*args, pos=pos)
    pos[1, 2] = np.inf
    with pytest.raises(ValueError, match="NaN coordinates"):
        graph_to_record(*args, pos=pos)
    with pytest.raises(ValueError, match="path_convention"):
        graph_to_record(*args, path_convention="official")
    for hops in (0, -1, True, 2.5):
        with pytest.raises(ValueError, match="max_hops"):
            graph_to_record(*args, max_hops=hops)


def test_missing_extension_names_build_command(monkeypatch):
    monkeypatch.setattr(graph_mod, "_algos", None)
    with pytest.raises(ImportError, match=r"pip install -e \."):
        graph_to_record(*_ethanol())


def test_featurize_graph_imports_no_torch():
    code = "import sys, graphormer_ext.featurize.graph; assert 'torch' not in sys.modules"
    from suite_env import subprocess_env

    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, env=subprocess_env())
