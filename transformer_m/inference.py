"""Load Transformer-M checkpoints and predict on stored records, outside fairseq's CLIs.

Two kinds of checkpoint are supported:

* **Ours** (written by ``fairseq-train`` / ``transformer-m-train`` with this plugin):
  :func:`load_model` rebuilds task and model from the checkpoint's ``cfg``.
* **Released** (``L12.pt``, ``L18.pt``, ``L12-old.pt`` of lsj2408/Transformer-M, saved
  by an old fairseq fork): :func:`load_released_state_dict` reads ``ckpt["model"]`` and
  :func:`build_released_model` builds the matching :class:`TransformerMNet`. The
  released models were trained on the *legacy* ("atom 0") shortest-path edges:
  featurize their inputs with ``path_convention="legacy"``
  (``graphormer-ext-preprocess ... --path-convention legacy``).

Every checkpoint is read by :func:`transformer_m.checkpoint.load_checkpoint_file`
(``weights_only=True``): tensors, containers and primitives, plus the data-only classes of
its allow-list (``argparse.Namespace``: the legacy fairseq ``args`` the released files
hold), and nothing else. Opening a checkpoint never runs code from it.

:func:`predict` collates records with :class:`graphormer_ext.data.collator.Collator`
and returns the graph-token outputs. The model runs its 3D channel for a whole batch as
soon as any position in the batch is non-zero (released behaviour), so molecules with
and without positions are batched separately: a prediction never depends on its batch
neighbours.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch

import transformer_m  # noqa: F401  (registers task, criterion and model first)
from graphormer_ext.data import keys as K
from graphormer_ext.data.collator import Collator
from transformer_m.checkpoint import (
    CheckpointLoadError,
    fill_config_defaults,
    load_checkpoint_file,
)
from transformer_m.modules import TransformerMNet

logger = logging.getLogger(__name__)

__all__ = [
    "RELEASED_ARCHS",
    "CheckpointLoadError",
    "OutputSpec",
    "Predictor",
    "build_released_model",
    "has_3d_channel",
    "load_model",
    "load_predictor",
    "load_released_model",
    "load_released_state_dict",
    "model_max_hops",
    "predict",
    "record_mode",
]

# Hyperparameters of the released models (Transformer-M spec §2.1, §2.2).
# "transformer_m_base": L12.pt / L18.pt (PCQM4Mv2 pre-training).
# "transformer_m": L12-old.pt (arch of the QM9 fine-tuning script: Post-LN without
# embedding LayerNorm, ReLU, no BERT re-initialisation; same sizes).
RELEASED_ARCHS: dict[str, dict[str, Any]] = {
    "transformer_m_base": dict(
        embed_dim=768,
        ffn_embed_dim=768,
        num_heads=32,
        num_3d_bias_kernel=128,
        add_3d=True,
        activation_fn="gelu",
        encoder_normalize_before=True,
        apply_init=True,
    ),
    "transformer_m": dict(
        embed_dim=768,
        ffn_embed_dim=768,
        num_heads=32,
        num_3d_bias_kernel=128,
        add_3d=True,
        activation_fn="relu",
        encoder_normalize_before=False,
        apply_init=False,
    ),
}
_RELEASED_LAYERS = (12, 18)


def _torch_load(path: str | os.PathLike) -> Any:
    """The project's weights-only loader (:func:`transformer_m.checkpoint.load_checkpoint_file`)."""
    return load_checkpoint_file(path)


def load_model(
    checkpoint_path: str | os.PathLike,
    device: str | torch.device = "cpu",
    arg_overrides: Mapping[str, Any] | None = None,
):
    """Load one of our fairseq checkpoints (``checkpoint_best.pt``, ...) for inference.

    Task and model are rebuilt from the checkpoint's ``cfg`` (the training data need not
    exist) and the weights are loaded strictly. The model is returned in eval mode, in
    float32, on ``device``. :func:`load_predictor` also gives the predictions in label
    units.

    Args:
        checkpoint_path: a checkpoint written by ``fairseq-train`` with this plugin.
        device: where to put the model.
        arg_overrides: fairseq config fields to override by name (as
            ``checkpoint_utils.load_model_ensemble_and_task`` takes them).

    Returns:
        ``(model, cfg)``: the :class:`transformer_m.models.TransformerMModel` and the
        checkpoint's ``FairseqConfig`` (``cfg.model``, ``cfg.task``, ...).

    Raises:
        FileNotFoundError: no such file.
        CheckpointLoadError: the file does not load with ``weights_only=True``, or it
            has no ``cfg`` (a released checkpoint: use :func:`load_released_model`).
    """
    model, cfg, _task = _load_fairseq(checkpoint_path, device, arg_overrides)
    return model, cfg


def _load_fairseq(
    checkpoint_path: str | os.PathLike,
    device: str | torch.device = "cpu",
    arg_overrides: Mapping[str, Any] | None = None,
):
    """:func:`load_model`, plus the task.

    Returns:
        ``(model, cfg, task)``; the task holds the checkpoint's ``task_state`` (training
        statistics, data facts).
    """
    from fairseq import checkpoint_utils
    from fairseq.dataclass.utils import overwrite_args_by_name
    from omegaconf import OmegaConf

    path = os.fspath(checkpoint_path)
    state = _torch_load(path)  # a released file (no cfg) is rejected below
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointLoadError(
            f"{path} is not a fairseq checkpoint (no 'model' entry); pass a "
            "checkpoint_*.pt written by fairseq-train / transformer-m-train"
        )
    if state.get("cfg") is None:
        raise CheckpointLoadError(
            f"{path} has no fairseq 'cfg' (an old-style or released checkpoint); "
            "load a released Transformer-M checkpoint with load_released_model(path, "
            "layers=12|18) or `--released L12|L18`"
        )
    cfg = OmegaConf.create(state["cfg"], flags={"allow_objects": True})
    fill_config_defaults(cfg)  # fields added since the checkpoint was written
    if arg_overrides:
        overwrite_args_by_name(cfg, dict(arg_overrides))
    state["cfg"] = cfg
    state["args"] = None  # fairseq would prefer a legacy Namespace over cfg
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [path], state=state, strict=True
    )
    model = models[0].float().to(device).eval()
    return model, cfg, task


def load_released_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model state dict of a released checkpoint (``ckpt["model"]``).

    The released files were saved by the fairseq fork of lsj2408/Transformer-M; besides
    tensors they may hold an ``argparse.Namespace`` (``args``), on the loader's allow-list
    (``weights_only=True``).

    Args:
        path: ``L12.pt``, ``L18.pt`` or ``L12-old.pt``.

    Returns:
        ``{name: tensor}`` with the released names (``encoder.molecule_encoder.*``,
        ...), as stored (a checkpoint trained with ``--fp16`` holds float16).

    Raises:
        FileNotFoundError: no such file.
        CheckpointLoadError: not loadable with ``weights_only=True`` (the message lists
            the classes it references), or no ``model`` state dict inside.
    """
    ckpt = _torch_load(path)
    state = ckpt.get("model") if isinstance(ckpt, dict) else None
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        found = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointLoadError(
            f"{os.fspath(path)}: expected a dict with a 'model' state dict of tensors, "
            f"found {found}"
        )
    return dict(state)


def build_released_model(
    layers: int = 12,
    remove_head: bool = False,
    *,
    arch: str = "transformer_m_base",
    num_classes: int = 1,
    implementation: str = "fast",
) -> TransformerMNet:
    """A :class:`TransformerMNet` with the hyperparameters of a released checkpoint.

    ``transformer_m_base`` (``L12.pt``, ``L18.pt``): D 768, FFN 768, H 32, K 128, 3D
    channel, GELU, embedding LayerNorm, BERT initialisation. ``transformer_m``
    (``L12-old.pt``): the same sizes with ReLU, no embedding LayerNorm and no
    re-initialisation. Dropouts are the training ones (inactive in eval mode).

    Args:
        layers: 12 or 18.
        remove_head: fine-tuning head ``proj_out`` instead of the pre-training head.
        arch: ``"transformer_m_base"`` or ``"transformer_m"`` (:data:`RELEASED_ARCHS`).
        num_classes: outputs of ``proj_out`` (only with ``remove_head``).
        implementation: ``"fast"`` or ``"reference"`` (numerically equivalent).

    Returns:
        the model, in training mode, randomly initialised.

    Raises:
        ValueError: ``layers`` or ``arch`` is not one of the released ones.
    """
    if layers not in _RELEASED_LAYERS:
        raise ValueError(
            f"released models have {_RELEASED_LAYERS} layers, got {layers}"
        )
    if arch not in RELEASED_ARCHS:
        raise ValueError(f"arch must be one of {sorted(RELEASED_ARCHS)}, got {arch!r}")
    return TransformerMNet(
        num_layers=layers,
        dropout=0.0,
        attention_dropout=0.1,
        act_dropout=0.1,
        remove_head=remove_head,
        num_classes=num_classes,
        implementation=implementation,
        **RELEASED_ARCHS[arch],
    )


def load_released_model(
    path: str | os.PathLike,
    layers: int = 12,
    remove_head: bool = False,
    *,
    arch: str = "transformer_m_base",
    device: str | torch.device = "cpu",
    model: TransformerMNet | None = None,
) -> TransformerMNet:
    """Build the released architecture and load a released checkpoint into it strictly.

    With ``remove_head`` the state dict is first upgraded as the release does for
    fine-tuning (pre-training head keys dropped, missing ``proj_out`` keys taken from
    the fresh model).

    Args:
        path: the released ``.pt`` file.
        layers: 12 or 18 (ignored when ``model`` is given).
        remove_head: see :func:`build_released_model` (ignored with ``model``).
        arch: see :func:`build_released_model` (ignored when ``model`` is given).
        device: where to put the model.
        model: load into this :class:`TransformerMNet` instead of building one.

    Returns:
        the model in eval mode, float32, on ``device``.

    Raises:
        CheckpointLoadError: the file does not load safely, or its keys or shapes
            differ from the model's (missing / unexpected keys are listed).
    """
    state = load_released_state_dict(path)
    if model is None:
        model = build_released_model(layers, remove_head, arch=arch)
    if model.encoder.remove_head:
        model.upgrade_state_dict_named(state, "")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointLoadError(
            f"{os.fspath(path)} does not fit the model built for it (layers={layers}, "
            f"arch={arch}, remove_head={model.encoder.remove_head}): {exc}"
        ) from exc
    return model.float().to(device).eval()


def _molecule_encoder(model: torch.nn.Module):
    return getattr(getattr(model, "encoder", None), "molecule_encoder", None)


def model_max_hops(model: torch.nn.Module, default: int = 5) -> int:
    """Path hops the edge bias reads (``multi_hop_max_dist``), or ``default``."""
    bias = getattr(_molecule_encoder(model), "molecule_attn_bias", None)
    hops = getattr(bias, "multi_hop_max_dist", None)
    return int(hops) if hops is not None and hops > 0 else int(default)


def has_3d_channel(model: torch.nn.Module) -> bool:
    """Whether the model was built with the 3D channel (``--add-3d``)."""
    return getattr(_molecule_encoder(model), "molecule_3d_bias", None) is not None


def record_mode(
    record: Mapping[str, np.ndarray], model: torch.nn.Module | None = None
) -> str:
    """``"3D"`` if the record's positions reach the model's 3D channel, else ``"2D"``.

    The 3D channel runs only on non-zero positions (released convention), so a record
    without ``pos`` or with all-zero ``pos``, or a model without the 3D channel, is 2D.

    Args:
        record: a stored record.
        model: the model (``None``: assume it has the 3D channel).
    """
    pos = record.get(K.POS)
    if pos is None or not np.any(pos):
        return "2D"
    if model is not None and not has_3d_channel(model):
        return "2D"
    return "3D"


def _chunks(n: int, size: int) -> Iterable[range]:
    for start in range(0, n, size):
        yield range(start, min(start + size, n))


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    records: Sequence[Mapping[str, np.ndarray]],
    batch_size: int = 256,
    max_hops: int | None = None,
    *,
    device: str | torch.device | None = None,
    progress: bool = False,
    pad_multiple: int = 1,
    readout: str = "cls",
) -> np.ndarray:
    """Raw model outputs (graph token, or the ``readout``) for stored records, in order.

    Records are read in chunks of ``batch_size``; inside a chunk, records with non-zero
    positions and records without (or with all-zero) positions form separate batches,
    so each prediction is the one the model gives the molecule alone (up to float
    rounding). The model is put in eval mode.

    Args:
        model: a :class:`TransformerMModel` or :class:`TransformerMNet`.
        records: an indexable of stored records (dicts keyed by
            :mod:`graphormer_ext.data.keys`), e.g. an :class:`LMDBDataset` or
            ``featurize_record`` outputs; ``pos`` (Å) is optional per record.
        batch_size: molecules per forward pass.
        max_hops: path hops the collator keeps (default: the model's
            ``multi_hop_max_dist``).
        device: where batches go (default: the model's device).
        progress: show a tqdm bar over chunks.
        pad_multiple: pad the token count to this multiple (1: no extra padding).
        readout: ``cls`` (graph token), ``mean`` or ``sum`` over the atoms (the
            ``--readout-type`` of ``graph_prediction_qm9``).

    Returns:
        float32 ``[M, C]``, the model's scale (for label units use :class:`Predictor`,
        which applies the training standardisation); row ``i`` is ``records[i]``.
    """
    from transformer_m.tasks.graph_prediction_qm9 import readout as apply_readout

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model.eval()
    if device is None:
        device = next(model.parameters()).device
    hops = model_max_hops(model) if max_hops is None else int(max_hops)
    collators = {  # molecules without positions need no pos / node_type_edge arrays
        False: Collator(max_hops=hops, pad_multiple=pad_multiple, with_pos=False),
        True: Collator(max_hops=hops, pad_multiple=pad_multiple, with_pos=True),
    }
    n = len(records)
    chunks: Iterable[range] = _chunks(n, batch_size)
    if progress:
        from tqdm import tqdm

        chunks = tqdm(chunks, total=-(-n // batch_size), unit="batch", desc="predict")
    outputs: np.ndarray | None = None
    for chunk in chunks:
        groups: dict[bool, list] = {False: [], True: []}
        for i in chunk:
            rec = records[i]
            pos = rec.get(K.POS)
            groups[pos is not None and bool(np.any(pos))].append((i, rec))
        for with_3d, group in groups.items():
            if not group:
                continue
            batch = collators[with_3d](group)
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(batch)[0]  # [B, N+1, C]
            atoms = batch[K.X][:, :, 0].ne(K.PAD)  # [B, N] real atoms
            pred = apply_readout(logits.float(), atoms, readout).cpu().numpy()  # [B, C]
            if outputs is None:
                outputs = np.full((n, pred.shape[1]), np.nan, dtype=np.float32)
            outputs[batch[K.IDX].cpu().numpy()] = pred
    if outputs is None:
        return np.zeros((0, 1), dtype=np.float32)
    return outputs


# --- predictions in label units -----------------------------------------------------
def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in str(text)).strip("_")


@dataclass
class OutputSpec:
    """How a model's raw outputs become predictions in the label's units.

    Attributes:
        kind: ``regression``, ``binary`` (one logit) or ``multiclass`` (K logits).
        targets: one name per regression output (one for classification).
        units: the unit of each target (``None``: unknown).
        readout: ``cls``, ``mean`` or ``sum`` (see :func:`predict`).
        mean, std: label = raw × std + mean (the training standardisation; 0 and 1 without).
    """

    kind: str
    targets: list
    units: list = field(default_factory=list)
    readout: str = "cls"
    mean: float = 0.0
    std: float = 1.0

    def _label(self, i: int) -> str:
        unit = self.units[i] if i < len(self.units) else None
        name = _safe_name(self.targets[i])
        return f"{name}_{_safe_name(unit)}" if unit else name

    def columns(self, num_outputs: int) -> list[str]:
        """Names of the prediction columns for a model with ``num_outputs`` outputs."""
        if self.kind == "regression":
            return [self._label(i) if i < len(self.targets) else f"y{i}"
                    for i in range(num_outputs)]
        name = self._label(0)
        if self.kind == "binary":
            return [name, f"{name}_prob"]
        return [name, *(f"{name}_prob{k}" for k in range(num_outputs))]

    def convert(self, raw: np.ndarray) -> dict[str, np.ndarray]:
        """``{column: values}`` in label units from raw outputs ``[M, C]``.

        Regression: ``raw * std + mean``. Binary: the class (0/1, threshold 0.5) and
        P(class 1). Multiclass: the arg-max class and every class probability.
        """
        raw = np.asarray(raw, dtype=np.float64)
        cols = self.columns(raw.shape[1])
        if self.kind == "regression":
            values = raw * self.std + self.mean
            return {c: values[:, i] for i, c in enumerate(cols)}
        if self.kind == "binary":
            prob = 1.0 / (1.0 + np.exp(-raw[:, 0]))
            return {cols[0]: (raw[:, 0] > 0).astype(np.float64), cols[1]: prob}
        z = raw - raw.max(axis=1, keepdims=True)
        prob = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        out = {cols[0]: raw.argmax(axis=1).astype(np.float64)}
        out.update({c: prob[:, k] for k, c in enumerate(cols[1:])})
        return out


def output_spec(cfg: Any, task: Any) -> OutputSpec:
    """The :class:`OutputSpec` of a checkpoint from its config and task state.

    ``graph_prediction_qm9``: ``--loss-type`` decides the kind, ``--std-type`` the
    standardisation (``std_logits`` and ``std_labels`` both predict standardised values),
    ``--readout-type`` the readout; the target's name and unit come from the checkpoint's
    data facts. ``affinity_regression``: the criterion's ``--target-mean/--target-std``.
    ``graph_prediction``: the raw graph-token outputs, named after the stored targets.
    """
    facts = getattr(task, "data_facts", None) or {}
    names = list(facts.get("targets") or [])
    units = list(facts.get("units") or [None] * len(names))
    tcfg = cfg.task
    if hasattr(tcfg, "loss_type"):  # graph_prediction_qm9
        name, unit = str(task.target_name), getattr(task, "target_unit", None)
        kind = {"BCE": "binary", "CE": "multiclass"}.get(tcfg.loss_type, "regression")
        mean, std = task.statistics() if kind == "regression" else (0.0, 1.0)
        return OutputSpec(kind, [name], [unit], tcfg.readout_type, float(mean), float(std))
    crit = cfg.criterion
    if getattr(crit, "_name", None) == "affinity_regression":
        return OutputSpec("regression", names or ["affinity"], units,
                          mean=float(crit.target_mean), std=float(crit.target_std))
    return OutputSpec("regression", names or ["prediction"], units)


@dataclass
class Predictor:
    """A loaded model with what it needs to predict in label units.

    Attributes:
        model: the network (eval mode).
        spec: the :class:`OutputSpec`.
        facts: the data facts of its training data (:mod:`transformer_m.data_facts`;
            empty for checkpoints written before they were stored).
        channels: the input channels it was trained with (``modes``, ``needs_3d``, ...).
        uses_positions: whether positions reach the model: the task passes them and its
            3D channel was trained on them (an untrained 3D channel would add noise, so a
            model trained without positions predicts every molecule in 2D).
    """

    model: torch.nn.Module
    spec: OutputSpec
    facts: dict = field(default_factory=dict)
    channels: dict = field(default_factory=dict)
    uses_positions: bool = True

    def predict(
        self,
        records: Sequence[Mapping[str, np.ndarray]],
        batch_size: int = 64,
        *,
        device: str | torch.device | None = None,
        progress: bool = False,
    ) -> dict[str, np.ndarray]:
        """``{column: float64 [M]}`` in label units (see :meth:`OutputSpec.convert`)."""
        if not self.uses_positions:
            records = [{k: v for k, v in r.items() if k != K.POS} for r in records]
        raw = predict(self.model, records, batch_size=batch_size, device=device,
                      progress=progress, readout=self.spec.readout)
        if len(records) == 0:
            return {c: np.zeros(0) for c in self.spec.columns(1)}
        return self.spec.convert(raw)


RELEASED_SPEC = OutputSpec("regression", ["homolumogap"], ["eV"])
# L12/L18 were pre-trained on PCQM4Mv2 with 3D for every training molecule and the mode
# draw 0.2/0.2/0.6 (spec §2.1): every input mode is in distribution.
RELEASED_CHANNELS = {"2d": True, "3d": True, "modes": ["2D+3D", "2D", "3D"], "needs_3d": False}
RELEASED_FACTS = {"path_convention": "legacy", "max_hops": 5, "remove_hs": True}


def load_predictor(
    checkpoint_path: str | os.PathLike,
    device: str | torch.device = "cpu",
    *,
    released: Optional[tuple[int, str]] = None,
) -> Predictor:
    """Load a checkpoint for predictions in label units.

    Args:
        checkpoint_path: one of our fairseq checkpoints, or a released file.
        device: where to put the model.
        released: ``(layers, arch)`` of a released checkpoint (``L12.pt``: ``(12,
            "transformer_m_base")``); ``None`` for ours.

    Returns:
        the :class:`Predictor`.

    Raises:
        FileNotFoundError, CheckpointLoadError: see :func:`load_model`.
    """
    if released is not None:
        layers, arch = released
        model = load_released_model(checkpoint_path, layers, arch=arch, device=device)
        return Predictor(model, RELEASED_SPEC, dict(RELEASED_FACTS), dict(RELEASED_CHANNELS))
    model, cfg, task = _load_fairseq(checkpoint_path, device)
    facts = dict(getattr(task, "data_facts", None) or {})
    channels = task.trained_channels() if hasattr(task, "trained_channels") else None
    if channels is None:
        channels = {"2d": True, "3d": has_3d_channel(model), "modes": [], "needs_3d": False}
    uses = bool(getattr(task, "uses_positions", True)) and bool(channels.get("3d"))
    return Predictor(model, output_spec(cfg, task), facts, dict(channels), uses_positions=uses)
