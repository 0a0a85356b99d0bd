"""PDBbind fine-tuning: criterion ``affinity_regression`` (R, MAE, RMSE, SD from summed
statistics), the recipe, and a tiny end-to-end run through fairseq's CLIs.

End to end, on a fake PDBbind v2016 tree (``tests/graphormer_ext/pdbbind_testutils.py``):
``graphormer-ext-preprocess pdbbind`` -> a 1-epoch "pre-training" (``graph_prediction``) ->
fine-tuning with ``--finetune-from-model --remove-head`` (valid and core-set test metrics
each epoch) -> ``fairseq-validate`` on the test split and ``scripts/evaluate/
pdbbind_metrics.py`` (per-complex predictions, NumPy metrics), which must agree.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
from suite_env import subprocess_env

pytest.importorskip("fairseq")
pytest.importorskip("rdkit")
torch = pytest.importorskip("torch")

REPO_ROOT = Path(__file__).resolve().parents[2]
PLUGIN_DIR = REPO_ROOT / "transformer_m"
VENV_BIN = Path(sys.executable).parent
RECIPE = REPO_ROOT / "scripts" / "recipes" / "pdbbind_finetune.sh"
EVAL_SCRIPT = REPO_ROOT / "scripts" / "evaluate" / "pdbbind_metrics.py"
TIMEOUT = 300
METRICS = ("pearson_r", "mae", "rmse", "sd")
TINY_MODEL = [
    "--arch", "transformer_m_small", "--encoder-layers", "2", "--encoder-embed-dim", "16",
    "--encoder-ffn-embed-dim", "16", "--encoder-attention-heads", "4",
    "--num-3d-bias-kernel", "8", "--add-3d",
]  # fmt: skip
COMMON = ["--user-dir", str(PLUGIN_DIR), "--task", "graph_prediction", "--dataset-name",
          "custom", "--num-classes", "1", "--cpu", "--num-workers", "0", "--seed", "1",
          "--log-format", "json", "--log-interval", "1", "--no-progress-bar",
          "--batch-size", "8"]  # fmt: skip
FT_EPOCHS = 3


def _testutils():
    path = REPO_ROOT / "tests" / "graphormer_ext" / "pdbbind_testutils.py"
    spec = importlib.util.spec_from_file_location("pdbbind_testutils", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("pdbbind_testutils", module)
    spec.loader.exec_module(module)
    return module


def json_records(text: str, kind: str) -> list[dict]:
    pattern = re.compile(r"\| " + re.escape(kind) + r" \| (\{.*\})\s*$")
    return [json.loads(m.group(1)) for m in map(pattern.search, text.splitlines()) if m]


def run_all(jobs: dict[str, list[str]], env: dict, cwd: Path) -> dict[str, str]:
    """Run commands side by side; ``{name: combined output}``, failing with the tail."""
    procs = {}
    for name, argv in jobs.items():
        log = open(cwd / f"{name}.log", "w")
        procs[name] = (subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                        cwd=cwd), log)  # fmt: skip
    out = {}
    try:
        for name, (proc, log) in procs.items():
            proc.wait(timeout=TIMEOUT)
            log.close()
            out[name] = (cwd / f"{name}.log").read_text()
            assert proc.returncode == 0, f"{name} failed:\n{out[name][-4000:]}"
    finally:
        for proc, log in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    return out


@pytest.fixture(scope="module")
def plugin():
    from fairseq.utils import import_user_module

    import_user_module(Namespace(user_dir=str(PLUGIN_DIR)))
    import transformer_m

    return transformer_m


# --- registry and config -----------------------------------------------------------------------
def test_criterion_registered_and_configurable(plugin):
    from fairseq import options
    from fairseq.criterions import CRITERION_REGISTRY
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    from transformer_m.criterions import AffinityRegressionCriterion

    assert CRITERION_REGISTRY["affinity_regression"] is AffinityRegressionCriterion
    args = options.parse_args_and_arch(options.get_training_parser(), input_args=[
        "--user-dir", str(PLUGIN_DIR), "--task", "graph_prediction", "--data-path", "X",
        "--criterion", "affinity_regression", "--arch", "transformer_m_small",
        "--target-mean", "6.5", "--target-std", "2.0", "--loss-fn", "l1",
    ])  # fmt: skip
    c = convert_namespace_to_omegaconf(args).criterion
    assert (c._name, c.target_mean, c.target_std, str(c.loss_fn)) == (
        "affinity_regression",
        6.5,
        2.0,
        "l1",
    )


class _StubModel(torch.nn.Module):
    """Returns fixed graph-token outputs (standardized scale) as Transformer-M's logits."""

    def __init__(self, z):
        super().__init__()
        self.z = torch.as_tensor(z, dtype=torch.float32)

    def forward(self, batched_data):
        logits = torch.zeros(len(self.z), 3, 1)  # [B, N+1, 1]
        logits[:, 0, 0] = self.z
        return logits, None, None


def test_criterion_loss_and_metrics_match_numpy(plugin):
    from fairseq.logging import metrics

    from graphormer_ext.metrics import affinity_metrics
    from transformer_m.criterions import AffinityRegressionCriterion

    crit = AffinityRegressionCriterion(None, target_mean=6.0, target_std=2.0, loss_fn="mse")
    rng = np.random.default_rng(1)
    y = rng.normal(6.0, 2.0, size=23)
    z = rng.normal(0.0, 1.0, size=23)
    y_nan = y.copy()
    y_nan[[3, 17]] = np.nan  # hidden labels are left out
    logs = []
    for a, b in ((0, 8), (8, 16), (16, 23)):
        sample = {
            "net_input": {"batched_data": {}},
            "target": torch.tensor(y_nan[a:b, None], dtype=torch.float32),
        }
        loss, size, log = crit(_StubModel(z[a:b]), sample)
        keep = np.isfinite(y_nan[a:b])
        ref = (((y[a:b] - 6.0) / 2.0 - z[a:b]) ** 2)[keep].sum()
        assert float(loss) == pytest.approx(ref, rel=1e-5) and size == keep.sum()
        logs.append(log)
    # new_root: fairseq's aggregators are process-global; other tests' criteria log the
    # same names (e.g. a derived 'mae'), which a real run, with one criterion, never mixes.
    with metrics.aggregate(new_root=True) as agg:
        AffinityRegressionCriterion.reduce_metrics(logs)
        values = agg.get_smoothed_values()
    keep = np.isfinite(y_nan)
    ref = affinity_metrics(y[keep], (z * 2.0 + 6.0)[keep])
    for name in METRICS:
        assert values[name] == pytest.approx(ref[name], abs=2e-5), name
    assert not any(k.startswith("_") for k in values)


# --- recipe ------------------------------------------------------------------------------------
def test_recipe_header_and_resolved_command(plugin, tmp_path):
    import os

    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    text = RECIPE.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "\nset -euo pipefail\n" in text
    assert os.access(RECIPE, os.X_OK) and "/home" not in text
    header = text.split("set -euo pipefail")[0]
    for fact in ("PDBbind v2016", "285", "GPU", "Time", "Target", "0.83", "UNVERIFIED"):
        assert fact in header, fact
    assert subprocess.run(["bash", "-n", str(RECIPE)]).returncode == 0
    env = subprocess_env(DRY_RUN="1", PYTHON=sys.executable)
    proc = subprocess.run(
        ["bash", str(RECIPE), "root", str(tmp_path / "lmdb"), "pre.pt", str(tmp_path / "s")],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = [line.split() for line in proc.stdout.splitlines()]
    pre = next(cmd for cmd in lines if cmd[0] == "graphormer-ext-preprocess")
    from graphormer_ext.preprocess import build_parser

    pre_args = build_parser().parse_args(pre[1:])
    assert (pre_args.command, pre_args.cutoff, pre_args.max_atoms) == ("pdbbind", 5.0, 512)
    import shlex

    train = shlex.split(proc.stdout.splitlines()[-1])
    assert os.path.basename(train[0]) == "transformer-m-train"
    args = options.parse_args_and_arch(
        options.get_training_parser(), input_args=["--user-dir", str(PLUGIN_DIR), *train[1:]]
    )
    cfg = convert_namespace_to_omegaconf(args)
    assert cfg.criterion._name == "affinity_regression" and cfg.model.remove_head
    assert cfg.model._name == "transformer_m_base" and cfg.model.add_3d
    assert cfg.checkpoint.finetune_from_model == "pre.pt"
    assert cfg.checkpoint.best_checkpoint_metric == "pearson_r"
    assert cfg.checkpoint.maximize_best_checkpoint_metric
    assert cfg.dataset.valid_subset == "valid,test" and cfg.task.max_nodes == 512
    assert not (tmp_path / "s").exists(), "DRY_RUN must not write anything"


# --- end to end --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pdbbind_runs(tmp_path_factory, e2e_env):
    """Preprocess, pre-train 1 epoch, fine-tune, then validate + evaluate (side by side)."""
    from graphormer_ext.preprocess import main as preprocess

    tmp = tmp_path_factory.mktemp("pdbbind_e2e")
    fake = _testutils().write_fake_pdbbind(tmp / "raw")
    data = tmp / "lmdb"
    assert preprocess(["pdbbind", "--root", str(fake.root), "--out", str(data),
                       "--valid-size", "5", "--workers", "1", "--no-progress"]) == 0  # fmt: skip
    env = dict(e2e_env, TMPDIR=str(tmp))
    train = str(VENV_BIN / "fairseq-train")
    pre = [train, *COMMON, *TINY_MODEL, "--data-path", str(data), "--criterion",
           "graph_prediction", "--optimizer", "adam", "--lr", "1e-3", "--max-epoch", "1",
           "--save-dir", str(tmp / "pre"), "--valid-subset", "valid"]  # fmt: skip
    run_all({"pretrain": pre}, env, tmp)
    ft = [train, *COMMON, *TINY_MODEL, "--data-path", str(data),
          "--criterion", "affinity_regression", "--target-mean", "6.4", "--target-std", "0.6",
          "--remove-head", "--finetune-from-model", str(tmp / "pre" / "checkpoint_last.pt"),
          "--optimizer", "adam", "--lr", "1e-3", "--max-epoch", str(FT_EPOCHS),
          "--valid-subset", "valid,test", "--best-checkpoint-metric", "pearson_r",
          "--maximize-best-checkpoint-metric", "--save-dir", str(tmp / "ft")]  # fmt: skip
    logs = run_all({"finetune": ft}, env, tmp)
    ckpt = str(tmp / "ft" / "checkpoint_last.pt")
    validate = [str(VENV_BIN / "fairseq-validate"), "--user-dir", str(PLUGIN_DIR), "--path",
                ckpt, "--task", "graph_prediction", "--data-path", str(data),
                "--valid-subset", "test", "--cpu", "--num-workers", "0", "--batch-size", "8",
                "--log-format", "json"]  # fmt: skip
    evaluate = [sys.executable, str(EVAL_SCRIPT), "--checkpoint", ckpt, "--data-path",
                str(data), "--split", "test", "--out", str(tmp / "eval"), "--device", "cpu",
                "--batch-size", "3"]  # fmt: skip
    logs.update(run_all({"validate": validate, "evaluate": evaluate}, env, tmp))
    return fake, tmp, logs


def test_finetune_logs_r_mae_rmse_sd_on_valid_and_test(pdbbind_runs):
    fake, tmp, logs = pdbbind_runs
    text = logs["finetune"]
    assert "loading pretrained model from" in text and "Removing" in text
    for subset in ("valid", "test"):
        records = json_records(text, subset)
        assert len(records) == FT_EPOCHS, subset
        for r in records:
            for name in METRICS:
                assert math.isfinite(float(r[f"{subset}_{name}"])), (subset, name)
    assert "valid_best_pearson_r" in json_records(text, "valid")[-1]
    assert (tmp / "ft" / "checkpoint_best.pt").is_file()


PRED_ATOL = 1e-4  # per-complex predictions (-logKd/Ki ~ 6) of two float32 forward passes
LOG_ROUND = 1e-5  # fairseq logs derived metrics rounded to 5 decimals


def metric_tolerances(y, p, eps: float) -> dict:
    """How far each metric can move when every prediction moves by at most ``eps``.

    MAE and RMSE move by at most ``eps``. Pearson R is the cosine of the angle between the
    centred vectors, so it moves by at most the angle the centred perturbation (norm
    <= ``sqrt(n) eps``) can turn ``p - mean(p)``: about ``sqrt(n) eps / ||p - mean(p)||``,
    large when the predictions barely vary (an almost untrained model). SD of the fit of
    ``y`` on ``p`` is ``||y - mean(y)|| sqrt(1 - R^2) / sqrt(n - 1)``: its bound follows
    from R's.
    """
    y, p = np.asarray(y, np.float64), np.asarray(p, np.float64)
    n = y.size
    spread = float(np.linalg.norm(p - p.mean()))
    r_tol = min(2.0, 2.0 * math.sqrt(n) * eps / spread) if spread > 0 else 2.0
    r = float(np.corrcoef(y, p)[0, 1])
    scale = float(np.linalg.norm(y - y.mean())) / math.sqrt(n - 1)
    candidates = [min(1.0, max(-1.0, r + d)) for d in (-r_tol, r_tol)]
    if abs(r) <= r_tol:
        candidates.append(0.0)  # sqrt(1 - R^2) is largest at R = 0
    sd_tol = scale * max(abs(math.sqrt(1 - c * c) - math.sqrt(1 - r * r)) for c in candidates)
    return {"mae": eps, "rmse": eps, "pearson_r": r_tol, "sd": sd_tol}


def test_metric_tolerances_bound_the_change():
    rng = np.random.default_rng(0)
    y = rng.normal(6.0, 1.5, size=40)
    for spread in (1.0, 1e-3):  # trained, almost untrained
        p = 6.0 + spread * (0.3 * (y - 6.0) + rng.normal(size=40))
        tol = metric_tolerances(y, p, 1e-4)
        for seed in range(20):
            q = p + np.random.default_rng(seed).uniform(-1e-4, 1e-4, size=40)
            a, b = affinity_metrics_np(y, p), affinity_metrics_np(y, q)
            for name in METRICS:
                assert abs(a[name] - b[name]) <= tol[name], (spread, name)
    assert metric_tolerances(y, 6.0 + 1e-3 * y, 1e-4)["pearson_r"] > 1e-3  # ill-conditioned


def affinity_metrics_np(y, p):
    from graphormer_ext.metrics import affinity_metrics

    return affinity_metrics(y, p)


def fairseq_path_predictions(ckpt: Path, data: Path, split: str, batch_size: int) -> np.ndarray:
    """Per-complex predictions (-logKd/Ki, LMDB order) as fairseq-validate computes them: the
    task's dataset and collater, the model's graph token, the criterion's mean/std."""
    from fairseq import tasks

    from transformer_m.inference import load_model

    model, cfg = load_model(ckpt, arg_overrides={"data_path": str(data)})
    task = tasks.setup_task(cfg.task)
    task.load_dataset(split)
    ds = task.dataset(split)
    out = np.full(len(ds), np.nan)
    with torch.no_grad():
        for start in range(0, len(ds), batch_size):
            sample = ds.collater([ds[i] for i in range(start, min(start + batch_size, len(ds)))])
            logits = model(sample["net_input"]["batched_data"])[0][:, 0, 0].double()
            out[sample["id"].numpy()] = logits.numpy()
    return out * cfg.criterion.target_std + cfg.criterion.target_mean


def test_validate_and_evaluation_script_agree(pdbbind_runs):
    """Compare what is well conditioned: the per-complex predictions of the evaluation script
    and of fairseq's validation path, then the metrics computed from them. fairseq's logged
    metrics (fairseq-validate, and the last epoch of training) may differ from those by no
    more than the predictions' tolerance allows (R of an almost untrained model's nearly
    constant predictions moves a lot for tiny prediction changes, e.g. across machines)."""
    fake, tmp, logs = pdbbind_runs
    result = json.loads(logs["evaluate"].strip().splitlines()[-1])
    assert result["n"] == len(fake.core) and result["skipped_at_preprocessing"] == 1
    rows = (tmp / "eval" / "test_predictions.csv").read_text().splitlines()
    assert rows[0] == "code,idx,y_true,y_pred" and len(rows) == 1 + len(fake.core)
    cells = [row.split(",") for row in rows[1:]]
    for code, _, y_true, _ in cells:
        assert code in fake.core and float(y_true) == pytest.approx(fake.labels[code])
    y = np.array([float(c[2]) for c in cells])
    p_script = np.array([float(c[3]) for c in cells])

    p_fairseq = fairseq_path_predictions(tmp / "ft" / "checkpoint_last.pt", tmp / "lmdb", "test", 8)
    np.testing.assert_allclose(p_script, p_fairseq, rtol=0, atol=PRED_ATOL)

    ref = affinity_metrics_np(y, p_script)  # the CSV holds the predictions exactly
    for name in METRICS:
        assert result[name] == pytest.approx(ref[name], rel=1e-12, abs=1e-12), name

    # fairseq-validate and the training log's last epoch: the same code path on the same
    # checkpoint, batches and machine (equal up to the logged rounding); against the script's
    # metrics, as far as the predictions' tolerance allows (in this tiny run the predictions
    # barely vary, so R's tolerance is wide: the predictions above are the strict check)
    tol = metric_tolerances(y, p_script, PRED_ATOL)
    (validated,) = json_records(logs["validate"], "test")
    logged = json_records(logs["finetune"], "test")[-1]  # checkpoint_last = last epoch
    for name in METRICS:
        value = float(validated[f"test_{name}"])
        assert value == pytest.approx(float(logged[f"test_{name}"]), abs=LOG_ROUND), name
        assert abs(value - ref[name]) <= tol[name] + LOG_ROUND, (name, value, ref, tol)
