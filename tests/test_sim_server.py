"""The simulated Modbus server, driven by the real pymodbus async client (TCP, RTU over a socat
pty pair, RTU over TCP), including every fault kind."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException
from pymodbus.framer import FramerType

from gateway.modbus.types import Table
from gateway.sim.pty import pty_pair
from gateway.sim.registers import RegisterImage, SimWriteRejected
from gateway.sim.server import Fault, FaultKind, SimServer, crc16

TIMEOUT_S = 0.3


def _is_link(path: str) -> bool:
    return os.path.islink(path)


def _target(path: str) -> str:
    return os.path.realpath(path)


def _image() -> RegisterImage:
    img = RegisterImage()
    img.set(Table.HOLDING, 100, [1, 2, 3, 0xFFFF])
    img.set(Table.INPUT, 0, [7, 8])
    img.set(Table.COIL, 5, [1, 0, 1])
    img.set(Table.DISCRETE, 2, [1])
    return img


@pytest.fixture
async def tcp_server() -> AsyncIterator[tuple[SimServer, dict[int, RegisterImage]]]:
    units = {1: _image(), 2: _image()}
    async with SimServer.tcp("127.0.0.1", 0, units, seed=1) as server:
        yield server, units


async def _tcp_client(port: int) -> AsyncModbusTcpClient:
    client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=TIMEOUT_S, retries=0)
    assert await client.connect()
    return client


def test_register_image_sparse_get_set() -> None:
    img = RegisterImage()
    assert img.get("holding", 10, 3) == [0, 0, 0]
    img.set("holding", 11, [5])
    assert img.get(Table.HOLDING, 10, 3) == [0, 5, 0]
    img.set("coil", 0, [7, 0])  # bits are stored as 0/1
    assert img.get("coil", 0, 2) == [1, 0]
    with pytest.raises(ValueError):
        img.set("holding", 0, [70000])
    assert img.get("input", 11, 1) == [0]  # tables are separate


def test_crc16_known_vector() -> None:
    # Read holding registers unit 1, address 0, count 1: the classic "01 03 00 00 00 01 84 0A".
    assert crc16(bytes.fromhex("010300000001")).to_bytes(2, "little") == bytes.fromhex("840A")


async def test_tcp_reads_every_table(
    tcp_server: tuple[SimServer, dict[int, RegisterImage]],
) -> None:
    server, _ = tcp_server
    assert server.port > 0
    client = await _tcp_client(server.port)
    try:
        rr = await client.read_holding_registers(100, count=5, device_id=1)
        assert rr.registers == [1, 2, 3, 0xFFFF, 0]
        rr = await client.read_input_registers(0, count=2, device_id=2)
        assert rr.registers == [7, 8]
        rr = await client.read_coils(5, count=3, device_id=1)
        assert rr.bits[:3] == [True, False, True]
        rr = await client.read_discrete_inputs(0, count=4, device_id=1)
        assert rr.bits[:4] == [False, False, True, False]
    finally:
        client.close()


async def test_tcp_writes_reach_image_and_hook(
    tcp_server: tuple[SimServer, dict[int, RegisterImage]],
) -> None:
    server, units = tcp_server
    seen: list[tuple[Table, int, list[int]]] = []
    units[1].on_write = lambda table, address, words: seen.append((table, address, words))
    client = await _tcp_client(server.port)
    try:
        await client.write_register(200, 42, device_id=1)
        await client.write_registers(300, [1, 2, 3], device_id=1)
        await client.write_coil(9, True, device_id=1)
        await client.write_coils(20, [True, False, True], device_id=1)
    finally:
        client.close()
    assert units[1].get("holding", 200, 1) == [42]
    assert units[1].get("holding", 300, 3) == [1, 2, 3]
    assert units[1].get("coil", 9, 1) == [1]
    assert units[1].get("coil", 20, 3) == [1, 0, 1]
    assert units[2].get("holding", 200, 1) == [0]
    assert seen == [
        (Table.HOLDING, 200, [42]),
        (Table.HOLDING, 300, [1, 2, 3]),
        (Table.COIL, 9, [1]),
        (Table.COIL, 20, [1, 0, 1]),
    ]


async def test_hook_can_reject_write(
    tcp_server: tuple[SimServer, dict[int, RegisterImage]],
) -> None:
    server, units = tcp_server

    def reject(table: Table, address: int, words: list[int]) -> None:
        if words[0] > 100:
            raise SimWriteRejected(3)

    units[1].on_write = reject
    client = await _tcp_client(server.port)
    try:
        rr = await client.write_register(5, 500, device_id=1)
        assert rr.isError() and rr.exception_code == 3
        assert units[1].get("holding", 5, 1) == [0]
        rr = await client.write_register(5, 50, device_id=1)
        assert not rr.isError()
        assert units[1].get("holding", 5, 1) == [50]
    finally:
        client.close()


async def test_tcp_unknown_unit_gets_gateway_exception(
    tcp_server: tuple[SimServer, dict[int, RegisterImage]],
) -> None:
    server, _ = tcp_server
    client = await _tcp_client(server.port)
    try:
        rr = await client.read_holding_registers(0, count=1, device_id=9)
        assert rr.isError() and rr.exception_code == 0x0B
    finally:
        client.close()


async def test_tcp_too_many_registers_is_illegal_value(
    tcp_server: tuple[SimServer, dict[int, RegisterImage]],
) -> None:
    server, _ = tcp_server
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        # FC03 count 126 (> 125): exception 3.
        writer.write(bytes.fromhex("00010000000601030000007E"))
        await writer.drain()
        reply = await asyncio.wait_for(reader.readexactly(9), 2)
        assert reply[7:] == bytes([0x83, 0x03])
    finally:
        writer.close()


async def test_tcp_fault_exception_code(
    tcp_server: tuple[SimServer, dict[int, RegisterImage]],
) -> None:
    server, _ = tcp_server
    server.set_fault(1, Fault(FaultKind.EXCEPTION, code=2))
    client = await _tcp_client(server.port)
    try:
        rr = await client.read_holding_registers(100, count=1, device_id=1)
        assert rr.isError() and rr.exception_code == 2
        rr = await client.read_holding_registers(100, count=1, device_id=2)  # other unit fine
        assert rr.registers == [1]
        server.clear_fault(1)
        rr = await client.read_holding_registers(100, count=1, device_id=1)
        assert rr.registers == [1]
    finally:
        client.close()


async def test_tcp_fault_no_answer_times_out(
    tcp_server: tuple[SimServer, dict[int, RegisterImage]],
) -> None:
    server, _ = tcp_server
    server.set_fault(1, Fault(FaultKind.NO_ANSWER))
    client = await _tcp_client(server.port)
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(ModbusException):
            await client.read_holding_registers(100, count=1, device_id=1)
        assert loop.time() - started >= TIMEOUT_S * 0.9
    finally:
        client.close()
    server.set_fault(1, "none")
    client = await _tcp_client(server.port)
    try:
        rr = await client.read_holding_registers(100, count=1, device_id=1)
        assert rr.registers == [1]
    finally:
        client.close()


async def test_tcp_fault_garbage(tcp_server: tuple[SimServer, dict[int, RegisterImage]]) -> None:
    server, _ = tcp_server
    server.set_fault(1, FaultKind.GARBAGE)
    client = await _tcp_client(server.port)
    try:
        with pytest.raises(ModbusException):
            rr = await client.read_holding_registers(100, count=1, device_id=1)
            # Should pymodbus ever return instead of raising, it must not be a good answer.
            assert rr.isError()
            raise ModbusException("error response")
    finally:
        client.close()


async def test_tcp_fault_drop_closes_connection(
    tcp_server: tuple[SimServer, dict[int, RegisterImage]],
) -> None:
    server, _ = tcp_server
    server.set_fault(1, Fault(FaultKind.DROP))
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(bytes.fromhex("000100000006010300640001"))
        await writer.drain()
        assert await asyncio.wait_for(reader.read(100), 2) == b""  # EOF, no reply
    finally:
        writer.close()
    client = await _tcp_client(server.port)
    try:
        with pytest.raises(ModbusException):
            await client.read_holding_registers(100, count=1, device_id=1)
    finally:
        client.close()


async def test_fault_delay_and_frozen_answer(
    tcp_server: tuple[SimServer, dict[int, RegisterImage]],
) -> None:
    server, _ = tcp_server
    server.set_fault(1, Fault(FaultKind.FROZEN))  # the server answers; devices freeze values
    server.set_fault(2, Fault(delay_s=0.1))
    client = await _tcp_client(server.port)
    try:
        assert (await client.read_holding_registers(100, count=1, device_id=1)).registers == [1]
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert (await client.read_holding_registers(100, count=1, device_id=2)).registers == [1]
        assert loop.time() - started >= 0.09
    finally:
        client.close()


async def _serial_client(path: str) -> AsyncModbusSerialClient:
    # Parity N: on some kernels (this CI's 6.18) a pty refuses PARENB and pyserial's open with
    # parity="E" fails with EINVAL. The server side tolerates it (see the E below).
    client = AsyncModbusSerialClient(
        path, framer=FramerType.RTU, baudrate=19200, parity="N", timeout=TIMEOUT_S, retries=0
    )
    assert await client.connect()
    return client


@pytest.mark.e2e
async def test_rtu_over_pty_with_faults() -> None:
    units = {1: _image(), 3: _image()}
    async with (
        pty_pair() as (gateway_path, sim_path),
        SimServer.rtu(sim_path, units, baudrate=19200, parity="E") as server,
    ):
        assert _is_link(gateway_path) and _is_link(sim_path)
        client = await _serial_client(gateway_path)
        try:
            rr = await client.read_holding_registers(100, count=4, device_id=1)
            assert rr.registers == [1, 2, 3, 0xFFFF]
            await client.write_registers(10, [9, 8], device_id=3)
            assert units[3].get("holding", 10, 2) == [9, 8]
            # Unknown unit: the line stays silent.
            with pytest.raises(ModbusException):
                await client.read_holding_registers(0, count=1, device_id=7)
            server.set_fault(1, Fault(FaultKind.EXCEPTION, code=4))
            rr = await client.read_holding_registers(100, count=1, device_id=1)
            assert rr.isError() and rr.exception_code == 4
            server.set_fault(1, Fault(FaultKind.NO_ANSWER))
            with pytest.raises(ModbusException):
                await client.read_holding_registers(100, count=1, device_id=1)
            # Unit 3 keeps answering while unit 1 is silent.
            assert (await client.read_input_registers(0, count=2, device_id=3)).registers == [7, 8]
            server.set_fault(1, Fault(FaultKind.GARBAGE))
            with pytest.raises(ModbusException):
                rr = await client.read_holding_registers(100, count=1, device_id=1)
                assert rr.isError()
                raise ModbusException("error response")
            server.set_fault(1, Fault(FaultKind.DROP))  # serial: nothing to hang up -> silence
            with pytest.raises(ModbusException):
                await client.read_holding_registers(100, count=1, device_id=1)
            server.clear_fault(1)
            await asyncio.sleep(0.05)  # let the garbage settle before the next frame
            rr = await client.read_holding_registers(100, count=1, device_id=1)
            assert rr.registers == [1]
        finally:
            client.close()
        # A second client opening the same line later still works (socat survives the close).
        client = await _serial_client(gateway_path)
        try:
            rr = await client.read_holding_registers(101, count=1, device_id=1)
            assert rr.registers == [2]
        finally:
            client.close()
    assert not _is_link(gateway_path)


@pytest.mark.e2e
async def test_rtu_broadcast_writes_every_unit_without_answer() -> None:
    units = {1: RegisterImage(), 2: RegisterImage()}
    async with pty_pair() as (gw, sim), SimServer.rtu(sim, units):
        fd = os.open(gw, os.O_RDWR | os.O_NOCTTY)
        try:
            body = bytes.fromhex("0006000A0033")  # unit 0, FC06 address 10 value 0x33
            os.write(fd, body + crc16(body).to_bytes(2, "little"))
            for _ in range(100):
                if units[2].get("holding", 10, 1) == [0x33]:
                    break
                await asyncio.sleep(0.01)
        finally:
            os.close(fd)
    assert units[1].get("holding", 10, 1) == [0x33]
    assert units[2].get("holding", 10, 1) == [0x33]


@pytest.mark.e2e
async def test_pty_pair_at_given_path_replaces_stale_link(tmp_path: Path) -> None:
    link = tmp_path / "ttyEVGW0"
    link.symlink_to("/nonexistent/stale")
    async with pty_pair(gateway_link=link) as (gw, _sim):
        assert gw == str(link)
        assert _target(gw).startswith("/dev/pts/")
    assert not link.is_symlink()
    real = tmp_path / "plainfile"
    real.write_text("x")
    with pytest.raises(FileExistsError):
        async with pty_pair(gateway_link=real):
            pass


async def test_rtu_over_tcp() -> None:
    units = {5: _image()}
    async with SimServer.rtu_over_tcp("127.0.0.1", 0, units) as server:
        client = AsyncModbusTcpClient(
            "127.0.0.1", port=server.port, framer=FramerType.RTU, timeout=TIMEOUT_S, retries=0
        )
        assert await client.connect()
        try:
            rr = await client.read_holding_registers(100, count=2, device_id=5)
            assert rr.registers == [1, 2]
            server.set_fault(5, Fault(FaultKind.EXCEPTION, code=6))
            rr = await client.read_holding_registers(100, count=2, device_id=5)
            assert rr.isError() and rr.exception_code == 6
        finally:
            client.close()


async def test_override_answers_other_words_for_n_polls_then_the_units_own(
    tcp_server: tuple[SimServer, dict[int, RegisterImage]],
) -> None:
    server, units = tcp_server
    server.override(1, Table.HOLDING, 101, [0xDEAD, 0xBEEF], polls=2)
    client = await _tcp_client(server.port)
    try:
        seen = []
        for _ in range(3):
            rr = await client.read_holding_registers(100, count=4, device_id=1)
            seen.append(list(rr.registers))
        other = await client.read_holding_registers(100, count=4, device_id=2)
        untouched = await client.read_holding_registers(103, count=1, device_id=1)
    finally:
        client.close()
    assert seen == [[1, 0xDEAD, 0xBEEF, 0xFFFF]] * 2 + [[1, 2, 3, 0xFFFF]]
    assert list(other.registers) == [1, 2, 3, 0xFFFF]  # another unit: its own words
    assert list(untouched.registers) == [0xFFFF]
    assert units[1].get(Table.HOLDING, 100, 4) == [1, 2, 3, 0xFFFF]  # the image never changed
    with pytest.raises(ValueError):
        server.override(1, Table.HOLDING, 0, [1], polls=0)
