"""PDBbind v2016 reader: refined set for train/valid, the CASF-2016 core set as test.

Layout read (the PDBbind v2016 release plus CASF-2016; spec ``transformer_m.md`` §5.2)::

    <root>/refined-set/<pdbid>/<pdbid>_protein.pdb
    <root>/refined-set/<pdbid>/<pdbid>_pocket.pdb
    <root>/refined-set/<pdbid>/<pdbid>_ligand.sdf
    <root>/refined-set/<pdbid>/<pdbid>_ligand.mol2
    <root>/refined-set/index/INDEX_refined_data.2016
    <root>/coreset/<pdbid>/...           (CASF-2016: the same per-complex files, 285 complexes)

The index file has ``#`` comment lines, then one complex per line: PDB code, resolution,
release year, -logKd/Ki, the Kd/Ki string, ``//``, reference and ligand name. The target
``y`` is -logKd/Ki (= pK, -log10 of the constant in M). Core-set labels come from the
refined index (core ⊂ refined in v2016); a ``CoreSet.dat`` in the CASF layout
(``<coreset>/../power_scoring/CoreSet.dat``) fills in any core complex it lacks.

Splits: ``test`` = the core complexes (sorted by code); ``train``/``valid`` = a seeded
random split of the refined complexes that are not in the core set. Each record carries
the ligand and pocket file contents (:func:`graphormer_ext.featurize.complexes
.complex_payload`); the workers build the ligand + pocket graph (pocket heavy atoms
within ``cutoff`` Å of any ligand heavy atom). Complexes RDKit cannot read, with a missing
file or with no pocket atom within the cutoff are skipped and listed by the writer.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .base import Source, SourceError, SourceRecord

logger = logging.getLogger(__name__)

__all__ = [
    "IndexEntry",
    "PDBBindSource",
    "parse_index",
    "DEFAULT_CUTOFF",
    "POCKET_FILE_RADIUS",
    "SPLITS",
]

DEFAULT_CUTOFF = (
    5.0  # Å: pocket atoms kept around the ligand (SIGN-style interaction range)
)
POCKET_FILE_RADIUS = (
    10.0  # Å: PDBbind's <id>_pocket.pdb holds residues within this range
)
DEFAULT_VALID_FRACTION = 0.1
SPLITS = ("train", "valid", "test")
_CODE = re.compile(r"^[0-9][0-9a-z]{3}$")


@dataclass(frozen=True)
class IndexEntry:
    """One line of a PDBbind index file.

    Attributes:
        code: 4-character PDB code, lower case.
        resolution: as written (Å, or ``"NMR"``).
        year: release year.
        pk: -logKd/Ki (the regression target).
        affinity: the measurement as written, e.g. ``"Kd=49uM"``.
        ligand: ligand name from the ``(...)`` at the end of the line, or ``""``.
    """

    code: str
    resolution: str
    year: int
    pk: float
    affinity: str
    ligand: str = ""


def parse_index(path: str | Path) -> dict[str, IndexEntry]:
    """Parse a PDBbind ``INDEX_*_data.<year>`` file (or CASF ``CoreSet.dat``).

    Args:
        path: the index file.

    Returns:
        ``{code: IndexEntry}`` in file order.

    Raises:
        SourceError: a missing file, a malformed line (with its number), a duplicate code
            or a non-finite -logKd/Ki.
    """
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"PDBbind index file not found: {path}")
    out: dict[str, IndexEntry] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            parts = text.split()
            where = f"{path}:{lineno}"
            if len(parts) < 5:
                raise SourceError(
                    f"{where}: expected 'code resolution year -logKd/Ki Kd/Ki ...', "
                    f"got {text!r}"
                )
            code = parts[0].lower()
            if not _CODE.match(code):
                raise SourceError(
                    f"{where}: {parts[0]!r} is not a 4-character PDB code"
                )
            try:
                year = int(parts[2])
                pk = float(parts[3])
            except ValueError:
                raise SourceError(
                    f"{where}: year {parts[2]!r} or -logKd/Ki {parts[3]!r} is not a number"
                ) from None
            if not math.isfinite(pk):
                raise SourceError(f"{where}: -logKd/Ki {parts[3]!r} is not finite")
            if code in out:
                raise SourceError(f"{where}: duplicate PDB code {code}")
            m = re.search(r"\(([^()]*)\)\s*$", text)
            out[code] = IndexEntry(
                code, parts[1], year, pk, parts[4], m.group(1) if m else ""
            )
    if not out:
        raise SourceError(f"{path}: no complexes (only comments or blank lines)")
    return out


def _read_text(path: Path) -> str | None:
    if not path.is_file():
        return None
    return path.read_text(encoding="utf-8", errors="replace")


class PDBBindSource(Source):
    """PDBbind refined set (train/valid) and CASF core set (test) as complex records.

    Args:
        root: folder holding ``refined-set/`` and ``coreset/``.
        version: PDBbind release year; names the index file ``INDEX_refined_data.<v>``.
        cutoff: pocket radius in Å around the ligand heavy atoms (default 5.0).
        valid_fraction: share of the non-core refined complexes put in ``valid``.
        valid_size: number of ``valid`` complexes instead (overrides the fraction).
        seed: seed of the train/valid permutation.
        index_path: the refined index file (default
            ``<root>/refined-set/index/INDEX_refined_data.<version>``).
        core_dir: the core-set folder (default ``<root>/coreset``).
        pocket_source: ``"pocket"`` reads ``<id>_pocket.pdb`` (residues within 10 Å of
            the ligand); ``"protein"`` reads ``<id>_protein.pdb`` (needed for cutoffs
            above 10 Å; slower).
        keep_waters: keep crystal waters of the PDB file.

    Raises:
        SourceError: missing folders or index, a malformed index line, a core complex
            without a label, or a bad split setting.
    """

    name = "pdbbind"

    def __init__(
        self,
        root: str | Path,
        version: str = "2016",
        cutoff: float = DEFAULT_CUTOFF,
        valid_fraction: float = DEFAULT_VALID_FRACTION,
        valid_size: int | None = None,
        seed: int = 0,
        index_path: str | Path | None = None,
        core_dir: str | Path | None = None,
        pocket_source: str = "pocket",
        keep_waters: bool = False,
    ):
        self.root = Path(root)
        self.version = str(version)
        self.cutoff = float(cutoff)
        self.seed = int(seed)
        self.keep_waters = bool(keep_waters)
        self.remove_hs = True  # heavy atoms only (the pocket PDB hydrogens are dropped)
        if not self.cutoff > 0:
            raise SourceError(f"cutoff must be > 0 Å, got {cutoff}")
        if pocket_source not in ("pocket", "protein"):
            raise SourceError(
                f"pocket_source must be 'pocket' or 'protein', got {pocket_source!r}"
            )
        self.pocket_source = pocket_source
        if pocket_source == "pocket" and self.cutoff > POCKET_FILE_RADIUS:
            logger.warning(
                "cutoff %.1f Å exceeds the %.0f Å radius of PDBbind's pocket files: atoms "
                "beyond it are missing; use pocket_source='protein' (--pocket-source protein)",
                self.cutoff,
                POCKET_FILE_RADIUS,
            )
        self.refined_dir = self.root / "refined-set"
        self.core_dir = (
            Path(core_dir) if core_dir is not None else self.root / "coreset"
        )
        for d, what in ((self.refined_dir, "refined set"), (self.core_dir, "core set")):
            if not d.is_dir():
                raise SourceError(
                    f"PDBbind {what} folder not found: {d} (expected <root>/refined-set/ "
                    "and <root>/coreset/ of PDBbind v2016 + CASF-2016)"
                )
        self.index_path = (
            Path(index_path)
            if index_path is not None
            else self.refined_dir / "index" / f"INDEX_refined_data.{self.version}"
        )
        self.index = parse_index(self.index_path)
        core_labels = self.core_dir.parent / "power_scoring" / "CoreSet.dat"
        self.core_index_path = core_labels if core_labels.is_file() else None
        extra = parse_index(core_labels) if self.core_index_path else {}

        core = sorted(
            p.name.lower()
            for p in self.core_dir.iterdir()
            if p.is_dir() and _CODE.match(p.name.lower())
        )
        if not core:
            raise SourceError(f"{self.core_dir}: no <pdbid>/ complex folders")
        unlabelled = [c for c in core if c not in self.index and c not in extra]
        if unlabelled:
            raise SourceError(
                f"core complexes without a -logKd/Ki in {self.index_path}"
                f"{' or ' + str(core_labels) if extra else ''}: {unlabelled[:10]}"
                f"{' ...' if len(unlabelled) > 10 else ''}"
            )
        self.core = core
        self.labels = {c: e.pk for c, e in extra.items()}
        self.labels.update({c: e.pk for c, e in self.index.items()})

        core_set = set(core)
        pool = [c for c in self.index if c not in core_set]  # index order
        self.excluded_core = len(self.index) - len(pool)
        n_valid = (
            int(valid_size)
            if valid_size is not None
            else int(round(valid_fraction * len(pool)))
        )
        if not 0 <= n_valid <= len(pool):
            raise SourceError(
                f"valid size {n_valid} is outside [0, {len(pool)}] (the non-core refined "
                "complexes)"
            )
        perm = np.random.default_rng(self.seed).permutation(len(pool))
        valid_idx = np.sort(perm[:n_valid])
        train_idx = np.sort(perm[n_valid:])
        self._splits = {
            "train": [pool[i] for i in train_idx],
            "valid": [pool[i] for i in valid_idx],
            "test": list(core),
        }
        logger.info(
            "PDBbind %s: %d refined complexes in the index, %d of them in the core set "
            "(left out of train/valid); train %d, valid %d, test (core) %d; cutoff %.1f Å",
            self.version,
            len(self.index),
            self.excluded_core,
            len(self._splits["train"]),
            len(self._splits["valid"]),
            len(self._splits["test"]),
            self.cutoff,
        )

    # --- Source API -------------------------------------------------------------------
    def splits(self) -> dict[str, int]:
        return {s: len(codes) for s, codes in self._splits.items()}

    def codes(self, split: str) -> list[str]:
        """PDB codes of a split, in record order."""
        if split not in self._splits:
            raise SourceError(f"pdbbind has no split {split!r}; it has {list(SPLITS)}")
        return list(self._splits[split])

    def complex_dir(self, code: str, split: str) -> Path:
        """Folder of one complex: the core folder for ``test``, else the refined one."""
        return (self.core_dir if split == "test" else self.refined_dir) / code

    def complex_files(self, code: str, split: str) -> dict[str, Path]:
        """``{"ligand_sdf", "ligand_mol2", "pocket_pdb"}`` paths of one complex."""
        d = self.complex_dir(code, split)
        pocket = f"{code}_{self.pocket_source}.pdb"
        return {
            "ligand_sdf": d / f"{code}_ligand.sdf",
            "ligand_mol2": d / f"{code}_ligand.mol2",
            "pocket_pdb": d / pocket,
        }

    def iter_split(self, split: str) -> Iterator[SourceRecord]:
        from graphormer_ext.featurize.complexes import COMPLEX_KIND, complex_payload

        for i, code in enumerate(self.codes(split)):
            files = self.complex_files(code, split)
            texts = {k: _read_text(p) for k, p in files.items()}
            missing = []
            if texts["pocket_pdb"] is None:
                missing.append(str(files["pocket_pdb"]))
            if texts["ligand_sdf"] is None and texts["ligand_mol2"] is None:
                missing.append(f"{files['ligand_sdf']} (and .mol2)")
            yield SourceRecord(
                split=split,
                index=i,
                item=f"{code} ({split} #{i})",
                kind=COMPLEX_KIND,
                text=complex_payload(
                    cutoff=self.cutoff,
                    keep_waters=self.keep_waters,
                    missing=missing,
                    **texts,
                ),
                y=np.array([self.labels[code]], dtype=np.float32),
                use_3d=True,
            )

    def files(self) -> list[Path]:
        """The index files (the per-complex files enter :meth:`checksum` too)."""
        return [self.index_path] + (
            [self.core_index_path] if self.core_index_path else []
        )

    def checksum(self) -> str:
        """sha256 over the index files and every complex file read, in split order."""
        h = hashlib.sha256()
        paths = list(self.files())
        for split in SPLITS:
            for code in self._splits[split]:
                paths.extend(self.complex_files(code, split).values())
        for p in paths:
            h.update(f"{p.parent.name}/{p.name}".encode())
            if p.is_file():
                with open(p, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
            else:
                h.update(b"<missing>")
        return h.hexdigest()

    def describe(self) -> dict:
        return {
            "source": self.name,
            "version": self.version,
            "target": "-logKd/Ki",
            "target_units": "-log10(M)",
            "cutoff_angstrom": self.cutoff,
            "pocket_source": self.pocket_source,
            "keep_waters": self.keep_waters,
            "seed": self.seed,
            "core_complexes": len(self.core),
            "core_excluded_from_train_valid": self.excluded_core,
            "split_sizes": self.splits(),
            # PDB code of every record, by split and source index (evaluation output)
            "codes": {split: list(codes) for split, codes in self._splits.items()},
        }
