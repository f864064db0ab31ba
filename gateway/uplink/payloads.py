"""Every MQTT payload as a pydantic model: the one description of the wire form.

The JSON Schemas in ``gateway/uplink/schemas/`` are generated from these models
(:func:`gateway.uplink.schemas.generate`) and checked in; a test keeps the two equal. The
finished session record is :class:`gateway.records.SessionRecord`; the field types shared with
it are in :mod:`gateway.jsontypes`. Payloads are validated against the generated schemas; a model
reads what its schema accepts (and, laxer, an explicit null for a key that may only be absent).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel, model_validator
from pydantic.json_schema import SkipJsonSchema

from gateway.jsontypes import (
    SNAKE,
    Hex64,
    Ident,
    NonNegative,
    Number,
    RecordSignature,
    TokenTypeName,
    UtcTime,
    Version,
    WireModel,
)
from gateway.records import SessionRecord

__all__ = [
    "PAYLOAD_MODELS",
    "AuthRequest",
    "AuthResponse",
    "ChargerStatus",
    "CommandAvailability",
    "CommandLimit",
    "CommandReply",
    "CommandReset",
    "CommandStart",
    "CommandStop",
    "CommandTariffs",
    "CommandTokens",
    "GatewayKey",
    "GatewayStatus",
    "GridLimit",
    "Readings",
    "SessionStarted",
]

# -- signatures ------------------------------------------------------------------------------


class CommandSignature(WireModel):
    alg: Literal["ed25519"]
    key_id: Annotated[str, Field(pattern=r"^[0-9a-f]{16}$")] | SkipJsonSchema[None] = None
    value: Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9+/]+={0,2}$")]


_ISSUED_AT = (
    "when the cloud made this message (RFC 3339 UTC); required with uplink.command_key, "
    "refused when older than uplink.command_max_age"
)
_SIGNATURE = (
    "Ed25519 signature of the cloud over 'evgw.command/1' LF topic LF canonical JSON of this "
    "payload without signature; required with uplink.command_key"
)


IssuedAt = Annotated[UtcTime, Field(description=_ISSUED_AT)] | SkipJsonSchema[None]
Envelope = Annotated[CommandSignature, Field(description=_SIGNATURE)] | SkipJsonSchema[None]
"""``issued_at`` and ``signature``: what every message from the cloud may carry (the last keys
of each command; ``gateway.uplink.envelope`` checks them)."""


# -- gateway -> cloud ------------------------------------------------------------------------


class GatewayStatus(WireModel):
    model_config = ConfigDict(title="P/S/gateway/status (retained; the will sets offline)")

    state: Literal["online", "offline"]
    version: str
    ts: UtcTime | SkipJsonSchema[None] = None


class KeyRotation(WireModel):
    schema_: Literal["evgw.key-rotation/1"] = Field(alias="schema")
    site_id: Ident
    key_id: Ident
    public_key: Hex64
    previous_key_id: Ident
    issued_at: UtcTime
    signature: RecordSignature


class GatewayKey(WireModel):
    model_config = ConfigDict(
        title="P/S/gateway/key (retained): the public key that verifies session signatures"
    )

    alg: Literal["ed25519"]
    key_id: Ident
    public_key_pem: Annotated[str, Field(min_length=1)]
    ts: UtcTime | SkipJsonSchema[None] = None
    rotation: (
        Annotated[
            KeyRotation,
            Field(
                description="evgw.key-rotation/1: the previous key hands the site over to this "
                "key (see docs/billing.md, trust model)"
            ),
        ]
        | SkipJsonSchema[None]
    ) = None


class ChargerStatus(WireModel):
    model_config = ConfigDict(title="P/S/chargers/{device}/status (retained)", extra="allow")

    status: Literal[
        "available",
        "preparing",
        "charging",
        "suspended_ev",
        "suspended_evse",
        "finishing",
        "faulted",
        "unavailable",
    ]
    online: bool
    session_id: str | None
    power_w: Number | None
    ts: UtcTime


class Reading(WireModel):
    """One reading: its time and any number of scalar values."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, Number | str | bool | None]

    ts: UtcTime


class Readings(WireModel):
    model_config = ConfigDict(title="P/S/readings/{device}: a batch of readings")

    schema_: Literal["evgw.readings/1"] = Field(alias="schema")
    device_id: Ident
    readings: Annotated[list[Reading], Field(min_length=1)]


class GridLimit(WireModel):
    model_config = ConfigDict(
        title="P/S/grid/limit (retained): the site limit in force and where it comes from",
        extra="allow",
    )

    schema_: Literal["evgw.grid-limit/1"] = Field(alias="schema")
    max_current_a: NonNegative
    source: Literal["connection", "schedule", "signal", "cloud"]
    reason: str | None
    expires_at: str | None
    chargers: dict[str, Any]
    signal: bool | None
    ts: UtcTime


class AuthRequest(WireModel):
    model_config = ConfigDict(title="P/S/auth/request: an unknown token seen while online")

    request_id: Ident
    token: Annotated[str, Field(min_length=1, max_length=256)]
    token_type: TokenTypeName
    charger_id: Ident


class SessionStarted(WireModel):
    model_config = ConfigDict(title="P/S/sessions/started")

    schema_: Literal["evgw.session-started/1"] = Field(alias="schema")
    session_id: Ident
    charger_id: Ident
    user: str | None
    started_at: UtcTime
    meter_start_wh: int | None


# -- cloud -> gateway ------------------------------------------------------------------------


class CommandStart(WireModel):
    model_config = ConfigDict(
        title="P/S/commands/start: remote authorization of a user on a charger"
    )

    request_id: Ident
    charger_id: Ident
    user: Annotated[str, Field(min_length=1, max_length=256)]
    token: Annotated[str, Field(max_length=256)] | None = None
    issued_at: IssuedAt = None
    signature: Envelope = None


class CommandStop(WireModel):
    model_config = ConfigDict(
        title="P/S/commands/stop: stop by charger or by session",
        json_schema_extra={"anyOf": [{"required": ["charger_id"]}, {"required": ["session_id"]}]},
    )

    request_id: Ident
    charger_id: Ident | SkipJsonSchema[None] = None
    session_id: Ident | SkipJsonSchema[None] = None
    issued_at: IssuedAt = None
    signature: Envelope = None

    @model_validator(mode="after")
    def _one_target(self) -> CommandStop:
        if self.charger_id is None and self.session_id is None:
            raise ValueError("needs charger_id or session_id")
        return self


class CommandAvailability(WireModel):
    model_config = ConfigDict(
        title="P/S/commands/availability: take an OCPP charger out of service or back "
        "(ChangeAvailability)"
    )

    request_id: Ident
    charger_id: Ident
    available: bool
    issued_at: IssuedAt = None
    signature: Envelope = None


class CommandReset(WireModel):
    model_config = ConfigDict(
        title="P/S/commands/reset: restart an OCPP charger (Reset: soft ends transactions first)"
    )

    request_id: Ident
    charger_id: Ident
    type: Literal["soft", "hard"] | SkipJsonSchema[None] = None
    issued_at: IssuedAt = None
    signature: Envelope = None


_LIMIT_FORMS = ("max_current_a", "max_power_w", "clear")


class CommandLimit(WireModel):
    model_config = ConfigDict(
        title="P/S/commands/limit: a lower limit set by the grid operator, for the site or one "
        "charger",
        json_schema_extra={
            "description": "One of max_current_a (per phase) or max_power_w (W; as current at "
            "230 V on three phases), or clear: true to lift the scope's limit. Without "
            "expires_at the limit holds until cleared or replaced.",
            "oneOf": [{"required": [name]} for name in _LIMIT_FORMS],
        },
    )

    request_id: Ident
    scope: Annotated[str, Field(min_length=1, max_length=64)]
    max_current_a: Annotated[float, Field(ge=0, le=10_000)] | SkipJsonSchema[None] = None
    max_power_w: Annotated[float, Field(ge=0, le=10_000_000)] | SkipJsonSchema[None] = None
    clear: Literal[True] | SkipJsonSchema[None] = None
    expires_at: (
        Annotated[
            str,
            Field(pattern=r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})$"),
        ]
        | None
    ) = None
    reason: Annotated[str, Field(max_length=200)] | None = None
    issued_at: IssuedAt = None
    signature: Envelope = None

    @model_validator(mode="after")
    def _one_form(self) -> CommandLimit:
        given = [name for name in _LIMIT_FORMS if name in self.model_fields_set]
        if len(given) != 1:
            raise ValueError("needs exactly one of max_current_a, max_power_w, clear")
        return self


class CommandTariffs(WireModel):
    model_config = ConfigDict(title="P/S/commands/tariffs: replace the tariffs (versioned)")

    request_id: Ident
    version: Version
    tariffs: dict[str, dict[str, Any]]
    issued_at: IssuedAt = None
    signature: Envelope = None


class CloudToken(WireModel):
    id: Annotated[str, Field(min_length=1, max_length=256)]
    type: TokenTypeName
    user: Annotated[str, Field(min_length=1, max_length=256)]
    status: Literal["accepted", "blocked", "expired"] | SkipJsonSchema[None] = None
    expires_at: UtcTime | NonNegative | None = None
    group: Annotated[str, Field(max_length=64)] | None = None


class TokenListPart(WireModel):
    index: Annotated[int, Field(ge=1, le=1000)]
    count: Annotated[int, Field(ge=1, le=1000)]


_PART = (
    "one part of a list too large for one message (a command payload is at most 64 KiB, ~1,050 "
    "tokens): parts 1..count of the same version and mode; the list switches when the last one "
    "arrives"
)


class CommandTokens(WireModel):
    model_config = ConfigDict(
        title="P/S/commands/tokens: replace or patch the cloud token list (versioned)"
    )

    request_id: Ident
    version: Version
    mode: Literal["replace", "patch"]
    tokens: Annotated[list[CloudToken], Field(max_length=100_000)] | SkipJsonSchema[None] = None
    remove: list[Annotated[str, Field(min_length=1, max_length=256)]] | SkipJsonSchema[None] = None
    part: Annotated[TokenListPart, Field(description=_PART)] | SkipJsonSchema[None] = None
    issued_at: IssuedAt = None
    signature: Envelope = None


class AuthResponse(WireModel):
    model_config = ConfigDict(title="P/S/auth/response: the cloud's answer to an auth request")

    request_id: Ident
    status: Literal["accepted", "blocked", "expired", "unknown"]
    user: Annotated[str, Field(max_length=256)] | None = None
    expires_at: UtcTime | NonNegative | None = None
    issued_at: IssuedAt = None
    signature: Envelope = None


class ReplyError(WireModel):
    code: Annotated[str, Field(pattern=SNAKE)]
    message: str


class CommandReplyOk(WireModel):
    request_id: str | None
    ok: Literal[True]
    result: dict[str, Any]


class CommandReplyError(WireModel):
    request_id: str | None
    ok: Literal[False]
    error: ReplyError


class CommandReply(RootModel[CommandReplyOk | CommandReplyError]):
    model_config = ConfigDict(title="P/S/commands/{name}/reply", frozen=True)


PAYLOAD_MODELS: dict[str, type[BaseModel]] = {
    "auth-request": AuthRequest,
    "auth-response": AuthResponse,
    "charger-status": ChargerStatus,
    "command-availability": CommandAvailability,
    "command-limit": CommandLimit,
    "command-reply": CommandReply,
    "command-reset": CommandReset,
    "command-start": CommandStart,
    "command-stop": CommandStop,
    "command-tariffs": CommandTariffs,
    "command-tokens": CommandTokens,
    "gateway-key": GatewayKey,
    "gateway-status": GatewayStatus,
    "grid-limit": GridLimit,
    "readings": Readings,
    "session": SessionRecord,
    "session-started": SessionStarted,
}
"""Each payload schema's name (``gateway/uplink/schemas/{name}.json``) and its model."""
