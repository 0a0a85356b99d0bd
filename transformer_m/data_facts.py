"""The data facts a trained model depends on: stored in its checkpoint, checked against data.

A Transformer-M reads stored features as they were at training time. Splits built with another
``--path-convention`` (the released "atom 0" paths vs Graphormer's corrected ones), another
``--max-hops``, another featurizer version or with/without hydrogens give the same tensor shapes
and silently different inputs. The tasks therefore record these facts from the first split they
load, refuse a later split that differs, write them into every checkpoint (``task_state["data"]``)
and check the data of ``fairseq-validate`` / ``transformer-m-predict`` against them. An explicit
``--allow-data-mismatch`` turns the refusal into a warning.

The LMDB ``schema_version`` is recorded but not compared: it versions the container (the reader
refuses what it cannot read), while ``featurizer_version`` versions what the model sees.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping, Optional, Sequence

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKED_FACTS",
    "DataMismatchError",
    "check_facts",
    "mismatches",
    "split_facts",
    "trained_channels",
]

CHECKED_FACTS = ("path_convention", "max_hops", "featurizer_version", "remove_hs")
OVERRIDE_FLAG = "--allow-data-mismatch"
MODES = ("2D+3D", "2D", "3D")  # the encoder's mode_choice 0, 1, 2


class DataMismatchError(ValueError, SystemExit):
    """Data disagree with the model's (or another split's) data facts: one line with the fix.

    Also a ``SystemExit`` (see :class:`transformer_m.checkpoint.CheckpointLoadError`): uncaught
    in fairseq's CLIs it prints one line instead of a traceback.
    """

    def __init__(self, message: str):
        ValueError.__init__(self, message)
        self.code = f"error: {message}"


def split_facts(meta: Mapping[str, Any], model_hops: int) -> dict:
    """The facts of one LMDB split as the model sees them.

    Args:
        meta: the split's ``__meta__`` record.
        model_hops: ``--multi-hop-max-dist``; the collator keeps ``min(stored, model)`` hops.

    Returns:
        ``{"path_convention", "max_hops", "featurizer_version", "remove_hs", "schema_version",
        "source", "targets", "units"}`` (``None`` where the meta does not say).
    """
    stored = meta.get("max_hops")
    hops = min(int(stored), int(model_hops)) if stored else int(model_hops)
    source = meta.get("source") or {}
    desc = source.get("describe") or {}
    targets = desc.get("targets") or []
    names = [t.get("name") if isinstance(t, dict) else str(t) for t in targets]
    units = [t.get("unit") if isinstance(t, dict) else None for t in targets]
    listed = desc.get("units")
    if isinstance(listed, (list, tuple)) and len(listed) == len(names):
        units = list(listed)
    return {
        "path_convention": meta.get("path_convention"),
        "max_hops": hops,
        "featurizer_version": meta.get("featurizer_version"),
        "remove_hs": meta.get("remove_hs"),
        "schema_version": meta.get("schema_version"),
        "source": source.get("name"),
        "targets": names or None,
        "units": units or None,
    }


def mismatches(expected: Mapping[str, Any], found: Mapping[str, Any]) -> list[str]:
    """``"name: expected vs found"`` for every checked fact known on both sides and different."""
    out = []
    for name in CHECKED_FACTS:
        a, b = expected.get(name), found.get(name)
        if a is not None and b is not None and a != b:
            out.append(f"{name} {a!r} vs {b!r}")
    return out


def check_facts(
    expected: Mapping[str, Any],
    found: Mapping[str, Any],
    *,
    expected_from: str,
    found_from: str,
    allow: bool,
    fix: Optional[str] = None,
) -> list[str]:
    """Refuse (or, with ``allow``, warn about) data whose facts differ from ``expected``.

    Args:
        expected: the reference facts (the first split, or the checkpoint's training data).
        found: the facts of the data at hand.
        expected_from: what ``expected`` describes, for the message.
        found_from: what ``found`` describes.
        allow: the user passed ``--allow-data-mismatch``: log a warning instead.
        fix: what to do about it (default: rebuild the data with the same flags).

    Returns:
        the mismatches (empty if none).

    Raises:
        DataMismatchError: a mismatch, without ``allow``.
    """
    bad = mismatches(expected, found)
    if not bad:
        return bad
    fix = fix or ("rebuild the data with the same graphormer-ext-preprocess flags "
                  "(--path-convention, --max-hops, --remove-hs)")
    msg = (
        f"{found_from} was built differently from {expected_from} ({'; '.join(bad)}): the "
        f"model would read other features than it was trained on. To fix it, {fix}, or pass "
        f"{OVERRIDE_FLAG} to go on anyway"
    )
    if not allow:
        raise DataMismatchError(msg)
    logger.warning("%s (going on: %s)", msg, OVERRIDE_FLAG)
    return bad


def trained_channels(
    *,
    add_3d: bool,
    no_2d: bool,
    mode_prob: Optional[Sequence[float]],
    mode_masking: bool,
    train_has_3d: Optional[bool],
) -> dict:
    """Which input channels a model was trained with, and whether it needs 3D input.

    Args:
        add_3d: the model has the 3D channel.
        no_2d: the 2D encodings (degree, SPD, path edges) are off.
        mode_prob: ``(p(2D+3D), p(2D), p(3D))`` of the training-mode draw.
        mode_masking: the draw was on (off with ``--load-qm9`` or ``mode_prob`` None).
        train_has_3d: the training split had positions that reached the model (``None``:
            unknown, a checkpoint written before the facts were stored: then the modes are
            unknown and only a model without the 2D channel is known to need 3D input).

    Returns:
        ``{"2d": bool, "3d": bool, "modes": [...], "needs_3d": bool}``: ``modes`` are the
        input modes seen in training (``"2D+3D"``, ``"2D"``, ``"3D"``); ``needs_3d`` is true when
        none of them is a 2D-only input, so a molecule without coordinates is out of training.
    """
    has_2d = not no_2d
    has_3d = bool(add_3d) and (train_has_3d is None or bool(train_has_3d))
    if train_has_3d is None and has_3d:
        return {"2d": has_2d, "3d": True, "modes": [], "needs_3d": not has_2d}
    if not has_3d:
        modes = ["2D"] if has_2d else []
    elif mode_masking and mode_prob is not None:
        modes = [m for m, p in zip(MODES, mode_prob) if p > 0 and (has_2d or m == "3D")]
    else:
        modes = ["2D+3D"] if has_2d else ["3D"]
    return {"2d": has_2d, "3d": has_3d, "modes": modes, "needs_3d": "2D" not in modes}
