"""Self-describing binary encoding of ``dict[str, np.ndarray]`` records, with a crc32 — no pickle.

Layout of one encoded record (schema 2; all integers little-endian)::

    b"GXR2"               4-byte magic (record format 2)
    uint32 crc32          zlib.crc32 of every byte after this field
    uint16 schema_len     length of the schema text
    schema                ASCII ``name dtype ndim`` entries joined by ``;``, e.g.
                          ``node_feat |u1 2;bond_index |u1 2;bond_feat |u1 2;y <f4 1``
    uint32 dims[...]      the shape of every array, in order (sum of the ndims)
    payload               raw C-order array bytes, in order; each array starts at a multiple of
                          its item size (counted from the start of the record), zero padding
                          in between; the record ends with the last array

``dtype`` is a numpy type string with explicit byte order (``"<i2"``, ``"<f4"``, ``"|u1"``). Only
plain numeric dtypes are accepted, so decoding is ``np.ndarray(buffer=...)`` and nothing else: a
corrupt or hostile value raises :class:`RecordFormatError` (a flipped bit fails the checksum),
never runs code. The schema text is the same for every record of a split with the same keys, so
it is parsed once per process (``_PLANS``); shapes vary and are read per record.

The meta record (JSON) is framed the same way: ``b"GXM2"``, crc32, then the JSON text.
"""
from __future__ import annotations

import json
import struct
import zlib

import numpy as np

MAGIC = b"GXR2"
META_MAGIC = b"GXM2"
LEGACY_MAGIC = b"GXR1"  # schema 1 records (JSON header, no checksum); read only to name them
_ALLOWED_KINDS = frozenset("biuf")  # bool, signed, unsigned, float
_PREFIX = struct.Struct("<4sIH")  # magic, crc32, schema_len
_CRC = struct.Struct("<I")
_MAX_DIM = 0xFFFFFFFF


class RecordFormatError(ValueError):
    """Raised when bytes are not a valid encoded record (bad magic, checksum, header, length)."""


class ChecksumError(RecordFormatError):
    """The record's crc32 does not match its bytes: it was changed after it was written."""


def _pad(n: int, align: int) -> int:
    return (-n) % align


def encode(record: dict[str, np.ndarray]) -> bytes:
    """Encode a dict of numeric numpy arrays.

    Args:
        record: mapping from key to array; arrays of any numeric dtype and shape (0-size
            allowed). Keys are non-empty ASCII without spaces or ``;``.

    Returns:
        The encoded bytes (see the module docstring for the layout).

    Raises:
        TypeError: a non-numeric array.
        ValueError: an invalid key, or a dimension above 2**32 - 1.
    """
    entries = []
    arrays = []
    dims: list[int] = []
    for name, value in record.items():
        if not name or not name.isascii() or " " in name or ";" in name:
            raise ValueError(f"record key {name!r}: keys are ASCII without spaces or ';'")
        arr = np.ascontiguousarray(value)
        if arr.dtype.kind not in _ALLOWED_KINDS:
            raise TypeError(f"record key {name!r}: dtype {arr.dtype} is not numeric")
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        if any(d > _MAX_DIM for d in arr.shape):
            raise ValueError(f"record key {name!r}: dimension above {_MAX_DIM}")
        entries.append(f"{name} {arr.dtype.str} {arr.ndim}")
        arrays.append(arr)
        dims.extend(arr.shape)
    schema = ";".join(entries).encode("ascii")
    head = struct.pack(f"<H{len(schema)}s{len(dims)}I", len(schema), schema, *dims)
    parts = [head]
    size = 8 + len(head)
    for arr in arrays:
        pad = _pad(size, arr.dtype.itemsize)
        if pad:
            parts.append(b"\0" * pad)
        raw = arr.tobytes()
        parts.append(raw)
        size += pad + len(raw)
    body = b"".join(parts)
    return MAGIC + _CRC.pack(zlib.crc32(body)) + body


# Parsed schemas, keyed by the schema bytes: ((name, dtype, ndim), ...) and the dims unpacker.
_PLANS: dict[bytes, tuple[tuple, struct.Struct]] = {}
_MAX_PLANS = 4096


def _plan(schema: bytes) -> tuple[tuple, struct.Struct]:
    """Validate a schema text once: its entries and a ``struct`` that reads the dims."""
    try:
        text = schema.decode("ascii")
        entries = []
        total = 0
        for item in text.split(";") if text else ():
            name, dtype, ndim = item.split(" ")
            dt = np.dtype(dtype)
            if dt.kind not in _ALLOWED_KINDS or dt.str != dtype or not name:
                raise RecordFormatError(f"key {name!r}: dtype {dtype!r} not allowed")
            nd = int(ndim)
            if not 0 <= nd <= 32:
                raise RecordFormatError(f"key {name!r}: {nd} dimensions")
            entries.append((name, dt, nd))
            total += nd
    except (UnicodeDecodeError, ValueError, TypeError) as exc:
        if isinstance(exc, RecordFormatError):
            raise
        raise RecordFormatError(f"corrupt record schema: {exc}") from None
    plan = (tuple(entries), struct.Struct(f"<{total}I"))
    if len(_PLANS) >= _MAX_PLANS:
        _PLANS.clear()
    _PLANS[schema] = plan
    return plan


def verify(buf: bytes | memoryview) -> None:
    """Check the magic and the crc32 of an encoded record (done by :func:`decode` too).

    Raises:
        RecordFormatError: not a schema-2 record (the message names schema-1 records).
        ChecksumError: the bytes differ from those written.
    """
    if len(buf) < _PREFIX.size or buf[:4] != MAGIC:
        if bytes(buf[:4]) == LEGACY_MAGIC:
            raise RecordFormatError("a schema-1 record (written by an older version)")
        raise RecordFormatError("not a graphormer_ext record (bad magic)")
    (stored,) = _CRC.unpack_from(buf, 4)
    actual = zlib.crc32(memoryview(buf)[8:])
    if stored != actual:
        raise ChecksumError(
            f"checksum mismatch (stored crc32 {stored:08x}, computed {actual:08x})"
        )


def decode(buf: bytes | memoryview) -> dict[str, np.ndarray]:
    """Decode bytes produced by :func:`encode`, verifying the checksum first.

    The arrays are views into ``buf`` (zero copy; read-only when ``buf`` is ``bytes``).

    Raises:
        ChecksumError: the crc32 does not match (the bytes were changed).
        RecordFormatError: wrong magic, truncated data, or an invalid header.
    """
    verify(buf)
    _, _, slen = _PREFIX.unpack_from(buf, 0)
    start = _PREFIX.size
    schema = bytes(buf[start : start + slen])
    plan = _PLANS.get(schema)
    entries, dims_struct = plan if plan is not None else _plan(schema)
    pos = start + slen
    end = pos + dims_struct.size
    if end > len(buf):
        raise RecordFormatError("truncated record header")
    dims = dims_struct.unpack_from(buf, pos)
    out = {}
    ndarray = np.ndarray
    d = 0
    for name, dt, nd in entries:
        shape = dims[d : d + nd]
        d += nd
        count = 1
        for s in shape:
            count *= s
        size = dt.itemsize
        end += (-end) % size
        try:
            out[name] = ndarray(shape, dt, buf, end)
        except (TypeError, ValueError):  # numpy: "buffer is too small for requested array"
            raise RecordFormatError(
                f"key {name!r}: shape {shape} does not fit the record ({len(buf)} bytes)"
            ) from None
        end += count * size
    if end != len(buf):
        raise RecordFormatError(f"record length {len(buf)} != {end} described by its header")
    return out


def encode_meta(meta: dict) -> bytes:
    """Encode the ``__meta__`` record (JSON with a crc32 frame; values must be JSON types)."""
    body = json.dumps(meta, sort_keys=True, indent=1).encode()
    return META_MAGIC + _CRC.pack(zlib.crc32(body)) + body


def decode_meta(buf: bytes) -> dict:
    """Decode the ``__meta__`` record.

    A schema-1 meta record (bare JSON, no frame) is decoded too, so that the reader can
    report its schema version and how to rebuild it.

    Raises:
        ChecksumError: the crc32 does not match.
        RecordFormatError: not JSON, or not a JSON object.
    """
    raw = bytes(buf)
    if raw[:4] == META_MAGIC:
        (stored,) = _CRC.unpack_from(raw, 4)
        body = raw[8:]
        actual = zlib.crc32(body)
        if stored != actual:
            raise ChecksumError(
                f"corrupt __meta__ record: checksum mismatch (stored crc32 {stored:08x}, "
                f"computed {actual:08x})"
            )
    else:
        body = raw
    try:
        meta = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RecordFormatError(f"corrupt __meta__ record: {exc}") from None
    if not isinstance(meta, dict):
        raise RecordFormatError("corrupt __meta__ record: not a JSON object")
    return meta
