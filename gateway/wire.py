"""Readings in their wire form: the JSON object one reading is inside an ``evgw.readings/1`` batch.

The store encodes each reading once, when it is buffered, and the uplink splices the stored texts
into a batch (``readings_batch``), so draining a backlog neither decodes nor re-encodes a value.

A reading is ``{"ts":"<RFC 3339 UTC, ms>",<values in the order given>}`` (UTF-8, compact). Values
are sanitised as the schema wants them: NaN and infinities become ``null``, anything that is not a
number, string, boolean or null becomes its ``str()``; a value named ``ts`` gives way to the
reading's own time.
"""

from __future__ import annotations

import json
import json.encoder
import math
import re
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

import msgspec

__all__ = ["encode_reading", "readings_batch", "wire_ts"]

_PLAIN = frozenset({int, float, str, bool, type(None)})
_MSGSPEC: Callable[[Any], bytes] = msgspec.json.Encoder().encode
# msgspec writes a float outside [1e-4, 1e16) as ``1e16``, ``1.5e-7`` or ``0.00001``. An ``e``
# before a digit or a minus is a cheap hint (a literal first: ~0.4 us a reading, against ~3.6 us
# for the exact pattern alone); only a text with the hint (a key such as ``mode3_state``) is
# searched with the exact pattern, a digit before the ``e``.
_EXPONENT_HINT = re.compile(rb"e[-\d]").search
_EXPONENT = re.compile(rb"\de[-\d]").search
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
_ENCODE: Callable[[Any], str] = _ENCODER.encode
# Private parts of the json module (its C accelerator), used when present.
_c_make_encoder = getattr(json.encoder, "c_make_encoder", None)
_c_encode_str = getattr(json.encoder, "c_encode_basestring", None)
if _c_make_encoder is not None and _c_encode_str is not None:
    # The C encoder json.dumps builds on every call, built once: ~3 us less per reading.
    _C_ENCODE = _c_make_encoder(
        # markers, default, encoder, indent, key separator, item separator, sort_keys,
        # skipkeys, allow_nan
        None,
        _ENCODER.default,
        _c_encode_str,
        None,
        ":",
        ",",
        False,
        False,
        False,
    )

    def _encode_once(obj: Any) -> str:
        return "".join(_C_ENCODE(obj, 0))

    _ENCODE = _encode_once


@lru_cache(maxsize=4096)
def _second(sec: int) -> str:
    return datetime.fromtimestamp(sec, tz=UTC).strftime('{"ts":"%Y-%m-%dT%H:%M:%S.')


def wire_ts(ts: float) -> str:
    """``{"ts":"...Z"`` for ``ts``: the same text as ``gateway.model.rfc3339`` (microseconds
    rounded half to even, then truncated to milliseconds), the date part cached per second."""
    frac, whole = math.modf(ts)
    us = round(frac * 1e6)
    sec = int(whole)
    if us >= 1_000_000:
        sec, us = sec + 1, us - 1_000_000
    elif us < 0:
        sec, us = sec - 1, us + 1_000_000
    return _second(sec) + _MILLIS[us // 1000]


_MILLIS = tuple(f'{ms:03d}Z"' for ms in range(1000))  # formatting cost more than the rest


def _value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def encode_reading(ts: float, values: Mapping[str, Any]) -> bytes:
    """The wire form of one reading (see the module docstring)."""
    head = wire_ts(ts)
    if "ts" not in values and _PLAIN.issuperset(map(type, values.values())):
        # msgspec: the same bytes as the json module for these values at a fifth of the
        # cost, which is most of the cost of buffering a reading. Both write the shortest
        # round-trip digits, but outside [1e-4, 1e16) the json module writes ``1e-05`` and
        # ``1e+16`` where msgspec writes ``0.00001`` and ``1e16``: output that may hold such
        # a number goes the json module's way (tests/test_store_wire.py compares bytes).
        try:
            raw = _MSGSPEC(values)
        except (TypeError, ValueError):  # a key msgspec refuses; an unpaired surrogate
            raw = None
        if (
            raw is not None
            and b"0.0000" not in raw
            and (_EXPONENT_HINT(raw) is None or _EXPONENT(raw) is None)
        ):
            return head.encode() + (b"}" if len(raw) == 2 else b"," + raw[1:])
        try:
            body = _ENCODE(values)
        except (ValueError, TypeError):  # NaN or infinity; a key JSON cannot hold
            body = None
        if body is not None:
            return (head + ("}" if len(body) == 2 else "," + body[1:])).encode()
    clean = {str(k): _value(v) for k, v in values.items() if k != "ts"}
    body = _ENCODE(clean)
    return (head + ("}" if len(body) == 2 else "," + body[1:])).encode()


@lru_cache(maxsize=1024)
def _batch_head(device_id: str) -> bytes:
    return (
        '{"schema":"evgw.readings/1","device_id":'
        + json.dumps(device_id, ensure_ascii=False)
        + ',"readings":['
    ).encode()


def readings_batch(device_id: str, wires: Iterable[bytes]) -> bytes:
    """An ``evgw.readings/1`` message: the readings' wire texts spliced, nothing re-encoded."""
    return _batch_head(device_id) + b",".join(wires) + b"]}"
