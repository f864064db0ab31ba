"""A valid finished session record for tests that hand the store a record of their own.

``unsealed("s1", energy_wh=1000)`` is a complete ``UnsealedRecord`` with the given fields
replaced; a dict given for a field that holds an object (``user``, ``cost``) is merged into the
default one, so ``user={"id": "bob"}`` keeps the default ``auth``. Crash subprocesses import it
as ``tests.support.records`` with the repository on their PYTHONPATH.
"""

from __future__ import annotations

from typing import Any

from gateway.records import UnsealedRecord

__all__ = ["record_fields", "unsealed"]


def record_fields(session_id: str = "s1", **overrides: Any) -> dict[str, Any]:
    """The JSON object of :func:`unsealed` (to build a record a test then changes by hand)."""
    fields: dict[str, Any] = {
        "schema": "evgw.session/1",
        "session_id": session_id,
        "site_id": "depot-7",
        "charger_id": "cp1",
        "connector": 1,
        "user": {"id": "alice", "token": "04A2", "token_type": "rfid", "auth": "local"},
        "started_at": "2026-09-21T08:00:00.000Z",
        "ended_at": "2026-09-21T09:30:00.000Z",
        "charging_s": 5400,
        "idle_s": 0,
        "meter_start_wh": 1000,
        "meter_stop_wh": 23000,
        "energy_wh": 22000,
        "max_power_w": 11000,
        "stop_reason": "ev_disconnected",
        "tariff_id": "standard",
        "tariff_version": "1",
        "flags": [],
        "charging_periods": [],
        "cost": {
            "currency": "EUR",
            "excl_vat": "8.58",
            "vat": "1.63",
            "incl_vat": "10.21",
            "lines": [],
        },
    }
    for key, value in overrides.items():
        default = fields.get(key)
        if isinstance(default, dict) and isinstance(value, dict):
            fields[key] = {**default, **value}
        else:
            fields[key] = value
    return fields


def unsealed(session_id: str = "s1", **overrides: Any) -> UnsealedRecord:
    """A valid priced record of ``session_id`` with ``overrides`` (see the module docstring)."""
    return UnsealedRecord.from_dict(record_fields(session_id, **overrides))
