"""The ``finished_sessions`` row of a sealed record: written when a session is finished and
again when a salvage rebuilds a lost row from the record's outbox message. The indexed columns
(charger, user, start and end, energy) are read from the record leniently, as a damaged or older
record may lack them."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

from gateway.model import from_rfc3339

__all__ = ["INSERT_FINISHED", "finished_row"]

INSERT_FINISHED = (
    "INTO finished_sessions (site_id, seq, session_id, charger_id, user_id, started_ts, "
    "ended_ts, energy_wh, record, hash, outbox_id, finished_ts) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def _ts(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return from_rfc3339(value)
    return None


def finished_row(
    site_id: str,
    seq: int,
    session_id: str,
    record: Mapping[str, Any],
    payload: str,
    hash_: str,
    outbox_id: int | None,
    finished_ts: float,
) -> tuple[Any, ...]:
    """The values for ``INSERT_FINISHED``; ``payload`` is the record's canonical JSON."""
    user = record.get("user")
    user_id = user.get("id") if isinstance(user, dict) else user
    energy = record.get("energy_wh")
    if not isinstance(energy, int | float) or isinstance(energy, bool):
        energy = None
    return (
        site_id,
        seq,
        session_id,
        record.get("charger_id"),
        user_id if isinstance(user_id, str) else None,
        _ts(record.get("started_at")),
        _ts(record.get("ended_at")),
        None if energy is None else int(energy),
        payload,
        hash_,
        outbox_id,
        finished_ts,
    )
