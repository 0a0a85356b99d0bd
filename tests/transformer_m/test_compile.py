"""``--torch-compile`` and ``--pack-multiple``: the compiled layer stack and the padded packing
compute what the eager fast path computes.

The layer stack is traced by dynamo without a graph break (``backend="eager"`` runs the traced
graph with the very operators of the eager path, so even dropout draws agree bit for bit); the
inert rows of ``--pack-multiple`` change no output and no gradient. The inductor-compiled stack
(what a GPU run uses; minutes to compile on a small CPU) is checked under ``-m slow``.
"""
import numpy as np
import pytest
import torch

pytest.importorskip("fairseq")
from test_host_overhead import Criterion, FairseqLikeModel, make_records, sample_of, tiny_net  # noqa: E402,E501

from transformer_m.modules.host_plan import PLAN_GATHER, PLAN_TOKENS  # noqa: E402


def _run(net, batch, seed=7):
    torch.manual_seed(seed)
    logits, atom_output, _ = net(batch, return_all_hiddens=False)
    (logits[:, 0].sum() + atom_output.sum()).backward()
    grads = [p.grad.clone() for p in net.parameters() if p.grad is not None]
    return logits, atom_output, grads


def _equal(a, b, grad_atol=0.0, out_atol=0.0):
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=out_atol)
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=out_atol)
    assert len(a[2]) == len(b[2])
    for x, y in zip(a[2], b[2]):
        torch.testing.assert_close(x, y, rtol=0, atol=grad_atol)


def test_layer_stack_traces_without_graph_breaks():
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    batch = sample_of(make_records(seed=1))["net_input"]["batched_data"]
    eager = _run(tiny_net().train(), batch)
    net = tiny_net(torch_compile="default").train()
    net.encoder.molecule_encoder.compile_backend = "eager"
    traced = _run(net, batch)
    _equal(eager, traced)  # dropout, DropPath and attention dropout included
    assert dict(torch._dynamo.utils.counters["graph_break"]) == {}
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_inert_rows_change_nothing():
    records = make_records(n_mol=10, seed=4)
    plain = sample_of(records)["net_input"]["batched_data"]
    padded = sample_of(records, token_multiple=64)["net_input"]["batched_data"]
    n_real = len(plain[PLAN_TOKENS])
    assert len(padded[PLAN_TOKENS]) % 64 == 0 and len(padded[PLAN_TOKENS]) > n_real
    assert int(padded[PLAN_GATHER].max()) == len(padded[PLAN_TOKENS])  # unpack's zero row
    # no dropout (its masks would take other shapes); DropPath draws per molecule still on
    kw = dict(dropout=0.0, attention_dropout=0.0, act_dropout=0.0, droppath_prob=0.3)
    # equal up to float rounding: a matrix product of more rows may round a row differently
    # (MKL's D -> 1 product of the output head does), and weight gradients sum over more
    # (zero) rows
    _equal(_run(tiny_net(**kw).train(), plain), _run(tiny_net(**kw).train(), padded), 1e-6,
           1e-7)  # fmt: skip
    with torch.no_grad():
        a = tiny_net().eval()(plain)
        b = tiny_net().eval()(padded)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-7)
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=1e-7)


def test_unknown_compile_mode_is_an_error():
    with pytest.raises(ValueError, match="torch_compile must be one of"):
        tiny_net(torch_compile="max-speed")


@pytest.mark.slow
def test_inductor_compiled_training_matches_eager(request):
    """Three updates, no dropout: the inductor-compiled stack's losses equal eager within
    float32 noise (30 s to minutes of compilation on a 2-core CPU: opt in with -m slow)."""
    if "slow" not in (request.config.getoption("-m") or ""):
        pytest.skip("compiles with inductor: opt in with -m slow")
    sample = sample_of(make_records(n_mol=12, seed=2))
    kw = dict(dropout=0.0, attention_dropout=0.0, act_dropout=0.0, droppath_prob=0.0,
              num_layers=2)  # fmt: skip
    curves = []
    for mode in ("none", "default"):
        model = FairseqLikeModel(tiny_net(torch_compile=mode, **kw)).train()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        torch.manual_seed(11)
        losses = []
        for _ in range(3):
            loss, size, _ = Criterion()(model, sample)
            (loss / size).backward()
            opt.step()
            opt.zero_grad()
            losses.append(float(loss.detach()) / size)
        curves.append(losses)
    np.testing.assert_allclose(curves[0], curves[1], rtol=1e-5)
