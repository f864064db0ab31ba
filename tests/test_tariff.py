"""Tariff parsing and session costing: a table of hand-computed cases plus properties.

Every expected figure below is computed by hand in the comment next to it. Times are local to
Europe/Berlin unless a case says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.billing.cost import make_pricer, price_session
from gateway.billing.policy import BillingConfig
from gateway.billing.tariff import (
    MAX_ELEMENTS,
    MAX_TARIFFS,
    TariffBook,
    check_version,
    parse_tariff,
    tariff_set_problems,
    tariff_version,
)
from gateway.errors import CommandError, TariffError
from gateway.model import MAX_VERSION, MeterPoint

BERLIN = "Europe/Berlin"

# A segment: (duration_s, energy_wh added, charging). Energy is spread evenly over a segment.
Segment = tuple[float, int, bool]


def session(
    start: str, segments: list[Segment], tz: str = BERLIN
) -> tuple[list[MeterPoint], float, float]:
    t0 = datetime.fromisoformat(start).replace(tzinfo=ZoneInfo(tz)).timestamp()
    return points_from(t0, segments)


def session_utc(start: str, segments: list[Segment]) -> tuple[list[MeterPoint], float, float]:
    return points_from(datetime.fromisoformat(start + "+00:00").timestamp(), segments)


def points_from(t0: float, segments: list[Segment]) -> tuple[list[MeterPoint], float, float]:
    t, energy, points = t0, 0, []
    for dur, wh, charging in segments:
        t += dur
        energy += wh
        points.append(
            MeterPoint(
                ts=t, energy_wh=energy, charging=charging, power_w=wh * 3600 / dur if dur else 0.0
            )
        )
    return points, t0, t


def energy(price: str, step: int | None = None, **restr: Any) -> dict[str, Any]:
    comp: dict[str, Any] = {"type": "energy", "price": price}
    if step is not None:
        comp["step_size"] = step
    el: dict[str, Any] = {"components": [comp]}
    if restr:
        el["restrictions"] = restr
    return el


NIGHT_DAY = {  # el0: night rate 22:00-06:00, el1: day rate
    "currency": "EUR",
    "elements": [energy("0.20", start_time="22:00", end_time="06:00"), energy("0.40")],
}


@dataclass
class Case:
    id: str
    tariff: dict[str, Any]
    start: str  # local ISO time in `tz`, or UTC when utc=True
    segments: list[Segment]
    lines: list[tuple[str, int | None, str, str]]  # (type, element, quantity, amount)
    excl: str
    vat: str
    incl: str
    periods: list[tuple[int | None, int, int, int]] | None = (
        None  # (element, Wh, charging_s, idle_s)
    )
    tz: str = BERLIN
    utc: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


CASES = [
    # 21:00 -> 07:00 next day at 1 kW, 10 kWh: 21-22 day 1 kWh, 22-06 night 8 kWh, 06-07 day 1 kWh.
    # day: 2.000 kWh x 0.40 = 0.80; night: 8.000 x 0.20 = 1.60; total 2.40; no vat_percent -> 0.00.
    Case(
        "night_across_midnight",
        NIGHT_DAY,
        "2026-05-04T21:00",
        [(36000, 10000, True)],
        [("energy", 1, "2.000", "0.80"), ("energy", 0, "8.000", "1.60")],
        "2.40",
        "0.00",
        "2.40",
        periods=[(1, 1000, 3600, 0), (0, 8000, 28800, 0), (1, 1000, 3600, 0)],
    ),
    # Spring forward, 2026-03-29 02:00 CET -> 03:00 CEST (01:00 UTC). 22:00 UTC (23:00 CET) to
    # 05:00 UTC (07:00 CEST) = 7 real hours at 1 kW. Night ends 06:00 CEST = 04:00 UTC, so
    # night = 22:00-04:00 UTC = 6 h = 6 kWh x 0.20 = 1.20; day 1 kWh x 0.40 = 0.40; total 1.60.
    Case(
        "dst_spring_forward",
        NIGHT_DAY,
        "2026-03-28T22:00",
        [(7 * 3600, 7000, True)],
        [("energy", 0, "6.000", "1.20"), ("energy", 1, "1.000", "0.40")],
        "1.60",
        "0.00",
        "1.60",
        periods=[(0, 6000, 21600, 0), (1, 1000, 3600, 0)],
        utc=True,
    ),
    # A window starting inside the skipped hour: 02:30 does not exist on 2026-03-29, so the
    # element starts when local time jumps to 03:00 CEST = 01:00 UTC and ends at 05:00 CEST =
    # 03:00 UTC: 2 h. Session 00:00-04:00 UTC at 1 kW: 2 kWh x 0.10 = 0.20, 2 kWh x 0.40 = 0.80.
    Case(
        "dst_window_in_skipped_hour",
        {
            "currency": "EUR",
            "elements": [energy("0.10", start_time="02:30", end_time="05:00"), energy("0.40")],
        },
        "2026-03-29T00:00",
        [(4 * 3600, 4000, True)],
        [("energy", 1, "2.000", "0.80"), ("energy", 0, "2.000", "0.20")],
        "1.00",
        "0.00",
        "1.00",
        periods=[(1, 1000, 3600, 0), (0, 2000, 7200, 0), (1, 1000, 3600, 0)],
        utc=True,
    ),
    # Fall back, 2026-10-25 03:00 CEST -> 02:00 CET (01:00 UTC). 21:00 UTC (23:00 CEST) to
    # 06:00 UTC (07:00 CET) = 9 real hours at 1 kW. Night ends 06:00 CET = 05:00 UTC: night
    # 21:00-05:00 UTC = 8 kWh x 0.20 = 1.60, day 1 kWh x 0.40 = 0.40; total 2.00.
    Case(
        "dst_fall_back",
        NIGHT_DAY,
        "2026-10-24T21:00",
        [(9 * 3600, 9000, True)],
        [("energy", 0, "8.000", "1.60"), ("energy", 1, "1.000", "0.40")],
        "2.00",
        "0.00",
        "2.00",
        periods=[(0, 8000, 28800, 0), (1, 1000, 3600, 0)],
        utc=True,
    ),
    # Time billed by the hour of night on the long night: 23:00 CEST -> 06:00 CET is 8 real
    # hours (not 7 by the wall clock): 8.0000 h x 1.00 = 8.00.
    Case(
        "dst_fall_back_time",
        {
            "currency": "EUR",
            "elements": [
                {
                    "components": [{"type": "time", "price": "1.00"}],
                    "restrictions": {"start_time": "22:00", "end_time": "06:00"},
                }
            ],
        },
        "2026-10-24T21:00",
        [(8 * 3600, 8000, True)],
        [("time", 0, "8.0000", "8.00")],
        "8.00",
        "0.00",
        "8.00",
        utc=True,
    ),
    # Energy step_size 500 Wh: 10 100 Wh -> billed 10 500 Wh = 10.500 kWh x 0.30 = 3.15.
    Case(
        "energy_step_size",
        {"currency": "EUR", "elements": [energy("0.30", step=500)]},
        "2026-05-04T10:00",
        [(3600, 10100, True)],
        [("energy", 0, "10.500", "3.15")],
        "3.15",
        "0.00",
        "3.15",
        periods=[(0, 10100, 3600, 0)],  # periods carry measured energy, not billed steps
    ),
    # Time step_size 900 s: 50 min = 3000 s charging -> 4 steps = 3600 s = 1.0000 h x 1.20 = 1.20.
    Case(
        "time_step_size",
        {
            "currency": "EUR",
            "elements": [{"components": [{"type": "time", "price": "1.20", "step_size": 900}]}],
        },
        "2026-05-04T10:00",
        [(3000, 5000, True)],
        [("time", 0, "1.0000", "1.20")],
        "1.20",
        "0.00",
        "1.20",
    ),
    # OCPI 2.2.1 step_size example #2: 1.20/h before 17:00 (step 1800 s), 2.40/h after (step 900 s);
    # plug in 16:35, charge 35 min. 1500 s before, 600 s after; total 2100 s rounds up to the LAST
    # element's step: 2700 s, the extra 600 s goes to el1 (1200 s). el0: 1500 s = 0.4167 h x 1.20
    # = 0.50004 -> 0.50; el1: 1200 s = 0.3333 h x 2.40 = 0.79992 -> 0.80; total 1.30 (as OCPI).
    Case(
        "time_step_switching_elements",
        {
            "currency": "EUR",
            "elements": [
                {
                    "components": [{"type": "time", "price": "1.20", "step_size": 1800}],
                    "restrictions": {"end_time": "17:00"},
                },
                {
                    "components": [{"type": "time", "price": "2.40", "step_size": 900}],
                    "restrictions": {"start_time": "17:00"},
                },
            ],
        },
        "2026-05-04T16:35",
        [(2100, 3000, True)],
        [("time", 0, "0.4167", "0.50"), ("time", 1, "0.3333", "0.80")],
        "1.30",
        "0.00",
        "1.30",
    ),
    # Charge 1 h (7 kWh), then plugged in 30 min without charging. energy 7.000 x 0.30 = 2.10;
    # time counts charging only: 1.0000 h x 1.00 = 1.00; parking 0.5000 h x 6.00 = 3.00; 6.10.
    Case(
        "parking_after_charging",
        {
            "currency": "EUR",
            "elements": [
                {
                    "components": [
                        {"type": "energy", "price": "0.30"},
                        {"type": "time", "price": "1.00"},
                        {"type": "parking_time", "price": "6.00"},
                    ]
                }
            ],
        },
        "2026-05-04T10:00",
        [(3600, 7000, True), (1800, 0, False)],
        [
            ("energy", 0, "7.000", "2.10"),
            ("time", 0, "1.0000", "1.00"),
            ("parking_time", 0, "0.5000", "3.00"),
        ],
        "6.10",
        "0.00",
        "6.10",
        periods=[(0, 7000, 3600, 1800)],
    ),
    # Parking changes the period's element: el0 energy only, el1 parking. 1 h charging 5 kWh,
    # 15 min idle: 5 x 0.25 = 1.25; 0.2500 h x 4.00 = 1.00; 2.25; two periods.
    Case(
        "parking_element_splits_periods",
        {
            "currency": "EUR",
            "elements": [
                energy("0.25"),
                {"components": [{"type": "parking_time", "price": "4.00"}]},
            ],
        },
        "2026-05-04T10:00",
        [(3600, 5000, True), (900, 0, False)],
        [("energy", 0, "5.000", "1.25"), ("parking_time", 1, "0.2500", "1.00")],
        "2.25",
        "0.00",
        "2.25",
        periods=[(0, 5000, 3600, 0), (1, 0, 0, 900)],
    ),
    # Flat fee once + energy: 1.00 + 4.000 kWh x 0.25 = 1.00 -> 2.00.
    Case(
        "flat_fee",
        {
            "currency": "EUR",
            "elements": [{"components": [{"type": "flat", "price": "1.00"}]}, energy("0.25")],
        },
        "2026-05-04T10:00",
        [(3600, 4000, True)],
        [("flat", 0, "1", "1.00"), ("energy", 1, "4.000", "1.00")],
        "2.00",
        "0.00",
        "2.00",
    ),
    # Plugged in, never charged: the flat fee is still priced (billability is the caller's call).
    Case(
        "flat_fee_zero_energy",
        {
            "currency": "EUR",
            "elements": [{"components": [{"type": "flat", "price": "1.00"}]}, energy("0.25")],
        },
        "2026-05-04T10:00",
        [(600, 0, False)],
        [("flat", 0, "1", "1.00")],
        "1.00",
        "0.00",
        "1.00",
        periods=[(1, 0, 0, 600)],
    ),
    # CONTRACT's record: 22 kWh x 0.39 = 8.58; VAT 19 %: 8.58 x 0.19 = 1.6302 -> 1.63; 10.21.
    Case(
        "vat_19",
        {"currency": "EUR", "vat_percent": 19, "elements": [energy("0.39")]},
        "2026-05-04T10:00",
        [(7200, 22000, True)],
        [("energy", 0, "22.000", "8.58")],
        "8.58",
        "1.63",
        "10.21",
    ),
    # vat_percent absent: no VAT applicable -> 0.00, incl = excl.
    Case(
        "vat_absent",
        {"currency": "EUR", "elements": [energy("0.39")]},
        "2026-05-04T10:00",
        [(7200, 22000, True)],
        [("energy", 0, "22.000", "8.58")],
        "8.58",
        "0.00",
        "8.58",
    ),
    # HALF_UP on VAT: 2.50 x 0.07 = 0.175 -> 0.18 (banker's rounding would give 0.18 too; 0.125
    # would differ: 1.25 x 10 % = 0.125 -> 0.13 HALF_UP, 0.12 HALF_EVEN).
    Case(
        "vat_half_up",
        {"currency": "EUR", "vat_percent": "10", "elements": [energy("0.25")]},
        "2026-05-04T10:00",
        [(3600, 5000, True)],
        [("energy", 0, "5.000", "1.25")],
        "1.25",
        "0.13",
        "1.38",
    ),
    # min_price 2.00: 3 kWh x 0.30 = 0.90 -> adjustment +1.10 -> 2.00; VAT 19 %: 0.38; 2.38.
    Case(
        "min_price",
        {"currency": "EUR", "vat_percent": 19, "min_price": "2.00", "elements": [energy("0.30")]},
        "2026-05-04T10:00",
        [(3600, 3000, True)],
        [("energy", 0, "3.000", "0.90"), ("min_price_adjustment", None, "1", "1.10")],
        "2.00",
        "0.38",
        "2.38",
    ),
    # max_price 10.00: 30 kWh x 0.50 = 15.00 -> adjustment -5.00 -> 10.00.
    Case(
        "max_price",
        {"currency": "EUR", "max_price": 10, "elements": [energy("0.50")]},
        "2026-05-04T10:00",
        [(3 * 3600, 30000, True)],
        [("energy", 0, "30.000", "15.00"), ("max_price_adjustment", None, "1", "-5.00")],
        "10.00",
        "0.00",
        "10.00",
    ),
    # Weekend rate (lower-case day names accepted): Friday 2026-05-08 23:00 -> Saturday 01:00 at
    # 1 kW: Friday 1 kWh x 0.40 = 0.40, Saturday 1 kWh x 0.20 = 0.20; 0.60.
    Case(
        "day_of_week",
        {
            "currency": "EUR",
            "elements": [energy("0.20", day_of_week=["saturday", "sunday"]), energy("0.40")],
        },
        "2026-05-08T23:00",
        [(7200, 2000, True)],
        [("energy", 1, "1.000", "0.40"), ("energy", 0, "1.000", "0.20")],
        "0.60",
        "0.00",
        "0.60",
        periods=[(1, 1000, 3600, 0), (0, 1000, 3600, 0)],
    ),
    # Above 20 kWh a higher price: 30 kWh evenly over 3 h: first 20 kWh x 0.30 = 6.00, the
    # rest 10 kWh x 0.50 = 5.00; 11.00. The cut is at 2 h (20 of 30 kWh).
    Case(
        "min_kwh",
        {"currency": "EUR", "elements": [energy("0.50", min_kwh=20), energy("0.30")]},
        "2026-05-04T10:00",
        [(3 * 3600, 30000, True)],
        [("energy", 1, "20.000", "6.00"), ("energy", 0, "10.000", "5.00")],
        "11.00",
        "0.00",
        "11.00",
        periods=[(1, 20000, 7200, 0), (0, 10000, 3600, 0)],
    ),
    # Fast-charging rate at >= 20 kW: 1st hour 22 kWh (22 kW) x 0.50 = 11.00, 2nd hour 7 kWh
    # (7 kW) x 0.30 = 2.10; 13.10.
    Case(
        "min_power",
        {"currency": "EUR", "elements": [energy("0.50", min_power=20), energy("0.30")]},
        "2026-05-04T10:00",
        [(3600, 22000, True), (3600, 7000, True)],
        [("energy", 0, "22.000", "11.00"), ("energy", 1, "7.000", "2.10")],
        "13.10",
        "0.00",
        "13.10",
    ),
    # OCPI max_duration example: free for 30 min, 0.25 until 60 min, then 0.40. 40 min session,
    # 5 kWh in the first 30 min, 1.2 kWh in the next 10: 0.00 + 1.200 x 0.25 = 0.30.
    Case(
        "max_duration",
        {
            "currency": "EUR",
            "elements": [
                energy("0.00", max_duration=1800),
                energy("0.25", max_duration=3600),
                energy("0.40"),
            ],
        },
        "2026-05-04T10:00",
        [(1800, 5000, True), (600, 1200, True)],
        [("energy", 0, "5.000", "0.00"), ("energy", 1, "1.200", "0.30")],
        "0.30",
        "0.00",
        "0.30",
    ),
    # JPY has no minor unit: 10.555 kWh x 35 = 369.425 -> 369; VAT 10 % 36.9 -> 37; 406.
    Case(
        "jpy_minor_unit",
        {"currency": "JPY", "vat_percent": 10, "elements": [energy("35")]},
        "2026-05-04T10:00",
        [(3600, 10555, True)],
        [("energy", 0, "10.555", "369")],
        "369",
        "37",
        "406",
        tz="Asia/Tokyo",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_price_session_table(case: Case) -> None:
    tariff = parse_tariff(case.tariff)
    points, started, ended = (
        session_utc(case.start, case.segments)
        if case.utc
        else session(case.start, case.segments, case.tz)
    )
    priced = price_session(tariff, points, started, ended, case.tz)
    got_lines = [
        (ln["type"], ln["tariff_element"], ln["quantity"], ln["amount"])
        for ln in priced.cost["lines"]
    ]
    assert got_lines == case.lines
    assert (priced.cost["excl_vat"], priced.cost["vat"], priced.cost["incl_vat"]) == (
        case.excl,
        case.vat,
        case.incl,
    )
    assert priced.cost["currency"] == case.tariff["currency"]
    assert sum(Decimal(ln["amount"]) for ln in priced.cost["lines"]) == Decimal(case.excl)
    if case.periods is not None:
        got = [
            (p["tariff_element"], p["energy_wh"], p["charging_s"], p["idle_s"])
            for p in priced.charging_periods
        ]
        assert got == case.periods
    assert sum(p["energy_wh"] for p in priced.charging_periods) == points[-1].energy_wh


def test_cost_shape_matches_contract() -> None:
    points, started, ended = session("2026-05-04T10:00", [(7200, 22000, True)])
    priced = price_session(parse_tariff(CASES[0].tariff), points, started, ended, BERLIN)
    assert set(priced.cost) == {"currency", "excl_vat", "vat", "incl_vat", "lines"}
    for line in priced.cost["lines"]:
        assert set(line) == {"type", "quantity", "unit", "unit_price", "amount", "tariff_element"}
        assert line["unit"] in {"kWh", "h", "session"}
    period = priced.charging_periods[0]
    assert set(period) == {"start", "tariff_element", "energy_wh", "charging_s", "idle_s"}
    assert period["start"] == "2026-05-04T08:00:00.000Z"


def test_make_pricer_without_tariff_gives_periods_only() -> None:
    pricer = make_pricer(BERLIN)
    points, started, ended = session("2026-05-04T10:00", [(3600, 5000, True), (600, 0, False)])
    periods, cost = pricer(None, points, started, ended)
    assert cost is None
    assert periods == [
        {
            "start": "2026-05-04T08:00:00.000Z",
            "tariff_element": None,
            "energy_wh": 5000,
            "charging_s": 3600,
            "idle_s": 600,
        }
    ]
    periods, cost = pricer(CASES[0].tariff, points, started, ended)
    assert cost is not None and cost["excl_vat"] == "2.00"  # 5 kWh x 0.40 (day rate)


# --- parse errors --------------------------------------------------------------------------

GOOD = {"currency": "EUR", "vat_percent": 19, "elements": [energy("0.39"), energy("0.29")]}


def with_(path: list[Any], value: Any, base: dict[str, Any] = GOOD) -> dict[str, Any]:
    import copy

    data = copy.deepcopy(base)
    node: Any = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return data


PARSE_ERRORS = [
    (
        "price_not_decimal",
        with_(["elements", 1, "components", 0, "price"], "abc"),
        "elements[1].components[0].price",
    ),
    (
        "price_bool",
        with_(["elements", 0, "components", 0, "price"], True),
        "elements[0].components[0].price",
    ),
    (
        "price_negative",
        with_(["elements", 0, "components", 0, "price"], "-0.10"),
        "elements[0].components[0].price",
    ),
    ("unknown_top_key", with_(["vat"], 19), "vat"),
    (
        "unknown_restriction",
        with_(["elements", 1, "restrictions"], {"start_tim": "07:00"}),
        "elements[1].restrictions.start_tim",
    ),
    ("currency_lower", with_(["currency"], "eur"), "currency"),
    ("currency_missing", {"elements": GOOD["elements"]}, "currency"),
    ("vat_over_100", with_(["vat_percent"], 101), "vat_percent"),
    ("vat_text", with_(["vat_percent"], "nineteen"), "vat_percent"),
    (
        "type_unknown",
        with_(["elements", 0, "components", 0, "type"], "kwh"),
        "elements[0].components[0].type",
    ),
    (
        "step_zero",
        with_(["elements", 0, "components", 0, "step_size"], 0),
        "elements[0].components[0].step_size",
    ),
    (
        "step_float",
        with_(["elements", 0, "components", 0, "step_size"], 1.5),
        "elements[0].components[0].step_size",
    ),
    (
        "time_24h",
        with_(["elements", 0, "restrictions"], {"start_time": "24:00"}),
        "elements[0].restrictions.start_time",
    ),
    (
        "time_no_zero",
        with_(["elements", 0, "restrictions"], {"end_time": "7:00"}),
        "elements[0].restrictions.end_time",
    ),
    (
        "date_bad_month",
        with_(["elements", 0, "restrictions"], {"start_date": "2026-13-01"}),
        "elements[0].restrictions.start_date",
    ),
    (
        "date_order",
        with_(
            ["elements", 0, "restrictions"], {"start_date": "2026-05-02", "end_date": "2026-05-01"}
        ),
        "elements[0].restrictions.end_date",
    ),
    (
        "day_unknown",
        with_(["elements", 0, "restrictions"], {"day_of_week": ["MONDAY", "FUNDAY"]}),
        "elements[0].restrictions.day_of_week[1]",
    ),
    (
        "min_current",
        with_(["elements", 0, "restrictions"], {"min_current": 16}),
        "elements[0].restrictions.min_current",
    ),
    (
        "kwh_order",
        with_(["elements", 0, "restrictions"], {"min_kwh": 20, "max_kwh": 10}),
        "elements[0].restrictions.max_kwh",
    ),
    (
        "duration_float",
        with_(["elements", 0, "restrictions"], {"min_duration": 1.5}),
        "elements[0].restrictions.min_duration",
    ),
    ("elements_empty", with_(["elements"], []), "elements"),
    ("components_empty", with_(["elements", 1, "components"], []), "elements[1].components"),
    ("element_not_mapping", with_(["elements", 1], "energy"), "elements[1]"),
    (
        "duplicate_dimension",
        with_(
            ["elements", 0, "components"],
            [{"type": "energy", "price": 1}, {"type": "energy", "price": 2}],
        ),
        "elements[0].components[1].type",
    ),
    (
        "max_below_min_price",
        with_(["max_price"], "1.00", with_(["min_price"], "2.00")),
        "max_price",
    ),
]


@pytest.mark.parametrize(
    ("data", "path"), [(d, p) for _, d, p in PARSE_ERRORS], ids=[i for i, _, _ in PARSE_ERRORS]
)
def test_parse_errors_name_the_path(data: dict[str, Any], path: str) -> None:
    with pytest.raises(TariffError) as info:
        parse_tariff(data)
    assert info.value.path == path
    assert str(info.value).startswith(f"{path}: ")


def test_parse_error_path_is_prefixed() -> None:
    with pytest.raises(TariffError) as info:
        parse_tariff(with_(["elements", 1, "components", 0, "price"], "x"), "tariffs.standard")
    assert info.value.path == "tariffs.standard.elements[1].components[0].price"


def test_parse_accepts_numbers_strings_and_yaml_dates() -> None:
    from datetime import date

    t = parse_tariff(
        {
            "currency": "EUR",
            "vat_percent": 19.5,
            "min_price": 0.5,
            "elements": [
                energy(
                    0.39, start_date=date(2026, 1, 1), end_date="2027-01-01", day_of_week="MONDAY"
                )
            ],  # type: ignore[arg-type]
        }
    )
    assert t.vat_percent == Decimal("19.5") and t.min_price == Decimal("0.5")
    assert t.elements[0].components[0].price == Decimal("0.39")  # not 0.38999999...
    assert t.elements[0].restrictions.day_of_week == frozenset({0})


def test_tariff_version_stable_and_key_order_independent() -> None:
    a = {
        "currency": "EUR",
        "vat_percent": 19,
        "elements": [{"components": [{"type": "energy", "price": "0.39"}]}],
    }
    b = {
        "elements": [{"components": [{"price": "0.39", "type": "energy"}]}],
        "vat_percent": 19,
        "currency": "EUR",
    }
    assert tariff_version(a) == tariff_version(b)
    assert len(tariff_version(a)) == 16 and int(tariff_version(a), 16) >= 0
    assert tariff_version(a) == tariff_version(a)  # pure
    c = with_(["elements", 0, "components", 0, "price"], "0.40", a)
    assert tariff_version(c) != tariff_version(a)
    # Pinned: the hash of the canonical JSON must never change between releases.
    import hashlib

    from gateway.records import canonical_json

    assert tariff_version(a) == hashlib.sha256(canonical_json(a)).hexdigest()[:16]


# --- the tariff book -----------------------------------------------------------------------

TARIFFS = {
    "standard": {"currency": "EUR", "elements": [energy("0.39")]},
    "staff": {"currency": "EUR", "elements": [energy("0.19")]},
    "fast": {"currency": "EUR", "elements": [energy("0.59")]},
}
BILLING = BillingConfig(default_tariff="standard", groups={"staff": "staff"})


def test_resolve_prefers_group_then_charger_then_default() -> None:
    book = TariffBook(TARIFFS, BILLING)

    def tid(charger: str | None, group: str | None) -> tuple[str, str | None]:
        got = book.resolve(charger, group)
        assert got is not None
        return got.tariff_id, got.fallback

    assert tid("fast", "staff") == ("staff", None)
    assert tid("fast", None) == ("fast", None)
    assert tid(None, None) == ("standard", None)
    # What was meant but is not there is never silent: the fallback names it.
    assert tid("fast", "visitors") == ("fast", "group:visitors")
    assert tid("missing", None) == ("standard", "missing")
    got = book.resolve(None, "staff")
    assert got is not None
    assert (got.tariff_id, got.version) == ("staff", tariff_version(TARIFFS["staff"]))
    got.data["currency"] = "USD"  # the caller's copy; the book is untouched
    again = book.resolve(None, "staff")
    assert again is not None and again.data["currency"] == "EUR"
    assert TariffBook({}, BillingConfig()).resolve(None, None) is None


def test_book_rejects_invalid_config() -> None:
    with pytest.raises(TariffError) as info:
        TariffBook({"standard": with_(["currency"], "euro", TARIFFS["standard"])}, BillingConfig())
    assert info.value.path == "tariffs.standard.currency"
    with pytest.raises(TariffError):
        TariffBook({"standard": TARIFFS["standard"]}, BillingConfig(default_tariff="nope"))


def test_replace_is_versioned_and_all_or_nothing() -> None:
    book = TariffBook(TARIFFS, BILLING)
    bad = {
        **TARIFFS,
        "fast": with_(["elements", 0, "components", 0, "price"], "x", TARIFFS["fast"]),
    }
    with pytest.raises(CommandError) as info:
        book.replace(1, bad)
    assert (
        info.value.code == "invalid_tariff"
        and "fast.elements[0].components[0].price" in info.value.message
    )
    assert book.version == 0 and book.resolve("fast", None).data == TARIFFS["fast"]  # type: ignore[union-attr]
    new = {**TARIFFS, "fast": {"currency": "EUR", "elements": [energy("0.69")]}}
    result = book.replace(3, new)
    assert result["version"] == 3 and book.version == 3
    assert book.resolve("fast", None).data == new["fast"]  # type: ignore[union-attr]
    for stale in (3, 2):
        with pytest.raises(CommandError) as info:
            book.replace(stale, TARIFFS)
        assert info.value.code == "stale_version"
    assert book.resolve("fast", None).data == new["fast"]  # type: ignore[union-attr]
    with pytest.raises(CommandError):  # the default tariff may not disappear
        book.replace(4, {"fast": TARIFFS["fast"], "staff": TARIFFS["staff"]})


# --- properties ---------------------------------------------------------------------------

PROPERTY_TARIFF = {
    "currency": "EUR",
    "vat_percent": 19,
    "min_price": "0.50",
    "elements": [
        {
            "components": [{"type": "energy", "price": "0.50", "step_size": 100}],
            "restrictions": {"min_kwh": 15},
        },
        {
            "components": [
                {"type": "energy", "price": "0.20"},
                {"type": "parking_time", "price": "3.00", "step_size": 300},
            ],
            "restrictions": {"start_time": "22:00", "end_time": "06:00"},
        },
        {
            "components": [{"type": "time", "price": "0.90", "step_size": 60}],
            "restrictions": {"min_duration": 5400},
        },
        {
            "components": [
                {"type": "energy", "price": "0.40"},
                {"type": "flat", "price": "0.35"},
                {"type": "parking_time", "price": "6.00"},
            ],
            "restrictions": {
                "day_of_week": ["MONDAY", "TUESDAY", "WEDNESDAY", "THURSDAY", "FRIDAY", "SATURDAY"]
            },
        },
        {
            "components": [
                {"type": "energy", "price": "0.45"},
                {"type": "parking_time", "price": "1.00"},
            ]
        },
    ],
}

# Anywhere in 2026, so DST nights come up; fractional seconds too.
starts = st.floats(min_value=1767225600.0, max_value=1798761600.0, allow_nan=False)
segments_st = st.lists(
    st.tuples(
        st.one_of(st.integers(0, 4 * 3600).map(float), st.floats(0, 7200, allow_nan=False)),
        st.integers(0, 25000),
        st.booleans(),
    ),
    min_size=0,
    max_size=12,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    start=starts,
    segments=segments_st,
    tz=st.sampled_from([BERLIN, "America/New_York", "Asia/Kolkata", "UTC"]),
)
def test_periods_sum_to_session_energy_and_duration(
    start: float, segments: list[Segment], tz: str
) -> None:
    points, started, ended = points_from(start, segments)
    priced = price_session(parse_tariff(PROPERTY_TARIFF), points, started, ended, tz)
    energy_wh = points[-1].energy_wh if points else 0
    assert sum(p["energy_wh"] for p in priced.charging_periods) == energy_wh
    total_s = sum(p["charging_s"] + p["idle_s"] for p in priced.charging_periods)
    expected_s = int(Decimal(round(ended * 1000) - round(started * 1000)) / 1000 + Decimal("0.5"))
    assert total_s == expected_s
    assert all(p["charging_s"] >= 0 and p["idle_s"] >= 0 for p in priced.charging_periods)
    assert priced.charging_s + priced.idle_s == total_s
    lines = priced.cost["lines"]
    assert sum(Decimal(ln["amount"]) for ln in lines) == Decimal(priced.cost["excl_vat"])
    assert Decimal(priced.cost["excl_vat"]) >= Decimal("0.50")  # min_price
    # energy lines never bill less than was measured, and less than one step more
    billed_wh = sum(Decimal(ln["quantity"]) * 1000 for ln in lines if ln["type"] == "energy")
    assert energy_wh <= billed_wh < energy_wh + 100


PURE_ENERGY = {
    "currency": "EUR",
    "elements": [
        energy("0.55", step=250, min_kwh=30),
        energy("0.25", start_time="22:00", end_time="06:00"),
        energy("0.35", min_power=11),
        energy("0.45"),
    ],
}


@settings(max_examples=150, deadline=None)
@given(start=starts, segments=segments_st, more=segments_st)
def test_pure_energy_cost_never_decreases_with_energy(
    start: float, segments: list[Segment], more: list[Segment]
) -> None:
    # The same session, then continued with more charging: the cost can only grow.
    tariff = parse_tariff(PURE_ENERGY)
    pts_a, started, ended_a = points_from(start, segments)
    base = pts_a[-1].energy_wh if pts_a else 0
    pts_more, _, ended_b = points_from(ended_a, more)
    pts_b = pts_a + [MeterPoint(p.ts, p.energy_wh + base, p.charging, p.power_w) for p in pts_more]
    cost_a = price_session(tariff, pts_a, started, ended_a, BERLIN).cost
    cost_b = price_session(tariff, pts_b, started, ended_b, BERLIN).cost
    assert Decimal(cost_b["incl_vat"]) >= Decimal(cost_a["incl_vat"])
    if not any(wh for _, wh, _ in more):
        assert cost_b == cost_a


@settings(max_examples=60, deadline=None)
@given(
    segments=segments_st,
    new_price=st.decimals(min_value=0, max_value=5, places=2),
    new_vat=st.integers(0, 30),
)
def test_frozen_tariff_is_not_repriced_by_replace(
    segments: list[Segment], new_price: Decimal, new_vat: int
) -> None:
    book = TariffBook(TARIFFS, BILLING)
    resolved = book.resolve("fast", None)
    assert resolved is not None
    version_at_start, frozen = resolved.version, resolved.data
    pricer = make_pricer(BERLIN)
    points, started, ended = points_from(1780000000.0, segments)
    before = pricer(frozen, points, started, ended)
    changed = {
        **TARIFFS,
        "fast": {"currency": "EUR", "vat_percent": new_vat, "elements": [energy(str(new_price))]},
    }
    book.replace(book.version + 1, changed)
    after = pricer(frozen, points, started, ended)
    assert after == before
    assert tariff_version(frozen) == version_at_start
    current = book.resolve("fast", None)
    assert current is not None and current.data == changed["fast"]


# --- bounds, one validation path, versions (issue 11 item 2) -------------------------------
def flat(price: Any) -> dict[str, Any]:
    return {"currency": "EUR", "elements": [{"components": [{"type": "flat", "price": price}]}]}


@pytest.mark.parametrize(
    ("data", "path", "message"),
    [
        (flat("1e30"), "elements[0].components[0].price", "must be at most 1000000000"),
        (flat(1e30), "elements[0].components[0].price", "must be at most 1000000000"),
        (flat("0.1234567"), "elements[0].components[0].price", "at most 6 decimal places"),
        ({**flat(1), "min_price": "1e12"}, "min_price", "must be at most"),
        ({**flat(1), "max_price": "1E+10"}, "max_price", "must be at most"),
        (
            {"currency": "EUR", "elements": [energy("0.3", 1_000_001)]},
            "elements[0].components[0].step_size",
            "must be at most 1000000",
        ),
        (
            {
                "currency": "EUR",
                "elements": [{"components": [{"type": "time", "price": "1", "step_size": 86_401}]}],
            },
            "elements[0].components[0].step_size",
            "must be at most 86400",
        ),
        (
            {"currency": "EUR", "elements": [energy("0.3")] * (MAX_ELEMENTS + 1)},
            "elements",
            f"at most {MAX_ELEMENTS}",
        ),
        (
            {"currency": "EUR", "elements": [energy("0.3", max_kwh="1e300")]},
            "elements[0].restrictions.max_kwh",
            "must be at most",
        ),
        (
            {"currency": "EUR", "elements": [energy("0.3", max_duration=10**300)]},
            "elements[0].restrictions.max_duration",
            "must be at most",
        ),
        ({**flat(1), "description": "x" * 1001}, "description", "longer than 1000"),
    ],
)
def test_tariff_bounds(data: dict[str, Any], path: str, message: str) -> None:
    with pytest.raises(TariffError) as info:
        parse_tariff(data)
    assert info.value.path == path and message in info.value.message


def test_bounds_admit_what_real_tariffs_use() -> None:
    parse_tariff(flat("1000000000"))  # any currency's unit, e.g. a flat fee in IDR
    parse_tariff(flat("0.394950"))
    parse_tariff({"currency": "EUR", "elements": [energy("0.3", 1000)] * MAX_ELEMENTS})


def test_a_price_at_the_bound_still_prices_a_long_session() -> None:
    tariff = parse_tariff(
        {"currency": "EUR", "vat_percent": 19, "elements": [energy("1000000000")]}
    )
    points, started, ended = session("2026-03-02T10:00", [(36_000, 220_000, True)])
    cost = price_session(tariff, points, started, ended, BERLIN).cost
    assert cost is not None and Decimal(cost["incl_vat"]) > 0


def test_one_validation_path_for_config_and_push() -> None:
    problems = tariff_set_problems(
        {"cheap": flat("0.10"), "bad": flat("1e30")},
        default_tariff="standard",
        groups={"staff": "staff"},
        chargers=[(("chargers", "cp2", "tariff"), "standard")],
    )
    assert [str(p) for p in problems] == [
        "tariffs.bad.elements[0].components[0].price: must be at most 1000000000, got '1e30'",
        "billing.default_tariff: unknown tariff 'standard' (defined tariffs: bad, cheap)",
        "billing.groups.staff: unknown tariff 'staff' (defined tariffs: bad, cheap)",
        "chargers.cp2.tariff: unknown tariff 'standard' (defined tariffs: bad, cheap)",
    ]
    many = {f"t{i}": flat(1) for i in range(MAX_TARIFFS + 1)}
    assert [p.path for p in tariff_set_problems(many, default_tariff=None, groups={})] == [
        ("tariffs",)
    ]


def test_a_push_that_drops_a_chargers_tariff_is_refused_whole() -> None:
    book = TariffBook(TARIFFS, BILLING, chargers={"cp1": "fast", "cp2": "standard"})
    without_fast = {k: v for k, v in TARIFFS.items() if k != "fast"}
    with pytest.raises(CommandError) as info:
        book.replace(2, without_fast)
    assert info.value.code == "invalid_tariff"
    assert info.value.message.startswith("chargers.cp1.tariff: unknown tariff 'fast'")
    assert book.version == 0 and book.ids == sorted(TARIFFS)
    # the config the book starts from is checked the same way
    with pytest.raises(TariffError) as start:
        TariffBook(without_fast, BILLING, chargers={"cp1": "fast"})
    assert start.value.path == "chargers.cp1.tariff"


@pytest.mark.parametrize("version", [0, -1, MAX_VERSION + 1, 10**300, 1.0, 1e300, True, "3"])
def test_versions_are_integers_up_to_2_53(version: Any) -> None:
    with pytest.raises(CommandError) as info:
        check_version(version, "tariffs")
    assert info.value.code == "invalid"
    book = TariffBook(TARIFFS, BILLING)
    with pytest.raises(CommandError):
        book.replace(version, TARIFFS)
    assert book.version == 0
    assert book.replace(MAX_VERSION, TARIFFS)["version"] == MAX_VERSION


def test_a_curve_that_falls_back_never_prices_negative_energy() -> None:
    # A counter glitch taken as a reset and undone later: the curve rose too far, then fell.
    tariff = parse_tariff(
        {
            "currency": "EUR",
            "elements": [
                energy("0.50", start_time="10:00", end_time="11:00"),
                energy("0.30"),
            ],
        }
    )
    t0 = datetime.fromisoformat("2026-03-02T10:30").replace(tzinfo=ZoneInfo(BERLIN)).timestamp()
    points = [
        MeterPoint(t0 + 600, 1000, True, 11_000.0),
        MeterPoint(t0 + 1200, 9000, True, 11_000.0),  # the glitch
        MeterPoint(t0 + 3600, 4000, True, 11_000.0),  # back on the true counter, after 11:00
    ]
    priced = price_session(tariff, points, t0, t0 + 3600, BERLIN)
    assert all(p["energy_wh"] >= 0 for p in priced.charging_periods)
    assert sum(p["energy_wh"] for p in priced.charging_periods) == 4000
    assert priced.cost is not None
    assert all(Decimal(line["amount"]) >= 0 for line in priced.cost["lines"])


async def test_a_push_that_cannot_be_stored_changes_nothing() -> None:
    # Applied in memory and then failing to store, a push was billed until the next restart
    # and then silently undone, while the cloud was told it failed.
    from types import SimpleNamespace

    from gateway.app import SiteCommands

    class FullDisk:
        async def kv_put(self, key: str, value: Any) -> None:
            raise OSError(28, "No space left on device")

    book = TariffBook(TARIFFS, BILLING)
    commands = SiteCommands(SimpleNamespace(tariffs=book, store=FullDisk()))  # type: ignore[arg-type]
    new = {**TARIFFS, "fast": {"currency": "EUR", "elements": [energy("0.69")]}}
    with pytest.raises(OSError):
        await commands.update_tariffs(2, new)
    assert book.version == 0 and book.get("fast") == TARIFFS["fast"]


def test_every_problem_of_a_tariff_at_once() -> None:
    """A tariff set reports each tariff's problems together, each at its key path."""
    from gateway.billing.tariff import tariff_set_problems

    bad = {
        "currency": "euro",
        "vat_percent": 120,
        "elements": [
            {"components": [{"type": "energy", "price": "lots"}, {"type": "flat", "price": -1}]},
            {"components": [{"type": "time", "price": 1}], "restrictions": {"min_current": 6}},
        ],
    }
    problems = tariff_set_problems({"std": bad}, default_tariff=None, groups={})
    assert [str(p) for p in problems] == [
        "tariffs.std.currency: expected an ISO 4217 code of 3 capital letters, got 'euro'",
        "tariffs.std.elements[0].components[0].price: not a decimal number: 'lots'",
        "tariffs.std.elements[0].components[1].price: must be >= 0, got -1",
        "tariffs.std.elements[1].restrictions.min_current: not supported: meter points carry "
        "power, not current; use min_power/max_power",
    ]
