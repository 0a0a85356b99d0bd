"""MD17 / revised MD17 trajectories (energies + forces) as point-cloud records.

Two npz layouts are read:

- sGDML MD17 (``md17_<molecule>.npz``, quantum-machine.org): ``z`` [N], ``R`` [M, N, 3],
  ``E`` [M] or [M, 1], ``F`` [M, N, 3]; optional strings ``name``, ``theory``,
  ``r_unit``, ``e_unit`` (forces are in ``e_unit / r_unit``, the sGDML convention).
- revised MD17 (``rmd17_<molecule>.npz``, Materials Cloud record 466):
  ``nuclear_charges`` [N], ``coords`` [M, N, 3], ``energies`` [M], ``forces`` [M, N, 3]
  (also ``old_indices``, ``old_energies``, ``old_forces``, not read). These files carry no
  unit fields; their documentation gives Å, kcal/mol and kcal/mol/Å.

**Units.** Records are stored in Å, kcal/mol and kcal/mol/Å. The units of the input come
from the file's ``r_unit``/``e_unit`` fields, or from ``length_unit``/``energy_unit``
(``--length-unit``/``--energy-unit``; they must agree with the fields when both exist), or,
for files without either, the MD17/rMD17 convention (Å, kcal/mol). Known spellings:
:data:`LENGTH_UNITS` (Å, bohr, nm, pm) and :data:`ENERGY_UNITS` (kcal/mol, kJ/mol, eV, meV,
hartree); anything else is an error. The input units, where they came from and the
conversion factors are in :meth:`MD17Source.describe` (the LMDB meta record).

Every frame becomes one ``kind="arrays"`` :class:`SourceRecord` (z, pos, forces; y =
energy minus a recorded offset, see :class:`MD17Source`), featurized without RDKit by
:func:`graphormer_ext.featurize.pipeline.point_cloud_record`.

**Split.** MD17 has no official split. The usual protocol draws 950 training and 50
validation frames at random from the *full* trajectory (e.g. 211,762 frames for aspirin) and
tests on all the remaining frames. ``train``/``valid``/``test`` sizes are explicit (default
950 / 50 / the rest); frames are drawn by ``np.random.default_rng(seed).permutation(M)``: the
first ``train`` indices are the training split, the next ``valid`` the validation split, the
next ``test`` (default: all the remaining) the test split. Within a split, records are in
trajectory order. The same file, sizes and seed always give the same split. The sizes are
logged. A test split of "the rest" smaller than ``min_test`` frames (default: the validation
split's size, at least 1) is refused: a 1,001-frame file with 950/50 would test on one frame,
and a test set smaller than the validation set ranks models worse than validation does. An
explicit smaller ``test`` is kept, with a warning.
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

__all__ = [
    "MD17Source", "FORMATS", "load_md17_npz", "LENGTH_UNITS", "ENERGY_UNITS", "resolve_units",
]  # fmt: skip

# format -> (atomic numbers, positions, energies, forces) keys
FORMATS = {
    "sgdml": ("z", "R", "E", "F"),
    "rmd17": ("nuclear_charges", "coords", "energies", "forces"),
}
ENERGY_UNIT = "kcal/mol"  # stored units
FORCE_UNIT = "kcal/mol/Å"
LENGTH_UNIT = "Å"

# canonical unit -> (factor to the stored unit, accepted spellings, compared lower-case)
# CODATA 2018: a0 = 0.529177210903 Å; E_h = 627.5094740631 kcal/mol; 1 eV = 23.060547830619
# kcal/mol; thermochemical calorie, 1 kcal = 4.184 kJ.
LENGTH_UNITS = {
    "Å": (1.0, ("å", "a", "ang", "angstrom", "angstroms")),
    "bohr": (0.529177210903, ("bohr", "a0", "au", "a.u.")),
    "nm": (10.0, ("nm",)),
    "pm": (0.01, ("pm",)),
}
ENERGY_UNITS = {
    "kcal/mol": (1.0, ("kcal/mol", "kcal mol-1", "kcal mol^-1")),
    "kJ/mol": (1.0 / 4.184, ("kj/mol", "kj mol-1", "kj mol^-1")),
    "eV": (23.060547830619, ("ev",)),
    "meV": (0.023060547830619, ("mev",)),
    "hartree": (627.5094740631, ("hartree", "ha", "eh", "au", "a.u.")),
}


def _canonical(value: str, table: dict, what: str, where: str) -> str:
    key = value.strip().lower()
    for name, (_, spellings) in table.items():
        if key in spellings:
            return name
    known = ", ".join(f"{name} ({'/'.join(s)})" for name, (_, s) in table.items())
    raise SourceError(
        f"{where}: unknown {what} unit {value!r}; known: {known}. If a file's field is "
        f"misspelt, --{what}-unit overrides it"
    )


def resolve_units(
    path: Path,
    fields: dict,
    length_unit: str | None = None,
    energy_unit: str | None = None,
    format: str = "sgdml",
) -> dict:
    """Input units of an MD17 file and their factors to Å / kcal/mol.

    Args:
        path: the file (for messages).
        fields: the file's ``r_unit`` / ``e_unit`` strings (None when absent).
        length_unit, energy_unit: units given by the user (``--length-unit`` ...), or None.
        format: ``"sgdml"`` or ``"rmd17"`` (for the wording of the assumed default).

    Returns:
        ``{"length", "energy", "force", "length_factor", "energy_factor",
        "force_factor", "from"}``: canonical input units, factors that convert them to
        the stored units (multiply), and where each unit came from.

    Raises:
        SourceError: an unknown unit, or a user unit that contradicts the file's field.
    """
    out, origin = {}, {}
    for what, key, given, table, default in (
        ("length", "r_unit", length_unit, LENGTH_UNITS, LENGTH_UNIT),
        ("energy", "e_unit", energy_unit, ENERGY_UNITS, ENERGY_UNIT),
    ):
        field = fields.get(key)
        from_user = _canonical(given, table, what, f"--{what}-unit") if given else None
        try:
            from_field = _canonical(field, table, what, f"{path} field {key}") if field else None
        except SourceError:
            if from_user is None:
                raise
            from_field = None  # an unreadable field, overridden by the user's flag
            logger.warning("%s: %s field %r not recognised; using --%s-unit %s",
                           path, key, field, what, from_user)  # fmt: skip
        if from_field and from_user and from_field != from_user:
            raise SourceError(
                f"{path}: its {key} field says {field!r} ({from_field}) but --{what}-unit "
                f"is {given!r} ({from_user}); drop the flag or fix the file"
            )
        if from_field:
            out[what], origin[what] = from_field, f"file field {key}"
        elif from_user:
            out[what] = from_user
            origin[what] = f"--{what}-unit" + (f" (file field {key}={field!r} not recognised)"
                                               if field else "")  # fmt: skip
        else:
            out[what] = default
            origin[what] = ("rMD17 convention (no unit fields)" if format == "rmd17"
                            else "MD17 convention (no unit field, none given)")  # fmt: skip
    lf = LENGTH_UNITS[out["length"]][0]
    ef = ENERGY_UNITS[out["energy"]][0]
    return {
        "length": out["length"],
        "energy": out["energy"],
        "force": f"{out['energy']}/{out['length']}",
        "length_factor": lf,
        "energy_factor": ef,
        "force_factor": ef / lf,
        "from": origin,
    }


def _string(arr: np.ndarray | None) -> str | None:
    if arr is None:
        return None
    v = np.asarray(arr)
    return str(v.reshape(-1)[0]) if v.size else None


def load_md17_npz(
    path: str | Path,
    format: str = "auto",
    length_unit: str | None = None,
    energy_unit: str | None = None,
) -> dict:
    """Read and validate an MD17-style npz (no pickle), converted to Å and kcal/mol.

    Args:
        path: the ``.npz`` file.
        format: ``"sgdml"``, ``"rmd17"`` or ``"auto"`` (by the keys present).
        length_unit, energy_unit: input units for files without ``r_unit``/``e_unit``
            fields (see :func:`resolve_units`); None = the file's fields or the MD17
            convention.

    Returns:
        ``{"format", "z" int64 [N], "R" float64 [M, N, 3] Å, "E" float64 [M] kcal/mol,
        "F" float64 [M, N, 3] kcal/mol/Å, "name", "theory", "units"}`` (``name``/
        ``theory`` may be None; ``units`` from :func:`resolve_units`).

    Raises:
        SourceError: unknown format, missing keys (the message lists the file's keys),
            inconsistent shapes, non-finite values, unknown or contradictory units.
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
    units = resolve_units(path, extra, length_unit, energy_unit, format)
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
    if units["length_factor"] != 1.0:
        R = R * units["length_factor"]
    if units["energy_factor"] != 1.0:
        E = E * units["energy_factor"]
    if units["force_factor"] != 1.0:
        F = F * units["force_factor"]
    return {
        "format": format,
        "z": z.astype(np.int64),
        "R": R,
        "E": E,
        "F": F,
        "name": extra["name"],
        "theory": extra["theory"],
        "units": units,
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
        length_unit, energy_unit: input units when the file has no ``r_unit``/``e_unit``
            field (see :func:`resolve_units`); stored records are in Å and kcal/mol.
        min_test: smallest test split accepted when ``test`` is None (the rest);
            None = ``max(valid, 1)``, 0 accepts any. An explicit ``test`` below it is
            kept with a warning.
        energy_offset: subtracted from every energy before it is stored as ``y``:
            ``"train_mean"`` (default) or a number in kcal/mol (``0.0`` stores total
            energies). Total MD17 energies reach ~1e5 kcal/mol, where float32 resolves
            only ~0.01 kcal/mol; the offset keeps stored ``y`` exact to ~1e-6. The
            value is in :meth:`describe` (``energy_offset``); add it back for absolute
            energies.

    Records: ``z`` int16 [N], ``pos`` float32 [N, 3] Å, ``y`` float32 [1] (energy -
    offset, kcal/mol), ``forces`` float32 [N, 3] kcal/mol/Å.

    Raises:
        SourceError: bad file (see :func:`load_md17_npz`), split sizes larger than the
            trajectory, or a test split of the rest smaller than ``min_test``.
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
        length_unit: str | None = None,
        energy_unit: str | None = None,
        min_test: int | None = None,
    ):
        self.path = _resolve(Path(path), molecule)
        data = load_md17_npz(self.path, format, length_unit, energy_unit)
        self.units = data["units"]
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
        min_test = max(asked["valid"], 1) if min_test is None else int(min_test)
        if sizes["test"] < min_test:
            what = (f"{self.path}: the test split would have {sizes['test']:,} frame(s) "
                    f"({m:,} frames - {asked['train']:,} train - {asked['valid']:,} valid), "
                    f"fewer than {min_test:,}")  # fmt: skip
            if test is None:
                raise SourceError(
                    f"{what}. MD17's protocol draws 950 train / 50 valid frames from the full "
                    "trajectory and tests on all the rest; use a longer trajectory, smaller "
                    "--train/--valid, an explicit --test N, or --min-test 0 to accept it"
                )
            logger.warning("%s (explicit --test)", what)
        logger.info(
            "md17 %s: %s frames -> train %s, valid %s, test %s (seed %d; units %s, %s from %s)",
            self.path.name, f"{m:,}", f"{sizes['train']:,}", f"{sizes['valid']:,}",
            f"{sizes['test']:,}", self.seed, self.units["length"], self.units["energy"],
            ", ".join(sorted(set(self.units["from"].values()))),
        )  # fmt: skip
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
            "input_units": {
                "length": self.units["length"],
                "energy": self.units["energy"],
                "forces": self.units["force"],
                "from": self.units["from"],
                "factors_to_stored": {
                    "length": self.units["length_factor"],
                    "energy": self.units["energy_factor"],
                    "forces": self.units["force_factor"],
                },
            },
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
