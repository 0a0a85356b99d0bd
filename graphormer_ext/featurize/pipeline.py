"""Worker-side glue: one :class:`SourceRecord` -> its stored graph (LMDB) or model record (numpy)."""
from __future__ import annotations

import numpy as np

from graphormer_ext.data import keys as K
from graphormer_ext.featurize.molecules import (
    heavy_formula,
    mol_from_molblock,
    mol_from_smiles,
    mol_from_xyz,
    positions,
    smiles_heavy_formula,
)
from graphormer_ext.featurize.graph import stored_from_bonds
from graphormer_ext.featurize.ogb_features import (
    FEATURIZER_VERSION,
    atom_features,
    bond_features,
)
from graphormer_ext.sources.base import (
    ARRAYS_KIND,
    KINDS,
    MoleculeError,
    SourceError,
    SourceRecord,
)

__all__ = [
    "FEATURIZER_VERSION",
    "featurize_record",
    "featurize_stored",
    "parse_record",
    "point_cloud_record",
    "provenance_arrays",
]


def parse_record(rec: SourceRecord, *, remove_hs: bool = True):
    """Parse a record's text into a sanitized RDKit molecule according to ``rec.kind``.

    Args:
        rec: the raw record.
        remove_hs: drop hydrogens of MOL/XYZ input (SMILES hydrogens are implicit
            already).

    Returns:
        ``rdkit.Chem.Mol``.

    Raises:
        MoleculeError: the molecule cannot be parsed.
        ValueError: an unknown ``rec.kind``.
    """
    if rec.kind == "smiles":
        return mol_from_smiles(rec.text, rec.item)
    if rec.kind == "molblock":
        return mol_from_molblock(rec.text, rec.item, remove_hs=remove_hs)
    if rec.kind == "xyz":
        return mol_from_xyz(
            rec.text,
            rec.item,
            charge=rec.charge,
            template_smiles=rec.template_smiles,
            remove_hs=remove_hs,
        )
    if rec.kind == "complex":  # protein-ligand complex (featurize/complexes.py, PDBbind)
        from graphormer_ext.featurize.complexes import mol_from_complex_payload

        return mol_from_complex_payload(rec.text, rec.item)
    raise ValueError(
        f"{rec.item}: unknown record kind {rec.kind!r}; expected one of {KINDS}"
    )


def featurize_stored(
    rec: SourceRecord,
    *,
    max_hops: int = 5,
    path_convention: str = "fixed",
    max_atoms: int | None = None,
    remove_hs: bool = True,
) -> dict[str, np.ndarray]:
    """Featurize one raw molecule into its stored LMDB record (picklable for pools).

    Steps: parse by ``rec.kind``; check the heavy-atom formula against
    ``rec.check_smiles`` if set; reject empty and oversized molecules; OGB atom and bond
    features (those of :func:`~graphormer_ext.featurize.ogb_features.mol_to_graph`, one
    row per bond); positions if ``rec.use_3d``; then
    :func:`graphormer_ext.featurize.graph.stored_from_bonds`. Single atoms and
    disconnected fragments are kept. No shortest path is computed here: the reader derives them.

    Args:
        rec: the raw record.
        max_hops: longest shortest path whose edges the model record keeps.
        path_convention: ``"fixed"`` or ``"legacy"`` (see
            :mod:`graphormer_ext.data.keys`).
        max_atoms: largest accepted number of (heavy) atoms; ``None`` accepts any.
        remove_hs: drop hydrogens of MOL/XYZ input.

    Returns:
        dict keyed by :mod:`graphormer_ext.data.keys` constants: the stored graph
        (``node_feat``, ``bond_index``, ``bond_feat``, ``path_spec``), ``pos`` only with
        ``use_3d``, ``y`` as given by the record.

    Raises:
        MoleculeError: this molecule is unusable (skip it and list it with the reason).
        SourceError: ``rec.check_smiles`` has a different heavy-atom formula, i.e. the
            dataset is misaligned (stop the run).

    A ``kind="arrays"`` record (a point cloud, e.g. an MD17 frame) bypasses RDKit and
    the graph features: see :func:`point_cloud_record`.
    """
    if rec.kind == ARRAYS_KIND:
        return point_cloud_record(rec, max_atoms=max_atoms)
    mol = parse_record(rec, remove_hs=remove_hs)
    if rec.check_smiles is not None:
        got = heavy_formula(mol)
        want = smiles_heavy_formula(rec.check_smiles, rec.item)
        if got != want:
            raise SourceError(
                f"{rec.item}: the {rec.kind} molecule has heavy-atom formula {got} but "
                f"its SMILES {rec.check_smiles!r} has {want}: the structure file is "
                "not aligned with the CSV rows"
            )
    n = mol.GetNumAtoms()
    if n == 0:
        raise MoleculeError(rec.item, "empty molecule (no heavy atoms)")
    if max_atoms is not None and n > max_atoms:
        raise MoleculeError(
            rec.item,
            f"{n} atoms is more than the maximum N = {max_atoms}; raise --max-atoms or "
            "accept the skip (the molecule is listed and not written)",
        )
    node_feat = atom_features(mol)
    pairs, bond_feat = bond_features(mol, rec.item)
    pos = None
    if rec.use_3d:
        if rec.kind == "smiles":
            raise ValueError(
                f"{rec.item}: use_3d needs a molblock or xyz record, not SMILES"
            )
        pos = positions(mol, rec.item)
    y = np.asarray(rec.y, dtype=np.float32).reshape(-1)
    # NaN is the hidden-label convention (keys.py); inf would be read as missing too
    if np.isinf(y).any():
        raise MoleculeError(rec.item, f"infinite label {y.tolist()}")
    # one row per RDKit bond: the same graph as mol_to_graph's directed OGB edge list
    out = stored_from_bonds(
        node_feat,
        pairs,
        bond_feat,
        pos=pos,
        y=y,
        max_hops=max_hops,
        path_convention=path_convention,
    )
    if rec.source_row is not None:
        out.update(provenance_arrays(rec, mol))
    return out


def provenance_arrays(rec: SourceRecord, mol) -> dict[str, np.ndarray]:
    """The provenance keys of a record whose source sets ``source_row``.

    Args:
        rec: the raw record.
        mol: its parsed molecule (for the canonical SMILES when ``rec.smiles`` is None).

    Returns:
        :data:`keys.SMILES`, :data:`keys.SOURCE_ROW` and, if ``rec.source_id`` is set,
        :data:`keys.SOURCE_ID` (see :mod:`graphormer_ext.data.provenance`).
    """
    from rdkit import Chem

    from graphormer_ext.data.provenance import encode_text

    smiles = rec.smiles if rec.smiles is not None else Chem.MolToSmiles(mol)
    out = {
        K.SMILES: encode_text(smiles),
        K.SOURCE_ROW: np.asarray([rec.source_row], dtype=np.int64),
    }
    if rec.source_id is not None:
        out[K.SOURCE_ID] = encode_text(rec.source_id)
    return out


def featurize_record(
    rec: SourceRecord,
    *,
    max_hops: int = 5,
    path_convention: str = "fixed",
    max_atoms: int | None = None,
    remove_hs: bool = True,
) -> dict[str, np.ndarray]:
    """Featurize one raw molecule into its model record: :func:`featurize_stored`, then
    :func:`graphormer_ext.featurize.graph.expand_record` (offsets, shortest paths).

    Arguments, errors and the ``kind="arrays"`` case are those of :func:`featurize_stored`.

    Returns:
        dict keyed by :mod:`graphormer_ext.data.keys` constants: the model keys
        (``x``, ``in_degree``, ``spatial_pos``, ``attn_edge_type``, ``edge_input``), ``pos``
        only with ``use_3d``, ``y`` as given by the record.
    """
    stored = featurize_stored(
        rec,
        max_hops=max_hops,
        path_convention=path_convention,
        max_atoms=max_atoms,
        remove_hs=remove_hs,
    )
    if rec.kind == ARRAYS_KIND:
        return stored
    # Imported here: expanding loads the compiled extension, not needed for parsing.
    from graphormer_ext.featurize.graph import expand_record

    return expand_record(stored)


def point_cloud_record(
    rec: SourceRecord, *, max_atoms: int | None = None
) -> dict[str, np.ndarray]:
    """Validate a ``kind="arrays"`` record and return its stored point-cloud record.

    Args:
        rec: a record whose ``arrays`` holds ``z`` [N], ``pos`` [N, 3] (Å) and
            optionally ``forces`` [N, 3] (keys of :mod:`graphormer_ext.data.keys`).
        max_atoms: largest accepted number of atoms; ``None`` accepts any.

    Returns:
        ``{"z": int16 [N], "pos": float32 [N, 3], "y": float32 [T]}`` plus ``"forces":
        float32 [N, 3]`` if given. Units are the source's (see its ``describe()``).

    Raises:
        MoleculeError: missing arrays, wrong shapes, atomic numbers outside 1..118,
            non-finite positions or forces, infinite labels, or more than ``max_atoms``
            atoms.
    """
    arrays = rec.arrays
    if not arrays:
        raise MoleculeError(rec.item, f"kind={ARRAYS_KIND!r} record without arrays")
    missing = [k for k in K.POINT_CLOUD_KEYS if k not in arrays]
    if missing:
        raise MoleculeError(
            rec.item, f"arrays lack {missing}; have {sorted(arrays)}"
        )
    z = np.asarray(arrays[K.Z])
    pos = np.asarray(arrays[K.POS])
    if z.ndim != 1 or z.size == 0:
        raise MoleculeError(
            rec.item, f"{K.Z!r} must be a non-empty [N] array, got {z.shape}"
        )
    n = z.shape[0]
    if pos.shape != (n, 3):
        raise MoleculeError(
            rec.item, f"{K.POS!r} has shape {pos.shape}, expected ({n}, 3)"
        )
    if not np.issubdtype(z.dtype, np.integer) or z.min() < 1 or z.max() > 118:
        raise MoleculeError(rec.item, f"{K.Z!r} must hold atomic numbers 1..118")
    if max_atoms is not None and n > max_atoms:
        raise MoleculeError(
            rec.item, f"{n} atoms is more than the maximum N = {max_atoms}"
        )
    out = {K.Z: z.astype(np.int16), K.POS: pos.astype(np.float32)}
    y = np.asarray(rec.y, dtype=np.float32).reshape(-1)
    if not np.isfinite(pos).all():
        raise MoleculeError(rec.item, "non-finite positions")
    # NaN is the hidden-label convention (keys.py); inf is an error
    if np.isinf(y).any():
        raise MoleculeError(rec.item, "infinite label")
    out[K.Y] = y
    if arrays.get(K.FORCES) is not None:
        forces = np.asarray(arrays[K.FORCES])
        if forces.shape != (n, 3):
            raise MoleculeError(
                rec.item, f"{K.FORCES!r} has shape {forces.shape}, expected ({n}, 3)"
            )
        if not np.isfinite(forces).all():
            raise MoleculeError(rec.item, "non-finite forces")
        out[K.FORCES] = forces.astype(np.float32)
    return out
