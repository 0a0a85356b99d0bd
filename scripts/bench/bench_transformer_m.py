#!/usr/bin/env python
"""Training-step throughput and peak memory: fast vs reference Transformer-M modules.

Both implementations of :class:`transformer_m.modules.TransformerMNet` are built with
the same configuration and loaded with the same weights; they see the same synthetic
batch and the same per-molecule mode draw. One *step* is forward + loss + backward (no
optimizer), in training mode with the paper's dropouts (attention 0.1, activation 0.1,
DropPath 0.1, denoising head 0.1). The loss mimics the pre-training criterion: L1 on
the graph-token logit plus ``1 - cos`` between ``atom_output`` and random noise.

Batch. ``--batch-size`` random molecule-like graphs (a random tree with degree <= 4
plus ring closures) with atom counts ~ N(``--mean-atoms``, ``--std-atoms``) clipped to
[2, ``--max-atoms``]; one molecule has exactly ``--max-atoms`` atoms, as the largest
molecule of a real batch does. Features, shortest paths, multi-hop path features
(5 hops), degrees, ``node_type_edge`` and the -inf ``attn_bias`` follow the conventions
of :mod:`graphormer_ext.data.keys`; positions come from a random walk with 1.5 Å bonds.
``--pad-multiple 8`` pads the N + 1 tokens to a multiple of 8 as the project's collator
does (1: no extra padding).

Timing. After ``--warmup`` steps of each, ``--steps`` rounds run one step of each
implementation, alternating which goes first, so that a noisy shared machine slows both
alike. Reported: median seconds per step, molecules/s, and the ratio fast/reference.

Peak memory. On CUDA: ``torch.cuda.max_memory_allocated`` during one step minus the
memory allocated before it (weights and batch). On CPU, ``tracemalloc`` does not see
torch's allocator and ``ru_maxrss`` is blurred by malloc arenas, so the script counts
tensor bytes itself: a ``TorchDispatchMode`` records the storage of every tensor an
ATen operation creates during the step (forward, backward, gradients) and forgets it
once the storage is freed (storage weak references, checked after every operation); the
peak of the live total is reported. Memory internal to one kernel (BLAS workspaces) is
not seen; tensors alive before the step (weights, batch) are not counted, gradients
are. Each implementation is measured in a fresh subprocess.

Example::

    python scripts/bench/bench_transformer_m.py --batch-size 64 --layers 4 \\
        --embed-dim 256 --heads 16 --kernels 128 --steps 10 --threads 1
"""
import argparse
import json
import statistics
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from graphormer_ext.data import keys  # noqa: E402
from transformer_m.modules import TransformerMNet  # noqa: E402

MAX_HOPS = 5
UNREACHABLE_SPD = 510  # Graphormer's value for disconnected pairs (not produced here)
BOND_LENGTH = 1.5  # Å
IMPLEMENTATIONS = ("reference", "fast")


# -------------------------------------------------------------------------------------
# Synthetic batch
# -------------------------------------------------------------------------------------
def _random_molecule(rng: np.random.Generator, n: int):
    """Random connected graph (degree <= 4), bond and atom features, 3D positions."""
    parents = [-1]
    degree = np.zeros(n, dtype=np.int64)
    edges = []
    for a in range(1, n):
        p = int(rng.choice([p for p in range(a) if degree[p] < 4]))
        edges.append((p, a))
        degree[p] += 1
        degree[a] += 1
        parents.append(p)
    for _ in range(int(rng.poisson(n / 8))):  # ring closures
        a, b = (int(v) for v in rng.choice(n, 2, replace=False))
        free = degree[a] < 4 and degree[b] < 4
        if free and (a, b) not in edges and (b, a) not in edges:
            edges.append((a, b))
            degree[a] += 1
            degree[b] += 1
    elements = [5, 6, 7, 8, 15, 16]  # OGB atomic-number index (Z - 1)
    atom_raw = np.stack(
        [
            rng.choice(elements, n, p=[0.65, 0.15, 0.12, 0.03, 0.025, 0.025]),
            rng.integers(0, 2, n),
            degree,
            rng.choice([4, 5, 6], n, p=[0.05, 0.9, 0.05]),
            rng.integers(0, 4, n),
            np.zeros(n, dtype=np.int64),
            rng.integers(1, 4, n),
            rng.integers(0, 2, n),
            rng.integers(0, 2, n),
        ],
        axis=1,
    ).astype(np.int64)  # [n, 9] raw OGB-like features
    n_bonds = len(edges)
    bond_raw = np.stack(
        [
            rng.integers(0, 4, n_bonds),
            np.zeros(n_bonds, np.int64),
            rng.integers(0, 2, n_bonds),
        ],
        axis=1,
    )  # [E, 3]
    pos = np.zeros((n, 3), dtype=np.float32)
    for a in range(1, n):
        step = rng.normal(size=3)
        pos[a] = pos[parents[a]] + BOND_LENGTH * step / np.linalg.norm(step)
    return atom_raw, edges, bond_raw, pos


def _paths(n: int, edges, bond_raw):
    """BFS shortest-path lengths and the bond features along one shortest path."""
    adj = [[] for _ in range(n)]
    bond_of = {}
    for e, (a, b) in enumerate(edges):
        adj[a].append(b)
        adj[b].append(a)
        bond_of[(a, b)] = bond_of[(b, a)] = e
    offsets = keys.FEATURE_OFFSET * np.arange(3)
    spd = np.full((n, n), UNREACHABLE_SPD, dtype=np.int64)
    edge_input = np.zeros((n, n, MAX_HOPS, 3), dtype=np.int64)  # 0 = pad / unused hop
    for s in range(n):
        prev = [-1] * n
        spd[s, s] = 0
        queue = deque([s])
        while queue:
            u = queue.popleft()
            for v in adj[u]:
                if spd[s, v] == UNREACHABLE_SPD:
                    spd[s, v] = spd[s, u] + 1
                    prev[v] = u
                    queue.append(v)
        for t in range(n):
            if t == s or spd[s, t] == UNREACHABLE_SPD:
                continue
            path = [t]
            while path[-1] != s:
                path.append(prev[path[-1]])
            path.reverse()
            for hop in range(min(len(path) - 1, MAX_HOPS)):
                raw = bond_raw[bond_of[(path[hop], path[hop + 1])]]
                edge_input[s, t, hop] = raw + keys.EDGE_INPUT_SHIFT + offsets
    return spd, edge_input


def synthetic_batch(
    batch_size: int,
    mean_atoms: float,
    std_atoms: float,
    max_atoms: int,
    pad_multiple: int,
    seed: int,
) -> dict:
    """Collated batch of random molecules in the project's model-ready conventions."""
    rng = np.random.default_rng(seed)
    sizes = np.rint(rng.normal(mean_atoms, std_atoms, batch_size))
    sizes = np.clip(sizes, 2, max_atoms).astype(int)
    sizes[0] = max_atoms
    B = batch_size
    N = int(np.ceil((max_atoms + 1) / pad_multiple) * pad_multiple) - 1
    x = np.zeros((B, N, 9), np.int64)
    degree = np.zeros((B, N), np.int64)
    spatial_pos = np.zeros((B, N, N), np.int64)
    attn_edge_type = np.zeros((B, N, N, 3), np.int64)
    edge_input = np.zeros((B, N, N, MAX_HOPS, 3), np.int64)
    pos = np.zeros((B, N, 3), np.float32)
    attn_bias = np.zeros((B, N + 1, N + 1), np.float32)
    node_type_edge = np.empty((B, N, N, 2), np.int64)
    node_type_edge[..., 0] = 1
    node_type_edge[..., 1] = keys.NODE_TYPE_J_SHIFT
    atom_offsets = keys.FEATURE_OFFSET * np.arange(9)
    bond_offsets = keys.FEATURE_OFFSET * np.arange(3)
    for b, n in enumerate(sizes):
        atom_raw, edges, bond_raw, p = _random_molecule(rng, int(n))
        x[b, :n] = atom_raw + keys.X_SHIFT + atom_offsets
        spd, ei = _paths(int(n), edges, bond_raw)
        spatial_pos[b, :n, :n] = spd + keys.SPATIAL_SHIFT
        edge_input[b, :n, :n] = ei
        for e, (i, j) in enumerate(edges):
            code = bond_raw[e] + keys.EDGE_TYPE_SHIFT + bond_offsets
            attn_edge_type[b, i, j] = code
            attn_edge_type[b, j, i] = code
        degree[b, :n] = (attn_edge_type[b, :n, :n, 0] > 0).sum(1) + keys.DEGREE_SHIFT
        pos[b, :n] = p - p.mean(0)
        attn_bias[b, :, n + 1 :] = float("-inf")
        node_type_edge[b, :n, :n, 0] = (x[b, :n, 0] + keys.NODE_TYPE_I_SHIFT)[:, None]
        node_type_edge[b, :n, :n, 1] = (x[b, :n, 0] + keys.NODE_TYPE_J_SHIFT)[None, :]
    hops = int(min(MAX_HOPS, max(1, (spatial_pos - 1).clip(0).max())))
    batch = {
        keys.IDX: np.arange(B),
        keys.ATTN_BIAS: attn_bias,
        keys.ATTN_EDGE_TYPE: attn_edge_type,
        keys.SPATIAL_POS: spatial_pos,
        keys.DEGREE: degree,
        keys.OUT_DEGREE: degree.copy(),
        keys.X: x,
        keys.EDGE_INPUT: edge_input[:, :, :, :hops],
        keys.Y: rng.normal(5.0, 1.0, B).astype(np.float32),
        keys.POS: pos,
        keys.NODE_TYPE_EDGE: node_type_edge,
    }
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}


# -------------------------------------------------------------------------------------
# Model, step, measurements
# -------------------------------------------------------------------------------------
def build_model(args, implementation: str) -> TransformerMNet:
    torch.manual_seed(args.seed)  # identical weights for both implementations
    return TransformerMNet(
        num_layers=args.layers,
        embed_dim=args.embed_dim,
        ffn_embed_dim=args.ffn_dim or args.embed_dim,
        num_heads=args.heads,
        num_3d_bias_kernel=args.kernels,
        add_3d=True,
        dropout=0.0,
        attention_dropout=args.attention_dropout,
        act_dropout=args.act_dropout,
        droppath_prob=args.droppath,
        activation_fn="gelu",
        encoder_normalize_before=True,
        apply_init=True,
        atom_head_dropout=args.attention_dropout,
        implementation=implementation,
    )


def make_inputs(args, device):
    batch = synthetic_batch(
        args.batch_size,
        args.mean_atoms,
        args.std_atoms,
        args.max_atoms,
        args.pad_multiple,
        args.seed,
    )
    batch = {k: v.to(device) for k, v in batch.items()}
    gen = torch.Generator().manual_seed(args.seed)
    probs = torch.tensor([0.2, 0.2, 0.6])
    mode_choice = torch.multinomial(probs, args.batch_size, True, generator=gen)
    noise = torch.randn(batch[keys.POS].shape, generator=gen).to(device)
    return batch, mode_choice, noise


def train_step(model, batch, mode_choice, noise) -> float:
    logits, atom_output, _ = model(batch, mode_choice=mode_choice)
    loss = (logits[:, 0, 0] - batch[keys.Y]).abs().sum()
    if atom_output is not None:
        real = batch[keys.X][:, :, 0].ne(0)
        cos = F.cosine_similarity(atom_output.float(), noise, dim=-1)  # [B, N]
        loss = loss + ((1.0 - cos) * real).sum() / real.sum().clamp(min=1)
    loss.backward()
    for p in model.parameters():
        p.grad = None
    return float(loss.detach())


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_timing(args, device) -> dict:
    batch, mode_choice, noise = make_inputs(args, device)
    models = {impl: build_model(args, impl).to(device) for impl in IMPLEMENTATIONS}
    models["fast"].load_state_dict(models["reference"].state_dict())
    for model in models.values():
        model.train()
    for model in models.values():
        for _ in range(args.warmup):
            train_step(model, batch, mode_choice, noise)
    times = {impl: [] for impl in models}
    for step in range(args.steps):
        order = IMPLEMENTATIONS if step % 2 == 0 else IMPLEMENTATIONS[::-1]
        for impl in order:
            _sync(device)
            t0 = time.perf_counter()
            train_step(models[impl], batch, mode_choice, noise)
            _sync(device)
            times[impl].append(time.perf_counter() - t0)
    real = batch[keys.X][:, :, 0].ne(0)
    return {
        "times": times,
        "batch_shape": list(batch[keys.X].shape[:2]),
        "real_atoms": int(real.sum()),
        "real_pairs": int((real.sum(1) ** 2).sum()),
    }


class TensorPeak(TorchDispatchMode):
    """Peak of the live bytes of storages that ATen ops create while the mode is on."""

    def __init__(self, baseline_tensors=()):
        super().__init__()
        self.live = {}
        self.current = 0
        self.peak = 0
        # Storages alive before the step (weights, batch): their views cost nothing.
        self._baseline = {
            StorageWeakRef(t.untyped_storage()).cdata for t in baseline_tensors
        }

    def _sweep(self):
        dead = [key for key, (ref, _) in self.live.items() if ref.expired()]
        for key in dead:
            self.current -= self.live.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._sweep()
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                ref = StorageWeakRef(storage)
                if ref.cdata not in self.live and ref.cdata not in self._baseline:
                    self.live[ref.cdata] = (ref, storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def run_memory(args, device, implementation: str) -> dict:
    batch, mode_choice, noise = make_inputs(args, device)
    model = build_model(args, implementation).to(device).train()
    train_step(model, batch, mode_choice, noise)  # warm-up
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        train_step(model, batch, mode_choice, noise)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        method = "torch.cuda.max_memory_allocated minus memory allocated before"
    else:
        baseline = list(model.parameters()) + list(batch.values()) + [noise]
        tracker = TensorPeak(baseline)
        with tracker:
            train_step(model, batch, mode_choice, noise)
        peak = tracker.peak
        method = "live bytes of tensors created in the step (TorchDispatchMode)"
    return {"peak_bytes": int(peak), "param_bytes": int(param_bytes), "method": method}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--mean-atoms", type=float, default=15.0)
    parser.add_argument("--std-atoms", type=float, default=4.0)
    parser.add_argument("--max-atoms", type=int, default=28)
    parser.add_argument("--pad-multiple", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--embed-dim", type=int, default=256)
    parser.add_argument("--ffn-dim", type=int, default=0, help="0: the embed dim")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kernels", type=int, default=128)
    parser.add_argument("--attention-dropout", type=float, default=0.1)
    parser.add_argument("--act-dropout", type=float, default=0.1)
    parser.add_argument("--droppath", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="0: torch's default")
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--json", default="", help="also write the results here")
    parser.add_argument(
        "--_memory-child", dest="memory_child", default="", help=argparse.SUPPRESS
    )
    return parser.parse_args(argv)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.memory_child:
        print(json.dumps(run_memory(args, device, args.memory_child)))
        return

    timing = run_timing(args, device)
    B, N = timing["batch_shape"]
    real_atoms, real_pairs = timing["real_atoms"], timing["real_pairs"]
    result = {
        "config": vars(args),
        "batch": {"B": B, "N": N, "real_atoms": real_atoms, "real_pairs": real_pairs},
    }
    print(
        f"batch: B={B}, N={N} (T={N + 1}), {real_atoms} real atoms "
        f"(mean {real_atoms / B:.1f}), real pairs {real_pairs / (B * N * N):.0%} of "
        f"the grid; device {device}, {torch.get_num_threads()} threads"
    )
    med = {}
    for impl in IMPLEMENTATIONS:
        med[impl] = statistics.median(timing["times"][impl])
        print(
            f"{impl:>9}: {med[impl] * 1e3:8.1f} ms/step (median of {args.steps}), "
            f"{B / med[impl]:8.1f} molecules/s"
        )
    ratio = med["reference"] / med["fast"]
    print(f"throughput ratio fast/reference: {ratio:.2f}x")
    result.update(median_s=med, throughput_ratio=ratio)

    if not args.skip_memory:
        mem = {}
        child = [sys.executable, str(Path(__file__).resolve())] + argv
        for impl in IMPLEMENTATIONS:
            out = subprocess.run(
                child + ["--_memory-child", impl],
                check=True,
                capture_output=True,
                text=True,
            )
            mem[impl] = json.loads(out.stdout.strip().splitlines()[-1])
            print(
                f"{impl:>9}: peak step memory "
                f"{mem[impl]['peak_bytes'] / 2**20:8.1f} MiB (weights "
                f"{mem[impl]['param_bytes'] / 2**20:.1f} MiB not included)"
            )
        mem_ratio = mem["fast"]["peak_bytes"] / mem["reference"]["peak_bytes"]
        print(f"peak-memory ratio fast/reference: {mem_ratio:.2f}x")
        print(f"  (memory: {mem['fast']['method']})")
        result.update(memory=mem, memory_ratio=mem_ratio)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
