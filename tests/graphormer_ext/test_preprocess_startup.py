"""The preprocessing CLI starts without torch; PCQM4Mv2's split_dict.pt is read without it.

Tier A: CPU only, no fairseq.
"""
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from graphormer_ext.sources import pcqm4mv2

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "data" / "pcqm4m-v2-qm9"


def test_split_dict_without_torch_equals_torch_load(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "split_dict.pt"
    saved = {
        "train": torch.arange(10),
        "valid": torch.arange(12, dtype=torch.int32)[::3],  # a strided view
        "test-dev": torch.tensor([], dtype=torch.long),
        "numpy": np.arange(4, dtype=np.int16),
        "list": [7, 8],
    }
    torch.save(saved, path)
    raw = pcqm4mv2._read_torch_zip(path)
    for name, value in saved.items():
        want = value.numpy() if hasattr(value, "numpy") else np.asarray(value)
        got = np.asarray(raw[name])
        assert got.dtype == want.dtype and np.array_equal(got, want), name
    got = pcqm4mv2.load_split_dict(path)
    assert got["valid"].tolist() == [0, 3, 6, 9] and got["list"].dtype == np.int64
    shipped = DEMO / "pcqm4m-v2" / "split_dict.pt"
    a, b = pcqm4mv2.load_split_dict(shipped), pcqm4mv2._torch_load(shipped)
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k].numpy()) for k in b)


class _Payload:
    def __reduce__(self):
        return (print, ("payload ran",))


def test_split_dict_reader_runs_no_code(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    path = tmp_path / "split_dict.pt"
    torch.save({"train": torch.arange(3), "x": _Payload()}, path)
    with pytest.raises(pickle.UnpicklingError, match="not allowed"):
        pcqm4mv2._read_torch_zip(path)
    with pytest.raises(pcqm4mv2.SourceError, match="cannot read the split dict"):
        pcqm4mv2.load_split_dict(path)  # the torch fallback is weights-only
    assert "payload ran" not in capsys.readouterr().out


def test_preprocess_cli_never_imports_torch(tmp_path):
    """graphormer-ext-preprocess (PCQM4Mv2 layout: CSV + train SDF + split_dict.pt, then the
    stats table) runs without importing torch, so its start-up stays well under a second."""
    pytest.importorskip("rdkit")
    code = (
        "import sys\n"
        "from graphormer_ext.preprocess import main\n"
        f"rc = main(['pcqm4mv2', '--root', {str(DEMO)!r}, '--out', {str(tmp_path / 'o')!r},"
        " '--limit', '20', '--workers', '1', '--no-progress'])\n"
        "assert rc == 0, rc\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'fairseq'))\n"
        "print('IMPORTED', bad)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "IMPORTED []" in proc.stdout, proc.stdout[-2000:]
    assert (tmp_path / "o" / "train.lmdb").exists()
