"""The data layer at PCQM4Mv2 scale, in one run: record size, build rate, loader rate, projection.

Every figure comes from this run, side by side on the same molecules (RDKit's NCI
``first_5K.smi``, QM9 from the installed ``qm9pack``, ``ogb.utils.smiles2graph`` as the bare
baseline). Times are CPU seconds of this process (``time.process_time``) or of the CLI child
processes (``resource.getrusage``), so that other jobs on a shared machine inflate them less;
wall-clock figures are printed beside them.

1. **Bytes per molecule** on disk (LMDB file size / records), schema 2 against schema 1 (the
   previous format: per-record model arrays, JSON headers; re-encoded here from the same
   molecules), plus per-record zlib level 1 of the schema-2 record (measured, not used).
2. **Build rate**: SMILES -> stored record (``lmdb_writer._process_one``: featurize, encode)
   against bare ``smiles2graph``, in one process, interleaved; the CLI
   (``graphormer-ext-preprocess csv``) per worker and its fixed cost.
3. **Loader**: ``LMDBDataset`` read (crc32 checked) + ``Collator`` (batches of 256), one
   process, at <= 30 and <= 50 atoms and on the long-tailed set (random and size-bucketed
   batches), against schema 1 (model arrays, int64 padding); the checksum's share.
4. **Projection** of the full PCQM4Mv2 build (3,746,620 molecules: train 3,378,606 from the 3D
   SDF, valid/test-dev/test-challenge from SMILES) on a 16-core node, from per-core rates
   measured on a PCQM4Mv2-layout copy of the NCI molecules (<= 51 heavy atoms like
   PCQM4Mv2; NCI's mean size is above PCQM4Mv2's 14.1, so the projection is conservative).

    python scripts/bench/bench_data.py            # ~2-3 minutes on 2 cores
    python scripts/bench/bench_data.py --quick    # 600 molecules, one pass
    python scripts/bench/bench_data.py --limit 40 --qm9 0 --passes 1   # smoke test
"""
from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import pickle
import resource
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

# PCQM4Mv2 (OGB-LSC, split_dict of release v1): molecules per split
PCQM4MV2_SPLITS = {
    "train": 3_378_606,
    "valid": 73_545,
    "test-dev": 147_037,
    "test-challenge": 147_432,
}
PCQM4MV2_TOTAL = sum(PCQM4MV2_SPLITS.values())  # 3,746,620
NODE_CORES = 16
TARGETS = {"bytes": 2000, "build": 0.70, "cli": 0.60, "fixed_s": 1.0, "l30": 20_000,
           "l50": 10_000, "wall_min": 10.0, "disk_gb": 8.0}  # fmt: skip


def cpu() -> float:
    return time.process_time()


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def say(text: str = "") -> None:
    print(text, flush=True)


# --- inputs ---------------------------------------------------------------------------
def nci_smiles() -> list[str]:
    from rdkit import RDConfig

    path = Path(RDConfig.RDDataDir) / "NCI" / "first_5K.smi"
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def smiles_records(smiles: list[str], split: str = "bench"):
    from graphormer_ext.sources.base import SourceRecord

    return [
        SourceRecord(split=split, index=i, item=f"first_5K.smi line {i + 1}", kind="smiles",
                     text=s, y=np.array([len(s)], np.float32))
        for i, s in enumerate(smiles)
    ]  # fmt: skip


# --- schema 1, re-created here to compare against (the previous format) ------------------
def encode_schema1(record: dict) -> bytes:
    header, chunks, offset = [], [], 0
    for name, arr in record.items():
        raw = np.ascontiguousarray(arr).tobytes()
        header.append([name, arr.dtype.str, list(arr.shape), offset])
        chunks.append(raw + b"\0" * ((-len(raw)) % 8))
        offset += len(chunks[-1])
    head = json.dumps(header, separators=(",", ":")).encode()
    prefix = b"GXR1" + struct.pack("<I", len(head)) + head
    return prefix + b"\0" * ((-len(prefix)) % 8) + b"".join(chunks)


_V1_PLANS: dict = {}


def decode_schema1(buf: bytes) -> dict:
    (hlen,) = struct.unpack_from("<I", buf, 4)
    head = bytes(buf[8 : 8 + hlen])
    plan = _V1_PLANS.get(head)
    if plan is None:
        plan = [(n, np.dtype(d), tuple(s), o) for n, d, s, o in json.loads(head)]
        _V1_PLANS[head] = plan
    base = 8 + hlen + ((-(8 + hlen)) % 8)
    return {n: np.ndarray(s, d, buf, base + o) for n, d, s, o in plan}


def write_schema1(path: Path, model_records: list[dict]) -> None:
    import lmdb

    with lmdb.open(str(path), subdir=False, map_size=1 << 33, lock=False) as env:
        with env.begin(write=True) as txn:
            for i, rec in enumerate(model_records):
                txn.put(str(i).encode(), encode_schema1(rec))


# --- 1. sizes -----------------------------------------------------------------------------
def build_split(path: Path, records: list, max_atoms: int | None, remove_hs: bool = True) -> dict:
    from graphormer_ext.data.lmdb_writer import write_split

    return write_split(path, records, split="bench", workers=1, max_atoms=max_atoms,
                       remove_hs=remove_hs, overwrite=True, progress=False)  # fmt: skip


def sizes_report(name: str, path: Path, tmp: Path) -> dict:
    from graphormer_ext.data.lmdb_dataset import LMDBDataset
    from graphormer_ext.featurize.graph import expand_record

    ds = LMDBDataset(path)
    n = len(ds)
    txn = ds._connect()
    values = [bytes(txn.get(_key(i))) for i in range(n)]
    model = [expand_record(ds[i]) for i in range(n)]
    v1 = tmp / f"{name}.schema1.lmdb"
    write_schema1(v1, model)
    row = {
        "set": name,
        "molecules": n,
        "atoms_mean": float(ds.sizes.mean()),
        "disk_B": os.path.getsize(path) / n,
        "value_B": float(np.mean([len(v) for v in values])),
        "zlib1_B": float(np.mean([len(zlib.compress(v, 1)) for v in values])),
        "zlib1_us": _inflate_us(values),
        "schema1_disk_B": os.path.getsize(v1) / n,
        "schema1_path": v1,
    }
    say(f"  {name:10s} {n:5d} mols, {row['atoms_mean']:5.1f} atoms: {row['disk_B']:7.0f} B/mol "
        f"on disk (record {row['value_B']:.0f} B, zlib-1 {row['zlib1_B']:.0f} B taking "
        f"{row['zlib1_us']:.1f} us to inflate); schema 1: "
        f"{row['schema1_disk_B']:8.0f} B/mol ({row['schema1_disk_B'] / row['disk_B']:.0f}x)")
    return row


def _inflate_us(values: list[bytes], reps: int = 3) -> float:
    """CPU us per record to decompress per-record zlib level 1 (the option not taken)."""
    packed = [zlib.compress(v, 1) for v in values]
    best = 1e9
    for _ in range(reps):
        t0 = cpu()
        for p in packed:
            zlib.decompress(p)
        best = min(best, cpu() - t0)
    return 1e6 * best / len(packed)


def _key(i: int) -> bytes:
    from graphormer_ext.data import keys as K

    return K.record_key(i)


# --- 2. build rate ------------------------------------------------------------------------
def build_rate(smiles: list[str], reps: int) -> dict:
    from ogb.utils import smiles2graph
    from rdkit import rdBase

    from graphormer_ext.data.lmdb_writer import _process_one

    ok = []
    with rdBase.BlockLogs():
        for s in smiles:
            try:
                smiles2graph(s)
                ok.append(s)
            except Exception:  # noqa: BLE001 - RDKit cannot read it: a skip for both
                pass
    recs = smiles_records(ok)
    kwargs = dict(max_hops=5, path_convention="fixed", max_atoms=None, remove_hs=True)
    chunks = [slice(i, i + 250) for i in range(0, len(ok), 250)]
    t_bare = t_ours = 0.0
    with rdBase.BlockLogs():
        for _ in range(reps):
            for sl in chunks:  # interleaved, so that load changes hit both alike
                t0 = cpu()
                for s in ok[sl]:
                    smiles2graph(s)
                t1 = cpu()
                for r in recs[sl]:
                    out = _process_one(r, None, kwargs)
                    assert out[0] == 0, out
                t2 = cpu()
                t_bare += t1 - t0
                t_ours += t2 - t1
    n = len(ok) * reps
    res = {"n": len(ok), "bare_us": 1e6 * t_bare / n, "ours_us": 1e6 * t_ours / n}
    res["ratio"] = res["bare_us"] / res["ours_us"]
    say(f"  {len(ok)} NCI SMILES x {reps}: smiles2graph {res['bare_us']:.1f} us/mol, "
        f"SMILES -> stored record {res['ours_us']:.1f} us/mol: ratio {res['ratio']:.2f} "
        f"(goal >= {TARGETS['build']:.2f})")
    return res


def _cli(args: list[str]) -> tuple[float, float]:
    """Run graphormer-ext-preprocess; (wall s, CPU s of it and its workers)."""
    exe = [sys.executable, "-m", "graphormer_ext.preprocess"]
    c0, w0 = children_cpu(), time.perf_counter()
    proc = subprocess.run(exe + args, capture_output=True, text=True)
    wall, used = time.perf_counter() - w0, children_cpu() - c0
    if proc.returncode != 0:
        raise RuntimeError(f"preprocess failed:\n{proc.stderr[-3000:]}")
    return wall, used


def cli_rate(smiles: list[str], tmp: Path, bare_us: float) -> dict:
    csv_path, tiny = tmp / "nci.csv", tmp / "tiny.csv"
    for path, rows in ((csv_path, smiles), (tiny, smiles[:1])):
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["smiles", "y"])
            w.writerows([s, len(s)] for s in rows)
    common = ["--smiles-column", "smiles", "--label-columns", "y", "--no-progress",
              "--overwrite", "--split-fractions", "0.8", "0.1", "0.1"]  # fmt: skip
    res = {}
    for workers in (1, 2):
        fixed = [_cli(["csv", "--path", str(tiny), "--out", str(tmp / "cli0"), "--workers",
                       str(workers), *common]) for _ in range(3)]  # fmt: skip
        res[f"w{workers}_fixed_wall_s"] = min(f[0] for f in fixed)
        res[f"w{workers}_fixed_cpu_s"] = min(f[1] for f in fixed)
    res["fixed_wall_s"] = res["w1_fixed_wall_s"]
    res["fixed_cpu_s"] = res["w1_fixed_cpu_s"]
    for workers in (1, 2):
        wall, used = _cli(["csv", "--path", str(csv_path), "--out", str(tmp / f"cli{workers}"),
                           "--workers", str(workers), *common])  # fmt: skip
        per_mol = (used - res[f"w{workers}_fixed_cpu_s"]) / len(smiles)
        res[f"w{workers}_us"] = 1e6 * per_mol
        res[f"w{workers}_wall_s"] = wall
        res[f"w{workers}_ratio"] = bare_us / (1e6 * per_mol)
    res.update(pool_split(smiles, tmp, bare_us))
    say(f"  CLI fixed cost (1-molecule CSV): {res['fixed_wall_s']:.2f} s wall, "
        f"{res['fixed_cpu_s']:.2f} s CPU with 1 worker, {res['w2_fixed_wall_s']:.2f} s wall, "
        f"{res['w2_fixed_cpu_s']:.2f} s CPU with 2 (goal < {TARGETS['fixed_s']:.0f} s; no torch "
        "import)")
    for workers in (1, 2):
        say(f"  CLI --workers {workers}, {len(smiles)} SMILES: {res[f'w{workers}_us']:.1f} CPU "
            f"us/mol over all processes beyond the fixed cost = {res[f'w{workers}_ratio']:.2f} "
            f"of bare smiles2graph per worker (goal >= {TARGETS['cli']:.2f}); wall "
            f"{res[f'w{workers}_wall_s']:.1f} s")
    say(f"  the same pipeline in this process (write_split, 2 workers): worker processes "
        f"{res['pool_worker_us']:.1f} CPU us/mol = {res['pool_worker_ratio']:.2f} of bare "
        f"smiles2graph per worker; main process {res['pool_main_us']:.1f} us/mol (source, "
        "pool IPC, LMDB writes: the serial share)")
    return res


def pool_split(smiles: list[str], tmp: Path, bare_us: float) -> dict:
    """CPU of the worker processes and of the main process of a 2-worker write_split."""
    from graphormer_ext.data.lmdb_writer import write_split

    recs = smiles_records(smiles)

    def usage(who):
        ru = resource.getrusage(who)
        return ru.ru_utime + ru.ru_stime

    write_split(tmp / "pool.lmdb", recs[:50], workers=2, overwrite=True, progress=False)
    m0, w0 = usage(resource.RUSAGE_SELF), usage(resource.RUSAGE_CHILDREN)
    write_split(tmp / "pool.lmdb", recs, workers=2, overwrite=True, progress=False)
    main = usage(resource.RUSAGE_SELF) - m0
    workers = usage(resource.RUSAGE_CHILDREN) - w0
    n = len(recs)
    return {"pool_worker_us": 1e6 * workers / n, "pool_main_us": 1e6 * main / n,
            "pool_worker_ratio": bare_us / (1e6 * workers / n)}  # fmt: skip


# --- 3. loader ----------------------------------------------------------------------------
def _batches(ds, batch_size: int, bucketed: bool, seed: int) -> list[np.ndarray]:
    from graphormer_ext.data.base import GraphDataset
    from graphormer_ext.data.collator import Collator

    if not bucketed:
        order = np.random.default_rng(seed).permutation(len(ds))
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    g = GraphDataset(ds, Collator(), shuffle=True, seed=seed, size_buckets=True)
    batches = g.batch_by_size(g.ordered_indices(), max_sentences=batch_size)
    np.random.default_rng(seed).shuffle(batches)  # as fairseq shuffles batches
    return batches


def loader_rate(path: Path, passes: int, bucketed: bool = False, schema1: Path | None = None,
                batch_size: int = 256) -> dict:  # fmt: skip
    """Read + collate throughput of one process over random batches (no byte cap, to show
    what a random batch costs) or size-bucketed ones (GraphDataset's default for long-tailed
    data, within the collator's default byte budget)."""
    import lmdb
    import torch

    from graphormer_ext.data.collator import Collator
    from graphormer_ext.data.lmdb_dataset import LMDBDataset

    ds = LMDBDataset(path)
    n = len(ds)
    if schema1 is None:
        coll = Collator() if bucketed else Collator(max_batch_bytes=None)
        read = ds.__getitem__
    else:  # the previous pipeline: model arrays from LMDB, int64 padding
        coll = Collator(index_dtype=torch.int64, max_batch_bytes=None)
        env = lmdb.open(str(schema1), subdir=False, readonly=True, lock=False,
                        readahead=False, meminit=False)  # fmt: skip
        txn = env.begin()

        def read(i):
            return decode_schema1(txn.get(str(i).encode()))

    totals = {"read": 0.0, "collate": 0.0, "wall": 0.0, "count": 0}
    pads, nbytes = [], []
    for p in range(passes + 1):  # pass 0 warms the page cache and the allocator
        for idx in _batches(ds, batch_size, bucketed, seed=p):
            w0, t0 = time.perf_counter(), cpu()
            samples = [(int(i), read(int(i))) for i in idx]
            t1 = cpu()
            batch = coll(samples)
            t2, w2 = cpu(), time.perf_counter()
            if p:
                totals["read"] += t1 - t0
                totals["collate"] += t2 - t1
                totals["wall"] += w2 - w0
                totals["count"] += len(idx)
                pads.append(batch["x"].shape[1])
                nbytes.append(sum(v.numel() * v.element_size() for v in batch.values()))
    if schema1 is not None:
        env.close()
    c = totals["count"]
    return {
        "rate": c / (totals["read"] + totals["collate"]),
        "wall_rate": c / totals["wall"],
        "read_us": 1e6 * totals["read"] / c,
        "collate_us": 1e6 * totals["collate"] / c,
        "pad_n": float(np.mean(pads)),
        "max_batch_MiB": max(nbytes) / 2**20,
        "n": n,
    }


def checksum_cost(path: Path, reps: int = 5) -> float:
    """CPU us per record of verifying its crc32 (zlib.crc32 over the stored bytes)."""
    from graphormer_ext.data.lmdb_dataset import LMDBDataset

    ds = LMDBDataset(path)
    txn = ds._connect()
    values = [bytes(txn.get(_key(i))) for i in range(len(ds))]
    best = 1e9
    for _ in range(reps):
        t0 = cpu()
        for v in values:
            zlib.crc32(memoryview(v)[8:])
        best = min(best, cpu() - t0)
    return 1e6 * best / len(values)


# --- 4. PCQM4Mv2 projection ---------------------------------------------------------------
def make_pcqm_layout(smiles: list[str], root: Path, seed: int = 0) -> dict[str, int]:
    """A PCQM4Mv2-layout copy of molecules (<= 51 heavy atoms): data.csv.gz, split_dict.pt
    (train = rows 0..n-1 as in PCQM4Mv2, then valid/test-dev/test-challenge in PCQM4Mv2's
    proportions) and a train SDF whose records carry coordinates marked 3D (RDKit 2D layout;
    parsing cost does not depend on the values)."""
    import torch
    from rdkit import Chem, rdBase
    from rdkit.Chem import AllChem

    mols = []
    with rdBase.BlockLogs():
        for s in smiles:
            m = Chem.MolFromSmiles(s)
            if m is not None and 0 < m.GetNumAtoms() <= 51:
                mols.append((Chem.MolToSmiles(m), m))
    n = len(mols)
    shares = {k: v / PCQM4MV2_TOTAL for k, v in PCQM4MV2_SPLITS.items()}
    counts = {k: int(round(n * shares[k])) for k in ("valid", "test-dev", "test-challenge")}
    counts["train"] = n - sum(counts.values())
    folder = root / "pcqm4m-v2"
    (folder / "raw").mkdir(parents=True)
    rng = np.random.default_rng(seed)
    with gzip.open(folder / "raw" / "data.csv.gz", "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow(["idx", "smiles", "homolumogap"])
        for i, (s, _) in enumerate(mols):
            gap = "" if i >= counts["train"] + counts["valid"] else f"{rng.normal(5, 1):.6f}"
            w.writerow([i, s, gap])
    start, split_dict = 0, {}
    for name in ("train", "valid", "test-dev", "test-challenge"):
        split_dict[name] = torch.arange(start, start + counts[name])
        start += counts[name]
    torch.save(split_dict, folder / "split_dict.pt")
    (folder / "RELEASE_v1.txt").write_text("PCQM4Mv2 layout, benchmark copy of NCI molecules\n")
    sdf = root / "pcqm4m-v2-train.sdf"
    with open(sdf, "w") as f:
        for _, m in mols[: counts["train"]]:
            AllChem.Compute2DCoords(m)
            conf = m.GetConformer()
            for i, z in enumerate(rng.normal(0, 0.5, m.GetNumAtoms())):
                p = conf.GetAtomPosition(i)
                conf.SetAtomPosition(i, (p.x, p.y, float(z)))
            conf.Set3D(True)
            f.write(Chem.MolToMolBlock(m) + "$$$$\n")
    with tarfile.open(root / "pcqm4m-v2-train.sdf.tar.gz", "w:gz") as tar:
        tar.add(sdf, arcname=sdf.name)
    sdf.unlink()
    return counts


def projection(smiles: list[str], tmp: Path, bytes_2d: float) -> dict:
    """``bytes_2d``: disk bytes per molecule of 2D records of the same molecules (section 1),
    for the SMILES splits (the layout's are too small to measure their own)."""
    from graphormer_ext.data.lmdb_writer import _process_one, _SplitWriter
    from graphormer_ext.sources import pcqm4mv2
    from graphormer_ext.sources.pcqm4mv2 import PCQM4Mv2Source

    root = tmp / "pcqm"
    counts = make_pcqm_layout(smiles, root)
    src = PCQM4Mv2Source(root)
    t0 = cpu()
    pcqm4mv2._read_csv(src.csv_path)
    t_init = cpu() - t0
    t0 = cpu()
    src.checksum()
    t_hash = cpu() - t0
    input_bytes = sum(os.path.getsize(p) for p in src.files())
    kwargs = dict(max_hops=5, path_convention="fixed", max_atoms=None, remove_hs=True)
    per = {}
    for split in ("train", "valid"):  # valid stands for every SMILES split
        t0 = cpu()
        items = list(src.iter_split(split))
        t_iter = cpu() - t0
        t0 = cpu()
        results = [_process_one(it, None, kwargs) for it in items]
        t_work = cpu() - t0
        assert all(r[0] == 0 for r in results), [r for r in results if r[0]][:3]
        chunks = [items[i : i + 256] for i in range(0, len(items), 256)]
        outs = [results[i : i + 256] for i in range(0, len(results), 256)]
        t0 = cpu()
        for c, o in zip(chunks, outs):  # what crosses the pool: records out, results back
            pickle.loads(pickle.dumps(c, pickle.HIGHEST_PROTOCOL))
            pickle.loads(pickle.dumps(o, pickle.HIGHEST_PROTOCOL))
        t_ipc = cpu() - t0
        writer = _SplitWriter(tmp / f"main_{split}.lmdb", split, 1 << 30, 2000)
        t0 = cpu()
        for i, r in enumerate(results):  # the main process's share: LMDB append, statistics
            writer.add(r, i)
        t_put = cpu() - t0
        t0 = cpu()
        writer.finish({"schema_version": 2, "num_entries": len(results)})
        t_finish = cpu() - t0
        m = len(items)
        per[split] = {
            "n": m,
            "worker_us": 1e6 * (t_work + t_ipc / 2) / m,  # featurize + its half of the IPC
            "main_us": 1e6 * (t_iter + t_ipc / 2 + t_put) / m,  # source, IPC, writer
            "finish_s": t_finish,  # index + meta records, sync: once per split
        }
    out = tmp / "pcqm_lmdb"
    wall, used = _cli(["pcqm4mv2", "--root", str(root), "--out", str(out), "--workers", "2",
                       "--no-progress", "--overwrite"])  # fmt: skip
    disk = {"train": os.path.getsize(out / "train.lmdb") / counts["train"], "valid": bytes_2d}
    n_rows = sum(counts.values())
    res = {"counts": counts, "per": per, "disk_B": disk, "cli_wall_s": wall, "cli_cpu_s": used}
    # scale to PCQM4Mv2: per-molecule CPU from this run; 16 workers in parallel, the main
    # process serial; fixed: start-up, CSV + split dict (per row), input hashing (per byte)
    fixed = 1.0 + t_init / n_rows * PCQM4MV2_TOTAL
    hash_rate = input_bytes / max(t_hash, 1e-9)  # bytes per CPU second
    pcq_input = input_bytes / n_rows * PCQM4MV2_TOTAL
    fixed += pcq_input / hash_rate + len(PCQM4MV2_SPLITS) * max(p["finish_s"] for p in per.values())
    wall_s = fixed
    for split, n in PCQM4MV2_SPLITS.items():
        p = per["train" if split == "train" else "valid"]
        wall_s += n * 1e-6 * max(p["worker_us"] / NODE_CORES, p["main_us"])
    disk_total = sum(n * disk["train" if s == "train" else "valid"] for s, n in
                     PCQM4MV2_SPLITS.items())  # fmt: skip
    res.update(wall_min=wall_s / 60, fixed_s=fixed, disk_GB=disk_total / 1e9,
               atoms_mean=None)
    say(f"  layout: {counts} (NCI molecules <= 51 heavy atoms); CLI --workers 2 on it: "
        f"{wall:.1f} s wall, {used:.1f} s CPU")
    for split in ("train", "valid"):
        p = per[split]
        kind = "3D SDF + SMILES check" if split == "train" else "SMILES"
        say(f"  {split:5s} ({kind}): worker {p['worker_us']:.0f} CPU us/mol "
            f"({1e6 / p['worker_us']:,.0f} mol/s per core), main process {p['main_us']:.0f} "
            f"us/mol; {disk[split]:.0f} B/mol on disk"
            + (" (2D records of section 1)" if split == "valid" else ""))
    say(f"  input: {t_init / n_rows * 1e6:.1f} us/row to read data.csv.gz, sha256 "
        f"{hash_rate / 1e6:.0f} MB/s")
    say(f"  => PCQM4Mv2 ({PCQM4MV2_TOTAL:,} molecules) on {NODE_CORES} cores: "
        f"{res['wall_min']:.1f} min (fixed {fixed:.0f} s), {res['disk_GB']:.2f} GB on disk "
        f"(goals <= {TARGETS['wall_min']:.0f} min, <= {TARGETS['disk_gb']:.0f} GB)")
    return res


# --- main ---------------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="keep the files here")
    parser.add_argument("--quick", action="store_true",
                        help="600 NCI and 300 QM9 molecules, one loader pass")
    parser.add_argument("--limit", type=int, default=None, help="first N NCI SMILES only")
    parser.add_argument("--qm9", type=int, default=2000,
                        help="QM9 molecules for the size figure (0: skip QM9)")
    parser.add_argument("--passes", type=int, default=3, help="loader passes per set")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    from graphormer_ext.sources.qm9 import QM9PackSource

    smiles = nci_smiles()
    if args.quick:
        args.limit, args.qm9, args.passes = 600, 300, 1
    if args.limit is not None:
        smiles = smiles[: args.limit]
    load = os.getloadavg()[0]
    say(f"bench_data: {len(smiles)} NCI SMILES, {os.cpu_count()} cores, load average "
        f"{load:.1f}; CPU-time rates (wall in brackets)")
    tmp_ctx = tempfile.TemporaryDirectory(prefix="bench_data_")
    tmp = args.out or Path(tmp_ctx.name)
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        say("\n1. bytes per molecule (LMDB file / records)")
        recs = smiles_records(smiles)
        paths = {}
        for name, cap in (("nci<=30", 30), ("nci<=50", 50), ("nci", 128)):
            paths[name] = tmp / f"{name.replace('<=', '_le')}.lmdb"
            build_split(paths[name], recs, cap)
        if args.qm9 > 0:
            qm9_src = QM9PackSource()
            qm9_items = []
            for item in qm9_src.iter_split("train"):
                qm9_items.append(item)
                if len(qm9_items) >= args.qm9:
                    break
            paths["qm9"] = tmp / "qm9.lmdb"
            build_split(paths["qm9"], qm9_items, None, remove_hs=qm9_src.remove_hs)
        sizes = {name: sizes_report(name, p, tmp) for name, p in paths.items()}

        say("\n2. build rate, SMILES -> stored record, against bare ogb.utils.smiles2graph")
        build = build_rate(smiles, reps=1 if args.quick else 3)
        cli = cli_rate(smiles, tmp, build["bare_us"])

        say(f"\n3. loader: LMDBDataset (crc32 checked) + Collator, batches of 256, one process,"
            f" {args.passes} passes")
        loads = {}
        for name in ("nci<=30", "nci<=50", "nci"):
            new = loader_rate(paths[name], args.passes)
            old = loader_rate(paths[name], args.passes, schema1=sizes[name]["schema1_path"])
            crc = checksum_cost(paths[name])
            loads[name] = {"new": new, "old": old, "crc_us": crc}
            say(f"  {name:8s} random batches: {new['rate']:8,.0f} mol/s [{new['wall_rate']:,.0f}]"
                f" (read {new['read_us']:.1f} + collate {new['collate_us']:.1f} us/mol, padded N "
                f"{new['pad_n']:.1f}, largest batch {new['max_batch_MiB']:.0f} MiB); schema 1: "
                f"{old['rate']:,.0f} mol/s, largest batch {old['max_batch_MiB']:.0f} MiB "
                f"=> {new['rate'] / old['rate']:.2f}x")
            say(f"  {'':8s} checksum: {crc:.2f} us/mol = "
                f"{100 * crc / (new['read_us'] + new['collate_us']):.1f}% of read + collate")
        bucket = loader_rate(paths["nci"], args.passes, bucketed=True)
        loads["nci"]["bucketed"] = bucket
        say(f"  nci      size-bucketed (the default for this long-tailed set): "
            f"{bucket['rate']:,.0f} mol/s [{bucket['wall_rate']:,.0f}] (padded N "
            f"{bucket['pad_n']:.1f}, largest batch {bucket['max_batch_MiB']:.0f} MiB)")

        say(f"\n4. projection: PCQM4Mv2 build on a {NODE_CORES}-core node")
        proj = projection(smiles, tmp, sizes["nci<=50"]["disk_B"])

        s = {k: v for k, v in sizes.items()}
        say("\nsummary (README table)")
        qm9 = (f", QM9 with H + 3D {s['qm9']['disk_B']:.0f} (schema 1 "
               f"{s['qm9']['schema1_disk_B']:,.0f})" if "qm9" in s else "")
        say(f"  bytes/molecule on disk: NCI {s['nci']['disk_B']:.0f} (schema 1 "
            f"{s['nci']['schema1_disk_B']:,.0f}){qm9}; goal <= {TARGETS['bytes']}")
        say(f"  build: {build['ratio']:.2f} of smiles2graph in one process; CLI "
            f"{cli['w1_ratio']:.2f} per worker (1 worker, all CPU), 2 workers: "
            f"{cli['pool_worker_ratio']:.2f} per worker process (+{cli['pool_main_us']:.0f} us/mol "
            f"in the main process; {cli['w2_ratio']:.2f} counting all CPU), fixed "
            f"{cli['fixed_wall_s']:.2f} s")
        say(f"  loader mol/s: <=30 atoms {loads['nci<=30']['new']['rate']:,.0f}, <=50 atoms "
            f"{loads['nci<=50']['new']['rate']:,.0f}, long-tailed "
            f"{loads['nci']['new']['rate']:,.0f}"
            f" random / {bucket['rate']:,.0f} bucketed; checksum "
            f"{loads['nci<=30']['crc_us']:.2f} us/mol")
        say(f"  PCQM4Mv2 on {NODE_CORES} cores: {proj['wall_min']:.1f} min, "
            f"{proj['disk_GB']:.2f} GB")
    finally:
        from graphormer_ext.data.lmdb_dataset import close_envs

        close_envs()
        if args.out is None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
