"""The training step does not wait for the device, and the fast path's new pieces equal the old.

Issue 9: on a GPU every read of a device value on the host (``.item()``, ``bool()``/``int()`` of a
tensor, ``nonzero``, boolean-mask indexing, ``tolist``) stalls the launch queue. These tests run
one real training step of the fast path (the task's collater, the model, the criterion, backward,
``fused_adam``'s clipping and step, and the criterion's metric reduction) under a dispatch mode
that fails on any such read, and check that the host-side index plan gives the very indices the
device would compute. Everything runs on the CPU; the checked operations are the same.
"""
import contextlib
import math

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("fairseq")
from fairseq.logging import metrics  # noqa: E402

from graphormer_ext.data import keys  # noqa: E402
from graphormer_ext.data.base import GraphDataset  # noqa: E402
from graphormer_ext.data.collator import Collator  # noqa: E402
from graphormer_ext.featurize.graph import graph_to_record  # noqa: E402
from transformer_m.criterions.graph_prediction import GraphPredictionCriterion  # noqa: E402
from transformer_m.modules import PairIndex, TokenPacking, TransformerMNet  # noqa: E402
from transformer_m.modules.host_plan import PLAN_ANY_POS, PLAN_PAIRS, plan_of  # noqa: E402
from transformer_m.optim import FusedAdam  # noqa: E402
from transformer_m.tasks.graph_prediction import GraphPredictionDataset  # noqa: E402


def random_molecule(rng, n):
    """A random connected graph (tree + one ring closure) with OGB-range features and 3D."""
    edges = [(int(rng.integers(0, a)), a) for a in range(1, n)]
    if n > 3 and (0, n - 1) not in edges:
        edges.append((0, n - 1))
    ei = np.array([[a, b] for a, b in edges] + [[b, a] for a, b in edges], np.int64)
    ei = ei.T.reshape(2, -1)
    node_feat = np.stack([rng.integers(0, 10, n)] + [rng.integers(0, 3, n)] * 8, 1)
    attr = rng.integers(0, 3, (len(edges), 3)).reshape(-1, 3)
    pos = rng.normal(size=(n, 3)) * 1.5
    return node_feat, ei, np.concatenate([attr, attr]), pos


class Records(list):
    """A list of records with the ``sizes`` a GraphDataset reads."""

    @property
    def sizes(self):
        return np.array([len(r[keys.X]) for r in self])


def make_records(n_mol=12, seed=0, with_pos=True, nan_every=0):
    rng = np.random.default_rng(seed)
    out = Records()
    for i in range(n_mol):
        nf, ei, ea, pos = random_molecule(rng, int(rng.integers(1, 14)))
        y = [math.nan] if nan_every and i % nan_every == 0 else [float(rng.normal(5, 1))]
        out.append(graph_to_record(nf, ei, ea, pos=pos if with_pos else None, y=y))
    return out


def sample_of(records, pad_multiple=8, with_pos=True, token_multiple=1):
    """The fairseq sample the task's collater makes (host plan + nlabelled included)."""
    graphs = GraphDataset(records, Collator(pad_multiple=pad_multiple, with_pos=with_pos))
    dataset = GraphPredictionDataset(graphs, token_multiple)
    return dataset.collater([dataset[i] for i in range(len(dataset))])


def tiny_net(implementation="fast", **kw):
    torch.manual_seed(0)
    config = dict(num_layers=3, embed_dim=16, ffn_embed_dim=24, num_heads=4,
                  num_3d_bias_kernel=8, add_3d=True, dropout=0.1, attention_dropout=0.1,
                  act_dropout=0.1, droppath_prob=0.2, activation_fn="gelu",
                  encoder_normalize_before=True, apply_init=True)  # fmt: skip
    config.update(kw)
    return TransformerMNet(implementation=implementation, **config)


class HostReadGuard(TorchDispatchMode):
    """Records every operation that makes the host wait for the device's values."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2"):
            self.reads.append(name)
        if name == "index" and any(
            isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in args[1] if t is not None
        ):
            self.reads.append("bool-mask index")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def fairseq_train_update():
    """The aggregators active while fairseq-train's trainer reduces an update's metrics."""
    with metrics.aggregate(new_root=True), metrics.aggregate("train"):
        with metrics.aggregate("train_inner"), metrics.aggregate() as agg:
            yield agg


class Criterion(GraphPredictionCriterion):
    def __init__(self):  # no fairseq task needed
        torch.nn.Module.__init__(self)
        self.noise_scale, self.denoise_weight = 0.2, 1.0


class FairseqLikeModel(torch.nn.Module):
    """What the criterion calls: the net, with fairseq's return_all_hiddens default."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, batch):
        return self.net(batch, return_all_hiddens=False)


def test_training_step_reads_nothing_back_from_the_device(monkeypatch):
    sample = sample_of(make_records(nan_every=5))
    model = FairseqLikeModel(tiny_net()).train()
    # "fused" as "auto" picks on a GPU (foreach keeps its step counters on the CPU and
    # reads them there: host values, no device wait, but the guard cannot tell them apart)
    opt = FusedAdam(
        type("Cfg", (), dict(adam_betas="(0.9, 0.98)", adam_eps=1e-8, weight_decay=0.0,
                             adam_impl="fused", lr=[1e-3]))(),
        list(model.parameters()),
    )  # fmt: skip
    criterion = Criterion()
    reads = []
    for attr in ("tolist", "numpy"):
        orig = getattr(torch.Tensor, attr)
        monkeypatch.setattr(torch.Tensor, attr,
                            lambda t, *a, _o=orig, _n=attr, **k: reads.append(_n) or _o(t, *a, **k))
    guard = HostReadGuard()
    with guard:
        loss, sample_size, log = criterion(model, sample)
        loss.backward()
        opt.multiply_grads(1.0 / sample_size)
        opt.clip_grad_norm(5.0)
        opt.step()
        opt.zero_grad()
        with fairseq_train_update() as agg:
            Criterion.reduce_metrics([log])
            values = agg.get_smoothed_values()  # what fairseq's trainer does every update
    assert guard.reads + reads == []
    assert sample_size == sample["nlabelled"] == 9  # 3 of 12 targets are NaN
    assert torch.is_tensor(values["loss"]) and torch.isfinite(values["loss"])
    assert float(log["denoise_loss"]) > 0  # the 3D denoising head ran


def test_the_device_fallback_does_read_back():
    """Without the host plan (a batch not made by the task), the old computation remains:
    the guard does see its reads, so the test above is not vacuous."""
    sample = sample_of(make_records())
    batch = {k: v for k, v in sample["net_input"]["batched_data"].items()
             if not k.startswith("tm_plan")}  # fmt: skip
    guard = HostReadGuard()
    with guard:
        tiny_net().train()(batch)
    assert "nonzero" in guard.reads and "_local_scalar_dense" in guard.reads


@pytest.mark.parametrize("with_pos", [True, False])
@pytest.mark.parametrize("pad_multiple", [1, 8])
def test_host_plan_equals_device_indices(with_pos, pad_multiple):
    records = make_records(n_mol=9, seed=3, with_pos=with_pos)
    batch = sample_of(records, pad_multiple, with_pos=True)["net_input"]["batched_data"]
    plan = plan_of(batch)
    x0 = batch[keys.X][:, :, 0]
    bsz, n_atoms = x0.shape
    padding = torch.cat([torch.zeros(bsz, 1, dtype=torch.bool), x0.eq(0)], 1)
    device = TokenPacking.from_padding_mask(padding)
    host = TokenPacking.from_plan(plan, bsz, n_atoms + 1)
    for name in ("flat_index", "batch_index", "token_index", "gather_index", "spread_index"):
        assert torch.equal(getattr(host, name), getattr(device, name)), name
    pairs = PairIndex.from_padding_mask(x0.eq(0))
    assert torch.equal(plan[PLAN_PAIRS], pairs.flat)
    assert plan[PLAN_ANY_POS] is with_pos


def test_forward_with_and_without_plan_is_identical():
    sample = sample_of(make_records(seed=1))
    batch = sample["net_input"]["batched_data"]
    bare = {k: v for k, v in batch.items() if not k.startswith("tm_plan")}
    outs = []
    for b in (batch, bare):
        net = tiny_net().train()
        torch.manual_seed(7)
        logits, atom_output, _ = net(b)
        outs.append((logits, atom_output))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_spread_gives_attention_the_packed_result():
    """Padded positions copied from a real row (not zeros) change nothing: -inf keys."""
    padding = torch.tensor([[False, False, True, True], [False, False, False, True]])
    packing = TokenPacking.from_padding_mask(padding)
    x = torch.randn(int((~padding).sum()), 3, requires_grad=True)
    spread, unpacked = packing.spread(x), packing.unpack(x)
    assert torch.equal(spread[~padding], unpacked[~padding])
    assert torch.isfinite(spread).all()


@pytest.mark.parametrize("legacy", [False, True])
def test_droppath_scales_drawn_at_once(legacy):
    net = tiny_net(droppath_prob=0.5, legacy_droppath=legacy).molecule_encoder.train()
    padding = torch.rand(64, 9) > 0.5
    padding[:, 0] = False
    packing = TokenPacking.from_padding_mask(padding)
    scales = net.droppath_scales(packing, torch.float32)
    assert scales[0] is None  # layer 0 has probability 0 (linear from 0)
    index = packing.token_index if legacy else packing.batch_index
    for layer, pair in zip(net.layers[1:], scales[1:]):
        keep = 1.0 - layer.droppath.drop_prob
        for s in pair:
            assert s.shape == (len(index), 1)
            kept = torch.tensor(1.0) / torch.tensor(keep)  # float32, as drawn
            assert set(s.unique().tolist()) <= {0.0, float(kept)}
            # one factor per molecule (per token position with the released quirk)
            per_group = {}
            for g, v in zip(index.tolist(), s.squeeze(1).tolist()):
                assert per_group.setdefault(g, v) == v
    assert net.eval().droppath_scales(packing, torch.float32) == [None] * len(net.layers)


def test_fast_training_loss_curve_equals_reference():
    """Six updates, same seed, no dropout: the fast path's losses equal the reference path's
    within float32 noise (mode draws, coordinate noise and data are the same)."""
    sample = sample_of(make_records(n_mol=16, seed=2))
    curves = {}
    for impl in ("fast", "reference"):
        model = FairseqLikeModel(tiny_net(impl, dropout=0.0, attention_dropout=0.0,
                                          act_dropout=0.0, droppath_prob=0.0,
                                          atom_head_dropout=0.0))  # fmt: skip
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        torch.manual_seed(11)
        losses = []
        for _ in range(6):
            loss, size, _ = Criterion()(model, sample)
            (loss / size).backward()
            opt.step()
            opt.zero_grad()
            losses.append(float(loss.detach()) / size)
        curves[impl] = losses
    assert curves["fast"][-1] < curves["fast"][0]
    np.testing.assert_allclose(curves["fast"], curves["reference"], rtol=1e-4)


def test_cpu_attention_with_dropout_equals_sdpa():
    """On the CPU, training attention runs as baddbmm/softmax/dropout/bmm (SDPA has no fused
    CPU kernel with dropout): without the dropout it equals SDPA, and the dropout is the same
    one-operator dropout applied to the probabilities."""
    from transformer_m.modules.multihead_attention import MultiheadAttention
    from transformer_m.modules.utils import dropout

    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 4, 7, 5) for _ in range(3))
    bias = torch.randn(3, 4, 7, 7).masked_fill(torch.rand(3, 1, 1, 7) > 0.7, float("-inf"))
    bias[..., 0] = 0.0  # every row keeps one key
    attend = MultiheadAttention._attention_cpu
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, bias, scale=0.3)
    torch.testing.assert_close(attend(q, k, v, bias, 0.3, 0.0), expected)
    torch.manual_seed(5)
    out = attend(q, k, v, bias, 0.3, 0.4)
    torch.manual_seed(5)
    probs = torch.softmax(bias + 0.3 * q @ k.transpose(-1, -2), -1)
    torch.testing.assert_close(out, dropout(probs.reshape(12, 7, 7), 0.4, True).view_as(probs) @ v)


def test_dropout_is_one_operator_with_the_right_statistics():
    from transformer_m.modules.utils import dropout

    x = torch.ones(200_000)
    calls = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            calls.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with Count():
        y = dropout(x, 0.25, True)
    assert calls == ["native_dropout"]
    values = y.unique().tolist()
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(1 / 0.75)
    assert abs(float((y == 0).float().mean()) - 0.25) < 0.01
    assert dropout(x, 0.25, False) is x and dropout(x, 0.0, True) is x


def test_metrics_stay_on_the_device_in_training_only():
    """The GeoMFormer and 3D-GSRD criteria reduce training logs without reading them back;
    outside training updates (validation) the reduced values are floats, rounded as before,
    even when the logs are tensors (data-parallel runs all-reduce them into tensors)."""
    from transformer_m.criterions.geomformer_md17 import (
        GeoMFormerGraphCriterion,
        GeoMFormerMD17Criterion,
    )
    from transformer_m.criterions.gsrd import GsrdPretrainCriterion
    from transformer_m.criterions.lazy_metrics import loggable

    t = torch.tensor
    logs = {
        Criterion: {"loss": t(3.0), "denoise_loss": t(0.5), "sample_size": 2, "nsentences": 2},
        GeoMFormerMD17Criterion: {"loss": t(3.0), "energy_abs": t(1.5), "force_abs": t(6.0),
                                  "force_count": 12, "sample_size": 2, "nsentences": 2},
        GeoMFormerGraphCriterion: {"loss": t(1.0), "mae": t(0.5), "sample_size": 2},
        GsrdPretrainCriterion: {"loss": t(2.0), "mask_loss": t(1.0), "distill_loss": t(0.1),
                                "denoise_loss": t(0.2), "vec_loss": t(0.0), "nsentences": 2,
                                "sample_size": 1},
    }  # fmt: skip
    for criterion, log in logs.items():
        guard = HostReadGuard()
        with guard, fairseq_train_update() as agg:
            criterion.reduce_metrics([log, log])
            values = agg.get_smoothed_values()
        assert guard.reads == [], criterion
        assert torch.is_tensor(values["loss"]), criterion
        for eval_log in (loggable(log, training=False), log):  # also tensors, as DDP makes
            with metrics.aggregate(new_root=True), metrics.aggregate("valid") as agg:
                criterion.reduce_metrics([eval_log])
                assert isinstance(agg.get_smoothed_values()["loss"], float), criterion


def test_train_mode_shortcut_still_switches_every_module():
    """fairseq calls model.train() every update; the fairseq model skips the walk only when
    every submodule already is in that mode."""
    from transformer_m.models.transformer_m import TransformerMModel

    model = TransformerMModel(tiny_net())
    model.train()
    assert all(m.training for m in model.modules())
    model.encoder.molecule_encoder.layers[1].eval()  # one submodule changed directly
    model.train()
    assert all(m.training for m in model.modules())
    model.eval()
    assert not any(m.training for m in model.modules())


def test_progress_bars_print_device_metrics_like_floats():
    """Metrics left on the device print as fairseq prints floats, not as 17-digit reprs."""
    import transformer_m  # noqa: F401  (installs the format)
    from fairseq.logging import progress_bar

    value = torch.tensor(6.5055999755859375)
    assert progress_bar.format_stat(value) == progress_bar.format_stat(6.5056) == "6.5056"
    bar = progress_bar.JsonProgressBar([], log_interval=1)
    assert bar._format_stats({"loss": value, "n": 3})["loss"] == "6.5056"
    assert progress_bar.format_stat(torch.ones(2)) == [1.0, 1.0]  # other tensors unchanged
