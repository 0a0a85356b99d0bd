"""Benchmark: compiled path kernels vs the re-created Graphormer/Transformer-M baseline.

Times, over the same real molecules:

(a) baseline: ``_algos_legacy.floyd_warshall`` + ``gen_edge_input(max(dist))`` + truncation to
    ``--max-hops`` hops, the per-access work of the original ``preprocess_item`` + collator;
(b) fast: ``algos.shortest_path_features(max_hops=--max-hops)``;

prints molecules/s for both and the speed ratio, and checks that the outputs are equal.

Example::

    python scripts/bench/bench_algos.py                     # RDKit's NCI first_5K.smi
    python scripts/bench/bench_algos.py --smiles-file mols.smi --limit 2000
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from graphormer_ext import _algos_legacy, algos

BOND_TYPES = ("SINGLE", "DOUBLE", "TRIPLE", "AROMATIC")


def default_smiles_file() -> str:
    from rdkit import RDConfig

    return os.path.join(RDConfig.RDDataDir, "NCI", "first_5K.smi")


def load_graphs(path: str, limit: int, max_atoms: int):
    """Heavy-atom graphs: (adjacency [N, N] int64, edge features [N, N, 3] int64)."""
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")
    graphs, skipped = [], 0
    with open(path) as handle:
        for line in handle:
            if len(graphs) >= limit:
                break
            fields = line.split()
            mol = Chem.MolFromSmiles(fields[0]) if fields else None
            if mol is None or not 0 < mol.GetNumAtoms() <= max_atoms:
                skipped += 1
                continue
            n = mol.GetNumAtoms()
            adj = np.zeros((n, n), dtype=np.int64)
            feat = np.zeros((n, n, 3), dtype=np.int64)
            for bond in mol.GetBonds():
                i, j = bond.GetBeginAtomIdx(), bond.GetEndAtomIdx()
                btype = str(bond.GetBondType())
                code = BOND_TYPES.index(btype) if btype in BOND_TYPES else len(BOND_TYPES)
                # same index layout as attn_edge_type: raw + 2 + 512 * f
                stereo, conj = int(bond.GetStereo()), int(bond.GetIsConjugated())
                row = (code + 2, stereo + 2 + 512, conj + 2 + 1024)
                adj[i, j] = adj[j, i] = 1
                feat[i, j] = feat[j, i] = row
            graphs.append((adj, feat))
    return graphs, skipped


def run_baseline(graphs, max_hops: int, legacy: bool):
    out = []
    for adj, feat in graphs:
        dist, path = _algos_legacy.floyd_warshall(adj, legacy)
        max_dist = int(np.amax(dist))  # 510 for a disconnected molecule, as in the original
        edge_input = _algos_legacy.gen_edge_input(max_dist, path, feat, legacy)
        out.append((dist, edge_input[:, :, :max_hops, :]))
    return out


def run_fast(graphs, max_hops: int, legacy: bool):
    spf = algos.shortest_path_features
    return [spf(adj, feat, max_hops, legacy) for adj, feat in graphs]


def timed(fn, repeats: int):
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def outputs_equal(base, fast) -> bool:
    for (d_a, e_a), (d_b, e_b) in zip(base, fast):
        if not np.array_equal(d_a, d_b):
            return False
        # the baseline may keep hop slots that only unreachable pairs "use" (all -1)
        pad = e_a.shape[2] - e_b.shape[2]
        if pad < 0 or (e_a[:, :, e_b.shape[2]:] != -1).any():
            return False
        if not np.array_equal(e_a[:, :, : e_b.shape[2]], e_b):
            return False
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smiles-file", default=None, help="SMILES per line (first column); "
                        "default: RDKit's Data/NCI/first_5K.smi")
    parser.add_argument("--limit", type=int, default=5000, help="number of molecules to use")
    parser.add_argument("--max-atoms", type=int, default=128, help="skip larger molecules")
    parser.add_argument("--max-hops", type=int, default=5, help="hops kept (multi_hop_max_dist)")
    parser.add_argument("--repeats", type=int, default=3, help="fast-path repeats (best is kept)")
    parser.add_argument("--baseline-repeats", type=int, default=1, help="baseline repeats")
    parser.add_argument("--path-convention", choices=("fixed", "legacy"), default="fixed")
    args = parser.parse_args(argv)

    path = args.smiles_file or default_smiles_file()
    graphs, skipped = load_graphs(path, args.limit, args.max_atoms)
    if not graphs:
        parser.error(f"no usable molecules in {path}")
    legacy = args.path_convention == "legacy"
    sizes = np.array([len(adj) for adj, _ in graphs])
    n_disc = sum(int(algos.floyd_warshall(adj)[0].max() == algos.UNREACHABLE) for adj, _ in graphs)
    print(f"molecules: {len(graphs)} from {path} (skipped {skipped}); heavy atoms mean "
          f"{sizes.mean():.1f}, median {int(np.median(sizes))}, max {sizes.max()}; "
          f"disconnected {n_disc}")
    print(f"max_hops={args.max_hops} path_convention={args.path_convention} "
          f"python {sys.version.split()[0]} numpy {np.__version__}")

    t_base, base = timed(lambda: run_baseline(graphs, args.max_hops, legacy), args.baseline_repeats)
    t_fast, fast = timed(lambda: run_fast(graphs, args.max_hops, legacy), args.repeats)
    equal = outputs_equal(base, fast)
    print(f"baseline (_algos_legacy FW + gen_edge_input + truncate): {t_base:8.3f} s  "
          f"{len(graphs) / t_base:12.1f} molecules/s")
    print(f"fast     (algos.shortest_path_features)                : {t_fast:8.3f} s  "
          f"{len(graphs) / t_fast:12.1f} molecules/s")
    print(f"speed-up: {t_base / t_fast:.1f}x   outputs equal: {equal}")
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
