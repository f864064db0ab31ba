"""Builders shared by the consumer, statement and verify tests: sealed, signed session chains."""

from __future__ import annotations

import copy
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

from gateway.billing.signing import Signer
from gateway.model import new_session_id, rfc3339
from gateway.records import GENESIS, UnsealedRecord, seal

T0 = 1_790_000_000.0  # 2026-09-21T...Z


def make_signer(tmp_path: Path, name: str = "evgw-signing.key") -> Signer:
    return Signer.load_or_create(tmp_path / name)


def unsealed_body(seq: int, **kwargs: Any) -> UnsealedRecord:
    """:func:`record_body` as the typed record a store finishes (the store gives it a ``seq``)."""
    body = record_body(seq, **kwargs)
    body.pop("seq")
    return UnsealedRecord.from_dict(body)


def record_body(
    seq: int,
    site: str = "depot-7",
    user: str = "alice",
    energy_wh: int = 22000,
    price: str = "0.39",
    start: float | None = None,
    currency: str = "EUR",
    charger: str = "cp1",
) -> dict[str, Any]:
    """An unsealed evgw.session/1 record priced energy x price + 19 % VAT."""
    start = T0 + seq * 7200 if start is None else start
    kwh = Decimal(energy_wh) / 1000
    amount = (kwh.quantize(Decimal("0.001")) * Decimal(price)).quantize(
        Decimal("0.01"), ROUND_HALF_UP
    )
    vat = (amount * Decimal(19) / 100).quantize(Decimal("0.01"), ROUND_HALF_UP)
    return {
        "schema": "evgw.session/1",
        "session_id": new_session_id(start),
        "seq": seq,
        "site_id": site,
        "charger_id": charger,
        "connector": 1,
        "user": {"id": user, "token": "04A2B3C4D5E6F7", "token_type": "rfid", "auth": "local"},
        "started_at": rfc3339(start),
        "ended_at": rfc3339(start + 6000),
        "charging_s": 5400,
        "idle_s": 600,
        "meter_start_wh": 1_000_000 + seq * 100_000,
        "meter_stop_wh": 1_000_000 + seq * 100_000 + energy_wh,
        "energy_wh": energy_wh,
        "max_power_w": 11040,
        "stop_reason": "ev_disconnected",
        "tariff_id": "standard",
        "tariff_version": "0123456789abcdef",
        "charging_periods": [
            {
                "start": rfc3339(start),
                "tariff_element": 0,
                "energy_wh": energy_wh,
                "charging_s": 5400,
                "idle_s": 600,
            }
        ],
        "cost": {
            "currency": currency,
            "excl_vat": str(amount),
            "vat": str(vat),
            "incl_vat": str(amount + vat),
            "lines": [
                {
                    "type": "energy",
                    "quantity": f"{kwh:.3f}",
                    "unit": "kWh",
                    "unit_price": price,
                    "amount": str(amount),
                }
            ],
        },
        "flags": [],
    }


def make_chain(
    n: int, signer: Signer | None = None, site: str = "depot-7", **body: Any
) -> list[dict[str, Any]]:
    """Records seq 1..n of one site, linked and sealed as the gateway's Store does."""
    chain: list[dict[str, Any]] = []
    prev = GENESIS
    for seq in range(1, n + 1):
        rec = record_body(seq, site=site, **body)
        rec["prev_hash"] = prev
        sealed = seal(rec, signer.sign if signer is not None else None)
        chain.append(sealed)
        prev = sealed["hash"]
    return chain


def tampered(record: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = copy.deepcopy(record)
    out.update(changes)
    return out
