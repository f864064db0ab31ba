"""Registers <-> values.

The path is always registers -> bytes -> ``struct`` format chosen in advance -> raw number ->
byte/mask -> sentinel check -> scale and offset, in that one place. ``encode`` is the exact
inverse and serves the simulators and control writes.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence

from gateway.modbus.types import TYPES, DataType, RegisterSpec, WordOrder
from gateway.model import Value

__all__ = ["CodecError", "decode", "encode", "encode_raw", "words_to_bytes"]

_STRUCT = {t: info.format for t, info in TYPES.items() if info.format is not None}


class CodecError(ValueError):
    """Raw words do not fit the register spec (wrong count, value out of range)."""


def words_to_bytes(words: Sequence[int], order: WordOrder = WordOrder.ABCD) -> bytes:
    if order is WordOrder.CDAB:
        words = list(reversed(words))
    try:
        # one pack for all words (a text register is 10-20 of them, read every poll)
        return struct.pack(f">{len(words)}H", *words)
    except struct.error as exc:
        raise CodecError(f"register value out of 0..65535: {list(words)}") from exc


def _bytes_to_words(data: bytes, order: WordOrder) -> list[int]:
    words = [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]
    return list(reversed(words)) if order is WordOrder.CDAB else words


def decode(spec: RegisterSpec, words: Sequence[int]) -> Value:
    """Decode ``spec.count`` raw words (or bits, for coils) into the spec's value.

    Returns None for "not available" (a sentinel, or NaN/inf floats).
    """
    if len(words) != spec.count:
        raise CodecError(f"{spec.name}: expected {spec.count} registers, got {len(words)}")
    t = spec.type
    if t is DataType.BOOL:
        return 1 if words[0] else 0
    if t is DataType.ASCII:
        # Leading NULs too: some chargers right-align the text (Bender 720, CHARX 1275).
        raw = words_to_bytes(words).lstrip(b"\x00 ")
        return raw.split(b"\x00", 1)[0].decode("latin-1").strip()
    if t is DataType.ASCII1:
        text = "".join(chr(w) for w in words if w != 0 and w < 0xD800)
        return text.strip()
    if t is DataType.HEX:
        return words_to_bytes(words).hex().upper()
    data = words_to_bytes(words, spec.word_order)
    if spec.sentinels:
        as_uint = int.from_bytes(data, "big")
        if as_uint in spec.sentinels:
            return None
    (raw,) = struct.unpack(_STRUCT[t], data)
    if isinstance(raw, float):
        if math.isnan(raw) or math.isinf(raw):
            return None
        return raw * spec.scale + spec.offset
    if spec.byte == "high":
        raw = (raw >> 8) & 0xFF
    elif spec.byte == "low":
        raw &= 0xFF
    if spec.mask is not None:
        raw &= spec.mask
    if spec.scale == 1.0 and spec.offset == 0.0:
        return int(raw)
    return raw * spec.scale + spec.offset


def encode_raw(spec: RegisterSpec, raw: int | float) -> list[int]:
    """Pack an unscaled raw number into the spec's words (honouring word order)."""
    t = spec.type
    if t is DataType.BOOL:
        return [1 if raw else 0]
    fmt = _STRUCT.get(t)
    if fmt is None:
        raise CodecError(f"{spec.name}: {t} is not numeric")
    if t.is_float:
        data = struct.pack(fmt, float(raw))
    else:
        try:
            data = struct.pack(fmt, round(raw))
        except struct.error as exc:
            raise CodecError(f"{spec.name}: {raw} does not fit {t}") from exc
    return _bytes_to_words(data, spec.word_order)


def encode(spec: RegisterSpec, value: Value) -> list[int]:
    """Inverse of :func:`decode`: a value in the spec's unit -> raw words.

    ``None`` encodes as the first sentinel (or NaN for floats). For ``byte: high`` the value lands
    in the high byte. Text is padded with NUL to ``count`` registers and must fit.
    """
    t = spec.type
    if value is None:
        if spec.sentinels:
            top = min(spec.sentinels)
            return _bytes_to_words(top.to_bytes(spec.count * 2, "big"), spec.word_order)
        if t.is_float:
            return encode_raw(spec, math.nan)
        raise CodecError(f"{spec.name}: no way to encode 'not available'")
    if t is DataType.ASCII:
        data = str(value).encode("latin-1")
        if len(data) > spec.count * 2:
            raise CodecError(f"{spec.name}: {value!r} longer than {spec.count * 2} characters")
        data = data.ljust(spec.count * 2, b"\x00")
        return [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]
    if t is DataType.ASCII1:
        text = str(value)
        if len(text) > spec.count:
            raise CodecError(f"{spec.name}: {value!r} longer than {spec.count} characters")
        return [ord(c) for c in text] + [0] * (spec.count - len(text))
    if t is DataType.HEX:
        data = bytes.fromhex(str(value))
        if len(data) > spec.count * 2:
            raise CodecError(f"{spec.name}: {value!r} longer than {spec.count * 2} bytes")
        data = data.rjust(spec.count * 2, b"\x00")
        return [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]
    if isinstance(value, str):
        raise CodecError(f"{spec.name}: {value!r} is not a number")
    raw: float = (float(value) - spec.offset) / spec.scale
    if not t.is_float:
        raw = round(raw)
        if spec.byte == "high":
            raw = int(raw) << 8
    return encode_raw(spec, raw)
