"""Read planning: which requests fetch a profile's registers.

Registers are grouped by table, sorted by address and merged into one request while the whole
span stays within ``max_registers`` and the unused hole between two neighbours is at most
``max_gap`` registers (reading a few unused registers is cheaper than another round trip; on
RS-485 one request costs a turnaround of 5-45 ms). Devices that refuse reads across value
boundaries (``single_value_reads``) get one request per value. Registers polled less often
(``every_s``) are planned into their own blocks so the fast blocks stay small.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.modbus.codec import CodecError, decode
from gateway.modbus.types import TYPES, RegisterSpec, Table, WordOrder, unsigned_format
from gateway.model import Value

__all__ = [
    "MAX_BITS_PER_READ",
    "MAX_REGISTERS_PER_READ",
    "BlockDecoder",
    "Memo",
    "ReadBlock",
    "plan_reads",
]

MAX_REGISTERS_PER_READ = 125  # FC03/FC04 limit of the Modbus spec
MAX_BITS_PER_READ = 2000  # FC01/FC02 limit


@dataclass(frozen=True, slots=True)
class ReadBlock:
    """One read request: ``count`` registers (or bits) of ``table`` from ``address``.

    ``registers`` are the values it carries; ``every_s`` is None for blocks read at every poll,
    else the slower interval its registers asked for.
    """

    table: Table
    address: int
    count: int
    registers: tuple[RegisterSpec, ...]
    every_s: float | None = None

    @property
    def end(self) -> int:
        return self.address + self.count

    def words_of(self, spec: RegisterSpec, words: Sequence[int]) -> list[int]:
        """The slice of this block's ``words`` that holds ``spec``."""
        start = spec.address - self.address
        if start < 0 or spec.end > self.end:
            raise ValueError(
                f"{spec.name} is not inside block {self.table}:{self.address}+{self.count}"
            )
        return list(words[start : start + spec.count])

    def split(self, words: Sequence[int]) -> list[tuple[RegisterSpec, list[int]]]:
        """Each register of the block with its own words."""
        if len(words) < self.count:
            raise ValueError(
                f"block {self.table}:{self.address} needs {self.count} words, got {len(words)}"
            )
        return [(spec, self.words_of(spec, words)) for spec in self.registers]


def plan_reads(
    registers: Iterable[RegisterSpec],
    max_registers: int = MAX_REGISTERS_PER_READ,
    max_gap: int = 8,
    single_value_reads: bool = False,
) -> list[ReadBlock]:
    """Plan the requests that read ``registers``.

    Blocks come out fast ones first, then slow ones by interval; within a group by table and
    address. A register longer than ``max_registers`` gets a block of its own size (values are
    never split across requests). Registers at the same address and size share one request even
    with ``single_value_reads`` (e.g. the high and low byte of one word).
    """
    if max_registers < 1:
        raise ValueError("max_registers must be >= 1")
    if max_gap < 0:
        raise ValueError("max_gap must be >= 0")
    groups: dict[tuple[float, str, Table], list[RegisterSpec]] = {}
    for reg in registers:
        every = reg.every_s if reg.every_s else 0.0
        groups.setdefault((every, reg.table.value, reg.table), []).append(reg)
    blocks: list[ReadBlock] = []
    for every, _, table in sorted(groups):
        regs = sorted(
            groups[(every, table.value, table)], key=lambda r: (r.address, r.count, r.name)
        )
        limit = min(max_registers, MAX_BITS_PER_READ if table.is_bits else MAX_REGISTERS_PER_READ)
        every_s = every or None
        if single_value_reads:
            blocks.extend(_one_per_value(table, regs, every_s))
        else:
            blocks.extend(_merged(table, regs, limit, max_gap, every_s))
    return blocks


def _one_per_value(
    table: Table, regs: list[RegisterSpec], every_s: float | None
) -> list[ReadBlock]:
    out: list[ReadBlock] = []
    for reg in regs:
        if out and out[-1].address == reg.address and out[-1].count == reg.count:
            last = out[-1]
            out[-1] = ReadBlock(table, last.address, last.count, (*last.registers, reg), every_s)
        else:
            out.append(ReadBlock(table, reg.address, reg.count, (reg,), every_s))
    return out


def _merged(
    table: Table, regs: list[RegisterSpec], limit: int, max_gap: int, every_s: float | None
) -> list[ReadBlock]:
    out: list[ReadBlock] = []
    start = end = 0
    members: list[RegisterSpec] = []
    for reg in regs:
        if members:
            new_end = max(end, reg.end)
            if reg.address - end <= max_gap and new_end - start <= limit:
                members.append(reg)
                end = new_end
                continue
            out.append(ReadBlock(table, start, end - start, tuple(members), every_s))
        start, end, members = reg.address, reg.end, [reg]
    if members:
        out.append(ReadBlock(table, start, end - start, tuple(members), every_s))
    return out


# -- block decoding ---------------------------------------------------------------------------
_NO_ERRORS: tuple[tuple[RegisterSpec, CodecError], ...] = ()


# The last (words, value) of each text, bool or bit register of a block, per device.
Memo = list[tuple[Sequence[int], Value] | None]


class BlockDecoder:
    """Decodes every register of one ``ReadBlock`` from the block's words in one go.

    The words become bytes once (``struct.pack(">nH")``). The numeric registers in ABCD order
    without sentinels that do not overlap come out of one ``unpack_from`` of a format built here
    for the whole block, every other numeric register out of its own ``unpack_from``; then come
    the steps of ``gateway.modbus.codec.decode`` in the same order (sentinels on the unsigned
    raw bytes, NaN/inf, byte, mask, scale and offset), so values are identical to ``decode`` of
    the register's own words. Word order CDAB reverses the register's words before unpacking.
    Text, bools and bit tables go through ``decode`` itself.
    """

    __slots__ = ("_count", "_fast", "_group", "_group_unpack", "_pack", "_slow", "block")

    def __init__(self, block: ReadBlock) -> None:
        self.block = block
        self._count = block.count
        self._pack = struct.Struct(f">{block.count}H").pack
        # While building: (name, unpack_from, byte offset, float?, sentinel unpack_from,
        #  sentinels, byte, mask, scale, offset, plain int?, CDAB words or 0, word index)
        self._fast: list[tuple[Any, ...]] = []
        self._slow: list[tuple[RegisterSpec, int]] = []  # (spec, word index)
        for spec in block.registers:
            start = spec.address - block.address
            if start < 0 or spec.end > block.end:
                raise ValueError(
                    f"{spec.name} is not inside block {block.table}:{block.address}+{block.count}"
                )
            fmt = TYPES[spec.type].format
            if block.table.is_bits or fmt is None or spec.count != spec.type.fixed_count:
                self._slow.append((spec, start))
                continue
            sentinel = (
                struct.Struct(unsigned_format(spec.count)).unpack_from if spec.sentinels else None
            )
            cdab = spec.count if spec.word_order is WordOrder.CDAB and spec.count > 1 else 0
            self._fast.append(
                (
                    spec.name,
                    struct.Struct(fmt).unpack_from,
                    0 if cdab else start * 2,
                    spec.type.is_float,
                    sentinel,
                    spec.sentinels,
                    spec.byte,
                    spec.mask,
                    spec.scale,
                    spec.offset,
                    spec.byte is None
                    and spec.mask is None
                    and spec.scale == 1.0
                    and spec.offset == 0.0,
                    cdab,
                    start,
                )
            )
        # The common case, registers in ABCD order without sentinels that do not overlap, comes
        # out of one ``unpack`` of the whole block: (name, post-step or None) in block order.
        self._group: list[tuple[str, Any]] = []
        self._group_unpack: Any = None
        simple = [f for f in self._fast if f[4] is None and not f[11]]
        simple.sort(key=lambda f: f[2])
        fmt, at = ">", 0
        types = {spec.name: spec.type for spec in block.registers}
        for f in simple:
            if f[2] < at:
                continue  # overlaps the previous one (byte: high and low of one register)
            one = TYPES[types[f[0]]].format or ""
            fmt += "x" * (f[2] - at) + one.lstrip(">")
            at = f[2] + struct.calcsize(one)
            self._group.append((f[0], _post_step(f)))
        grouped = {name for name, _ in self._group}
        if self._group:
            self._group_unpack = struct.Struct(fmt).unpack_from
        # The rest one by one (word order CDAB, sentinels, overlapping halves), each with the
        # same post-step as in the group: (name, unpack_from, byte offset, sentinel
        # unpack_from, sentinels, CDAB words or 0, word index, post-step or None).
        self._fast = [
            (f[0], f[1], f[2], f[4], f[5], f[11], f[12], _post_step(f))
            for f in self._fast
            if f[0] not in grouped
        ]

    def new_memo(self) -> Memo:
        """A device's own memory of this block's text, bool and bit registers."""
        return [None] * len(self._slow)

    def decode_into(
        self, words: Sequence[int], out: dict[str, Value], memo: Memo | None = None
    ) -> Sequence[tuple[RegisterSpec, CodecError]]:
        """Put each register's value into ``out``; returns the registers that failed (a value
        out of 0..65535 or a profile bug), whose value is None.

        ``memo`` (from ``new_memo``, one per device: a decoder is shared by every device of a
        profile) keeps the last words and value of each text, bool or bit register: text (an EV
        id, an RFID tag: 10-20 words each) changes at a session's start or end, not between
        polls, and ``decode`` is a function of the words alone, so unchanged words give the
        value decoded before."""
        if len(words) < self._count:
            raise ValueError(
                f"block {self.block.table}:{self.block.address} needs {self._count} words, "
                f"got {len(words)}"
            )
        if self._fast or self._group:
            try:
                data = (
                    self._pack(*words[: self._count])
                    if len(words) != self._count
                    else (self._pack(*words))
                )
            except struct.error:
                return self._all_slow(words, out)
            if self._group_unpack is not None:
                for (name, post), raw in zip(self._group, self._group_unpack(data), strict=True):
                    out[name] = raw if post is None else post(raw)
            for name, unpack_from, at, sentinel, sentinels, cdab, start, post in self._fast:
                buf = self._swapped(words, start, cdab) if cdab else data
                if sentinel is not None and sentinel(buf, at)[0] in sentinels:
                    out[name] = None
                    continue
                (raw,) = unpack_from(buf, at)
                out[name] = raw if post is None else post(raw)
        errors: list[tuple[RegisterSpec, CodecError]] | None = None
        for i, (spec, start) in enumerate(self._slow):
            part = words[start : start + spec.count]
            seen = memo[i] if memo is not None else None
            if seen is not None and seen[0] == part:
                out[spec.name] = seen[1]
                continue
            try:
                value = decode(spec, part)
            except CodecError as exc:
                out[spec.name] = None
                if memo is not None:
                    memo[i] = None  # failures are reported every time, never remembered
                if errors is None:
                    errors = []
                errors.append((spec, exc))
                continue
            out[spec.name] = value
            if memo is not None:
                memo[i] = (part, value)
        return errors or _NO_ERRORS

    def _swapped(self, words: Sequence[int], start: int, n: int) -> bytes:
        return struct.pack(f">{n}H", *reversed(words[start : start + n]))

    def _all_slow(
        self, words: Sequence[int], out: dict[str, Value]
    ) -> list[tuple[RegisterSpec, CodecError]]:
        errors: list[tuple[RegisterSpec, CodecError]] = []
        for spec, part in self.block.split(words):
            try:
                out[spec.name] = decode(spec, part)
            except CodecError as exc:
                out[spec.name] = None
                errors.append((spec, exc))
        return errors


def _post_step(fast: tuple[Any, ...]) -> Any:
    """What ``decode_into`` does to one raw number after unpacking (None: nothing): NaN and
    infinities to None and scale/offset for floats; byte half, mask, then scale/offset (or
    ``int``) for integers, the order ``codec.decode`` applies them in."""
    _, _, _, is_float, _, _, byte, mask, scale, offset, plain, _, _ = fast
    if is_float:
        isfinite = math.isfinite

        def scaled_float(raw: float) -> Value:
            return raw * scale + offset if isfinite(raw) else None

        return scaled_float
    if plain:
        return None
    whole = scale == 1.0 and offset == 0.0

    def stepped(raw: int) -> Value:
        if byte == "high":
            raw = (raw >> 8) & 0xFF
        elif byte == "low":
            raw &= 0xFF
        if mask is not None:
            raw &= mask
        return int(raw) if whole else raw * scale + offset

    return stepped
