"""Domain types shared by every part of the gateway. Imports nothing of ours and does no I/O.

Units are carried in names (``power_w``, ``energy_wh``); timestamps are Unix seconds (float, UTC)
inside the gateway and RFC 3339 UTC strings on the outside.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Protocol

__all__ = [
    "MAX_VERSION",
    "SESSION_SCHEMA",
    "SESSION_STARTED_SCHEMA",
    "AuthSource",
    "AuthStatus",
    "ChargerStatus",
    "Clock",
    "DeviceKind",
    "DeviceSample",
    "Flag",
    "IecState",
    "MeterPoint",
    "StopReason",
    "SystemClock",
    "Token",
    "TokenType",
    "Value",
    "from_rfc3339",
    "new_session_id",
    "rfc3339",
]

SESSION_SCHEMA = "evgw.session/1"
SESSION_STARTED_SCHEMA = "evgw.session-started/1"

Value = float | int | str | None


class IecState(StrEnum):
    """IEC 61851-1 control-pilot state: A no EV, B connected, C charging, D charging with
    ventilation, E short/no power, F EVSE fault."""

    A = "A"
    B = "B"
    C = "C"
    D = "D"
    E = "E"
    F = "F"


class ChargerStatus(StrEnum):
    """The CONTRACT's status words (the OCPP 1.6 ChargePointStatus set, snake_case)."""

    AVAILABLE = "available"
    PREPARING = "preparing"
    CHARGING = "charging"
    SUSPENDED_EV = "suspended_ev"
    SUSPENDED_EVSE = "suspended_evse"
    FINISHING = "finishing"
    FAULTED = "faulted"
    UNAVAILABLE = "unavailable"

    @property
    def plugged(self) -> bool:
        """An EV is connected in this status."""
        return self in _PLUGGED

    @property
    def delivering(self) -> bool:
        return self is ChargerStatus.CHARGING


_PLUGGED = frozenset(
    {
        ChargerStatus.PREPARING,
        ChargerStatus.CHARGING,
        ChargerStatus.SUSPENDED_EV,
        ChargerStatus.SUSPENDED_EVSE,
        ChargerStatus.FINISHING,
    }
)


class DeviceKind(StrEnum):
    CHARGER = "charger"
    METER = "meter"


class TokenType(StrEnum):
    RFID = "rfid"
    KEYFOB = "keyfob"
    APP = "app"


class AuthStatus(StrEnum):
    ACCEPTED = "accepted"
    BLOCKED = "blocked"
    EXPIRED = "expired"
    UNKNOWN = "unknown"


class AuthSource(StrEnum):
    """How a session's user was authorized (the record's ``user.auth``)."""

    LOCAL = "local"
    CLOUD = "cloud"
    REMOTE = "remote"
    OFFLINE_UNKNOWN = "offline_unknown"


class StopReason(StrEnum):
    EV_DISCONNECTED = "ev_disconnected"
    REMOTE = "remote"
    LOCAL = "local"
    DEAUTHORIZED = "deauthorized"
    POWER_LOSS = "power_loss"
    UNKNOWN = "unknown"


# The largest version a pushed list (tokens, tariffs) may carry: exact in every JSON parser
# (IEEE doubles), so no push can make every later one look stale.
MAX_VERSION = 2**53


class Flag(StrEnum):
    """Things a bill reader must know about a session record."""

    END_ESTIMATED = "end_estimated"
    METER_RESET = "meter_reset"
    COMMS_GAP = "comms_gap"
    OFFLINE_AUTHORIZED = "offline_authorized"
    START_LATCHED = "start_latched"  # the meter did not answer at start; start read later
    # plug-in happened while the gateway was not looking; start = counter - session counter
    START_RECONSTRUCTED = "start_reconstructed"
    NOT_BILLABLE = "not_billable"  # plugged in, never charged
    NO_METER = "no_meter"  # no cumulative counter: energy could not be measured
    UNIDENTIFIED = "unidentified"  # the charger delivered energy without anyone identified
    UNPRICED = "unpriced"  # pricing failed: the record carries no cost
    # the session ended on an implausible reading: energy up to the last plausible one
    ENERGY_FALLBACK = "energy_fallback"
    # the tariff the charger or group names was missing at start: priced by the default
    TARIFF_FALLBACK = "tariff_fallback"


@dataclass(frozen=True, slots=True)
class Token:
    id: str
    type: TokenType
    user: str
    status: AuthStatus = AuthStatus.ACCEPTED
    expires_at: float | None = None  # Unix seconds
    group: str | None = None  # tariff group (e.g. "staff")

    def status_at(self, now: float) -> AuthStatus:
        if (
            self.status is AuthStatus.ACCEPTED
            and self.expires_at is not None
            and now >= self.expires_at
        ):
            return AuthStatus.EXPIRED
        return self.status

    def to_json(self) -> dict[str, Any]:
        """The stored form (the buffer's cloud list, the parts of a list being assembled)."""
        return {
            "id": self.id,
            "type": self.type.value,
            "user": self.user,
            "status": self.status.value,
            "expires_at": self.expires_at,
            "group": self.group,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Token:
        return cls(
            id=data["id"],
            type=TokenType(data["type"]),
            user=data["user"],
            status=AuthStatus(data.get("status", "accepted")),
            expires_at=data.get("expires_at"),
            group=data.get("group"),
        )


@dataclass(frozen=True, slots=True)
class DeviceSample:
    """One poll of one device, decoded and normalized by its profile.

    ``values`` uses the canonical quantity names of docs/profiles.md (``power_w``, ``energy_wh``,
    ``session_energy_wh``, ``voltage_l1_v``, ``current_l1_a``, ...). A device that did not answer
    yields ``online=False`` with ``error`` naming the reason and no values.
    """

    device_id: str
    ts: float
    online: bool
    values: Mapping[str, Value] = field(default_factory=dict)
    iec: IecState | None = None
    status: ChargerStatus | None = None
    tag: str | None = None
    error: str | None = None

    def number(self, name: str) -> float | None:
        v = self.values.get(name)
        if isinstance(v, bool) or not isinstance(v, int | float):
            return None
        if v != v:  # NaN
            return None
        return float(v)

    @property
    def power_w(self) -> float | None:
        return self.number("power_w")

    @property
    def energy_wh(self) -> float | None:
        """The cumulative (lifetime) import counter, if the device has one."""
        return self.number("energy_wh")

    @property
    def session_energy_wh(self) -> float | None:
        return self.number("session_energy_wh")


@dataclass(frozen=True, slots=True)
class MeterPoint:
    """A point of a session's energy curve, kept for pricing: at each state change and at least
    once a minute while the session is open."""

    ts: float
    energy_wh: int  # session energy so far (counter minus start)
    charging: bool  # energy was flowing into the EV since the previous point
    power_w: float = 0.0


class Clock(Protocol):
    def time(self) -> float:
        """Wall clock, Unix seconds."""
        ...

    def monotonic(self) -> float: ...


class SystemClock:
    __slots__ = ()

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


def rfc3339(ts: float) -> str:
    """Unix seconds as RFC 3339 UTC with millisecond precision, e.g. 2026-11-26T08:13:20.123Z."""
    dt = datetime.fromtimestamp(ts, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def from_rfc3339(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def new_session_id(ts: float | None = None) -> str:
    """A UUIDv7 (RFC 9562): 48-bit Unix milliseconds, version 7, 74 random bits.

    Time-ordered, so ids sort by start time, and unique without coordination.
    """
    ms = int((time.time() if ts is None else ts) * 1000) & ((1 << 48) - 1)
    rand = int.from_bytes(os.urandom(10), "big")
    rand_a = rand >> 68  # 12 bits
    rand_b = rand & ((1 << 62) - 1)
    value = (ms << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b
    return str(uuid.UUID(int=value))
