"""Device profiles: the data that tells the generic Modbus engine how to talk to one device model.

A profile is a YAML file in ``drivers/`` (shipped in the wheel) or in a site's ``drivers_path``.
The format is documented in docs/profiles.md; this module holds its typed form and the loader.
Nothing here does I/O on a bus.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.errors import ConfigProblem, ProfileError
from gateway.modbus.codec import CodecError, decode, encode
from gateway.modbus.types import (
    CURRENT_UNITS,
    TYPES,
    DataType,
    RegisterSpec,
    Table,
    WordOrder,
    current_step_a,
    current_to_raw,
    raw_to_current,
    value_range,
)
from gateway.model import ChargerStatus, DeviceKind, IecState
from gateway.tags import normalise_tag
from gateway.yamlpos import YamlDoc, load_yaml

__all__ = [
    "CANONICAL_QUANTITIES",
    "Condition",
    "ConnectionSpec",
    "ControlSpec",
    "CurrentLimitSpec",
    "DataType",
    "HeartbeatSpec",
    "IdentifySpec",
    "OnConnectWrite",
    "Profile",
    "RegisterSpec",
    "StateRule",
    "StateSpec",
    "Table",
    "TagSpec",
    "WordOrder",
    "describe_profile",
    "load_profile",
    "load_profiles",
    "profile_json_schema",
    "shipped_drivers_dir",
    "value_range",
]

# Quantities the core understands, in the units their names carry. A profile's register named
# like one of these must deliver it in that unit after scaling.
CANONICAL_QUANTITIES: dict[str, str] = {
    "power_w": "W",
    "energy_wh": "Wh",  # cumulative import counter (lifetime)
    "energy_export_wh": "Wh",
    "session_energy_wh": "Wh",  # counter the device resets per session
    "voltage_l1_v": "V",
    "voltage_l2_v": "V",
    "voltage_l3_v": "V",
    "current_l1_a": "A",
    "current_l2_a": "A",
    "current_l3_a": "A",
    "frequency_hz": "Hz",
    "power_factor": "",
    "current_limit_a": "A",  # limit the device applies now
    "charge_time_s": "s",
    "soc_percent": "%",
    "temperature_c": "°C",
}


KNOWN_FROM = ("hardware", "code", "document")


@dataclass(frozen=True, slots=True)
class Condition:
    """One test of a raw (decoded, scaled) register value inside a state rule."""

    register: str
    equals: tuple[int | str, ...] | None = None  # value in this set
    min: float | None = None
    max: float | None = None
    bits_all: int | None = None
    bits_any: int | None = None

    def holds(self, value: object) -> bool:
        if value is None:
            return False
        if self.equals is not None and value not in self.equals:
            return False
        if (
            self.min is not None
            or self.max is not None
            or self.bits_all is not None
            or self.bits_any is not None
        ):
            if not isinstance(value, int | float) or isinstance(value, bool):
                return False
            if self.min is not None and value < self.min:
                return False
            if self.max is not None and value > self.max:
                return False
            if self.bits_all is not None and (int(value) & self.bits_all) != self.bits_all:
                return False
            if self.bits_any is not None and (int(value) & self.bits_any) == 0:
                return False
        return True


@dataclass(frozen=True, slots=True)
class StateRule:
    when: tuple[Condition, ...]
    iec: IecState
    status: ChargerStatus

    def holds(self, values: dict[str, object]) -> bool:
        return all(c.holds(values.get(c.register)) for c in self.when)


@dataclass(frozen=True, slots=True)
class StateSpec:
    """Device state codes -> IEC 61851 state and CONTRACT status; first matching rule wins."""

    rules: tuple[StateRule, ...]
    default_iec: IecState = IecState.E
    default_status: ChargerStatus = ChargerStatus.FAULTED

    def classify(self, values: dict[str, object]) -> tuple[IecState, ChargerStatus]:
        for rule in self.rules:
            if rule.holds(values):
                return rule.iec, rule.status
        return self.default_iec, self.default_status


@dataclass(frozen=True, slots=True)
class TagSpec:
    """Where the charger shows the identification tag (RFID UID / OCPP idTag) of the session."""

    register: str  # name of a text register in ``registers``
    empty: frozenset[str] = frozenset({""})  # values (normal form) that mean "no tag"
    upper: bool = True  # normalise to upper case (UIDs are compared case-insensitively)
    # Values (normal form) the charger shows that are not a card: a free-charging mode's
    # placeholder (Vestel VESTELFREEMODE). Such a session is unidentified, never a user.
    not_a_user: frozenset[str] = frozenset()
    # The charger shows a hex UID least significant byte first: reverse its bytes so the card
    # reads as on every other charger. No shipped profile is known to need it.
    reverse_bytes: bool = False
    # The charger shows only the first characters of a card's id (normal form; KEBA: 4 UID
    # bytes, 8 hex characters): the authoriser then matches a tag of exactly this length as
    # the unique prefix of one known token. None: the tag is the whole id, matched exactly.
    truncated_to: int | None = None


@dataclass(frozen=True, slots=True)
class ControlSpec:
    """A register (or coil) the gateway writes. ``function`` is 5, 6, 15 or 16."""

    register: RegisterSpec
    function: int
    on: int | float | None = None  # enable control: raw value meaning enabled
    off: int | float | None = None


@dataclass(frozen=True, slots=True)
class CurrentLimitSpec:
    """Current setpoint. ``unit`` is how the device counts: "A", "0.1A" or "mA" (float
    types carry amps as floats). ``disable`` is the raw value that stops charging."""

    control: ControlSpec
    unit: str
    min_a: float = 6.0
    max_a: float = 32.0
    disable: int | float | None = 0

    def to_raw(self, current_a: float) -> int | float:
        """Amperes in the device's own steps (A, 0.1 A, mA; float registers carry amps)."""
        return current_to_raw(current_a, self.unit, self.control.register.type)

    def to_amps(self, raw: float) -> float:
        return raw_to_current(raw, self.unit)

    @property
    def step_a(self) -> float:
        """Resolution of the limit register: limits are rounded down to it."""
        return current_step_a(self.unit, self.control.register.type)


@dataclass(frozen=True, slots=True)
class HeartbeatSpec:
    """A register the device needs rewritten more often than its timeout, or it falls back to
    its failsafe current (or stops)."""

    control: ControlSpec
    value: int | float
    period_s: float
    timeout_s: float
    failsafe_current_a: float = 0.0
    # Alfen: no separate alive register; the current limit itself must be rewritten (``control``
    # is then the current-limit control and ``value`` unused: write the last limit again).
    rewrites_current_limit: bool = False


@dataclass(frozen=True, slots=True)
class OnConnectWrite:
    """A value the engine writes after every (re)connect of the device, before it polls:
    settings the device forgets on a power cut or that keep it answering (Heidelberg HR 258 = 4
    disables standby, in which the box stops answering)."""

    control: ControlSpec
    value: int | float
    note: str = ""


@dataclass(frozen=True, slots=True)
class IdentifySpec:
    """What ``evgw scan`` reads to recognise the model; ``pattern`` is a regex that the decoded
    value (as text) must match, ``min``/``max`` a range for numbers."""

    register: RegisterSpec
    pattern: str | None = None
    min: float | None = None
    max: float | None = None
    unit: int | None = None  # station-level unit id to probe (Alfen 200)


@dataclass(frozen=True, slots=True)
class ConnectionSpec:
    transports: tuple[str, ...] = ("tcp",)  # tcp | rtu | rtu-over-tcp
    default_port: int = 502
    default_unit: int = 1
    baudrate: int = 9600
    parity: str = "N"
    stopbits: int = 1
    max_registers_per_read: int = 125
    single_value_reads: bool = False  # KEBA: never read across value boundaries
    inter_request_delay_s: float = 0.0  # Heidelberg: evcc waits 100 ms between requests
    max_gap: int = 8  # registers of unused space worth reading to save a request
    # The device answers exception 2 to a read that spans an address it does not define
    # (Vestel, Webasto NEXT): reads never cover unused registers (max_gap is forced to 0).
    rejects_gaps: bool = False

    @property
    def effective_max_gap(self) -> int:
        return 0 if self.rejects_gaps else self.max_gap
    # Other serial settings (baud rate, parity, stop bits) the model is said to leave the factory
    # with, where sources disagree: `evgw scan` tries them when the defaults find nothing.
    serial_alternatives: tuple[tuple[int, str, int], ...] = ()


@dataclass(frozen=True, slots=True)
class Profile:
    slug: str
    kind: DeviceKind
    manufacturer: str
    model: str
    description: str = ""
    sources: tuple[str, ...] = ()
    uncertain: tuple[str, ...] = ()
    connection: ConnectionSpec = field(default_factory=ConnectionSpec)
    registers: tuple[RegisterSpec, ...] = ()
    state: StateSpec | None = None
    tag: TagSpec | None = None
    enable: ControlSpec | None = None
    current_limit: CurrentLimitSpec | None = None
    heartbeat: HeartbeatSpec | None = None
    phases: ControlSpec | None = None
    identify: IdentifySpec | None = None
    # How the gateway pauses charging: "enable" (the enable register or coil) or
    # "current_limit" (write the limit's ``disable`` value); None: it cannot pause.
    pause: str | None = None
    on_connect: tuple[OnConnectWrite, ...] = ()
    # Session energy counter semantics: "plug" resets on plug-in, "never" is not to be trusted.
    session_energy_resets: str = "plug"
    # Raw register values the simulator writes to show each status (see docs/profiles.md).
    simulate_states: dict[ChargerStatus, dict[str, int | float | str]] = field(default_factory=dict)
    simulate_identity: dict[str, int | float | str] = field(default_factory=dict)
    path: str = ""

    def register(self, name: str) -> RegisterSpec:
        for reg in self.registers:
            if reg.name == name:
                return reg
        raise KeyError(name)

    def has(self, name: str) -> bool:
        return any(reg.name == name for reg in self.registers)

    @property
    def has_lifetime_energy(self) -> bool:
        return self.has("energy_wh")

    @property
    def pause_method(self) -> str | None:
        """``pause`` as written, else the enable control when there is one, else the current
        limit's disable value; None when the device cannot be paused."""
        if self.pause is not None:
            return self.pause
        if self.enable is not None:
            return "enable"
        if self.current_limit is not None and self.current_limit.disable is not None:
            return "current_limit"
        return None


# ---------------------------------------------------------------------------------------------
# Loading and validation.
#
# One table of field definitions (the ``_Node`` tree below) drives both the validator and
# ``profile_json_schema()``. The validator checks shapes and types field by field, reporting every
# problem with its file, line, column and key path; ``_build`` then turns the checked data into the
# frozen dataclasses above and runs the cross-field checks (references, sizes, simulate states).
# ---------------------------------------------------------------------------------------------

_INVALID: Any = object()  # a value that failed its check (its problem is already recorded)

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_SLUG_RE = r"^[a-z0-9][a-z0-9-]*$"
_NAME_RE = r"^[a-z][a-z0-9_]*$"


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "mapping"
    return type(value).__name__


def _got(value: object) -> str:
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        return f"{_type_name(value)} {value!r}"
    return _type_name(value)


class _Node:
    """A schema node: checks a parsed YAML value (recording problems) and describes itself as
    JSON Schema."""

    def check(self, doc: YamlDoc, path: PathT, value: Any) -> Any:
        raise NotImplementedError

    def json(self) -> dict[str, Any]:
        raise NotImplementedError


PathT = tuple[str | int, ...]


class _Int(_Node):
    def __init__(self, lo: int | None = None, hi: int | None = None) -> None:
        self.lo, self.hi = lo, hi

    def check(self, doc: YamlDoc, path: PathT, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int):
            doc.add(path, f"expected an integer, got {_got(value)}")
            return _INVALID
        if (self.lo is not None and value < self.lo) or (self.hi is not None and value > self.hi):
            doc.add(path, f"{value} is out of range {self.lo}..{self.hi}")
            return _INVALID
        return value

    def json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "integer"}
        if self.lo is not None:
            out["minimum"] = self.lo
        if self.hi is not None:
            out["maximum"] = self.hi
        return out


class _Num(_Node):
    def __init__(self, lo: float | None = None, hi: float | None = None, *, nonzero: bool = False):
        self.lo, self.hi, self.nonzero = lo, hi, nonzero

    def check(self, doc: YamlDoc, path: PathT, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int | float):
            doc.add(path, f"expected a number, got {_got(value)}")
            return _INVALID
        if math.isnan(value) or math.isinf(value):
            doc.add(path, "expected a finite number")
            return _INVALID
        if self.nonzero and value == 0:
            doc.add(path, "must not be 0")
            return _INVALID
        if (self.lo is not None and value < self.lo) or (self.hi is not None and value > self.hi):
            doc.add(path, f"{value} is out of range {self.lo}..{self.hi}")
            return _INVALID
        return value

    def json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "number"}
        if self.lo is not None:
            out["minimum"] = self.lo
        if self.hi is not None:
            out["maximum"] = self.hi
        if self.nonzero:
            out["not"] = {"const": 0}
        return out


class _Str(_Node):
    def __init__(
        self, *, pattern: str | None = None, choices: tuple[str, ...] | None = None,
        nonempty: bool = False,
    ) -> None:
        self.pattern, self.choices, self.nonempty = pattern, choices, nonempty

    def check(self, doc: YamlDoc, path: PathT, value: Any) -> Any:
        if not isinstance(value, str):
            if self.choices:
                doc.add(path, f"expected one of {', '.join(self.choices)}; got {_got(value)}")
            else:
                doc.add(path, f"expected a string, got {_got(value)}")
            return _INVALID
        if self.choices is not None and value not in self.choices:
            doc.add(path, f"{value!r} is not one of {', '.join(self.choices)}")
            return _INVALID
        if self.pattern is not None and not re.match(self.pattern, value):
            doc.add(path, f"{value!r} does not match {self.pattern}")
            return _INVALID
        if self.nonempty and not value.strip():
            doc.add(path, "must not be empty")
            return _INVALID
        return value

    def json(self) -> dict[str, Any]:
        if self.choices is not None:
            return {"enum": list(self.choices)}
        out: dict[str, Any] = {"type": "string"}
        if self.pattern is not None:
            out["pattern"] = self.pattern
        if self.nonempty:
            out["minLength"] = 1
        return out


class _Bool(_Node):
    def check(self, doc: YamlDoc, path: PathT, value: Any) -> Any:
        if not isinstance(value, bool):
            doc.add(path, f"expected true or false, got {_got(value)}")
            return _INVALID
        return value

    def json(self) -> dict[str, Any]:
        return {"type": "boolean"}


class _Duration(_Node):
    """``10s``, ``500ms``, ``2m``, ``1h`` or a plain number of seconds -> float seconds."""

    def __init__(self, *, positive: bool = True) -> None:
        self.positive = positive

    def check(self, doc: YamlDoc, path: PathT, value: Any) -> Any:
        seconds: float
        if isinstance(value, int | float) and not isinstance(value, bool):
            seconds = float(value)
        elif isinstance(value, str) and (m := _DURATION_RE.match(value)):
            seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        else:
            doc.add(path, f"expected a duration like 10s, 500ms, 2m; got {_got(value)}")
            return _INVALID
        if seconds < 0 or (self.positive and seconds == 0):
            doc.add(path, "duration must be " + ("> 0" if self.positive else ">= 0"))
            return _INVALID
        return seconds

    def json(self) -> dict[str, Any]:
        return {
            "anyOf": [
                {"type": "number", "minimum": 0},
                {"type": "string", "pattern": _DURATION_RE.pattern},
            ]
        }


class _List(_Node):
    def __init__(self, item: _Node, *, min_items: int = 0, unique: bool = False) -> None:
        self.item, self.min_items, self.unique = item, min_items, unique

    def check(self, doc: YamlDoc, path: PathT, value: Any) -> Any:
        if not isinstance(value, list):
            doc.add(path, f"expected a list, got {_got(value)}")
            return _INVALID
        if len(value) < self.min_items:
            doc.add(path, f"needs at least {self.min_items} item(s)")
            return _INVALID
        out = [self.item.check(doc, (*path, i), v) for i, v in enumerate(value)]
        if self.unique:
            seen: set[Any] = set()
            for i, v in enumerate(out):
                if v is _INVALID:
                    continue
                if v in seen:
                    doc.add((*path, i), f"duplicate {v!r}")
                seen.add(v)
        return out

    def json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "array", "items": self.item.json()}
        if self.min_items:
            out["minItems"] = self.min_items
        if self.unique:
            out["uniqueItems"] = True
        return out


class _Map(_Node):
    """A mapping with free keys (register names, status words)."""

    def __init__(self, key: _Str, value: _Node, *, min_items: int = 0) -> None:
        self.key, self.value, self.min_items = key, value, min_items

    def check(self, doc: YamlDoc, path: PathT, value: Any) -> Any:
        if not isinstance(value, dict):
            doc.add(path, f"expected a mapping, got {_got(value)}")
            return _INVALID
        if len(value) < self.min_items:
            doc.add(path, f"needs at least {self.min_items} entry(ies)")
            return _INVALID
        out: dict[str, Any] = {}
        for k, v in value.items():
            if self.key.check(doc, (*path, k), k) is _INVALID:
                continue
            out[k] = self.value.check(doc, (*path, k), v)
        return out

    def json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": "object",
            "propertyNames": self.key.json(),
            "additionalProperties": self.value.json(),
        }
        if self.min_items:
            out["minProperties"] = self.min_items
        return out


class _Union(_Node):
    """The first option whose Python type fits the value checks it."""

    def __init__(self, label: str, *options: tuple[tuple[type, ...], _Node]) -> None:
        self.label, self.options = label, options

    def check(self, doc: YamlDoc, path: PathT, value: Any) -> Any:
        for types, node in self.options:
            if isinstance(value, types) and not (isinstance(value, bool) and bool not in types):
                return node.check(doc, path, value)
        doc.add(path, f"expected {self.label}, got {_got(value)}")
        return _INVALID

    def json(self) -> dict[str, Any]:
        return {"anyOf": [node.json() for _, node in self.options]}


class _Null(_Node):
    def check(self, doc: YamlDoc, path: PathT, value: Any) -> Any:
        if value is not None:
            doc.add(path, f"expected null, got {_got(value)}")
            return _INVALID
        return None

    def json(self) -> dict[str, Any]:
        return {"type": "null"}


@dataclass(frozen=True, slots=True)
class _Field:
    node: _Node
    required: bool = False
    doc: str = ""


class _Obj(_Node):
    """A mapping with known keys; unknown keys are errors."""

    def __init__(self, fields: dict[str, _Field], *, doc: str = "") -> None:
        self.fields, self.doc = fields, doc

    def check(self, doc: YamlDoc, path: PathT, value: Any) -> Any:
        if not isinstance(value, dict):
            doc.add(path, f"expected a mapping, got {_got(value)}")
            return _INVALID
        out: dict[str, Any] = {}
        for key, v in value.items():
            spec = self.fields.get(key) if isinstance(key, str) else None
            if spec is None:
                hint = difflib.get_close_matches(str(key), list(self.fields), n=1)
                more = f" (did you mean {hint[0]!r}?)" if hint else ""
                doc.add((*path, key), f"unknown key{more}", key=True)
                continue
            out[key] = spec.node.check(doc, (*path, key), v)
        for key, spec in self.fields.items():
            if spec.required and key not in value:
                doc.add((*path, key), "missing required key")
                out[key] = _INVALID
        return out

    def json(self) -> dict[str, Any]:
        props: dict[str, Any] = {}
        for key, spec in self.fields.items():
            schema = spec.node.json()
            if spec.doc:
                schema = {**schema, "description": spec.doc}
            props[key] = schema
        out: dict[str, Any] = {
            "type": "object",
            "properties": props,
            "additionalProperties": False,
        }
        required = [k for k, s in self.fields.items() if s.required]
        if required:
            out["required"] = required
        if self.doc:
            out["description"] = self.doc
        return out


# ---- the field table -------------------------------------------------------------------------

_STATUS_WORDS = tuple(s.value for s in ChargerStatus)
_ADDRESS = _Field(_Int(0, 65535), True, "0-based PDU address as sent on the wire")
_TYPES = tuple(t.value for t in DataType)
_NUMERIC_TYPES = tuple(t.value for t in DataType if not t.is_text)
_SCALAR_VALUE = _Union(
    "a number or a string",
    ((int,), _Int()),
    ((float,), _Num()),
    ((str,), _Str()),
)
_EQ_ITEM = _Union("an integer or a string", ((int,), _Int()), ((str,), _Str()))

_REGISTER_FIELDS: dict[str, _Field] = {
    "table": _Field(
        _Str(choices=tuple(t.value for t in Table)), True,
        "holding (FC03) | input (FC04) | coil (FC01) | discrete (FC02)",
    ),
    "address": _ADDRESS,
    "type": _Field(_Str(choices=_TYPES), True, "value type on the wire"),
    "count": _Field(_Int(1, 125), doc="registers; only (and required) for ascii, ascii1, hex"),
    "word_order": _Field(
        _Str(choices=tuple(w.value for w in WordOrder)), doc="ABCD high word first (default)"
    ),
    "source": _Field(_Str(nonempty=True), doc="where this was found: document, driver file, issue"),
    "known": _Field(
        _Str(choices=KNOWN_FROM),
        doc="hardware (seen on a device) | code (public driver) | document (vendor)",
    ),
}

_CONTROL_FIELDS: dict[str, _Field] = {
    "table": _Field(_Str(choices=("holding", "coil")), True, "coil (FC05) or holding (FC06/FC16)"),
    "address": _ADDRESS,
    "type": _Field(_Str(choices=_NUMERIC_TYPES), True, "value type on the wire"),
    "word_order": _REGISTER_FIELDS["word_order"],
    "source": _REGISTER_FIELDS["source"],
    "known": _REGISTER_FIELDS["known"],
    "function": _Field(
        _Int(), doc="write function: 5 or 15 (coil), 6 or 16 (holding); default by size"
    ),
}

_REGISTER = _Obj(
    {
        "name": _Field(_Str(pattern=_NAME_RE), True, "canonical quantity name or free name"),
        **_REGISTER_FIELDS,
        "byte": _Field(_Str(choices=("high", "low")), doc="take one byte of the raw integer"),
        "mask": _Field(_Int(0), doc="AND the raw integer (after byte)"),
        "scale": _Field(_Num(nonzero=True), doc="value = raw * scale + offset"),
        "offset": _Field(_Num()),
        "unit": _Field(_Str(), doc="documentation; canonical names fix it"),
        "sentinels": _Field(
            _List(_Int(0), unique=True), doc="raw unsigned values meaning 'not available'"
        ),
        "every": _Field(_Duration(), doc="poll this register less often"),
        "note": _Field(_Str()),
    }
)

_CONDITION = _Union(
    "a value, a list of values or a mapping of tests",
    ((int, str), _EQ_ITEM),
    ((list,), _List(_EQ_ITEM, min_items=1)),
    (
        (dict,),
        _Obj(
            {
                "equals": _Field(_List(_EQ_ITEM, min_items=1)),
                "min": _Field(_Num()),
                "max": _Field(_Num()),
                "bits_all": _Field(_Int(0)),
                "bits_any": _Field(_Int(0)),
            }
        ),
    ),
)

_IEC = _Field(_Str(choices=tuple(s.value for s in IecState)), True, "IEC 61851 state")
_STATUS = _Field(_Str(choices=_STATUS_WORDS), True, "status word of the CONTRACT")

_PROFILE = _Obj(
    {
        "slug": _Field(_Str(pattern=_SLUG_RE), True, "must equal the file name without .yaml"),
        "kind": _Field(_Str(choices=tuple(k.value for k in DeviceKind)), True),
        "manufacturer": _Field(_Str(nonempty=True), True),
        "model": _Field(_Str(nonempty=True), True),
        "description": _Field(_Str()),
        "sources": _Field(_List(_Str(nonempty=True))),
        "uncertain": _Field(_List(_Str(nonempty=True)), doc="what is unverified, in plain words"),
        "connection": _Field(
            _Obj(
                {
                    "transports": _Field(
                        _List(_Str(choices=("tcp", "rtu", "rtu-over-tcp")), min_items=1,
                              unique=True)
                    ),
                    "default_port": _Field(_Int(1, 65535)),
                    "default_unit": _Field(_Int(0, 255)),
                    "baudrate": _Field(_Int(300, 1_000_000)),
                    "parity": _Field(_Str(choices=("N", "E", "O"))),
                    "stopbits": _Field(_Int(1, 2)),
                    "max_registers_per_read": _Field(_Int(1, 125)),
                    "single_value_reads": _Field(_Bool()),
                    "inter_request_delay": _Field(_Duration(positive=False)),
                    "max_gap": _Field(_Int(0, 125)),
                    "rejects_gaps": _Field(
                        _Bool(), doc="the device answers exception 2 to reads over unused "
                        "registers: never read across them (max_gap 0)",
                    ),
                    "serial_alternatives": _Field(
                        _List(
                            _Obj(
                                {
                                    "baudrate": _Field(_Int(300, 1_000_000)),
                                    "parity": _Field(_Str(choices=("N", "E", "O"))),
                                    "stopbits": _Field(_Int(1, 2)),
                                }
                            )
                        ),
                        doc="other factory serial settings reported for this model (each key "
                        "defaults to the profile's); evgw scan tries them when the defaults "
                        "find nothing",
                    ),
                }
            )
        ),
        "registers": _Field(_List(_REGISTER)),
        "state": _Field(
            _Obj(
                {
                    "rules": _Field(
                        _List(
                            _Obj(
                                {
                                    "when": _Field(
                                        _Map(_Str(pattern=_NAME_RE), _CONDITION, min_items=1),
                                        True,
                                    ),
                                    "iec": _IEC,
                                    "status": _STATUS,
                                }
                            ),
                            min_items=1,
                        ),
                        True,
                        "first rule whose conditions all hold wins",
                    ),
                    "default": _Field(_Obj({"iec": _IEC, "status": _STATUS})),
                }
            ),
            doc="chargers only: device codes -> IEC state and status",
        ),
        "tag": _Field(
            _Obj(
                {
                    "register": _Field(_Str(pattern=_NAME_RE), True, "a text register"),
                    "empty": _Field(_List(_Str()), doc="values meaning no tag"),
                    "upper": _Field(_Bool()),
                    "not_a_user": _Field(
                        _List(_Str(nonempty=True)),
                        doc="values the charger shows that are no card (free-mode placeholders)",
                    ),
                    "byte_order": _Field(
                        _Str(choices=("as_shown", "reversed")),
                        doc="reversed: the charger shows a hex UID least significant byte first",
                    ),
                    "truncated_to": _Field(
                        _Int(1, 250),
                        doc="the charger shows only this many characters of a card id (KEBA: 8)",
                    ),
                }
            )
        ),
        "enable": _Field(
            _Obj(
                {
                    **_CONTROL_FIELDS,
                    "on_value": _Field(_Num(), doc="raw value meaning enabled (default 1)"),
                    "off_value": _Field(_Num(), doc="raw value meaning disabled (default 0)"),
                }
            )
        ),
        "current_limit": _Field(
            _Obj(
                {
                    **_CONTROL_FIELDS,
                    "unit": _Field(_Str(choices=tuple(CURRENT_UNITS)), True,
                                   "what one raw step means"),
                    "min_a": _Field(_Num(0, 100)),
                    "max_a": _Field(_Num(0, 1000)),
                    "disable": _Field(
                        _Union("a number or null", ((int, float), _Num()),
                               ((type(None),), _Null())),
                        doc="raw value that pauses charging (null: none)",
                    ),
                }
            )
        ),
        "heartbeat": _Field(
            _Obj(
                {
                    **{k: _Field(f.node, False, f.doc) for k, f in _CONTROL_FIELDS.items()},
                    "rewrite": _Field(
                        _Str(choices=("current_limit",)),
                        doc="rewrite the current limit instead of a separate register",
                    ),
                    "value": _Field(_Num(), doc="raw value written each period"),
                    "period": _Field(_Duration(), True),
                    "timeout": _Field(_Duration(), True, "the device's own timeout"),
                    "failsafe_current_a": _Field(_Num(0, 100)),
                }
            )
        ),
        "phases": _Field(
            _Obj(
                {
                    **_CONTROL_FIELDS,
                    "one_phase": _Field(_Num(), True, "raw value for 1-phase charging"),
                    "three_phase": _Field(_Num(), True, "raw value for 3-phase charging"),
                }
            )
        ),
        "identify": _Field(
            _Obj(
                {
                    **_REGISTER_FIELDS,
                    "pattern": _Field(_Str(), doc="regex the decoded text must match"),
                    "min": _Field(_Num()),
                    "max": _Field(_Num()),
                    "unit": _Field(_Int(0, 255), doc="unit id to probe instead of the device's"),
                }
            )
        ),
        "pause": _Field(
            _Str(choices=("enable", "current_limit")),
            doc="how charging is paused: the enable control, or the current limit's disable "
            "value; default: enable when there is one",
        ),
        "on_connect": _Field(
            _List(
                _Obj(
                    {
                        **_CONTROL_FIELDS,
                        "value": _Field(_Num(), True, "raw value written"),
                        "note": _Field(_Str()),
                    }
                ),
                min_items=1,
            ),
            doc="writes the engine makes after every (re)connect of the device, before polling",
        ),
        "session_energy_resets": _Field(_Str(choices=("plug", "never"))),
        "simulate": _Field(
            _Obj(
                {
                    "states": _Field(
                        _Map(_Str(choices=_STATUS_WORDS), _Map(_Str(), _SCALAR_VALUE, min_items=1))
                    ),
                    "identity": _Field(_Map(_Str(), _SCALAR_VALUE)),
                }
            )
        ),
    },
    doc="ev-site-gateway device profile (docs/profiles.md)",
)


# ---- from checked data to dataclasses, with the cross-field checks ---------------------------

def _bad(*values: Any) -> bool:
    """Whether any value (or anything inside a list or mapping) failed its check."""
    for v in values:
        if v is _INVALID:
            return True
        if isinstance(v, list) and _bad(*v):
            return True
        if isinstance(v, dict) and _bad(*v.values()):
            return True
    return False


class _Builder:
    def __init__(self, doc: YamlDoc, data: dict[str, Any], stem: str) -> None:
        self.doc, self.data, self.stem = doc, data, stem
        self.regs: dict[str, RegisterSpec] = {}

    def add(self, path: PathT, message: str, *, key: bool = False) -> None:
        self.doc.add(path, message, key=key)

    # registers --------------------------------------------------------------------------------
    def where_spec(self, path: PathT, d: dict[str, Any], name: str) -> RegisterSpec | None:
        """The location and type part shared by registers, controls and identify."""
        if _bad(d.get("table"), d.get("address"), d.get("type"), d.get("count"),
                d.get("word_order")):
            return None
        table, t = Table(d["table"]), DataType(d["type"])
        address: int = d["address"]
        count = d.get("count")
        if t.is_text:
            if count is None:
                self.add((*path, "count"), f"required for type {t}")
                return None
        elif count is not None:
            self.add(
                (*path, "count"),
                f"only for ascii, ascii1 and hex ({t} always occupies {t.fixed_count} "
                f"register{'s' if t.fixed_count != 1 else ''})",
                key=True,
            )
            return None
        else:
            count = t.fixed_count
        assert count is not None
        ok = True
        if table.is_bits and t is not DataType.BOOL:
            self.add((*path, "type"), f"table {table} holds bits: type must be bool")
            ok = False
        if t is DataType.BOOL and not table.is_bits:
            self.add((*path, "type"), "type bool needs table coil or discrete")
            ok = False
        if address + count > 65536:
            self.add((*path, "address"), f"address {address} + count {count} exceeds 65536")
            ok = False
        if not ok:
            return None
        return RegisterSpec(
            name=name, table=table, address=address, type=t, count=count,
            word_order=WordOrder(d.get("word_order", "ABCD")),
            source=d.get("source", ""), known=d.get("known", ""),
        )

    def register(self, path: PathT, d: dict[str, Any]) -> RegisterSpec | None:
        name = d.get("name")
        if not isinstance(name, str):
            return None
        base = self.where_spec(path, d, name)
        if base is None or _bad(*d.values()):
            return None
        t = base.type
        integer = TYPES[t].raw_range is not None
        numeric = not t.is_text and t is not DataType.BOOL
        ok = True
        for key in ("byte", "mask"):
            if key in d and not integer:
                self.add((*path, key), f"only for integer types, not {t}", key=True)
                ok = False
        for key in ("scale", "offset", "sentinels"):
            if key in d and not numeric:
                self.add((*path, key), f"only for numeric types, not {t}", key=True)
                ok = False
        limit = 1 << (16 * base.count)
        for i, s in enumerate(d.get("sentinels", [])):
            if s >= limit:
                self.add((*path, "sentinels", i), f"{s:#x} does not fit {base.count} register(s)")
                ok = False
        if name in CANONICAL_QUANTITIES:
            if not numeric:
                self.add((*path, "type"), f"{name} is a number: type {t} cannot carry it")
                ok = False
            want = CANONICAL_QUANTITIES[name]
            if "unit" in d and d["unit"] != want:
                self.add((*path, "unit"), f"{name} is in {want or 'no unit'} after scaling, "
                         f"not {d['unit']!r}")
                ok = False
        if not ok:
            return None
        return RegisterSpec(
            name=name, table=base.table, address=base.address, type=t, count=base.count,
            word_order=base.word_order, byte=d.get("byte"), mask=d.get("mask"),
            scale=float(d.get("scale", 1.0)), offset=float(d.get("offset", 0.0)),
            unit=d.get("unit", CANONICAL_QUANTITIES.get(name, "")),
            sentinels=frozenset(d.get("sentinels", ())), every_s=d.get("every"),
            note=d.get("note", ""), source=base.source, known=base.known,
        )

    def registers(self) -> tuple[RegisterSpec, ...]:
        out: list[RegisterSpec] = []
        items = self.data.get("registers", [])
        if items is _INVALID:
            return ()
        for i, d in enumerate(items):
            if d is _INVALID:
                continue
            name = d.get("name")
            if isinstance(name, str) and name in self.regs:
                self.add(("registers", i, "name"), f"duplicate register name {name!r}")
                continue
            spec = self.register(("registers", i), d)
            if spec is not None:
                self.regs[spec.name] = spec
                out.append(spec)
            elif isinstance(name, str):
                self.regs.setdefault(name, _PLACEHOLDER)  # known name: no follow-on errors
        return tuple(out)

    def ref(self, path: PathT, name: str) -> RegisterSpec | None:
        """A register by name; a problem at ``path`` when it is not defined."""
        spec = self.regs.get(name)
        if spec is None:
            self.add(path, f"no register named {name!r} in registers")
            return None
        return None if spec is _PLACEHOLDER else spec

    # state ------------------------------------------------------------------------------------
    def condition(self, path: PathT, name: str, raw: Any) -> Condition | None:
        spec = self.ref(path, name)
        if spec is None or raw is _INVALID:
            return None
        tests: dict[str, Any]
        if isinstance(raw, dict):
            if _bad(*raw.values()):
                return None
            tests = dict(raw)
            if not tests:
                self.add(path, "needs at least one of equals, min, max, bits_all, bits_any")
                return None
        else:
            tests = {"equals": raw if isinstance(raw, list) else [raw]}
        equals = tests.get("equals")
        if spec.type.is_text:
            if any(k in tests for k in ("min", "max", "bits_all", "bits_any")):
                self.add(path, f"register {name!r} is text ({spec.type}): only equals applies")
                return None
            if equals is not None and not all(isinstance(v, str) for v in equals):
                self.add(path, f"register {name!r} is text ({spec.type}): compare with strings")
                return None
        elif equals is not None and not all(isinstance(v, int) for v in equals):
            self.add(path, f"register {name!r} is a number: compare with integers")
            return None
        return Condition(
            register=name,
            equals=tuple(equals) if equals is not None else None,
            min=tests.get("min"), max=tests.get("max"),
            bits_all=tests.get("bits_all"), bits_any=tests.get("bits_any"),
        )

    def state(self) -> StateSpec | None:
        d = self.data.get("state")
        if d is None or d is _INVALID or d.get("rules") is _INVALID:
            return None
        rules: list[StateRule] = []
        ok = True
        for i, r in enumerate(d["rules"]):
            if r is _INVALID or _bad(r.get("when"), r.get("iec"), r.get("status")):
                ok = False
                continue
            conds = [
                self.condition(("state", "rules", i, "when", name), name, raw)
                for name, raw in r["when"].items()
            ]
            if any(c is None for c in conds):
                ok = False
                continue
            rules.append(StateRule(
                when=tuple(c for c in conds if c is not None),
                iec=IecState(r["iec"]), status=ChargerStatus(r["status"]),
            ))
        default = d.get("default", {})
        if not ok or default is _INVALID or _bad(*default.values()):
            return None
        return StateSpec(
            rules=tuple(rules),
            default_iec=IecState(default.get("iec", "E")),
            default_status=ChargerStatus(default.get("status", "faulted")),
        )

    # tag and controls -------------------------------------------------------------------------
    def tag(self) -> TagSpec | None:
        d = self.data.get("tag")
        if d is None or d is _INVALID or _bad(*d.values()):
            return None
        spec = self.ref(("tag", "register"), d["register"])
        if spec is None:
            return None
        if not spec.type.is_text:
            self.add(("tag", "register"),
                     f"register {spec.name!r} is {spec.type}; a tag needs ascii, ascii1 or hex")
            return None
        return TagSpec(
            register=spec.name,
            empty=frozenset({"", *(normalise_tag(e) or "" for e in d.get("empty", ()))}),
            upper=d.get("upper", True),
            not_a_user=frozenset(
                t for t in (normalise_tag(e) for e in d.get("not_a_user", ())) if t
            ),
            reverse_bytes=d.get("byte_order", "as_shown") == "reversed",
            truncated_to=d.get("truncated_to"),
        )

    def control(
        self, key: str | PathT, d: dict[str, Any], *, on: Any = None, off: Any = None
    ) -> ControlSpec | None:
        path: PathT = (key,) if isinstance(key, str) else key
        spec = self.where_spec(path, d, key if isinstance(key, str) else str(key[0]))
        if spec is None or d.get("function") is _INVALID:
            return None
        if spec.table is Table.COIL:
            allowed, default = (5, 15), 5
        else:
            allowed, default = (6, 16), (6 if spec.count == 1 else 16)
        function = d.get("function", default)
        if function not in allowed:
            self.add((*path, "function"),
                     f"{spec.table} is written with function {' or '.join(map(str, allowed))}")
            return None
        if function == 6 and spec.count > 1:
            self.add((*path, "function"),
                     f"a {spec.count}-register value must be written in one request (function 16)")
            return None
        return ControlSpec(register=spec, function=function, on=on, off=off)

    def enable(self) -> ControlSpec | None:
        d = self.data.get("enable")
        if d is None or d is _INVALID or _bad(*d.values()):
            return None
        return self.control("enable", d, on=d.get("on_value", 1), off=d.get("off_value", 0))

    def current_limit(self) -> CurrentLimitSpec | None:
        d = self.data.get("current_limit")
        if d is None or d is _INVALID or _bad(*d.values()):
            return None
        control = self.control("current_limit", d)
        if control is None:
            return None
        unit: str = d["unit"]
        min_a, max_a = float(d.get("min_a", 6.0)), float(d.get("max_a", 32.0))
        t = control.register.type
        if min_a > max_a:
            self.add(("current_limit", "min_a"), f"min_a {min_a:g} is above max_a {max_a:g}")
            return None
        if t.is_float and unit != "A":
            self.add(("current_limit", "unit"), f"type {t} carries amps: unit must be A")
            return None
        rng = TYPES[t].raw_range
        if rng is not None and max_a * CURRENT_UNITS[unit] > rng[1]:
            self.add(("current_limit", "max_a"), f"{max_a:g} A in {unit} does not fit {t}")
            return None
        return CurrentLimitSpec(
            control=control, unit=unit, min_a=min_a, max_a=max_a, disable=d.get("disable", 0)
        )

    def heartbeat(self, limit: CurrentLimitSpec | None) -> HeartbeatSpec | None:
        d = self.data.get("heartbeat")
        if d is None or d is _INVALID or _bad(*d.values()):
            return None
        period, timeout = d["period"], d["timeout"]
        if period >= timeout:
            self.add(("heartbeat", "period"),
                     f"period {period:g}s must be shorter than the timeout {timeout:g}s")
            return None
        failsafe = float(d.get("failsafe_current_a", 0.0))
        if "rewrite" in d:
            extra = [k for k in ("table", "address", "type", "word_order", "function", "value")
                     if k in d]
            if extra:
                self.add(("heartbeat", extra[0]), "not with rewrite: current_limit", key=True)
                return None
            if limit is None:
                if "current_limit" not in self.data:
                    self.add(("heartbeat", "rewrite"), "needs a current_limit section")
                return None
            return HeartbeatSpec(
                control=limit.control, value=0, period_s=period, timeout_s=timeout,
                failsafe_current_a=failsafe, rewrites_current_limit=True,
            )
        missing = [k for k in ("table", "address", "type", "value") if k not in d]
        for k in missing:
            self.add(("heartbeat", k), "missing required key (or use rewrite: current_limit)")
        if missing:
            return None
        control = self.control("heartbeat", d)
        if control is None:
            return None
        return HeartbeatSpec(
            control=control, value=d["value"], period_s=period, timeout_s=timeout,
            failsafe_current_a=failsafe,
        )

    def phases(self) -> ControlSpec | None:
        d = self.data.get("phases")
        if d is None or d is _INVALID or _bad(*d.values()):
            return None
        return self.control("phases", d, on=d["three_phase"], off=d["one_phase"])

    def pause(
        self, enable: ControlSpec | None, limit: CurrentLimitSpec | None
    ) -> str | None:
        d = self.data.get("pause")
        if d is _INVALID:
            return None
        if d is None:
            return None  # Profile.pause_method derives it
        if d == "enable" and enable is None and "enable" not in self.data:
            self.add(("pause",), "pause: enable needs an enable section")
        if d == "current_limit" and "current_limit" not in self.data:
            self.add(("pause",), "pause: current_limit needs a current_limit section")
        elif d == "current_limit" and limit is not None and limit.disable is None:
            self.add(("pause",), "pause: current_limit needs current_limit.disable")
        return str(d)

    def on_connect(self) -> tuple[OnConnectWrite, ...]:
        items = self.data.get("on_connect")
        if items is None or items is _INVALID:
            return ()
        out: list[OnConnectWrite] = []
        for i, d in enumerate(items):
            if d is _INVALID or _bad(*d.values()):
                continue
            control = self.control(("on_connect", i), d)
            if control is None:
                continue
            rng = TYPES[control.register.type].raw_range
            value = d["value"]
            if rng is not None and not (
                float(value).is_integer() and rng[0] <= value <= rng[1]
            ):
                self.add(("on_connect", i, "value"),
                         f"{value!r} does not fit {control.register.type}")
                continue
            out.append(OnConnectWrite(control=control, value=value, note=d.get("note", "")))
        return tuple(out)

    def identify(self) -> IdentifySpec | None:
        d = self.data.get("identify")
        if d is None or d is _INVALID or _bad(*d.values()):
            return None
        spec = self.where_spec(("identify",), d, "identify")
        if spec is None:
            return None
        pattern = d.get("pattern")
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as exc:
                self.add(("identify", "pattern"), f"not a regular expression: {exc}")
                return None
        return IdentifySpec(
            register=spec, pattern=pattern, min=d.get("min"), max=d.get("max"),
            unit=d.get("unit"),
        )

    # simulate ---------------------------------------------------------------------------------
    def sim_value(self, path: PathT, spec: RegisterSpec, value: Any) -> bool:
        if spec.type.is_text != isinstance(value, str):
            kind = "a string" if spec.type.is_text else "a number"
            self.add(path, f"register {spec.name!r} is {spec.type}: give {kind}")
            return False
        try:
            encode(spec, value)
        except (CodecError, ValueError) as exc:
            self.add(path, f"cannot be encoded: {exc}")
            return False
        return True

    def simulate(
        self, kind: DeviceKind, state: StateSpec | None, identify: IdentifySpec | None,
        controls: list[ControlSpec],
    ) -> tuple[dict[ChargerStatus, dict[str, int | float | str]], dict[str, int | float | str]]:
        d = self.data.get("simulate")
        if d is None or d is _INVALID:
            return {}, {}
        states: dict[ChargerStatus, dict[str, int | float | str]] = {}
        raw_states = d.get("states", {})
        if raw_states and kind is DeviceKind.METER:
            self.add(("simulate", "states"), "not for kind meter", key=True)
        elif raw_states is not _INVALID:
            read = sorted({c.register for r in state.rules for c in r.when}) if state else []
            for status_word, entry in raw_states.items():
                if entry is _INVALID or _bad(*entry.values()):
                    continue
                path: PathT = ("simulate", "states", status_word)
                ok = True
                for name, value in entry.items():
                    reg = self.ref((*path, name), name)
                    if reg is None or not self.sim_value((*path, name), reg, value):
                        ok = False
                    elif any(_overlaps(reg, c.register) for c in controls):
                        # The simulator would overwrite what the gateway wrote.
                        self.add((*path, name), f"register {name!r} is written by the gateway "
                                 "(a control); a simulated state must not set it")
                        ok = False
                missing = [n for n in read if n not in entry]
                if missing:
                    self.add(path, "must set every register the state rules read; missing: "
                             + ", ".join(missing))
                    ok = False
                status = ChargerStatus(status_word)
                if ok and state is not None:
                    values: dict[str, object] = {
                        n: decode(self.regs[n], encode(self.regs[n], v)) for n, v in entry.items()
                    }
                    iec, got = state.classify(values)
                    if got is not status:
                        self.add(path, f"these values classify as {got} (IEC {iec}), "
                                 f"not {status}")
                        ok = False
                if ok:
                    states[status] = dict(entry)
        identity: dict[str, int | float | str] = {}
        raw_identity = d.get("identity", {})
        if raw_identity is not _INVALID:
            for name, value in raw_identity.items():
                path = ("simulate", "identity", name)
                if value is _INVALID:
                    continue
                if name == "identify":
                    if identify is None:
                        self.add(path, "no identify section", key=True)
                        continue
                    spec: RegisterSpec | None = identify.register
                else:
                    spec = self.ref(path, name)
                if spec is not None and self.sim_value(path, spec, value):
                    identity[name] = value
        return states, identity

    # the whole profile ------------------------------------------------------------------------
    def profile(self) -> Profile | None:
        data = self.data
        slug = data.get("slug")
        if isinstance(slug, str) and slug is not _INVALID and slug != self.stem:
            self.add(("slug",), f"slug {slug!r} does not match the file name {self.stem!r}.yaml")
        kind_raw = data.get("kind")
        kind = DeviceKind(kind_raw) if isinstance(kind_raw, str) else None
        if kind is DeviceKind.METER:
            for key in ("state", "tag", "enable", "current_limit", "heartbeat", "phases"):
                if key in data:
                    self.add((key,), "not for kind meter", key=True)
        elif kind is DeviceKind.CHARGER and "state" not in data:
            self.add(("state",), "missing required key (every charger needs state rules)")
        registers = self.registers()
        state = self.state()
        tag = self.tag()
        enable = self.enable()
        limit = self.current_limit()
        heartbeat = self.heartbeat(limit)
        phases = self.phases()
        identify = self.identify()
        pause = self.pause(enable, limit)
        on_connect = self.on_connect()
        if kind is DeviceKind.METER and not (self.regs.keys() & {"power_w", "energy_wh"}):
            self.add(("registers",), "a meter needs power_w or energy_wh")
        controls = [c for c in (enable, limit.control if limit else None,
                                heartbeat.control if heartbeat else None, phases) if c]
        controls += [w.control for w in on_connect]
        sim_states, sim_identity = self.simulate(
            kind or DeviceKind.CHARGER, state, identify, controls
        )
        if self.doc.problems or kind is None:
            return None
        conn = data.get("connection", {})
        return Profile(
            slug=data["slug"], kind=kind, manufacturer=data["manufacturer"],
            model=data["model"], description=data.get("description", ""),
            sources=tuple(data.get("sources", ())), uncertain=tuple(data.get("uncertain", ())),
            connection=ConnectionSpec(
                transports=tuple(conn.get("transports", ("tcp",))),
                default_port=conn.get("default_port", 502),
                default_unit=conn.get("default_unit", 1),
                baudrate=conn.get("baudrate", 9600),
                parity=conn.get("parity", "N"),
                stopbits=conn.get("stopbits", 1),
                max_registers_per_read=conn.get("max_registers_per_read", 125),
                single_value_reads=conn.get("single_value_reads", False),
                inter_request_delay_s=conn.get("inter_request_delay", 0.0),
                max_gap=conn.get("max_gap", 8),
                rejects_gaps=conn.get("rejects_gaps", False),
                serial_alternatives=_serial_alternatives(conn),
            ),
            registers=registers, state=state, tag=tag, enable=enable, current_limit=limit,
            heartbeat=heartbeat, phases=phases, identify=identify, pause=pause,
            on_connect=on_connect,
            session_energy_resets=data.get("session_energy_resets", "plug"),
            simulate_states=sim_states, simulate_identity=sim_identity,
            path=self.doc.file,
        )


def _serial_alternatives(conn: dict[str, Any]) -> tuple[tuple[int, str, int], ...]:
    base = (conn.get("baudrate", 9600), conn.get("parity", "N"), conn.get("stopbits", 1))
    out: list[tuple[int, str, int]] = []
    for alt in conn.get("serial_alternatives", ()):
        if not isinstance(alt, dict):
            continue
        setting = (
            alt.get("baudrate", base[0]), alt.get("parity", base[1]), alt.get("stopbits", base[2])
        )
        if setting != base and setting not in out:
            out.append(setting)
    return tuple(out)


def _overlaps(a: RegisterSpec, b: RegisterSpec) -> bool:
    writable = {Table.HOLDING, Table.COIL}
    same = a.table is b.table and a.table in writable
    return same and a.address < b.end and b.address < a.end


# Stands in for a register whose own definition had problems, so references to it do not pile
# further errors on top.
_PLACEHOLDER = RegisterSpec("?", Table.HOLDING, 0, DataType.U16, 1)


# ---- public API ------------------------------------------------------------------------------

_CACHE: dict[tuple[str, int, int], Profile] = {}


def shipped_drivers_dir() -> Path:
    """The profiles shipped with the gateway: ``gateway/drivers`` inside an installed wheel,
    else ``drivers/`` at the root of a source checkout."""
    inside = Path(__file__).resolve().parent / "drivers"
    if inside.is_dir():
        return inside
    return Path(__file__).resolve().parent.parent / "drivers"


def load_profile(path: str | Path) -> Profile:
    """Read and validate one profile file. Raises :class:`ProfileError` listing every problem
    as ``FILE:LINE:COL: key.path: message``."""
    p = Path(path)
    try:
        st = p.stat()
        cache_key: tuple[str, int, int] | None = (str(p.resolve()), st.st_mtime_ns, st.st_size)
    except OSError:
        cache_key = None
    if cache_key is not None and cache_key in _CACHE:
        cached = _CACHE[cache_key]
        return cached if cached.path == str(path) else _replace_path(cached, str(path))
    doc = load_yaml(path)
    if doc.problems:
        raise ProfileError(doc.problems)
    if doc.data is None:
        raise ProfileError([ConfigProblem(str(path), 1, 1, "", "empty profile file")])
    data = _PROFILE.check(doc, (), doc.data)
    profile = _Builder(doc, data, p.stem).profile() if data is not _INVALID else None
    if doc.problems or profile is None:
        raise ProfileError(doc.problems)
    if cache_key is not None:
        _CACHE[cache_key] = profile
    return profile


def _replace_path(profile: Profile, path: str) -> Profile:
    from dataclasses import replace

    return replace(profile, path=path)


def load_profiles(extra_dir: str | Path | None = None) -> dict[str, Profile]:
    """Every shipped profile, then every profile in ``extra_dir`` (a site's ``drivers_path``);
    a site profile with the slug of a shipped one replaces it. Problems in any file are
    collected and raised together as one :class:`ProfileError`."""
    problems: list[ConfigProblem] = []
    profiles: dict[str, Profile] = {}
    dirs = [shipped_drivers_dir()]
    if extra_dir is not None:
        extra = Path(extra_dir)
        if not extra.is_dir():
            raise ProfileError(
                [ConfigProblem(str(extra), 1, 1, "drivers_path", "not a directory")]
            )
        dirs.append(extra)
    for directory in dirs:
        for file in sorted(directory.glob("*.yaml")):
            try:
                profile = load_profile(file)
            except ProfileError as exc:
                problems.extend(exc.problems)
                continue
            profiles[profile.slug] = profile
    if problems:
        raise ProfileError(problems)
    return profiles


def profile_json_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of a profile file, for editors; generated from the same field
    table the loader validates with. Cross-field rules (references, sizes) are the loader's."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://ev-site-gateway.invalid/schemas/profile.json",
        "title": "ev-site-gateway device profile",
        **_PROFILE.json(),
    }


def _fmt_num(x: float) -> str:
    return f"{x:g}"


def _fmt_register(spec: RegisterSpec) -> str:
    parts = [f"{spec.table:<8}", f"{spec.address:>5}", f"{spec.address:#06x}",
             f"{spec.type}" + (f"[{spec.count}]" if spec.type.is_text else "")]
    extra: list[str] = []
    if spec.count > 1 and not spec.type.is_text:
        extra.append(spec.word_order.value)
    if spec.byte:
        extra.append(f"byte {spec.byte}")
    if spec.mask is not None:
        extra.append(f"mask {spec.mask:#x}")
    if spec.scale != 1.0:
        extra.append(f"x{_fmt_num(spec.scale)}")
    if spec.offset:
        extra.append(f"{spec.offset:+g}")
    if spec.sentinels:
        extra.append("n/a " + ",".join(f"{s:#x}" for s in sorted(spec.sentinels)))
    if spec.every_s:
        extra.append(f"every {_fmt_num(spec.every_s)}s")
    return "  ".join([*parts, " ".join(extra)]).rstrip()


def _fmt_provenance(r: RegisterSpec) -> str:
    known = r.known or "unknown"
    flag = "" if r.known == "hardware" else " [unverified]"
    return f"{known}{flag}: {r.source or 'no source given'}"


def _fmt_control(c: ControlSpec) -> str:
    r = c.register
    text = f"{r.table} {r.address} ({r.address:#06x}) {r.type}, function {c.function}"
    return text + (f", {r.word_order}" if r.count > 1 else "") + f" [{_fmt_provenance(r)}]"


def describe_profile(p: Profile) -> str:
    """Human-readable summary for ``evgw drivers SLUG``."""
    c = p.connection
    lines = [f"{p.slug}: {p.manufacturer} {p.model} ({p.kind})"]
    if p.description:
        lines.append(f"  {p.description}")
    lines.append(f"transports: {', '.join(c.transports)}")
    defaults = f"defaults: unit {c.default_unit}"
    if any(t != "rtu" for t in c.transports):
        defaults += f", port {c.default_port}"
    if any(t.startswith("rtu") for t in c.transports):
        defaults += f", serial {c.baudrate} 8{c.parity}{c.stopbits}"
        for baud, parity, stopbits in c.serial_alternatives:
            defaults += f" (or {baud} 8{parity}{stopbits})"
    lines.append(defaults)
    reads = f"reads: up to {c.max_registers_per_read} registers, gap {c.max_gap}"
    if c.single_value_reads:
        reads += ", one value per request"
    if c.inter_request_delay_s:
        reads += f", {_fmt_num(c.inter_request_delay_s * 1000)} ms between requests"
    lines.append(reads)
    if c.rejects_gaps:
        lines.append("  the device rejects reads over unused registers: no gaps are read")
    lines.append("registers (provenance under each; [unverified] = never checked on hardware):")
    width = max((len(r.name) for r in p.registers), default=4)
    for r in p.registers:
        unit = f" {r.unit}" if r.unit else ""
        lines.append(f"  {r.name:<{width}}  {_fmt_register(r)}{'  ->' + unit if unit else ''}")
        lines.append(f"  {'':<{width}}    {_fmt_provenance(r)}")
    if p.kind is DeviceKind.CHARGER:
        lines.append("capabilities:")
        if p.state is not None:
            lines.append(f"  state: {len(p.state.rules)} rules over "
                         + ", ".join(sorted({c.register for r in p.state.rules for c in r.when})))
        if p.tag is not None:
            tag_reg = p.register(p.tag.register)
            enc = {DataType.ASCII: "ASCII, 2 characters per register",
                   DataType.ASCII1: "1 character per register",
                   DataType.HEX: "raw bytes as hex"}[tag_reg.type]
            empty = ", ".join(repr(e) for e in sorted(p.tag.empty))
            lines.append(f"  tag: {tag_reg.name} at {tag_reg.table} {tag_reg.address}, "
                         f"{tag_reg.count} registers, {enc} (empty: {empty})")
            if p.tag.not_a_user:
                lines.append("  tag values that are no user: "
                             + ", ".join(sorted(p.tag.not_a_user)))
        else:
            lines.append("  tag: none (no identification over Modbus)")
        if p.enable is not None:
            lines.append(f"  enable: {_fmt_control(p.enable)}, on {p.enable.on} off {p.enable.off}")
        else:
            lines.append("  enable: none (current limit 0 pauses)" if p.current_limit else
                         "  enable: none")
        pause = p.pause_method
        lines.append("  pause: " + {
            "enable": "enable (the enable control; never a current below the minimum)",
            "current_limit": "current_limit (write the limit's disable value)",
        }.get(pause or "", "none (cannot be paused)") + ("" if p.pause else " [default]"))
        for w in p.on_connect:
            lines.append(f"  on connect: write {w.value} to {_fmt_control(w.control)}"
                         + (f" ({w.note})" if w.note else ""))
        if p.current_limit is not None:
            cl = p.current_limit
            lines.append(f"  current limit: {_fmt_control(cl.control)}, unit {cl.unit}, "
                         f"{_fmt_num(cl.min_a)}..{_fmt_num(cl.max_a)} A"
                         + (f", {cl.disable} pauses" if cl.disable is not None else ""))
        else:
            lines.append("  current limit: none")
        if p.heartbeat is not None:
            hb = p.heartbeat
            what = ("rewrite the current limit" if hb.rewrites_current_limit
                    else f"write {hb.value} to {_fmt_control(hb.control)}")
            lines.append(f"  heartbeat: {what} every {_fmt_num(hb.period_s)}s "
                         f"(device timeout {_fmt_num(hb.timeout_s)}s, failsafe "
                         f"{_fmt_num(hb.failsafe_current_a)} A)")
        else:
            lines.append("  heartbeat: none")
        if p.phases is not None:
            lines.append(f"  phases: {_fmt_control(p.phases)}, 1p={p.phases.off} "
                         f"3p={p.phases.on}")
        lines.append(f"  session energy resets: {p.session_energy_resets}"
                     + ("" if p.has_lifetime_energy else " (no lifetime energy counter)"))
    if p.identify is not None:
        i = p.identify
        test = f"matches {i.pattern!r}" if i.pattern else (
            f"in {i.min if i.min is not None else '-inf'}..{i.max if i.max is not None else 'inf'}")
        unit = f" on unit {i.unit}" if i.unit is not None else ""
        lines.append(f"identify: {_fmt_register(i.register)}{unit}, {test}")
        lines.append(f"  {_fmt_provenance(i.register)}")
    if p.sources:
        lines.append("sources:")
        lines.extend(f"  - {s}" for s in p.sources)
    if p.uncertain:
        lines.append("uncertain (verify on hardware):")
        lines.extend(f"  - {u}" for u in p.uncertain)
    return "\n".join(lines)
