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
from decimal import Decimal
from enum import StrEnum
from typing import Any

import structlog

from gateway.billing.policy import BillingConfig
from gateway.billing.tariff_schema import (
    DAYS,
    MAX_ELEMENTS,
    MAX_PRICE,
    ElementIn,
    tariff_problems,
)
from gateway.errors import CommandError, TariffError
from gateway.model import MAX_VERSION
from gateway.records import canonical_json
from gateway.schema import to_spec

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

MAX_TARIFFS = 100  # tariffs in one set


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


# --- parsing: the models are in gateway.billing.tariff_schema ---------------------------


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _under(path: str, inner: str) -> str:
    """``inner`` (a key path inside a tariff) below ``path``."""
    if not inner or not path:
        return inner or path
    return f"{path}{inner}" if inner.startswith("[") else f"{path}.{inner}"


def check_version(value: Any, what: str) -> int:
    """A version of a pushed list (tariffs, tokens): an integer in 1..2^53. Raises
    ``CommandError`` ``invalid`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_VERSION:
        raise CommandError(
            "invalid", f"{what} version must be an integer in 1..{MAX_VERSION}, got {value!r}"
        )
    return value


def parse_tariff(data: Any, path: str = "") -> Tariff:
    """Validate raw tariff data (from YAML or a ``tariffs`` command) into a :class:`Tariff`.

    Raises :class:`gateway.errors.TariffError` with the first problem (``tariff_set_problems``
    gives them all); its ``path`` is ``path`` joined with the key path inside the tariff
    (``elements[1].components[0].price``).
    """
    model, problems = tariff_problems(data)
    if model is None:
        where, message, _ = problems[0]
        raise TariffError(_under(path, where), message)
    return Tariff(
        currency=model.currency,
        elements=tuple(_element(e) for e in model.elements),
        vat_percent=model.vat_percent,
        min_price=model.min_price,
        max_price=model.max_price,
        description=model.description,
    )


def _element(element: ElementIn) -> TariffElement:
    r = element.restrictions
    return TariffElement(
        components=tuple(
            PriceComponent(Dimension(c.type), c.price, c.step_size) for c in element.components
        ),
        restrictions=Restrictions()
        if r is None
        else to_spec(
            r,
            Restrictions,
            min_power_kw=r.min_power,
            max_power_kw=r.max_power,
            min_duration_s=r.min_duration,
            max_duration_s=r.max_duration,
        ),
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
        for where, message, key in tariff_problems(data)[1]:
            problems.append(
                TariffProblem(("tariffs", str(tid), *_tariff_path(where)), message, key)
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
