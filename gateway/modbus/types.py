"""Modbus vocabulary: register tables, data types and the register spec.

``TYPES`` is the one table of data types: per type its ``struct`` format, the registers one value
occupies, its signedness and, for integers, its raw range. The codec, the block decoder, the
profile checks and the simulators all look types up here. ``current_to_raw`` is the one
conversion between amperes and a current-limit register's raw value.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

__all__ = [
    "CURRENT_UNITS",
    "TYPES",
    "DataType",
    "RegisterSpec",
    "Table",
    "TypeInfo",
    "WordOrder",
    "current_step_a",
    "current_to_raw",
    "raw_to_current",
    "unsigned_format",
    "value_range",
]


class Table(StrEnum):
    HOLDING = "holding"  # read FC03, write FC06/FC16
    INPUT = "input"  # read FC04
    COIL = "coil"  # read FC01, write FC05/FC15
    DISCRETE = "discrete"  # read FC02

    @property
    def is_bits(self) -> bool:
        return self in _BIT_TABLES


_BIT_TABLES = frozenset({Table.COIL, Table.DISCRETE})


class DataType(StrEnum):
    U16 = "u16"
    I16 = "i16"
    U32 = "u32"
    I32 = "i32"
    U64 = "u64"
    I64 = "i64"
    F32 = "f32"
    F64 = "f64"
    ASCII = "ascii"  # two characters per register, high byte first, NUL/space padded
    ASCII1 = "ascii1"  # one character per register (UTF-16BE code unit)
    HEX = "hex"  # raw bytes shown as upper-case hex
    BOOL = "bool"  # one coil / discrete input

    @property
    def info(self) -> TypeInfo:
        return TYPES[self]

    @property
    def is_text(self) -> bool:
        return TYPES[self].count is None

    @property
    def is_float(self) -> bool:
        return TYPES[self].is_float

    @property
    def fixed_count(self) -> int | None:
        """Registers one value occupies, or None where ``count`` says (text types)."""
        return TYPES[self].count


@dataclass(frozen=True, slots=True)
class TypeInfo:
    """How one data type sits in registers."""

    format: str | None  # big-endian ``struct`` format of the whole value; None: text or bool
    count: int | None  # registers one value occupies; None: the spec's ``count`` says (text)
    signed: bool = False
    is_float: bool = False

    @property
    def raw_range(self) -> tuple[int, int] | None:
        """Raw integer range (None for floats, text and bool)."""
        if self.format is None or self.count is None or self.is_float:
            return None
        bits = 16 * self.count
        if self.signed:
            return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        return 0, (1 << bits) - 1


TYPES: dict[DataType, TypeInfo] = {
    DataType.U16: TypeInfo(">H", 1),
    DataType.I16: TypeInfo(">h", 1, signed=True),
    DataType.U32: TypeInfo(">I", 2),
    DataType.I32: TypeInfo(">i", 2, signed=True),
    DataType.U64: TypeInfo(">Q", 4),
    DataType.I64: TypeInfo(">q", 4, signed=True),
    DataType.F32: TypeInfo(">f", 2, signed=True, is_float=True),
    DataType.F64: TypeInfo(">d", 4, signed=True, is_float=True),
    DataType.ASCII: TypeInfo(None, None),
    DataType.ASCII1: TypeInfo(None, None),
    DataType.HEX: TypeInfo(None, None),
    DataType.BOOL: TypeInfo(None, 1),
}


def unsigned_format(count: int) -> str:
    """The ``struct`` format of ``count`` registers read as one unsigned integer (sentinels)."""
    for info in TYPES.values():
        if info.count == count and info.format is not None and not info.signed:
            return info.format
    raise ValueError(f"no unsigned integer type of {count} registers")


class WordOrder(StrEnum):
    ABCD = "ABCD"  # high word first (big-endian)
    CDAB = "CDAB"  # low word first


@dataclass(frozen=True, slots=True)
class RegisterSpec:
    """Where a value lives and how its raw words become a value in the named unit.

    ``value = raw * scale + offset`` for numbers; ``byte`` and ``mask`` are applied to the raw
    integer before scaling; raw values in ``sentinels`` (and NaN floats) mean "not available".
    """

    name: str
    table: Table
    address: int
    type: DataType
    count: int  # registers (or bits) occupied
    word_order: WordOrder = WordOrder.ABCD
    byte: str | None = None  # "high" | "low": take one byte of a u16
    mask: int | None = None
    scale: float = 1.0
    offset: float = 0.0
    unit: str = ""
    sentinels: frozenset[int] = frozenset()
    every_s: float | None = None  # poll less often than the device interval
    note: str = ""
    # Provenance: where this fact was found (document, driver file, issue) and how it is known:
    # "hardware" (checked on a real device), "code" (public driver code), "document" (vendor doc).
    source: str = ""
    known: str = ""

    @property
    def end(self) -> int:
        return self.address + self.count


def value_range(spec: RegisterSpec) -> tuple[float, float] | None:
    """The decoded values an integer register can deliver (``raw * scale + offset`` over its
    raw range, after ``byte``/``mask``); None for floats and text."""
    rng = TYPES[spec.type].raw_range
    if rng is None:
        return None
    lo, hi = rng
    if spec.byte is not None:
        lo, hi = 0, 0xFF
    if spec.mask is not None:
        lo, hi = 0, spec.mask
    a, b = lo * spec.scale + spec.offset, hi * spec.scale + spec.offset
    return (min(a, b), max(a, b))


# How a current-limit register counts: raw steps per ampere. Float registers carry amperes.
CURRENT_UNITS: dict[str, float] = {"A": 1.0, "0.1A": 10.0, "mA": 1000.0}


def current_to_raw(current_a: float, unit: str, type_: DataType) -> int | float:
    """Amperes -> the raw value of a current-limit register counting in ``unit``: whole steps
    for integer registers, unrounded for float ones."""
    raw = current_a * CURRENT_UNITS[unit]
    return raw if type_.is_float else round(raw)


def raw_to_current(raw: float, unit: str) -> float:
    """Inverse of :func:`current_to_raw`: a current-limit register's raw value -> amperes."""
    return raw / CURRENT_UNITS[unit]


def current_step_a(unit: str, type_: DataType) -> float:
    """The resolution of a current-limit register in amperes (0.1 A for float registers)."""
    return 0.1 if type_.is_float else raw_to_current(1, unit)
