"""Data a task cannot use is refused up front, naming the split and the fix.

Label width: the ``graph_prediction`` loss refuses labels of another width than the model's output.

A CSV preprocessed with two label columns stores ``y`` as ``[2]`` per molecule; a model built
with ``--num-classes 1`` predicts ``[B, 1]``. Before the check the loss broadcast ``[B, 1]``
against ``[B, 2]`` and trained on both columns at once without a word.

Empty splits: three CSV rows under the default split fractions leave ``valid.lmdb`` and
``test.lmdb`` empty (preprocessing warns); fairseq used to fail with "The dataset is empty",
naming neither the split nor the file.
"""
from __future__ import annotations

from argparse import Namespace
from pathlib import Path

import pytest

pytest.importorskip("fairseq")
torch = pytest.importorskip("torch")

from fairseq import options, tasks  # noqa: E402
from fairseq.dataclass.utils import convert_namespace_to_omegaconf  # noqa: E402

PLUGIN_DIR = Path(__file__).resolve().parents[2] / "transformer_m"
SMILES = ["CCO", "CC(=O)O", "c1ccccc1", "CCN", "CCCC", "OCCO", "CC#N", "C1CC1"]


@pytest.fixture(scope="module")
def two_label_lmdb(tmp_path_factory):
    from graphormer_ext.preprocess import main as preprocess

    root = tmp_path_factory.mktemp("labels")
    rows = ["smiles,a,b,fold"] + [
        f"{s},{i * 0.5},{-i * 1.5},{'train' if i < 6 else 'valid'}" for i, s in enumerate(SMILES)
    ]
    (root / "mols.csv").write_text("\n".join(rows) + "\n")
    out = root / "lmdb"
    assert preprocess(["csv", "--path", str(root / "mols.csv"), "--smiles-column", "smiles",
                       "--label-columns", "a,b", "--split-column", "fold", "--out", str(out),
                       "--workers", "1", "--no-progress"]) == 0  # fmt: skip
    return out


def _setup(data: Path, num_classes: int, *extra: str):
    from fairseq.utils import import_user_module

    import_user_module(Namespace(user_dir=str(PLUGIN_DIR)))
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, input_args=[
        "--user-dir", str(PLUGIN_DIR), "--task", "graph_prediction", "--criterion",
        "graph_prediction", "--data-path", str(data), "--num-classes", str(num_classes),
        "--arch", "transformer_m_small", "--encoder-layers", "1", "--encoder-embed-dim", "16",
        "--encoder-ffn-embed-dim", "16", "--encoder-attention-heads", "2", "--cpu", *extra,
    ])  # fmt: skip
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    task.load_dataset("train")
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    ds = task.dataset("train")
    sample = ds.collater([ds[i] for i in range(len(ds))])
    return model, criterion, sample


def test_label_width_mismatch_is_refused(two_label_lmdb):
    model, criterion, sample = _setup(two_label_lmdb, num_classes=1)
    assert tuple(sample["target"].shape) == (6, 2)
    with pytest.raises(ValueError, match=r"stores 2 label.*--num-classes 2 --remove-head"):
        criterion(model, sample)


def test_matching_width_trains_on_both_columns(two_label_lmdb):
    model, criterion, sample = _setup(two_label_lmdb, 2, "--remove-head")
    model.eval()
    loss, sample_size, log = criterion(model, sample)
    with torch.no_grad():
        pred = model(dict(sample["net_input"]["batched_data"]))[0][:, 0, :].float()
    expected = (pred - sample["target"].float()).abs().sum()
    assert sample_size == 6
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-5)


def test_several_classes_without_the_fine_tuning_head_are_refused(two_label_lmdb):
    with pytest.raises(ValueError, match="--num-classes 2 needs --remove-head"):
        _setup(two_label_lmdb, 2)


@pytest.mark.parametrize("task", ["graph_prediction", "graph_prediction_qm9"])
def test_empty_split_is_refused_naming_file_and_fix(tmp_path, task):
    from transformer_m.tasks.graph_prediction import GraphPredictionConfig
    from transformer_m.tasks.graph_prediction_qm9 import GraphPredictionQM9Config

    cls = {"graph_prediction": GraphPredictionConfig,
           "graph_prediction_qm9": GraphPredictionQM9Config}[task]
    from fairseq.tasks import TASK_REGISTRY

    from graphormer_ext.preprocess import main as preprocess

    (tmp_path / "few.csv").write_text("smiles,y\nCCO,1\nCCC,2\nCCN,3\n")
    assert preprocess(["csv", "--path", str(tmp_path / "few.csv"), "--smiles-column", "smiles",
                       "--label-columns", "y", "--out", str(tmp_path / "lmdb"), "--workers", "1",
                       "--no-progress"]) == 0  # fmt: skip
    t = TASK_REGISTRY[task](cls(data_path=str(tmp_path / "lmdb"), seed=1))
    t.load_dataset("train")  # three molecules: fine
    with pytest.raises(ValueError, match=r"split 'valid': .*valid\.lmdb holds no molecules.*"
                                         r"--valid-subset"):
        t.load_dataset("valid")
