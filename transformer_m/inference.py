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
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

import transformer_m  # noqa: F401  (registers task, criterion and model first)
from graphormer_ext.data import keys as K
from graphormer_ext.data.collator import Collator
from transformer_m.checkpoint import CheckpointLoadError, load_checkpoint_file
from transformer_m.modules import TransformerMNet

logger = logging.getLogger(__name__)

__all__ = [
    "RELEASED_ARCHS",
    "CheckpointLoadError",
    "build_released_model",
    "has_3d_channel",
    "load_model",
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
    float32, on ``device``.

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
    from fairseq import checkpoint_utils
    from fairseq.dataclass.utils import overwrite_args_by_name
    from omegaconf import OmegaConf

    path = os.fspath(checkpoint_path)
    state = _torch_load(path)  # a released file (no cfg) is rejected below
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointLoadError(
            f"{path} is not a fairseq checkpoint (no 'model' entry)"
        )
    if state.get("cfg") is None:
        raise CheckpointLoadError(
            f"{path} has no fairseq 'cfg' (an old-style or released checkpoint); "
            "load a released Transformer-M checkpoint with load_released_model(path, "
            "layers=12|18) or `--released L12|L18`"
        )
    cfg = OmegaConf.create(state["cfg"], flags={"allow_objects": True})
    if arg_overrides:
        overwrite_args_by_name(cfg, dict(arg_overrides))
    state["cfg"] = cfg
    state["args"] = None  # fairseq would prefer a legacy Namespace over cfg
    models, cfg, _task = checkpoint_utils.load_model_ensemble_and_task(
        [path], state=state, strict=True
    )
    model = models[0].float().to(device).eval()
    return model, cfg


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
) -> np.ndarray:
    """Graph-token predictions for stored records, in the order given.

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

    Returns:
        float32 ``[M, C]`` (eV for the PCQM4Mv2 gap); row ``i`` is ``records[i]``.
    """
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
            pred = logits[:, 0, :].float().cpu().numpy()  # [B, C] graph token
            if outputs is None:
                outputs = np.full((n, pred.shape[1]), np.nan, dtype=np.float32)
            outputs[batch[K.IDX].cpu().numpy()] = pred
    if outputs is None:
        return np.zeros((0, 1), dtype=np.float32)
    return outputs
