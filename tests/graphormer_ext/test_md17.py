"""MD17: npz formats, seeded splits, errors, LMDB round trip, CLI, shipped file."""

import hashlib
from pathlib import Path

import numpy as np
import pytest

from graphormer_ext.data import keys as K
from graphormer_ext.data.collator_3d import PointCloudCollator
from graphormer_ext.data.lmdb_dataset import LMDBDataset
from graphormer_ext.data.lmdb_writer import write_split
from graphormer_ext.featurize.pipeline import featurize_record, point_cloud_record
from graphormer_ext.sources.base import MoleculeError, SourceError, SourceRecord
from graphormer_ext.sources.md17 import MD17Source, load_md17_npz

SHIPPED = Path(__file__).resolve().parents[2] / "data" / "md17-xtb"
M, N = 30, 4


def _traj(seed=0):
    rng = np.random.default_rng(seed)
    z = np.array([6, 8, 1, 1], np.int64)
    R = rng.normal(size=(M, N, 3))
    E = -7000.0 + rng.normal(size=M)  # kcal/mol, MD17-like magnitude
    F = rng.normal(size=(M, N, 3)) * 20
    return z, R, E, F


def _sgdml(path, **extra):
    z, R, E, F = _traj()
    np.savez(path, z=z, R=R, E=E[:, None], F=F, name=np.array("toy"), **extra)
    return path


def _rmd17(path):
    z, R, E, F = _traj()
    np.savez(path, nuclear_charges=z, coords=R, energies=E, forces=F)
    return path


def test_both_formats_read_the_same(tmp_path):
    a = load_md17_npz(_sgdml(tmp_path / "md17_toy.npz"))
    b = load_md17_npz(_rmd17(tmp_path / "rmd17_toy.npz"))
    assert (a["format"], b["format"]) == ("sgdml", "rmd17")
    assert a["E"].shape == (M,)  # [M, 1] flattened
    for key in ("z", "R", "E", "F"):
        np.testing.assert_array_equal(a[key], b[key])
    assert a["name"] == "toy" and b["name"] is None
    sa = MD17Source(tmp_path / "md17_toy.npz", train=10, valid=5)
    sb = MD17Source(tmp_path / "rmd17_toy.npz", train=10, valid=5)
    ra, rb = list(sa.iter_split("test")), list(sb.iter_split("test"))
    assert len(ra) == len(rb) == 15
    np.testing.assert_array_equal(ra[3].arrays[K.POS], rb[3].arrays[K.POS])
    np.testing.assert_array_equal(ra[3].y, rb[3].y)


def test_split_sizes_and_seeded_reproducibility(tmp_path):
    f = _sgdml(tmp_path / "t.npz")
    src = MD17Source(f, train=10, valid=5, seed=3)
    assert src.splits() == {"train": 10, "valid": 5, "test": 15}
    frames = [src.frame_indices(s) for s in ("train", "valid", "test")]
    allf = np.concatenate(frames)
    assert sorted(allf.tolist()) == list(range(M))  # disjoint and complete
    assert all((np.diff(fr) > 0).all() for fr in frames)  # trajectory order
    again = MD17Source(f, train=10, valid=5, seed=3)
    np.testing.assert_array_equal(again.frame_indices("train"), frames[0])
    other = MD17Source(f, train=10, valid=5, seed=4)
    assert not np.array_equal(other.frame_indices("train"), frames[0])
    assert MD17Source(f, train=10, valid=5, test=7).splits()["test"] == 7
    # an empty split is left out (when asked for: by default the rest must hold >= valid)
    assert "test" not in MD17Source(f, train=25, valid=5, min_test=0).splits()
    with pytest.raises(SourceError, match="need 31 frames; the file has 30"):
        MD17Source(f, train=26, valid=5)


def test_test_split_of_the_rest_has_a_minimum(tmp_path, caplog):
    """950/50 on a 1,001-frame file used to give a silent 1-frame test split."""
    rng = np.random.default_rng(0)
    path = tmp_path / "md17_short.npz"
    np.savez(path, z=np.array([8, 1, 1]), R=rng.normal(size=(1001, 3, 3)),
             E=rng.normal(size=(1001, 1)), F=rng.normal(size=(1001, 3, 3)))  # fmt: skip
    with pytest.raises(SourceError, match=r"test split would have 1 frame\(s\) \(1,001 frames - "
                       r"950 train - 50 valid\), fewer than 50.*--min-test 0"):  # fmt: skip
        MD17Source(path, train=950, valid=50)
    with caplog.at_level("INFO", logger="graphormer_ext.sources.md17"):
        ok = MD17Source(path, train=900, valid=50)  # the rest: 51 >= 50
        assert ok.splits() == {"train": 900, "valid": 50, "test": 51}
        assert "1,001 frames -> train 900, valid 50, test 51" in caplog.text
        caplog.clear()
        assert MD17Source(path, train=950, valid=50, test=1).splits()["test"] == 1
        assert "fewer than 50 (explicit --test)" in caplog.text  # kept, with a warning
    assert MD17Source(path, train=950, valid=50, min_test=0).splits()["test"] == 1
    from graphormer_ext.preprocess import main

    argv = ["md17", "--path", str(path), "--train", "950", "--valid", "50", "--out",
            str(tmp_path / "lmdb"), "--workers", "1", "--no-progress"]  # fmt: skip
    assert main(argv) == 2 and not (tmp_path / "lmdb" / "train.lmdb").exists()
    assert main(argv + ["--min-test", "0"]) == 0
    assert len(LMDBDataset(tmp_path / "lmdb" / "test.lmdb")) == 1


def test_records_offset_and_describe(tmp_path):
    f = _sgdml(tmp_path / "t.npz")
    z, R, E, F = _traj()
    src = MD17Source(f, train=10, valid=5, seed=0)
    tr = src.frame_indices("train")
    assert src.energy_offset == pytest.approx(E[tr].mean())
    rec = next(src.iter_split("valid"))
    frame = int(src.frame_indices("valid")[0])
    assert rec.kind == "arrays" and f"frame {frame}" in rec.item
    np.testing.assert_allclose(rec.y, [E[frame] - src.energy_offset], atol=1e-5)
    d = src.describe()
    assert d["units"] == {"pos": "Å", "energy": "kcal/mol", "forces": "kcal/mol/Å"}
    assert d["split"]["sizes"] == {"train": 10, "valid": 5, "test": 15}
    assert d["train_stats"]["energy_std"] == pytest.approx(E[tr].std(ddof=1))
    raw = MD17Source(f, train=10, valid=5, energy_offset=0.0)
    assert next(raw.iter_split("valid")).y[0] == pytest.approx(E[frame], rel=1e-6)


def test_lmdb_round_trip_and_collator(tmp_path):
    f = _rmd17(tmp_path / "rmd17_toy.npz")
    z, R, E, F = _traj()
    src = MD17Source(f, train=10, valid=5, seed=1)
    out = tmp_path / "train.lmdb"
    meta = write_split(out, src, split="train", workers=1, progress=False)
    assert meta["num_entries"] == 10
    assert meta["source"]["describe"]["energy_offset"] == src.energy_offset
    assert abs(meta["stats"]["y_mean"][0]) < 1e-4  # train mean offset
    ds = LMDBDataset(out)
    assert len(ds) == 10 and ds.sizes.tolist() == [N] * 10
    frames = src.frame_indices("train")
    rec = ds[2]
    assert rec[K.Z].dtype == np.int16 and rec[K.POS].dtype == np.float32
    np.testing.assert_array_equal(rec[K.Z], z)
    np.testing.assert_array_equal(rec[K.POS], R[frames[2]].astype(np.float32))
    np.testing.assert_array_equal(rec[K.FORCES], F[frames[2]].astype(np.float32))
    np.testing.assert_allclose(rec[K.Y], [E[frames[2]] - src.energy_offset], atol=1e-5)
    batch = PointCloudCollator()([(i, ds[i]) for i in range(3)])
    assert batch[K.Z].shape == (3, N) and batch[K.FORCES].shape == (3, N, 3)
    assert batch[K.ATOM_MASK].all() and batch[K.Y].shape == (3,)


def test_cli_writes_three_splits(tmp_path):
    from graphormer_ext.preprocess import main

    f = _sgdml(tmp_path / "md17_toy.npz")
    out = tmp_path / "lmdb"
    argv = ["md17", "--path", str(tmp_path), "--molecule", "toy", "--train", "10",
            "--valid", "5", "--test", "8", "--seed", "2", "--out", str(out),
            "--workers", "1", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    sizes = {s: len(LMDBDataset(out / f"{s}.lmdb")) for s in ("train", "valid", "test")}
    assert sizes == {"train": 10, "valid": 5, "test": 8}
    assert LMDBDataset(out / "valid.lmdb").meta["source"]["checksum"] == (
        MD17Source(f, train=10, valid=5).checksum()
    )
    assert main(argv) == 2  # refuses to overwrite


BOHR, HARTREE, EV = 0.529177210903, 627.5094740631, 23.060547830619  # Å, kcal/mol, kcal/mol


@pytest.mark.parametrize("r_unit,e_unit,length,energy", [
    ("Ang", "kcal/mol", 1.0, 1.0),
    ("bohr", "eV", BOHR, EV),
    ("au", "Ha", BOHR, HARTREE),
    ("Angstrom", "kJ/mol", 1.0, 1 / 4.184),
])  # fmt: skip
def test_unit_fields_are_converted_and_recorded(tmp_path, r_unit, e_unit, length, energy):
    """sGDML files carry r_unit/e_unit (forces in e_unit/r_unit): stored in Å, kcal/mol."""
    z, R, E, F = _traj()
    f = _sgdml(tmp_path / "md17_toy.npz", r_unit=np.array(r_unit), e_unit=np.array(e_unit))
    src = MD17Source(f, train=10, valid=5, energy_offset=0.0)
    frame = int(src.frame_indices("train")[0])
    rec = next(src.iter_split("train"))
    np.testing.assert_allclose(rec.arrays[K.POS], R[frame] * length, rtol=1e-6)
    np.testing.assert_allclose(rec.y, [E[frame] * energy], rtol=1e-6)
    np.testing.assert_allclose(rec.arrays[K.FORCES], F[frame] * energy / length, rtol=1e-5)
    d = src.describe()
    assert d["units"] == {"pos": "Å", "energy": "kcal/mol", "forces": "kcal/mol/Å"}
    inp = d["input_units"]
    assert inp["from"] == {"length": "file field r_unit", "energy": "file field e_unit"}
    assert inp["factors_to_stored"]["forces"] == pytest.approx(energy / length)
    meta = write_split(tmp_path / "train.lmdb", src, split="train", workers=1, progress=False)
    assert meta["source"]["describe"]["input_units"]["length"] == inp["length"]


def test_unit_flags_for_files_without_fields(tmp_path):
    """rMD17 files carry no unit fields (Å, kcal/mol by their documentation): flags set
    them; a flag that contradicts a file's field, or an unknown unit, is an error."""
    z, R, E, F = _traj()
    f = _rmd17(tmp_path / "rmd17_toy.npz")
    plain = MD17Source(f, train=10, valid=5, energy_offset=0.0)
    assert plain.describe()["input_units"]["from"]["energy"] == "rMD17 convention (no unit fields)"
    ev = MD17Source(f, train=10, valid=5, energy_offset=0.0, energy_unit="eV")
    frame = int(ev.frame_indices("valid")[0])
    np.testing.assert_allclose(next(ev.iter_split("valid")).y, [E[frame] * EV], rtol=1e-6)
    assert ev.describe()["input_units"]["from"]["energy"] == "--energy-unit"
    with pytest.raises(SourceError, match=r"--length-unit: unknown length unit 'furlong'"):
        MD17Source(f, train=10, valid=5, length_unit="furlong")
    g = _sgdml(tmp_path / "md17_toy.npz", e_unit=np.array("kcal/mol"))
    with pytest.raises(SourceError, match=r"e_unit field says 'kcal/mol' .* --energy-unit is 'eV'"):
        MD17Source(g, train=10, valid=5, energy_unit="eV")
    from graphormer_ext.preprocess import main

    out = tmp_path / "lmdb"
    assert main(["md17", "--path", str(f), "--train", "10", "--valid", "5", "--energy-unit",
                 "hartree", "--length-unit", "bohr", "--out", str(out), "--workers", "1",
                 "--no-progress"]) == 0  # fmt: skip
    meta = LMDBDataset(out / "train.lmdb").meta["source"]["describe"]["input_units"]
    assert (meta["length"], meta["energy"], meta["forces"]) == ("bohr", "hartree", "hartree/bohr")


def test_file_errors(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, z=np.array([1, 1]), R=np.zeros((3, 2, 3)), energy=np.zeros(3))
    with pytest.raises(SourceError, match=r"the file has \['R', 'energy', 'z'\]"):
        MD17Source(bad)
    with pytest.raises(SourceError, match=r"lacks keys \['E', 'F'\]"):
        load_md17_npz(bad, format="sgdml")
    z, R, E, F = _traj()
    E[7] = np.nan
    nan = tmp_path / "nan.npz"
    np.savez(nan, z=z, R=R, E=E, F=F)
    with pytest.raises(SourceError, match=r"'E' is not finite .* frames \[7\]"):
        MD17Source(nan)
    shape = tmp_path / "shape.npz"
    np.savez(shape, z=z, R=R, E=E, F=F[:, :3])
    with pytest.raises(SourceError, match="'F' has shape"):
        MD17Source(shape)
    odd = _sgdml(tmp_path / "odd.npz", e_unit=np.array("kcal"))
    with pytest.raises(SourceError, match=r"odd.npz field e_unit: unknown energy unit 'kcal'; "
                       r"known: kcal/mol .*hartree.*--energy-unit overrides it"):  # fmt: skip
        MD17Source(odd, train=10, valid=5)
    fixed = MD17Source(odd, train=10, valid=5, energy_unit="kcal/mol")
    assert "not recognised" in fixed.describe()["input_units"]["from"]["energy"]
    with pytest.raises(SourceError, match="not found"):
        MD17Source(tmp_path / "missing.npz")
    with pytest.raises(SourceError, match="pass molecule="):
        MD17Source(tmp_path)


def test_point_cloud_record_validation():
    def rec(**arrays):
        base = {K.Z: np.array([6, 1], np.int16), K.POS: np.zeros((2, 3), np.float32)}
        base.update(arrays)
        y = np.zeros(1)
        return SourceRecord("train", 0, "item 0", "arrays", "", y, arrays=base)

    out = featurize_record(rec(forces=np.ones((2, 3))))
    assert set(out) == {K.Z, K.POS, K.Y, K.FORCES}
    assert out[K.FORCES].dtype == np.float32
    with pytest.raises(MoleculeError, match="non-finite positions"):
        point_cloud_record(rec(pos=np.full((2, 3), np.nan)))
    with pytest.raises(MoleculeError, match="non-finite forces"):
        point_cloud_record(rec(forces=np.full((2, 3), np.inf)))
    with pytest.raises(MoleculeError, match=r"'forces' has shape \(3, 3\)"):
        point_cloud_record(rec(forces=np.zeros((3, 3))))
    with pytest.raises(MoleculeError, match=r"'pos' has shape"):
        point_cloud_record(rec(pos=np.zeros((2, 2))))
    with pytest.raises(MoleculeError, match="more than the maximum"):
        point_cloud_record(rec(), max_atoms=1)


def test_shipped_xtb_trajectory():
    path = SHIPPED / "md17_ethanol_xtb.npz"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest in (SHIPPED / "README.md").read_text(), "update the README checksum"
    assert path.stat().st_size < 1_000_000
    with np.load(path, allow_pickle=False) as d:
        assert {"z", "R", "E", "F", "name", "theory"} <= set(d.files)
        z, R, E, F = d["z"], d["R"], d["E"], d["F"]
        assert str(d["e_unit"]) == "kcal/mol" and str(d["r_unit"]) == "Ang"
        assert "GFN2-xTB" in str(d["theory"])
    assert z.tolist() == [6, 6, 8, 1, 1, 1, 1, 1, 1]  # ethanol with H
    m = R.shape[0]
    assert R.shape == F.shape == (m, 9, 3) and E.shape == (m, 1) and m >= 1000
    assert np.isfinite(R).all() and np.isfinite(E).all() and np.isfinite(F).all()
    assert 5 < np.ptp(E) < 100  # kcal/mol, a 500 K trajectory
    assert 5 < np.sqrt(np.mean(F**2)) < 100  # kcal/mol/Å, not eV/Å or Hartree/Bohr
    # F = -dE/dR of an isolated molecule: no net force and no net torque
    assert np.abs(F.sum(1)).max() < 1e-6
    torque = np.cross(R - R.mean(1, keepdims=True), F).sum(1)
    assert np.abs(torque).max() < 0.01  # kcal/mol; SCF convergence noise ~2e-3
    # bonds stay intact: nearest-neighbour distances are molecular
    d = np.linalg.norm(R[:, :, None] - R[:, None], axis=-1) + np.eye(9) * 10
    assert 0.8 < d.min() and d.min(2).max() < 1.7
    src = MD17Source(path)
    assert src.splits() == {"train": 950, "valid": 50, "test": m - 1000}


def test_xtb_generator_small_run(tmp_path):
    pytest.importorskip("tblite")
    pytest.importorskip("ase")
    import subprocess
    import sys

    from suite_env import subprocess_env

    script = SHIPPED.parents[1] / "scripts" / "make_md17_xtb.py"
    out = tmp_path / "w.npz"
    cmd = [sys.executable, str(script), "--smiles", "O", "--name", "water",
           "--frames", "12", "--equilibrate", "2", "--fd-check", "1", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert res.returncode == 0, res.stderr
    assert "finite-difference check" in res.stderr
    src = MD17Source(out, train=8, valid=2)
    assert src.molecule == "water" and src.splits() == {"train": 8, "valid": 2, "test": 2}
    assert src.z.tolist() == [8, 1, 1] and np.isfinite(src.F).all()
