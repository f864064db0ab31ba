"""Block decoding (plan.BlockDecoder) gives exactly what codec.decode gives per register."""

from __future__ import annotations

import random
import struct

import pytest

from gateway.modbus.codec import CodecError, decode, encode
from gateway.modbus.plan import BlockDecoder, Memo, ReadBlock, plan_reads
from gateway.modbus.types import (
    TYPES,
    DataType,
    RegisterSpec,
    Table,
    WordOrder,
    current_step_a,
    current_to_raw,
    raw_to_current,
    unsigned_format,
    value_range,
)
from gateway.model import Value
from gateway.profiles import Profile, load_profiles

H = Table.HOLDING
# Words that hit edges: zero, sign bits, all ones, NaN/inf halves, ASCII, a common sentinel.
_EDGE_WORDS = (0, 1, 0x00FF, 0xFF00, 0x7FFF, 0x8000, 0xFFFF, 0x7FC0, 0x7F80, 0xFF80, 0x4142, 0x2020)


def same(a: Value, b: Value) -> bool:
    """Equal and of the same type; floats bit for bit (so -0.0 is not 0.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and isinstance(b, float):
        return struct.pack(">d", a) == struct.pack(">d", b)
    return a == b


def random_words(rng: random.Random, n: int) -> list[int]:
    return [
        rng.choice(_EDGE_WORDS) if rng.random() < 0.3 else rng.randrange(0x10000) for _ in range(n)
    ]


def check_block(
    block: ReadBlock,
    words: list[int],
    decoder: BlockDecoder | None = None,
    memo: Memo | None = None,
) -> None:
    got: dict[str, Value] = {}
    decoder = decoder or BlockDecoder(block)
    failed = {spec.name for spec, _ in decoder.decode_into(words, got, memo)}
    for spec, part in block.split(words):
        try:
            want = decode(spec, part)
        except CodecError:
            assert spec.name in failed and got[spec.name] is None, spec
            continue
        assert spec.name not in failed, spec
        assert same(got[spec.name], want), (spec, part, got[spec.name], want)


def plans(profile: Profile) -> list[list[ReadBlock]]:
    conn = profile.connection
    return [
        plan_reads(
            profile.registers, conn.max_registers_per_read, conn.max_gap, conn.single_value_reads
        ),
        plan_reads(profile.registers, 125, 50, False),  # wide merges: many registers a block
        plan_reads(profile.registers, 125, 0, True),  # one value a request
    ]


PROFILES = load_profiles()


def test_every_shipped_profile_is_covered() -> None:
    assert len(PROFILES) >= 5
    types = {r.type for p in PROFILES.values() for r in p.registers}
    assert {DataType.U16, DataType.U32, DataType.F32} <= types


@pytest.mark.parametrize("slug", sorted(PROFILES))
def test_block_decode_matches_codec_for_random_words(slug: str) -> None:
    rng = random.Random(slug)
    for blocks in plans(PROFILES[slug]):
        for block in blocks:
            for _ in range(200):
                words = random_words(rng, block.count)
                if block.table.is_bits:
                    words = [w & 1 for w in words]
                check_block(block, words)


@pytest.mark.parametrize("slug", sorted(PROFILES))
def test_one_decoder_poll_after_poll_matches_codec(slug: str) -> None:
    """A device remembers its text registers' last words (its memo, with a decoder shared by
    every device of the profile): poll after poll (the same words again, a few words changed, a
    word out of range and back) every value is still what codec.decode gives for those words.
    Two devices take turns on one decoder, each with its own memo."""
    rng = random.Random(f"polls-{slug}")
    for block in plans(PROFILES[slug])[0]:
        decoder = BlockDecoder(block)
        memos = [decoder.new_memo(), decoder.new_memo()]
        words = random_words(rng, block.count)
        other = random_words(rng, block.count)
        for _ in range(300):
            roll = rng.random()
            if roll < 0.4:
                pass  # unchanged: the remembered values
            elif roll < 0.9:
                words = list(words)
                for _ in range(rng.randint(1, 3)):
                    words[rng.randrange(block.count)] = rng.randrange(0x10000)
            else:
                words = list(words)
                words[rng.randrange(block.count)] = 70000  # fails its register, every time
            if block.table.is_bits:
                words = [w & 1 for w in words]
                other = [w & 1 for w in other]
            check_block(block, words, decoder, memos[0])
            check_block(block, other, decoder, memos[1])


def test_a_changed_tag_is_decoded_again() -> None:
    (block,) = plan_reads([RegisterSpec("rfid", H, 0, DataType.ASCII, 4)], 125, 8, False)
    decoder = BlockDecoder(block)
    memo, other = decoder.new_memo(), decoder.new_memo()
    seen: list[Value] = []
    for words in ([0x4142, 0x4344, 0, 0], [0x4142, 0x4344, 0, 0], [0x4142, 0x4345, 0, 0], [0] * 4):
        got: dict[str, Value] = {}
        decoder.decode_into(words, got, memo)
        seen.append(got["rfid"])
        decoder.decode_into([0x5858, 0, 0, 0], got, other)  # another device between polls
        assert got["rfid"] == "XX"
    assert seen == ["ABCD", "ABCD", "ABCE", ""]


@pytest.mark.parametrize("slug", sorted(PROFILES))
def test_block_decode_matches_codec_for_encoded_values(slug: str) -> None:
    """Images the simulator would serve: each register holds encode() of a value or of None."""
    rng = random.Random(f"enc-{slug}")
    for block in plans(PROFILES[slug])[0]:
        for _ in range(50):
            words = random_words(rng, block.count)
            for spec in block.registers:
                start = spec.address - block.address
                can_be_missing = spec.sentinels or spec.type in (DataType.F32, DataType.F64)
                if can_be_missing and rng.random() < 0.5:
                    words[start : start + spec.count] = encode(spec, None)
            if block.table.is_bits:
                words = [w & 1 for w in words]
            check_block(block, words)


def spec(
    dtype: DataType,
    address: int = 0,
    count: int | None = None,
    **kw: object,
) -> RegisterSpec:
    n = count if count is not None else dtype.fixed_count
    assert n is not None
    return RegisterSpec(f"{dtype}@{address}", H, address, dtype, n, **kw)  # type: ignore[arg-type]


NUMERIC = [DataType.U16, DataType.I16, DataType.U32, DataType.I32, DataType.U64, DataType.I64]
FLOATS = [DataType.F32, DataType.F64]
VARIANTS: list[dict[str, object]] = [
    {},
    {"word_order": WordOrder.CDAB},
    {"scale": 0.1},
    {"scale": 0.01, "offset": -40.0},
    {"offset": 5.0},
    {"sentinels": frozenset({0xFFFF, 0xFFFFFFFF, 0x8000, 0x80000000, 0xFFFFFFFFFFFFFFFF})},
    {"word_order": WordOrder.CDAB, "sentinels": frozenset({0xFFFF0000, 0x0000FFFF})},
    {"mask": 0x0F0F},
    {"mask": 0x7FFF, "scale": 0.5},
]


@pytest.mark.parametrize("dtype", NUMERIC + FLOATS)
@pytest.mark.parametrize("variant", range(len(VARIANTS)))
def test_block_decode_matches_codec_for_every_type_and_option(
    dtype: DataType, variant: int
) -> None:
    opts = dict(VARIANTS[variant])
    if dtype in FLOATS and "mask" in opts:
        opts.pop("mask")
    n = dtype.fixed_count
    assert n is not None
    regs = [spec(dtype, 3, **opts), spec(DataType.U16, 3 + n, scale=2.0), spec(dtype, 3 + n + 2)]
    (block,) = plan_reads(regs, 125, 8, False)
    rng = random.Random(f"{dtype}-{variant}")
    for _ in range(300):
        check_block(block, random_words(rng, block.count))


def test_byte_halves_text_and_bools_share_a_block() -> None:
    regs = [
        spec(DataType.U16, 0, byte="high"),
        RegisterSpec("low", H, 0, DataType.U16, 1, byte="low", scale=0.5),
        RegisterSpec("name", H, 1, DataType.ASCII, 3),
        RegisterSpec("name1", H, 4, DataType.ASCII1, 2),
        RegisterSpec("serial", H, 6, DataType.HEX, 2),
        RegisterSpec("flag", H, 8, DataType.BOOL, 1),
        spec(DataType.F32, 9, word_order=WordOrder.CDAB, scale=1000.0),
    ]
    (block,) = plan_reads(regs, 125, 8, False)
    rng = random.Random(7)
    for _ in range(500):
        check_block(block, random_words(rng, block.count))
    got: dict[str, Value] = {}
    words = [0x1234, 0x4142, 0x4300, 0, 0x58, 0, 0xBEEF, 0x0001, 5, 0x0000, 0x3F80]
    assert BlockDecoder(block).decode_into(words, got) == ()
    assert got == {
        f"{DataType.U16}@0": 0x12,
        "low": 0x34 * 0.5,
        "name": "ABC",
        "name1": "X",
        "serial": "BEEF0001",
        "flag": 1,
        f"{DataType.F32}@9": 1000.0,
    }


def test_nan_and_inf_floats_are_not_available() -> None:
    (block,) = plan_reads([spec(DataType.F32, 0), spec(DataType.F64, 2)], 125, 8, False)
    for words in ([0x7FC0, 0, 0x7FF8, 0, 0, 0], [0x7F80, 0, 0xFFF0, 0, 0, 0]):
        got: dict[str, Value] = {}
        BlockDecoder(block).decode_into(words, got)
        assert list(got.values()) == [None, None]


def test_coils_decode_as_bits() -> None:
    regs = [RegisterSpec(f"c{i}", Table.COIL, i * 2, DataType.BOOL, 1) for i in range(4)]
    (block,) = plan_reads(regs, 2000, 8, False)
    got: dict[str, Value] = {}
    BlockDecoder(block).decode_into([1, 0, 0, 1, 1, 1, 0], got)
    assert got == {"c0": 1, "c1": 0, "c2": 1, "c3": 0}


def test_a_word_out_of_range_fails_only_its_register() -> None:
    regs = [spec(DataType.U16, 0), spec(DataType.U32, 1), spec(DataType.U16, 3)]
    (block,) = plan_reads(regs, 125, 8, False)
    got: dict[str, Value] = {}
    errors = BlockDecoder(block).decode_into([7, 1, 70000, 9], got)
    assert [s.name for s, _ in errors] == [f"{DataType.U32}@1"]
    assert got == {f"{DataType.U16}@0": 7, f"{DataType.U32}@1": None, f"{DataType.U16}@3": 9}
    check_block(block, [7, 1, 70000, 9])


def test_short_word_list_is_refused() -> None:
    (block,) = plan_reads([spec(DataType.U32, 0), spec(DataType.U16, 2)], 125, 8, False)
    with pytest.raises(ValueError, match="needs 3 words"):
        BlockDecoder(block).decode_into([1, 2], {})


# -- the one table of types ----------------------------------------------------------------------
def test_every_type_is_in_the_table_and_its_format_fills_its_registers() -> None:
    assert set(TYPES) == set(DataType)
    for t, info in TYPES.items():
        if info.format is not None:
            assert info.count is not None and struct.calcsize(info.format) == 2 * info.count, t
            (top,) = struct.unpack(info.format, b"\xff" * (2 * info.count))
            assert (top < 0 or info.is_float) == info.signed, t
    assert [t for t in DataType if t.is_text] == [DataType.ASCII, DataType.ASCII1, DataType.HEX]
    assert DataType.BOOL.fixed_count == 1 and DataType.F64.fixed_count == 4


def test_raw_ranges_are_the_struct_limits() -> None:
    for t, info in TYPES.items():
        rng = info.raw_range
        if rng is None:
            assert info.is_float or info.format is None, t
            continue
        assert info.format is not None
        struct.pack(info.format, rng[0])
        struct.pack(info.format, rng[1])
        for outside in (rng[0] - 1, rng[1] + 1):
            with pytest.raises(struct.error):
                struct.pack(info.format, outside)


def test_unsigned_formats_read_sentinels_per_register_count() -> None:
    assert [unsigned_format(n) for n in (1, 2, 4)] == [">H", ">I", ">Q"]
    with pytest.raises(ValueError):
        unsigned_format(3)


def test_value_range_follows_byte_mask_scale_and_offset() -> None:
    spec = RegisterSpec("x", H, 0, DataType.I16, 1, scale=0.1)
    assert value_range(spec) == pytest.approx((-3276.8, 3276.7))
    assert value_range(RegisterSpec("x", H, 0, DataType.U16, 1, byte="high")) == (0, 255)
    assert value_range(RegisterSpec("x", H, 0, DataType.U32, 2, mask=0x0F, offset=-1)) == (-1, 14)
    assert value_range(RegisterSpec("x", H, 0, DataType.F32, 2)) is None


@pytest.mark.parametrize(
    ("unit", "type_", "amps", "raw", "step"),
    [
        ("A", DataType.U16, 16.4, 16, 1.0),
        ("0.1A", DataType.U16, 16.44, 164, 0.1),
        ("mA", DataType.U32, 6.5, 6500, 0.001),
        ("A", DataType.F32, 13.25, 13.25, 0.1),
    ],
)
def test_one_current_limit_conversion(
    unit: str, type_: DataType, amps: float, raw: float, step: float
) -> None:
    got = current_to_raw(amps, unit, type_)
    assert got == pytest.approx(raw) and isinstance(got, float) == type_.is_float
    assert raw_to_current(got, unit) == pytest.approx(amps, abs=step)
    assert current_step_a(unit, type_) == pytest.approx(step)
