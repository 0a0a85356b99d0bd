"""User datasets: a CSV of SMILES with label columns, or an SDF with label properties.

Splits come from a column/property holding the split name, or from a seeded random split
(``numpy.random.default_rng(seed)``) into ``train`` / ``valid`` / ``test`` by
``split_fractions``. Records keep file order within each split. A missing label value
becomes NaN (ignored by the losses); a missing column or property is a
:class:`SourceError` that lists what the file has.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import gzip
import logging
import math
import re
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from graphormer_ext.sources.base import MoleculeError, Source, SourceError, SourceRecord

logger = logging.getLogger(__name__)

RANDOM_SPLIT_NAMES = ("train", "valid", "test")
_MISSING = {"", "nan", "na", "n/a", "none", "null"}
_PROPERTY_HEADER = re.compile(r"<([^>]*)>")


def random_split(n: int, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Seeded random partition of ``range(n)``.

    Args:
        n: number of items.
        fractions: one fraction per split (``train, valid[, test]``), summing to 1.
        seed: seed of ``numpy.random.default_rng``.

    Returns:
        one sorted int64 index array per fraction; the first split takes the rounding
        remainder.

    Raises:
        ValueError: fractions that are negative, more than three, or do not sum to 1.
    """
    fractions = [float(f) for f in fractions]
    if not 1 <= len(fractions) <= len(RANDOM_SPLIT_NAMES):
        raise ValueError(
            f"split_fractions needs 1 to 3 values (train, valid, test), got {fractions}"
        )
    total = sum(fractions)
    if any(f < 0 for f in fractions) or not math.isclose(total, 1.0, abs_tol=1e-6):
        raise ValueError(f"split_fractions must be >= 0 and sum to 1, got {fractions}")
    perm = np.random.default_rng(seed).permutation(n)
    sizes = [int(round(f * n)) for f in fractions[1:]]
    if sum(sizes) > n:
        raise ValueError(f"split_fractions {fractions} do not fit {n} items")
    sizes.insert(0, n - sum(sizes))
    bounds = np.cumsum([0] + sizes)
    return [
        np.sort(perm[a:b]).astype(np.int64) for a, b in zip(bounds[:-1], bounds[1:])
    ]


def _parse_label(value: str | None, where: str) -> float:
    if value is None or value.strip().lower() in _MISSING:
        return math.nan
    try:
        return float(value)
    except ValueError:
        raise SourceError(f"{where}: label {value!r} is not a number") from None


def _assign_splits(
    split_values: list[str] | None,
    n: int,
    fractions: Sequence[float],
    seed: int,
    where: str,
) -> dict[str, np.ndarray]:
    """Split name -> row indices, from per-row split names or a seeded random split."""
    if split_values is None:
        try:
            parts = random_split(n, fractions, seed)
        except ValueError as e:
            raise SourceError(f"{where}: {e}") from e
        return dict(zip(RANDOM_SPLIT_NAMES, parts))
    names: dict[str, list[int]] = {}
    for i, value in enumerate(split_values):
        names.setdefault(value, []).append(i)
    order = [s for s in RANDOM_SPLIT_NAMES if s in names] + [
        s for s in names if s not in RANDOM_SPLIT_NAMES
    ]
    return {s: np.asarray(names[s], dtype=np.int64) for s in order}


class CSVSource(Source):
    """A CSV (``.csv.gz``, ``.tsv``) of SMILES and numeric labels; 3D with ``conformers``.

    Args:
        path: the file; ``.tsv`` files are tab-separated.
        smiles_column: column holding the SMILES.
        label_columns: target columns, in the order of ``y``; empty cells and
            ``nan``/``NA`` are NaN.
        split_column: column holding each row's split name; ``None`` draws a seeded
            random split.
        split_fractions: ``train, valid, test`` fractions of the random split.
        seed: seed of the random split.
        label_units: optional unit per label, recorded by :meth:`describe`.
        conformers: generate a 3D conformer per molecule (RDKit ETKDG, then MMFF94),
            seeded by ``conformer_seed``, and store it as ``pos``; a molecule whose
            embedding fails is skipped and listed. The work happens in the featurize
            workers (:attr:`featurize`, passed to the writer).
        conformer_seed: ETKDG ``randomSeed``.

    Raises:
        SourceError: missing file or column (the message lists the columns), a
            non-numeric label, or a row without a split name.
    """

    name = "csv"

    def __init__(
        self,
        path,
        smiles_column: str = "smiles",
        label_columns: Sequence[str] | None = (),
        split_column: str | None = None,
        split_fractions: Sequence[float] = (0.8, 0.1, 0.1),
        seed: int = 0,
        label_units: Sequence[str] | None = None,
        conformers: bool = False,
        conformer_seed: int = 0,
    ):
        self.path = Path(path)
        self.conformers = bool(conformers)
        self.conformer_seed = int(conformer_seed)
        # the writer's featurize function: None = the default (2D from SMILES)
        self.featurize = (
            functools.partial(featurize_with_conformer, seed=self.conformer_seed)
            if self.conformers
            else None
        )
        self.smiles_column = smiles_column
        self.label_columns = list(label_columns or ())
        self.split_column = split_column
        self.split_fractions = tuple(split_fractions)
        self.seed = seed
        self.label_units = list(label_units) if label_units is not None else None
        if not self.path.is_file():
            raise SourceError(f"CSV file not found: {self.path}")
        self.smiles, self.labels, split_values = self._read()
        self.indices = _assign_splits(
            split_values, len(self.smiles), self.split_fractions, seed, str(self.path)
        )
        logger.info(
            "%s: %d rows, splits %s", self.path, len(self.smiles), self.splits()
        )

    def _read(self) -> tuple[list[str], np.ndarray, list[str] | None]:
        name = self.path.name.lower()
        delimiter = "\t" if name.endswith((".tsv", ".tsv.gz")) else ","
        opener = gzip.open if name.endswith(".gz") else open
        with opener(self.path, "rt", newline="", encoding="utf-8") as f:
            reader = csv.reader(f, delimiter=delimiter)
            header = [h.strip() for h in next(reader, [])]
            wanted = [self.smiles_column, *self.label_columns]
            if self.split_column is not None:
                wanted.append(self.split_column)
            missing = [c for c in wanted if c not in header]
            if missing:
                raise SourceError(
                    f"{self.path}: no column {missing}; available columns: {header}"
                )
            c_smi = header.index(self.smiles_column)
            c_lab = [header.index(c) for c in self.label_columns]
            c_split = None
            if self.split_column is not None:
                c_split = header.index(self.split_column)
            smiles, labels, splits = [], [], []
            for row_no, row in enumerate(reader):
                if not row:
                    continue  # blank line
                row = row + [""] * (len(header) - len(row))
                smiles.append(row[c_smi].strip())
                where = f"{self.path} row {row_no} column"
                labels.append(
                    [_parse_label(row[c], f"{where} {header[c]!r}") for c in c_lab]
                )
                if c_split is not None:
                    value = row[c_split].strip()
                    if not value:
                        raise SourceError(
                            f"{self.path} row {row_no}: empty split column "
                            f"{self.split_column!r}"
                        )
                    splits.append(value)
        y = np.asarray(labels, dtype=np.float32)
        y = y.reshape(len(smiles), len(self.label_columns))  # [rows, T]
        return smiles, y, (splits if c_split is not None else None)

    def splits(self) -> dict[str, int]:
        """Split name -> number of records."""
        return {s: len(idx) for s, idx in self.indices.items()}

    def iter_split(self, split: str) -> Iterator[SourceRecord]:
        """Yield the split's rows in file order as ``kind="smiles"`` records.

        Raises:
            SourceError: an unknown split.
        """
        if split not in self.indices:
            raise SourceError(
                f"{self.path}: no split {split!r}; splits: {list(self.indices)}"
            )
        for k, row in enumerate(self.indices[split].tolist()):
            yield SourceRecord(
                split=split,
                index=k,
                item=f"{self.path.name} row {row} ({split} #{k})",
                kind="smiles",
                text=self.smiles[row],
                y=self.labels[row].copy(),
            )

    def files(self) -> list[Path]:
        """The CSV file."""
        return [self.path]

    def describe(self) -> dict:
        """Target names and units, split rule."""
        return {
            "source": self.name,
            "file": self.path.name,
            "targets": self.label_columns,
            "units": self.label_units,
            "split": self.split_column
            or {"fractions": list(self.split_fractions), "seed": self.seed},
            "splits": self.splits(),
            "conformers": (
                {"method": "ETKDGv3+MMFF94", "seed": self.conformer_seed}
                if self.conformers
                else None
            ),
        }


def embed_conformer(smiles: str, item: str, seed: int = 0, mmff_iters: int = 500):
    """A seeded 3D conformer of a SMILES: ETKDGv3 embedding, then MMFF94 relaxation.

    Hydrogens are added for the embedding and kept in the returned molecule. When ETKDG
    fails it is retried from random coordinates; MMFF is skipped (ETKDG geometry kept)
    for molecules without MMFF parameters.

    Returns:
        ``rdkit.Chem.Mol`` with explicit hydrogens and one conformer (Å).

    Raises:
        MoleculeError: unreadable SMILES, or no conformer could be embedded.
    """
    from rdkit import Chem
    from rdkit.Chem import AllChem

    from graphormer_ext.featurize.molecules import mol_from_smiles

    mol = Chem.AddHs(mol_from_smiles(smiles, item))
    params = AllChem.ETKDGv3()
    params.randomSeed = int(seed)
    if AllChem.EmbedMolecule(mol, params) != 0:
        params.useRandomCoords = True
        if AllChem.EmbedMolecule(mol, params) != 0:
            raise MoleculeError(
                item, f"RDKit ETKDG could not embed a 3D conformer for {smiles!r}"
            )
    if AllChem.MMFFHasAllMoleculeParams(mol):
        AllChem.MMFFOptimizeMolecule(mol, maxIters=int(mmff_iters))
    return mol


def featurize_with_conformer(rec: SourceRecord, *, seed: int = 0, **kwargs):
    """Featurize a SMILES record with a generated 3D conformer (picklable for pools).

    ``kwargs`` are those of
    :func:`graphormer_ext.featurize.pipeline.featurize_record`.

    Raises:
        MoleculeError: unreadable SMILES or failed embedding (counted as a skip).
    """
    from rdkit import Chem

    from graphormer_ext.featurize.pipeline import featurize_record

    if rec.kind != "smiles":
        return featurize_record(rec, **kwargs)
    mol = embed_conformer(rec.text, rec.item, seed=seed)
    block = Chem.MolToMolBlock(mol)
    rec3d = dataclasses.replace(rec, kind="molblock", text=block, use_3d=True)
    return featurize_record(rec3d, **kwargs)


def sdf_properties(block: str) -> dict[str, str]:
    """The data fields (``> <NAME>`` items after ``M  END``) of one SDF record.

    Args:
        block: one record's text, as yielded by
            :func:`~graphormer_ext.featurize.molecules.iter_sdf`.

    Returns:
        property name -> value (multi-line values joined with ``\\n``).
    """
    end = block.find("M  END")
    if end < 0:
        return {}
    props: dict[str, str] = {}
    name = None
    values: list[str] = []
    for line in block[end:].split("\n")[1:]:
        if name is None:
            if line.startswith(">"):
                m = _PROPERTY_HEADER.search(line)
                if m:
                    name, values = m.group(1), []
        elif line.strip():
            values.append(line.rstrip("\r"))
        else:
            props[name] = "\n".join(values)
            name = None
    if name is not None:
        props[name] = "\n".join(values)
    return props


class SDFSource(Source):
    """An SDF (``.sdf``, ``.sdf.gz`` or a tar of one) with label properties per record.

    The constructor streams the file once to read labels and splits; :meth:`iter_split`
    streams it again, so the file is never held in memory.

    Args:
        path: the SDF file.
        label_properties: data-field names of the targets, in the order of ``y``; a
            record without one gets NaN.
        split_property: data field holding each record's split name; ``None`` draws a
            seeded random split.
        split_fractions: ``train, valid, test`` fractions of the random split.
        seed: seed of the random split.
        use_3d: keep the record coordinates as ``pos`` (set ``False`` for 2D
            depictions).
        label_units: optional unit per label, recorded by :meth:`describe`.

    Raises:
        SourceError: a missing file, a label or split property that no record has (the
            message lists the properties found), or a record without a split name.
    """

    name = "sdf"

    def __init__(
        self,
        path,
        label_properties: Sequence[str] | None = (),
        split_property: str | None = None,
        split_fractions: Sequence[float] = (0.8, 0.1, 0.1),
        seed: int = 0,
        use_3d: bool = True,
        label_units: Sequence[str] | None = None,
    ):
        from graphormer_ext.featurize.molecules import iter_sdf

        self.path = Path(path)
        self.label_properties = list(label_properties or ())
        self.split_property = split_property
        self.split_fractions = tuple(split_fractions)
        self.seed = seed
        self.use_3d = use_3d
        self.label_units = list(label_units) if label_units is not None else None
        if not self.path.is_file():
            raise SourceError(f"SDF file not found: {self.path}")

        labels, split_values, titles = [], [], []
        seen: set[str] = set()
        for i, block in enumerate(iter_sdf(self.path)):
            props = sdf_properties(block)
            seen.update(props)
            titles.append(block.split("\n", 1)[0].strip())
            labels.append(
                [
                    _parse_label(props.get(p), f"{self.path} record {i} property {p!r}")
                    for p in self.label_properties
                ]
            )
            if split_property is not None:
                split_values.append(props.get(split_property, "").strip())
        wanted = self.label_properties + ([split_property] if split_property else [])
        missing = [p for p in wanted if p not in seen]
        if missing:
            raise SourceError(
                f"{self.path}: no record has property {missing}; properties found: "
                f"{sorted(seen)}"
            )
        if split_property is not None and not all(split_values):
            first = split_values.index("")
            raise SourceError(
                f"{self.path} record {first}: no value for split property "
                f"{split_property!r}"
            )
        n = len(labels)
        self.labels = np.asarray(labels, dtype=np.float32)
        self.labels = self.labels.reshape(n, len(self.label_properties))  # [n, T]
        self.titles = titles
        for j, p in enumerate(self.label_properties):
            n_missing = int(np.isnan(self.labels[:, j]).sum())
            if n_missing:
                logger.warning(
                    "%s: %d of %d records have no %r (label set to NaN)",
                    self.path,
                    n_missing,
                    n,
                    p,
                )
        self.indices = _assign_splits(
            split_values if split_property is not None else None,
            n,
            self.split_fractions,
            seed,
            str(self.path),
        )
        self._split_of = np.empty(n, dtype=object)
        self._pos_in_split = np.empty(n, dtype=np.int64)
        for s, idx in self.indices.items():
            self._split_of[idx] = s
            self._pos_in_split[idx] = np.arange(len(idx))
        logger.info("%s: %d records, splits %s", self.path, n, self.splits())

    def splits(self) -> dict[str, int]:
        """Split name -> number of records."""
        return {s: len(idx) for s, idx in self.indices.items()}

    def iter_split(self, split: str) -> Iterator[SourceRecord]:
        """Stream the file; yield the split's records in file order (kind ``molblock``).

        Raises:
            SourceError: an unknown split, or a file that changed since the constructor
                read it.
        """
        from graphormer_ext.featurize.molecules import iter_sdf

        if split not in self.indices:
            raise SourceError(
                f"{self.path}: no split {split!r}; splits: {list(self.indices)}"
            )
        n = len(self.labels)
        count = 0
        for i, block in enumerate(iter_sdf(self.path)):
            if i >= n:
                raise SourceError(f"{self.path}: the file grew since it was opened")
            if self._split_of[i] != split:
                continue
            k = int(self._pos_in_split[i])
            title = f" {self.titles[i]!r}" if self.titles[i] else ""
            yield SourceRecord(
                split=split,
                index=k,
                item=f"{self.path.name} record {i}{title} ({split} #{k})",
                kind="molblock",
                text=block,
                y=self.labels[i].copy(),
                use_3d=self.use_3d,
            )
            count += 1
        if count != len(self.indices[split]):
            raise SourceError(f"{self.path}: the file shrank since it was opened")

    def files(self) -> list[Path]:
        """The SDF file."""
        return [self.path]

    def describe(self) -> dict:
        """Target names and units, split rule, 3D flag."""
        return {
            "source": self.name,
            "file": self.path.name,
            "targets": self.label_properties,
            "units": self.label_units,
            "use_3d": self.use_3d,
            "split": self.split_property
            or {"fractions": list(self.split_fractions), "seed": self.seed},
            "splits": self.splits(),
        }
