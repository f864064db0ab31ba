"""Value types shared by every model: one duration syntax, ranges and strings with messages a
person reads, choices that never take a boolean for a number, lists read into tuples.

Each is an ``Annotated`` marker (``Annotated[float, Range(0, 60)]``) that checks the value itself
and writes its own JSON Schema, so a key's type, range and description live in one place.

Ranges, patterns and choices are what a person writes into a file: they are checked when a
document is validated (``gateway.schema.validate_*`` always passes a validation context) and not
when code builds an object itself (tests and the simulator use port 0, short timeouts); types are
checked either way.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Iterable, Sequence
from datetime import date, datetime
from enum import Enum
from typing import Annotated, Any

from pydantic import BeforeValidator, GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import PydanticCustomError, core_schema

__all__ = [
    "DURATION_PATTERN",
    "AsTuple",
    "Check",
    "Choice",
    "Duration",
    "Range",
    "Text",
    "describe",
    "fail",
    "format_duration",
    "parse_duration",
    "suggest",
]

ERROR_TYPE = "evgw"  # the error type of every message this layer words itself


def fail(message: str, *, at: tuple[str | int, ...] = (), key: bool = False) -> PydanticCustomError:
    """An error to raise from a validator: ``message`` as written (braces are safe), placed at
    ``at`` below the value being validated (at its key when ``key``)."""
    return PydanticCustomError(
        ERROR_TYPE, "{message}", {"message": message, "at": tuple(at), "key": key}
    )


# What a value is called where the value itself is not shown; the first kind that holds wins
# (a boolean is an int to isinstance).
_KINDS: tuple[tuple[type | tuple[type, ...], str], ...] = (
    (bool, "a boolean"),
    (dict, "a mapping"),
    ((list, tuple), "a list"),
    (datetime, "a timestamp"),
    (date, "a date"),
    ((int, float), "a number"),
    (str, "a string"),
)


def describe(value: Any, *, secret: bool = False) -> str:
    """How a wrong value is shown in a message: a scalar as written, anything else and secrets
    only by their kind."""
    if value is None:
        return "an empty value"
    if secret or not isinstance(value, bool | int | float | str):
        return next(
            (word for kind, word in _KINDS if isinstance(value, kind)), type(value).__name__
        )
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and len(value) > 80:
        value = value[:77] + "..."
    return repr(value)


def suggest(word: object, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or ``""``."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.7)
    return f" (did you mean '{close[0]}'?)" if close else ""


# --- durations ---------------------------------------------------------------------------
# The one syntax (config, profiles, tariffs, scenarios), the config's since its first release: a
# number of seconds (``30``, ``0.5``) or one or more number-unit parts, units ms, s, m, h, d
# (``500ms``, ``2m``, ``1h30m``, ``1d``); spaces around the whole are ignored, none inside
# (``" 10 s"`` is refused). Nothing else: no signs, no exponents, no other units.

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_RE = re.compile(r"(?:[0-9]+(?:\.[0-9]+)?(?:ms|s|m|h|d))+")
_DURATION_PART_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)")
_NUMBER_RE = re.compile(r"[0-9]+(?:\.[0-9]+)?")
DURATION_PATTERN = r"^(?:[0-9]+(?:\.[0-9]+)?(?:ms|s|m|h|d))+$|^[0-9]+(?:\.[0-9]+)?$"


def parse_duration(value: object) -> float:
    """``"500ms"``, ``"1s"``, ``"2m"``, ``"1h"``, ``"1d"``, ``"1h30m"`` or a number of seconds ->
    seconds. Raises ``ValueError`` with a message fit for a person."""
    if isinstance(value, bool):
        raise ValueError(
            f"invalid duration {value!r}: expected a number of seconds or e.g. 500ms, 2m"
        )
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if _NUMBER_RE.fullmatch(text):
            seconds = float(text)
        elif _DURATION_RE.fullmatch(text):
            seconds = sum(
                float(num) * _DURATION_UNITS[unit] for num, unit in _DURATION_PART_RE.findall(text)
            )
        else:
            raise ValueError(
                f"invalid duration {value!r}: use a number of seconds or a number with a unit "
                "(ms, s, m, h, d), e.g. 500ms or 2m"
            )
    else:
        raise ValueError(
            "invalid duration: expected a number of seconds or e.g. 500ms, 2m, "
            f"got {describe(value)}"
        )
    if not math.isfinite(seconds):
        raise ValueError(f"invalid duration {value!r}: not a finite number")
    if seconds < 0:
        raise ValueError(f"invalid duration {value!r}: must not be negative")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest usual spelling: 0.1 -> ``100ms``, 120 -> ``2m``, 7200 -> ``2h``,
    1.5 -> ``1.5s``."""
    if seconds != 0 and seconds < 1:
        return f"{seconds * 1000:g}ms"
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


class _Duration:
    """Seconds as a float, read from the one duration syntax."""

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        def check(value: Any) -> float:
            try:
                return parse_duration(value)
            except ValueError as exc:
                raise fail(str(exc)) from None

        return core_schema.no_info_plain_validator_function(
            check, json_schema_input_schema=core_schema.float_schema()
        )

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {"anyOf": [{"type": "number", "minimum": 0}, _DURATION_STRING]}


_DURATION_STRING = {"type": "string", "pattern": DURATION_PATTERN}

Duration = Annotated[float, _Duration()]
"""A duration in seconds; ``Annotated[Duration, Range(lo, hi)]`` bounds it (shown as durations)."""


# --- ranges, strings, choices ------------------------------------------------------------


class Check:
    """Base of a marker that checks a value itself: a subclass gives ``validate(value, info)``
    (``info.context`` is None when code builds the object) and ``json_schema()``."""

    def validate(self, value: Any, info: core_schema.ValidationInfo) -> Any:
        raise NotImplementedError

    def json_schema(self) -> dict[str, Any]:
        return {}

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.with_info_plain_validator_function(self.validate)

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return self.json_schema()


def _show_number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


class Range:
    """``lo <= value <= hi`` (either may be None), worded "must be between 1 and 125, got 200",
    "must be at least 0, got -1" or "must be at most 60s, got 2m" (after ``Duration``)."""

    def __init__(self, lo: float | None = None, hi: float | None = None) -> None:
        self.lo = lo
        self.hi = hi

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        inner = handler(source)
        show: Callable[[float], str] = _show_number
        if _is_duration(inner):
            show = format_duration
        lo, hi = self.lo, self.hi

        def check(value: Any, info: core_schema.ValidationInfo) -> Any:
            if info.context is None:  # built by code, not read from a file
                return value
            if lo is not None and hi is not None and not lo <= value <= hi:
                raise fail(f"must be between {show(lo)} and {show(hi)}, got {show(value)}")
            if lo is not None and value < lo:
                raise fail(f"must be at least {show(lo)}, got {show(value)}")
            if hi is not None and value > hi:
                raise fail(f"must be at most {show(hi)}, got {show(value)}")
            return value

        return core_schema.with_info_after_validator_function(check, inner)

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        out = handler(schema)
        target = out["anyOf"][0] if "anyOf" in out else out  # a duration: bound the number
        if self.lo is not None:
            target["minimum"] = self.lo
        if self.hi is not None:
            target["maximum"] = self.hi
        return out


def _is_duration(schema: core_schema.CoreSchema) -> bool:
    fn = schema.get("function")
    return isinstance(fn, dict) and getattr(fn.get("function"), "__qualname__", "").startswith(
        "_Duration."
    )


class Text(Check):
    """A string: not empty (unless ``min_len=0``), at most ``max_len`` characters, matching
    ``pattern`` (worded "must be {hint}, got 'x'"), passing ``check`` (returns a message or
    None). ``secret``: messages never show the value."""

    def __init__(
        self,
        *,
        pattern: str | None = None,
        hint: str = "",
        min_len: int = 1,
        max_len: int | None = None,
        check: Callable[[str], str | None] | None = None,
        secret: bool = False,
    ) -> None:
        self.pattern = re.compile(pattern) if pattern else None
        self.hint = hint
        self.min_len = min_len
        self.max_len = max_len
        self.check = check
        self.secret = secret

    def validate(self, value: Any, info: core_schema.ValidationInfo) -> str:
        if info.context is None and isinstance(value, str):  # built by code
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            raise fail("expected a string, got a number: quote the value")
        if not isinstance(value, str):
            raise fail(f"expected a string, got {describe(value, secret=self.secret)}")
        if len(value) < self.min_len:
            raise fail("must not be empty")
        if self.max_len is not None and len(value) > self.max_len:
            raise fail(f"must be at most {self.max_len} characters, got {len(value)}")
        if self.pattern is not None and not self.pattern.fullmatch(value):
            shown = "" if self.secret else f", got {describe(value)}"
            raise fail(f"must be {self.hint or 'like ' + self.pattern.pattern}{shown}")
        if self.check is not None:
            message = self.check(value)
            if message:
                raise fail(message)
        return value

    def json_schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "string"}
        if self.min_len:
            out["minLength"] = self.min_len
        if self.max_len is not None:
            out["maxLength"] = self.max_len
        if self.pattern is not None:
            out["pattern"] = f"^(?:{self.pattern.pattern})$"
        return out


class Choice(Check):
    """One of ``values`` (strings or integers; ``True`` is never taken for 1), worded
    "must be one of a, b; got 'c' (did you mean 'a'?)". Use with ``Literal`` for the type:
    ``Annotated[Literal["N", "E", "O"], Choice("N", "E", "O")]``; or alone on ``str``/``int``
    when the values come from a table."""

    def __init__(self, *values: str | int, convert: Callable[[Any], Any] | None = None) -> None:
        self.values: Sequence[str | int] = values
        self.convert = convert

    @classmethod
    def of(cls, enum: type[Enum], members: Iterable[Enum] | None = None) -> Choice:
        """The values of ``enum`` (or of some of its ``members``), read into the member."""
        return cls(*(m.value for m in (enum if members is None else members)), convert=enum)

    def validate(self, value: Any, info: core_schema.ValidationInfo) -> Any:
        valid = any(type(value) is type(v) and value == v for v in self.values)
        if not valid and info.context is None:  # built by code (an enum member, say)
            return value
        if not valid:
            choices = ", ".join(str(v) for v in self.values)
            hint = suggest(value, [v for v in self.values if isinstance(v, str)])
            raise fail(f"must be one of {choices}; got {describe(value)}{hint}")
        return self.convert(value) if self.convert else value

    def json_schema(self) -> dict[str, Any]:
        return {"enum": list(self.values)}


def _as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


AsTuple = BeforeValidator(_as_tuple)
"""``Annotated[tuple[X, ...], AsTuple]``: a YAML list read into a tuple (strict mode takes only
tuples otherwise)."""
