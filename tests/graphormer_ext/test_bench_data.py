"""The data benchmark documented in the README runs end to end on a handful of molecules."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_bench_data_smoke(tmp_path):
    pytest.importorskip("rdkit")
    pytest.importorskip("ogb")
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench" / "bench_data.py"), "--limit", "40",
         "--qm9", "0", "--passes", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for needle in ("B/mol on disk", "ratio", "CLI fixed cost", "<=30 atoms", "<=50 atoms",
                   "size-bucketed", "checksum", "PCQM4Mv2 (3,746,620 molecules) on 16 cores"):
        assert needle in out, needle  # fmt: skip
