"""Every MQTT payload as a pydantic model: the one description of the wire form.

The JSON Schemas in ``gateway/uplink/schemas/`` are generated from these models
(:func:`gateway.uplink.schemas.generate`) and checked in; a test keeps the two equal. A key
that may be absent but never ``null`` is typed ``X | SkipJsonSchema[None] = None``: the model
reads it as None, the schema does not accept ``null``. Numbers the cloud hashes (a session record)
keep the int or float they came as, so a record read into a model dumps to the same bytes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel, WithJsonSchema, model_validator
from pydantic.json_schema import SkipJsonSchema

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
    "Cost",
    "CostLine",
    "GatewayKey",
    "GatewayStatus",
    "GridLimit",
    "OcppTransaction",
    "Payload",
    "Readings",
    "RecordSignature",
    "SessionPeriod",
    "SessionRecordBody",
    "SessionStarted",
    "SessionUser",
]

UTC_TIME = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z$"
DECIMAL = r"^-?[0-9]+(\.[0-9]+)?$"
SNAKE = r"^[a-z][a-z0-9_]*$"
HEX64 = r"^[0-9a-f]{64}$"
MAX_SAFE_VERSION = 2**53  # a version number every JSON reader holds exactly

UtcTime = Annotated[str, Field(pattern=UTC_TIME)]
Ident = Annotated[str, Field(min_length=1, max_length=128)]
Decimal = Annotated[str, Field(pattern=DECIMAL)]
Hex64 = Annotated[str, Field(pattern=HEX64)]
Version = Annotated[int, Field(ge=1, le=MAX_SAFE_VERSION)]
TokenTypeName = Literal["rfid", "keyfob", "app"]
# A JSON number as it came (int or float): the schema says "number", the model keeps the type.
Number = Annotated[int | float, WithJsonSchema({"type": "number"})]
NonNegative = Annotated[
    Annotated[int, Field(ge=0)] | Annotated[float, Field(ge=0)],
    WithJsonSchema({"type": "number", "minimum": 0}),
]


class Payload(BaseModel):
    """A payload: unknown keys refused, strict JSON types, immutable."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=True)


# -- signatures ------------------------------------------------------------------------------


class CommandSignature(Payload):
    alg: Literal["ed25519"]
    key_id: Annotated[str, Field(pattern=r"^[0-9a-f]{16}$")] | SkipJsonSchema[None] = None
    value: Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9+/]+={0,2}$")]


class RecordSignature(Payload):
    """Ed25519 over the ASCII hex of a hash (session records, key rotations)."""

    alg: Literal["ed25519"]
    key_id: Ident
    value: Annotated[str, Field(min_length=1)]


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


class GatewayStatus(Payload):
    model_config = ConfigDict(title="P/S/gateway/status (retained; the will sets offline)")

    state: Literal["online", "offline"]
    version: str
    ts: UtcTime | SkipJsonSchema[None] = None


class KeyRotation(Payload):
    schema_: Literal["evgw.key-rotation/1"] = Field(alias="schema")
    site_id: Ident
    key_id: Ident
    public_key: Hex64
    previous_key_id: Ident
    issued_at: UtcTime
    signature: RecordSignature


class GatewayKey(Payload):
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


class ChargerStatus(Payload):
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


class Reading(Payload):
    """One reading: its time and any number of scalar values."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, Number | str | bool | None]

    ts: UtcTime


class Readings(Payload):
    model_config = ConfigDict(title="P/S/readings/{device}: a batch of readings")

    schema_: Literal["evgw.readings/1"] = Field(alias="schema")
    device_id: Ident
    readings: Annotated[list[Reading], Field(min_length=1)]


class GridLimit(Payload):
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


class AuthRequest(Payload):
    model_config = ConfigDict(title="P/S/auth/request: an unknown token seen while online")

    request_id: Ident
    token: Annotated[str, Field(min_length=1, max_length=256)]
    token_type: TokenTypeName
    charger_id: Ident


class SessionStarted(Payload):
    model_config = ConfigDict(title="P/S/sessions/started")

    schema_: Literal["evgw.session-started/1"] = Field(alias="schema")
    session_id: Ident
    charger_id: Ident
    user: str | None
    started_at: UtcTime
    meter_start_wh: int | None


# -- the finished session record (evgw.session/1) ---------------------------------------------


class SessionUser(Payload):
    id: str | None
    token: str | None = None
    token_type: TokenTypeName | None = None
    auth: Literal["local", "cloud", "remote", "offline_unknown"]


class SessionPeriod(Payload):
    start: UtcTime
    tariff_element: Annotated[int, Field(ge=0)] | None = None
    energy_wh: Annotated[int, Field(ge=0)]
    charging_s: NonNegative | SkipJsonSchema[None] = None
    idle_s: NonNegative | SkipJsonSchema[None] = None


class CostLine(Payload):
    type: Literal["energy", "time", "parking_time", "flat"]
    quantity: Decimal
    unit: str
    unit_price: Decimal
    amount: Decimal
    tariff_element: int | SkipJsonSchema[None] = None


class Cost(Payload):
    currency: Annotated[str, Field(pattern=r"^[A-Z]{3}$")]
    excl_vat: Decimal
    vat: Decimal
    incl_vat: Decimal
    vat_percent: Decimal | SkipJsonSchema[None] = None
    lines: list[CostLine]


class SignedMeterValues(Payload):
    start: str | SkipJsonSchema[None] = None
    stop: str | SkipJsonSchema[None] = None


class OcppTransaction(Payload):
    charge_point_id: Annotated[str, Field(min_length=1, max_length=48)]
    connector_id: int | SkipJsonSchema[None] = None
    transaction_id: int
    id_tag: Annotated[str, Field(max_length=20)] | SkipJsonSchema[None] = None
    clock_skew_s: (
        Annotated[
            Number,
            Field(
                description="the charger's clock minus the gateway's when the session started; "
                "its timestamps were corrected by it"
            ),
        ]
        | SkipJsonSchema[None]
    ) = None
    stop_id_tag: Annotated[str, Field(max_length=20)] | SkipJsonSchema[None] = None
    signed_meter_values: (
        Annotated[
            SignedMeterValues,
            Field(description="signed meter value documents (e.g. OCMF) as the charger sent them"),
        ]
        | SkipJsonSchema[None]
    ) = None


_FLAGS = (
    "What a bill reader must know: end_estimated, meter_reset, comms_gap, offline_authorized, "
    "start_latched, start_reconstructed, not_billable, no_meter, unidentified, unpriced, "
    "energy_fallback (the session ended on an implausible meter reading; energy up to the last "
    "plausible one), tariff_fallback (the tariff meant did not exist at the start; tariff_id "
    "names the one applied). Consumers must accept flags they do not know."
)
_OCPP = (
    "sessions of OCPP chargers: what the charger's protocol knows of the transaction (optional; "
    "absent for Modbus chargers)"
)


class SessionRecordBody(Payload):
    """The finished session record ``evgw.session/1`` as published on ``P/S/sessions/finished``.

    :class:`gateway.records.SessionRecord` adds its behaviour (canonical JSON, hash, seal).
    """

    model_config = ConfigDict(title="P/S/sessions/finished: finished session record evgw.session/1")

    schema_: Literal["evgw.session/1"] = Field(alias="schema")
    session_id: Ident
    seq: Annotated[int, Field(ge=1)]
    site_id: Ident
    charger_id: Ident
    connector: Annotated[int, Field(ge=1)]
    user: SessionUser
    started_at: UtcTime
    ended_at: UtcTime
    charging_s: NonNegative
    idle_s: NonNegative
    meter_start_wh: int | None
    meter_stop_wh: int | None
    energy_wh: Annotated[int, Field(ge=0)]
    max_power_w: NonNegative | None
    stop_reason: Literal[
        "ev_disconnected", "remote", "local", "deauthorized", "power_loss", "unknown"
    ]
    tariff_id: str | None
    tariff_version: str | None
    charging_periods: list[SessionPeriod]
    cost: Cost | None
    flags: Annotated[list[Annotated[str, Field(pattern=SNAKE)]], Field(description=_FLAGS)]
    prev_hash: Hex64
    hash: Hex64
    ocpp: Annotated[OcppTransaction, Field(description=_OCPP)] | SkipJsonSchema[None] = None
    signature: RecordSignature | SkipJsonSchema[None] = None


# -- cloud -> gateway ------------------------------------------------------------------------


class CommandStart(Payload):
    model_config = ConfigDict(
        title="P/S/commands/start: remote authorization of a user on a charger"
    )

    request_id: Ident
    charger_id: Ident
    user: Annotated[str, Field(min_length=1, max_length=256)]
    token: Annotated[str, Field(max_length=256)] | None = None
    issued_at: IssuedAt = None
    signature: Envelope = None


class CommandStop(Payload):
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


class CommandAvailability(Payload):
    model_config = ConfigDict(
        title="P/S/commands/availability: take an OCPP charger out of service or back "
        "(ChangeAvailability)"
    )

    request_id: Ident
    charger_id: Ident
    available: bool
    issued_at: IssuedAt = None
    signature: Envelope = None


class CommandReset(Payload):
    model_config = ConfigDict(
        title="P/S/commands/reset: restart an OCPP charger (Reset: soft ends transactions first)"
    )

    request_id: Ident
    charger_id: Ident
    type: Literal["soft", "hard"] | SkipJsonSchema[None] = None
    issued_at: IssuedAt = None
    signature: Envelope = None


_LIMIT_FORMS = ("max_current_a", "max_power_w", "clear")


class CommandLimit(Payload):
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


class CommandTariffs(Payload):
    model_config = ConfigDict(title="P/S/commands/tariffs: replace the tariffs (versioned)")

    request_id: Ident
    version: Version
    tariffs: dict[str, dict[str, Any]]
    issued_at: IssuedAt = None
    signature: Envelope = None


class CloudToken(Payload):
    id: Annotated[str, Field(min_length=1, max_length=256)]
    type: TokenTypeName
    user: Annotated[str, Field(min_length=1, max_length=256)]
    status: Literal["accepted", "blocked", "expired"] | SkipJsonSchema[None] = None
    expires_at: UtcTime | NonNegative | None = None
    group: Annotated[str, Field(max_length=64)] | None = None


class TokenListPart(Payload):
    index: Annotated[int, Field(ge=1, le=1000)]
    count: Annotated[int, Field(ge=1, le=1000)]


_PART = (
    "one part of a list too large for one message (a command payload is at most 64 KiB, ~1,050 "
    "tokens): parts 1..count of the same version and mode; the list switches when the last one "
    "arrives"
)


class CommandTokens(Payload):
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


class AuthResponse(Payload):
    model_config = ConfigDict(title="P/S/auth/response: the cloud's answer to an auth request")

    request_id: Ident
    status: Literal["accepted", "blocked", "expired", "unknown"]
    user: Annotated[str, Field(max_length=256)] | None = None
    expires_at: UtcTime | NonNegative | None = None
    issued_at: IssuedAt = None
    signature: Envelope = None


class ReplyError(Payload):
    code: Annotated[str, Field(pattern=SNAKE)]
    message: str


class CommandReplyOk(Payload):
    request_id: str | None
    ok: Literal[True]
    result: dict[str, Any]


class CommandReplyError(Payload):
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
    "session": SessionRecordBody,
    "session-started": SessionStarted,
}
"""Each payload schema's name (``gateway/uplink/schemas/{name}.json``) and its model."""
