#!/usr/bin/env python
"""The real ``fairseq-train`` loop, timed: updates/s, molecules/s, model-only ceiling, GPU use.

What it runs. Each configuration (a set of ``fairseq-train`` flags, see ``CONFIGS``) is one
``fairseq_cli.train`` process: the real training loop (data loader workers, trainer, optimizer,
logging) on an LMDB of real molecules, with validation and checkpointing off. All processes
are started together and warmed up; then the parent lets one process at a time train for a
timed window, rotating through the configurations for ``--rounds`` rounds, so that a noisy
machine slows all of them alike (figures are medians over rounds). A hook around
``Trainer.train_step`` (in the child process only) pauses the loop between windows and
measures each window (on CUDA after ``torch.cuda.synchronize``).

Then, in each process, the *model-only ceiling*: the same model object (same precision,
same flags) on the same batches (the first ``--ceiling-batches`` batches of its own run,
already on the device), forward + loss + backward + ``torch.optim.AdamW`` step in a bare
Python loop, no fairseq trainer. ``e2e/ceiling`` is the end-to-end rate over that rate.

Also measured, on one update of the real loop under a ``TorchDispatchMode``: ATen operator
calls per update (≈ kernel launches on a GPU) and host synchronisations (``.item()`` /
``bool()`` / ``int()`` of tensors = ``aten._local_scalar_dense``, ``nonzero``, boolean-mask
indexing, device-to-host and blocking host-to-device copies, ``tolist``), split into the
model + loss forward/backward (our code) and the rest of the update (fairseq's trainer and
optimizer). Views are counted apart: they launch no kernel.

On CUDA it samples ``nvidia-smi`` (``utilization.gpu``, the share of time a kernel ran)
during each window.

Data. ``data/bench/pcqm_like_molecules.npz`` (real molecules of PCQM4Mv2-like sizes with 3D
positions, see ``make_bench_molecules.py``) becomes ``--records`` LMDB records with this
project's featurizer (no RDKit): the unique molecules repeated in order (record ``k`` is
molecule ``k mod n``), so the file has the size of a real training split. The measured
size distribution is printed. The LMDB is reused when it exists with the same content.

Examples::

    # CPU, host time per update of a tiny L12 model, this branch vs a checkout of main
    python scripts/bench/bench_train.py --preset cpu-host --baseline-repo /tmp/main
    # one H200: L12 batch 256 on 200k records (see scripts/bench/gpu_bench.sh)
    python scripts/bench/bench_train.py --preset h200
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

# --- model sizes and presets ------------------------------------------------------------
# Transformer-M flags of the released L12 recipe (scripts/recipes/pcqm4mv2_pretrain_L12.sh).
TM_RECIPE = [
    "--task", "graph_prediction", "--criterion", "graph_prediction", "--num-classes", "1",
    "--dataset-name", "PCQM4M-LSC-V2-3D", "--add-3d", "--mode-prob", "0.2,0.2,0.6",
    "--noise-scale", "0.2", "--denoise-weight", "1.0", "--droppath-prob", "0.1",
    "--dropout", "0.0", "--attention-dropout", "0.1", "--act-dropout", "0.1",
    "--adam-betas", "(0.9, 0.999)", "--adam-eps", "1e-8", "--weight-decay", "0.0",
    "--clip-norm", "5.0", "--lr-scheduler", "polynomial_decay", "--power", "1",
    "--lr", "2e-4", "--end-learning-rate", "1e-9", "--warmup-updates", "150000",
    "--total-num-update", "1500000",
]  # fmt: skip
MODELS = {
    # name: (Transformer-M size flags, batch size)
    "l12": (["--arch", "transformer_m_base", "--encoder-layers", "12",
             "--encoder-embed-dim", "768", "--encoder-ffn-embed-dim", "768",
             "--encoder-attention-heads", "32", "--num-3d-bias-kernel", "128"], 256),
    # L12 with tiny width and batch: the time per update is host overhead, as on a GPU
    "tiny": (["--arch", "transformer_m_small", "--encoder-layers", "12",
              "--encoder-embed-dim", "16", "--encoder-ffn-embed-dim", "16",
              "--encoder-attention-heads", "2", "--num-3d-bias-kernel", "4"], 4),
    "ci": (["--arch", "transformer_m_small", "--encoder-layers", "2",
            "--encoder-embed-dim", "16", "--encoder-ffn-embed-dim", "16",
            "--encoder-attention-heads", "2", "--num-3d-bias-kernel", "4"], 8),
}  # fmt: skip
# GeoMFormer (PCQM4Mv2 gap from 3D, its paper's base model) and 3D-GSRD pre-training on the
# same LMDB; fp32, as their recipes (mean/std given: the task would scan all records for them).
FAMILY_RECIPES = {
    "geomformer": ["--task", "geomformer_graph_prediction", "--criterion",
                   "geomformer_graph_prediction", "--energy-mean", "5.0", "--energy-std", "1.0",
                   "--adam-betas", "(0.9, 0.999)", "--clip-norm", "5.0", "--lr", "2e-4"],
    "gsrd": ["--task", "gsrd_pretrain", "--criterion", "gsrd_pretrain", "--mask-ratio", "0.25",
             "--noise-scale", "0.04", "--valid-from-train", "100",
             "--adam-betas", "(0.9, 0.999)", "--weight-decay", "1e-16", "--lr", "5e-5"],
}  # fmt: skip
FAMILY_MODELS = {
    "geomformer": {"l12": (["--arch", "geomformer_base"], 128),
                   "tiny": (["--arch", "geomformer_tiny"], 4),
                   "ci": (["--arch", "geomformer_tiny"], 4)},
    "gsrd": {"l12": (["--arch", "gsrd_base"], 128), "tiny": (["--arch", "gsrd_small"], 4),
             "ci": (["--arch", "gsrd_small"], 4)},
}  # fmt: skip


@dataclass
class Config:
    """One fairseq-train command line of the comparison."""

    name: str
    flags: list
    family: str = "transformer_m"
    baseline: bool = False  # runs the --baseline-repo checkout (main) instead of this tree
    cuda_flags: list = field(default_factory=list)  # added on CUDA only (precision)


def transformer_m_configs() -> dict:
    """Named configurations: today's flags ("legacy": fairseq's adam, --fp16 on CUDA) and the
    flags this benchmark recommends, for the fast and the reference implementation."""
    legacy = ["--optimizer", "adam"]
    new = ["--optimizer", "fused_adam"]
    fast, ref = ["--implementation", "fast"], ["--implementation", "reference"]
    return {
        "main": Config("main", legacy, baseline=True, cuda_flags=["--fp16"]),
        "fast-legacy": Config("fast-legacy", fast + legacy, cuda_flags=["--fp16"]),
        "ref-legacy": Config("ref-legacy", ref + legacy, cuda_flags=["--fp16"]),
        "fast": Config("fast", fast + new, cuda_flags=["--fp16"]),
        "ref": Config("ref", ref + new, cuda_flags=["--fp16"]),
        "fast-bf16": Config("fast-bf16", fast + new + ["--bf16-autocast"]),
        "ref-bf16": Config("ref-bf16", ref + new + ["--bf16-autocast"]),
        # the layer stack compiled (inductor), with CUDA graphs; --pack-multiple bounds the
        # number of distinct shapes (and graph recordings)
        "fast-bf16-compile": Config(
            "fast-bf16-compile",
            fast + new + ["--bf16-autocast", "--torch-compile", "reduce-overhead",
                          "--pack-multiple", "256"],
        ),
        "fast-bf16-compile-nocg": Config(
            "fast-bf16-compile-nocg",
            fast + new + ["--bf16-autocast", "--torch-compile", "default"],
        ),
        "geomformer-legacy": Config("geomformer-legacy", legacy, family="geomformer"),
        "geomformer": Config("geomformer", new, family="geomformer"),
        "gsrd-legacy": Config("gsrd-legacy", legacy, family="gsrd"),
        "gsrd": Config("gsrd", new, family="gsrd"),
    }


PRESETS = {
    # CPU: host time per update of a tiny L12 model, fast path; main vs this branch
    "cpu-host": dict(model="tiny", configs="main,fast-legacy,fast", records=20000,
                     rounds=5, window=4.0, warmup=15, workers=1, ceiling_batches=8),
    # CI: seconds, tiny everything
    "ci": dict(model="ci", configs="fast,ref", records=300, rounds=1, window=0.3,
               warmup=2, workers=0, ceiling_batches=2),
    # one H200: Transformer-M L12 batch 256 (the issue's configuration), GeoMFormer base and
    # 3D-GSRD base batch 128
    "h200": dict(model="l12", configs="fast-legacy,ref-legacy,fast,fast-bf16,ref-bf16,"
                 "geomformer-legacy,geomformer,gsrd-legacy,gsrd", records=200000, rounds=3,
                 window=2.5, warmup=25, workers=8, ceiling_batches=16),
    # one H200, second run: the compiled layer stack (compiles during the warm-up)
    "h200-compile": dict(model="l12", configs="fast-bf16,fast-bf16-compile,"
                         "fast-bf16-compile-nocg", records=200000, rounds=3, window=2.5,
                         warmup=60, workers=8, ceiling_batches=16),
}  # fmt: skip


# --- data -------------------------------------------------------------------------------
def build_lmdb(npz: Path, out: Path, records: int) -> dict:
    """``train.lmdb`` (``records`` records, the molecules repeated) and ``valid.lmdb``."""
    sys.path.insert(0, str(HERE))
    from bench_molecules import BenchMolecules, repeated, size_summary

    from graphormer_ext.data import keys
    from graphormer_ext.data.lmdb_writer import write_split

    digest = hashlib.sha256(npz.read_bytes()).hexdigest()[:16]
    stamp = out / "bench_stamp.json"
    want = {"npz_sha256_16": digest, "records": records, "schema": keys.SCHEMA_VERSION}
    mols = BenchMolecules(npz)
    info = {
        "unique_molecules": len(mols),
        "records": records,
        "sizes": size_summary(mols.num_atoms),
        "sources": {k: v["kept"] for k, v in mols.meta["counts"].items()},
    }
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        return info | {"built_s": 0.0, "path": str(out)}
    t0 = time.perf_counter()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    recs = mols.records()
    write_split(out / "train.lmdb", repeated(recs, records), split="train", workers=1,
                progress=False, total=records)  # fmt: skip
    write_split(out / "valid.lmdb", recs[:256], split="valid", workers=1, progress=False)
    stamp.write_text(json.dumps(want))
    return info | {"built_s": round(time.perf_counter() - t0, 1), "path": str(out)}


def repo_schema(repo: Path) -> int:
    """LMDB schema version of the checkout ``repo`` (1 before the version was recorded)."""
    code = "from graphormer_ext.data import keys; print(getattr(keys, 'SCHEMA_VERSION', 1))"
    env = dict(os.environ, PYTHONPATH=str(repo))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=str(repo),
                         capture_output=True, text=True, check=True)  # fmt: skip
    return int(out.stdout.strip().splitlines()[-1])


def build_baseline_lmdb(npz: Path, out: Path, records: int, repo: Path) -> float:
    """The same molecules written by the checkout ``repo``'s own code (its LMDB schema).

    A checkout from before LMDB schema 2 cannot read this tree's splits; its splits hold the
    model records of its ``graph_to_record`` (paths computed when writing). Runs this script
    in a process whose ``PYTHONPATH`` is ``repo``. Returns the seconds spent (0: reused).
    """
    schema = repo_schema(repo)
    digest = hashlib.sha256(npz.read_bytes()).hexdigest()[:16]
    stamp = out / "bench_stamp.json"
    want = {"npz_sha256_16": digest, "records": records, "schema": schema,
            "writer": "graph_to_record"}  # fmt: skip
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        return 0.0
    t0 = time.perf_counter()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    env = dict(os.environ, PYTHONPATH=str(repo))
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_baseline-lmdb",
                    str(out), "--npz", str(npz), "--records", str(records)],
                   env=env, cwd=str(repo), check=True)  # fmt: skip
    stamp.write_text(json.dumps(want))
    return round(time.perf_counter() - t0, 1)


def _write_baseline_lmdb(out: Path, npz: Path, records: int) -> None:
    """In the baseline's process: model records of its ``graph_to_record``, its writer."""
    sys.path.insert(0, str(HERE))
    from bench_molecules import BenchMolecules, repeated

    from graphormer_ext.data.lmdb_writer import write_split
    from graphormer_ext.featurize.graph import graph_to_record

    mols = BenchMolecules(npz)
    recs = []
    for i in range(len(mols)):
        g = mols.graph(i)
        recs.append(graph_to_record(g["node_feat"], g["edge_index"], g["edge_attr"],
                                    pos=g["pos"], y=g["y"], max_hops=5))  # fmt: skip
    write_split(out / "train.lmdb", repeated(recs, records), split="train", workers=1,
                progress=False, total=records)  # fmt: skip
    write_split(out / "valid.lmdb", recs[:256], split="valid", workers=1, progress=False)


# --- child process: the real fairseq-train loop, paused between timed windows ----------
class _StopTraining(Exception):
    """Raised by the hook to leave fairseq's loop after the timed windows."""


class _OpCounter:
    """TorchDispatchMode counting ATen calls and host synchronisations."""

    SYNC_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2")

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counter.record(func, args, kwargs or {})
                return func(*args, **(kwargs or {}))

        self.mode = Mode()
        self.phase = "rest"
        self.ops = {"model": 0, "rest": 0}
        self.kernels = {"model": 0, "rest": 0}
        self.names = {"model": {}, "rest": {}}
        self.syncs = {"model": {}, "rest": {}}

    def record(self, func, args, kwargs):
        import torch

        name = func.overloadpacket.__name__
        self.ops[self.phase] += 1
        if not (func.is_view or name.startswith("_record_function")):
            self.kernels[self.phase] += 1  # views (t, view, detach, ...) launch nothing
        names = self.names[self.phase]
        names[name] = names.get(name, 0) + 1
        sync = None
        if name in self.SYNC_OPS:
            sync = name
        elif name == "index" and any(
            isinstance(t, torch.Tensor) and t.dtype == torch.bool
            for t in (args[1] if len(args) > 1 else ())
            if t is not None
        ):
            sync = "bool-mask index"
        elif name in ("_to_copy", "copy_"):
            src = args[1] if name == "copy_" else args[0]
            dst_dev = kwargs.get("device") if name == "_to_copy" else args[0].device
            if isinstance(src, torch.Tensor) and dst_dev is not None:
                dst = torch.device(dst_dev).type
                blocking = not (kwargs.get("non_blocking") or (len(args) > 2 and args[2]))
                if src.device.type != "cpu" and dst == "cpu":
                    sync = "device-to-host copy"
                elif src.device.type == "cpu" and dst != "cpu" and blocking:
                    sync = "blocking host-to-device copy"
        if sync:
            bucket = self.syncs[self.phase]
            bucket[sync] = bucket.get(sync, 0) + 1

    def count_tolist(self):
        """Patch ``Tensor.tolist`` / ``numpy`` (no ATen call on CPU) while counting."""
        import torch

        counter, saved = self, {}
        for attr in ("tolist", "numpy"):
            orig = getattr(torch.Tensor, attr)
            saved[attr] = orig

            def wrapped(t, *a, _orig=orig, _attr=attr, **k):
                bucket = counter.syncs[counter.phase]
                bucket[_attr] = bucket.get(_attr, 0) + 1
                return _orig(t, *a, **k)

            setattr(torch.Tensor, attr, wrapped)
        return saved


def _child(args) -> None:
    """Run fairseq-train with the window hook; then the ceiling. Protocol on two pipes."""
    import torch
    from fairseq.trainer import Trainer

    ctl_in = os.fdopen(args.ctl_in, "r")
    ctl_out = os.fdopen(args.ctl_out, "w")
    cuda = torch.cuda.is_available() and "--cpu" not in args.fairseq_args

    def send(msg):
        ctl_out.write(json.dumps(msg) + "\n")
        ctl_out.flush()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    state = {"n": 0, "captured": [], "trainer": None, "window": None}
    orig = Trainer.train_step

    def molecules(samples):
        return sum(int(s.get("nsamples", 0)) for s in samples if s)

    def width(samples):
        """Padded atoms per molecule of the batch (N of [B, N, ...])."""
        for s in samples:
            net_input = s.get("net_input", {}) if s else {}
            batch = net_input.get("batched_data") or net_input.get("batch") or {}
            for key in ("x", "z"):
                if key in batch:
                    return int(batch[key].shape[1])
        return 0

    def train_step(self, samples, raise_oom=False):
        state["trainer"] = self
        state["n"] += 1
        if len(state["captured"]) < args.ceiling_batches:
            state["captured"].append(samples)
        win = state["window"]
        if state["n"] > args.warmup and win is None:
            sync()
            send({"event": "idle", "update": state["n"]})
            cmd = json.loads(ctl_in.readline())
            if cmd["cmd"] == "finish":
                raise _StopTraining()
            if cmd["cmd"] == "count":
                return _counted_step(self, samples, raise_oom)
            win = state["window"] = {"seconds": cmd["seconds"], "updates": 0, "mols": 0,
                                     "width": 0, "t0": time.perf_counter()}  # fmt: skip
        out = orig(self, samples, raise_oom)
        if win is not None:
            win["updates"] += 1
            win["mols"] += molecules(samples)
            win["width"] += width(samples)
            sync()
            elapsed = time.perf_counter() - win["t0"]
            if elapsed >= win["seconds"]:
                send({"event": "window", "seconds": elapsed, "updates": win["updates"],
                      "molecules": win["mols"], "width": win["width"]})  # fmt: skip
                state["window"] = None
        return out

    def _counted_step(trainer, samples, raise_oom):
        counter = _OpCounter()
        task = trainer.task
        task_step = task.train_step

        def model_phase(*a, **k):
            counter.phase = "model"
            try:
                return task_step(*a, **k)
            finally:
                counter.phase = "rest"

        task.train_step = model_phase
        saved = counter.count_tolist()
        try:
            with counter.mode:
                out = orig(trainer, samples, raise_oom)
        finally:
            for attr, fn in saved.items():
                setattr(torch.Tensor, attr, fn)
            del task.train_step
        top = {phase: dict(sorted(n.items(), key=lambda kv: -kv[1])[:25])
               for phase, n in counter.names.items()}  # fmt: skip
        send({"event": "count", "ops": counter.ops, "kernels": counter.kernels,
              "syncs": counter.syncs, "top_ops": top})  # fmt: skip
        return out

    Trainer.train_step = train_step
    sys.argv = ["fairseq-train", *args.fairseq_args]
    from fairseq_cli.train import cli_main

    try:
        cli_main()
    except _StopTraining:
        pass
    Trainer.train_step = orig
    _ceiling(state, send, ctl_in, sync, cuda)


def _ceiling(state, send, ctl_in, sync, cuda) -> None:
    """Model-only loop on the captured batches: forward + loss + backward + AdamW step."""
    import torch
    from fairseq import utils

    trainer = state["trainer"]
    model, criterion = trainer.model, trainer.criterion
    batches = [s for samples in state["captured"] for s in samples if s]
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype

    def prepare(sample):
        if cuda:
            sample = utils.move_to_cuda(sample, device=device)
        if dtype != torch.float32:  # --fp16: as fairseq's _prepare_sample
            sample = utils.apply_to_sample(
                lambda t: t.to(dtype) if t.dtype == torch.float32 else t, sample
            )
        return sample

    batches = [prepare(b) for b in batches]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-9, fused=cuda, foreach=not cuda)
    model.train()

    def step(sample):
        loss, _, _ = criterion(model, sample)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for b in batches[:3]:
        step(b)  # warm-up
    sync()
    send({"event": "ceiling-ready"})
    k = 0
    while True:
        cmd = json.loads(ctl_in.readline())
        if cmd["cmd"] != "ceiling":
            break
        updates = mols = 0
        t0 = time.perf_counter()
        while True:
            b = batches[k % len(batches)]
            k += 1
            step(b)
            updates += 1
            mols += int(b["nsamples"])
            sync()
            if time.perf_counter() - t0 >= cmd["seconds"]:
                break
        send({"event": "window", "seconds": time.perf_counter() - t0, "updates": updates,
              "molecules": mols})  # fmt: skip
    send({"event": "bye"})


# --- parent: start children, schedule windows, sample the GPU, print the table --------
class GpuSampler:
    """``nvidia-smi`` utilization.gpu every 100 ms, with host timestamps."""

    def __init__(self):
        self.samples = []
        self.proc = None
        exe = shutil.which("nvidia-smi")
        if exe is None:
            return
        self.proc = subprocess.Popen(
            [exe, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
             "-lms", "100"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                self.samples.append((time.monotonic(), float(line.split(",")[0])))
            except ValueError:
                continue

    def mean(self, t0: float, t1: float):
        vals = [u for t, u in self.samples if t0 <= t <= t1]
        return statistics.mean(vals) if vals else None

    def close(self):
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()


class Child:
    """One fairseq-train process and its control pipes."""

    def __init__(self, config: Config, argv: list, env: dict, log: Path, cwd: Path):
        self.config = config
        p2c_r, p2c_w = os.pipe()
        c2p_r, c2p_w = os.pipe()
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_child",
               "--_ctl", str(p2c_r), str(c2p_w), "--", *argv]  # fmt: skip
        self.log = log
        self._log_fh = open(log, "w")
        self.proc = subprocess.Popen(
            cmd, env=env, cwd=cwd, stdout=self._log_fh, stderr=subprocess.STDOUT,
            pass_fds=(p2c_r, c2p_w),
        )  # fmt: skip
        os.close(p2c_r)
        os.close(c2p_w)
        self.to_child = os.fdopen(p2c_w, "w")
        self.from_fd = c2p_r
        self._buffer = b""
        self.error = None
        self.results = {"train": [], "ceiling": [], "count": None, "util": [], "util_ceiling": []}

    def send(self, **cmd):
        self.to_child.write(json.dumps(cmd) + "\n")
        self.to_child.flush()

    def receive(self, timeout: float):
        """The next message (one JSON line); unbuffered, so select() sees what is pending."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.from_fd], [], [], max(left, 0))
            if not ready:
                raise TimeoutError(f"{self.config.name}: no answer in {timeout:.0f} s")
            chunk = os.read(self.from_fd, 65536)
            if not chunk:
                code = self.proc.wait()
                tail = self.log.read_text()[-3000:]
                raise RuntimeError(f"{self.config.name}: process ended (exit {code}):\n{tail}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def expect(self, event: str, timeout: float):
        msg = self.receive(timeout)
        if msg.get("event") != event:
            raise RuntimeError(f"{self.config.name}: expected {event!r}, got {msg}")
        return msg

    def fail(self, exc: Exception):
        self.error = str(exc)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def close(self):
        for fh in (self.to_child, self._log_fh):
            try:
                fh.close()
            except OSError:
                pass
        try:
            os.close(self.from_fd)
        except OSError:
            pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def child_argv(cfg: Config, args, lmdb: Path, cuda: bool) -> tuple[list, dict]:
    """fairseq-train arguments and environment of one configuration."""
    repo = Path(args.baseline_repo).resolve() if cfg.baseline else REPO
    if cfg.family == "transformer_m":
        recipe, (size, batch) = TM_RECIPE, MODELS[args.model]
        batch = args.batch_size or batch
        pad = ["--pad-to-multiple", str(args.pad_to_multiple)]
    else:
        recipe, (size, batch) = FAMILY_RECIPES[cfg.family], FAMILY_MODELS[cfg.family][args.model]
        pad = []
    argv = [
        "--user-dir", str(repo / "transformer_m"), "--data-path", str(lmdb),
        *recipe, *size, "--batch-size", str(batch),
        "--max-update", "100000000", "--seed", "1", "--disable-validation", "--no-save",
        "--num-workers", str(args.workers), "--data-buffer-size", "20",
        "--log-format", "json", "--log-interval", "1000", "--no-progress-bar",
        *pad, *cfg.flags,
    ]  # fmt: skip
    argv += cfg.cuda_flags if cuda else ["--cpu"]
    argv += args.extra.split() if args.extra else []
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(repo)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                       if p and Path(p).resolve() != REPO]
    )  # fmt: skip
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONWARNINGS"] = "ignore"
    return argv, env


def run(args) -> dict:
    import torch

    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    all_configs = transformer_m_configs()
    names = [n for n in args.configs.split(",") if n]
    unknown = [n for n in names if n not in all_configs]
    if unknown:
        raise SystemExit(f"unknown configurations {unknown}; choose from {sorted(all_configs)}")
    if "main" in names and not args.baseline_repo:
        raise SystemExit("configuration 'main' needs --baseline-repo (a checkout of main)")
    configs = [all_configs[n] for n in names]

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_train_"))
    work.mkdir(parents=True, exist_ok=True)
    lmdb = Path(args.lmdb_dir) if args.lmdb_dir else work / "lmdb"
    data = build_lmdb(Path(args.npz), lmdb, args.records)
    print(f"data: {data['records']:,} LMDB records from {data['unique_molecules']:,} real "
          "molecules (record k = molecule k mod n: repeated in order when there are more "
          f"records than molecules), built in {data['built_s']} s; heavy atoms of the "
          f"molecules {data['sizes']}; sources {data['sources']}", flush=True)  # fmt: skip

    base_lmdb = lmdb
    if any(c.baseline for c in configs):
        from graphormer_ext.data import keys

        base = Path(args.baseline_repo).resolve()
        schema = repo_schema(base)
        if schema != keys.SCHEMA_VERSION:
            base_lmdb = lmdb.parent / f"{lmdb.name}-schema{schema}"
            built = build_baseline_lmdb(Path(args.npz), base_lmdb, args.records, base)
            print(f"baseline {base}: LMDB schema {schema} (this tree: {keys.SCHEMA_VERSION}); "
                  f"the same records written by its own code to {base_lmdb}, built in "
                  f"{built} s", flush=True)  # fmt: skip

    children = []
    for cfg in configs:
        argv, env = child_argv(cfg, args, base_lmdb if cfg.baseline else lmdb, cuda)
        run_dir = work / cfg.name
        run_dir.mkdir(exist_ok=True)
        children.append(Child(cfg, argv, env, work / f"{cfg.name}.log", run_dir))
    sampler = GpuSampler() if cuda else None
    deadline = time.monotonic() + (args.time_budget or float("inf"))

    def left(limit: float) -> float:
        """``limit`` seconds, or what is left of the time budget (at least 5 s)."""
        return max(5.0, min(limit, deadline - time.monotonic()))

    try:
        for ch in children:  # all warm up in parallel; wait for each to pause
            try:
                ch.expect("idle", left(args.start_timeout))
            except (RuntimeError, TimeoutError) as exc:
                ch.fail(exc)
        live = [c for c in children if c.error is None]
        # the time budget keeps a share for the ceiling phase
        now = time.monotonic()
        train_deadline = now + 0.6 * (deadline - now) if args.time_budget else deadline
        for r in range(args.rounds):
            if r and time.monotonic() > train_deadline:
                print(f"time budget: stopped after {r} rounds", flush=True)
                break
            order = live[r % len(live):] + live[: r % len(live)] if live else []
            for ch in order:
                if ch.error:
                    continue
                try:
                    t0 = time.monotonic()
                    ch.send(cmd="train", seconds=args.window)
                    ch.results["train"].append(ch.expect("window", args.window * 20 + 120))
                    if sampler:
                        ch.results["util"].append(sampler.mean(t0, time.monotonic()))
                    ch.expect("idle", 600)
                except (RuntimeError, TimeoutError) as exc:
                    ch.fail(exc)
        for ch in live:
            if ch.error:
                continue
            try:
                # counting under a dispatch mode would run a compiled model eagerly
                if "--torch-compile" not in ch.config.flags:
                    ch.send(cmd="count")
                    ch.results["count"] = ch.expect("count", 600)
                    ch.expect("idle", 600)
                ch.send(cmd="finish")
                ch.expect("ceiling-ready", 600)
            except (RuntimeError, TimeoutError) as exc:
                ch.fail(exc)
        for r in range(args.rounds):
            if r and time.monotonic() > deadline:
                print(f"time budget: ceiling after {r} rounds", flush=True)
                break
            for ch in live:
                if ch.error:
                    continue
                try:
                    t0 = time.monotonic()
                    ch.send(cmd="ceiling", seconds=args.window)
                    ch.results["ceiling"].append(ch.expect("window", args.window * 20 + 120))
                    if sampler:
                        ch.results["util_ceiling"].append(sampler.mean(t0, time.monotonic()))
                except (RuntimeError, TimeoutError) as exc:
                    ch.fail(exc)
        for ch in live:
            if ch.error is None:
                ch.send(cmd="exit")
    finally:
        if sampler:
            sampler.close()
        for ch in children:
            ch.close()
    return report(children, args, data, cuda)


def _spread(values) -> str:
    """``(min-max)`` of per-window figures."""
    return f"({min(values):.1f}-{max(values):.1f})" if values else "-"


def _rate(windows, key):
    return statistics.median(w[key] / w["seconds"] for w in windows) if windows else None


def report(children, args, data, cuda) -> dict:
    """Print the table; return the figures as a dict."""
    rows = []
    for ch in children:
        res = ch.results
        row = {"config": ch.config.name, "error": ch.error}
        ups, mps = _rate(res["train"], "updates"), _rate(res["train"], "molecules")
        cups, cmps = _rate(res["ceiling"], "updates"), _rate(res["ceiling"], "molecules")
        util = [u for u in res["util"] if u is not None]
        tr = res["train"]
        n_upd = sum(w["updates"] for w in tr)
        row.update(
            batch=sum(w["molecules"] for w in tr) / n_upd if n_upd else None,
            padded_atoms=sum(w.get("width", 0) for w in tr) / n_upd if n_upd else None,
            updates_per_s=ups, molecules_per_s=mps, ms_per_update=1e3 / ups if ups else None,
            ceiling_updates_per_s=cups, ceiling_molecules_per_s=cmps,
            e2e_over_ceiling=ups / cups if ups and cups else None,
            gpu_util=statistics.mean(util) if util else None,
            windows=len(res["train"]),
            ms_per_update_windows=[round(1e3 * w["seconds"] / w["updates"], 2)
                                   for w in tr if w["updates"]],
        )  # fmt: skip
        if res["count"]:
            ops, syncs = res["count"]["ops"], res["count"]["syncs"]
            kern = res["count"]["kernels"]
            row.update(ops_model=ops["model"], ops_rest=ops["rest"],
                       kernels_model=kern["model"], kernels_rest=kern["rest"],
                       syncs_model=syncs["model"], syncs_rest=syncs["rest"],
                       top_ops=res["count"].get("top_ops"))  # fmt: skip
        rows.append(row)

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    dev = "CUDA" if cuda else "CPU"
    print(f"\nfairseq-train, model size {args.model!r}, {dev}; medians of {args.rounds} windows "
          f"of {args.window} s each (batch: molecules per update; N: padded atoms)")  # fmt: skip
    head = (f"{'config':<17} {'batch':>5} {'N':>4} {'upd/s':>8} {'mol/s':>9} {'ms/upd':>8} "
            f"{'(min-max)':>13} "
            f"{'ceil upd/s':>10} "
            f"{'e2e/ceil':>8} {'GPU %':>6} {'ops model':>9} {'ops rest':>9} "
            f"{'non-view':>9} {'syncs model':>11} {'syncs rest':>10}")  # fmt: skip
    print(head)
    print("-" * len(head))
    for row in rows:
        if row["error"]:
            first = row["error"].splitlines()[0]
            print(f"{row['config']:<17} FAILED: {first}")
            continue
        sm = sum(row.get("syncs_model", {}).values()) if "syncs_model" in row else None
        sr = sum(row.get("syncs_rest", {}).values()) if "syncs_rest" in row else None
        nonview = (row["kernels_model"] + row["kernels_rest"]) if "kernels_model" in row else None
        print(f"{row['config']:<17} {fmt(row['batch'], '5.0f')} {fmt(row['padded_atoms'], '4.0f')} "
              f"{fmt(row['updates_per_s'], '8.2f')} "
              f"{fmt(row['molecules_per_s'], '9.0f')} {fmt(row['ms_per_update'], '8.2f')} "
              f"{_spread(row['ms_per_update_windows']):>13} "
              f"{fmt(row['ceiling_updates_per_s'], '10.2f')} "
              f"{fmt(row['e2e_over_ceiling'], '8.2f')} {fmt(row['gpu_util'], '6.0f')} "
              f"{fmt(row.get('ops_model'), '9d')} {fmt(row.get('ops_rest'), '9d')} "
              f"{fmt(nonview, '9d')} {fmt(sm, '11d')} {fmt(sr, '10d')}")  # fmt: skip
    by_name = {r["config"]: r for r in rows if not r["error"]}
    ratios = {}
    for a, b in (("fast", "ref"), ("fast-legacy", "ref-legacy"), ("fast-bf16", "ref-bf16"),
                 ("fast", "main"), ("fast", "fast-legacy"), ("fast-bf16", "fast-legacy"),
                 ("fast-bf16", "main"), ("geomformer", "geomformer-legacy"),
                 ("gsrd", "gsrd-legacy")):
        if a in by_name and b in by_name and by_name[b]["updates_per_s"]:
            ratios[f"{a}/{b}"] = by_name[a]["updates_per_s"] / by_name[b]["updates_per_s"]
    if ratios:
        print("update-rate ratios: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    for row in rows:
        if row.get("syncs_model") or row.get("syncs_rest"):
            print(f"  {row['config']}: syncs in model+loss {row.get('syncs_model')}, "
                  f"in the rest of the update {row.get('syncs_rest')}")
    result = {"data": data, "device": dev, "model": args.model, "rows": rows,
              "ratios": ratios, "args": {k: v for k, v in vars(args).items()
                                         if not k.startswith("_")}}  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="defaults for the options below (explicit options win)")
    p.add_argument("--configs", help=f"comma-separated, from {sorted(transformer_m_configs())}")
    p.add_argument("--model", choices=sorted(MODELS))
    p.add_argument("--batch-size", type=int, default=0, help="0: the model's default")
    p.add_argument("--records", type=int, help="LMDB train records (molecules repeated)")
    p.add_argument("--rounds", type=int)
    p.add_argument("--window", type=float, help="seconds per timed window")
    p.add_argument("--warmup", type=int, help="updates before the first window")
    p.add_argument("--workers", type=int, help="fairseq --num-workers")
    p.add_argument("--ceiling-batches", type=int)
    p.add_argument("--pad-to-multiple", type=int, default=8)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--npz", default=str(REPO / "data" / "bench" / "pcqm_like_molecules.npz"))
    p.add_argument("--lmdb-dir", default="", help="where the LMDB goes (reused if current)")
    p.add_argument("--work-dir", default="", help="logs and run dirs (default: a temp dir)")
    p.add_argument("--baseline-repo", default="", help="checkout of main for config 'main'")
    p.add_argument("--extra", default="", help="more fairseq-train flags for every config")
    p.add_argument("--start-timeout", type=float, default=900.0)
    p.add_argument("--time-budget", type=float, default=0.0,
                   help="seconds for start-up and measurement; fewer rounds when short (0: none)")
    p.add_argument("--json", default="", help="also write the figures here")
    p.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_baseline-lmdb", default="", help=argparse.SUPPRESS)
    p.add_argument("--_ctl", nargs=2, type=int, help=argparse.SUPPRESS)
    p.add_argument("fairseq_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args._child:
        defaults = PRESETS[args.preset or ("h200" if _cuda_available() else "cpu-host")]
        for key, value in defaults.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    return args


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv=None):
    args = parse_args(argv)
    if args._baseline_lmdb:
        _write_baseline_lmdb(Path(args._baseline_lmdb), Path(args.npz), args.records)
        return
    if args._child:
        args.ctl_in, args.ctl_out = args._ctl
        args.fairseq_args = [a for a in args.fairseq_args if a != "--"]
        extra = json.loads(os.environ.get("BENCH_TRAIN_CHILD", "{}"))
        args.warmup = extra.get("warmup", 10)
        args.ceiling_batches = extra.get("ceiling_batches", 8)
        _child(args)
        return
    os.environ["BENCH_TRAIN_CHILD"] = json.dumps(
        {"warmup": args.warmup, "ceiling_batches": args.ceiling_batches}
    )
    run(args)


if __name__ == "__main__":
    main()
