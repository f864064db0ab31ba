"""Read planning: which requests a profile's registers become."""

from __future__ import annotations

import pytest

from gateway.modbus.plan import ReadBlock, plan_reads
from gateway.modbus.types import DataType, RegisterSpec, Table

H, IN, C = Table.HOLDING, Table.INPUT, Table.COIL


def reg(
    name: str, address: int, count: int = 1, table: Table = H, every_s: float | None = None
) -> RegisterSpec:
    dtype = {1: DataType.U16, 2: DataType.U32, 4: DataType.U64}.get(count, DataType.ASCII)
    if table.is_bits:
        dtype = DataType.BOOL
    return RegisterSpec(name, table, address, dtype, count, every_s=every_s)


def spans(blocks: list[ReadBlock]) -> list[tuple[str, int, int]]:
    return [(b.table.value, b.address, b.count) for b in blocks]


@pytest.mark.parametrize(
    ("regs", "max_registers", "max_gap", "single", "expected"),
    [
        # contiguous values merge into one read
        ([reg("a", 0, 2), reg("b", 2, 2), reg("c", 4, 2)], 125, 8, False, [("holding", 0, 6)]),
        # a hole of exactly max_gap is read through, one more splits
        ([reg("a", 0, 2), reg("b", 10, 2)], 125, 8, False, [("holding", 0, 12)]),
        ([reg("a", 0, 2), reg("b", 11, 2)], 125, 8, False, [("holding", 0, 2), ("holding", 11, 2)]),
        # max_gap 0: only touching registers merge
        (
            [reg("a", 0), reg("b", 1), reg("c", 3)],
            125,
            0,
            False,
            [("holding", 0, 2), ("holding", 3, 1)],
        ),
        # the span limit splits a run
        (
            [reg("a", 0, 2), reg("b", 2, 2), reg("c", 4, 2), reg("d", 6, 2)],
            4,
            8,
            False,
            [("holding", 0, 4), ("holding", 4, 4)],
        ),
        # a value never straddles two reads: 3 + 2 > 4, so the u32 starts a new block
        (
            [reg("a", 0, 2), reg("b", 2), reg("c", 3, 2)],
            4,
            8,
            False,
            [("holding", 0, 3), ("holding", 3, 2)],
        ),
        # unsorted input is sorted by address
        (
            [reg("c", 20), reg("a", 0), reg("b", 5)],
            125,
            8,
            False,
            [("holding", 0, 6), ("holding", 20, 1)],
        ),
        # tables never mix, even at the same addresses
        (
            [reg("a", 0, 2), reg("b", 0, 2, IN), reg("c", 2, 2)],
            125,
            8,
            False,
            [("holding", 0, 4), ("input", 0, 2)],
        ),
        # single value reads: one request per value, even when contiguous
        (
            [reg("a", 1000, 2), reg("b", 1002, 2)],
            125,
            8,
            True,
            [("holding", 1000, 2), ("holding", 1002, 2)],
        ),
        # ...but two specs of the very same words share it (high/low byte of one register)
        ([reg("hi", 5), reg("lo", 5)], 125, 8, True, [("holding", 5, 1)]),
        # overlapping registers merge by their furthest end
        ([reg("text", 10, 8), reg("inner", 12, 2)], 125, 0, False, [("holding", 10, 8)]),
        # a register longer than the limit gets a block of its own size
        ([reg("long", 0, 10), reg("b", 10)], 4, 8, False, [("holding", 0, 10), ("holding", 10, 1)]),
        # coils are planned in bits
        ([reg("c1", 400, table=C), reg("c2", 419, table=C)], 125, 20, False, [("coil", 400, 20)]),
        ([], 125, 8, False, []),
    ],
)
def test_plan_table(
    regs: list[RegisterSpec],
    max_registers: int,
    max_gap: int,
    single: bool,
    expected: list[tuple[str, int, int]],
) -> None:
    assert spans(plan_reads(regs, max_registers, max_gap, single)) == expected


def test_slow_registers_get_their_own_blocks_after_the_fast_ones() -> None:
    regs = [
        reg("power", 0, 2),
        reg("serial", 2, 4, every_s=60.0),
        reg("energy", 6, 2),
        reg("fw", 10, 2, every_s=60.0),
    ]
    blocks = plan_reads(regs, 125, 8, False)
    assert [(b.every_s, b.address, b.count) for b in blocks] == [(None, 0, 8), (60.0, 2, 10)]
    assert [r.name for r in blocks[0].registers] == ["power", "energy"]


def test_different_slow_intervals_do_not_share_a_read() -> None:
    regs = [reg("a", 0, every_s=10.0), reg("b", 1, every_s=60.0)]
    assert [(b.every_s, b.address) for b in plan_reads(regs)] == [(10.0, 0), (60.0, 1)]


def test_block_slices_words_back_into_each_register() -> None:
    regs = [reg("a", 100, 2), reg("b", 104), reg("c", 105, 2)]
    (block,) = plan_reads(regs, 125, 8, False)
    words = [1, 2, 0xDEAD, 0xBEEF, 3, 4, 5]
    assert (block.address, block.count) == (100, 7)
    assert [(s.name, w) for s, w in block.split(words)] == [
        ("a", [1, 2]),
        ("b", [3]),
        ("c", [4, 5]),
    ]
    with pytest.raises(ValueError, match="needs 7 words"):
        block.split(words[:6])


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError):
        plan_reads([reg("a", 0)], 0, 8, False)
    with pytest.raises(ValueError):
        plan_reads([reg("a", 0)], 125, -1, False)


def test_register_limit_caps_at_the_protocol_maximum() -> None:
    regs = [reg(f"r{i}", i) for i in range(200)]
    assert spans(plan_reads(regs, 1000, 8, False)) == [("holding", 0, 125), ("holding", 125, 75)]
