"""A simulated unit's registers and the Modbus requests executed against them.

``RegisterImage`` holds the four tables of one unit; ``handle_pdu`` executes one request PDU
(read coils, discrete inputs, holding and input registers; write single and multiple coils and
registers) and answers the response PDU or an exception, whatever the framing around it
(``gateway.sim.server``).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable

from gateway.modbus.types import Table

__all__ = [
    "EXC_GATEWAY_TARGET",
    "READ_TABLES",
    "RegisterImage",
    "SimWriteRejected",
    "WriteHook",
    "exception_pdu",
    "handle_pdu",
]

WriteHook = Callable[[Table, int, list[int]], None]


class SimWriteRejected(Exception):
    """Raised by an ``on_write`` hook to answer a client write with a Modbus exception code."""

    def __init__(self, code: int = 3) -> None:
        self.code = code
        super().__init__(f"write rejected with exception {code}")


class RegisterImage:
    """Sparse values of the four Modbus tables of one unit. Unset addresses read as 0.

    ``set`` is for the simulated device itself; client writes arrive through the server, are
    stored, then passed to ``on_write(table, address, words)`` (which may raise
    :class:`SimWriteRejected` to answer with an exception; the values are then not stored).
    Coils and discrete inputs hold 0/1 per address.
    """

    def __init__(self, on_write: WriteHook | None = None) -> None:
        self._tables: dict[Table, dict[int, int]] = {t: {} for t in Table}
        self.on_write: WriteHook | None = on_write
        # Device quirks the simulated models switch on (gateway.sim.quirks):
        # addresses the device does not define: a read that touches one answers exception 2
        self.undefined: dict[Table, frozenset[int]] = {}
        # the unit does not answer at all (Heidelberg in standby, a power cut)
        self.silent = False
        self.reads = 0  # requests served for this unit (reads only), for tests and stats
        self.writes = 0

    def get(self, table: Table | str, address: int, count: int = 1) -> list[int]:
        values = self._tables[Table(table)]
        return [values.get(a, 0) for a in range(address, address + count)]

    def set(self, table: Table | str, address: int, words: Iterable[int]) -> None:
        t = Table(table)
        values = self._tables[t]
        for i, word in enumerate(words):
            w = int(word)
            if t.is_bits:
                w = 1 if w else 0
            elif not 0 <= w <= 0xFFFF:
                raise ValueError(f"register value out of 0..65535 at {t}:{address + i}: {w}")
            values[address + i] = w

    def client_write(self, table: Table | str, address: int, words: list[int]) -> None:
        """A write from a Modbus client: hook first (it may reject), then store."""
        t = Table(table)
        if self.on_write is not None:
            self.on_write(t, address, list(words))
        self.set(t, address, words)
        self.writes += 1

    def snapshot(self, table: Table | str) -> dict[int, int]:
        return dict(self._tables[Table(table)])


_EXC_ILLEGAL_FUNCTION = 1
_EXC_ILLEGAL_ADDRESS = 2
_EXC_ILLEGAL_VALUE = 3
EXC_GATEWAY_TARGET = 0x0B

READ_TABLES = {1: Table.COIL, 2: Table.DISCRETE, 3: Table.HOLDING, 4: Table.INPUT}


def exception_pdu(function: int, code: int) -> bytes:
    return bytes([function | 0x80, code])


def _pack_bits(bits: list[int]) -> bytes:
    out = bytearray((len(bits) + 7) // 8)
    for i, bit in enumerate(bits):
        if bit:
            out[i // 8] |= 1 << (i % 8)
    return bytes(out)


def _unpack_bits(data: bytes, count: int) -> list[int]:
    return [(data[i // 8] >> (i % 8)) & 1 for i in range(count)]


def handle_pdu(image: RegisterImage, pdu: bytes) -> bytes:
    """Execute one request PDU against ``image``; returns the response PDU (maybe an exception)."""
    if not pdu:
        return exception_pdu(0, _EXC_ILLEGAL_FUNCTION)
    fc = pdu[0]
    try:
        if fc in READ_TABLES:
            address, count = struct.unpack(">HH", pdu[1:5])
            table = READ_TABLES[fc]
            limit = 2000 if table.is_bits else 125
            if not 1 <= count <= limit:
                return exception_pdu(fc, _EXC_ILLEGAL_VALUE)
            if address + count > 0x10000:
                return exception_pdu(fc, _EXC_ILLEGAL_ADDRESS)
            holes = image.undefined.get(table)
            if holes and any(a in holes for a in range(address, address + count)):
                return exception_pdu(fc, _EXC_ILLEGAL_ADDRESS)
            values = image.get(table, address, count)
            image.reads += 1
            if table.is_bits:
                data = _pack_bits(values)
            else:
                data = b"".join(v.to_bytes(2, "big") for v in values)
            return bytes([fc, len(data)]) + data
        if fc == 5:
            address, value = struct.unpack(">HH", pdu[1:5])
            if value not in (0x0000, 0xFF00):
                return exception_pdu(fc, _EXC_ILLEGAL_VALUE)
            image.client_write(Table.COIL, address, [1 if value else 0])
            return pdu[:5]
        if fc == 6:
            address, value = struct.unpack(">HH", pdu[1:5])
            image.client_write(Table.HOLDING, address, [value])
            return pdu[:5]
        if fc in (15, 16):
            address, count, nbytes = struct.unpack(">HHB", pdu[1:6])
            data = pdu[6 : 6 + nbytes]
            limit = 1968 if fc == 15 else 123
            expect = (count + 7) // 8 if fc == 15 else count * 2
            if not 1 <= count <= limit or nbytes != expect or len(data) != nbytes:
                return exception_pdu(fc, _EXC_ILLEGAL_VALUE)
            if address + count > 0x10000:
                return exception_pdu(fc, _EXC_ILLEGAL_ADDRESS)
            if fc == 15:
                image.client_write(Table.COIL, address, _unpack_bits(data, count))
            else:
                words = [int.from_bytes(data[i : i + 2], "big") for i in range(0, nbytes, 2)]
                image.client_write(Table.HOLDING, address, words)
            return pdu[:5]
    except struct.error:
        return exception_pdu(fc, _EXC_ILLEGAL_VALUE)
    except SimWriteRejected as exc:
        return exception_pdu(fc, exc.code)
    return exception_pdu(fc, _EXC_ILLEGAL_FUNCTION)
