"""Charged 5-particle N-body system of the EGNN protocol (Satorras et al. 2021, after Kipf et al.'s
NRI ``ChargedParticlesSim``), vectorised over systems. Written from the protocol's description.

Per system: 5 particles in 3D, charges drawn uniformly from {-1, +1}, initial positions
``N(0, 1)`` per coordinate, initial velocities ``N(0, 1)`` rescaled to norm 0.5 per particle, no box.
Force on i: ``F_i = sum_{j != i} q_i q_j (r_i - r_j) / |r_i - r_j|^3`` (like charges repel), each
component clipped to ``+-0.1 / dt``; ``dt = 0.001``; leapfrog (velocity half-kick first, then
``r += dt v``, ``v += dt F``). Frames are saved every 100 steps (frame k = step 100 (k + 1)); the
input is frame 30 (positions, velocities, charges) and the target frame 40, i.e. positions
**1,000 steps later**. Splits 3,000 / 2,000 / 2,000 systems (independent seeds).

``make_splits(out_dir)`` writes ``{train,valid,test}.npz`` with ``pos`` [S, 5, 3], ``vel`` [S, 5, 3],
``charge`` [S, 5], ``target_pos`` [S, 5, 3] (float32).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["VEL", "CHARGE", "TARGET_POS", "simulate_charged", "make_splits", "load_split",
           "SPLIT_SIZES"]

VEL = "vel"  # [N, 3] velocities
CHARGE = "charge"  # [N] charges (+-1)
TARGET_POS = "target_pos"  # [N, 3] positions 1,000 steps later

SPLIT_SIZES = {"train": 3000, "valid": 2000, "test": 2000}
SPLIT_SEEDS = {"train": 43, "valid": 44, "test": 45}
DT = 1e-3
MAX_F = 0.1 / DT


def _forces(loc: np.ndarray, edges: np.ndarray) -> np.ndarray:
    diff = loc[:, :, None, :] - loc[:, None, :, :]  # [S, n, n, 3] r_i - r_j
    d2 = (diff * diff).sum(-1)
    n = loc.shape[1]
    d2[:, np.arange(n), np.arange(n)] = 1.0
    size = edges / d2 ** 1.5
    size[:, np.arange(n), np.arange(n)] = 0.0
    f = (size[..., None] * diff).sum(2)
    return np.clip(f, -MAX_F, MAX_F)


def simulate_charged(num: int, seed: int, n_balls: int = 5, frame_in: int = 30,
                     frame_out: int = 40, sample_freq: int = 100, loc_std: float = 1.0,
                     vel_norm: float = 0.5, interaction_strength: float = 1.0) -> dict:
    """Simulate ``num`` systems; returns float32 arrays ``pos, vel, target_pos`` [num, n, 3] and
    ``charge`` [num, n] (positions/velocities at frame ``frame_in``, positions at ``frame_out``)."""
    rng = np.random.default_rng(seed)
    charge = rng.choice(np.array([-1.0, 1.0]), size=(num, n_balls))
    edges = interaction_strength * charge[:, :, None] * charge[:, None, :]
    loc = rng.standard_normal((num, n_balls, 3)) * loc_std
    vel = rng.standard_normal((num, n_balls, 3))
    vel = vel * vel_norm / np.linalg.norm(vel, axis=-1, keepdims=True)
    step_in, step_out = sample_freq * (frame_in + 1), sample_freq * (frame_out + 1)
    vel = vel + DT * _forces(loc, edges)
    out = {}
    for i in range(1, step_out + 1):
        loc = loc + DT * vel
        if i == step_in:
            out["pos"], out["vel"] = loc.copy(), vel.copy()
        if i == step_out:
            out["target_pos"] = loc.copy()
            break
        vel = vel + DT * _forces(loc, edges)
    out["charge"] = charge
    return {k: v.astype(np.float32) for k, v in out.items()}


def make_splits(out_dir: str | os.PathLike, sizes: dict | None = None, seed_offset: int = 0) -> dict:
    """Write ``{split}.npz`` for train/valid/test; returns the paths."""
    sizes = dict(SPLIT_SIZES if sizes is None else sizes)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, num in sizes.items():
        data = simulate_charged(num, SPLIT_SEEDS.get(split, 46) + seed_offset)
        path = out / f"{split}.npz"
        np.savez(path, **data)
        paths[split] = str(path)
    return paths


def load_split(path: str | os.PathLike) -> dict:
    with np.load(path) as f:
        return {k: f[k] for k in ("pos", "vel", "charge", "target_pos")}
