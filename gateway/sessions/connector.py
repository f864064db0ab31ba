"""A charger connector as the session tracker sees it: its static facts (``ChargerSpec``), an
accepted authorization waiting for a session (``Grant``), what was seen of it between samples
(``Connector``), and how a sample is read (plugged in? charging? a raw counter value)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.errors import CommandError
from gateway.model import (
    AuthSource,
    AuthStatus,
    ChargerStatus,
    DeviceSample,
    IecState,
    StopReason,
    Token,
)
from gateway.sessions.ledger import DEFAULT_COUNTER, DEFAULT_MAX_POWER_W, Counter, OpenSession

__all__ = [
    "CHARGING_POWER_W",
    "ChargerSpec",
    "Connector",
    "Grant",
    "TransactionEnd",
    "TransactionStart",
    "is_charging",
    "is_plugged",
    "note_power",
    "raw_number",
    "user_of",
]

CHARGING_POWER_W = 100.0  # status-less chargers: this much power means charging


@dataclass(frozen=True, slots=True)
class ChargerSpec:
    charger_id: str
    connector: int = 1
    meter_id: str | None = None
    poll_interval_s: float = 1.0
    meter_poll_interval_s: float = 1.0
    max_power_w: float = DEFAULT_MAX_POWER_W
    controllable: bool = False
    # False when the device was only guessed to be a charger (not a configured meter): it is
    # treated as one once a sample shows a charger status, IEC state or tag.
    confirmed: bool = True
    # The charger's session counter restarts at every plug-in (profile ``session_energy_resets:
    # plug``): a plug-in the gateway did not witness can be dated back by it.
    session_counter_resets_on_plug: bool = False
    # Bill from that session counter rather than a coarse lifetime counter (Vestel counts its
    # lifetime energy in 0.1 kWh steps but the session in Wh).
    prefer_session_counter: bool = False
    # The charger reports its own transactions (OCPP StartTransaction/StopTransaction): its
    # sessions open and close only through ``begin_transaction``/``end_transaction``; its
    # samples carry status, power and currents (live view, load management) only.
    transactional: bool = False
    # Range and resolution of each counter by source ("energy_wh", "session_energy_wh",
    # "meter:<id>"), from the device profiles; unknown ones get ``DEFAULT_COUNTER``.
    counters: Mapping[str, Counter] = field(default_factory=dict)

    def counter(self, source: str | None) -> Counter:
        return self.counters.get(source or "", DEFAULT_COUNTER)


@dataclass(frozen=True, slots=True)
class Grant:
    """An accepted authorization of a connector, waiting for (or used by) a session."""

    user: str | None
    token: str | None
    token_type: str | None
    auth: AuthSource
    at: float
    group: str | None = None
    flags: tuple[str, ...] = ()
    tag: str | None = None  # the tag as the charger shows it (may be a truncated UID)

    @classmethod
    def remote(
        cls, user: str, token: str | None, known: Token | None, now: float, tag: str | None = None
    ) -> Grant:
        """A remote (app) start of ``user``, whose token the gateway may know (``known``).
        Refused (CommandError) when that token is blocked or expired; a user the gateway does
        not know is accepted: the cloud vouches for it."""
        if known is not None and known.status_at(now) is not AuthStatus.ACCEPTED:
            raise CommandError("not_authorized", f"user {user!r} is {known.status_at(now).value}")
        return cls(
            user=user,
            token=token if token is not None else (known.id if known is not None else None),
            token_type="app" if token is not None or known is None else known.type.value,
            auth=AuthSource.REMOTE,
            at=now,
            group=known.group if known is not None else None,
            tag=tag,
        )


@dataclass(frozen=True, slots=True)
class TransactionStart:
    """A transaction the charger started at ``ts`` with its register at ``meter_start_wh``,
    authorized by ``grant``; ``ocpp``: the session's ``ocpp`` attributes."""

    charger_id: str
    grant: Grant
    ts: float
    meter_start_wh: float
    ocpp: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class TransactionEnd:
    """The charger's end of a transaction (OCPP StopTransaction, possibly replayed later), or
    ``estimated``: the charger shows no EV and never sent its end. ``ocpp``: attributes merged
    into the session's ``ocpp`` (signed meter values, the stop tag)."""

    session_id: str
    ts: float
    meter_stop_wh: float
    reason: StopReason
    ocpp: Mapping[str, Any] | None = None
    estimated: bool = False


@dataclass(slots=True)
class Connector:
    """What the tracker knows of one charger connector between samples."""

    spec: ChargerSpec
    confirmed: bool = True
    online: bool | None = None
    offline_since: float | None = None
    last_online_ts: float | None = None
    plugged: bool = False
    status: ChargerStatus | None = None
    power_w: float | None = None
    seen_tag: str | None = None
    energy_wh: tuple[float, int] | None = None  # (ts, value) of the charger's lifetime counter
    session_wh: tuple[float, int] | None = None  # (ts, value) of the charger's session counter
    energy_prev: tuple[float, int] | None = None  # the readings before those two
    session_prev: tuple[float, int] | None = None
    anchor_ts: float | None = None
    anchor_wh: int | None = None
    anchor_latched: bool = False
    anchor_reconstructed: bool = False
    anchor_seen_wh: int | None = None  # the counter when a reconstructed anchor was made
    grant: Grant | None = None
    attempt: int = 0
    pending_token: str | None = None
    stopped_while_plugged: bool = False
    session: OpenSession | None = None
    resumed: bool = False
    last_status: tuple[str, bool, str | None] | None = None

    def anchor_at(self, ts: float, wh: int | None) -> None:
        """The session starts here, as read by the gateway: neither latched late nor dated
        back."""
        self.anchor_ts, self.anchor_wh = ts, wh
        self.anchor_latched = self.anchor_reconstructed = False


def is_plugged(sample: DeviceSample, previous: bool) -> bool:
    if sample.iec in (IecState.B, IecState.C, IecState.D):
        return True
    if sample.iec is IecState.A:
        return False
    if sample.status is None:
        return previous
    if sample.status.plugged:
        return True
    if sample.status is ChargerStatus.AVAILABLE:
        return False
    return previous  # faulted / unavailable: the cable state is not known


def is_charging(sample: DeviceSample) -> bool:
    if sample.status is not None:
        return sample.status is ChargerStatus.CHARGING
    power = sample.power_w
    return power is not None and power >= CHARGING_POWER_W


def raw_number(sample: DeviceSample, name: str) -> float | None:
    """A numeric value as the device sent it, NaN and infinities included (they must be seen
    to be refused); None when the device did not report it."""
    value = sample.values.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value


def note_power(session: OpenSession, power_w: float | None, max_power_w: float) -> None:
    """Keep the session's peak power; a value no charger can draw (a glitch) is not kept."""
    if power_w is not None and math.isfinite(power_w) and 0 <= power_w <= max_power_w:
        session.max_power_w = max(session.max_power_w, power_w)


def user_of(grant: Grant) -> dict[str, Any]:
    return {
        "id": grant.user,
        "token": grant.token,
        "token_type": grant.token_type,
        "auth": grant.auth.value,
    }
