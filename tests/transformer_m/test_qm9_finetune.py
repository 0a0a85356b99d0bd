"""QM9 / user-dataset fine-tuning: task and criterion ``graph_prediction_qm9``.

In process (fast): ``--task-idx`` really selects the target (the release always trained column
0, spec §1.15.1), the three ``--std-type`` modes, the readouts, metrics in the paper's units (meV),
the 110,000 / 10,000 / 10,831 split, statistics from the train split, classification metrics and
bad inputs. Data: the first 60 molecules of the installed ``qm9pack`` (real QM9) and small CSVs.

Subprocesses (fairseq CLIs, tiny model, CPU): a tiny pre-training run (``graph_prediction``), then
side by side (a) QM9 fine-tuning from it with ``--finetune-from-model --remove-head`` followed by
``fairseq-validate``, and (b) the one-command user pipeline ``python -m
transformer_m.finetune_user`` on a CSV with RDKit conformers and a binary label.
"""

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from suite_env import subprocess_env

pytest.importorskip("fairseq")
torch = pytest.importorskip("torch")

from fairseq import metrics  # noqa: E402

from graphormer_ext.data import keys  # noqa: E402
from graphormer_ext.sources.base import SourceError  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
PLUGIN_DIR = REPO_ROOT / "transformer_m"
VENV_BIN = Path(sys.executable).parent
TIMEOUT = 300
TINY_MODEL = [
    "--arch", "transformer_m_small", "--encoder-layers", "2", "--encoder-embed-dim", "32",
    "--encoder-ffn-embed-dim", "32", "--encoder-attention-heads", "4",
    "--num-3d-bias-kernel", "8",
]  # fmt: skip
QM9_N, QM9_SIZES = 60, (40, 10, 10)
HOMO, MU = 2, 0

needs_qm9pack = pytest.mark.skipif(
    importlib.util.find_spec("qm9pack") is None, reason="qm9pack is not installed"
)


# --- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qm9_source():
    pytest.importorskip("rdkit")
    from graphormer_ext.sources.qm9 import QM9PackSource

    return QM9PackSource(limit=QM9_N, sizes=QM9_SIZES, seed=1)


@pytest.fixture(scope="module")
def qm9_lmdb(qm9_source, tmp_path_factory):
    """Real QM9 (first 60 qm9pack molecules, hydrogens kept, DFT 3D) in a seeded 40/10/10 split."""
    from graphormer_ext.data.lmdb_writer import write_split

    out = tmp_path_factory.mktemp("qm9_lmdb")
    for split in ("train", "valid", "test"):
        write_split(
            out / f"{split}.lmdb", qm9_source, split=split, source=qm9_source,
            remove_hs=False, workers=1, progress=False,
        )  # fmt: skip
    return out


def make_task(data_path, **overrides):
    from omegaconf import OmegaConf

    from transformer_m.tasks.graph_prediction_qm9 import (
        GraphPredictionQM9Config,
        GraphPredictionQM9Task,
    )

    cfg = OmegaConf.structured(GraphPredictionQM9Config(data_path=str(data_path), seed=1))
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return GraphPredictionQM9Task(cfg)


def first_batch(task, split, n=64):
    ds = task.datasets[split]
    return ds.collater([ds[i] for i in range(min(n, len(ds)))])


class ConstModel(torch.nn.Module):
    """Returns ``logits[b, t] = value(b, t)`` for a fixed function; no atom output."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, batch):
        x = batch[keys.X]
        b, n = x.shape[0], x.shape[1]
        return self.fn(b, n + 1) + 0 * self.w, None, {}


def reduce(criterion_cls, logs):
    # new_root: fairseq's aggregators are process-global; other tests' criteria log the
    # same names (e.g. a derived 'mae'), which a real run, with one criterion, never mixes.
    with metrics.aggregate(new_root=True) as agg:
        criterion_cls.reduce_metrics(logs)
    return {k: float(v) for k, v in agg.get_smoothed_values().items()}


# --- --task-idx (released defect: always column 0) -----------------------------------------------
@needs_qm9pack
@pytest.mark.parametrize("task_idx", [HOMO, 3, 4, 18])
def test_task_idx_selects_the_target_column(qm9_lmdb, qm9_source, task_idx):
    task = make_task(qm9_lmdb, task_idx=task_idx)
    task.load_dataset("valid")
    batch = first_batch(task, "valid")
    records = task.datasets["valid"].graphs.dataset
    positions = qm9_source.split_positions("valid")[records.source_index[batch["id"].numpy()]]
    want = qm9_source.targets()[positions, task_idx].astype(np.float32)
    assert batch["target"].shape == (len(want),)
    np.testing.assert_allclose(batch["target"].numpy(), want, rtol=1e-6)
    if task_idx != MU:  # not the column the release trained on
        assert not np.allclose(want, qm9_source.targets()[positions, MU])
    from graphormer_ext.sources.qm9 import QM9_TARGETS

    assert task.target_name == QM9_TARGETS[task_idx].name


@needs_qm9pack
def test_unknown_task_idx_is_a_clear_error(qm9_lmdb):
    task = make_task(qm9_lmdb, task_idx=19)
    with pytest.raises(ValueError, match=r"--task-idx 19 .*2=homo.*0\.\.18"):
        task.load_dataset("valid")
    with pytest.raises(ValueError, match="task-idx must be >= 0"):
        make_task(qm9_lmdb, task_idx=-1)


# --- statistics, normalisation, readouts, units ---------------------------------------------------
@needs_qm9pack
def test_statistics_come_from_the_train_split(qm9_lmdb, qm9_source):
    task = make_task(qm9_lmdb, task_idx=HOMO, std_type="std_logits")
    task.load_dataset("valid")  # needs train statistics even when only valid is loaded
    from graphormer_ext.data.lmdb_dataset import LMDBDataset

    train = LMDBDataset(qm9_lmdb / "train.lmdb")
    pos = qm9_source.split_positions("train")[train.source_index]
    y = qm9_source.targets()[pos, HOMO]
    mean, std = task.statistics()
    assert mean == pytest.approx(y.mean(), rel=1e-5)
    assert std == pytest.approx(y.std(ddof=1), rel=1e-4)
    # checkpointed and restored (fairseq-validate without train.lmdb)
    state = task.state_dict()
    other = make_task(qm9_lmdb, task_idx=HOMO, std_type="std_logits")
    other.load_state_dict(state)
    assert other.statistics() == (mean, std)
    # no_std uses raw values
    assert make_task(qm9_lmdb, task_idx=HOMO).statistics() == (0.0, 1.0)


def test_normalisation_modes():
    from transformer_m.criterions.graph_prediction_qm9 import regression_loss

    y = torch.tensor([-6.0, -5.5, -7.25])
    mean, std = -6.2, 0.6
    z = (y - mean) / std
    for std_type, out in (("std_logits", z), ("std_labels", z), ("no_std", y)):
        for loss_type in ("L1", "L2"):
            loss, pred = regression_loss(out, y, mean, std, std_type, loss_type)
            assert float(loss) == pytest.approx(0.0, abs=1e-5), (std_type, loss_type)
            torch.testing.assert_close(pred, y)
    out = z + 0.5  # off by half a std
    l1_logits, _ = regression_loss(out, y, mean, std, "std_logits", "L1")
    l1_labels, _ = regression_loss(out, y, mean, std, "std_labels", "L1")
    l2_labels, _ = regression_loss(out, y, mean, std, "std_labels", "L2")
    assert float(l1_logits) == pytest.approx(3 * 0.5 * std, rel=1e-5)  # raw units
    assert float(l1_labels) == pytest.approx(3 * 0.5, rel=1e-5)  # normalised units
    assert float(l2_labels) == pytest.approx(3 * 0.25, rel=1e-5)
    with pytest.raises(ValueError):
        regression_loss(out, y, mean, std, "std_bogus", "L1")


def test_readouts_ignore_padding():
    from transformer_m.tasks.graph_prediction_qm9 import readout

    logits = torch.full((2, 5, 1), 1e6)  # T = 1 + 4 atoms; padding stays huge
    logits[:, 0, 0] = torch.tensor([7.0, -1.0])
    logits[0, 1:4, 0] = torch.tensor([1.0, 2.0, 3.0])
    logits[1, 1:3, 0] = torch.tensor([4.0, 6.0])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    assert readout(logits, mask, "cls")[:, 0].tolist() == [7.0, -1.0]
    assert readout(logits, mask, "sum")[:, 0].tolist() == [6.0, 10.0]
    assert readout(logits, mask, "mean")[:, 0].tolist() == [2.0, 5.0]


def test_paper_units():
    from transformer_m.tasks.graph_prediction_qm9 import paper_unit

    assert paper_unit("eV", True) == ("meV", 1000.0)
    assert paper_unit("D", True) == ("D", 1.0)
    assert paper_unit("eV", False) == ("eV", 1.0)  # user data: as given


@needs_qm9pack
@pytest.mark.parametrize("readout_type", ["cls", "mean", "sum"])
def test_criterion_reports_mae_in_mev(qm9_lmdb, readout_type):
    from transformer_m.criterions.graph_prediction_qm9 import GraphPredictionQM9Criterion

    task = make_task(qm9_lmdb, task_idx=HOMO, std_type="std_logits", loss_type="L2",
                     readout_type=readout_type)
    task.load_dataset("valid")
    crit = GraphPredictionQM9Criterion(task)
    batch = first_batch(task, "valid")
    mean, std = task.statistics()
    y = batch["target"]
    n_atoms = batch["net_input"]["batched_data"][keys.X][:, :, 0].ne(0).sum(1).float()
    scale = {"cls": 1.0, "mean": 1.0, "sum": 1.0 / n_atoms}[readout_type]

    def fn(b, t):  # the readout gives (y + 0.05 eV - mean) / std
        v = ((y + 0.05 - mean) / std) * (scale if torch.is_tensor(scale) else scale)
        return v.view(b, 1, 1).expand(b, t, 1).clone()

    model = ConstModel(fn).eval()
    _, sample_size, log = crit(model, batch)
    assert sample_size == len(y)
    out = reduce(GraphPredictionQM9Criterion, [log])
    assert out["mae_meV"] == pytest.approx(50.0, rel=1e-3)  # 0.05 eV = 50 meV
    assert out["mae"] == out["mae_meV"] == out["loss"]  # eval: loss = MAE (paper units)
    model.train()
    _, _, log = crit(model, batch)
    out = reduce(GraphPredictionQM9Criterion, [log])
    assert out["loss"] == pytest.approx(0.05**2, rel=1e-3)  # train: L2 of std_logits (eV)
    assert out["mae_meV"] == pytest.approx(50.0, rel=1e-3)


@needs_qm9pack
def test_missing_labels_are_counted_not_used(qm9_lmdb):
    from transformer_m.criterions.graph_prediction_qm9 import GraphPredictionQM9Criterion

    task = make_task(qm9_lmdb, task_idx=HOMO)
    task.load_dataset("valid")
    crit = GraphPredictionQM9Criterion(task)
    batch = first_batch(task, "valid")
    batch["target"][:3] = float("nan")
    y = batch["target"]
    fn = lambda b, t: torch.nan_to_num(y).view(b, 1, 1).expand(b, t, 1) + 0.1  # noqa: E731
    loss, sample_size, log = crit(ConstModel(fn).eval(), batch)
    assert math.isfinite(float(loss.detach())) and sample_size == len(y) - 3
    out = reduce(GraphPredictionQM9Criterion, [log])
    assert out["n_missing"] == 3 and out["mae_meV"] == pytest.approx(100.0, rel=1e-3)


# --- split ----------------------------------------------------------------------------------------
def test_split_sizes_and_seed():
    from graphormer_ext.sources.qm9 import NUM_QM9_CHARACTERIZED, qm9_split

    s = qm9_split(NUM_QM9_CHARACTERIZED, seed=1)
    assert [len(s[k]) for k in ("train", "valid", "test")] == [110000, 10000, 10831]
    allidx = np.concatenate(list(s.values()))
    assert len(np.unique(allidx)) == NUM_QM9_CHARACTERIZED
    assert not np.array_equal(qm9_split(NUM_QM9_CHARACTERIZED, seed=2)["test"], s["test"])
    with pytest.raises(SourceError):
        qm9_split(1000, seed=1)  # sizes must add up


# --- classification and user data -----------------------------------------------------------------
def write_csv(path: Path, rows) -> Path:
    lines = "".join(",".join(map(str, r)) + "\n" for r in rows)
    path.write_text("smiles,y,active,split\n" + lines)
    return path


USER_SMILES = [
    "CCO", "CCN", "CCC", "CCCl", "c1ccccc1", "c1ccncc1", "CC(=O)O", "CC(=O)N", "CCOC",
    "CCCC", "CCCO", "CCCN", "OCCO", "NCCN", "CC#N", "C1CCCCC1", "C1CCOC1", "Cc1ccccc1",
    "Oc1ccccc1", "Nc1ccccc1", "CC(C)O", "CC(C)N", "CC(C)C", "FC(F)F",
]  # fmt: skip


def user_rows():
    """SMILES, a regression label (heavy atoms), a binary label (has N or O), a split."""
    from rdkit import Chem

    rows = []
    for i, smi in enumerate(USER_SMILES):
        mol = Chem.MolFromSmiles(smi)
        active = int(any(a.GetSymbol() in "NO" for a in mol.GetAtoms()))
        split = "train" if i % 4 else ("valid" if i % 8 == 0 else "test")
        rows.append((smi, mol.GetNumAtoms(), active, split))
    return rows


def test_csv_conformers_and_bad_smiles_are_counted(tmp_path):
    pytest.importorskip("rdkit")
    from graphormer_ext import preprocess
    from graphormer_ext.data.lmdb_dataset import LMDBDataset

    rows = user_rows()[:8] + [("C1CC(", 1.0, 0, "train"), ("not_a_smiles", "", 1, "train")]
    csv = write_csv(tmp_path / "u.csv", rows)
    args = ["csv", "--path", str(csv), "--smiles-column", "smiles", "--label-columns",
            "y,active", "--split-column", "split", "--conformers", "--out",
            str(tmp_path / "lmdb"), "--workers", "2", "--no-progress"]
    assert preprocess.main(args) == 0
    train = LMDBDataset(tmp_path / "lmdb" / "train.lmdb")
    assert train.meta["counts"]["skipped"] == 2
    skipped = (tmp_path / "lmdb" / "train.skipped.tsv").read_text()
    assert "not_a_smiles" in skipped and "C1CC(" in skipped
    rec = train[0]
    assert keys.POS in rec and np.abs(rec[keys.POS]).sum() > 0  # 3D conformer stored
    assert train.meta["source"]["describe"]["conformers"]["seed"] == 0
    # seeded: the same conformer again
    again = tmp_path / "again"
    args_again = args[:-5] + ["--out", str(again), "--workers", "1", "--no-progress"]
    assert preprocess.main(args_again) == 0
    np.testing.assert_allclose(LMDBDataset(again / "train.lmdb")[0][keys.POS], rec[keys.POS])
    # a missing column is a clear error (exit status 2, message lists the columns)
    bad = ["csv", "--path", str(csv), "--smiles-column", "smiles", "--label-columns", "nope",
           "--out", str(tmp_path / "bad"), "--no-progress"]
    assert preprocess.main(bad) == 2


def test_classification_metrics_and_bad_labels(tmp_path):
    pytest.importorskip("rdkit")
    from graphormer_ext import preprocess
    from transformer_m.criterions.graph_prediction_qm9 import (
        GraphPredictionQM9Criterion,
        roc_auc,
    )

    csv = write_csv(tmp_path / "u.csv", user_rows())
    assert preprocess.main(["csv", "--path", str(csv), "--smiles-column", "smiles",
                            "--label-columns", "y,active", "--split-column", "split", "--out",
                            str(tmp_path / "lmdb"), "--workers", "1", "--no-progress"]) == 0
    task = make_task(tmp_path / "lmdb", task_idx=1, loss_type="BCE", dataset_name="custom")
    task.load_dataset("train")
    batch = first_batch(task, "train")
    y = batch["target"]
    assert set(y.tolist()) == {0.0, 1.0}
    crit = GraphPredictionQM9Criterion(task)
    assert crit.logging_outputs_can_be_summed() is False
    logit = (y * 2 - 1) * 3.0
    logit[0] = -logit[0]  # one mistake
    model = ConstModel(lambda b, t: logit.view(b, 1, 1).expand(b, t, 1)).eval()
    _, n, log = crit(model, batch)
    out = reduce(GraphPredictionQM9Criterion, [log])
    assert out["accuracy"] == pytest.approx((n - 1) / n, abs=1e-4)
    assert 0.5 < out["roc_auc"] < 1.0
    assert roc_auc(np.array([0.1, 0.9]), np.array([0, 1])) == 1.0
    assert math.isnan(roc_auc(np.array([0.1, 0.9]), np.array([1, 1])))
    # BCE on a non-binary column, CE without classes, std with classification
    task_bad = make_task(tmp_path / "lmdb", task_idx=0, loss_type="BCE", dataset_name="custom")
    task_bad.load_dataset("train")
    with pytest.raises(ValueError, match="labels 0/1"):
        GraphPredictionQM9Criterion(task_bad)(model, first_batch(task_bad, "train"))
    with pytest.raises(ValueError, match="num-classes K >= 2"):
        make_task(tmp_path / "lmdb", loss_type="CE")
    with pytest.raises(ValueError, match="std-type no_std"):
        make_task(tmp_path / "lmdb", loss_type="BCE", std_type="std_logits")
    # CE with two classes
    task_ce = make_task(tmp_path / "lmdb", task_idx=1, loss_type="CE", num_classes=2,
                        dataset_name="custom")
    task_ce.load_dataset("train")
    two = torch.stack([-logit, logit], -1)
    model_ce = ConstModel(lambda b, t: two.view(b, 1, 2).expand(b, t, 2)).eval()
    _, _, log = GraphPredictionQM9Criterion(task_ce)(model_ce, batch)
    acc = reduce(GraphPredictionQM9Criterion, [log])["accuracy"]
    assert acc == pytest.approx((n - 1) / n, abs=1e-4)


# --- end to end through fairseq's CLIs ------------------------------------------------------------
def json_records(text: str, kind: str) -> list[dict]:
    pattern = re.compile(r"(?:\| |INFO:)" + re.escape(kind) + r"(?: \| |:)(\{.*\})\s*$")
    return [json.loads(m.group(1)) for m in map(pattern.search, text.splitlines()) if m]


def run_parallel(jobs: dict, env: dict, cwd: Path) -> dict:
    procs = {}
    try:
        for name, (argv, log) in jobs.items():
            fh = open(log, "w")
            procs[name] = (subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT,
                                            env=env, cwd=cwd), fh)
        for proc, _ in procs.values():
            proc.wait(timeout=TIMEOUT)
    finally:
        for proc, fh in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            fh.close()
    out = {}
    for name, (proc, _) in procs.items():
        argv, log = jobs[name]
        out[name] = Path(log).read_text()
        assert proc.returncode == 0, f"{name} failed ({proc.returncode}):\n{out[name][-4000:]}"
    return out


@pytest.fixture(scope="module")
def pretrained(e2e_data_3d, e2e_env, tmp_path_factory):
    """A tiny pre-trained checkpoint (graph_prediction, 3D + denoising head)."""
    tmp = tmp_path_factory.mktemp("qm9ft_pretrain")
    env = dict(e2e_env, TMPDIR=str(tmp))
    argv = [
        str(VENV_BIN / "fairseq-train"), "--user-dir", str(PLUGIN_DIR),
        "--data-path", str(e2e_data_3d), "--task", "graph_prediction",
        "--criterion", "graph_prediction", "--num-classes", "1", *TINY_MODEL, "--add-3d",
        "--optimizer", "adam", "--lr", "1e-3", "--batch-size", "16", "--max-update", "4",
        "--save-dir", str(tmp / "ckpt"), "--cpu", "--num-workers", "0", "--no-progress-bar",
        "--disable-validation", "--seed", "1",
    ]  # fmt: skip
    run_parallel({"pretrain": (argv, tmp / "pretrain.log")}, env, tmp)
    return tmp / "ckpt" / "checkpoint_last.pt"


@needs_qm9pack
def test_finetune_from_pretrained_then_validate_and_user_pipeline(
    pretrained, qm9_lmdb, e2e_env, tmp_path
):
    env = dict(e2e_env, TMPDIR=str(tmp_path))
    qm9_train = [
        str(VENV_BIN / "fairseq-train"), "--user-dir", str(PLUGIN_DIR),
        "--data-path", str(qm9_lmdb), "--task", "graph_prediction_qm9",
        "--criterion", "graph_prediction_qm9", "--dataset-name", "qm9H", "--task-idx", "2",
        "--num-classes", "1", "--loss-type", "L2", "--std-type", "std_logits",
        "--readout-type", "cls", "--load-qm9", *TINY_MODEL, "--add-3d", "--no-2d",
        "--remove-head", "--finetune-from-model", str(pretrained),
        "--optimizer", "adam", "--lr", "3e-3", "--lr-scheduler", "polynomial_decay",
        "--warmup-updates", "2", "--total-num-update", "30", "--batch-size", "8",
        "--max-epoch", "6", "--valid-subset", "valid,test", "--save-dir", str(tmp_path / "ft"),
        "--cpu", "--num-workers", "0", "--log-format", "json", "--log-interval", "1",
        "--no-progress-bar", "--no-epoch-checkpoints", "--seed", "1",
    ]  # fmt: skip
    csv = write_csv(tmp_path / "user.csv", user_rows())
    user = [
        sys.executable, "-m", "transformer_m.finetune_user", "--csv", str(csv),
        "--label-columns", "y,active", "--target", "active", "--kind", "binary",
        "--split-column", "split", "--conformers", "--pretrained", str(pretrained),
        "--out", str(tmp_path / "user"), "--workers", "1", "--max-epoch", "2",
        "--batch-size", "8", "--lr", "1e-3", "--cpu",
    ]  # fmt: skip
    logs = run_parallel(
        {"qm9": (qm9_train, tmp_path / "qm9.log"), "user": (user, tmp_path / "user.log")},
        env, REPO_ROOT,
    )
    text = logs["qm9"]
    assert "Removing encoder.embed_out.weight" in text  # pre-training head dropped
    assert "Copying encoder.proj_out.out_proj.weight" in text  # fine-tuning head filled
    assert re.search(r"Loaded checkpoint .*checkpoint_last\.pt", text)
    assert "--load-qm9: 2D/3D training-mode masking off" in text
    train = json_records(text, "train")
    losses = [float(r["train_loss"]) for r in train]
    assert len(losses) == 6 and losses[-1] < losses[0], losses
    assert all(r["train_mae_meV"] for r in train)
    valid = json_records(text, "valid")
    test = json_records(text, "test")
    assert len(valid) == 6 and len(test) == 6
    assert float(valid[-1]["valid_mae_meV"]) == float(valid[-1]["valid_loss"])
    best = min(float(r["valid_loss"]) for r in valid)

    # fairseq-validate on checkpoint_best reproduces the logged valid MAE (meV)
    validate = [
        str(VENV_BIN / "fairseq-validate"), "--user-dir", str(PLUGIN_DIR),
        "--path", str(tmp_path / "ft" / "checkpoint_best.pt"), "--task", "graph_prediction_qm9",
        "--data-path", str(qm9_lmdb), "--valid-subset", "valid,test", "--cpu",
        "--num-workers", "0", "--batch-size", "8", "--log-format", "json",
    ]  # fmt: skip
    out = run_parallel({"validate": (validate, tmp_path / "validate.log")}, env, tmp_path)
    (rec,) = json_records(out["validate"], "valid")
    assert abs(float(rec["valid_mae_meV"]) - best) <= 1e-3 * max(best, 1.0)
    (rec_test,) = json_records(out["validate"], "test")
    assert math.isfinite(float(rec_test["test_mae_meV"]))
    state = torch.load(tmp_path / "ft" / "checkpoint_best.pt", map_location="cpu",
                       weights_only=True)
    assert state["task_state"]["task_idx"] == 2 and state["task_state"]["target_std"] > 0

    # the one-command user pipeline: preprocess (conformers) -> fine-tune -> validate
    summary = json.loads((tmp_path / "user" / "summary.json").read_text())
    assert summary["target"] == "active" and summary["task_idx"] == 1
    assert summary["channels"] == "2d3d"  # auto with 3D data and a 3D checkpoint
    for split in ("valid", "test"):
        assert 0.0 <= float(summary[split][f"{split}_accuracy"]) <= 1.0
        for predictor in ("Transformer-M", "majority class", "RF on RDKit descriptors"):
            assert set(summary["scores"][predictor][split]) >= {"accuracy", "roc_auc", "pr_auc"}
    assert (tmp_path / "user" / "roc_test.png").read_bytes()[:4] == b"\x89PNG"
    assert "Removing encoder.embed_out.weight" in (tmp_path / "user" / "train.log").read_text()


# --- the paper recipe -----------------------------------------------------------------------------
def test_qm9_recipe_resolves_to_the_released_hyperparameters(tmp_path):
    import os
    import shlex

    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    recipe = REPO_ROOT / "scripts" / "recipes" / "qm9_finetune.sh"
    assert os.access(recipe, os.X_OK)
    env = subprocess_env(DRY_RUN="1", PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(recipe), "L12.pt", str(tmp_path / "lmdb"), "save"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = [shlex.split(x) for x in proc.stdout.splitlines() if x.strip()]
    assert lines[0][:2] == ["graphormer-ext-preprocess", "qm9pack"]  # LMDB missing: written
    train = lines[1]
    args = train[[os.path.basename(t) for t in train].index("transformer-m-train") + 1:]
    parsed = options.parse_args_and_arch(options.get_training_parser(),
                                         input_args=["--user-dir", str(PLUGIN_DIR), *args])
    cfg = convert_namespace_to_omegaconf(parsed)
    assert cfg.task._name == cfg.criterion._name == "graph_prediction_qm9"
    assert (cfg.task.task_idx, cfg.task.loss_type, cfg.task.std_type, cfg.task.readout_type) == (
        2, "L2", "std_logits", "cls")
    assert cfg.task.load_qm9 and cfg.model.remove_head and cfg.model.add_3d and cfg.model.no_2d
    assert cfg.model._name == "transformer_m_base" and cfg.model.encoder_layers == 12
    assert cfg.model.encoder_normalize_before and cfg.model.activation_fn == "gelu"
    assert cfg.checkpoint.finetune_from_model == "L12.pt"
    assert float(cfg.optimization.lr[0]) == 7e-5 and cfg.lr_scheduler.warmup_updates == 60000
    assert cfg.optimization.max_update == 600000 and cfg.dataset.batch_size == 128
    assert cfg.model.droppath_prob == 0.0 and not cfg.common.fp16
    assert cfg.dataset.valid_subset == "valid,test" and cfg.common.seed == 1


# --- registered names and config fields (public API) ----------------------------------------------
def test_registered_names_and_fields():
    from argparse import Namespace

    from fairseq.criterions import CRITERION_REGISTRY
    from fairseq.tasks import TASK_DATACLASS_REGISTRY, TASK_REGISTRY
    from fairseq.utils import import_user_module

    import_user_module(Namespace(user_dir=str(PLUGIN_DIR)))
    from transformer_m.criterions import GraphPredictionQM9Criterion
    from transformer_m.tasks import GraphPredictionQM9Config, GraphPredictionQM9Task

    assert TASK_REGISTRY["graph_prediction_qm9"] is GraphPredictionQM9Task
    assert TASK_DATACLASS_REGISTRY["graph_prediction_qm9"] is GraphPredictionQM9Config
    assert CRITERION_REGISTRY["graph_prediction_qm9"] is GraphPredictionQM9Criterion
    fields = {f.name: f.default for f in GraphPredictionQM9Config.__dataclass_fields__.values()}
    assert {k: fields[k] for k in ("task_idx", "loss_type", "std_type", "readout_type",
                                   "load_qm9", "dataset_name", "max_nodes")} == {
        "task_idx": 0, "loss_type": "L1", "std_type": "no_std", "readout_type": "cls",
        "load_qm9": False, "dataset_name": "qm9H", "max_nodes": 128}  # the release's defaults


def test_sdf_with_properties_and_a_missing_label(tmp_path):
    pytest.importorskip("rdkit")
    from rdkit import Chem
    from rdkit.Chem import AllChem

    from graphormer_ext import preprocess
    from transformer_m.criterions.graph_prediction_qm9 import GraphPredictionQM9Criterion

    writer = Chem.SDWriter(str(tmp_path / "m.sdf"))
    for i, smi in enumerate(USER_SMILES[:8]):
        mol = Chem.AddHs(Chem.MolFromSmiles(smi))
        AllChem.EmbedMolecule(mol, randomSeed=i)
        if i != 2:  # record 2 has no label
            mol.SetProp("energy", str(0.5 * mol.GetNumAtoms()))
        mol.SetProp("split", "train" if i < 6 else "valid")
        writer.write(mol)
    writer.close()
    assert preprocess.main(["sdf", "--path", str(tmp_path / "m.sdf"), "--label-properties",
                            "energy", "--split-property", "split", "--out",
                            str(tmp_path / "lmdb"), "--workers", "1", "--no-progress"]) == 0
    task = make_task(tmp_path / "lmdb", dataset_name="custom", std_type="std_logits")
    task.load_dataset("train")
    assert task.target_name == "energy" and task.report_unit is None
    batch = first_batch(task, "train")
    assert int(torch.isnan(batch["target"]).sum()) == 1
    assert np.abs(batch["net_input"]["batched_data"][keys.POS].numpy()).sum() > 0  # SDF 3D
    y = batch["target"]
    model = ConstModel(lambda b, t: torch.zeros(b, t, 1)).eval()
    _, n, log = GraphPredictionQM9Criterion(task)(model, batch)
    out = reduce(GraphPredictionQM9Criterion, [log])
    mean, _ = task.statistics()
    assert n == 5 and out["n_missing"] == 1
    assert out["mae"] == pytest.approx(float((y[torch.isfinite(y)] - mean).abs().mean()), rel=1e-5)
