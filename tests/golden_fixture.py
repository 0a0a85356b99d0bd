"""The official Transformer-M golden data, from the copy kept in ``tests/fixtures/golden/``.

:func:`golden` returns the same nested dict that ``torch.load`` gives for the original
``tm_golden_small_fixedpaths.pt`` (provenance: ``tests/fixtures/golden/README.md``): the
tensors come from the ``.npz``, everything else from the ``.json``, and the small model's
state dict is re-drawn from its documented seeded recipe and checked against the sha256 of
every original tensor. A missing or altered fixture is an error, never a skip: the fidelity
claims rest on these files.

``TRANSFORMER_M_GOLDEN=/path/to/tm_golden_small_fixedpaths.pt`` makes the tests read an
original ``.pt`` file instead.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

FIXTURE_DIR = Path(__file__).resolve().parent / "fixtures" / "golden"
STEM = "tm_golden_small_fixedpaths"
TENSOR = "__tensor__"


class GoldenFixtureError(RuntimeError):
    """The golden fixture is missing or does not reproduce the original file."""


def _require(path: Path) -> Path:
    if not path.is_file():
        raise GoldenFixtureError(
            f"golden fixture {path} is missing: restore it from git (tests/fixtures/golden/) "
            "or point TRANSFORMER_M_GOLDEN at the original tm_golden_small_fixedpaths.pt"
        )
    return path


def fixture_file(name: str) -> Path:
    """A file of ``tests/fixtures/golden/`` (error if absent)."""
    return _require(FIXTURE_DIR / name)


def _fill(obj, arrays):
    if isinstance(obj, dict):
        if set(obj) == {TENSOR}:
            return torch.from_numpy(np.array(arrays[obj[TENSOR]]))
        return {k: _fill(v, arrays) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_fill(v, arrays) for v in obj]
    return obj


def regenerate_state_dict(recipe: dict) -> dict[str, torch.Tensor]:
    """The small model's weights from the draw table of the fixture, sha256-checked.

    Raises:
        GoldenFixtureError: a re-drawn tensor differs from the original (e.g. a torch
            release changed the CPU generator's output).
    """
    g = torch.Generator().manual_seed(int(recipe["generator_seed"]))
    drawn = {}
    for row in recipe["draws"]:
        shape = tuple(row["shape"])
        if row["draw"] == "uniform":
            value = torch.empty(shape).uniform_(row["low"], row["high"], generator=g)
        else:
            value = torch.randn(shape, generator=g)
            value = value * row["scale"] if row["scale"] != 1.0 else value
            value = value + row["offset"] if row["offset"] != 0.0 else value
        drawn[row["name"]] = value
    bad = []
    for row in recipe["draws"]:
        value = drawn[row["name"]]
        if row["zero_row0"]:
            value[0] = 0.0
        if hashlib.sha256(value.numpy().tobytes()).hexdigest() != row["sha256"]:
            bad.append(row["name"])
    if bad:
        raise GoldenFixtureError(
            f"re-drawn golden weights differ from the original for {len(bad)} tensors "
            f"(e.g. {bad[:3]}); torch {torch.__version__} draws differently from the torch "
            "the fixture was made with (2.13.0): set TRANSFORMER_M_GOLDEN to the original .pt"
        )
    return {name: drawn[name] for name in recipe["order"]}


def load_golden(npz: Path | None = None, js: Path | None = None) -> dict:
    """The golden dict from the fixture files (default: the committed ones)."""
    npz = _require(Path(npz) if npz else FIXTURE_DIR / f"{STEM}.npz")
    js = _require(Path(js) if js else FIXTURE_DIR / f"{STEM}.json")
    structure = json.loads(js.read_text())
    recipe = structure.pop("state_dict")
    with np.load(npz, allow_pickle=False) as arrays:
        out = _fill(structure, arrays)
    out["state_dict"] = regenerate_state_dict(recipe)
    order = list(structure)
    order.insert(int(recipe["position"]), "state_dict")  # the original key order
    return {k: out[k] for k in order}


@functools.lru_cache(maxsize=1)
def golden() -> dict:
    """The golden data (cached; treat as read-only)."""
    override = os.environ.get("TRANSFORMER_M_GOLDEN")
    if override:
        return torch.load(_require(Path(override)), weights_only=True)
    return load_golden()
