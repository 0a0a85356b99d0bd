"""Transformer-M modules against the official golden outputs, both implementations.

Real tokens, atoms and pairs are compared at 1e-5. Padded positions are compared for
the reference implementation only: the fast one never computes padded tokens or pairs
(golden README: "A reimplementation that masks padding may legitimately differ there").
"""
import numpy as np
import pytest
import torch
from tm_modules_testutils import (
    ATOL,
    atom_mask,
    build_small,
    golden,
    scenario_batch,
    token_mask,
)

from graphormer_ext.data import keys
from transformer_m.modules import draw_mode_choice, mode_masks

IMPLEMENTATIONS = ("reference", "fast")
SCENARIOS = ("out_3d", "out_2d", "out_mixed", "out_train_modes")
EDGE_TABLE = "encoder.molecule_encoder.molecule_attn_bias.edge_encoder.weight"

_CACHE = {}


def run_scenario(implementation: str, scenario: str):
    """Forward of the small golden model on one scenario (cached per test session)."""
    key = (implementation, scenario)
    if key not in _CACHE:
        model = build_small(implementation)
        mode_choice = None
        if scenario == "out_train_modes":
            model.train()
            mode_choice = torch.tensor(golden()[scenario]["mode_choice"])
        with torch.no_grad():
            _CACHE[key] = model(
                scenario_batch(scenario),
                mode_choice=mode_choice,
                return_intermediates=True,
            )
    return _CACHE[key]


def close(actual, expected, atol=ATOL):
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol)


def test_state_dict_names_shapes_and_order():
    state = golden()["state_dict"]
    for implementation in IMPLEMENTATIONS:
        mine = build_small(implementation).state_dict()
        assert list(mine.keys()) == list(state.keys())
        assert all(mine[k].shape == state[k].shape for k in state)


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_outputs_match_golden(implementation, scenario):
    expected = golden()[scenario]
    batch = scenario_batch(scenario)
    logits, atom_output, extra = run_scenario(implementation, scenario)
    tokens, atoms = token_mask(batch), atom_mask(batch)

    assert logits.shape == expected["logits"].shape
    close(logits[tokens], expected["logits"][tokens])
    close(logits[:, 0, 0], expected["graph_pred"])
    if implementation == "reference":
        close(logits, expected["logits"])  # padded tokens too

    if expected["atom_output_is_none"]:
        assert atom_output is None
    else:
        assert atom_output.dtype == torch.float32
        assert atom_output.shape == expected["atom_output"].shape
        close(atom_output[atoms], expected["atom_output"][atoms])
        if implementation == "reference":
            close(atom_output, expected["atom_output"])

    inner = torch.stack(extra["inner_states"])  # [L+1, T, B, C]
    assert inner.shape == expected["inner_states"].shape
    tb = tokens.t()  # [T, B]
    close(inner[:, tb], expected["inner_states"][:, tb])


def _region(name, batch):
    """Mask of the entries that must match (pair tensors with heads moved last)."""
    tokens, atoms = token_mask(batch), atom_mask(batch)
    if name in ("attn_bias_2d", "layer_attn_bias"):
        return tokens[:, :, None] & tokens[:, None, :]
    if name in ("bias_3d", "delta_pos"):
        return atoms[:, :, None] & atoms[:, None, :]
    if name in ("merged_edge_features", "atom_proc_raw"):
        return atoms
    return tokens


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_intermediates_match_golden(implementation, scenario):
    expected = golden()[scenario]["intermediates"]
    batch = scenario_batch(scenario)
    mine = run_scenario(implementation, scenario)[2]["intermediates"]
    assert set(expected) <= set(mine)
    for name, ref in expected.items():
        got = mine[name]
        assert got.shape == ref.shape, name
        if name == "padding_mask":
            assert torch.equal(got, ref)
            continue
        if got.dim() == 4 and name != "delta_pos":  # [B, H, T, T] -> heads last
            got, ref = got.permute(0, 2, 3, 1), ref.permute(0, 2, 3, 1)
        region = _region(name, batch)
        close(got[region], ref[region])
        if implementation == "reference":
            close(got, ref)


def test_train_mode_draw_reproduces_golden():
    expected = golden()["out_train_modes"]
    seed = expected["numpy_seed"]
    mode_choice = draw_mode_choice(16, (0.2, 0.2, 0.6), np.random.RandomState(seed))
    assert mode_choice.tolist() == expected["mode_choice"]
    mask_2d, mask_3d = mode_masks(mode_choice, torch.zeros(1))
    assert torch.equal(mask_2d, expected["mask_2d"])
    assert torch.equal(mask_3d, expected["mask_3d"])

    # The same draw made inside the forward from an explicit generator.
    batch = scenario_batch("out_train_modes")
    model = build_small("fast").train()
    with torch.no_grad():
        logits, atom_output, extra = model(
            batch, generator=np.random.RandomState(seed)
        )
    assert extra["mode_choice"].tolist() == expected["mode_choice"]
    tokens, atoms = token_mask(batch), atom_mask(batch)
    close(logits[tokens], expected["logits"][tokens])
    close(atom_output[atoms], expected["atom_output"][atoms])


def _loss(batch, logits, atom_output, inner_states):
    atoms, tokens = atom_mask(batch), token_mask(batch)
    loss = (logits[:, 0, 0] - batch[keys.Y]).abs().sum()
    loss = loss + (torch.sin(atom_output) * atoms[..., None]).sum()
    for state in inner_states:
        loss = loss + 1e-3 * (state.transpose(0, 1)[tokens] ** 2).sum()
    return loss


def test_fast_and_reference_gradients_agree():
    batch = scenario_batch("out_train_modes")
    mode_choice = torch.tensor(golden()["out_train_modes"]["mode_choice"])
    grads = {}
    for implementation in IMPLEMENTATIONS:
        model = build_small(implementation).train()
        logits, atom_output, extra = model(batch, mode_choice=mode_choice)
        _loss(batch, logits, atom_output, extra["inner_states"]).backward()
        grads[implementation] = {k: p.grad for k, p in model.named_parameters()}
    for name, ref in grads["reference"].items():
        got = grads["fast"][name]
        assert (ref is None) == (got is None), name
        if ref is not None:
            scale = max(1.0, ref.abs().max().item())
            close(got, ref, atol=ATOL * scale)
    # The padding row of the folded edge table still gets no gradient.
    assert torch.count_nonzero(grads["fast"][EDGE_TABLE][0]) == 0


def test_droppath_draws_agree_between_implementations():
    batch = scenario_batch("out_3d")
    mode_choice = torch.tensor(golden()["out_train_modes"]["mode_choice"])
    tokens = token_mask(batch)
    for legacy in (False, True):
        logits = []
        for implementation in IMPLEMENTATIONS:
            model = build_small(
                implementation, droppath_prob=0.5, legacy_droppath=legacy
            ).train()
            torch.manual_seed(123)
            with torch.no_grad():
                logits.append(model(batch, mode_choice=mode_choice)[0])
        close(logits[1][tokens], logits[0][tokens])
