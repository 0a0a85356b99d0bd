"""Behavioural properties of the Transformer-M modules (both implementations).

Mode masks (spec §1.8), 3D gating, padding invariance, permutation equivariance,
rigid-motion invariance, DropPath, and the fast kernels (folded edge bias, fused
Gaussian, rotated attention) against their straightforward versions.
"""
import pytest
import torch
from tm_modules_testutils import (
    ATOL,
    atom_mask,
    build_small,
    collate,
    disjoint_union,
    golden,
    permute_molecule,
    random_rotation,
    scenario_batch,
    split_batch,
    token_mask,
)

from graphormer_ext.data import keys
from transformer_m.modules import (
    MODE_2D,
    MODE_2D_3D,
    MODE_3D,
    DropPath,
    MoleculeAttnBias,
    TokenPacking,
    TransformerMNet,
)
from transformer_m.modules.transformer_m_layers import (
    GAUSSIAN_STD_OFFSET,
    _GaussianBasis,
    _RotatedAttention,
    gaussian_basis,
)

IMPLEMENTATIONS = ("reference", "fast")


def close(actual, expected, atol=ATOL):
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol)


def forward(model, batch, **kwargs):
    with torch.no_grad():
        return model(batch, **kwargs)


# -------------------------------------------------------------------------------------
# Mode masks (spec §1.8)
# -------------------------------------------------------------------------------------
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_mode_masks_zero_exactly_the_specified_terms(implementation):
    model = build_small(implementation).train()
    batch = scenario_batch("out_3d")
    B = batch[keys.X].shape[0]
    enc = model.encoder.molecule_encoder
    atoms, tokens = atom_mask(batch), token_mask(batch)
    pairs = atoms[:, :, None] & atoms[:, None, :]
    token_pairs = tokens[:, :, None] & tokens[:, None, :]
    t = enc.molecule_attn_bias.graph_token_virtual_distance.weight.view(-1)  # [H]
    atom_only = enc.atom_feature.atom_encoder(batch[keys.X]).sum(-2)  # [B, N, D]
    head = enc.atom_proc
    head_biases = torch.cat(
        [head.force_proj1.bias, head.force_proj2.bias, head.force_proj3.bias]
    )
    bias_2d_of = {}
    for mode in (MODE_2D_3D, MODE_2D, MODE_3D):
        _, atom_output, extra = forward(
            model, batch, mode_choice=torch.full((B,), mode), return_intermediates=True
        )
        inter = extra["intermediates"]
        bias_2d = inter["attn_bias_2d"].permute(0, 2, 3, 1)  # [B, T, T, H]
        layer_bias = inter["layer_attn_bias"].permute(0, 2, 3, 1)
        bias_3d = inter["bias_3d"].permute(0, 2, 3, 1)  # [B, N, N, H]
        feature = inter["atom_feature"][:, 1:]  # [B, N, D]
        # The graph-token distance t is never masked: row 0 and column 0.
        close(bias_2d[:, 0][tokens], t.expand(int(tokens.sum()), -1))
        close(bias_2d[:, 1:, 0][atoms], t.expand(int(atoms.sum()), -1))
        if mode == MODE_3D:
            # 2D off: no degree embedding, no SPD or edge bias.
            close(feature[atoms], atom_only[atoms])
            assert torch.count_nonzero(bias_2d[:, 1:, 1:][pairs]) == 0
            close(layer_bias[:, 1:, 1:][pairs], bias_3d[pairs])
            merged = feature + 0.01 * inter["merged_edge_features"]
            close(inter["emb_layer_norm_in"][:, 1:][atoms], merged[atoms])
            # The denoising output is kept for 3D-only molecules.
            close(atom_output[atoms], inter["atom_proc_raw"][atoms])
        else:
            # 2D on: degree embedding and 2D bias present; denoising output zeroed.
            assert (feature[atoms] - atom_only[atoms]).abs().max() > 1e-3
            assert torch.count_nonzero(bias_2d[:, 1:, 1:][pairs]) > 0
            assert torch.count_nonzero(atom_output) == 0
        if mode == MODE_2D:
            # 3D off: no 3D bias, no merged atom term, delta_pos = 0 (the head then
            # outputs its biases).
            close(layer_bias[token_pairs], bias_2d[token_pairs])
            close(inter["emb_layer_norm_in"][tokens], inter["atom_feature"][tokens])
            expected = head_biases.expand(int(atoms.sum()), 3)
            close(inter["atom_proc_raw"][atoms], expected)
        if mode == MODE_2D_3D:
            full = bias_2d[:, 1:, 1:] + bias_3d
            close(layer_bias[:, 1:, 1:][pairs], full[pairs])
        bias_2d_of[mode] = bias_2d
    # The 2D channel is the same in the two modes where it is on.
    close(bias_2d_of[MODE_2D], bias_2d_of[MODE_2D_3D])


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_eval_mode_has_no_masks_and_3d_gating(implementation):
    model = build_small(implementation)
    mode_choice = torch.full((16,), MODE_2D)
    logits, _, extra = forward(model, scenario_batch("out_3d"), mode_choice=mode_choice)
    assert extra["mode_choice"] is None  # ignored in eval, as released
    close(logits[:, 0, 0], golden()["out_3d"]["graph_pred"])
    # All positions zero: the 3D branch is skipped, even in training.
    model.train()
    zero_pos = scenario_batch("out_2d")
    _, atom_output, _ = forward(model, zero_pos, mode_choice=torch.full((16,), MODE_3D))
    assert atom_output is None


def test_no_3d_channel_without_add_3d():
    model = TransformerMNet(num_layers=1, embed_dim=16, ffn_embed_dim=16, num_heads=2)
    assert model.encoder.molecule_encoder.molecule_3d_bias is None
    logits, atom_output, _ = forward(model.eval(), scenario_batch("out_3d"))
    assert atom_output is None and logits.shape == (16, 10, 1)


# -------------------------------------------------------------------------------------
# Invariances
# -------------------------------------------------------------------------------------
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_padding_invariance(implementation):
    model = build_small(implementation)
    mols = split_batch(golden()["batch"])
    base = collate(mols)
    bigger = disjoint_union(mols[10], mols[4])  # 14 atoms > 9
    padded = collate(mols + [bigger], num_atoms_padded=17)
    logits_a, atoms_a, _ = forward(model, base)
    logits_b, atoms_b, _ = forward(model, padded)
    close(logits_b[:16, 0, 0], logits_a[:, 0, 0])
    atoms = atom_mask(base)
    close(atoms_b[:16, :9][atoms], atoms_a[atoms])
    # The same in training mode with a fixed mode draw.
    model.train()
    choice = torch.tensor(golden()["out_train_modes"]["mode_choice"])
    choice_b = torch.cat([choice, torch.tensor([MODE_3D])])
    logits_a = forward(model, base, mode_choice=choice)[0]
    logits_b = forward(model, padded, mode_choice=choice_b)[0]
    close(logits_b[:16, 0, 0], logits_a[:, 0, 0])


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_permutation_equivariance(implementation):
    model = build_small(implementation)
    mols = split_batch(golden()["batch"])
    gen = torch.Generator().manual_seed(0)
    perms = {}
    permuted = list(mols)
    for b in (2, 5, 8, 11, 13, 14):
        perms[b] = torch.randperm(mols[b][keys.X].shape[0], generator=gen)
        permuted[b] = permute_molecule(mols[b], perms[b])
    base, moved = collate(mols), collate(permuted)
    logits_a, atoms_a, _ = forward(model, base)
    logits_b, atoms_b, _ = forward(model, moved)
    close(logits_b[:, 0, 0], logits_a[:, 0, 0])
    for b, perm in perms.items():  # per-atom outputs move with their atoms
        close(atoms_b[b, : perm.shape[0]], atoms_a[b, perm])
    # 2D-only batch.
    for batch in (base, moved):
        batch[keys.POS] = torch.zeros_like(batch[keys.POS])
    close(forward(model, moved)[0][:, 0, 0], forward(model, base)[0][:, 0, 0])


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_rigid_motion_invariance_in_3d(implementation):
    model = build_small(implementation)
    batch = scenario_batch("out_3d")
    gen = torch.Generator().manual_seed(1)
    pos = batch[keys.POS].double()
    moved = torch.zeros_like(pos)
    for b in range(pos.shape[0]):
        rotation = random_rotation(gen)
        shift = 5.0 * torch.randn(3, generator=gen, dtype=torch.float64)
        moved[b] = pos[b] @ rotation.T + shift
    moved[~atom_mask(batch)] = 0.0  # padding stays at the origin
    rotated = dict(batch, **{keys.POS: moved.float()})
    logits_a = forward(model, batch)[0]
    logits_b = forward(model, rotated)[0]
    close(logits_b[:, 0, 0], logits_a[:, 0, 0], atol=2e-5)


# -------------------------------------------------------------------------------------
# DropPath and token packing
# -------------------------------------------------------------------------------------
def test_droppath_per_molecule_and_legacy_per_token():
    T, B, C = 7, 32, 5
    x = torch.ones(T, B, C)
    torch.manual_seed(0)
    per_mol = DropPath(0.5).train()(x)
    values = per_mol[0, :, 0]
    assert set(values.unique().tolist()) == {0.0, 2.0}
    # Whole molecules are dropped ...
    assert torch.equal(per_mol, values[None, :, None].expand(T, B, C))
    legacy = DropPath(0.5, legacy_per_token=True).train()(x)
    values = legacy[:, 0, 0]
    # ... or, with the released quirk, whole token positions across the batch.
    assert torch.equal(legacy, values[:, None, None].expand(T, B, C))
    assert torch.equal(DropPath(0.5).eval()(x), x)
    assert torch.equal(DropPath(0.0).train()(x), x)

    # Packed tokens get the very same mask as the padded layout for the same seed.
    padding = torch.rand(B, T) > 0.6
    padding[:, 0] = False
    packing = TokenPacking.from_padding_mask(padding)
    xs = torch.randn(B, T, C)
    for legacy_flag in (False, True):
        module = DropPath(0.3, legacy_per_token=legacy_flag).train()
        torch.manual_seed(5)
        dense = module(xs.transpose(0, 1)).transpose(0, 1)
        torch.manual_seed(5)
        packed = module.forward_packed(
            packing.pack(xs), T, B, packing.batch_index, packing.token_index
        )
        close(packed, packing.pack(dense), atol=0)


def test_token_packing_round_trip():
    padding = torch.tensor([[False, False, True], [False, True, True]])
    packing = TokenPacking.from_padding_mask(padding)
    x = torch.arange(12.0).view(2, 3, 2)
    packed = packing.pack(x)
    assert packed.tolist() == [[0, 1], [2, 3], [6, 7]]
    unpacked = packing.unpack(packed)
    assert torch.equal(unpacked[~padding], x[~padding])
    assert torch.count_nonzero(unpacked[padding]) == 0


# -------------------------------------------------------------------------------------
# Fast kernels against the straightforward computation
# -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "hops, max_dist, edge_type, no_2d",
    [
        (5, 5, "multi_hop", False),
        (3, 5, "multi_hop", False),
        (5, 2, "multi_hop", False),
        (5, 0, "multi_hop", False),
        (5, 5, "direct", False),
        (5, 5, "multi_hop", True),
    ],
)
def test_folded_edge_bias_equals_bmm_per_hop(hops, max_dist, edge_type, no_2d):
    batch = dict(golden()["batch"])
    batch[keys.EDGE_INPUT] = batch[keys.EDGE_INPUT][:, :, :, :hops].contiguous()
    torch.manual_seed(0)
    kwargs = dict(
        num_heads=4,
        num_edges=1536,
        num_spatial=512,
        num_edge_dis=128,
        edge_type=edge_type,
        multi_hop_max_dist=max_dist,
        num_layers=2,
        no_2d=no_2d,
    )
    ref = MoleculeAttnBias(implementation="reference", **kwargs)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_()
    fast = MoleculeAttnBias(implementation="fast", **kwargs)
    fast.load_state_dict(ref.state_dict())
    tokens = token_mask(batch)
    region = tokens[:, :, None] & tokens[:, None, :]  # [B, T, T]
    padded_keys = (~tokens)[:, None, :].expand_as(region)
    for mask in (None, (torch.arange(16) % 3 != 0).float()):
        out_ref = ref(batch, mask_2d=mask)
        out_fast = fast(batch, mask_2d=mask)
        heads_last_ref = out_ref.permute(0, 2, 3, 1)
        heads_last_fast = out_fast.permute(0, 2, 3, 1)
        close(heads_last_fast[region], heads_last_ref[region])
        assert torch.isinf(heads_last_fast[padded_keys]).all()
        # Gradients agree too (only the real region feeds the model).
        weights = torch.randn(out_ref.shape).masked_fill(~region[:, None], 0.0)
        grads = []
        for module, out in ((ref, out_ref), (fast, out_fast)):
            loss = (out.nan_to_num(0.0, 0.0, 0.0) * weights).sum()
            params = list(module.parameters())
            grads.append(torch.autograd.grad(loss, params, allow_unused=True))
        for p, a, b in zip(ref.parameters(), *grads):
            a = torch.zeros_like(p) if a is None else a
            b = torch.zeros_like(p) if b is None else b
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-4)


def test_fused_gaussian_matches_and_gradchecks():
    gen = torch.Generator().manual_seed(0)
    u = 3 * torch.rand(50, 1, generator=gen, dtype=torch.float64)
    mean = 3 * torch.rand(8, generator=gen, dtype=torch.float64)
    std_raw = torch.rand(8, generator=gen, dtype=torch.float64) * 2 - 1
    inputs = tuple(t.requires_grad_() for t in (u, mean, std_raw))
    assert torch.autograd.gradcheck(_GaussianBasis.apply, inputs)
    std = std_raw.abs() + GAUSSIAN_STD_OFFSET
    expected = gaussian_basis(u.expand(50, 8), mean, std)
    close(_GaussianBasis.apply(u, mean, std_raw), expected, atol=0)


def test_rotated_attention_matches_and_gradchecks():
    gen = torch.Generator().manual_seed(0)
    attn = torch.rand(2, 3, 5, 5, generator=gen, dtype=torch.float64)
    delta = torch.randn(2, 5, 5, 3, generator=gen, dtype=torch.float64)
    v = torch.randn(2, 3, 5, 4, generator=gen, dtype=torch.float64)
    inputs = tuple(t.requires_grad_() for t in (attn, delta, v))
    assert torch.autograd.gradcheck(_RotatedAttention.apply, inputs)
    rot = (attn.unsqueeze(-1) * delta.unsqueeze(1)).permute(0, 1, 4, 2, 3)
    close(_RotatedAttention.apply(attn, delta, v), rot @ v.unsqueeze(2), atol=1e-12)


def test_attention_sdpa_matches_reference():
    from transformer_m.modules import MultiheadAttention

    torch.manual_seed(0)
    B, T, D, H = 3, 6, 16, 4
    ref = MultiheadAttention(D, H, implementation="reference").eval()
    fast = MultiheadAttention(D, H, implementation="fast").eval()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(T, B, D)
    bias = torch.randn(B, H, T, T)
    padding = torch.zeros(B, T, dtype=torch.bool)
    padding[0, 4:] = True
    padding[2, 2:] = True
    out_ref = ref(x, bias, padding)
    close(fast(x, bias, padding), out_ref)
    packing = TokenPacking.from_padding_mask(padding)
    masked = bias.masked_fill(padding[:, None, None, :], float("-inf"))
    packed = fast.forward_packed(packing.pack(x.transpose(0, 1)), masked, packing)
    close(packed, packing.pack(out_ref.transpose(0, 1)))


@pytest.mark.parametrize(
    "overrides",
    [
        dict(sandwich_ln=True),
        dict(no_2d=True),
        dict(edge_type="direct"),
        dict(activation_fn="relu", encoder_normalize_before=False),
        dict(remove_head=True, num_classes=3),
        dict(atom_head=False, mode_prob=None),
    ],
)
def test_fast_equals_reference_for_config_variants(overrides):
    config = dict(
        num_layers=2,
        embed_dim=32,
        ffn_embed_dim=40,
        num_heads=4,
        num_3d_bias_kernel=8,
        add_3d=True,
        dropout=0.0,
        attention_dropout=0.0,
        act_dropout=0.0,
        atom_head_dropout=0.0,
        activation_fn="gelu",
        encoder_normalize_before=True,
    )
    config.update(overrides)
    torch.manual_seed(0)
    ref = TransformerMNet(implementation="reference", **config)
    with torch.no_grad():  # O(1) weights so that code paths matter
        for p in ref.parameters():
            p.normal_(0.0, 0.5)
    fast = TransformerMNet(implementation="fast", **config)
    fast.load_state_dict(ref.state_dict())
    batch = scenario_batch("out_mixed")
    tokens, atoms = token_mask(batch), atom_mask(batch)
    choice = torch.tensor(golden()["out_train_modes"]["mode_choice"])
    for train in (False, True):
        ref.train(train)
        fast.train(train)
        out_ref = forward(ref, batch, mode_choice=choice)
        out_fast = forward(fast, batch, mode_choice=choice)
        # O(1) weights give O(10) outputs: compare relative to their scale.
        tolerance = dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out_fast[0][tokens], out_ref[0][tokens], **tolerance)
        assert (out_ref[1] is None) == (out_fast[1] is None)
        if out_ref[1] is not None:
            scale = out_ref[1][atoms].abs().max().item()
            close(out_fast[1][atoms], out_ref[1][atoms], atol=1e-5 * max(1.0, scale))


def test_kernels_equal_to_embed_dim_use_no_edge_proj():
    # The release builds no edge_proj when K == D and then crashes; here the summed
    # Gaussian features are added unprojected, and the state dict has no edge_proj.
    outs = []
    for implementation in IMPLEMENTATIONS:
        torch.manual_seed(0)
        model = TransformerMNet(
            num_layers=1,
            embed_dim=16,
            ffn_embed_dim=16,
            num_heads=2,
            num_3d_bias_kernel=16,
            add_3d=True,
            implementation=implementation,
        ).eval()
        assert not any("edge_proj" in k for k in model.state_dict())
        outs.append(forward(model, scenario_batch("out_3d")))
    tokens = token_mask(scenario_batch("out_3d"))
    close(outs[1][0][tokens], outs[0][0][tokens])


@pytest.mark.parametrize("mode_prob", [(0.2, 0.2, 0.6), (0.0, 0.5, 0.5), (0.3, 0.7, 0.0)])
def test_mode_draws_by_inversion_have_the_mode_probabilities(mode_prob):
    """``draw_modes`` (inversion of the cumulative probabilities, the training draw) keeps
    each mode's frequency, never draws a zero-probability mode and follows its generator."""
    from transformer_m.modules.utils import draw_mode_choice

    n = 20000
    choice = draw_mode_choice(n, mode_prob, torch.Generator().manual_seed(0))
    assert choice.dtype == torch.long and choice.shape == (n,)
    freq = torch.bincount(choice, minlength=3).double() / n
    # binomial standard deviation at n = 20000 is <= 0.0036: 5 sigma
    torch.testing.assert_close(freq, torch.tensor(mode_prob, dtype=torch.float64),
                               rtol=0, atol=0.018)  # fmt: skip
    for mode, p in enumerate(mode_prob):
        if p == 0:
            assert not (choice == mode).any()
    again = draw_mode_choice(n, mode_prob, torch.Generator().manual_seed(0))
    assert torch.equal(choice, again)
