"""Tariffs: an OCPI 2.2.1-style model, its validation and the site's tariff book.

A tariff (CONTRACT section 3, ``tariffs:``) is a currency, an optional VAT rate, optional
``min_price``/``max_price`` and a list of elements; each element has price components and
optional restrictions. For each dimension (energy, time, parking_time, flat) the FIRST element
whose restrictions hold and that has a component of that type prices it (OCPI semantics).

Differences from OCPI 2.2.1, on purpose:

- ``vat_percent`` is one rate for the whole tariff (OCPI has one per component). When it is
  absent, no VAT is applicable (OCPI: "not providing a VAT is different from 0 %"): the cost's
  ``vat`` is ``"0.00"`` and ``incl_vat`` equals ``excl_vat``. The frozen tariff (its
  ``tariff_version``) still says which of the two was meant.
- ``min_current``/``max_current`` are parsed and then refused: session meter points carry power
  and energy, not current, so such a restriction could not be evaluated honestly.
- ``reservation`` restrictions and tariff ``type`` / alternative texts are not accepted: the
  gateway has no reservations and the texts belong to the cloud.

Prices are decimal strings (``"0.39"``) or numbers; numbers are read through ``str()`` so that a
YAML ``0.39`` becomes ``Decimal("0.39")``, never a binary fraction.
"""

from __future__ import annotations

import copy
import hashlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, time
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from typing import Any

import structlog

from gateway.billing.policy import BillingConfig
from gateway.errors import CommandError, TariffError
from gateway.model import MAX_VERSION
from gateway.records import canonical_json

__all__ = [
    "DAYS",
    "MAX_ELEMENTS",
    "MAX_PRICE",
    "MAX_TARIFFS",
    "MAX_VERSION",
    "Dimension",
    "PriceComponent",
    "Resolved",
    "Restrictions",
    "Tariff",
    "TariffBook",
    "TariffElement",
    "TariffProblem",
    "check_version",
    "parse_tariff",
    "tariff_set_problems",
    "tariff_version",
]

log = structlog.get_logger(__name__)

DAYS = ("MONDAY", "TUESDAY", "WEDNESDAY", "THURSDAY", "FRIDAY", "SATURDAY", "SUNDAY")

# Bounds: what no real tariff needs, so that no pushed or configured one can break pricing
# (1e30 overflowed every cost into "unpriced") or a comparison (a version of 1e300 made every
# later push stale). Versions stay exact in every JSON parser (IEEE doubles: 2^53).
MAX_PRICE = Decimal(10**9)  # per kWh, hour or session, and min/max price: any currency's unit
MAX_PRICE_PLACES = 6  # decimal places of a price
MAX_TARIFFS = 100  # tariffs in one set
MAX_ELEMENTS = 100  # elements in one tariff
MAX_STEP = {"energy": 1_000_000, "time": 86_400, "parking_time": 86_400}  # Wh, s, s
MAX_KWH = Decimal(10**6)  # restriction bounds: 1 GWh, 10 MW, a year
MAX_POWER_KW = Decimal(10**4)
MAX_DURATION_S = 366 * 86_400
MAX_DESCRIPTION = 1000


class Dimension(StrEnum):
    ENERGY = "energy"  # step_size in Wh, price per kWh
    TIME = "time"  # charging time; step_size in s, price per hour
    PARKING_TIME = "parking_time"  # connected, not charging; step_size in s, price per hour
    FLAT = "flat"  # once per session


@dataclass(frozen=True, slots=True)
class PriceComponent:
    type: Dimension
    price: Decimal  # per kWh, per hour or per session, excl. VAT
    step_size: int = 1  # Wh for energy, seconds for time and parking_time; unused for flat


@dataclass(frozen=True, slots=True)
class Restrictions:
    """When an element applies. Minimums are inclusive, maximums exclusive; times and dates are
    local to the site (``site.timezone``); ``end_date`` is exclusive as in OCPI."""

    start_time: time | None = None
    end_time: time | None = None
    start_date: date | None = None
    end_date: date | None = None
    day_of_week: frozenset[int] | None = None  # 0 = Monday, as datetime.weekday()
    min_kwh: Decimal | None = None
    max_kwh: Decimal | None = None
    min_power_kw: Decimal | None = None
    max_power_kw: Decimal | None = None
    min_duration_s: int | None = None
    max_duration_s: int | None = None

    @property
    def empty(self) -> bool:
        return all(getattr(self, name) is None for name in self.__slots__)


@dataclass(frozen=True, slots=True)
class TariffElement:
    components: tuple[PriceComponent, ...]
    restrictions: Restrictions = Restrictions()

    def component(self, dim: Dimension) -> PriceComponent | None:
        for comp in self.components:
            if comp.type is dim:
                return comp
        return None


@dataclass(frozen=True, slots=True)
class Tariff:
    currency: str
    elements: tuple[TariffElement, ...]
    vat_percent: Decimal | None = None  # None: no VAT applicable (not the same as 0)
    min_price: Decimal | None = None  # excl. VAT
    max_price: Decimal | None = None  # excl. VAT
    description: str | None = None


# --- parsing -----------------------------------------------------------------------------

_TIME_RE = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])")
_DATE_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_CURRENCY_RE = re.compile(r"[A-Z]{3}")

_TARIFF_KEYS = {"currency", "vat_percent", "elements", "min_price", "max_price", "description"}
_ELEMENT_KEYS = {"components", "restrictions"}
_COMPONENT_KEYS = {"type", "price", "step_size"}
_RESTRICTION_KEYS = {
    "start_time",
    "end_time",
    "start_date",
    "end_date",
    "day_of_week",
    "min_kwh",
    "max_kwh",
    "min_current",
    "max_current",
    "min_power",
    "max_power",
    "min_duration",
    "max_duration",
}


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _check_keys(data: Mapping[str, Any], allowed: set[str], path: str) -> None:
    for key in data:
        if not isinstance(key, str):
            raise TariffError(path, f"keys must be strings, got {key!r}")
        if key not in allowed:
            raise TariffError(
                _join(path, key), f"unknown key (allowed: {', '.join(sorted(allowed))})"
            )


def _mapping(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise TariffError(path, f"expected a mapping, got {type(value).__name__}")
    return value


def _decimal(
    value: Any,
    path: str,
    *,
    minimum: Decimal | None = Decimal(0),
    maximum: Decimal | None = None,
) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
        raise TariffError(path, f"expected a decimal number or string, got {type(value).__name__}")
    try:
        dec = Decimal(str(value).strip())
    except InvalidOperation:
        raise TariffError(path, f"not a decimal number: {value!r}") from None
    if not dec.is_finite():
        raise TariffError(path, f"not a finite number: {value!r}")
    if minimum is not None and dec < minimum:
        raise TariffError(path, f"must be >= {minimum}, got {value!r}")
    if maximum is not None and dec > maximum:
        raise TariffError(path, f"must be at most {maximum}, got {value!r}")
    return dec


def _price(value: Any, path: str) -> Decimal:
    dec = _decimal(value, path, maximum=MAX_PRICE)
    exponent = dec.normalize().as_tuple().exponent
    if isinstance(exponent, int) and -exponent > MAX_PRICE_PLACES:
        raise TariffError(path, f"at most {MAX_PRICE_PLACES} decimal places, got {value!r}")
    return dec


def _int(value: Any, path: str, *, minimum: int, maximum: int = MAX_VERSION) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TariffError(path, f"expected an integer, got {value!r}")
    if value < minimum:
        raise TariffError(path, f"must be >= {minimum}, got {value}")
    if value > maximum:
        raise TariffError(path, f"must be at most {maximum}, got {value}")
    return value


def check_version(value: Any, what: str) -> int:
    """A version of a pushed list (tariffs, tokens): an integer in 1..2^53. Raises
    ``CommandError`` ``invalid`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_VERSION:
        raise CommandError(
            "invalid", f"{what} version must be an integer in 1..{MAX_VERSION}, got {value!r}"
        )
    return value


def _time(value: Any, path: str) -> time:
    if not isinstance(value, str) or not _TIME_RE.fullmatch(value):
        raise TariffError(path, f'expected a local time "HH:MM" (00:00..23:59), got {value!r}')
    return time(int(value[:2]), int(value[3:]))


def _date(value: Any, path: str) -> date:
    if isinstance(value, date):  # YAML turns an unquoted 2026-03-29 into a date
        return value
    if not isinstance(value, str) or not _DATE_RE.fullmatch(value):
        raise TariffError(path, f'expected a date "YYYY-MM-DD", got {value!r}')
    try:
        return date.fromisoformat(value)
    except ValueError as exc:
        raise TariffError(path, f"invalid date {value!r}: {exc}") from None


def _restrictions(data: Any, path: str) -> Restrictions:
    m = _mapping(data, path)
    _check_keys(m, _RESTRICTION_KEYS, path)
    for key in ("min_current", "max_current"):
        if key in m:
            raise TariffError(
                _join(path, key),
                "not supported: meter points carry power, not current; use min_power/max_power",
            )
    kw: dict[str, Any] = {}
    if "start_time" in m:
        kw["start_time"] = _time(m["start_time"], _join(path, "start_time"))
    if "end_time" in m:
        kw["end_time"] = _time(m["end_time"], _join(path, "end_time"))
    if kw.get("start_time") is not None and kw.get("start_time") == kw.get("end_time"):
        raise TariffError(
            _join(path, "end_time"), "equals start_time: an empty (or whole-day?) window"
        )
    if "start_date" in m:
        kw["start_date"] = _date(m["start_date"], _join(path, "start_date"))
    if "end_date" in m:
        kw["end_date"] = _date(m["end_date"], _join(path, "end_date"))
    if "start_date" in kw and "end_date" in kw and kw["end_date"] <= kw["start_date"]:
        raise TariffError(
            _join(path, "end_date"), "must be after start_date (end_date is exclusive)"
        )
    if "day_of_week" in m:
        days_path = _join(path, "day_of_week")
        raw = m["day_of_week"]
        if isinstance(raw, str):
            raw = [raw]
        if not isinstance(raw, list) or not raw:
            raise TariffError(days_path, "expected a non-empty list of MONDAY..SUNDAY")
        days: set[int] = set()
        for i, day in enumerate(raw):
            if not isinstance(day, str) or day.upper() not in DAYS:
                raise TariffError(
                    _join(days_path, i), f"expected one of MONDAY..SUNDAY, got {day!r}"
                )
            days.add(DAYS.index(day.upper()))
        kw["day_of_week"] = frozenset(days)
    for key, attr, top in (
        ("min_kwh", "min_kwh", MAX_KWH),
        ("max_kwh", "max_kwh", MAX_KWH),
        ("min_power", "min_power_kw", MAX_POWER_KW),
        ("max_power", "max_power_kw", MAX_POWER_KW),
    ):
        if key in m:
            kw[attr] = _decimal(m[key], _join(path, key), maximum=top)
    for key, attr in (("min_duration", "min_duration_s"), ("max_duration", "max_duration_s")):
        if key in m:
            kw[attr] = _int(m[key], _join(path, key), minimum=0, maximum=MAX_DURATION_S)
    for lo, hi, key in (
        ("min_kwh", "max_kwh", "max_kwh"),
        ("min_power_kw", "max_power_kw", "max_power"),
        ("min_duration_s", "max_duration_s", "max_duration"),
    ):
        if kw.get(lo) is not None and kw.get(hi) is not None and kw[hi] <= kw[lo]:
            raise TariffError(_join(path, key), f"must be greater than {key.replace('max', 'min')}")
    return Restrictions(**kw)


def _component(data: Any, path: str) -> PriceComponent:
    m = _mapping(data, path)
    _check_keys(m, _COMPONENT_KEYS, path)
    if "type" not in m:
        raise TariffError(_join(path, "type"), "missing (energy | time | parking_time | flat)")
    raw_type = m["type"]
    if not isinstance(raw_type, str) or raw_type.lower() not in {d.value for d in Dimension}:
        raise TariffError(
            _join(path, "type"), f"expected energy | time | parking_time | flat, got {raw_type!r}"
        )
    dim = Dimension(raw_type.lower())
    if "price" not in m:
        raise TariffError(_join(path, "price"), "missing")
    price = _price(m["price"], _join(path, "price"))
    step = 1
    if "step_size" in m:
        if dim is Dimension.FLAT and m["step_size"] != 1:
            raise TariffError(_join(path, "step_size"), "a flat component has no step_size")
        top = MAX_STEP.get(dim.value, 1)
        step = _int(m["step_size"], _join(path, "step_size"), minimum=1, maximum=top)
    return PriceComponent(type=dim, price=price, step_size=step)


def _element(data: Any, path: str) -> TariffElement:
    m = _mapping(data, path)
    _check_keys(m, _ELEMENT_KEYS, path)
    comps_path = _join(path, "components")
    raw = m.get("components")
    if not isinstance(raw, list) or not raw:
        raise TariffError(comps_path, "expected a non-empty list of price components")
    comps = tuple(_component(c, _join(comps_path, i)) for i, c in enumerate(raw))
    seen: set[Dimension] = set()
    for i, comp in enumerate(comps):
        if comp.type in seen:
            raise TariffError(
                _join(_join(comps_path, i), "type"),
                f"a second {comp.type} component in one element",
            )
        seen.add(comp.type)
    restr = (
        _restrictions(m["restrictions"], _join(path, "restrictions"))
        if m.get("restrictions") is not None
        else Restrictions()
    )
    return TariffElement(components=comps, restrictions=restr)


def parse_tariff(data: Any, path: str = "") -> Tariff:
    """Validate raw tariff data (from YAML or a ``tariffs`` command) into a :class:`Tariff`.

    Raises :class:`gateway.errors.TariffError` at the first problem; its ``path`` is ``path``
    joined with the key path inside the tariff (``elements[1].components[0].price``).
    """
    m = _mapping(data, path)
    _check_keys(m, _TARIFF_KEYS, path)
    cur = m.get("currency")
    if not isinstance(cur, str) or not _CURRENCY_RE.fullmatch(cur):
        raise TariffError(
            _join(path, "currency"), f"expected an ISO 4217 code of 3 capital letters, got {cur!r}"
        )
    vat: Decimal | None = None
    if m.get("vat_percent") is not None:
        vat = _decimal(m["vat_percent"], _join(path, "vat_percent"))
        if vat > 100:
            raise TariffError(
                _join(path, "vat_percent"), f"must be within 0..100, got {m['vat_percent']!r}"
            )
    min_price = (
        _price(m["min_price"], _join(path, "min_price")) if m.get("min_price") is not None else None
    )
    max_price = (
        _price(m["max_price"], _join(path, "max_price")) if m.get("max_price") is not None else None
    )
    if min_price is not None and max_price is not None and max_price < min_price:
        raise TariffError(_join(path, "max_price"), "must not be below min_price")
    desc = m.get("description")
    if desc is not None and not isinstance(desc, str):
        raise TariffError(_join(path, "description"), "expected a string")
    if desc is not None and len(desc) > MAX_DESCRIPTION:
        raise TariffError(_join(path, "description"), f"longer than {MAX_DESCRIPTION} characters")
    raw = m.get("elements")
    if not isinstance(raw, list) or not raw:
        raise TariffError(_join(path, "elements"), "expected a non-empty list of tariff elements")
    if len(raw) > MAX_ELEMENTS:
        raise TariffError(
            _join(path, "elements"), f"{len(raw)} elements: at most {MAX_ELEMENTS} are allowed"
        )
    elements = tuple(_element(e, _join(_join(path, "elements"), i)) for i, e in enumerate(raw))
    return Tariff(
        currency=cur,
        elements=elements,
        vat_percent=vat,
        min_price=min_price,
        max_price=max_price,
        description=desc,
    )


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Decimal | date | time):
        return str(obj)
    return obj


def tariff_version(data: Mapping[str, Any]) -> str:
    """First 16 hex digits of SHA-256 over the canonical JSON of the raw tariff data: the same for
    the same content whatever the key order (dates parsed by YAML count as their ISO text)."""
    return hashlib.sha256(canonical_json(_jsonable(data))).hexdigest()[:16]


# --- a tariff set: the one validation of config and pushes ----------------------------

PathT = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class TariffProblem:
    """One problem of a tariff set, at a key path (``("tariffs", "std", "elements", 0)``)."""

    path: PathT
    message: str
    key: bool = False  # the problem is the key itself (an unknown key), not its value

    def __str__(self) -> str:
        return f"{_dotted(self.path)}: {self.message}"


def _dotted(path: PathT) -> str:
    text = ""
    for part in path:
        text = _join(text, part)
    return text


def _tariff_path(text: str) -> PathT:
    return tuple(
        int(i) if i else name for i, name in re.findall(r"\[([0-9]+)\]|\.?([^.\[\]]+)", text)
    )


def _unknown_tariff(name: str, known: Iterable[str]) -> str:
    names = sorted(known)
    if not names:
        return f"unknown tariff '{name}' (no tariffs are defined)"
    return f"unknown tariff '{name}' (defined tariffs: {', '.join(names[:12])})"


def tariff_set_problems(
    tariffs: Any,
    *,
    default_tariff: str | None,
    groups: Mapping[str, str],
    chargers: Sequence[tuple[PathT, str]] = (),
    unknown: Callable[[str, Iterable[str]], str] = _unknown_tariff,
) -> list[TariffProblem]:
    """Every problem of a set of tariffs together with what refers to them: each tariff valid
    and within bounds, at most ``MAX_TARIFFS``, and every tariff named by
    ``billing.default_tariff``, a user group or a charger (``chargers``: (path, tariff id))
    defined. ``evgw check-config`` and the ``tariffs`` command both validate through here."""
    if not isinstance(tariffs, Mapping):
        return [TariffProblem(("tariffs",), "expected a mapping of tariff id -> tariff")]
    problems: list[TariffProblem] = []
    if len(tariffs) > MAX_TARIFFS:
        problems.append(
            TariffProblem(("tariffs",), f"{len(tariffs)} tariffs: at most {MAX_TARIFFS}")
        )
    for tid, data in tariffs.items():
        try:
            parse_tariff(data, "")
        except TariffError as exc:
            problems.append(
                TariffProblem(
                    ("tariffs", str(tid), *_tariff_path(exc.path)),
                    exc.message,
                    key=exc.message.startswith("unknown key"),
                )
            )
    known = [str(t) for t in tariffs]
    if default_tariff is not None and default_tariff not in tariffs:
        problems.append(
            TariffProblem(("billing", "default_tariff"), unknown(default_tariff, known))
        )
    for group, tid in groups.items():
        if tid not in tariffs:
            problems.append(TariffProblem(("billing", "groups", group), unknown(tid, known)))
    for path, tid in chargers:
        if tid not in tariffs:
            problems.append(TariffProblem(path, unknown(tid, known)))
    return problems


@dataclass(frozen=True, slots=True)
class Resolved:
    """The tariff that prices a session: its id, version and a private copy of its data.
    ``fallback`` names the tariff that was meant but is not defined (or the user group that
    names none): the session is priced by the next choice and says so (``tariff_fallback``)."""

    tariff_id: str
    version: str
    data: dict[str, Any]
    fallback: str | None = None


# --- the tariff book ---------------------------------------------------------------------


class TariffBook:
    """The site's tariffs and which one prices a session.

    ``resolve`` picks the user's group tariff, else the charger's tariff, else
    ``billing.default_tariff``; each returned ``data`` is a private deep copy, so the session can
    freeze it. ``replace`` swaps the whole set atomically after validating it exactly as
    ``evgw check-config`` validates the config's: every tariff, and every tariff the chargers,
    groups and default name.
    """

    __slots__ = ("_billing", "_chargers", "_parsed", "_tariffs", "_version")

    def __init__(
        self,
        tariffs: Mapping[str, Mapping[str, Any]],
        billing: BillingConfig,
        version: int = 0,
        chargers: Mapping[str, str] | None = None,
    ) -> None:
        self._billing = billing
        self._chargers = dict(chargers or {})  # charger id -> the tariff it names
        self._tariffs, self._parsed = self._validate(tariffs)
        self._version = version

    def _validate(
        self, tariffs: Mapping[str, Mapping[str, Any]]
    ) -> tuple[dict[str, dict[str, Any]], dict[str, Tariff]]:
        problems = tariff_set_problems(
            tariffs,
            default_tariff=self._billing.default_tariff,
            groups=self._billing.groups,
            chargers=[(("chargers", cid, "tariff"), tid) for cid, tid in self._chargers.items()],
        )
        if problems:
            first, rest = problems[0], problems[1:]
            raise TariffError(
                _dotted(first.path), "; ".join([first.message, *(str(p) for p in rest)])
            )
        raw = {str(tid): copy.deepcopy(dict(t)) for tid, t in tariffs.items()}
        parsed = {tid: parse_tariff(data, tid) for tid, data in raw.items()}
        return raw, parsed

    @property
    def version(self) -> int:
        return self._version

    @property
    def ids(self) -> list[str]:
        return sorted(self._tariffs)

    def get(self, tariff_id: str) -> dict[str, Any] | None:
        data = self._tariffs.get(tariff_id)
        return copy.deepcopy(data) if data is not None else None

    def parsed(self, tariff_id: str) -> Tariff | None:
        return self._parsed.get(tariff_id)

    def resolve(self, charger_tariff: str | None, user_group: str | None) -> Resolved | None:
        """The tariff of a session starting now. A group without a tariff in
        ``billing.groups`` (a cloud-pushed token may carry any group) or a named tariff that is
        not defined falls back to the next choice, flagged in ``Resolved.fallback``."""
        fallback: str | None = None
        group_tariff = None
        if user_group is not None:
            group_tariff = self._billing.groups.get(user_group)
            if group_tariff is None:
                fallback = f"group:{user_group}"
        for tid in (group_tariff, charger_tariff, self._billing.default_tariff):
            if tid is None:
                continue
            data = self._tariffs.get(tid)
            if data is None:
                fallback = fallback or tid
                continue
            if fallback is not None:
                log.warning("tariff_fallback", meant=fallback, tariff_id=tid, user_group=user_group)
            return Resolved(tid, tariff_version(data), copy.deepcopy(data), fallback)
        if fallback is not None:
            log.warning("tariff_fallback", meant=fallback, tariff_id=None, user_group=user_group)
        return None

    def check(
        self, version: int, tariffs: Mapping[str, Mapping[str, Any]]
    ) -> tuple[dict[str, dict[str, Any]], dict[str, Tariff]]:
        """Validate a ``tariffs`` push without applying it. Raises ``CommandError``: ``invalid``
        for a version outside 1..2^53, ``stale_version`` when it is not newer than the current
        one, ``invalid_tariff`` (every problem with its key path) when the set is invalid."""
        check_version(version, "tariffs")
        if version <= self._version:
            raise CommandError(
                "stale_version", f"tariffs version {version} is not newer than {self._version}"
            )
        try:
            return self._validate(tariffs)
        except TariffError as exc:
            raise CommandError("invalid_tariff", str(exc)) from exc

    def replace(self, version: int, tariffs: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        """Replace every tariff at once (the ``tariffs`` command), after :meth:`check`; a
        refused set changes nothing."""
        raw, parsed = self.check(version, tariffs)
        self._tariffs, self._parsed, self._version = raw, parsed, version
        log.info("tariffs_replaced", version=version, tariffs=sorted(raw))
        return {
            "version": version,
            "tariffs": {tid: tariff_version(d) for tid, d in sorted(raw.items())},
        }
