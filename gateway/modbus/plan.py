"""Read planning: which requests fetch a profile's registers.

Registers are grouped by table, sorted by address and merged into one request while the whole
span stays within ``max_registers`` and the unused hole between two neighbours is at most
``max_gap`` registers (reading a few unused registers is cheaper than another round trip; on
RS-485 one request costs a turnaround of 5-45 ms). Devices that refuse reads across value
boundaries (``single_value_reads``) get one request per value. Registers polled less often
(``every_s``) are planned into their own blocks so the fast blocks stay small.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from gateway.profiles import RegisterSpec, Table

__all__ = ["MAX_BITS_PER_READ", "MAX_REGISTERS_PER_READ", "ReadBlock", "plan_reads"]

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
