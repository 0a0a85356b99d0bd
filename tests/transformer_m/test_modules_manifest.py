"""State-dict names and shapes against the official manifests; init; ckpt upgrade."""
import json
import math

import pytest
import torch
from golden_fixture import fixture_file
from tm_modules_testutils import SMALL_CONFIG, golden

from transformer_m.modules import (
    TransformerMNet,
    parse_mode_prob,
    upgrade_state_dict_for_finetuning,
)

L12 = dict(
    num_layers=12,
    embed_dim=768,
    ffn_embed_dim=768,
    num_heads=32,
    num_3d_bias_kernel=128,
    add_3d=True,
    activation_fn="gelu",
    encoder_normalize_before=True,
    num_classes=1,
)
QM9_FINETUNE = dict(
    remove_head=True,
    no_2d=True,
    atom_head=False,
    encoder_normalize_before=False,
    activation_fn="relu",
    mode_prob=None,
)


def manifest(name: str):
    path = fixture_file(name)
    rows = []
    for line in path.read_text().splitlines():
        key, shape = line.split("\t")
        rows.append((key, json.loads(shape)))
    return rows


def param_counts():
    return json.loads(fixture_file("tm_keys_param_counts.json").read_text())


def meta_model(**overrides) -> TransformerMNet:
    with torch.device("meta"):
        return TransformerMNet(**dict(L12, **overrides))


def num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "file_name, entry, overrides",
    [
        ("tm_keys_L12_3d.txt", "L12_3d", {}),
        ("tm_keys_L12_3d_removehead.txt", "L12_3d_removehead", {"remove_head": True}),
        ("tm_keys_L12_qm9finetune.txt", "L12_qm9finetune", QM9_FINETUNE),
    ],
)
def test_state_dict_matches_manifest(file_name, entry, overrides):
    expected = manifest(file_name)
    counts = param_counts()[entry]
    assert len(expected) == counts["num_state_dict_keys"]
    assert sum(math.prod(shape) for _, shape in expected) == counts["num_parameters"]
    for implementation in ("fast", "reference"):
        model = meta_model(implementation=implementation, **overrides)
        rows = [(k, list(v.shape)) for k, v in model.state_dict().items()]
        assert rows == expected
        assert num_params(model) == counts["num_parameters"]
        # buffers only as non-persistent device copies of constants (mode probabilities,
        # DropPath keep rates): nothing beyond the released parameters is saved
        state = model.state_dict()
        assert not [name for name, _ in model.named_buffers() if name in state]


def test_parameter_groups_match_official_breakdown():
    sizes = {k: v.numel() for k, v in meta_model().state_dict().items()}
    for group, count in param_counts()["L12_3d"]["params_by_group"].items():
        prefix = group.rstrip("*").rstrip(".")
        members = [k for k in sizes if k == prefix or k.startswith(prefix + ".")]
        assert sum(sizes[k] for k in members) == count, group


def test_official_counts_for_paper_sizes():
    assert num_params(meta_model()) == 49_574_628
    assert num_params(meta_model(remove_head=True)) == 50_165_220


def test_upgrade_state_dict_for_finetuning_then_strict_load():
    pretrained = dict(golden()["state_dict"])
    pretrained["encoder.molecule_encoder.node_proc.q_proj.weight"] = torch.zeros(2, 2)
    pretrained["encoder.sentence_projection_layer.weight"] = torch.zeros(2, 2)
    pretrained["encoder.proj_out.ln.weight"] = torch.zeros(2)
    model = TransformerMNet(**dict(SMALL_CONFIG, remove_head=True))
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    upgraded = model.upgrade_state_dict_named(pretrained, "")
    assert upgraded is pretrained
    for pattern in ("node_proc", "embed_out", "lm_output_learned_bias", "proj_out.ln"):
        assert not any(pattern in k for k in upgraded), pattern
    assert "encoder.sentence_projection_layer.weight" not in upgraded
    model.load_state_dict(upgraded, strict=True)
    state = model.state_dict()
    for key in ("encoder.proj_out.dense.weight", "encoder.proj_out.out_proj.bias"):
        assert torch.equal(state[key], fresh[key])
    # Keys present in the checkpoint are kept.
    key = "encoder.lm_head_transform_weight.weight"
    assert torch.equal(state[key], golden()["state_dict"][key])

    # Nested under a prefix, through the free function.
    nested = {"net." + k: v for k, v in golden()["state_dict"].items()}
    upgrade_state_dict_for_finetuning(nested, fresh, prefix="net")
    assert "net.encoder.proj_out.dense.weight" in nested
    assert "net.encoder.embed_out.weight" not in nested

    # Without remove_head the upgrade is a no-op, as released.
    plain = dict(golden()["state_dict"])
    TransformerMNet(**SMALL_CONFIG).upgrade_state_dict_named(plain)
    assert plain.keys() == golden()["state_dict"].keys()


def test_mode_prob_parsing_rejects_what_the_release_silently_replaced():
    assert parse_mode_prob("0.2,0.2,0.6") == (0.2, 0.2, 0.6)
    assert parse_mode_prob("0,1,0") == (0.0, 1.0, 0.0)
    assert parse_mode_prob([0.5, 0.5, 0.0]) == (0.5, 0.5, 0.0)
    assert parse_mode_prob("0.1,0.2,0.7") == (0.1, 0.2, 0.7)  # float sum 0.9999999999999999
    for bad in ("0.5,0.5,0.5", "0.2,0.8", "a,b,c", "", "-0.2,0.6,0.6", None):
        with pytest.raises(ValueError, match="mode_prob"):
            parse_mode_prob(bad)


def _small(**kwargs):
    torch.manual_seed(0)
    return TransformerMNet(
        num_layers=2,
        embed_dim=32,
        ffn_embed_dim=48,
        num_heads=4,
        num_3d_bias_kernel=8,
        add_3d=True,
        **kwargs,
    )


def test_apply_init_is_the_official_init():
    model = _small(apply_init=True)
    enc = model.encoder.molecule_encoder
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding) and module.padding_idx is not None:
            assert torch.count_nonzero(module.weight[module.padding_idx]) == 0
        if isinstance(module, torch.nn.Linear) and module.bias is not None:
            assert torch.count_nonzero(module.bias) == 0
        if isinstance(module, torch.nn.LayerNorm):
            assert torch.equal(module.weight, torch.ones_like(module.weight))
    std = enc.atom_feature.atom_encoder.weight.std().item()
    assert std == pytest.approx(0.02, rel=0.05)
    # The Gaussian layer's own init is overwritten too (golden quirk 6).
    assert enc.molecule_3d_bias.gbf.means.weight.abs().max() < 0.2
    assert torch.count_nonzero(model.encoder.lm_output_learned_bias) == 0


def test_init_without_apply_init():
    model = _small(apply_init=False)
    enc = model.encoder.molecule_encoder
    gbf = enc.molecule_3d_bias.gbf
    assert gbf.means.weight.min() >= 0 and gbf.means.weight.max() <= 3
    assert gbf.stds.weight.min() >= 0 and gbf.stds.weight.max() <= 3
    assert torch.equal(gbf.mul.weight, torch.ones_like(gbf.mul.weight))
    assert torch.count_nonzero(gbf.bias.weight) == 0
    attn = enc.layers[0].self_attn
    xavier_bound = math.sqrt(6 / (32 + 32))
    assert attn.q_proj.weight.abs().max() <= 2**-0.5 * xavier_bound
    assert attn.out_proj.weight.abs().max() <= xavier_bound
    assert torch.count_nonzero(attn.out_proj.bias) == 0
    # Feature tables: N(0, 0.02) at construction, padding rows not zeroed (released).
    table = enc.atom_feature.atom_encoder.weight
    assert table.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.count_nonzero(table[0]) > 0
