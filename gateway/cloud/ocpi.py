"""Finished session records as OCPI 2.2.1 CDR objects (module ``cdrs``, object ``CDR``).

What a site gateway cannot know (the CPO's country code and party id, the location's address
and coordinates, the EVSE's connector standard) comes from ``CdrParty``; its defaults are
placeholders to be configured by whoever sends the CDRs on. Money is an OCPI ``Price``
(``excl_vat``, ``incl_vat``) as JSON numbers, energy in kWh, times in hours.
``tariffs`` is left out (optional in OCPI): the record carries the cost already split into
lines; each charging period names its ``tariff_id``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from gateway.records import SessionPeriod, SessionRecord

__all__ = ["AUTH_METHODS", "TOKEN_TYPES", "CdrParty", "session_to_cdr"]

# evgw user.token_type -> OCPI TokenType
TOKEN_TYPES = {"rfid": "RFID", "keyfob": "RFID", "app": "APP_USER"}
# evgw user.auth -> OCPI AuthMethod
AUTH_METHODS = {
    "local": "WHITELIST",
    "offline_unknown": "WHITELIST",
    "cloud": "AUTH_REQUEST",
    "remote": "COMMAND",
}
# evgw cost line type -> CDR total_*_cost field
_COST_FIELDS = {
    "flat": "total_fixed_cost",
    "energy": "total_energy_cost",
    "time": "total_time_cost",
    "parking_time": "total_parking_cost",
}


def _default_location() -> dict[str, Any]:
    return {
        "address": "unknown",
        "city": "unknown",
        "country": "XXX",  # ISO 3166-1 alpha-3
        "coordinates": {"latitude": "0.000000", "longitude": "0.000000"},
        "connector_standard": "IEC_62196_T2",
        "connector_format": "SOCKET",
        "connector_power_type": "AC_3_PHASE",
    }


@dataclass(frozen=True, slots=True)
class CdrParty:
    """The CPO sending the CDRs, and location details the record does not carry."""

    country_code: str = "XX"  # ISO 3166-1 alpha-2 of the CPO
    party_id: str = "EVG"  # ISO 15118 party id, 3 characters
    location: dict[str, Any] = field(default_factory=_default_location)
    default_currency: str = "EUR"  # only for unpriced records (cost null)


def _number(value: Decimal, places: int) -> float:
    return float(value.quantize(Decimal(1).scaleb(-places)))


def _hours(seconds: float) -> float:
    return _number(Decimal(str(seconds)) / 3600, 4)


def _kwh(wh: int) -> float:
    return _number(Decimal(wh) / 1000, 3)


def _period(period: SessionPeriod, tariff_id: str | None) -> dict[str, Any]:
    dimensions: list[dict[str, Any]] = [{"type": "ENERGY", "volume": _kwh(period.energy_wh)}]
    if period.charging_s:
        dimensions.append({"type": "TIME", "volume": _hours(float(period.charging_s))})
    if period.idle_s:
        dimensions.append({"type": "PARKING_TIME", "volume": _hours(float(period.idle_s))})
    out: dict[str, Any] = {"start_date_time": period.start, "dimensions": dimensions}
    if tariff_id is not None:
        out["tariff_id"] = tariff_id
    return out


def session_to_cdr(record: SessionRecord, party: CdrParty | None = None) -> dict[str, Any]:
    """One ``evgw.session/1`` record as an OCPI 2.2.1 CDR object."""
    party = party or CdrParty()
    user, cost, tariff_id = record.user, record.cost, record.tariff_id
    location = {**_default_location(), **party.location}
    token_uid = user.token or user.id or "UNKNOWN"
    charging_s, idle_s = float(record.charging_s), float(record.idle_s)

    cdr: dict[str, Any] = {
        "country_code": party.country_code,
        "party_id": party.party_id,
        "id": record.session_id,
        "start_date_time": record.started_at,
        "end_date_time": record.ended_at,
        "session_id": record.session_id,
        "cdr_token": {
            "country_code": party.country_code,
            "party_id": party.party_id,
            "uid": token_uid[:36],
            "type": TOKEN_TYPES.get(str(user.token_type), "OTHER"),
            "contract_id": (user.id or token_uid)[:36],
        },
        "auth_method": AUTH_METHODS.get(user.auth, "WHITELIST"),
        "cdr_location": {
            "id": record.site_id,
            "address": location["address"],
            "city": location["city"],
            **({"postal_code": location["postal_code"]} if location.get("postal_code") else {}),
            "country": location["country"],
            "coordinates": location["coordinates"],
            "evse_uid": record.charger_id,
            "evse_id": location.get("evse_id") or record.charger_id,
            "connector_id": str(record.connector),
            "connector_standard": location["connector_standard"],
            "connector_format": location["connector_format"],
            "connector_power_type": location["connector_power_type"],
        },
        "currency": cost.currency if cost is not None else party.default_currency,
        "charging_periods": [_period(p, tariff_id) for p in record.charging_periods],
    }
    if cost is not None:
        cdr["total_cost"] = {
            "excl_vat": float(Decimal(cost.excl_vat)),
            "incl_vat": float(Decimal(cost.incl_vat)),
        }
        parts: dict[str, Decimal] = {}
        for line in cost.lines:
            name = _COST_FIELDS[line.type]
            parts[name] = parts.get(name, Decimal(0)) + Decimal(line.amount)
        for name, amount in parts.items():
            cdr[name] = {"excl_vat": float(amount)}
    else:
        cdr["total_cost"] = {"excl_vat": 0.0, "incl_vat": 0.0}
    cdr["total_energy"] = _kwh(record.energy_wh)
    cdr["total_time"] = _hours(charging_s + idle_s)  # OCPI: charging and not charging
    cdr["total_parking_time"] = _hours(idle_s)
    remarks = list(record.flags)
    if cost is None:
        remarks.insert(0, "unpriced")
    if remarks:
        cdr["remark"] = ("evgw flags: " + ", ".join(remarks))[:255]
    cdr["last_updated"] = record.ended_at
    return cdr
