"""The benchmark molecule set (``data/bench/pcqm_like_molecules.npz``) -> LMDB records.

Needs no RDKit: the file holds raw OGB graphs (one row per bond) and 3D positions (written
by ``make_bench_molecules.py``), which are the stored graphs of an LMDB split
(:func:`graphormer_ext.featurize.graph.stored_from_bonds`); the loader derives the shortest
paths from them at load time, as for any split.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np

DEFAULT_NPZ = Path(__file__).resolve().parents[2] / "data" / "bench" / "pcqm_like_molecules.npz"


def size_summary(num_atoms) -> dict:
    """Mean, std, percentiles and maximum of heavy-atom counts."""
    n = np.asarray(num_atoms, dtype=np.float64)
    pct = {f"p{q}": int(np.percentile(n, q)) for q in (5, 25, 50, 75, 95, 99)}
    return {
        "molecules": int(n.size),
        "mean": round(float(n.mean()), 2),
        "std": round(float(n.std()), 2),
        **pct,
        "max": int(n.max()),
    }


class BenchMolecules:
    """The molecules of one benchmark file.

    Args:
        path: the ``.npz`` written by ``make_bench_molecules.py``.

    Attributes:
        num_atoms: int64 [M] heavy atoms per molecule.
        meta: the file's JSON metadata (sources, counts, seed).
    """

    def __init__(self, path: str | Path = DEFAULT_NPZ):
        self.path = Path(path)
        with np.load(self.path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
        self.meta = json.loads(str(arrays.pop("meta")))
        self.source_names = [str(s) for s in arrays.pop("source_names")]
        self.num_atoms = arrays["num_atoms"].astype(np.int64)
        self.num_bonds = arrays["num_bonds"].astype(np.int64)
        self._atom_start = np.concatenate([[0], np.cumsum(self.num_atoms)])
        self._bond_start = np.concatenate([[0], np.cumsum(self.num_bonds)])
        if self._atom_start[-1] != len(arrays["node_feat"]) or self._bond_start[-1] != len(
            arrays["bonds"]
        ):
            raise ValueError(f"{self.path}: atom/bond counts do not match the arrays")
        self._arrays = arrays

    def __len__(self) -> int:
        return len(self.num_atoms)

    def graph(self, i: int) -> dict[str, np.ndarray]:
        """Raw OGB graph of molecule ``i``: both directions of every bond, as OGB lists them."""
        a0, a1 = self._atom_start[i], self._atom_start[i + 1]
        b0, b1 = self._bond_start[i], self._bond_start[i + 1]
        bonds = self._arrays["bonds"][b0:b1].astype(np.int64)  # [b, 2]
        feat = self._arrays["bond_feat"][b0:b1].astype(np.int64)  # [b, 3]
        edge_index = np.empty((2, 2 * len(bonds)), np.int64)
        edge_index[:, 0::2] = bonds.T
        edge_index[:, 1::2] = bonds[:, ::-1].T
        return {
            "node_feat": self._arrays["node_feat"][a0:a1].astype(np.int64),
            "edge_index": edge_index,
            "edge_attr": np.repeat(feat, 2, axis=0),
            "pos": self._arrays["pos"][a0:a1].astype(np.float32),
            "y": np.array([self._arrays["y"][i]], np.float32),
        }

    def records(self, indices=None) -> list[dict]:
        """Stored-graph records (LMDB schema 2; 5 path hops, fixed path convention)."""
        from graphormer_ext.featurize.graph import stored_from_bonds

        indices = range(len(self)) if indices is None else indices
        out = []
        for i in indices:
            i = int(i)
            a0, a1 = self._atom_start[i], self._atom_start[i + 1]
            b0, b1 = self._bond_start[i], self._bond_start[i + 1]
            out.append(
                stored_from_bonds(
                    self._arrays["node_feat"][a0:a1],
                    self._arrays["bonds"][b0:b1],
                    self._arrays["bond_feat"][b0:b1],
                    pos=self._arrays["pos"][a0:a1].astype(np.float32),
                    y=np.array([self._arrays["y"][i]], np.float32),
                )
            )
        return out


def repeated(records: list[dict], total: int) -> Iterator[dict]:
    """``total`` records cycling through ``records`` (record ``k`` is ``records[k % n]``)."""
    n = len(records)
    for k in range(total):
        yield records[k % n]
