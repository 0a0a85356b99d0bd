"""Self-describing binary encoding of ``dict[str, np.ndarray]`` records — no pickle, no code execution.

Layout of one encoded record (all integers little-endian)::

    b"GXR1"                      4-byte magic (format version 1)
    uint32 header_len            length of the JSON header in bytes
    header                       UTF-8 JSON: [[name, dtype, shape, offset], ...]
    zero padding                 to an 8-byte boundary
    payload                      raw C-order array bytes, each array 8-byte aligned; offsets are
                                 relative to the start of the payload

``dtype`` is a numpy type string with explicit byte order (``"<i2"``, ``"<f4"``, ``"|u1"``). Only plain
numeric dtypes are accepted, so decoding is ``np.frombuffer`` and nothing else: a corrupt or hostile
value can raise :class:`RecordFormatError`, never run code.
"""
from __future__ import annotations

import json
import struct

import numpy as np

MAGIC = b"GXR1"
_ALIGN = 8
_ALLOWED_KINDS = frozenset("biuf")  # bool, signed, unsigned, float


class RecordFormatError(ValueError):
    """Raised when bytes are not a valid encoded record."""


def _pad(n: int) -> int:
    return (-n) % _ALIGN


def encode(record: dict[str, np.ndarray]) -> bytes:
    """Encode a dict of numeric numpy arrays.

    Args:
        record: mapping from key to array; arrays of any numeric dtype and shape (0-size allowed).

    Returns:
        The encoded bytes (see the module docstring for the layout).
    """
    header = []
    chunks = []
    offset = 0
    for name, value in record.items():
        arr = np.ascontiguousarray(value)
        if arr.dtype.kind not in _ALLOWED_KINDS:
            raise TypeError(f"record key {name!r}: dtype {arr.dtype} is not numeric")
        dt = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
        arr = arr.astype(dt, copy=False)
        header.append([name, dt.str, list(arr.shape), offset])
        raw = arr.tobytes()
        chunks.append(raw)
        chunks.append(b"\0" * _pad(len(raw)))
        offset += len(raw) + _pad(len(raw))
    head = json.dumps(header, separators=(",", ":")).encode()
    prefix = MAGIC + struct.pack("<I", len(head)) + head
    return prefix + b"\0" * _pad(len(prefix)) + b"".join(chunks)


# Parsed headers, keyed by the header bytes. A split has few distinct headers (they differ only by
# atom count, hop count and the optional keys), so decoding skips JSON parsing almost always.
_PLANS: dict[bytes, tuple[tuple, int]] = {}
_MAX_PLANS = 8192


def _plan(head: bytes) -> tuple[tuple, int]:
    """Validate a header once: ``((name, dtype, shape, offset), ...)`` and the payload end."""
    try:
        header = json.loads(head)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RecordFormatError(f"corrupt record header: {exc}") from None
    entries = []
    payload_end = 0
    try:
        for name, dtype, shape, offset in header:
            dt = np.dtype(dtype)
            if dt.kind not in _ALLOWED_KINDS:
                raise RecordFormatError(f"key {name!r}: dtype {dtype} not allowed")
            shape = tuple(int(d) for d in shape)
            count = 1
            for d in shape:
                if d < 0:
                    raise RecordFormatError(f"key {name!r}: negative dimension in {shape}")
                count *= d
            offset = int(offset)
            if offset < 0:
                raise RecordFormatError(f"key {name!r}: negative offset")
            entries.append((str(name), dt, shape, offset))
            payload_end = max(payload_end, offset + count * dt.itemsize)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, RecordFormatError):
            raise
        raise RecordFormatError(f"corrupt record header: {exc}") from None
    plan = (tuple(entries), payload_end)
    if len(_PLANS) >= _MAX_PLANS:
        _PLANS.clear()
    _PLANS[head] = plan
    return plan


def decode(buf: bytes | memoryview) -> dict[str, np.ndarray]:
    """Decode bytes produced by :func:`encode`.

    The arrays are views into ``buf`` (zero copy; read-only when ``buf`` is ``bytes``).

    Raises:
        RecordFormatError: wrong magic, truncated data, or an invalid header.
    """
    if len(buf) < 8 or buf[:4] != MAGIC:
        raise RecordFormatError("not a graphormer_ext record (bad magic)")
    (hlen,) = struct.unpack_from("<I", buf, 4)
    start = 8 + hlen
    if start > len(buf):
        raise RecordFormatError("truncated record header")
    head = bytes(buf[8:start])
    plan = _PLANS.get(head)
    entries, payload_end = plan if plan is not None else _plan(head)
    base = start + _pad(start)
    if base + payload_end > len(buf):
        raise RecordFormatError("truncated payload")
    ndarray = np.ndarray
    return {name: ndarray(shape, dt, buf, base + off) for name, dt, shape, off in entries}


def encode_meta(meta: dict) -> bytes:
    """Encode the ``__meta__`` record (JSON; values must be JSON types)."""
    return json.dumps(meta, sort_keys=True, indent=1).encode()


def decode_meta(buf: bytes) -> dict:
    """Decode the ``__meta__`` record."""
    try:
        meta = json.loads(bytes(buf))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RecordFormatError(f"corrupt __meta__ record: {exc}") from None
    if not isinstance(meta, dict):
        raise RecordFormatError("corrupt __meta__ record: not a JSON object")
    return meta
