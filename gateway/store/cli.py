"""``evgw sessions``: what the local buffer holds, as a table or JSON."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Literal

from gateway.config import GatewayConfig
from gateway.safeout import printable
from gateway.store.sqlite import Store

__all__ = ["load_session_rows", "render_sessions", "run_sessions"]

_COLUMNS = ("session", "charger", "user", "start", "end", "energy_kwh", "cost_incl_vat", "synced")


def _when(value: Any) -> str:
    """RFC 3339 text or Unix seconds, shown to the second in UTC."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, tz=UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    if isinstance(value, str) and value:
        return value.replace("T", " ")[:19] + "Z" if len(value) >= 19 else value
    return "-"


def _user(value: Any) -> str:
    if isinstance(value, Mapping):
        return str(value.get("id") or value.get("token") or "-")
    return str(value) if value else "-"


def _kwh(energy_wh: Any) -> str:
    if isinstance(energy_wh, int | float) and not isinstance(energy_wh, bool):
        return f"{energy_wh / 1000:.3f}"
    return "-"


def _cost(cost: Any) -> str:
    if isinstance(cost, Mapping) and cost.get("incl_vat") is not None:
        return f"{cost['incl_vat']} {cost.get('currency', '')}".strip()
    return "-"


def _cells(row: Mapping[str, Any]) -> tuple[str, ...]:
    """One table line from a listing row (open or finished) or a bare session record."""
    if row.get("state") == "open":
        data = row.get("data") or {}
        return (
            str(row.get("session_id", "-")),
            str(row.get("charger_id", "-")),
            _user(data.get("user")),
            _when(data.get("started_at")),
            "-",
            _kwh(data.get("energy_wh")),
            "-",
            "open",
        )
    record = row.get("record", row)
    if "record" in row:
        synced_at = row.get("synced_at")
        synced = "no" if synced_at is None else "yes " + _when(synced_at)
    else:
        synced = "?"
    return (
        str(record.get("session_id", "-")),
        str(record.get("charger_id", "-")),
        _user(record.get("user")),
        _when(record.get("started_at")),
        _when(record.get("ended_at")),
        _kwh(record.get("energy_wh")),
        _cost(record.get("cost")),
        synced,
    )


def render_sessions(
    rows: Sequence[Mapping[str, Any]], fmt: Literal["table", "json"] = "table"
) -> str:
    """Rows from ``Store.finished_session_rows`` / ``Store.open_sessions_rows`` (or bare records)
    as an aligned text table or a JSON array (rows as they are: nothing is lost)."""
    if fmt == "json":
        return json.dumps(list(rows), indent=2, ensure_ascii=False, default=str)
    if fmt != "table":
        raise ValueError(f"unknown format {fmt!r}")
    # user ids and tags are whatever a card or the cloud said: no escape sequence reaches the
    # terminal raw
    lines = [_COLUMNS, *(tuple(printable(c) for c in _cells(r)) for r in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(_COLUMNS))]
    right = {5, 6}  # numbers line up on the right
    out = []
    for line in lines:
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        ]
        out.append("  ".join(cells).rstrip())
    if not rows:
        out.append("(no sessions)")
    return "\n".join(out)


async def load_session_rows(
    store: Store, *, open_only: bool = False, unsynced: bool = False
) -> list[dict[str, Any]]:
    """Open sessions, then finished ones; ``open_only`` or ``unsynced`` narrow the list."""
    if open_only:
        return await store.open_sessions_rows()
    finished = await store.finished_session_rows(unsynced_only=unsynced)
    if unsynced:
        return finished
    return [*await store.open_sessions_rows(), *finished]


async def run_sessions(
    config: GatewayConfig, *, open_only: bool, unsynced: bool, as_json: bool
) -> int:
    """``evgw sessions``: prints the listing; a missing buffer is a StoreError (one clear line)."""
    async with Store.for_site(config, reserve_bytes=0, create=False) as store:
        rows = await load_session_rows(store, open_only=open_only, unsynced=unsynced)
    print(render_sessions(rows, "json" if as_json else "table"))
    return 0
