"""The one checkpoint loader of the project: weights only, an explicit allow-list, clear errors.

Every checkpoint the project opens goes through :func:`load_checkpoint_file`:

* our own CLIs and APIs (``transformer-m-predict --checkpoint``, ``finetune_user --pretrained``,
  ``gsrd --pretrained-encoder``, :mod:`transformer_m.inference`, the evaluation scripts);
* fairseq's own flags (``--restore-file``, the ``checkpoint_last.pt`` of ``--save-dir``,
  ``--finetune-from-model``, ``fairseq-validate --path``, ...): they all read files through
  ``fairseq.checkpoint_utils.load_checkpoint_to_cpu``, which :func:`install_fairseq_loader`
  (called when the plugin is imported) replaces by :func:`load_fairseq_checkpoint`. fairseq-fixed
  calls ``torch.load(f)`` without ``weights_only``: torch 2.13 defaults to weights-only, but the
  environment variable ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` silently turns that into full
  unpickling. Passing ``weights_only=True`` explicitly cannot be overridden that way.

The allow-list (:data:`SAFE_GLOBALS`) holds data-only classes: ``argparse.Namespace`` (the
``args`` of the released Transformer-M files and of old fairseq checkpoints), numpy scalars,
arrays and dtypes (fairseq's meter states), and omegaconf's containers and nodes (the ``cfg`` of
some fairseq versions). Unpickling them constructs objects and sets attributes; nothing in a file
can name a function to call. Anything else is refused before it is built.

Failures are :class:`CheckpointLoadError`, whose message is one line naming the file, what is
wrong and the fix. The class is also a ``SystemExit``: raised through a fairseq CLI, Python prints
just that line and exits with status 1 instead of a traceback; library callers catch it as the
``RuntimeError`` it also is.
"""
from __future__ import annotations

import argparse
import collections
import io
import os
import re
import typing
import warnings
from typing import Any, Iterable

import numpy as np
import torch

__all__ = [
    "SAFE_GLOBALS",
    "CHECKPOINT_DEFAULT",
    "CheckpointLoadError",
    "fill_config_defaults",
    "install_fairseq_loader",
    "load_checkpoint_file",
    "load_fairseq_checkpoint",
]

_ZIP_MAGIC = b"PK"
# torch.save(..., _use_new_zipfile_serialization=False) starts with the pickled magic number
# 0x1950a86a20f9469cfc6c (protocol 2, LONG1 of 10 bytes).
_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."


def _numpy_globals() -> list:
    """numpy scalar / array reconstruction and the common dtype classes (data only)."""
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray
    dtypes = (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16,
              np.uint32, np.uint64, np.float16, np.float32, np.float64, np.complex64,
              np.complex128)  # fmt: skip
    return [multiarray.scalar, multiarray._reconstruct, np.ndarray, np.dtype,
            *(type(np.dtype(t)) for t in dtypes)]  # fmt: skip


def _omegaconf_globals() -> list:
    """omegaconf containers as pickled by some fairseq versions (``cfg`` as a DictConfig)."""
    try:
        from omegaconf import DictConfig, ListConfig, base, nodes
    except ImportError:
        return []
    return [DictConfig, ListConfig, base.ContainerMetadata, base.Metadata, nodes.AnyNode,
            nodes.StringNode, nodes.IntegerNode, nodes.FloatNode, nodes.BooleanNode,
            nodes.BytesNode, nodes.PathNode, typing.Any, collections.defaultdict, dict, list,
            int, float, str, bool]  # fmt: skip


def _safe_globals() -> tuple:
    out = [argparse.Namespace, collections.OrderedDict, *_numpy_globals()]
    for obj in _omegaconf_globals():
        if obj not in out:
            out.append(obj)
    return tuple(out)


SAFE_GLOBALS: tuple = _safe_globals()


class CheckpointLoadError(RuntimeError, SystemExit):
    """A checkpoint cannot be read safely (or does not fit): a one-line message with the fix.

    Both a ``RuntimeError`` (library callers catch it as usual) and a ``SystemExit`` (uncaught
    in a CLI, Python prints only the message and exits with status 1).
    """

    def __init__(self, message: str):
        RuntimeError.__init__(self, message)
        self.code = f"error: {message}"  # what the interpreter prints when uncaught


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def _head(path: str, n: int = 16) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(n)
    except OSError:
        return b""


def _unsafe_names(path: str, exc: BaseException, allowed: Iterable[Any]) -> list[str]:
    """The classes/functions a refused file references that the allow-list lacks."""
    names: list[str] = []
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # legacy (non-zip) file: read the unpickler's message instead
        names = re.findall(r"GLOBAL ([\w.]+)", str(exc))
        names = [n if "." in n else f"builtins.{n}" for n in names]
    ok = {_qualname(g) for g in allowed}
    ok |= {n.replace("numpy.core.", "numpy._core.") for n in ok}
    return sorted({n.rstrip(".") for n in names} - ok)


def _describe_failure(path: str, exc: BaseException, allowed: Iterable[Any]) -> str:
    """What is wrong with ``path`` and how to fix it, in one sentence or two."""
    head = _head(path)
    size = os.path.getsize(path)
    if size == 0:
        return "the file is empty (0 bytes): an interrupted save or copy; replace it"
    unsafe = _unsafe_names(path, exc, allowed)
    if unsafe:
        return (
            f"it references Python objects outside the allow-list ({', '.join(unsafe)}), so "
            "loading it could run code; it was refused. Only tensors, containers, primitives, "
            "argparse.Namespace, numpy and omegaconf data are read. If you trust its origin, "
            "load it once with torch.load's weights-only mode switched off and re-save only "
            "the weights: "
            "torch.save({'model': ckpt['model']}, 'clean.pt')"
        )
    if head.startswith(_ZIP_MAGIC):
        reason = str(exc).split(". This is an internal", 1)[0].strip()
        return (
            f"the file is truncated or corrupt ({reason}; {size:,} bytes), e.g. a save or "
            "copy that was cut short. Delete or replace it; to resume training from another "
            "checkpoint pass --restore-file FILE, to start over remove it from --save-dir"
        )
    if head.startswith(_LEGACY_MAGIC):
        return (
            f"the legacy torch file cannot be read weights-only ({type(exc).__name__}: "
            f"{_first_line(exc)}); re-save it with a current torch.save"
        )
    if head[:1] == b"\x80":  # pickle PROTO opcode, but not torch's format
        return (
            "it is a plain pickle (pickle.dump), not a torch.save checkpoint; a pickle "
            "cannot be read without running code from it. In a session you trust, load it "
            "and re-save it with torch.save(obj, 'model.pt')"
        )
    return (
        "it is not a torch checkpoint (neither a torch.save zip archive nor a legacy torch "
        f"file; it starts with {head[:8]!r}); pass the .pt file written by fairseq-train or "
        "torch.save"
    )


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for line in lines:
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].strip() or lines[-1]
    return lines[0] if lines else type(exc).__name__


def load_checkpoint_file(
    path: str | os.PathLike | io.IOBase,
    *,
    what: str = "checkpoint",
    extra_safe_globals: Iterable[Any] = (),
) -> Any:
    """``torch.load`` on CPU with ``weights_only=True`` and the project's allow-list.

    Args:
        path: the file (or an open binary file with a ``name``).
        what: how the file is named in messages, e.g. ``"--pretrained-encoder"``.
        extra_safe_globals: more data-only classes to allow for this call.

    Returns:
        the unpickled object (for a checkpoint: a dict).

    Raises:
        FileNotFoundError: no such file.
        CheckpointLoadError: the file is empty, truncated, a plain pickle, not a torch file,
            or references a class or function outside the allow-list (nothing from it ran).
    """
    name = str(getattr(path, "name", "<file object>")) if isinstance(path, io.IOBase) else (
        os.fspath(path))
    if not isinstance(path, io.IOBase) and not os.path.isfile(name):
        raise FileNotFoundError(f"{what} {name} does not exist")
    allowed = [*SAFE_GLOBALS, *extra_safe_globals]
    try:
        with torch.serialization.safe_globals(allowed), warnings.catch_warnings():
            # legacy files: "Detected pickle protocol 4 ..." (the check that follows decides)
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError (zip), EOFError, KeyError, ...
        if not os.path.isfile(name):
            raise CheckpointLoadError(f"cannot load {what} {name}: {_first_line(exc)}") from exc
        raise CheckpointLoadError(
            f"cannot load {what} {name}: {_describe_failure(name, exc, allowed)}"
        ) from exc


CHECKPOINT_DEFAULT = "checkpoint_default"  # dataclass field metadata key, see fill_config_defaults


def fill_config_defaults(cfg) -> list[str]:
    """Add the fields a checkpoint's ``cfg.model`` / ``cfg.task`` lack, with today's defaults.

    A checkpoint written before a config field existed (``--torch-compile``, ``--no-3d-input``,
    ...) would otherwise fail to build: for the architecture names (``transformer_m_small``)
    fairseq calls only the preset function, which does not merge the dataclass defaults. Only
    missing keys are added; nothing the checkpoint says is changed. A field whose metadata has
    ``CHECKPOINT_DEFAULT`` gets that value instead of its default: the behaviour the model had
    before the field existed (e.g. GeoMFormer's ``gbf_std_offset``, 1e-5 before it became 0.1).

    Args:
        cfg: the checkpoint's config (an OmegaConf ``DictConfig``), modified in place.

    Returns:
        the added ``section.field`` names.
    """
    import dataclasses

    from fairseq.models import ARCH_MODEL_NAME_REGISTRY, MODEL_DATACLASS_REGISTRY
    from fairseq.tasks import TASK_DATACLASS_REGISTRY
    from omegaconf import open_dict

    added = []
    for section, registry, aliases in (("model", MODEL_DATACLASS_REGISTRY, ARCH_MODEL_NAME_REGISTRY),
                                       ("task", TASK_DATACLASS_REGISTRY, {})):
        sub = cfg.get(section) if hasattr(cfg, "get") else None
        name = sub.get("_name") if sub is not None else None
        dc = registry.get(aliases.get(name, name)) if name else None
        if dc is None:
            continue
        with open_dict(sub):
            for f in dataclasses.fields(dc):
                if f.name in sub or f.default is dataclasses.MISSING:
                    continue
                if isinstance(f.default, str) and f.default.startswith("${"):
                    continue  # an interpolation (II(...)): resolved by fairseq where it applies
                # a field whose default changed the model's computation names the value that
                # reproduces the checkpoints written before it existed
                value = f.metadata.get(CHECKPOINT_DEFAULT, f.default)
                sub[f.name] = value.value if hasattr(value, "value") else value
                added.append(f"{section}.{f.name}")
    return added


def load_fairseq_checkpoint(path, arg_overrides=None, load_on_all_ranks=False):
    """``fairseq.checkpoint_utils.load_checkpoint_to_cpu`` through :func:`load_checkpoint_file`.

    The same contract as fairseq's function (local copy of remote paths, ``arg_overrides`` on
    ``args`` and ``cfg``, ``cfg`` as an OmegaConf object, the fairseq state upgrade); the
    unpickling differs, and config fields added since the checkpoint was written get their
    defaults (:func:`fill_config_defaults`).

    Args:
        path: the checkpoint (local or a fairseq ``PathManager`` path).
        arg_overrides: config fields to override by name.
        load_on_all_ranks: every rank reads the file (then a barrier refreshes remote copies).

    Returns:
        the checkpoint dict, upgraded like fairseq's.
    """
    from fairseq import checkpoint_utils
    from fairseq.dataclass.utils import overwrite_args_by_name
    from fairseq.file_io import PathManager
    from omegaconf import OmegaConf

    local_path = PathManager.get_local_path(path)
    if local_path != path and PathManager.path_requires_pathmanager(path):
        # a cached copy of a remote file may be stale (checkpoint_last.pt is rewritten)
        try:
            os.remove(local_path)
        except FileNotFoundError:
            pass
        if load_on_all_ranks:
            torch.distributed.barrier()
        local_path = PathManager.get_local_path(path)
    state = load_checkpoint_file(local_path)
    if not isinstance(state, dict):
        raise CheckpointLoadError(
            f"cannot load checkpoint {local_path}: it holds a {type(state).__name__}, not a "
            "fairseq checkpoint dict; pass a file written by fairseq-train"
        )
    if state.get("args") is not None and arg_overrides is not None:
        for name, value in arg_overrides.items():
            setattr(state["args"], name, value)
    if state.get("cfg") is not None:
        state["cfg"] = OmegaConf.create(state["cfg"], flags={"allow_objects": True})
        fill_config_defaults(state["cfg"])
        if arg_overrides is not None:
            overwrite_args_by_name(state["cfg"], arg_overrides)
    return checkpoint_utils._upgrade_state_dict(state)


def install_fairseq_loader() -> None:
    """Route fairseq's checkpoint reads through :func:`load_fairseq_checkpoint` (idempotent).

    fairseq reads every checkpoint flag through ``checkpoint_utils.load_checkpoint_to_cpu``,
    looked up on the module at call time (the trainer, ``load_model_ensemble_and_task``,
    ``load_pretrained_component_from_model``), so replacing the module attribute covers them.
    It must happen at plugin import: ``fairseq-validate`` opens the checkpoint before any task
    exists.
    """
    try:
        from fairseq import checkpoint_utils
    except ImportError:  # graphormer_ext-only installs: nothing to protect
        return
    if checkpoint_utils.load_checkpoint_to_cpu is not load_fairseq_checkpoint:
        checkpoint_utils.load_checkpoint_to_cpu = load_fairseq_checkpoint
