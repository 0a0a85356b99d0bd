"""Helpers for the Transformer-M module tests: golden data, small model, batch surgery.

Batches are manipulated directly in their collated form (keys of
``graphormer_ext.data.keys``), so these tests do not depend on the data layer's
featurizer or collator.
"""
import torch
from golden_fixture import golden

from graphormer_ext.data import keys

ATOL = 1e-5

# Resolved configuration of the golden small model (golden README, "Exact config").
SMALL_CONFIG = dict(
    num_layers=2,
    embed_dim=64,
    ffn_embed_dim=64,
    num_heads=4,
    num_3d_bias_kernel=16,
    add_3d=True,
    no_2d=False,
    dropout=0.0,
    attention_dropout=0.0,
    act_dropout=0.0,
    droppath_prob=0.0,
    activation_fn="gelu",
    encoder_normalize_before=True,
    apply_init=True,
    mode_prob="0.2,0.2,0.6",
    num_classes=1,
    atom_head_dropout=0.0,
)

# Per-molecule keys of a collated batch and the number of atom axes each one has.
ATOM_AXES = {
    keys.X: 1,
    keys.DEGREE: 1,
    keys.OUT_DEGREE: 1,
    keys.POS: 1,
    keys.SPATIAL_POS: 2,
    keys.ATTN_EDGE_TYPE: 2,
    keys.EDGE_INPUT: 2,
}


def build_small(implementation: str, **overrides):
    """The golden small model with the golden weights, in eval mode."""
    from transformer_m.modules import TransformerMNet

    config = dict(SMALL_CONFIG, **overrides)
    model = TransformerMNet(implementation=implementation, **config)
    model.load_state_dict(golden()["state_dict"], strict=True)
    return model.eval()


def scenario_batch(name: str) -> dict:
    """The collated golden batch of a scenario (positions zeroed as it says)."""
    batch = dict(golden()["batch"])
    if name == "out_2d":
        batch[keys.POS] = torch.zeros_like(batch[keys.POS])
    elif name == "out_mixed":
        pos = batch[keys.POS].clone()
        pos[1::2] = 0
        batch[keys.POS] = pos
    return batch


def num_atoms(batch: dict) -> torch.Tensor:
    return batch[keys.X][:, :, 0].ne(0).sum(1)  # [B]


def token_mask(batch: dict) -> torch.Tensor:
    """[B, T] True for the graph token and real atoms."""
    T = batch[keys.X].shape[1] + 1
    return torch.arange(T)[None, :] <= num_atoms(batch)[:, None]


def atom_mask(batch: dict) -> torch.Tensor:
    """[B, N] True for real atoms."""
    return batch[keys.X][:, :, 0].ne(0)


# -------------------------------------------------------------------------------------
# Batch surgery: split a collated batch into molecules and collate molecules again.
# -------------------------------------------------------------------------------------
def split_batch(batch: dict) -> list:
    """Unpadded per-molecule dicts (atom-indexed keys only, plus ``y``)."""
    mols = []
    counts = num_atoms(batch)
    for b in range(batch[keys.X].shape[0]):
        n = int(counts[b])
        mol = {}
        for key, axes in ATOM_AXES.items():
            value = batch[key][b]
            mol[key] = value[:n] if axes == 1 else value[:n, :n]
        mol[keys.Y] = batch[keys.Y][b]
        mols.append(mol)
    return mols


def collate(mols: list, num_atoms_padded: int = 0) -> dict:
    """Collate molecules as the official ``collator_3d`` does (pads, -inf, types)."""
    B = len(mols)
    N = max([m[keys.X].shape[0] for m in mols] + [num_atoms_padded])
    hops = max(m[keys.EDGE_INPUT].shape[2] for m in mols)
    out = {
        keys.X: torch.zeros(B, N, 9, dtype=torch.long),
        keys.DEGREE: torch.zeros(B, N, dtype=torch.long),
        keys.OUT_DEGREE: torch.zeros(B, N, dtype=torch.long),
        keys.POS: torch.zeros(B, N, 3),
        keys.SPATIAL_POS: torch.zeros(B, N, N, dtype=torch.long),
        keys.ATTN_EDGE_TYPE: torch.zeros(B, N, N, 3, dtype=torch.long),
        keys.EDGE_INPUT: torch.zeros(B, N, N, hops, 3, dtype=torch.long),
        keys.ATTN_BIAS: torch.zeros(B, N + 1, N + 1),
        keys.Y: torch.stack([torch.as_tensor(m[keys.Y]) for m in mols]),
        keys.IDX: torch.arange(B),
    }
    for b, mol in enumerate(mols):
        n = mol[keys.X].shape[0]
        for key, axes in ATOM_AXES.items():
            value = mol[key]
            if axes == 1:
                out[key][b, :n] = value
            elif key == keys.EDGE_INPUT:
                out[key][b, :n, :n, : value.shape[2]] = value
            else:
                out[key][b, :n, :n] = value
        out[keys.ATTN_BIAS][b, :, n + 1 :] = float("-inf")
    # node_type_edge: (x0_i + 1, x0_j + 513) on real pairs, (1, 513) if i or j is a pad.
    nte = torch.empty(B, N, N, 2, dtype=torch.long)
    nte[..., 0] = 1
    nte[..., 1] = keys.NODE_TYPE_J_SHIFT
    for b, mol in enumerate(mols):
        n = mol[keys.X].shape[0]
        atom_type = mol[keys.X][:, 0]
        nte[b, :n, :n, 0] = (atom_type + keys.NODE_TYPE_I_SHIFT)[:, None]
        nte[b, :n, :n, 1] = (atom_type + keys.NODE_TYPE_J_SHIFT)[None, :]
    out[keys.NODE_TYPE_EDGE] = nte
    return out


def permute_molecule(mol: dict, perm: torch.Tensor) -> dict:
    """Renumber the atoms of one molecule: new atom k is old atom ``perm[k]``."""
    out = dict(mol)
    for key, axes in ATOM_AXES.items():
        value = mol[key][perm]
        if axes == 2:
            value = value[:, perm]
        out[key] = value
    return out


def disjoint_union(mol_a: dict, mol_b: dict, shift: float = 20.0) -> dict:
    """One (disconnected) molecule made of two; unreachable pairs get SPD 510 (+1)."""
    na, nb = mol_a[keys.X].shape[0], mol_b[keys.X].shape[0]
    n = na + nb
    hops = max(mol_a[keys.EDGE_INPUT].shape[2], mol_b[keys.EDGE_INPUT].shape[2])
    out = {keys.Y: mol_a[keys.Y]}
    for key in (keys.X, keys.DEGREE, keys.OUT_DEGREE):
        out[key] = torch.cat([mol_a[key], mol_b[key]])
    out[keys.POS] = torch.cat([mol_a[keys.POS], mol_b[keys.POS] + shift])
    spd = torch.full((n, n), 511, dtype=torch.long)
    spd[:na, :na] = mol_a[keys.SPATIAL_POS]
    spd[na:, na:] = mol_b[keys.SPATIAL_POS]
    out[keys.SPATIAL_POS] = spd
    aet = torch.zeros(n, n, 3, dtype=torch.long)
    aet[:na, :na] = mol_a[keys.ATTN_EDGE_TYPE]
    aet[na:, na:] = mol_b[keys.ATTN_EDGE_TYPE]
    out[keys.ATTN_EDGE_TYPE] = aet
    ei = torch.zeros(n, n, hops, 3, dtype=torch.long)
    ei[:na, :na, : mol_a[keys.EDGE_INPUT].shape[2]] = mol_a[keys.EDGE_INPUT]
    ei[na:, na:, : mol_b[keys.EDGE_INPUT].shape[2]] = mol_b[keys.EDGE_INPUT]
    out[keys.EDGE_INPUT] = ei
    return out


def random_rotation(generator: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q
