"""Tariff definitions as models on ``gateway.schema``: every problem of a tariff at once, each at
its key path (``elements[1].components[0].price``), in the wording of the tariff checks.

``gateway.billing.tariff`` builds its ``Tariff`` from a valid ``TariffIn``; the config and the
``tariffs`` command both validate through ``tariff_problems``.
"""

from __future__ import annotations

import re
from datetime import date, time
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Self

from pydantic import ValidationError, model_validator
from pydantic_core import core_schema

from gateway.model import MAX_VERSION
from gateway.schema import AsTuple, Check, Model, Problems, adapter, fail, problems_of
from gateway.yamlpos import YamlDoc

__all__ = [
    "DAYS",
    "MAX_DESCRIPTION",
    "MAX_DURATION_S",
    "MAX_ELEMENTS",
    "MAX_KWH",
    "MAX_POWER_KW",
    "MAX_PRICE",
    "MAX_PRICE_PLACES",
    "MAX_STEP",
    "ComponentIn",
    "ElementIn",
    "RestrictionsIn",
    "TariffIn",
    "tariff_problems",
]

DAYS = ("MONDAY", "TUESDAY", "WEDNESDAY", "THURSDAY", "FRIDAY", "SATURDAY", "SUNDAY")

# Bounds: what no real tariff needs, so that no pushed or configured one can break pricing
# (1e30 overflowed every cost into "unpriced") or a comparison (a version of 1e300 made every
# later push stale). Versions stay exact in every JSON parser (IEEE doubles: 2^53).
MAX_PRICE = Decimal(10**9)  # per kWh, hour or session, and min/max price: any currency's unit
MAX_PRICE_PLACES = 6  # decimal places of a price
MAX_ELEMENTS = 100  # elements in one tariff
MAX_STEP = {"energy": 1_000_000, "time": 86_400, "parking_time": 86_400}  # Wh, s, s
MAX_KWH = Decimal(10**6)  # restriction bounds: 1 GWh, 10 MW, a year
MAX_POWER_KW = Decimal(10**4)
MAX_DURATION_S = 366 * 86_400
MAX_DESCRIPTION = 1000

_TIME_RE = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])")
_DATE_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_CURRENCY_RE = re.compile(r"[A-Z]{3}")
_DIMENSIONS = ("energy", "time", "parking_time", "flat")


class Dec(Check):
    """A decimal from a number or a string (numbers read through ``str()``: YAML's 0.39 is
    ``Decimal("0.39")``), within bounds; ``places``: at most that many decimal places."""

    def __init__(
        self,
        *,
        minimum: Decimal | None = Decimal(0),
        maximum: Decimal | None = None,
        places: int | None = None,
    ) -> None:
        self.minimum, self.maximum, self.places = minimum, maximum, places

    def validate(self, value: Any, info: core_schema.ValidationInfo) -> Decimal:
        if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
            raise fail(f"expected a decimal number or string, got {type(value).__name__}")
        try:
            dec = Decimal(str(value).strip())
        except InvalidOperation:
            raise fail(f"not a decimal number: {value!r}") from None
        if not dec.is_finite():
            raise fail(f"not a finite number: {value!r}")
        if self.minimum is not None and dec < self.minimum:
            raise fail(f"must be >= {self.minimum}, got {value!r}")
        if self.maximum is not None and dec > self.maximum:
            raise fail(f"must be at most {self.maximum}, got {value!r}")
        exponent = dec.normalize().as_tuple().exponent
        if self.places is not None and isinstance(exponent, int) and -exponent > self.places:
            raise fail(f"at most {self.places} decimal places, got {value!r}")
        return dec

    def json_schema(self) -> dict[str, Any]:
        return {"type": ["number", "string"]}


class Whole(Check):
    """An integer (never a boolean or 1.5) within ``minimum..maximum``."""

    def __init__(self, *, minimum: int, maximum: int = MAX_VERSION) -> None:
        self.minimum, self.maximum = minimum, maximum

    def validate(self, value: Any, info: core_schema.ValidationInfo) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail(f"expected an integer, got {value!r}")
        if value < self.minimum:
            raise fail(f"must be >= {self.minimum}, got {value}")
        if value > self.maximum:
            raise fail(f"must be at most {self.maximum}, got {value}")
        return value

    def json_schema(self) -> dict[str, Any]:
        return {"type": "integer", "minimum": self.minimum, "maximum": self.maximum}


class _LocalTime(Check):
    def validate(self, value: Any, info: core_schema.ValidationInfo) -> time:
        if not isinstance(value, str) or not _TIME_RE.fullmatch(value):
            raise fail(f'expected a local time "HH:MM" (00:00..23:59), got {value!r}')
        return time(int(value[:2]), int(value[3:]))


class _Day(Check):
    def validate(self, value: Any, info: core_schema.ValidationInfo) -> date:
        if isinstance(value, date):  # YAML turns an unquoted 2026-03-29 into a date
            return value
        if not isinstance(value, str) or not _DATE_RE.fullmatch(value):
            raise fail(f'expected a date "YYYY-MM-DD", got {value!r}')
        try:
            return date.fromisoformat(value)
        except ValueError as exc:
            raise fail(f"invalid date {value!r}: {exc}") from None


class _Weekdays(Check):
    """``MONDAY`` or a list of them -> weekday numbers (0 = Monday)."""

    def validate(self, value: Any, info: core_schema.ValidationInfo) -> frozenset[int]:
        raw = [value] if isinstance(value, str) else value
        if not isinstance(raw, list) or not raw:
            raise fail("expected a non-empty list of MONDAY..SUNDAY")
        days: set[int] = set()
        for i, day in enumerate(raw):
            if not isinstance(day, str) or day.upper() not in DAYS:
                raise fail(f"expected one of MONDAY..SUNDAY, got {day!r}", at=(i,))
            days.add(DAYS.index(day.upper()))
        return frozenset(days)


class _Text(Check):
    def __init__(self, pattern: re.Pattern[str] | None, wrong: str, max_len: int = 0) -> None:
        self.pattern, self.wrong, self.max_len = pattern, wrong, max_len

    def validate(self, value: Any, info: core_schema.ValidationInfo) -> str:
        if not isinstance(value, str) or (self.pattern and not self.pattern.fullmatch(value)):
            raise fail(self.wrong.format(value=value))
        if self.max_len and len(value) > self.max_len:
            raise fail(f"longer than {self.max_len} characters")
        return value


class _Dimension(Check):
    def validate(self, value: Any, info: core_schema.ValidationInfo) -> str:
        if not isinstance(value, str) or value.lower() not in _DIMENSIONS:
            raise fail(f"expected energy | time | parking_time | flat, got {value!r}")
        return value.lower()


_PRICE = Dec(maximum=MAX_PRICE, places=MAX_PRICE_PLACES)


class RestrictionsIn(Model):
    """When an element applies; minimums inclusive, maximums exclusive, local site time."""

    start_time: Annotated[time, _LocalTime()] | None = None
    end_time: Annotated[time, _LocalTime()] | None = None
    start_date: Annotated[date, _Day()] | None = None
    end_date: Annotated[date, _Day()] | None = None
    day_of_week: Annotated[frozenset[int], _Weekdays()] | None = None
    min_kwh: Annotated[Decimal, Dec(maximum=MAX_KWH)] | None = None
    max_kwh: Annotated[Decimal, Dec(maximum=MAX_KWH)] | None = None
    min_current: Any = None  # refused: see _between_keys
    max_current: Any = None
    min_power: Annotated[Decimal, Dec(maximum=MAX_POWER_KW)] | None = None
    max_power: Annotated[Decimal, Dec(maximum=MAX_POWER_KW)] | None = None
    min_duration: Annotated[int, Whole(minimum=0, maximum=MAX_DURATION_S)] | None = None
    max_duration: Annotated[int, Whole(minimum=0, maximum=MAX_DURATION_S)] | None = None

    @model_validator(mode="after")
    def _between_keys(self) -> Self:
        problems = Problems()
        for key in ("min_current", "max_current"):
            if key in self.model_fields_set:
                problems.add(
                    (key,),
                    "not supported: meter points carry power, not current; use min_power/max_power",
                )
        if self.start_time is not None and self.start_time == self.end_time:
            problems.add(("end_time",), "equals start_time: an empty (or whole-day?) window")
        if self.start_date and self.end_date and self.end_date <= self.start_date:
            problems.add(("end_date",), "must be after start_date (end_date is exclusive)")
        for lo, hi in (
            ("min_kwh", "max_kwh"),
            ("min_power", "max_power"),
            ("min_duration", "max_duration"),
        ):
            low, high = getattr(self, lo), getattr(self, hi)
            if low is not None and high is not None and high <= low:
                problems.add((hi,), f"must be greater than {lo}")
        problems.raise_any()
        return self


class ComponentIn(Model):
    type: Annotated[str, _Dimension()]
    price: Annotated[Decimal, _PRICE]
    step_size: Annotated[int, Whole(minimum=1)] = 1

    @model_validator(mode="after")
    def _step(self) -> Self:
        problems = Problems()
        if self.type == "flat" and self.step_size != 1:
            problems.add(("step_size",), "a flat component has no step_size")
        elif self.step_size > MAX_STEP.get(self.type, 1):
            top = MAX_STEP.get(self.type, 1)
            problems.add(("step_size",), f"must be at most {top}, got {self.step_size}")
        problems.raise_any()
        return self


class ElementIn(Model):
    components: Annotated[tuple[ComponentIn, ...], AsTuple]
    restrictions: RestrictionsIn | None = None

    @model_validator(mode="after")
    def _components(self) -> Self:
        problems = Problems()
        if not self.components:
            problems.add(("components",), "expected a non-empty list of price components")
        seen: set[str] = set()
        for i, comp in enumerate(self.components):
            if comp.type in seen:
                problems.add(
                    ("components", i, "type"), f"a second {comp.type} component in one element"
                )
            seen.add(comp.type)
        problems.raise_any()
        return self


class TariffIn(Model):
    currency: Annotated[
        str,
        _Text(_CURRENCY_RE, "expected an ISO 4217 code of 3 capital letters, got {value!r}"),
    ]
    vat_percent: Annotated[Decimal, Dec()] | None = None
    min_price: Annotated[Decimal, _PRICE] | None = None
    max_price: Annotated[Decimal, _PRICE] | None = None
    description: Annotated[str, _Text(None, "expected a string", MAX_DESCRIPTION)] | None = None
    elements: Annotated[tuple[ElementIn, ...], AsTuple]

    @model_validator(mode="after")
    def _between_keys(self) -> Self:
        problems = Problems()
        if self.vat_percent is not None and self.vat_percent > 100:
            problems.add(("vat_percent",), f"must be within 0..100, got {self.vat_percent}")
        low, high = self.min_price, self.max_price
        if low is not None and high is not None and high < low:
            problems.add(("max_price",), "must not be below min_price")
        if not self.elements:
            problems.add(("elements",), "expected a non-empty list of tariff elements")
        elif len(self.elements) > MAX_ELEMENTS:
            problems.add(
                ("elements",), f"{len(self.elements)} elements: at most {MAX_ELEMENTS} are allowed"
            )
        problems.raise_any()
        return self


def tariff_problems(data: Any) -> tuple[TariffIn | None, list[tuple[str, str, bool]]]:
    """``data`` (one tariff) as a ``TariffIn``, or None and every problem as (key path inside the
    tariff, message, whether the key itself is the problem), in the order of the file."""
    doc = YamlDoc("", data)
    try:
        return adapter(TariffIn).validate_python(data, context={}, by_alias=True, by_name=False), []
    except ValidationError as exc:
        problems = problems_of(exc, TariffIn, doc)
    return None, [(p.path, p.message, p.message.startswith("unknown key")) for p in problems]
