"""The collator's int32 index tensors give the model exactly the outputs and gradients of the
official int64 batch (both implementations, every golden scenario)."""
import pytest
import torch
from tm_modules_testutils import build_small, golden, scenario_batch

from graphormer_ext.data import keys

SCENARIOS = ("out_3d", "out_2d", "out_mixed", "out_train_modes")
INDEX_KEYS = (keys.X, keys.DEGREE, keys.OUT_DEGREE, keys.SPATIAL_POS, keys.ATTN_EDGE_TYPE,
              keys.EDGE_INPUT, keys.NODE_TYPE_EDGE)  # fmt: skip


def _int32(batch: dict) -> dict:
    out = dict(batch)
    for key in INDEX_KEYS:
        assert batch[key].dtype == torch.int64, key
        out[key] = batch[key].to(torch.int32)
    return out


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("implementation", ("reference", "fast"))
def test_int32_and_int64_batches_are_identical_to_the_model(implementation, scenario):
    batch = scenario_batch(scenario)
    results = []
    for b in (batch, _int32(batch)):
        model = build_small(implementation)
        mode_choice = None
        if scenario == "out_train_modes":
            model.train()
            mode_choice = torch.tensor(golden()[scenario]["mode_choice"])
        logits, atom_output, _ = model(b, mode_choice=mode_choice)
        loss = logits[:, 0].sum() + (0 if atom_output is None else atom_output.sum())
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        results.append((logits.detach(), atom_output, grads))
    (l64, a64, g64), (l32, a32, g32) = results
    assert torch.equal(l64, l32)
    assert (a64 is None and a32 is None) or torch.equal(a64.detach(), a32.detach())
    assert len(g64) == len(g32) and all(torch.equal(x, y) for x, y in zip(g64, g32))
