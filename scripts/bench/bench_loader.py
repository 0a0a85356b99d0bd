"""Throughput of LMDBDataset + Collator in one process (one loader worker's cost), random
batches of any LMDB split; ``bench_data.py`` runs the full data-layer comparison.

Builds an LMDB of real molecules from RDKit's shipped NCI ``first_5K.smi`` through the
featurization pipeline (or takes ``--lmdb``), then reads and collates it in random
batches after a warm-up pass.

    python scripts/bench/bench_loader.py        # build from first_5K.smi, then bench
    python scripts/bench/bench_loader.py --lmdb out/train.lmdb
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _default_smi() -> Path:
    from rdkit import RDConfig

    return Path(RDConfig.RDDataDir) / "NCI" / "first_5K.smi"


def _smiles_records(path: Path, limit: int | None):
    from graphormer_ext.sources.base import SourceRecord

    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if limit is not None and i >= limit:
                return
            smiles = line.split()[0]
            yield SourceRecord(
                split="bench",
                index=i,
                item=f"{path.name} line {i + 1}",
                kind="smiles",
                text=smiles,
                y=np.array([float(len(smiles))], np.float32),
            )


def build(
    smi: Path, out: Path, workers: int, max_atoms: int, limit: int | None
) -> Path:
    from graphormer_ext.data.lmdb_writer import write_split

    path = out / "bench.lmdb"
    t0 = time.perf_counter()
    meta = write_split(
        path,
        _smiles_records(smi, limit),
        split="bench",
        workers=workers,
        max_atoms=max_atoms,
        overwrite=True,
        progress=False,
    )
    dt = time.perf_counter() - t0
    c = meta["counts"]
    print(
        f"built {path}: {c['kept']} kept, {c['skipped']} skipped of {c['read']} "
        f"in {dt:.1f}s "
        f"({c['read'] / dt:,.0f} mol/s featurization with {workers} workers)"
    )
    return path


def bench(
    path: Path, batch_size: int, passes: int, pad_multiple: int, seed: int
) -> None:
    from graphormer_ext.data.collator import Collator
    from graphormer_ext.data.lmdb_dataset import LMDBDataset

    ds = LMDBDataset(path)
    # random batches, no byte cap: what a batch costs without size bucketing
    coll = Collator(max_hops=5, pad_multiple=pad_multiple, max_batch_bytes=None)
    n = len(ds)
    rng = np.random.default_rng(seed)
    print(
        f"{path}: {n} molecules, atoms mean {ds.sizes.mean():.1f} "
        f"max {ds.sizes.max()}; "
        f"batch {batch_size}, pad_multiple {pad_multiple}"
    )

    def one_pass():
        order = rng.permutation(n)
        t_read = t_coll = 0.0
        count = 0
        n_pad = []
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            t0 = time.perf_counter()
            samples = [(int(i), ds[int(i)]) for i in idx]
            t1 = time.perf_counter()
            batch = coll(samples)
            t2 = time.perf_counter()
            t_read += t1 - t0
            t_coll += t2 - t1
            count += len(idx)
            n_pad.append(batch["x"].shape[1])
        return count, t_read, t_coll, float(np.mean(n_pad))

    one_pass()  # warm-up: page cache, allocator
    total = [0, 0.0, 0.0]
    for p in range(passes):
        count, t_read, t_coll, mean_n = one_pass()
        total[0] += count
        total[1] += t_read
        total[2] += t_coll
        print(
            f"pass {p + 1}: {count / (t_read + t_coll):,.0f} mol/s  (read+decode "
            f"{count / t_read:,.0f} mol/s, collate {count / t_coll:,.0f} mol/s, "
            "mean padded N "
            f"{mean_n:.1f})"
        )
    count, t_read, t_coll = total
    print(
        f"overall: {count / (t_read + t_coll):,.0f} molecules/s in one process "
        f"(read+decode {1e6 * t_read / count:.1f} us/mol, "
        f"collate {1e6 * t_coll / count:.1f} us/mol)"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--lmdb", type=Path, default=None, help="existing split file to read"
    )
    parser.add_argument(
        "--smi",
        type=Path,
        default=None,
        help="SMILES file (default: RDKit first_5K.smi)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="where to build (default: a temp dir)"
    )
    parser.add_argument("--limit", type=int, default=None, help="first N SMILES only")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--max-atoms", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--pad-multiple", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.lmdb is not None:
        bench(args.lmdb, args.batch_size, args.passes, args.pad_multiple, args.seed)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        path = build(
            args.smi or _default_smi(), out, args.workers, args.max_atoms, args.limit
        )
        bench(path, args.batch_size, args.passes, args.pad_multiple, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
