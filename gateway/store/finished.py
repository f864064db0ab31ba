"""The ``finished_sessions`` row of a sealed record: written when a session is finished and
again when a salvage rebuilds a lost row from the record's outbox message. The indexed columns
(charger, user, start and end, energy) are read from the typed record; a salvaged message that is
no record (damaged, or from an unknown writer) keeps its row with those columns NULL."""

from __future__ import annotations

from gateway.model import from_rfc3339
from gateway.records import SessionRecord

__all__ = ["INSERT_FINISHED", "finished_row"]

INSERT_FINISHED = (
    "INTO finished_sessions (site_id, seq, session_id, charger_id, user_id, started_ts, "
    "ended_ts, energy_wh, record, hash, outbox_id, finished_ts) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)

_Columns = tuple[str | None, str | None, float | None, float | None, int | None]


def _ts(text: str) -> float | None:
    """Unix seconds of an RFC 3339 time (None for a time no calendar has)."""
    try:
        return from_rfc3339(text)
    except ValueError:
        return None


def _columns(record: SessionRecord | None) -> _Columns:
    if record is None:
        return (None, None, None, None, None)
    return (
        record.charger_id,
        record.user.id,
        _ts(record.started_at),
        _ts(record.ended_at),
        record.energy_wh,
    )


def finished_row(
    site_id: str,
    seq: int,
    session_id: str,
    record: SessionRecord | None,
    payload: str,
    hash_: str,
    outbox_id: int | None,
    finished_ts: float,
) -> tuple[str | int | float | None, ...]:
    """The values for ``INSERT_FINISHED``; ``payload`` is the record's canonical JSON."""
    return (
        site_id,
        seq,
        session_id,
        *_columns(record),
        payload,
        hash_,
        outbox_id,
        finished_ts,
    )
