"""Finished session records: the typed record, canonical JSON, the hash chain and signatures.

``hash`` is SHA-256 over the canonical JSON of the record without ``hash`` and ``signature``;
``prev_hash`` links each record to the previous one of the same site (``GENESIS`` for the first);
``signature`` is an Ed25519 signature over the ASCII hex of ``hash``. :class:`SessionRecord` is
the record as a frozen model; its JSON Schema (``gateway/uplink/schemas/session.json``) is
generated from it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, Literal, Self, TypeAlias

from pydantic import ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema

from gateway.jsontypes import (
    SNAKE,
    DecimalText,
    Hex64,
    Ident,
    NonNegative,
    Number,
    RecordSignature,
    TokenTypeName,
    UtcTime,
    WireModel,
)

__all__ = [
    "GENESIS",
    "UNHASHED_FIELDS",
    "Cost",
    "CostLine",
    "OcppTransaction",
    "SessionFacts",
    "SessionPeriod",
    "SessionRecord",
    "SessionUser",
    "Signer",
    "UnsealedRecord",
    "canonical_json",
    "record_hash",
    "seal",
]

GENESIS = "0" * 64
UNHASHED_FIELDS = frozenset({"hash", "signature"})
_CHAIN_FIELDS = frozenset({"seq", "prev_hash"}) | UNHASHED_FIELDS

Signer: TypeAlias = Callable[[bytes], Mapping[str, Any]]
"""Signs the ASCII hex of a hash: the ``signature`` object (gateway.keys.Signer.sign)."""


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no insignificant white space, UTF-8: the same bytes on every machine."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def record_hash(record: Mapping[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k not in UNHASHED_FIELDS}
    return hashlib.sha256(canonical_json(body)).hexdigest()


def seal(record: Mapping[str, Any], sign: Signer | None = None) -> dict[str, Any]:
    """Add ``hash`` (and ``signature`` when ``sign`` is given: a callable bytes -> dict)."""
    out = dict(record)
    out.pop("signature", None)
    out["hash"] = record_hash(out)
    if sign is not None:
        out["signature"] = dict(sign(out["hash"].encode("ascii")))
    return out


class SessionUser(WireModel):
    id: str | None
    token: str | None = None
    token_type: TokenTypeName | None = None
    auth: Literal["local", "cloud", "remote", "offline_unknown"]


class SessionPeriod(WireModel):
    start: UtcTime
    tariff_element: Annotated[int, Field(ge=0)] | None = None
    energy_wh: Annotated[int, Field(ge=0)]
    charging_s: NonNegative | SkipJsonSchema[None] = None
    idle_s: NonNegative | SkipJsonSchema[None] = None


class CostLine(WireModel):
    type: Literal["energy", "time", "parking_time", "flat"]
    quantity: DecimalText
    unit: str
    unit_price: DecimalText
    amount: DecimalText
    tariff_element: int | SkipJsonSchema[None] = None


class Cost(WireModel):
    currency: Annotated[str, Field(pattern=r"^[A-Z]{3}$")]
    excl_vat: DecimalText
    vat: DecimalText
    incl_vat: DecimalText
    vat_percent: DecimalText | SkipJsonSchema[None] = None
    lines: list[CostLine]


class SignedMeterValues(WireModel):
    start: str | SkipJsonSchema[None] = None
    stop: str | SkipJsonSchema[None] = None


class OcppTransaction(WireModel):
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


class _Record(WireModel):
    # to_dict() dumps the keys the record was made (or read) with, numbers as int or float as
    # given: the JSON object it was read from, so existing hashes and signatures still verify.

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """The record of a JSON object (pydantic ``ValidationError`` when it is not one)."""
        return cls.model_validate(data)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: the keys it was made with, numbers as int or float as given."""
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True)


class SessionFacts(_Record):
    """What the session tracker knows of a finished session: the record without its price
    (``charging_periods``, ``cost``: the pricer's) and its place in the site's chain (``seq``,
    hashes, signature: the store's)."""

    schema_: Literal["evgw.session/1"] = Field(alias="schema")
    session_id: Ident
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
    flags: Annotated[list[Annotated[str, Field(pattern=SNAKE)]], Field(description=_FLAGS)]
    ocpp: Annotated[OcppTransaction, Field(description=_OCPP)] | SkipJsonSchema[None] = None

    def priced(
        self, charging_periods: Sequence[Mapping[str, Any]], cost: Mapping[str, Any] | None
    ) -> UnsealedRecord:
        """The record with its price (pydantic ``ValidationError`` when the price is no
        record's)."""
        return UnsealedRecord.from_dict(
            {**self.to_dict(), "charging_periods": list(charging_periods), "cost": cost}
        )


class UnsealedRecord(SessionFacts):
    """A finished session, priced: what the store seals into a :class:`SessionRecord`."""

    charging_periods: list[SessionPeriod]
    cost: Cost | None

    def sealed(self, seq: int, prev_hash: str, sign: Signer | None = None) -> SessionRecord:
        """The site's ``seq``-th record, chained to ``prev_hash``, hashed (and signed with
        ``sign``). The hash covers the very JSON object the record dumps (``to_dict``)."""
        body = {k: v for k, v in self.to_dict().items() if k not in _CHAIN_FIELDS}
        return SessionRecord.from_dict(seal({**body, "seq": seq, "prev_hash": prev_hash}, sign))


class SessionRecord(UnsealedRecord):
    """A finished session record, sealed: what the gateway keeps, publishes and signs, and what
    the cloud bills. Its hash covers the canonical JSON of every key but hash and signature."""

    model_config = ConfigDict(title="P/S/sessions/finished: finished session record evgw.session/1")

    seq: Annotated[int, Field(ge=1)]
    prev_hash: Hex64
    hash: Hex64
    signature: RecordSignature | SkipJsonSchema[None] = None

    def canonical(self) -> bytes:
        return canonical_json(self.to_dict())

    def body_hash(self) -> str:
        """The hash its content has (``hash`` holds the one it claims)."""
        return record_hash(self.to_dict())
