"""What the ``SessionTracker`` asks the ``SessionManager`` to do: typed effects, returned by every
tracker call and performed in order (persist before publish)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.model import MeterPoint
from gateway.records import SessionFacts
from gateway.sessions.ledger import OpenSession

__all__ = [
    "AddPoint",
    "Effect",
    "FinishSession",
    "RequestAuth",
    "SaveSession",
    "SetEnabled",
    "StartSession",
    "StatusChanged",
]


@dataclass(frozen=True, slots=True)
class SaveSession:
    session: OpenSession


@dataclass(frozen=True, slots=True)
class StartSession:
    """Persist (after freezing the tariff), then publish ``sessions/started``."""

    session: OpenSession


@dataclass(frozen=True, slots=True)
class FinishSession:
    session: OpenSession
    record: SessionFacts


@dataclass(frozen=True, slots=True)
class RequestAuth:
    charger_id: str
    token_id: str
    token_type: str
    attempt: int


@dataclass(frozen=True, slots=True)
class SetEnabled:
    charger_id: str
    enabled: bool


@dataclass(frozen=True, slots=True)
class StatusChanged:
    charger_id: str
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class AddPoint:
    session_id: str
    point: MeterPoint


Effect = (
    SaveSession | StartSession | FinishSession | RequestAuth | SetEnabled | StatusChanged | AddPoint
)
