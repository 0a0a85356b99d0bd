"""Write a public "your own data" example CSV from files RDKit ships (offline, no download).

The set: 1,017 molecules (aryl sulfonamides) of the ChEMBL document CHEMBL2321810 with their
activities as pIC50, from RDKit's Free-Wilson example (``rdkit/Contrib/FreeWilson/data/
CHEMBL2321810.smi`` and ``CHEMBL2321810_act.csv``; ChEMBL data, CC BY-SA 3.0). Columns:
``chembl_id,smiles,pIC50``, in the order of the SMILES file.

    python scripts/make_user_example.py --out runs/chembl/pic50.csv [--limit 40]
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import logging
import os
import sys
from pathlib import Path

logger = logging.getLogger("make_user_example")

FILES = ("CHEMBL2321810.smi", "CHEMBL2321810_act.csv")


def data_dir() -> Path:
    """RDKit's Free-Wilson data folder (``RDConfig.RDContribDir``, or next to the package)."""
    import rdkit
    from rdkit import RDConfig

    candidates = [Path(getattr(RDConfig, "RDContribDir", "")) / "FreeWilson" / "data",
                  Path(rdkit.__file__).parent / "Contrib" / "FreeWilson" / "data"]
    for path in candidates:
        if all((path / f).is_file() for f in FILES):
            return path
    raise FileNotFoundError(
        f"RDKit's Free-Wilson example data ({', '.join(FILES)}) is not in {candidates}; "
        "it ships with the rdkit wheel (pip install rdkit)"
    )


def read_example(limit: int | None = None) -> list[tuple[str, str, float]]:
    """``(chembl_id, smiles, pIC50)`` rows, SMILES-file order."""
    src = data_dir()
    with open(src / FILES[1], newline="") as fh:
        act = {row["Name"]: float(row["Act"]) for row in csv.DictReader(fh)}
    rows = []
    for line_no, line in enumerate((src / FILES[0]).read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1] not in act:
            raise ValueError(f"{src / FILES[0]} line {line_no}: expected 'SMILES id' with an "
                             f"activity in {FILES[1]}, got {line!r}")
        rows.append((f"CHEMBL{fields[1]}", fields[0], act[fields[1]]))
        if limit is not None and len(rows) >= limit:
            break
    return rows


def main(argv: list[str] | None = None) -> int:
    """Write the CSV; return the exit status."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="CSV file to write")
    p.add_argument("--limit", type=int, default=None, help="first N molecules only (tests)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    src = data_dir()
    for name in FILES:
        digest = hashlib.sha256((src / name).read_bytes()).hexdigest()
        logger.info("input %s sha256 %s", src / name, digest)
    rows = read_example(args.limit)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    with open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["chembl_id", "smiles", "pIC50"])
        writer.writerows((i, s, f"{a:g}") for i, s, a in rows)
    os.replace(tmp, out)
    logger.info("wrote %d molecules to %s", len(rows), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
