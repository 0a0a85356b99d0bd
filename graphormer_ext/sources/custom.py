"""User datasets: a CSV of SMILES with label columns, or an SDF with label properties.

Splits come from a column/property holding the split name, or from a seeded random split
(``numpy.random.default_rng(seed)``) into ``train`` / ``valid`` / ``test`` by
``split_fractions``. Records keep file order within each split. A missing label value
becomes NaN (ignored by the losses); a missing column or property is a
:class:`SourceError` that lists what the file has.

Messages name file lines (1-based, the CSV header is line 1) and SDF records (1-based,
with the line each record starts on). Every record carries its provenance (SMILES, line
or record number, optional ID; see :mod:`graphormer_ext.data.provenance`), and each
split's meta lists the rows assigned to it (:meth:`CSVSource.split_rows`).
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import gzip
import logging
import math
import re
import zlib
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from graphormer_ext.sources.base import (
    MoleculeError,
    Source,
    SourceError,
    SourceRecord,
    check_split_name,
)

logger = logging.getLogger(__name__)

RANDOM_SPLIT_NAMES = ("train", "valid", "test")
_MISSING = {"", "nan", "na", "n/a", "none", "null"}
_PROPERTY_HEADER = re.compile(r"<([^>]*)>")
# --delimiter names -> characters; "auto" detects the delimiter from the header
DELIMITERS = {"comma": ",", ",": ",", "tab": "\t", "\\t": "\t", "\t": "\t",
              "semicolon": ";", ";": ";", "pipe": "|", "|": "|"}  # fmt: skip
_SNIFF_ORDER = (",", "\t", ";", "|")
_MAX_DUPLICATE_EXAMPLES = 5


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
        number = float(value)
    except ValueError:
        raise SourceError(f"{where}: label {value!r} is not a number") from None
    # labels are stored as float32: 1e39 would become inf there
    with np.errstate(over="ignore"):
        stored = float(np.float32(number))
    if math.isnan(number) or math.isinf(stored):
        raise SourceError(
            f"{where}: label {value!r} is not a finite float32 number; correct it, or "
            "leave the cell empty (or 'nan') to mark the label as missing"
        )
    return number


def resolve_delimiter(name: str | None) -> str | None:
    """A ``--delimiter`` value as the character, or ``None`` for ``auto``.

    Raises:
        ValueError: an unknown name (the message lists the accepted ones).
    """
    if name is None or name == "auto":
        return None
    if name in DELIMITERS:
        return DELIMITERS[name]
    if len(name) == 1 and not name.isalnum() and name not in "\"'\r\n":
        return name
    raise ValueError(
        f"unknown delimiter {name!r}; use auto, comma, tab, semicolon, pipe or another "
        "single punctuation character"
    )


def _delimiter_name(delimiter: str) -> str:
    return {",": "comma", "\t": "tab", ";": "semicolon", "|": "pipe"}.get(
        delimiter, repr(delimiter)
    )


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
    """A CSV or TSV (optionally ``.gz``) of SMILES and numeric labels; 3D optional.

    Args:
        path: the file (UTF-8; a byte-order mark is accepted).
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
        delimiter: the field separator (a character, or a name of :data:`DELIMITERS`);
            ``None`` or ``"auto"`` detects it from the header: the first of tab (for
            ``.tsv`` names), comma, tab, semicolon and pipe under which the header has
            every requested column.
        id_column: optional column with the user's molecule ID, stored with each record.

    Raises:
        SourceError: missing or empty file, a file that is not UTF-8 text, a missing or
            repeated column (the message lists the columns), a non-numeric or infinite
            label, a row with more fields than the header, or a row without a valid
            split name. Messages name the file line (1-based, header = line 1).
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
        delimiter: str | None = None,
        id_column: str | None = None,
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
        self.id_column = id_column
        self.split_fractions = tuple(split_fractions)
        self.seed = seed
        self.label_units = list(label_units) if label_units is not None else None
        try:
            self.delimiter = resolve_delimiter(delimiter)
        except ValueError as e:
            raise SourceError(str(e)) from None
        if not self.path.is_file():
            raise SourceError(f"CSV file not found: {self.path}")
        self.smiles, self.labels, split_values, self.lines, self.ids = self._read()
        if not self.smiles:
            raise SourceError(
                f"{self.path}: no data rows below the header; add molecules, one per "
                "line"
            )
        self.indices = _assign_splits(
            split_values, len(self.smiles), self.split_fractions, seed, str(self.path)
        )
        self.duplicates = self._find_duplicates()
        logger.info(
            "%s: %d rows, splits %s", self.path, len(self.smiles), self.splits()
        )
        if self.duplicates["rows"]:
            d = self.duplicates
            logger.warning(
                "%s: %d rows repeat the SMILES of an earlier row (%d with other "
                "labels, %d in another split), e.g. lines %s; they are kept, counted "
                "in the meta (source.describe.duplicates)",
                self.path,
                d["rows"],
                d["conflicting_labels"],
                d["across_splits"],
                ", ".join(f"{a} and {b}" for a, b in d["examples"]),
            )

    # --- reading ----------------------------------------------------------------------
    def _open(self):
        opener = gzip.open if self.path.name.lower().endswith(".gz") else open
        # utf-8-sig: a byte-order mark (spreadsheet "CSV UTF-8") is not in the header
        return opener(self.path, "rt", newline="", encoding="utf-8-sig")

    def _read(self):
        try:
            with self._open() as f:
                return self._parse(f)
        except UnicodeDecodeError:
            raise SourceError(self._utf8_error()) from None
        except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
            raise SourceError(
                f"{self.path}: not a readable gzip file ({exc}); decompress it or "
                "download it again"
            ) from None

    def _utf8_error(self) -> str:
        """Where the first non-UTF-8 byte is, as a one-line message with the fix."""
        opener = gzip.open if self.path.name.lower().endswith(".gz") else open
        with opener(self.path, "rb") as f:
            for line_no, line in enumerate(f, start=1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as exc:
                    return (
                        f"{self.path} line {line_no}: not UTF-8 text (byte "
                        f"0x{line[exc.start]:02x} at column {exc.start + 1}); save the "
                        "file as UTF-8, e.g. `iconv -f latin1 -t utf-8 "
                        f"{self.path.name} > fixed.csv` or 'CSV UTF-8' in a spreadsheet"
                    )
        return f"{self.path}: not UTF-8 text; save the file as UTF-8"

    def _pick_delimiter(self, first_line: str, wanted: list[str]) -> str:
        if self.delimiter is not None:
            return self.delimiter
        order = list(_SNIFF_ORDER)
        if self.path.name.lower().endswith((".tsv", ".tsv.gz")):
            order.remove("\t")
            order.insert(0, "\t")
        fields = {
            d: [h.strip() for h in next(csv.reader([first_line], delimiter=d), [])]
            for d in order
        }
        for d in order:
            if all(c in fields[d] for c in wanted):
                chosen = d
                break
        else:  # the column error below lists the header as split by the likeliest one
            chosen = max(order, key=lambda d: len(fields[d]))
        logger.info(
            "%s: delimiter %s (detected from the header; set --delimiter to override)",
            self.path,
            _delimiter_name(chosen),
        )
        return chosen

    def _parse(self, f):
        wanted = [self.smiles_column, *self.label_columns]
        if self.split_column is not None:
            wanted.append(self.split_column)
        if self.id_column is not None:
            wanted.append(self.id_column)
        first = f.readline()
        if not first.strip():
            raise SourceError(
                f"{self.path}: empty file (line 1 must be the header naming the "
                f"columns, e.g. {','.join(wanted)})"
            )
        delimiter = self._pick_delimiter(first, wanted)
        self.delimiter = delimiter
        header = [h.strip() for h in next(csv.reader([first], delimiter=delimiter))]
        missing = [c for c in wanted if c not in header]
        if missing:
            raise SourceError(
                f"{self.path}: no column {missing}; available columns: {header} "
                f"(delimiter {_delimiter_name(delimiter)}; set --delimiter if that is "
                "wrong)"
            )
        repeated = sorted({c for c in wanted if header.count(c) > 1})
        if repeated:
            raise SourceError(
                f"{self.path} line 1: column {repeated} appears more than once in the "
                "header; rename the copies"
            )
        c_smi = header.index(self.smiles_column)
        c_lab = [header.index(c) for c in self.label_columns]
        c_split = header.index(self.split_column) if self.split_column else None
        c_id = header.index(self.id_column) if self.id_column else None
        reader = csv.reader(f, delimiter=delimiter)
        smiles, labels, splits, lines, ids = [], [], [], [], []
        line_no = 1  # the header; reader.line_num counts from the second line
        try:
            for row in reader:
                start, line_no = line_no + 1, reader.line_num + 1
                if not row:
                    continue  # blank line
                if len(row) > len(header) and any(c.strip() for c in row[len(header):]):
                    raise SourceError(
                        f"{self.path} line {start}: {len(row)} fields but the header "
                        f"has {len(header)}; quote fields that contain the delimiter "
                        f"({_delimiter_name(delimiter)})"
                    )
                row = row + [""] * (len(header) - len(row))
                where = f"{self.path} line {start} column"
                labels.append(
                    [_parse_label(row[c], f"{where} {header[c]!r}") for c in c_lab]
                )
                if c_split is not None:
                    value = row[c_split].strip()
                    if not value:
                        raise SourceError(
                            f"{self.path} line {start}: empty split column "
                            f"{self.split_column!r}"
                        )
                    splits.append(
                        check_split_name(value, f"{where} {self.split_column!r}")
                    )
                smiles.append(row[c_smi].strip())
                lines.append(start)
                if c_id is not None:
                    ids.append(row[c_id].strip())
        except csv.Error as exc:
            raise SourceError(
                f"{self.path} line {reader.line_num + 1}: malformed CSV ({exc})"
            ) from None
        y = np.asarray(labels, dtype=np.float32)
        y = y.reshape(len(smiles), len(self.label_columns))  # [rows, T]
        return (
            smiles,
            y,
            (splits if c_split is not None else None),
            lines,
            (ids if c_id is not None else None),
        )

    def _find_duplicates(self) -> dict:
        """Rows whose SMILES text repeats an earlier row's (empty SMILES excluded)."""
        split_of = np.empty(len(self.smiles), dtype=object)
        for s, idx in self.indices.items():
            split_of[idx] = s
        first: dict[str, int] = {}
        rows = conflicting = across = 0
        groups: set[str] = set()
        examples = []
        for i, smi in enumerate(self.smiles):
            if not smi:
                continue
            j = first.setdefault(smi, i)
            if j == i:
                continue
            rows += 1
            groups.add(smi)
            if not np.array_equal(self.labels[i], self.labels[j], equal_nan=True):
                conflicting += 1
            if split_of[i] != split_of[j]:
                across += 1
            if len(examples) < _MAX_DUPLICATE_EXAMPLES:
                examples.append([self.lines[j], self.lines[i]])
        return {
            "rows": rows,
            "smiles": len(groups),
            "conflicting_labels": conflicting,
            "across_splits": across,
            "examples": examples,
        }

    # --- Source interface -------------------------------------------------------------
    def splits(self) -> dict[str, int]:
        """Split name -> number of records."""
        return {s: len(idx) for s, idx in self.indices.items()}

    def split_rows(self, split: str) -> list[int]:
        """File lines (1-based, header = 1) of the split's rows, in split order."""
        return [self.lines[i] for i in self.indices[split].tolist()]

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
            line = self.lines[row]
            yield SourceRecord(
                split=split,
                index=k,
                item=f"{self.path.name} line {line} ({split} #{k})",
                kind="smiles",
                text=self.smiles[row],
                y=self.labels[row].copy(),
                source_row=line,
                source_id=self.ids[row] if self.ids is not None else None,
                smiles=self.smiles[row],
            )

    def files(self) -> list[Path]:
        """The CSV file."""
        return [self.path]

    def describe(self) -> dict:
        """Target names and units, split rule, delimiter, duplicate rows."""
        return {
            "source": self.name,
            "file": self.path.name,
            "targets": self.label_columns,
            "units": self.label_units,
            "split": self.split_column
            or {"fractions": list(self.split_fractions), "seed": self.seed},
            "splits": self.splits(),
            "delimiter": self.delimiter,
            "id_column": self.id_column,
            "source_row": "file line (1-based, header = line 1)",
            "duplicates": self.duplicates,
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
        SourceError: a missing file, a file without records, a label or split property
            that no record has (the message lists the properties found), a non-numeric
            or infinite label, or a record without a valid split name. Messages name the
            record (1-based) and the line it starts on.
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

        labels, split_values, titles, lines = [], [], [], []
        seen: set[str] = set()
        undecodable: list[tuple[int, int]] = []  # (record, line) holding non-UTF-8 bytes
        line = 1
        for i, block in enumerate(iter_sdf(self.path)):
            if "\ufffd" in block:  # iter_sdf decodes with errors="replace"
                undecodable.append((i + 1, line))
            props = sdf_properties(block)
            seen.update(props)
            titles.append(block.split("\n", 1)[0].strip())
            lines.append(line)
            where = f"{self.path} record {i + 1} (line {line})"
            labels.append(
                [
                    _parse_label(props.get(p), f"{where} property {p!r}")
                    for p in self.label_properties
                ]
            )
            if split_property is not None:
                value = props.get(split_property, "").strip()
                if value:
                    check_split_name(value, f"{where} property {split_property!r}")
                split_values.append(value)
            line += block.count("\n") + 1  # the block, then its "$$$$" line
        if not labels:
            raise SourceError(
                f"{self.path}: no molecule records (an SDF record ends with a '$$$$' "
                "line)"
            )
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
                f"{self.path} record {first + 1} (line {lines[first]}): no value for "
                f"split property {split_property!r}"
            )
        self.non_utf8_records = len(undecodable)
        if undecodable:
            first = ", ".join(f"record {r} (line {ln})" for r, ln in undecodable[:3])
            logger.warning(
                "%s: %d record(s) hold bytes that are not UTF-8 (%s%s); their titles and text "
                "properties keep U+FFFD in place of those bytes (labels that no longer parse "
                "are refused). Save the file as UTF-8 to keep the original text",
                self.path, len(undecodable), first, ", ..." if len(undecodable) > 3 else "",
            )
        n = len(labels)
        self.lines = lines
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
                item=f"{self.path.name} record {i + 1} (line {self.lines[i]}){title} "
                f"({split} #{k})",
                kind="molblock",
                text=block,
                y=self.labels[i].copy(),
                use_3d=self.use_3d,
                source_row=i + 1,
                source_id=self.titles[i] or None,
            )
            count += 1
        if count != len(self.indices[split]):
            raise SourceError(f"{self.path}: the file shrank since it was opened")

    def split_rows(self, split: str) -> list[int]:
        """Record numbers (1-based) of the split's records, in split order."""
        return [i + 1 for i in self.indices[split].tolist()]

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
            "source_row": "SDF record number (1-based)",
            "non_utf8_records": self.non_utf8_records,
        }
