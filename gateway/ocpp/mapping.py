"""OCPP 1.6 words and values as the gateway's domain sees them. Pure functions, no I/O.

Facts from the OCPP 1.6 edition 2 specification (sections 7.7 ChargePointStatus, 7.31 Measurand,
7.45 SampledValue, 7.46 UnitOfMeasure, 7.39 Reason) and its JSON schemas as shipped by the
``ocpp`` package.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from gateway.model import AuthStatus, ChargerStatus, StopReason

__all__ = [
    "ENERGY_MEASURAND",
    "MeterSample",
    "id_tag_status",
    "parse_meter_values",
    "parse_timestamp",
    "status_of",
    "stop_reason_of",
    "timestamp",
]

ENERGY_MEASURAND = "Energy.Active.Import.Register"  # the default measurand when none is given

_STATUS = {
    "Available": ChargerStatus.AVAILABLE,
    "Preparing": ChargerStatus.PREPARING,
    "Charging": ChargerStatus.CHARGING,
    "SuspendedEV": ChargerStatus.SUSPENDED_EV,
    "SuspendedEVSE": ChargerStatus.SUSPENDED_EVSE,
    "Finishing": ChargerStatus.FINISHING,
    # Reserved: no EV, but not free for anyone either; the CONTRACT has no word for it.
    "Reserved": ChargerStatus.UNAVAILABLE,
    "Unavailable": ChargerStatus.UNAVAILABLE,
    "Faulted": ChargerStatus.FAULTED,
}

_REASON = {
    "EVDisconnected": StopReason.EV_DISCONNECTED,
    "Local": StopReason.LOCAL,
    "Remote": StopReason.REMOTE,
    "DeAuthorized": StopReason.DEAUTHORIZED,
    "PowerLoss": StopReason.POWER_LOSS,
}

_ID_TAG_STATUS = {
    AuthStatus.ACCEPTED: "Accepted",
    AuthStatus.BLOCKED: "Blocked",
    AuthStatus.EXPIRED: "Expired",
    AuthStatus.UNKNOWN: "Invalid",
}

# Unit of measure -> factor to the gateway's unit (Wh, W, A, V).
_ENERGY_UNITS = {"Wh": 1.0, "kWh": 1000.0}
_POWER_UNITS = {"W": 1.0, "kW": 1000.0}


def status_of(ocpp_status: str) -> ChargerStatus | None:
    return _STATUS.get(ocpp_status)


def stop_reason_of(reason: str | None) -> StopReason:
    """StopTransaction's reason; the spec lets a charger omit it only when it is Local."""
    if reason is None:
        return StopReason.LOCAL
    return _REASON.get(reason, StopReason.UNKNOWN)


def id_tag_status(status: AuthStatus) -> str:
    return _ID_TAG_STATUS[status]


_FRACTION_RE = re.compile(r"\.(\d+)")


def parse_timestamp(text: str) -> float:
    """An OCPP dateTime (RFC 3339; chargers send 'Z', offsets, 0-9 fraction digits, and some
    no zone at all, read as UTC) as Unix seconds. Raises ValueError when it is not one."""
    text = text.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    # Python 3.11 reads at most 6 fraction digits
    text = _FRACTION_RE.sub(lambda m: "." + m.group(1)[:6].ljust(6, "0"), text, count=1)
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def timestamp(ts: float) -> str:
    """Unix seconds as the dateTime OCPP messages carry."""
    dt = datetime.fromtimestamp(ts, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


@dataclass(slots=True)
class MeterSample:
    """One ``meterValue`` entry: what the gateway uses of its sampled values."""

    ts: float
    energy_wh: float | None = None  # Energy.Active.Import.Register, outlet or unspecified
    power_w: float | None = None
    values: dict[str, float] = field(default_factory=dict)  # canonical names (docs/profiles.md)
    signed: list[dict[str, str]] = field(default_factory=list)  # SignedData values, unchanged
    context: str | None = None


def _number(text: Any) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if value == value and value not in (float("inf"), float("-inf")) else None


def _phase_key(phase: str | None) -> str | None:
    if phase is None:
        return None
    return {"L1": "l1", "L2": "l2", "L3": "l3", "L1-N": "l1", "L2-N": "l2", "L3-N": "l3"}.get(phase)


def parse_meter_values(entries: Iterable[Mapping[str, Any]]) -> list[MeterSample]:
    """``meterValue`` (MeterValues) or ``transactionData`` (StopTransaction) entries, oldest
    first. Entries whose timestamp cannot be read are skipped (and counted by the caller).

    Energy: the ``Energy.Active.Import.Register`` value at the outlet (or with no location),
    in Wh; a value in another unit is converted (kWh), one in an unknown unit ignored.
    Signed values (``format: SignedData``, e.g. OCMF) are kept as sent.
    """
    out: list[MeterSample] = []
    for entry in entries:
        try:
            ts = parse_timestamp(str(entry.get("timestamp", "")))
        except ValueError:
            continue
        sample = MeterSample(ts=ts)
        for sv in entry.get("sampledValue") or entry.get("sampled_value") or ():
            if not isinstance(sv, Mapping):
                continue
            value = sv.get("value")
            context = sv.get("context")
            if context:
                sample.context = str(context)
            if sv.get("format") == "SignedData":
                sample.signed.append(
                    {
                        "measurand": str(sv.get("measurand", ENERGY_MEASURAND)),
                        "context": str(context or ""),
                        "value": str(value),
                    }
                )
                continue
            number = _number(value)
            if number is None:
                continue
            measurand = sv.get("measurand", ENERGY_MEASURAND)
            unit = sv.get("unit")
            location = sv.get("location")
            if location not in (None, "Outlet") and measurand == ENERGY_MEASURAND:
                continue  # an inlet/EV/cable register is not what the EV got
            phase = _phase_key(sv.get("phase"))
            if measurand == ENERGY_MEASURAND:
                factor = _ENERGY_UNITS.get(unit or "Wh")
                if factor is not None and phase is None:
                    sample.energy_wh = number * factor
            elif measurand == "Power.Active.Import":
                factor = _POWER_UNITS.get(unit or "W")
                if factor is not None and phase is None:
                    sample.power_w = number * factor
            elif measurand == "Current.Import" and phase is not None:
                sample.values[f"current_{phase}_a"] = number
            elif measurand == "Voltage" and phase is not None:
                sample.values[f"voltage_{phase}_v"] = number
            elif measurand == "SoC":
                sample.values["soc_percent"] = number
        if sample.energy_wh is not None:
            sample.values["energy_wh"] = sample.energy_wh
        if sample.power_w is not None:
            sample.values["power_w"] = sample.power_w
        out.append(sample)
    out.sort(key=lambda s: s.ts)
    return out


def signed_documents(samples: Sequence[MeterSample]) -> dict[str, str]:
    """The first and last signed energy documents (OCMF strings), as sent, by where they were
    taken: ``start`` (context Transaction.Begin, else the first) and ``stop``
    (Transaction.End, else the last)."""
    docs = [(sv["context"], sv["value"]) for s in samples for sv in s.signed]
    if not docs:
        return {}
    out: dict[str, str] = {}
    begin = [v for c, v in docs if c == "Transaction.Begin"]
    end = [v for c, v in docs if c == "Transaction.End"]
    if begin:
        out["start"] = begin[0]
    if end:
        out["stop"] = end[-1]
    return out
