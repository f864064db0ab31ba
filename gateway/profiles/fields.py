"""A profile file as written: one pydantic model per section (gateway.schema's ``Model``).

The models check every key's type and range and the rules inside one section (a text register
needs ``count``, ``byte`` only on integers, a two-register control is written with function 16,
the heartbeat period is shorter than its timeout). Rules between sections (register references,
state rules, simulated values, which keys a meter may have) are :mod:`gateway.profiles.build`'s.
The JSON Schema of a profile file is generated from :class:`ProfileFile`.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Self

from pydantic import AfterValidator, Field, GetJsonSchemaHandler, model_validator
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema

from gateway.modbus.types import CURRENT_UNITS, TYPES, DataType, RegisterSpec, Table, WordOrder
from gateway.model import ChargerStatus, DeviceKind, IecState
from gateway.profiles.spec import CANONICAL_QUANTITIES, KNOWN_FROM
from gateway.schema import AsTuple, Choice, Duration, Model, Problems, Range, Text, describe, fail
from gateway.schema.model import to_spec

__all__ = [
    "ConditionIn",
    "ConnectionIn",
    "ControlIn",
    "CurrentLimitIn",
    "EnableIn",
    "HeartbeatIn",
    "IdentifyIn",
    "OnConnectIn",
    "PhasesIn",
    "ProfileFile",
    "RegisterIn",
    "StateIn",
    "TagIn",
]

# ---- value types -----------------------------------------------------------------------------


def _positive(seconds: float) -> float:
    if seconds == 0:
        raise fail("must be more than 0s, got 0s")
    return seconds


def _nonzero(value: float) -> float:
    if value == 0:
        raise fail("must not be 0")
    return value


def _number(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise fail(f"expected a number, got {describe(value)}")
    if not math.isfinite(value):
        raise fail(f"must be a finite number, got {value}")
    return value


def _scalar(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise fail(f"expected a number or a string, got {describe(value)}")
    return value


def _eq_item(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise fail(f"expected an integer or a string, got {describe(value)}")
    return value


def _disable(value: Any) -> Any:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise fail(f"expected a number or null, got {describe(value)}")
    return value


class _Checked:
    """An ``Annotated`` marker: the value is checked by a function, its schema written here."""

    def __init__(self, check: Any, schema: dict[str, Any]) -> None:
        self.check, self.schema = check, schema

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(self.check)

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return dict(self.schema)


PositiveDuration = Annotated[Duration, AfterValidator(_positive)]
Number = Annotated[int | float, _Checked(_number, {"type": "number"})]
Scalar = Annotated[
    int | float | str,
    _Checked(_scalar, {"anyOf": [{"type": "number"}, {"type": "string"}]}),
]
EqItem = Annotated[
    int | str, _Checked(_eq_item, {"anyOf": [{"type": "integer"}, {"type": "string"}]})
]
Disable = Annotated[
    float | None, _Checked(_disable, {"anyOf": [{"type": "number"}, {"type": "null"}]})
]
Name = Annotated[str, Text(pattern=r"[a-z][a-z0-9_]*", hint="a name of a-z, 0-9 and _")]
Slug = Annotated[str, Text(pattern=r"[a-z0-9][a-z0-9-]*", hint="a slug of a-z, 0-9 and -")]
Words = Annotated[tuple[Annotated[str, Text()], ...], AsTuple]
Address = Annotated[
    int, Range(0, 65535), Field(description="0-based PDU address as sent on the wire")
]
Baudrate = Annotated[int, Range(300, 1_000_000)]
Parity = Annotated[str, Choice("N", "E", "O")]
Stopbits = Annotated[int, Range(1, 2)]
Status = Annotated[ChargerStatus, Choice.of(ChargerStatus)]
Iec = Annotated[IecState, Choice.of(IecState)]
TableName = Annotated[
    Table,
    Choice.of(Table),
    Field(description="holding (FC03) | input (FC04) | coil (FC01) | discrete (FC02)"),
]
TypeName = Annotated[
    DataType,
    Choice.of(DataType),
    Field(description="value type on the wire"),
]
NumericType = Annotated[
    DataType,
    Choice.of(DataType, (t for t in DataType if not t.is_text)),
    Field(description="value type on the wire"),
]
Order = Annotated[
    WordOrder,
    Choice.of(WordOrder),
    Field(description="ABCD high word first (default)"),
]
Source = Annotated[
    str, Text(), Field(description="where this was found: document, driver file, issue")
]
Known = Annotated[
    str,
    Choice(*KNOWN_FROM),
    Field(description="hardware (seen on a device) | code (public driver) | document (vendor)"),
]


def _duplicates(problems: Problems, key: str, values: tuple[Any, ...]) -> None:
    seen: set[Any] = set()
    for i, v in enumerate(values):
        if v in seen:
            problems.add((key, i), f"duplicate {v!r}")
        seen.add(v)


# ---- registers -------------------------------------------------------------------------------


class _Place(Model):
    """Where a value lives: shared by registers, controls and identify."""

    table: TableName
    address: Address
    type: TypeName
    word_order: Order = WordOrder.ABCD
    source: Source = ""
    known: Known = ""
    count: Any = None  # registers for text types (registers and identify only)

    def check_where(self, problems: Problems) -> None:
        t, table = self.type, self.table
        if t.is_text and self.count is None:
            problems.add(("count",), f"required for type {t}")
        elif not t.is_text and self.count is not None:
            n = t.fixed_count
            problems.add(
                ("count",),
                f"only for ascii, ascii1 and hex ({t} always occupies {n} "
                f"register{'s' if n != 1 else ''})",
                key=True,
            )
        if table.is_bits and t is not DataType.BOOL:
            problems.add(("type",), f"table {table} holds bits: type must be bool")
        if t is DataType.BOOL and not table.is_bits:
            problems.add(("type",), "type bool needs table coil or discrete")
        count = self.registers
        if self.address + count > 65536:
            problems.add(("address",), f"address {self.address} + count {count} exceeds 65536")

    @property
    def registers(self) -> int:
        """Registers (or bits) the value occupies."""
        count: int | None = self.count
        return count if count is not None else (self.type.fixed_count or 1)

    def spec(self, name: str) -> RegisterSpec:
        return RegisterSpec(
            name=name,
            table=self.table,
            address=self.address,
            type=self.type,
            count=self.registers,
            word_order=self.word_order,
            source=self.source,
            known=self.known,
        )


class _Where(_Place):
    count: Annotated[int, Range(1, 125)] | None = Field(
        default=None, description="registers; only (and required) for ascii, ascii1, hex"
    )


class RegisterIn(_Where):
    name: Name = Field(description="canonical quantity name or free name")
    byte: Annotated[str, Choice("high", "low")] | None = Field(
        default=None, description="take one byte of the raw integer"
    )
    mask: Annotated[int, Range(0)] | None = Field(default=None, description="AND the raw integer")
    scale: Annotated[Number, AfterValidator(_nonzero)] = Field(
        default=1.0, description="value = raw * scale + offset"
    )
    offset: Number = 0.0
    unit: str | None = Field(default=None, description="documentation; canonical names fix it")
    sentinels: Annotated[tuple[Annotated[int, Range(0)], ...], AsTuple] = Field(
        default=(), description="raw unsigned values meaning 'not available'"
    )
    every: PositiveDuration | None = Field(
        default=None, description="poll this register less often"
    )
    note: str = ""

    @model_validator(mode="after")
    def _rules(self) -> Self:
        problems = Problems()
        self.check_where(problems)
        t, given = self.type, self.model_fields_set
        integer = TYPES[t].raw_range is not None
        numeric = not t.is_text and t is not DataType.BOOL
        for key in ("byte", "mask"):
            if key in given and not integer:
                problems.add((key,), f"only for integer types, not {t}", key=True)
        for key in ("scale", "offset", "sentinels"):
            if key in given and not numeric:
                problems.add((key,), f"only for numeric types, not {t}", key=True)
        _duplicates(problems, "sentinels", self.sentinels)
        for i, s in enumerate(self.sentinels):
            if s >= 1 << (16 * self.registers):
                problems.add(("sentinels", i), f"{s:#x} does not fit {self.registers} register(s)")
        want = CANONICAL_QUANTITIES.get(self.name)
        if want is not None:
            if not numeric:
                problems.add(("type",), f"{self.name} is a number: type {t} cannot carry it")
            if self.unit is not None and self.unit != want:
                problems.add(
                    ("unit",),
                    f"{self.name} is in {want or 'no unit'} after scaling, not {self.unit!r}",
                )
        problems.raise_any()
        return self

    def register_spec(self) -> RegisterSpec:
        return to_spec(
            self,
            RegisterSpec,
            count=self.registers,
            scale=float(self.scale),
            offset=float(self.offset),
            unit=self.unit if self.unit is not None else CANONICAL_QUANTITIES.get(self.name, ""),
            sentinels=frozenset(self.sentinels),
            every_s=self.every,
        )


# ---- state rules -----------------------------------------------------------------------------

_CONDITION_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "integer"},
        {"type": "string"},
        {
            "type": "array",
            "items": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
            "minItems": 1,
        },
    ]
}


class ConditionIn(Model):
    """Tests of one register's value; a value (3, B) or a list ([1, 2]) stands for equals."""

    equals: Annotated[tuple[EqItem, ...], AsTuple] | None = None
    min: Number | None = None
    max: Number | None = None
    bits_all: Annotated[int, Range(0)] | None = None
    bits_any: Annotated[int, Range(0)] | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, int | str) and not isinstance(data, bool):
            return {"equals": [data]}
        if isinstance(data, list):
            return {"equals": data}
        if not isinstance(data, dict):
            raise fail(
                f"expected a value, a list of values or a mapping of tests, got {describe(data)}"
            )
        return data

    @model_validator(mode="after")
    def _some_test(self) -> Self:
        if not self.model_fields_set:
            raise fail("needs at least one of equals, min, max, bits_all, bits_any")
        if self.equals is not None and not self.equals:
            raise fail("needs at least 1 item(s)", at=("equals",))
        return self

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        tests = handler(schema)
        return {"anyOf": [*_CONDITION_SCHEMA["anyOf"], tests]}


class RuleIn(Model):
    when: dict[Name, ConditionIn]
    iec: Iec = Field(description="IEC 61851 state")
    status: Status = Field(description="status word of the CONTRACT")

    @model_validator(mode="after")
    def _some_condition(self) -> Self:
        if not self.when:
            raise fail("needs at least 1 entry(ies)", at=("when",))
        return self


class DefaultIn(Model):
    iec: Iec = IecState.E
    status: Status = ChargerStatus.FAULTED


class StateIn(Model):
    rules: Annotated[tuple[RuleIn, ...], AsTuple] = Field(
        description="first rule whose conditions all hold wins"
    )
    default: DefaultIn = Field(default_factory=DefaultIn)

    @model_validator(mode="after")
    def _some_rule(self) -> Self:
        if not self.rules:
            raise fail("needs at least 1 item(s)", at=("rules",))
        return self


# ---- tag and controls ------------------------------------------------------------------------


class TagIn(Model):
    register_: Name = Field(alias="register", description="a text register")
    empty: Annotated[tuple[str, ...], AsTuple] = Field(
        default=(), description="values meaning no tag"
    )
    upper: bool = True
    not_a_user: Words = Field(
        default=(), description="values the charger shows that are no card (free-mode placeholders)"
    )
    byte_order: Annotated[str, Choice("as_shown", "reversed")] = Field(
        default="as_shown",
        description="reversed: the charger shows a hex UID least significant byte first",
    )
    truncated_to: Annotated[int, Range(1, 250)] | None = Field(
        default=None,
        description="the charger shows only this many characters of a card id (KEBA: 8)",
    )


class ControlIn(_Place):
    """A register the gateway writes."""

    table: Annotated[
        Table,
        Choice("holding", "coil", convert=Table),
        Field(description="coil (FC05) or holding (FC06/FC16)"),
    ]
    type: NumericType
    function: int | None = Field(
        default=None,
        description="write function: 5 or 15 (coil), 6 or 16 (holding); default by size",
    )

    def check_control(self, problems: Problems) -> None:
        self.check_where(problems)
        if self.function is None:
            return
        allowed = (5, 15) if self.table is Table.COIL else (6, 16)
        if self.function not in allowed:
            problems.add(
                ("function",),
                f"{self.table} is written with function {' or '.join(map(str, allowed))}",
            )
        elif self.function == 6 and self.registers > 1:
            problems.add(
                ("function",),
                f"a {self.registers}-register value must be written in one request (function 16)",
            )

    @property
    def write_function(self) -> int:
        if self.function is not None:
            return self.function
        if self.table is Table.COIL:
            return 5
        return 6 if self.registers == 1 else 16

    @model_validator(mode="after")
    def _rules(self) -> Self:
        problems = Problems()
        self.check_control(problems)
        problems.raise_any()
        return self


class EnableIn(ControlIn):
    on_value: Number = Field(default=1, description="raw value meaning enabled (default 1)")
    off_value: Number = Field(default=0, description="raw value meaning disabled (default 0)")


class CurrentLimitIn(ControlIn):
    unit: Annotated[str, Choice(*CURRENT_UNITS)] = Field(description="what one raw step means")
    min_a: Annotated[Number, Range(0, 100)] = 6.0
    max_a: Annotated[Number, Range(0, 1000)] = 32.0
    disable: Disable = Field(default=0, description="raw value that pauses charging (null: none)")

    @model_validator(mode="after")
    def _limits(self) -> Self:
        t = self.type
        if self.min_a > self.max_a:
            raise fail(f"min_a {self.min_a:g} is above max_a {self.max_a:g}", at=("min_a",))
        if t.is_float and self.unit != "A":
            raise fail(f"type {t} carries amps: unit must be A", at=("unit",))
        rng = TYPES[t].raw_range
        if rng is not None and self.max_a * CURRENT_UNITS[self.unit] > rng[1]:
            raise fail(f"{self.max_a:g} A in {self.unit} does not fit {t}", at=("max_a",))
        return self


class HeartbeatIn(Model):
    """A register rewritten every period, or (rewrite: current_limit) the current limit."""

    table: Annotated[Table, Choice("holding", "coil", convert=Table)] | None = None
    address: Address | None = None
    type: NumericType | None = None
    word_order: Order | None = None
    source: Source = ""
    known: Known = ""
    function: int | None = None
    rewrite: Annotated[str, Choice("current_limit")] | None = Field(
        default=None, description="rewrite the current limit instead of a separate register"
    )
    value: Number | None = Field(default=None, description="raw value written each period")
    period: PositiveDuration
    timeout: PositiveDuration = Field(description="the device's own timeout")
    failsafe_current_a: Annotated[Number, Range(0, 100)] = 0.0

    @model_validator(mode="after")
    def _rules(self) -> Self:
        problems = Problems()
        if self.period >= self.timeout:
            problems.add(
                ("period",),
                f"period {self.period:g}s must be shorter than the timeout {self.timeout:g}s",
            )
        given = self.model_fields_set
        if self.rewrite is not None:
            extra = [
                k
                for k in ("table", "address", "type", "word_order", "function", "value")
                if k in given
            ]
            if extra:
                problems.add((extra[0],), "not with rewrite: current_limit", key=True)
        else:
            for k in ("table", "address", "type", "value"):
                if k not in given:
                    problems.add((k,), "missing required key (or use rewrite: current_limit)")
            if not problems:
                self.control().check_control(problems)
        problems.raise_any()
        return self

    def control(self) -> ControlIn:
        """The written register (not for ``rewrite``)."""
        fields = {"table", "address", "type", "word_order", "source", "known", "function"}
        return ControlIn.model_construct(
            **{k: getattr(self, k) for k in fields if getattr(self, k) is not None}
        )


class PhasesIn(ControlIn):
    one_phase: Number = Field(description="raw value for 1-phase charging")
    three_phase: Number = Field(description="raw value for 3-phase charging")


class OnConnectIn(ControlIn):
    value: Number = Field(description="raw value written")
    note: str = ""

    @model_validator(mode="after")
    def _fits(self) -> Self:
        rng = TYPES[self.type].raw_range
        value = self.value
        if rng is not None and not (float(value).is_integer() and rng[0] <= value <= rng[1]):
            raise fail(f"{value!r} does not fit {self.type}", at=("value",))
        return self


class IdentifyIn(_Where):
    pattern: str | None = Field(default=None, description="regex the decoded text must match")
    min: Number | None = None
    max: Number | None = None
    unit: Annotated[int, Range(0, 255)] | None = Field(
        default=None, description="unit id to probe instead of the device's"
    )

    @model_validator(mode="after")
    def _rules(self) -> Self:
        problems = Problems()
        self.check_where(problems)
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as exc:
                problems.add(("pattern",), f"not a regular expression: {exc}")
        problems.raise_any()
        return self


# ---- connection and the whole file -----------------------------------------------------------


class SerialIn(Model):
    """Another factory serial setting; each key defaults to the profile's."""

    baudrate: Baudrate | None = None
    parity: Parity | None = None
    stopbits: Stopbits | None = None


class ConnectionIn(Model):
    transports: Annotated[
        tuple[Annotated[str, Choice("tcp", "rtu", "rtu-over-tcp")], ...], AsTuple
    ] = ("tcp",)
    default_port: Annotated[int, Range(1, 65535)] = 502
    default_unit: Annotated[int, Range(0, 255)] = 1
    baudrate: Baudrate = 9600
    parity: Parity = "N"
    stopbits: Stopbits = 1
    max_registers_per_read: Annotated[int, Range(1, 125)] = 125
    single_value_reads: bool = False
    inter_request_delay: Duration = 0.0
    max_gap: Annotated[int, Range(0, 125)] = 8
    rejects_gaps: bool = Field(
        default=False,
        description="the device answers exception 2 to reads over unused registers: never read "
        "across them (max_gap 0)",
    )
    serial_alternatives: Annotated[tuple[SerialIn, ...], AsTuple] = Field(
        default=(),
        description="other factory serial settings reported for this model (each key defaults "
        "to the profile's); evgw scan tries them when the defaults find nothing",
    )

    @model_validator(mode="after")
    def _transports(self) -> Self:
        problems = Problems()
        if not self.transports:
            problems.add(("transports",), "needs at least 1 item(s)")
        _duplicates(problems, "transports", self.transports)
        problems.raise_any()
        return self


class SimulateIn(Model):
    states: dict[Status, dict[str, Scalar]] = Field(default_factory=dict)
    identity: dict[str, Scalar] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _entries(self) -> Self:
        problems = Problems()
        for status, entry in self.states.items():
            if not entry:
                problems.add(("states", status.value), "needs at least 1 entry(ies)")
        problems.raise_any()
        return self


class ProfileFile(Model):
    """ev-site-gateway device profile (docs/profiles.md)."""

    slug: Slug = Field(description="must equal the file name without .yaml")
    kind: Annotated[DeviceKind, Choice.of(DeviceKind)]
    manufacturer: Annotated[str, Text()]
    model: Annotated[str, Text()]
    description: str = ""
    sources: Words = ()
    uncertain: Words = Field(default=(), description="what is unverified, in plain words")
    connection: ConnectionIn = Field(default_factory=ConnectionIn)
    registers: Annotated[tuple[RegisterIn, ...], AsTuple] = ()
    state: StateIn | None = Field(
        default=None, description="chargers only: device codes -> IEC state"
    )
    tag: TagIn | None = None
    enable: EnableIn | None = None
    current_limit: CurrentLimitIn | None = None
    heartbeat: HeartbeatIn | None = None
    phases: PhasesIn | None = None
    identify: IdentifyIn | None = None
    pause: Annotated[str, Choice("enable", "current_limit")] | None = Field(
        default=None,
        description="how charging is paused: the enable control, or the current limit's "
        "disable value; default: enable when there is one",
    )
    on_connect: Annotated[tuple[OnConnectIn, ...], AsTuple] = Field(
        default=(),
        description="writes the engine makes after every (re)connect of the device, before polling",
    )
    session_energy_resets: Annotated[str, Choice("plug", "never")] = "plug"
    simulate: SimulateIn = Field(default_factory=SimulateIn)
