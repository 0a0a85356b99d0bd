#!/usr/bin/env python
"""Build ``data/bench/pcqm_like_molecules.npz``: real molecules of PCQM4Mv2-like sizes, in 3D.

The training benchmark (``scripts/bench/bench_train.py``) needs molecules whose heavy-atom
counts look like PCQM4Mv2's (mean about 14, a tail to about 50) on machines without RDKit
(the GPU machine). This script, run once where RDKit and ``qm9pack`` are installed, writes
the raw OGB graphs (atom and bond features, bonds, 3D positions) of such a set into one
compressed file (< 1 MB, committed); the benchmark turns them into LMDB records there with
the project's own featurizer (:func:`graphormer_ext.featurize.graph.graph_to_record`, the
Cython shortest paths, no RDKit).

Molecules (all real, drawn at random, seeded) fill a target number per heavy-atom count
(:func:`target_counts`: a normal of mean ``--mean-atoms`` and std ``--std-atoms`` over 2-30
atoms plus a ``--tail`` share spread over 31-``--max-atoms``):

* QM9 from ``qm9pack`` (DFT geometries, hydrogens removed after bond perception) where it
  has molecules of that size (up to 9 heavy atoms);
* otherwise RDKit's shipped NCI ``first_5K.smi``, the WEHI screening set of the PAINS tests
  (``Pains/test_data/wehi_mols.csv``) and the ChEMBL actives of the ``fraggle`` contrib,
  in 3D by RDKit ETKDGv3 + MMFF94 (seeded per molecule; failed embeddings are counted and
  the next candidate of that size is taken).

Sizes without enough candidates are reported as a shortfall in the file's metadata. Labels are a
stand-in for the HOMO-LUMO gap (a fixed function of the graph, in "eV": the benchmark
measures speed, and a learnable label keeps the loss meaningful).

File layout (all arrays concatenated over molecules; ``n`` heavy atoms, ``b`` bonds):
``num_atoms`` int16 [M], ``num_bonds`` int16 [M], ``node_feat`` uint8 [sum n, 9] (raw OGB
atom features), ``bonds`` uint8 [sum b, 2] (atom indices within the molecule),
``bond_feat`` uint8 [sum b, 3] (raw OGB bond features), ``pos`` float16 [sum n, 3] (Å,
centred, rounded to float16), ``y`` float32 [M], ``source`` uint8 [M] (index into
``source_names``), and ``meta`` (a JSON string: sources, counts, seed, size summary).

    python scripts/bench/make_bench_molecules.py --out data/bench/pcqm_like_molecules.npz
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
for _path in (REPO, Path(__file__).resolve().parent):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from bench_molecules import size_summary  # noqa: E402  (scripts/bench/)

logger = logging.getLogger("make_bench_molecules")

SOURCE_NAMES = ("nci_first_5k", "wehi", "chembl_11265_actives", "qm9")


def _rdkit_sets() -> dict[str, list[str]]:
    """SMILES of the RDKit-shipped sets, by source name."""
    from rdkit import RDConfig

    data, contrib = Path(RDConfig.RDDataDir), Path(RDConfig.RDContribDir)
    nci = [line.split()[0] for line in open(data / "NCI" / "first_5K.smi") if line.strip()]
    with open(data / "Pains" / "test_data" / "wehi_mols.csv", newline="") as f:
        wehi = [row[0] for row in csv.reader(f) if row]
    chembl_path = contrib / "fraggle" / "data" / "ChEMBL_11265_actives.smi"
    chembl = [line.split()[0] for line in open(chembl_path) if line.strip()]
    return {"nci_first_5k": nci, "wehi": wehi, "chembl_11265_actives": chembl}


def stand_in_gap(node_feat: np.ndarray, bonds: np.ndarray, bond_feat: np.ndarray) -> float:
    """A learnable stand-in for the HOMO-LUMO gap (eV) from the OGB graph.

    Falls with size and with conjugation (aromatic atoms, double/triple bonds), rises with
    heteroatoms: 8 - 0.08 n - 1.5 f_aromatic - 0.1 n_multiple + 0.5 f_hetero.
    """
    n = len(node_feat)
    aromatic = float((node_feat[:, 7] == 1).mean()) if n else 0.0
    hetero = float((node_feat[:, 0] != 5).mean()) if n else 0.0  # raw atomic_num = Z - 1
    multiple = int(np.isin(bond_feat[:, 0], (1, 2)).sum()) if len(bond_feat) else 0
    return 8.0 - 0.08 * n - 1.5 * aromatic - 0.1 * multiple + 0.5 * hetero


def _graph(mol, item: str):
    from graphormer_ext.featurize.ogb_features import mol_to_graph

    g = mol_to_graph(mol, item)
    bonds = g["edge_index"][:, 0::2].T  # one row per bond (OGB: 2k = begin -> end)
    bond_feat = g["edge_attr"][0::2]
    return g["node_feat"], bonds, bond_feat


def embed_smiles(smiles: str, item: str, seed: int):
    """Heavy-atom molecule with an ETKDGv3 + MMFF94 conformer, or None if it fails."""
    from rdkit import Chem

    from graphormer_ext.sources.base import MoleculeError
    from graphormer_ext.sources.custom import embed_conformer

    try:
        mol = embed_conformer(smiles, item, seed=seed, mmff_iters=200)
    except (MoleculeError, RuntimeError):  # RDKit raises RuntimeError on bad bounds
        return None
    return Chem.RemoveHs(mol)


def heavy_atoms(smiles: str) -> int:
    from rdkit import Chem

    mol = Chem.MolFromSmiles(smiles)
    return -1 if mol is None else mol.GetNumAtoms()


def target_counts(total: int, mean: float, std: float, tail: float, max_atoms: int) -> dict:
    """Molecules wanted per heavy-atom count: a rounded normal(mean, std) over 2..30 plus
    a uniform tail of ``tail`` of the molecules over 31..``max_atoms``.

    An approximation of PCQM4Mv2's sizes (mean 14.1 heavy atoms, most molecules between
    9 and 20, largest about 50); the real histogram is not available offline.
    """
    body = np.arange(2, 31)
    weight = np.exp(-0.5 * ((body - mean) / std) ** 2)
    counts = {int(n): w for n, w in zip(body, weight / weight.sum() * total * (1 - tail))}
    tail_sizes = np.arange(31, max_atoms + 1)
    for n in tail_sizes:
        counts[int(n)] = total * tail / len(tail_sizes)
    return {n: int(round(c)) for n, c in counts.items() if round(c) > 0}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "data/bench/pcqm_like_molecules.npz")
    parser.add_argument("--molecules", type=int, default=5000)
    parser.add_argument("--mean-atoms", type=float, default=13.9)
    parser.add_argument("--std-atoms", type=float, default=3.6)
    parser.add_argument("--tail", type=float, default=0.004, help="share above 30 atoms")
    parser.add_argument("--max-atoms", type=int, default=51)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--qm9-limit", type=int, default=None,
                        help="read only the first N QM9 molecules (tests)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from rdkit import RDLogger

    RDLogger.DisableLog("rdApp.*")
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    wanted = target_counts(args.molecules, args.mean_atoms, args.std_atoms, args.tail,
                           args.max_atoms)  # fmt: skip

    # candidates per heavy-atom count: (source, index); QM9 first where it has the size
    # (DFT geometries), then the RDKit sets in random order
    smiles_sets = _rdkit_sets()
    counts: dict[str, dict[str, int]] = {}
    by_size: dict[int, list[tuple[str, int]]] = {}
    for name, smiles in smiles_sets.items():
        sizes = np.array([heavy_atoms(s) for s in smiles])
        counts[name] = {"in_file": len(smiles), "unparsable": int((sizes < 0).sum()),
                        "over_max_atoms": int((sizes > args.max_atoms).sum()),
                        "embed_failed": 0, "kept": 0}  # fmt: skip
        for i in np.flatnonzero((sizes >= 2) & (sizes <= args.max_atoms)):
            by_size.setdefault(int(sizes[i]), []).append((name, int(i)))
    for cands in by_size.values():
        rng.shuffle(cands)

    from graphormer_ext.featurize.molecules import mol_from_xyz
    from graphormer_ext.sources.qm9 import QM9PackSource

    qm9 = QM9PackSource(split="all", use_3d=True, remove_hs=True, limit=args.qm9_limit)
    counts["qm9"] = {"in_file": len(qm9.gdb_index), "perception_failed": 0, "kept": 0}
    qm9_sizes = np.array([sum(e != "H" for e in qm9.elements(i))
                          for i in range(len(qm9.gdb_index))])  # fmt: skip
    for n in np.unique(qm9_sizes):
        if n >= 2:
            cands = [("qm9", int(i)) for i in np.flatnonzero(qm9_sizes == n)]
            rng.shuffle(cands)
            by_size[int(n)] = cands + by_size.get(int(n), [])
    logger.info("candidates indexed (%.0f s)", time.perf_counter() - t0)

    mols = []
    shortfall = {}
    for n, want in sorted(wanted.items()):
        got = 0
        for name, idx in by_size.get(n, []):
            if got == want:
                break
            mol = _load(name, idx, smiles_sets, qm9, mol_from_xyz, args.seed, counts)
            if mol is None:
                continue
            node_feat, bonds, bond_feat = _graph(mol, f"{name} #{idx}")
            mols.append((SOURCE_NAMES.index(name), node_feat, bonds, bond_feat,
                         mol.GetConformer().GetPositions()))  # fmt: skip
            counts[name]["kept"] += 1
            got += 1
        if got < want:
            shortfall[n] = want - got
    logger.info("kept %s, shortfall by size %s (%.0f s)",
                {k: v["kept"] for k, v in counts.items()}, shortfall,
                time.perf_counter() - t0)  # fmt: skip

    order = rng.permutation(len(mols))  # mix the sources
    mols = [mols[i] for i in order]
    num_atoms = np.array([len(m[1]) for m in mols], np.int16)
    pos = np.concatenate([m[4] - m[4].mean(0) for m in mols]).astype(np.float16)
    y = np.array([stand_in_gap(m[1], m[2], m[3]) for m in mols], np.float32)
    meta = {
        "script": "scripts/bench/make_bench_molecules.py",
        "args": {k: str(v) for k, v in vars(args).items() if k != "out"},
        "counts": counts,
        "shortfall_by_size": shortfall,
        "label": "stand-in HOMO-LUMO gap (eV) from the graph, see stand_in_gap()",
        "sizes": size_summary(num_atoms),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.out,
        num_atoms=num_atoms,
        num_bonds=np.array([len(m[2]) for m in mols], np.int16),
        node_feat=np.concatenate([m[1] for m in mols]).astype(np.uint8),
        bonds=np.concatenate([m[2] for m in mols]).astype(np.uint8),
        bond_feat=np.concatenate([m[3] for m in mols]).astype(np.uint8),
        pos=pos,
        y=y,
        source=np.array([m[0] for m in mols], np.uint8),
        source_names=np.array(SOURCE_NAMES),
        meta=np.array(json.dumps(meta)),
    )
    logger.info(
        "%s: %d molecules, %.0f KiB; heavy atoms %s",
        args.out, len(mols), args.out.stat().st_size / 1024, meta["sizes"],
    )


def _load(name, idx, smiles_sets, qm9, mol_from_xyz, seed, counts):
    """The heavy-atom molecule with 3D coordinates, or None (counted) if that fails."""
    if name == "qm9":
        rec = qm9.record("all", idx, idx)
        try:
            return mol_from_xyz(rec.text, rec.item, template_smiles=rec.template_smiles)
        except ValueError:
            counts[name]["perception_failed"] += 1
            return None
    mol = embed_smiles(smiles_sets[name][idx], f"{name} #{idx}", seed=seed + idx)
    if mol is None:
        counts[name]["embed_failed"] += 1
    return mol


if __name__ == "__main__":
    main()
