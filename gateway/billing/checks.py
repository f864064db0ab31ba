"""Checks every reader of session records applies before it bills one.

:func:`out_of_range` finds what the JSON Schema cannot say: integers beyond 64 bits, numbers
that are not finite, strings a database cannot hold, negative energy, dates that do not exist.
:func:`checked_local_record` is the whole check of a record from the gateway's own buffer: it
gives the record as a :class:`~gateway.records.SessionRecord`, or raises :class:`RecordProblem`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import ValidationError

from gateway.billing.signing import verify_signature
from gateway.model import from_rfc3339
from gateway.records import SessionRecord, record_hash
from gateway.uplink.schemas import model_problems, validate

__all__ = ["INT64_MAX", "RecordProblem", "checked_local_record", "out_of_range"]

INT64_MAX = 2**63 - 1  # BIGINT in PostgreSQL, INTEGER in SQLite


def _walk(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    yield path, value
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _walk(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _walk(v, f"{path}[{i}]")


def out_of_range(record: dict[str, Any]) -> str | None:
    """Why a schema-valid record cannot be stored or billed as it is, or None: integers beyond
    64 bits (a seq of 2^64 overflows SQLite and PostgreSQL), NaN or infinite numbers, strings a
    database cannot hold (NUL, lone surrogates), negative energy, impossible dates."""
    for path, value in _walk(record):
        where = path or "<record>"
        if isinstance(value, bool):
            continue
        if isinstance(value, int) and not -INT64_MAX - 1 <= value <= INT64_MAX:
            return f"{where}: {value} is beyond 64 bits"
        if isinstance(value, float) and not math.isfinite(value):
            return f"{where}: {value} is not a finite number"
        if isinstance(value, str):
            if "\x00" in value:
                return f"{where}: contains a NUL character"
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return f"{where}: not valid Unicode (a lone surrogate)"
    if record["energy_wh"] < 0:
        return f"energy_wh: {record['energy_wh']} is negative"
    for name in ("started_at", "ended_at"):
        try:
            from_rfc3339(record[name])
        except (ValueError, OverflowError):
            return f"{name}: {record[name]!r} is not a real date and time"
    for period in record["charging_periods"]:
        try:
            from_rfc3339(period["start"])
        except (ValueError, OverflowError):
            return f"charging_periods: {period['start']!r} is not a real date and time"
    return None


class RecordProblem(ValueError):
    """Why a record of the gateway's own buffer must not be billed (the message)."""


def checked_local_record(record: Any, keys: Mapping[str, Ed25519PublicKey] | None) -> SessionRecord:
    """A record of the gateway's own buffer, checked: schema, range, hash, and the signature
    when the buffer's keys are known. :class:`RecordProblem` when it must not be billed."""
    if not isinstance(record, dict):
        raise RecordProblem("not a session record")
    errors = validate("session", record)
    if errors:
        raise RecordProblem("schema: " + "; ".join(errors[:3]))
    try:
        checked = SessionRecord.from_dict(record)
    except ValidationError as exc:
        raise RecordProblem("schema: " + "; ".join(model_problems(exc)[:3])) from None
    problem = out_of_range(record)
    if problem is not None:
        raise RecordProblem(problem)
    if record_hash(record) != checked.hash:
        raise RecordProblem("hash does not match its content")
    if keys is not None:
        sig = checked.signature
        if sig is None:
            raise RecordProblem("not signed")
        key = keys.get(sig.key_id)
        if key is None:
            raise RecordProblem(f"signed with key {sig.key_id}, not one of this gateway's keys")
        if not verify_signature(key, checked.hash, sig.model_dump()):
            raise RecordProblem("signature does not verify")
    return checked
