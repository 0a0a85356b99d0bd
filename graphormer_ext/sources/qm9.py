"""QM9 readers (qm9pack CSVs and PyG's raw ``gdb9.sdf`` layout) with the 19 targets.

QM9 (Ramakrishnan, Dral, Rupp, von Lilienfeld, *Sci. Data* 1, 140022 (2014)) has 133,885
GDB-9 molecules. 3,054 of them failed the geometry consistency check ("uncharacterized")
and are left out, which leaves 130,831. Both readers give the same targets for the same
molecule, in the order and units of PyG's ``QM9`` and Transformer-M's ``qm9H`` (spec
``transformer_m.md`` §3.5), listed in :data:`QM9_TARGETS`.

* :class:`QM9PackSource` reads the CSVs of the ``qm9pack`` wheel (DFT XYZ geometries and
  properties, already without the uncharacterized molecules). It yields ``xyz`` records;
  the featurizer perceives their bonds, with the CSV SMILES as bond-order template.
* :class:`QM9PyGRawSource` reads PyG's raw files (``gdb9.sdf``, ``gdb9.sdf.csv``,
  ``uncharacterized.txt``) and yields ``molblock`` records with hydrogens.

Both use the seeded split of the original code (:func:`qm9_split`).
"""
from __future__ import annotations

import ast
import csv
import importlib.util
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .base import Source, SourceError, SourceRecord

logger = logging.getLogger(__name__)

# --- units ---------------------------------------------------------------------------
HARTREE_TO_EV = 27.2113825435  # as in the PyG QM9 release used by Transformer-M
KCALMOL_TO_EV = 0.04336414  # idem, for the atomisation columns of gdb9.sdf.csv
# gdb9.sdf.csv's *_atom columns are (E - sum of atomrefs) [Hartree] times exactly this
# factor (checked on gdb_1 .. gdb_5: the ratio is 627.509000 to 1e-9).
HARTREE_TO_KCALMOL = 627.509

# Per-atom reference energies in Hartree: U0, U(298.15 K), H(298.15 K), G(298.15 K) at
# B3LYP/6-31G(2df,p). From the QM9 "atomref" table (Ramakrishnan et al. 2014, figshare
# file 3195395, "Atomref: Reference thermochemical energies of H, C, N, O, F atoms").
ATOMREF_HARTREE: dict[str, tuple[float, float, float, float]] = {
    "H": (-0.500273, -0.498857, -0.497912, -0.510927),
    "C": (-37.846772, -37.845355, -37.844411, -37.861317),
    "N": (-54.583861, -54.582445, -54.581501, -54.598897),
    "O": (-75.064579, -75.063163, -75.062219, -75.079532),
    "F": (-99.718730, -99.717314, -99.716370, -99.733544),
}

NUM_QM9_MOLECULES = 133885  # GDB-9 indices 1..133885
NUM_QM9_CHARACTERIZED = 130831
NUM_QM9_UNCHARACTERIZED = 3054
QM9_SPLIT_SIZES = (110000, 10000, 10831)  # train, valid, test (Transformer-M, DimeNet)
SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class QM9Target:
    """One QM9 regression target.

    Attributes:
        name: PyG-style column name (``gdb9.sdf.csv`` header).
        unit: unit of the stored value.
        raw_unit: unit in the raw files (before conversion).
        factor: stored = raw * factor.
    """

    name: str
    unit: str
    raw_unit: str
    factor: float


# Order and conversions of PyG's QM9 (= Transformer-M's ``--task-idx``), spec §3.5.
QM9_TARGETS: tuple[QM9Target, ...] = (
    QM9Target("mu", "D", "D", 1.0),
    QM9Target("alpha", "a0^3", "a0^3", 1.0),
    QM9Target("homo", "eV", "Hartree", HARTREE_TO_EV),
    QM9Target("lumo", "eV", "Hartree", HARTREE_TO_EV),
    QM9Target("gap", "eV", "Hartree", HARTREE_TO_EV),
    QM9Target("r2", "a0^2", "a0^2", 1.0),
    QM9Target("zpve", "eV", "Hartree", HARTREE_TO_EV),
    QM9Target("u0", "eV", "Hartree", HARTREE_TO_EV),
    QM9Target("u298", "eV", "Hartree", HARTREE_TO_EV),
    QM9Target("h298", "eV", "Hartree", HARTREE_TO_EV),
    QM9Target("g298", "eV", "Hartree", HARTREE_TO_EV),
    QM9Target("cv", "cal/(mol K)", "cal/(mol K)", 1.0),
    QM9Target("u0_atom", "eV", "kcal/mol", KCALMOL_TO_EV),
    QM9Target("u298_atom", "eV", "kcal/mol", KCALMOL_TO_EV),
    QM9Target("h298_atom", "eV", "kcal/mol", KCALMOL_TO_EV),
    QM9Target("g298_atom", "eV", "kcal/mol", KCALMOL_TO_EV),
    QM9Target("A", "GHz", "GHz", 1.0),
    QM9Target("B", "GHz", "GHz", 1.0),
    QM9Target("C", "GHz", "GHz", 1.0),
)
QM9_TARGET_NAMES = tuple(t.name for t in QM9_TARGETS)
_FACTORS = np.array([t.factor for t in QM9_TARGETS], dtype=np.float64)

# qm9pack CSV column of each raw target; the four *_atom columns come from the totals.
_QM9PACK_COLUMNS = {
    "mu": "Dipole_debye",
    "alpha": "Polarizability_bohr3",
    "homo": "HOMO_au",
    "lumo": "LUMO_au",
    "gap": "HOMO_LUMO_gap_au",
    "r2": "R2_bohr2",
    "zpve": "ZPVE_au",
    "u0": "InternalEnergy_0K_au",
    "u298": "InternalEnergy_298K_au",
    "h298": "Enthalphy_298K_au",  # sic
    "g298": "GibbsFreeEnergy_298K_au",
    "cv": "Heatcapacity_Cv_cal_mol_K",
    "A": "RotA_GHz",
    "B": "RotB_GHz",
    "C": "RotC_GHz",
}
_ATOM_FROM_TOTAL = {
    "u0_atom": "u0",
    "u298_atom": "u298",
    "h298_atom": "h298",
    "g298_atom": "g298",
}
QM9PACK_FILES = ("qm9_part1.csv", "qm9_part2.csv", "qm9_part3.csv")
PYG_RAW_FILES = ("gdb9.sdf", "gdb9.sdf.csv", "uncharacterized.txt")


def convert_raw_targets(raw: np.ndarray) -> np.ndarray:
    """Convert raw QM9 values to the stored units of :data:`QM9_TARGETS`.

    Args:
        raw: float64 ``[N, 19]`` in :data:`QM9_TARGETS` order and raw units (Hartree;
            kcal/mol for the atomisation energies; ...).

    Returns:
        float64 ``[N, 19]`` in D, a0^3, eV, a0^2, cal/(mol K) and GHz.
    """
    return np.asarray(raw, dtype=np.float64) * _FACTORS


def atomization_kcalmol(
    total_hartree: np.ndarray, counts: dict[str, np.ndarray]
) -> np.ndarray:
    """Atomisation energies as in ``gdb9.sdf.csv``: ``(E - sum atomref) * 627.509``.

    Args:
        total_hartree: float64 ``[N, 4]`` total U0, U, H, G in Hartree.
        counts: element symbol -> int ``[N]`` atom counts (H, C, N, O, F; missing = 0).

    Returns:
        float64 ``[N, 4]`` in kcal/mol (negative for bound molecules).
    """
    total = np.asarray(total_hartree, dtype=np.float64)
    ref = np.zeros_like(total)
    for symbol, n in counts.items():
        if symbol not in ATOMREF_HARTREE:
            raise ValueError(f"no QM9 atomref for element {symbol!r}")
        per_atom = np.asarray(ATOMREF_HARTREE[symbol])
        ref += np.asarray(n, dtype=np.float64)[:, None] * per_atom
    return (total - ref) * HARTREE_TO_KCALMOL


def qm9_split(
    n: int, sizes: Sequence[int] = QM9_SPLIT_SIZES, seed: int = 1
) -> dict[str, np.ndarray]:
    """The seeded random split of Transformer-M's QM9 task.

    The original calls scikit-learn twice: ``train_test_split(arange(n),
    test_size=n_test, random_state=seed)``, then ``train_test_split(train_valid,
    test_size=n_valid, random_state=seed)``. scikit-learn draws
    ``RandomState(seed).permutation(len)`` and takes the test part from its head, so
    this function gives the same membership *and* order without scikit-learn. It uses
    a local ``np.random.RandomState``; the global numpy state is not touched.

    Args:
        n: number of molecules (130,831 for the full set).
        sizes: ``(n_train, n_valid, n_test)``; they must add up to ``n``.
        seed: the run seed (fairseq ``--seed``; 1 by default, as in fairseq).

    Returns:
        ``{"train", "valid", "test"}`` -> int64 positions into the ``n`` molecules, in
        the order the original visits them.

    Raises:
        SourceError: the sizes do not add up to ``n``, or one is negative.
    """
    n_train, n_valid, n_test = (int(s) for s in sizes)
    if min(n_train, n_valid, n_test) < 0 or n_train + n_valid + n_test != n:
        raise SourceError(
            f"QM9 split sizes {tuple(sizes)} must be non-negative and add up to the "
            f"{n} molecules read (pass sizes=... together with limit=...)"
        )
    perm = np.random.RandomState(seed).permutation(n)
    test, train_valid = perm[:n_test], perm[n_test:]
    perm2 = np.random.RandomState(seed).permutation(len(train_valid))
    valid, train = train_valid[perm2[:n_valid]], train_valid[perm2[n_valid:]]
    return {
        "train": train.astype(np.int64),
        "valid": valid.astype(np.int64),
        "test": test.astype(np.int64),
    }


def read_uncharacterized(path: str | os.PathLike) -> list[int]:
    """Read the GDB-9 indices (1-based) listed in QM9's ``uncharacterized.txt``.

    The file has free-text header lines, a table between ``=====`` rules whose rows
    start with the index (``    58   NC(=N)C#N   ...``), and a closing rule. Every line
    whose first field is an integer is a row.

    Args:
        path: the file.

    Returns:
        Sorted unique 1-based indices.
    """
    found = set()
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.split()
            if fields and fields[0].isdigit():
                found.add(int(fields[0]))
    return sorted(found)


def default_qm9pack_dir() -> Path:
    """The CSV folder of the installed ``qm9pack`` wheel, found without importing it.

    ``import qm9pack`` fails with setuptools >= 81 (it needs ``pkg_resources``), so the
    package is located with :func:`importlib.util.find_spec`, which does not run it.

    Raises:
        SourceError: qm9pack is not installed.
    """
    spec = importlib.util.find_spec("qm9pack")
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(
            "qm9pack is not installed: `pip install qm9pack==1.0.3` "
            "(or pass csv_dir=...)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def xyz_block(elements: Sequence[str], coords: np.ndarray, comment: str = "") -> str:
    """Format an XYZ block: count line, comment line, one ``El x y z`` line per atom.

    Coordinates are written positionally with the fewest digits that read back exactly:
    RDKit's XYZ parser rejects exponents such as ``-7.70322e-05``, which occur in QM9.
    Coordinates are in Å.
    """
    lines = [str(len(elements)), comment.replace("\n", " ")]
    for el, xyz in zip(elements, np.asarray(coords, dtype=np.float64)):
        fields = (np.format_float_positional(v, trim="-") for v in xyz)
        lines.append(" ".join((el, *fields)))
    return "\n".join(lines) + "\n"


def _check_files(directory: Path, names: Sequence[str]) -> list[Path]:
    paths = [directory / name for name in names]
    for p in paths:
        if not p.is_file():
            raise SourceError(f"QM9 input file not found: {p}")
    return paths


class _SeededSplits:
    """What both readers share: seeded splits (positions into the molecules), iteration, files."""

    def _make_splits(self, n: int, split: str, sizes: Sequence[int], seed: int) -> None:
        if split == "seeded":
            self._splits = qm9_split(n, sizes, seed)
        elif split == "all":
            self._splits = {"all": np.arange(n, dtype=np.int64)}
        else:
            raise SourceError(
                f"unknown QM9 split scheme {split!r}: use 'seeded' or 'all'"
            )
        logger.info(
            "QM9 %s split (seed %d): %s",
            split,
            seed,
            ", ".join(f"{k}={len(v)}" for k, v in self._splits.items()),
        )

    def splits(self) -> dict[str, int]:
        """Split name -> number of records."""
        return {k: len(v) for k, v in self._splits.items()}

    def split_positions(self, split: str) -> np.ndarray:
        """int64 positions (into the molecules read) of a split, in index order."""
        if split not in self._splits:
            raise SourceError(f"QM9 has no split {split!r} (have {list(self._splits)})")
        return self._splits[split]

    def iter_split(self, split: str) -> Iterator[SourceRecord]:
        """Yield the split's records in index order (``self.record`` builds each one)."""
        for index, pos in enumerate(self.split_positions(split)):
            yield self.record(split, index, int(pos))

    def files(self) -> list[Path]:
        """The input files read (their checksum goes into the LMDB meta record)."""
        return list(self._paths)

    def _describe_common(self) -> dict:
        """Meta-record facts both readers report: targets and units, split, options."""
        return {
            "targets": [{"name": t.name, "unit": t.unit} for t in QM9_TARGETS],
            "split": self.split_scheme,
            "seed": self.seed,
            "num_molecules": int(len(self.gdb_index)),
            "use_3d": self.use_3d,
            "remove_hs": self.remove_hs,
        }


class QM9PackSource(_SeededSplits, Source):
    """QM9 from the ``qm9pack`` CSVs: 130,831 molecules, DFT geometries (kind ``xyz``).

    Each record's text is an XYZ block (every atom, hydrogens included, in Å) and its
    ``template_smiles`` is the CSV SMILES, so the featurizer can perceive bonds with
    ``DetermineBonds`` and fall back to the template. Targets follow
    :data:`QM9_TARGETS`. The CSVs lack the atomisation energies; they are computed from
    :data:`ATOMREF_HARTREE` the way ``gdb9.sdf.csv`` was written, so both readers agree.

    Args:
        csv_dir: folder with ``qm9_part{1,2,3}.csv``; default: the installed qm9pack.
        split: ``"seeded"`` (train/valid/test by :func:`qm9_split`) or ``"all"`` (one
            split ``all`` in file order).
        seed: split seed (fairseq ``--seed``).
        sizes: ``(n_train, n_valid, n_test)`` of the seeded split; they must add up to
            the number of molecules read.
        use_3d: keep the DFT coordinates as ``pos``.
        remove_hs: whether the featurizer should drop hydrogens after bond perception
            (QM9H, the Transformer-M setting, keeps them). The caller passes
            :attr:`remove_hs` to ``featurize_record``; it is also in :meth:`describe`.
            The XYZ text always has every atom, because perception needs them.
        limit: read only the first ``limit`` molecules (file order), e.g. for tests.

    Raises:
        SourceError: a CSV is missing or malformed, or the sizes do not fit.
    """

    name = "qm9pack"

    def __init__(
        self,
        csv_dir: str | os.PathLike | None = None,
        split: str = "seeded",
        seed: int = 1,
        sizes: Sequence[int] = QM9_SPLIT_SIZES,
        use_3d: bool = True,
        remove_hs: bool = False,
        limit: int | None = None,
    ):
        self.csv_dir = Path(csv_dir) if csv_dir is not None else default_qm9pack_dir()
        self.use_3d = bool(use_3d)
        self.remove_hs = bool(remove_hs)
        self.split_scheme = split
        self.seed = int(seed)
        self._paths = _check_files(self.csv_dir, QM9PACK_FILES)
        self._read(limit)
        self._make_splits(len(self.gdb_index), split, sizes, self.seed)

    def _read(self, limit: int | None) -> None:
        gdb_index, smiles, elements, xyz, raw = [], [], [], [], []
        needed = ["Index", "SMILES", "Elements", "XYZ_Ang", *_QM9PACK_COLUMNS.values()]
        for path in self._paths:
            with open(path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                missing = [c for c in needed if c not in (reader.fieldnames or [])]
                if missing:
                    raise SourceError(f"{path}: missing columns {missing}")
                for row in reader:
                    if limit is not None and len(gdb_index) >= limit:
                        break
                    try:
                        gdb_index.append(int(row["Index"]))
                        raw.append([float(row[c]) for c in _QM9PACK_COLUMNS.values()])
                    except ValueError as e:
                        where = f"{path} line {reader.line_num}"
                        raise SourceError(f"{where}: {e}") from None
                    smiles.append(row["SMILES"])
                    elements.append(row["Elements"])
                    xyz.append(row["XYZ_Ang"])
        if not gdb_index:
            raise SourceError(f"no molecules in {self.csv_dir}")
        self.gdb_index = np.asarray(gdb_index, dtype=np.int64)
        if np.any(np.diff(self.gdb_index) <= 0):
            raise SourceError(f"{self.csv_dir}: GDB indices are not increasing")
        self.smiles = smiles
        self._elements_text = elements
        self._xyz_text = xyz
        self._raw_partial = np.asarray(raw, dtype=np.float64)
        self._targets = None  # computed on first use (needs the parsed elements)
        if limit is None and len(gdb_index) != NUM_QM9_CHARACTERIZED:
            logger.warning(
                "qm9pack: read %d molecules, expected %d",
                len(gdb_index),
                NUM_QM9_CHARACTERIZED,
            )
        logger.info("qm9pack: %d molecules from %s", len(gdb_index), self.csv_dir)

    def elements(self, pos: int) -> list[str]:
        """Element symbols of molecule ``pos`` (file order), in XYZ atom order."""
        text = self._elements_text[pos].strip()
        # A Python list literal like ['C','H']; split by hand (10x faster than ast).
        if not (text.startswith("[") and text.endswith("]")):
            raise SourceError(
                f"GDB {self.gdb_index[pos]}: cannot parse Elements {text[:80]!r}"
            )
        symbols = [e.strip().strip("'\"") for e in text[1:-1].split(",")]
        bad = [e for e in symbols if e not in ATOMREF_HARTREE]
        if bad:
            raise SourceError(f"GDB {self.gdb_index[pos]}: unexpected elements {bad}")
        return symbols

    def coordinates(self, pos: int) -> np.ndarray:
        """float64 ``[N, 3]`` DFT coordinates in Å of molecule ``pos`` (file order)."""
        text = self._xyz_text[pos]
        # "[[x,y,z],...]" is not JSON: 5 rows (e.g. acetylene) write floats as "0.",
        # which float() accepts; anything stranger goes through literal_eval.
        try:
            flat = text.replace("[", "").replace("]", "").split(",")
            xyz = np.array(flat, dtype=np.float64)
        except ValueError:
            try:
                xyz = np.asarray(ast.literal_eval(text), dtype=np.float64)
            except (ValueError, SyntaxError) as e:
                raise SourceError(
                    f"GDB {self.gdb_index[pos]}: cannot parse XYZ_Ang {text[:80]!r} "
                    f"({e})"
                ) from None
        if xyz.size % 3:
            raise SourceError(
                f"GDB {self.gdb_index[pos]}: XYZ_Ang is not a list of triples"
            )
        return xyz.reshape(-1, 3)

    def targets(self) -> np.ndarray:
        """float64 ``[n, 19]`` targets of the molecules read, in file order.

        Units are those of :data:`QM9_TARGETS`.
        """
        if self._targets is None:
            n = len(self.gdb_index)
            counts = {s: np.zeros(n, np.int64) for s in ATOMREF_HARTREE}
            for i in range(n):
                for el in self.elements(i):
                    counts[el][i] += 1
            cols = {k: self._raw_partial[:, j] for j, k in enumerate(_QM9PACK_COLUMNS)}
            totals = np.stack([cols[v] for v in _ATOM_FROM_TOTAL.values()], axis=1)
            atom = atomization_kcalmol(totals, counts)
            for j, k in enumerate(_ATOM_FROM_TOTAL):
                cols[k] = atom[:, j]
            raw = np.stack([cols[name] for name in QM9_TARGET_NAMES], axis=1)
            self._targets = convert_raw_targets(raw)
        return self._targets

    def record(self, split: str, index: int, pos: int) -> SourceRecord:
        """The record of molecule ``pos`` (file order) as item ``index`` of a split."""
        gdb = int(self.gdb_index[pos])
        elements = self.elements(pos)
        coords = self.coordinates(pos)
        if len(elements) != len(coords):
            raise SourceError(
                f"GDB {gdb}: {len(elements)} elements but {len(coords)} coordinates"
            )
        return SourceRecord(
            split=split,
            index=index,
            item=f"qm9pack gdb_{gdb} ({split} #{index})",
            kind="xyz",
            text=xyz_block(elements, coords, f"gdb_{gdb}"),
            y=self.targets()[pos].astype(np.float32),
            use_3d=self.use_3d,
            charge=0,
            template_smiles=self.smiles[pos],
        )

    def describe(self) -> dict:
        """Target names and units, split scheme and options (LMDB meta record)."""
        return {
            "source": self.name,
            "dataset": "QM9 (Ramakrishnan et al. 2014) via qm9pack",
            **self._describe_common(),
        }


_SDF_END = b"$$$$"
_GDB_NAME = re.compile(r"^gdb_(\d+)$")


class QM9PyGRawSource(_SeededSplits, Source):
    """QM9 from PyG's raw files (kind ``molblock``, hydrogens kept as in ``qm9H``).

    ``raw_dir`` holds ``gdb9.sdf`` (133,885 records titled ``gdb_<n>``),
    ``gdb9.sdf.csv`` (header :attr:`CSV_COLUMNS`; SDF record ``i`` is CSV row ``i``) and
    ``uncharacterized.txt``. The molecules it lists are skipped and counted
    (:attr:`num_skipped`, :attr:`skipped_gdb_index`); the others are numbered in file
    order and split by :func:`qm9_split`.

    Args:
        raw_dir: folder with the three files.
        split: as in :class:`QM9PackSource`.
        seed: as in :class:`QM9PackSource`.
        sizes: as in :class:`QM9PackSource`.
        use_3d: keep the SDF coordinates as ``pos``.
        remove_hs: as in :class:`QM9PackSource`; the MOL block always has hydrogens.
        limit: keep only the first ``limit`` characterized molecules. The skip count
            still covers the whole file.

    Raises:
        SourceError: a missing file, a wrong CSV header, or SDF and CSV disagree.
    """

    name = "qm9-pyg-raw"
    CSV_COLUMNS = (
        "mol_id", "A", "B", "C", "mu", "alpha", "homo", "lumo", "gap", "r2", "zpve",
        "u0", "u298", "h298", "g298", "cv", "u0_atom", "u298_atom", "h298_atom",
        "g298_atom",
    )  # fmt: skip

    def __init__(
        self,
        raw_dir: str | os.PathLike,
        split: str = "seeded",
        seed: int = 1,
        sizes: Sequence[int] = QM9_SPLIT_SIZES,
        use_3d: bool = True,
        remove_hs: bool = False,
        limit: int | None = None,
    ):
        self.raw_dir = Path(raw_dir)
        self.use_3d = bool(use_3d)
        self.remove_hs = bool(remove_hs)
        self.split_scheme = split
        self.seed = int(seed)
        self._paths = _check_files(self.raw_dir, PYG_RAW_FILES)
        self._read_csv(limit)
        self._offsets: list[tuple[int, int]] | None = None  # SDF byte ranges, lazily
        self._make_splits(len(self.gdb_index), split, sizes, self.seed)

    def _read_csv(self, limit: int | None) -> None:
        _, csv_path, unc_path = self._paths
        uncharacterized = set(read_uncharacterized(unc_path))
        logger.info("%s: %d molecules listed", unc_path, len(uncharacterized))
        mol_ids, rows, kept, skipped = [], [], [], []
        with open(csv_path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None or tuple(h.strip() for h in header) != self.CSV_COLUMNS:
                raise SourceError(
                    f"{csv_path}: header {header} != {list(self.CSV_COLUMNS)}"
                )
            for row_no, row in enumerate(reader):
                if not row:
                    continue
                mol_id = row[0].strip()
                m = _GDB_NAME.match(mol_id)
                if m is None:
                    raise SourceError(
                        f"{csv_path} row {row_no}: mol_id {mol_id!r} is not gdb_<n>"
                    )
                mol_ids.append(mol_id)
                gdb = int(m.group(1))
                if gdb in uncharacterized:
                    skipped.append(gdb)
                    continue
                if limit is not None and len(kept) >= limit:
                    continue
                try:
                    rows.append([float(v) for v in row[1:]])
                except ValueError as e:
                    raise SourceError(f"{csv_path} row {row_no}: {e}") from None
                kept.append((len(mol_ids) - 1, gdb))
        if not kept:
            raise SourceError(f"no characterized molecules in {csv_path}")
        self._mol_ids = mol_ids
        self._sdf_record = np.asarray([k[0] for k in kept], dtype=np.int64)
        self.gdb_index = np.asarray([k[1] for k in kept], dtype=np.int64)
        self.skipped_gdb_index = np.asarray(skipped, dtype=np.int64)
        self.num_skipped = len(skipped)
        # CSV order A,B,C,mu,...,g298_atom -> PyG order mu,...,g298_atom,A,B,C; units.
        raw = np.asarray(rows, dtype=np.float64)
        self._targets = convert_raw_targets(np.concatenate([raw[:, 3:], raw[:, :3]], 1))
        logger.info(
            "%s: %d rows, %d kept, %d skipped as uncharacterized",
            csv_path,
            len(mol_ids),
            len(kept),
            self.num_skipped,
        )
        full = limit is None and len(mol_ids) == NUM_QM9_MOLECULES
        if full and self.num_skipped != NUM_QM9_UNCHARACTERIZED:
            logger.warning(
                "skipped %d uncharacterized molecules, expected %d",
                self.num_skipped,
                NUM_QM9_UNCHARACTERIZED,
            )

    def _index_sdf(self) -> list[tuple[int, int]]:
        """Byte range of every SDF record (one scan, on first use)."""
        if self._offsets is None:
            offsets, start, pos = [], 0, 0
            with open(self._paths[0], "rb") as f:
                for line in f:
                    pos += len(line)
                    if line.rstrip(b"\r\n") == _SDF_END:
                        offsets.append((start, pos))
                        start = pos
            if len(offsets) != len(self._mol_ids):
                raise SourceError(
                    f"{self._paths[0]} has {len(offsets)} records but "
                    f"{self._paths[1]} has {len(self._mol_ids)} rows; SDF record i "
                    "must be CSV row i"
                )
            self._offsets = offsets
        return self._offsets

    def molblock(self, pos: int) -> str:
        """The MOL block (up to ``M  END``) of kept molecule ``pos`` (file order).

        Raises:
            SourceError: the record's title is a ``gdb_<n>`` other than the CSV row's.
        """
        record = int(self._sdf_record[pos])
        start, end = self._index_sdf()[record]
        with open(self._paths[0], "rb") as f:
            f.seek(start)
            text = f.read(end - start).decode("utf-8", errors="replace")
        lines = text.splitlines()
        title = lines[0].strip() if lines else ""
        if _GDB_NAME.match(title) and title != self._mol_ids[record]:
            raise SourceError(
                f"{self._paths[0]} record {record} is {title!r} but {self._paths[1]} "
                f"row {record} is {self._mol_ids[record]!r}"
            )
        for k, line in enumerate(lines):
            if line.startswith("M  END"):
                lines = lines[: k + 1]
                break
        return "\n".join(lines) + "\n"

    def targets(self) -> np.ndarray:
        """float64 ``[n, 19]`` targets of the kept molecules, in file order.

        Units are those of :data:`QM9_TARGETS`.
        """
        return self._targets

    def record(self, split: str, index: int, pos: int) -> SourceRecord:
        """The record of kept molecule ``pos`` as item ``index`` of a split."""
        gdb = int(self.gdb_index[pos])
        return SourceRecord(
            split=split,
            index=index,
            item=f"gdb9.sdf gdb_{gdb} ({split} #{index})",
            kind="molblock",
            text=self.molblock(pos),
            y=self._targets[pos].astype(np.float32),
            use_3d=self.use_3d,
        )

    def describe(self) -> dict:
        """Target names and units, split, skip count and options (LMDB meta record)."""
        return {
            "source": self.name,
            "dataset": "QM9 (Ramakrishnan et al. 2014), PyG raw layout",
            "num_skipped_uncharacterized": int(self.num_skipped),
            **self._describe_common(),
        }
