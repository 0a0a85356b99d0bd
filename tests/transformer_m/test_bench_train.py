"""The training benchmark runs (CPU, CI-sized) and its molecule set is what it says.

``scripts/bench/bench_train.py --preset ci`` runs the real fairseq-train loop of two
configurations (fast and reference path) for timed windows, the model-only ceiling and the
operator/synchronisation count, and prints one table; the figures are checked for sanity here,
not for speed. ``data/bench/pcqm_like_molecules.npz`` is checked against its description, and
``make_bench_molecules.py`` (the command that made it) runs on a few molecules.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fairseq")

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "scripts" / "bench"
NPZ = REPO / "data" / "bench" / "pcqm_like_molecules.npz"


def _bench_molecules():
    sys.path.insert(0, str(BENCH))
    try:
        import bench_molecules
    finally:
        sys.path.remove(str(BENCH))
    return bench_molecules


def test_molecule_set_is_pcqm_sized_real_and_buildable_without_rdkit():
    bm = _bench_molecules()
    mols = bm.BenchMolecules(NPZ)
    sizes = bm.size_summary(mols.num_atoms)
    assert len(mols) == 4890 and NPZ.stat().st_size < 1 << 20
    assert 13.5 <= sizes["mean"] <= 14.5 and sizes["max"] == 51 and sizes["p99"] <= 30
    kept = {k: v["kept"] for k, v in mols.meta["counts"].items()}
    assert kept == {"nci_first_5k": 2474, "wehi": 1866, "chembl_11265_actives": 2, "qm9": 548}
    from graphormer_ext.featurize.graph import expand_record

    records = mols.records(range(0, len(mols), 97))
    for rec, i in zip(records, range(0, len(mols), 97)):
        n = int(mols.num_atoms[i])
        model = expand_record(rec)  # what the loader derives from the stored graph
        assert model["x"].shape == (n, 9) and model["pos"].shape == (n, 3)
        assert np.isfinite(model["pos"]).all() and model["spatial_pos"].shape == (n, n)
        graph = mols.graph(i)  # the OGB form: both directions of every bond
        assert graph["edge_index"].shape[1] == 2 * len(rec["bond_index"])
    assert list(bm.repeated([1, 2, 3], 7)) == [1, 2, 3, 1, 2, 3, 1]


def test_make_bench_molecules_runs(tmp_path):
    pytest.importorskip("rdkit")
    if importlib_missing("qm9pack"):
        pytest.skip("qm9pack not installed")
    out = tmp_path / "m.npz"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "make_bench_molecules.py"), "--out", str(out),
         "--molecules", "40", "--qm9-limit", "3000"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    mols = _bench_molecules().BenchMolecules(out)
    assert 30 <= len(mols) <= 40 and mols.meta["counts"]["qm9"]["kept"] > 0
    assert len(mols.records()) == len(mols)


def importlib_missing(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is None


def test_gpu_bench_script_with_the_ci_preset(tmp_path):
    """scripts/bench/gpu_bench.sh (the GPU command) end to end, CI-sized on the CPU."""
    env = dict(os.environ, PRESET="ci", PYTHON=sys.executable, WHEELS=str(tmp_path / "none"),
               OUT=str(tmp_path / "out"), SHM=str(tmp_path), SKIP_BUILD="1")  # fmt: skip
    proc = subprocess.run(
        ["bash", str(BENCH / "gpu_bench.sh"), "--device", "cpu"],
        capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = (tmp_path / "out" / "bench_train.txt").read_text()
    assert "e2e/ceil" in table and "fast/ref" in table
    # the CUDA tests ran first (pytest is importable here): all skipped without a device
    gpu_tests = (tmp_path / "out" / "gpu_tests.txt").read_text()
    assert "needs a CUDA device" in gpu_tests and "failed" not in gpu_tests
    assert sorted(p.name for p in (tmp_path / "out" / "logs").iterdir()) == ["fast.log", "ref.log"]
    result = json.loads((tmp_path / "out" / "bench_train.json").read_text())
    assert result["data"]["records"] == 300 and result["data"]["unique_molecules"] == 4890
    rows = {r["config"]: r for r in result["rows"]}
    assert set(rows) == {"fast", "ref"}
    for row in rows.values():
        assert row["error"] is None
        assert row["updates_per_s"] > 0 and row["ceiling_updates_per_s"] > 0
        # 8 molecules per update, fewer in the last batch of an epoch (300 records)
        assert 4 <= row["batch"] <= 8 and row["windows"] == 1
        assert row["ops_model"] > 100 and row["ops_rest"] > 10
    # the fast path's forward, loss and backward read nothing back from the device
    assert rows["fast"]["syncs_model"] == {}
    assert result["ratios"]["fast/ref"] > 0


def test_geomformer_and_gsrd_rows_count_no_host_reads_in_model_and_loss(tmp_path):
    """The README's GPU section: in model + loss, 3D-GSRD reads nothing back from the device and
    GeoMFormer only its atom-type range check, which reads the maximum on a CPU (on CUDA it is an
    asynchronous assert)."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "bench_train.py"), "--preset", "ci", "--configs",
         "geomformer,gsrd", "--device", "cpu", "--lmdb-dir", str(tmp_path / "lmdb"),
         "--work-dir", str(tmp_path / "runs"), "--json", str(out)],
        capture_output=True, text=True, timeout=900, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["config"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["geomformer"]["error"] is None and rows["gsrd"]["error"] is None
    assert rows["gsrd"]["syncs_model"] == {}
    assert rows["geomformer"]["syncs_model"] == {"_local_scalar_dense": 1}
