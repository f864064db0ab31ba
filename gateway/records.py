"""Finished session records: canonical JSON, the hash chain and signatures.

``hash`` is SHA-256 over the canonical JSON of the record without ``hash`` and ``signature``;
``prev_hash`` links each record to the previous one of the same site (``GENESIS`` for the first);
``signature`` is an Ed25519 signature over the ASCII hex of ``hash``.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

__all__ = ["GENESIS", "UNHASHED_FIELDS", "canonical_json", "record_hash", "seal"]

GENESIS = "0" * 64
UNHASHED_FIELDS = frozenset({"hash", "signature"})


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no insignificant white space, UTF-8: the same bytes on every machine."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def record_hash(record: dict[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k not in UNHASHED_FIELDS}
    return hashlib.sha256(canonical_json(body)).hexdigest()


def seal(record: dict[str, Any], sign: Any = None) -> dict[str, Any]:
    """Add ``hash`` (and ``signature`` when ``sign`` is given: a callable bytes -> dict)."""
    out = dict(record)
    out.pop("signature", None)
    out["hash"] = record_hash(out)
    if sign is not None:
        out["signature"] = sign(out["hash"].encode("ascii"))
    return out
