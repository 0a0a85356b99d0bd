"""Record keys, index conventions, pad values and the LMDB schema version: the data layer's public API.

Two layouts of a molecular graph exist:

* the **stored graph** (what an LMDB split holds, schema 2): raw OGB features and one row per bond,
  :data:`NODE_FEAT`, :data:`BOND_INDEX`, :data:`BOND_FEAT` (+ ``pos``, ``y`` and per-record bytes
  such as the source SMILES). :class:`~graphormer_ext.data.lmdb_dataset.LMDBDataset` returns it with
  :data:`PATH_SPEC` attached from the split's meta record;
* the **model record** (:data:`MODEL_KEYS`, what the model reads, one molecule unpadded): derived
  from the stored graph at load time by the compiled kernels of :mod:`graphormer_ext.algos`, inside
  the collator (:func:`graphormer_ext.featurize.graph.expand_record` for one record). Shortest paths
  are recomputed rather than stored because the ``[N, N, H, 3]`` path-edge array was ~76 % of a
  schema-1 record and the kernel derives it faster than the loader can decode and copy it.

Model indices are **model-ready**: the Graphormer/Transformer-M offsets are applied once, by the
kernel, so that ``0`` always means padding and the collator only pads.

Offsets (OGB raw feature value ``v`` of feature ``f``; Transformer-M spec §1.2, §3.3):

========================  ===========================  ==========================================
key                       model value                  relation to the official pipeline
========================  ===========================  ==========================================
``x``                     ``v + 2 + 512*f``            ``convert_to_single_emb`` (+1) + collator (+1)
``in_degree``             ``degree + 1``               collator +1 (``out_degree`` is the same array)
``spatial_pos``           ``spd + 1`` (511 = unreach.) collator +1
``attn_edge_type``        ``v + 2 + 512*f``; 0 = none   ``preprocess_item`` (no collator shift)
``edge_input``            ``v + 3 + 512*f``; 1 = hop   ``gen_edge_input`` + collator +1; 0 = padding
                          without a bond (legacy path)  or unused hop
``pos``                   float32 Å                    absent = no 3D (collated as zeros)
``y``                     float32 targets              NaN = label not available (hidden test)
========================  ===========================  ==========================================

``node_type_edge`` is not stored: the collator derives it from ``x[:, 0]`` (``x0 + 1`` and ``x0 + 513``,
padding ``(1, 513)``), exactly as ``collator_3d`` does.
"""

import numpy as _np

# --- stored graph keys (LMDB schema 2) ---------------------------------------------------------
NODE_FEAT = "node_feat"  # uint8 [N, 9] raw OGB atom features (uint16 if a value exceeds 255)
BOND_INDEX = "bond_index"  # uint8 [M, 2] atoms of each bond, one row per bond (uint16 if N > 256)
BOND_FEAT = "bond_feat"  # uint8 [M, 3] raw OGB features of each bond
GRAPH_KEYS = (NODE_FEAT, BOND_INDEX, BOND_FEAT)  # required in every stored graph record
# Attached by the reader from the meta record (never stored per record): int16 [2] =
# (max_hops of the split, 0 = all hops; 1 for the legacy path convention else 0).
PATH_SPEC = "path_spec"


def path_spec(max_hops, path_convention: str) -> "_np.ndarray":
    """The read-only :data:`PATH_SPEC` array of a split's ``max_hops`` and ``path_convention``."""
    if path_convention not in PATH_CONVENTIONS:
        raise ValueError(
            f"path_convention must be one of {PATH_CONVENTIONS}, got {path_convention!r}"
        )
    hops = 0 if max_hops is None else int(max_hops)
    if hops < 0:
        raise ValueError(f"max_hops must be >= 0 or None, got {max_hops!r}")
    spec = _np.array([hops, int(path_convention == PATH_CONVENTIONS[1])], dtype=_np.int16)
    spec.flags.writeable = False
    return spec


# --- model record keys (derived at load time) -----------------------------------------------------
X = "x"  # int16 [N, 9]
DEGREE = "in_degree"  # int16 [N]
SPATIAL_POS = "spatial_pos"  # int16 [N, N]
ATTN_EDGE_TYPE = "attn_edge_type"  # int16 [N, N, 3]
EDGE_INPUT = "edge_input"  # int16 [N, N, Hmax, 3], Hmax <= max_hops of the split (meta)
POS = "pos"  # float32 [N, 3], optional
Y = "y"  # float32 [T]

MODEL_KEYS = (X, DEGREE, SPATIAL_POS, ATTN_EDGE_TYPE, EDGE_INPUT)  # of every model record
OPTIONAL_KEYS = (POS, Y)

# --- batch keys (collated, in addition to the model keys) --------------------------------------
OUT_DEGREE = "out_degree"  # int32 [B, N], same values as in_degree
ATTN_BIAS = "attn_bias"  # float32 [B, N+1, N+1], 0 real keys / -inf padded keys
NODE_TYPE_EDGE = "node_type_edge"  # int32 [B, N, N, 2]
IDX = "idx"  # int64 [B], index within the split

# --- vocabularies and offsets --------------------------------------------------------------------
FEATURE_OFFSET = 512  # per-feature stride of the shared vocabulary (convert_to_single_emb)
NUM_ATOM_FEATURES = 9
NUM_BOND_FEATURES = 3
X_SHIFT = 2  # stored x = raw + X_SHIFT + FEATURE_OFFSET * f
EDGE_TYPE_SHIFT = 2  # stored attn_edge_type = raw + EDGE_TYPE_SHIFT + FEATURE_OFFSET * f
EDGE_INPUT_SHIFT = 3  # stored edge_input (bond hop) = raw + EDGE_INPUT_SHIFT + FEATURE_OFFSET * f
EDGE_INPUT_NO_BOND = 1  # legacy path convention: a hop read from a non-bonded pair
DEGREE_SHIFT = 1
SPATIAL_SHIFT = 1
NODE_TYPE_I_SHIFT = 1  # node_type_edge[..., 0] = x[:, 0] + 1
NODE_TYPE_J_SHIFT = 1 + FEATURE_OFFSET  # node_type_edge[..., 1] = x[:, 0] + 513

NUM_ATOMS_VOCAB = FEATURE_OFFSET * NUM_ATOM_FEATURES  # 4608; embedding has +1 rows
NUM_EDGES_VOCAB = FEATURE_OFFSET * NUM_BOND_FEATURES  # 1536
NUM_DEGREE_VOCAB = 512
NUM_SPATIAL_VOCAB = 512
MAX_DEGREE = NUM_DEGREE_VOCAB - 1 - DEGREE_SHIFT  # larger degrees cannot be embedded

PAD = 0  # pad value of every integer key

# --- LMDB ----------------------------------------------------------------------------------------
# 2: stored graphs (paths derived at load time), compact binary record header, crc32 per record
# and on the meta record, zero-padded record keys. 1: per-record model arrays, JSON headers, no
# checksum.
SCHEMA_VERSION = 2
META_KEY = b"__meta__"
PATH_CONVENTIONS = ("fixed", "legacy")  # "legacy" = released Transformer-M "atom 0" paths
# Reserved sidecar record (codec-encoded, written just before ``__meta__``): per kept record, in key
# order, the atom count (``sizes``, for ``--max-tokens`` batching without decoding records) and the
# record's index in the source split (``source_index``; skipped molecules leave no hole in the keys).
INDEX_KEY = b"__index__"
SIZES = "sizes"  # int64 [num_entries]
SOURCE_INDEX = "source_index"  # int64 [num_entries]
# Record ``i`` is stored under its zero-padded ASCII decimal index, so that keys sort in index order
# and the writer appends: LMDB then fills its pages instead of splitting them (a third less disk).
RECORD_KEY_DIGITS = 10


def record_key(index: int) -> bytes:
    """The LMDB key of record ``index`` (``b"0000000042"``)."""
    return b"%010d" % index


# --- point-cloud records (3D models: GeoMFormer, 3D-GSRD; MD17) -----------------------------------
# A point-cloud record stores ``z`` + ``pos`` (+ ``y``, ``forces``) instead of the graph keys above;
# see :mod:`graphormer_ext.data.collator_3d`. Atomic numbers are stored raw (H = 1), so 0 is padding
# with no offset. A graph's Z is ``node_feat[:, 0] + Z_FROM_NODE_FEAT`` (stored graph) or
# ``x[:, 0] - Z_FROM_X0`` (model record, x0 = Z - 1 + 2).
Z = "z"  # int16 [N] atomic numbers, >= 1; collated int64 [B, N], 0 = padding
FORCES = "forces"  # float32 [N, 3], same energy/length units as ``y``/``pos`` (MD17: kcal/mol/Å)
ENERGY = Y  # energies are stored as the target ``y`` (float32 [1]; MD17: kcal/mol)
ATOM_MASK = "atom_mask"  # batch only: bool [B, N], True on real atoms
POINT_CLOUD_KEYS = (Z, POS)  # required in every point-cloud record
Z_FROM_X0 = X_SHIFT - 1  # Z = x[:, 0] - 1
Z_FROM_NODE_FEAT = 1  # Z = node_feat[:, 0] + 1 (OGB atomic_num index = Z - 1)

# --- provenance (user datasets: CSV/SDF sources) --------------------------------------------------
# Optional keys that tie a record to its input row; the collators ignore them. Text is stored as its
# UTF-8 bytes in a uint8 array (the codec stores numeric arrays only); read it back with
# :func:`graphormer_ext.data.provenance.record_provenance`.
SMILES = "smiles"  # uint8 [L] UTF-8: the input SMILES (SDF: RDKit canonical SMILES of the record)
SOURCE_ID = "source_id"  # uint8 [L] UTF-8: the user's ID (CSV --id-column, SDF title); optional
SOURCE_ROW = "source_row"  # int64 [1]: CSV file line (1-based, header = 1) / SDF record (1-based)
PROVENANCE_KEYS = (SMILES, SOURCE_ID, SOURCE_ROW)
