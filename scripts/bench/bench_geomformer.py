#!/usr/bin/env python
"""Training-step throughput of GeoMFormer vs model size (CPU by default).

One step = forward + loss + backward (no optimizer) on a synthetic batch of ``--batch-size``
random molecules with ``--atoms`` atoms (1.5 Å-scale random clouds, atom types 1..9), in training
mode. ``--forces grad`` adds forces as -dE/dR with ``create_graph`` (the MD17 set-up: roughly 2-3x
the cost); ``none`` trains energy + the equivariant head. Reported per size: parameters, median
seconds per step over ``--steps`` (after ``--warmup``), molecules/s, atoms/s.

    python scripts/bench/bench_geomformer.py --sizes 2x32,4x64,4x128,8x128 --batch-size 16 --atoms 20
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from transformer_m.models.geomformer import GeoMFormerConfig, build_geomformer_net  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default="2x32,4x64,4x128,8x128", help="LAYERSxDIM, comma-separated")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kernels", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--atoms", type=int, default=20)
    ap.add_argument("--forces", choices=("none", "grad"), default="none")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    b, n = args.batch_size, args.atoms
    z = torch.randint(1, 10, (b, n), device=args.device)
    pos = torch.randn(b, n, 3, device=args.device) * 1.5
    mask = torch.ones(b, n, dtype=torch.bool, device=args.device)
    batch = {"z": z, "pos": pos, "atom_mask": mask}
    print(f"device {args.device}, threads {torch.get_num_threads()}, batch {b} x {n} atoms, "
          f"forces {args.forces}")
    print(f"{'size':>8} {'params':>10} {'s/step':>8} {'mol/s':>8} {'atoms/s':>9}")
    for size in args.sizes.split(","):
        layers, dim = (int(v) for v in size.lower().split("x"))
        heads = min(args.heads, dim)
        cfg = GeoMFormerConfig(encoder_layers=layers, encoder_embed_dim=dim,
                               encoder_ffn_embed_dim=dim, encoder_attention_heads=heads,
                               num_kernel=args.kernels, force_mode=args.forces)
        net = build_geomformer_net(cfg).to(args.device).train()
        params = sum(p.numel() for p in net.parameters())
        times = []
        for i in range(args.warmup + args.steps):
            t0 = time.perf_counter()
            out = net(batch)
            loss = out["energy"].abs().sum() + out["vector"].abs().sum()
            if "forces" in out and args.forces == "grad":
                loss = loss + out["forces"].abs().sum()
            loss.backward()
            net.zero_grad(set_to_none=True)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        print(f"{size:>8} {params:>10,d} {med:>8.3f} {b / med:>8.1f} {b * n / med:>9.0f}")


if __name__ == "__main__":
    main()
