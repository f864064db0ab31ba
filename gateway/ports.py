"""Narrow interfaces between the parts of the gateway.

The session logic talks to storage, the uplink, billing and chargers only through these
Protocols, so it never imports SQLite, MQTT or Modbus code. ``app.py`` wires real
implementations; tests wire real ones too (a SQLite file, a mosquitto) or small fakes where a
part cannot run.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias

from gateway.model import AuthSource, AuthStatus, MeterPoint, Token
from gateway.records import SessionRecord, UnsealedRecord

__all__ = [
    "AuthAnswer",
    "AuthRequester",
    "AuthStore",
    "ChargerControl",
    "CommandTarget",
    "JsonObject",
    "JsonValue",
    "KeyValueStore",
    "OutboxRow",
    "RequestLog",
    "Sealer",
    "SessionAuthorizer",
    "SessionEvents",
    "SessionStore",
    "TokenListPart",
    "UplinkStore",
]

JsonValue: TypeAlias = "bool | int | float | str | list[JsonValue] | dict[str, JsonValue] | None"
JsonObject: TypeAlias = "dict[str, JsonValue]"
"""A JSON document as Python values: a session's persisted state, a record, a payload."""

Sealer: TypeAlias = Callable[[UnsealedRecord, int, str], SessionRecord]
"""Seals a finished record as the site's record number ``seq`` after the one whose hash is
``prev_hash``: adds ``hash`` (and a signature where a key is configured). The default is
``UnsealedRecord.sealed``; see gateway/records.py."""


@dataclass(frozen=True, slots=True)
class TokenListPart:
    """Part ``index`` of ``count`` of token-list version ``version`` (gateway.tokenparts)."""

    version: int
    mode: str  # "replace" | "patch"
    index: int
    count: int
    tokens: Sequence[Token]
    remove: Sequence[str]


@dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    stream: str  # "session" | "event" (gateway/outgoing.py)
    topic: str  # suffix below P/S/, e.g. "sessions/finished"
    payload: bytes
    qos: int
    retain: bool
    created_ts: float


class SessionStore(Protocol):
    """Durable session state. Every method commits before it returns (synchronous=FULL for
    session transitions)."""

    async def load_open_sessions(self) -> list[JsonObject]: ...

    async def save_open_session(
        self, session_id: str, charger_id: str, state: JsonObject
    ) -> None: ...

    async def finish_session(self, record: UnsealedRecord) -> SessionRecord:
        """In one transaction: give the record the next ``seq`` of the site and the previous
        record's hash as ``prev_hash``, seal it, store it, drop the open session row, and queue it
        on the outbox (topic ``sessions/finished``). Returns the sealed record. Idempotent on
        ``session_id``: finishing an already finished session returns the stored record."""
        ...

    async def enqueue(
        self, stream: str, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> int: ...

    async def add_readings(
        self, rows: Sequence[tuple[str, float, Mapping[str, JsonValue]]]
    ) -> None:
        """Buffer readings (device_id, ts, values) in one batch; dropped (and said so once) while
        the disk cap is reached."""
        ...

    async def add_session_point(self, session_id: str, point: MeterPoint) -> None:
        """Append a point of an open session's energy curve (kept for pricing)."""
        ...

    async def session_points(self, session_id: str) -> list[MeterPoint]:
        """The curve of an open session, oldest first (to continue it after a restart)."""
        ...


class SessionEvents(Protocol):
    """What the session manager reports to the rest of the gateway, one method per kind of
    event, each called once what it reports is on disk. ``gateway.app.Gateway`` implements it
    (live view, charger statuses to the uplink, ``sessions/started`` through the outbox)."""

    async def charger_status(self, charger_id: str, status: JsonObject) -> None:
        """A charger's status, online state or session changed: the CONTRACT ``status/<id>``
        payload plus ``device_id``."""
        ...

    async def session_started(self, started: JsonObject) -> None:
        """A session started and is persisted: the CONTRACT ``sessions/started`` payload."""
        ...

    async def session_finished(self, record: SessionRecord) -> None:
        """A session's record is sealed, stored and queued (``SessionStore.finish_session``)."""
        ...


class AuthAnswer(Protocol):
    """The answer for one presented token (``gateway.auth.AuthDecision``)."""

    @property
    def status(self) -> AuthStatus: ...

    @property
    def user(self) -> str | None: ...

    @property
    def source(self) -> AuthSource: ...

    @property
    def token(self) -> Token | None: ...

    @property
    def offline_unknown(self) -> bool: ...

    @property
    def accepted(self) -> bool: ...


class SessionAuthorizer(Protocol):
    """What the session manager asks of authorization (``gateway.auth.Authorizer``)."""

    async def authorize(self, token_id: str, token_type: str, charger_id: str) -> AuthAnswer:
        """Decide on a presented token (local list, cache, cloud, offline policy)."""
        ...

    def check(self, token_id: str, charger_id: str | None = None) -> AuthStatus | None:
        """The token's status by the lists alone (None when no list knows it)."""
        ...

    def lookup_user(self, user: str) -> Token | None:
        """The token of a user the lists know (a remote start names a user)."""
        ...

    def add_listener(self, listener: Callable[[], Awaitable[None] | None]) -> None:
        """Call ``listener`` after each change of the token lists."""
        ...


class KeyValueStore(Protocol):
    """Small durable values by key (OCPP transaction records, token-list parts)."""

    async def kv_get(self, key: str, default: Any = None) -> Any: ...

    async def kv_put(self, key: str, value: Any) -> None: ...


class RequestLog(Protocol):
    """Durable memory of cloud command request ids and the replies sent for them."""

    async def request_reply(self, request_id: str) -> tuple[bool, JsonObject | None]:
        """(seen, reply stored for it or None)."""
        ...

    async def remember_request_id(self, request_id: str) -> bool:
        """Spend a request id (no reply yet); False when it was seen before."""
        ...

    async def save_request_reply(self, request_id: str, reply: JsonObject) -> None: ...


class UplinkStore(RequestLog, Protocol):
    async def outbox_fetch(self, stream: str, limit: int, after_id: int = 0) -> list[OutboxRow]: ...

    async def outbox_ack(self, ids: Sequence[int]) -> None: ...

    async def outbox_backlog(self) -> dict[str, int]: ...

    async def readings_fetch_wire(
        self, limit: int, after_id: int = 0
    ) -> list[tuple[int, str, bytes]]: ...

    async def readings_mark_synced(self, ids: Sequence[int]) -> None: ...


class AuthStore(Protocol):
    """Persistence for the cloud-pushed token list and the authorization cache."""

    async def load_cloud_list(self) -> tuple[int, list[Token]]:
        """(version, tokens); version 0 and [] when none was ever pushed."""
        ...

    async def save_cloud_list(self, version: int, tokens: Sequence[Token]) -> None: ...

    async def load_auth_cache(self) -> list[tuple[Token, float]]:
        """Cached cloud answers with the time they were cached."""
        ...

    async def cache_auth(self, token: Token, cached_at: float) -> None: ...


class AuthRequester(Protocol):
    """The uplink side of online authorization (CONTRACT ``auth/request``)."""

    @property
    def online(self) -> bool: ...

    async def send_auth_request(
        self, request_id: str, token: str, token_type: str, charger_id: str
    ) -> None: ...


class ChargerControl(Protocol):
    """What session logic may ask of a charger. Implementations decide how (enable register,
    current limit 0, nothing if the charger has no control)."""

    def can_control(self, device_id: str) -> bool: ...

    async def set_enabled(self, device_id: str, enabled: bool) -> None: ...

    async def set_current_limit(self, device_id: str, current_a: float) -> None: ...


class CommandTarget(Protocol):
    """What cloud commands reach. Each raises gateway.errors.CommandError to refuse; a refused
    command changes nothing."""

    async def remote_start(self, charger_id: str, user: str, token: str | None) -> JsonObject: ...

    async def remote_stop(self, charger_id: str | None, session_id: str | None) -> JsonObject: ...

    async def update_tokens(
        self, version: int, mode: str, tokens: Sequence[Token], remove: Sequence[str]
    ) -> JsonObject: ...

    async def update_token_part(self, part: TokenListPart) -> JsonObject:
        """One part of a token list pushed in parts (gateway.tokenparts)."""
        ...

    async def update_tariffs(
        self, version: int, tariffs: Mapping[str, JsonValue]
    ) -> JsonObject: ...

    async def change_availability(self, charger_id: str, available: bool) -> JsonObject:
        """Take a charger out of service (False) or back (OCPP ChangeAvailability)."""
        ...

    async def reset(self, charger_id: str, hard: bool) -> JsonObject:
        """Restart a charger (OCPP Reset)."""
        ...

    async def auth_response(
        self, request_id: str, status: str, user: str | None, expires_at: float | None
    ) -> None: ...

    async def set_grid_limit(
        self,
        request_id: str,
        scope: str,
        max_current_a: float | None,
        max_power_w: float | None,
        expires_at: float | None,
        reason: str | None,
    ) -> JsonObject:
        """A ``limit`` command; both values None lifts the scope's limit."""
        ...
