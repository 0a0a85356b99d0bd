"""MD17 / revised MD17 trajectories (energies + forces) as point-cloud records.

Two npz layouts are read (units: Å, kcal/mol, kcal/mol/Å in both):

- sGDML MD17 (``md17_<molecule>.npz``, quantum-machine.org): ``z`` [N], ``R`` [M, N, 3],
  ``E`` [M] or [M, 1], ``F`` [M, N, 3]; optional strings ``name``, ``theory``,
  ``r_unit``, ``e_unit``.
- revised MD17 (``rmd17_<molecule>.npz``, Materials Cloud record 466):
  ``nuclear_charges`` [N], ``coords`` [M, N, 3], ``energies`` [M], ``forces`` [M, N, 3].

Every frame becomes one ``kind="arrays"`` :class:`SourceRecord` (z, pos, forces; y =
energy minus a recorded offset, see :class:`MD17Source`), featurized without RDKit by
:func:`graphormer_ext.featurize.pipeline.point_cloud_record`.

**Split.** MD17 has no official split. ``train``/``valid``/``test`` sizes are explicit
(standard protocol: 950 / 50 / the rest); frames are drawn by
``np.random.default_rng(seed).permutation(M)``: the first ``train`` indices are the
training split, the next ``valid`` the validation split, the next ``test`` (default: all
the remaining) the test split. Within a split, records are in trajectory order. The same
file, sizes and seed always give the same split.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import numpy as np

from graphormer_ext.data import keys as K
from graphormer_ext.sources.base import (
    ARRAYS_KIND,
    Source,
    SourceError,
    SourceRecord,
)

logger = logging.getLogger(__name__)

__all__ = ["MD17Source", "FORMATS", "load_md17_npz"]

# format -> (atomic numbers, positions, energies, forces) keys
FORMATS = {
    "sgdml": ("z", "R", "E", "F"),
    "rmd17": ("nuclear_charges", "coords", "energies", "forces"),
}
ENERGY_UNIT = "kcal/mol"
FORCE_UNIT = "kcal/mol/Å"
LENGTH_UNIT = "Å"
_UNIT_ALIASES = {"ang": "Å", "angstrom": "Å", "å": "Å", "kcal/mol": "kcal/mol"}


def _string(arr: np.ndarray | None) -> str | None:
    if arr is None:
        return None
    v = np.asarray(arr)
    return str(v.reshape(-1)[0]) if v.size else None


def load_md17_npz(path: str | Path, format: str = "auto") -> dict:
    """Read and validate an MD17-style npz (no pickle).

    Args:
        path: the ``.npz`` file.
        format: ``"sgdml"``, ``"rmd17"`` or ``"auto"`` (by the keys present).

    Returns:
        ``{"format", "z" int64 [N], "R" float64 [M, N, 3], "E" float64 [M],
        "F" float64 [M, N, 3], "name", "theory"}`` (``name``/``theory`` may be None).

    Raises:
        SourceError: unknown format, missing keys (the message lists the file's keys),
            inconsistent shapes, non-finite values, or units other than Å / kcal/mol.
    """
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"MD17 file not found: {path}")
    if format not in ("auto", *FORMATS):
        raise SourceError(f"format must be auto, sgdml or rmd17, got {format!r}")
    with np.load(path, allow_pickle=False) as npz:
        have = sorted(npz.files)
        if format == "auto":
            found = [f for f, ks in FORMATS.items() if all(k in npz.files for k in ks)]
            if not found:
                raise SourceError(
                    f"{path}: not an MD17 npz; expected the sGDML keys "
                    f"{list(FORMATS['sgdml'])} or the rMD17 keys "
                    f"{list(FORMATS['rmd17'])}, the file has {have}"
                )
            format = found[0]
        kz, kr, ke, kf = FORMATS[format]
        missing = [k for k in (kz, kr, ke, kf) if k not in npz.files]
        if missing:
            raise SourceError(
                f"{path}: {format} npz lacks keys {missing}; the file has {have}"
            )
        z = np.asarray(npz[kz])
        R = np.asarray(npz[kr], dtype=np.float64)
        E = np.asarray(npz[ke], dtype=np.float64)
        F = np.asarray(npz[kf], dtype=np.float64)
        extra = {
            k: _string(npz[k]) if k in npz.files else None
            for k in ("name", "theory", "r_unit", "e_unit")
        }
    for key, unit, want in (
        ("r_unit", extra["r_unit"], LENGTH_UNIT),
        ("e_unit", extra["e_unit"], ENERGY_UNIT),
    ):
        if unit is not None and _UNIT_ALIASES.get(unit.strip().lower()) != want:
            raise SourceError(f"{path}: {key} is {unit!r}; expected {want}")
    if z.ndim != 1 or not np.issubdtype(z.dtype, np.integer) or z.size == 0:
        raise SourceError(f"{path}: {kz!r} must be a non-empty integer [N] array, got "
                          f"{z.dtype} {z.shape}")  # fmt: skip
    n = z.shape[0]
    if z.min() < 1 or z.max() > 118:
        raise SourceError(f"{path}: {kz!r} holds values outside 1..118")
    if R.ndim != 3 or R.shape[1:] != (n, 3):
        raise SourceError(f"{path}: {kr!r} has shape {R.shape}, expected [M, {n}, 3]")
    m = R.shape[0]
    if E.shape == (m, 1):
        E = E[:, 0]
    if E.shape != (m,):
        raise SourceError(
            f"{path}: {ke!r} has shape {E.shape}, expected [{m}] or [{m}, 1]"
        )
    if F.shape != R.shape:
        raise SourceError(f"{path}: {kf!r} has shape {F.shape}, expected {R.shape}")
    for key, arr in ((kr, R), (ke, E), (kf, F)):
        bad = ~np.isfinite(arr.reshape(m, -1)).all(axis=1)
        if bad.any():
            frames = np.flatnonzero(bad)
            raise SourceError(
                f"{path}: {key!r} is not finite (NaN/inf) in {bad.sum()} frames, "
                f"e.g. frames {frames[:5].tolist()}"
            )
    return {
        "format": format,
        "z": z.astype(np.int64),
        "R": R,
        "E": E,
        "F": F,
        "name": extra["name"],
        "theory": extra["theory"],
    }


def _resolve(path: Path, molecule: str | None) -> Path:
    """A file path, or the one ``*<molecule>*.npz`` in a folder."""
    if not path.is_dir():
        return path
    if not molecule:
        raise SourceError(f"{path} is a folder; pass molecule= (e.g. 'aspirin')")
    hits = sorted(
        p for p in path.glob("*.npz")
        if p.stem in (molecule, f"md17_{molecule}", f"rmd17_{molecule}")
    )  # fmt: skip
    if len(hits) != 1:
        have = sorted(p.name for p in path.glob("*.npz"))
        raise SourceError(
            f"{path}: need exactly one of {molecule}.npz, md17_{molecule}.npz, "
            f"rmd17_{molecule}.npz; found {[h.name for h in hits]} among {have}"
        )
    return hits[0]


class MD17Source(Source):
    """MD17-style trajectory -> train/valid/test point-cloud records.

    Args:
        path: an sGDML or rMD17 ``.npz``, or a folder holding ``md17_<molecule>.npz`` /
            ``rmd17_<molecule>.npz`` / ``<molecule>.npz``.
        molecule: the molecule's name (selects the file in a folder; otherwise a label,
            default: the npz ``name`` field or the file stem).
        train: training frames (standard protocol 950).
        valid: validation frames (standard protocol 50).
        test: test frames; ``None`` = all frames not in train/valid.
        seed: seed of the split permutation (see the module docstring).
        format: ``"auto"``, ``"sgdml"`` or ``"rmd17"``.
        energy_offset: subtracted from every energy before it is stored as ``y``:
            ``"train_mean"`` (default) or a number in kcal/mol (``0.0`` stores total
            energies). Total MD17 energies reach ~1e5 kcal/mol, where float32 resolves
            only ~0.01 kcal/mol; the offset keeps stored ``y`` exact to ~1e-6. The
            value is in :meth:`describe` (``energy_offset``); add it back for absolute
            energies.

    Records: ``z`` int16 [N], ``pos`` float32 [N, 3] Å, ``y`` float32 [1] (energy -
    offset, kcal/mol), ``forces`` float32 [N, 3] kcal/mol/Å.

    Raises:
        SourceError: bad file (see :func:`load_md17_npz`) or split sizes larger than the
            trajectory.
    """

    name = "md17"

    def __init__(
        self,
        path: str | Path,
        molecule: str | None = None,
        train: int = 950,
        valid: int = 50,
        test: int | None = None,
        seed: int = 0,
        format: str = "auto",
        energy_offset: float | str = "train_mean",
    ):
        self.path = _resolve(Path(path), molecule)
        data = load_md17_npz(self.path, format)
        self.format = data["format"]
        self.z = data["z"]
        self.R, self.E, self.F = data["R"], data["E"], data["F"]
        self.theory = data["theory"]
        self.molecule = molecule or data["name"] or self.path.stem
        self.seed = int(seed)
        m = self.E.shape[0]
        asked = {"train": int(train), "valid": int(valid)}
        asked["test"] = "rest" if test is None else int(test)
        if any(isinstance(v, int) and v < 0 for v in asked.values()):
            raise SourceError(f"split sizes must be >= 0, got {asked}")
        need = asked["train"] + asked["valid"] + (0 if test is None else int(test))
        if need > m:
            raise SourceError(
                f"{self.path}: split sizes {asked} need {need} frames; the file has {m}"
            )
        sizes = {**asked, "test": m - need if test is None else int(test)}
        perm = np.random.default_rng(self.seed).permutation(m)
        self._frames: dict[str, np.ndarray] = {}
        start = 0
        for split, size in sizes.items():
            self._frames[split] = np.sort(perm[start : start + size])
            start += size
        train_e = self.E[self._frames["train"]]
        if energy_offset == "train_mean":
            if train_e.size == 0:
                raise SourceError("energy_offset='train_mean' needs train > 0")
            self.energy_offset = float(train_e.mean())
        elif isinstance(energy_offset, str):
            raise SourceError(
                f"energy_offset must be 'train_mean' or a number, got {energy_offset!r}"
            )
        else:
            self.energy_offset = float(energy_offset)

    def splits(self) -> dict[str, int]:
        """Split name -> number of frames (splits of size 0 are left out)."""
        return {s: len(f) for s, f in self._frames.items() if len(f)}

    def frame_indices(self, split: str) -> np.ndarray:
        """int64 ``[n]`` trajectory frames of ``split``, in record order."""
        if split not in self._frames:
            raise SourceError(
                f"md17 has no split {split!r}; it has {list(self._frames)}"
            )
        return self._frames[split].astype(np.int64)

    def iter_split(self, split: str) -> Iterator[SourceRecord]:
        z = self.z.astype(np.int16)
        for i, frame in enumerate(self.frame_indices(split).tolist()):
            yield SourceRecord(
                split=split,
                index=i,
                item=f"{self.path.name} frame {frame} ({split} #{i})",
                kind=ARRAYS_KIND,
                text="",
                y=np.array([self.E[frame] - self.energy_offset], np.float32),
                use_3d=True,
                arrays={
                    K.Z: z,
                    K.POS: self.R[frame].astype(np.float32),
                    K.FORCES: self.F[frame].astype(np.float32),
                },
            )

    def files(self) -> list[Path]:
        return [self.path]

    def describe(self) -> dict:
        """Units, split definition, offset and training-set statistics (JSON-able)."""
        tr = self._frames["train"]
        e, f = self.E[tr], self.F[tr]
        n = int(self.z.shape[0])
        return {
            "source": self.name,
            "molecule": self.molecule,
            "format": self.format,
            "theory": self.theory,
            "num_frames": int(self.E.shape[0]),
            "num_atoms": n,
            "atomic_numbers": self.z.tolist(),
            "targets": ["energy"],
            "units": {"pos": LENGTH_UNIT, "energy": ENERGY_UNIT, "forces": FORCE_UNIT},
            "energy_offset": self.energy_offset,
            "y_definition": "energy - energy_offset",
            "split": {
                "seed": self.seed,
                "sizes": {s: len(v) for s, v in self._frames.items()},
                "rule": "np.random.default_rng(seed).permutation(M): train, valid, "
                "test in that order; each split sorted by frame",
            },
            "train_stats": {
                "energy_mean": float(e.mean()) if e.size else None,
                "energy_std": float(e.std(ddof=1)) if e.size > 1 else None,
                "energy_per_atom_mean": float(e.mean() / n) if e.size else None,
                "force_rms": float(np.sqrt(np.mean(f * f))) if f.size else None,
                "force_component_std": float(f.std(ddof=1)) if f.size > 1 else None,
            },
        }
