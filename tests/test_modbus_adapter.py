"""What gateway/modbus/adapter.py relies on in pymodbus, against a real pymodbus client.

Each test drives a real client against a scripted Modbus TCP server on loopback. A failure here
after a pymodbus upgrade means the adapter must change before the pin in pyproject.toml moves:
the messages name the pin.
"""

from __future__ import annotations

import ast
import asyncio
import struct
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from pymodbus.client import AsyncModbusTcpClient

from gateway.modbus import adapter

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _pin() -> Requirement:
    deps = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    return next(Requirement(d) for d in deps if Requirement(d).name == "pymodbus")


PIN = _pin()
INSTALLED = version("pymodbus")


def upgrade_broke(what: str) -> str:
    return (
        f"pymodbus {INSTALLED} changed {what}; gateway/modbus/adapter.py relies on it and "
        f"pyproject.toml pins pymodbus{PIN.specifier}: fix the adapter before moving the pin"
    )


# -- a scripted server: each request's MBAP header and PDU go to ``answer``, which replies ----
Answer = Callable[[bytes, bytes, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def server(answer: Answer) -> AsyncIterator[int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                header = await reader.readexactly(7)
                length = struct.unpack(">H", header[4:6])[0]
                pdu = await reader.readexactly(length - 1)
                await answer(header, pdu, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield srv.sockets[0].getsockname()[1]
    finally:
        srv.close()
        await srv.wait_closed()


def reply(header: bytes, pdu: bytes) -> bytes:
    return header[:4] + struct.pack(">HB", len(pdu) + 1, header[6]) + pdu


async def registers(header: bytes, pdu: bytes, writer: asyncio.StreamWriter) -> None:
    count = struct.unpack(">H", pdu[3:5])[0]
    writer.write(reply(header, bytes([pdu[0], 2 * count]) + bytes(range(2 * count))))


async def silent(header: bytes, pdu: bytes, writer: asyncio.StreamWriter) -> None:
    return None


class Hooks:
    def __init__(self, on_connect: Callable[[bool], None] | None = None) -> None:
        self.on_connect = on_connect

    def trace_packet(self, sending: bool, data: bytes) -> bytes:
        return data

    def trace_connect(self, connected: bool) -> None:
        if self.on_connect is not None:
            self.on_connect(connected)


def client_for(port: int, trace_connect: Callable[[bool], None] | None = None) -> Any:
    return adapter.tcp_client("127.0.0.1", port, Hooks(trace_connect))


@asynccontextmanager
async def connected(*clients: Any) -> AsyncIterator[None]:
    """The clients connected for the block, closed after it."""
    try:
        for client in clients:
            assert await client.connect()
        yield
    finally:
        for client in clients:
            client.close()


def stock_client(port: int) -> AsyncModbusTcpClient:
    """pymodbus' own client, answer classes and all."""
    return AsyncModbusTcpClient("127.0.0.1", port=port, retries=0)


# -- the tests -----------------------------------------------------------------------------------
def test_only_the_adapter_imports_pymodbus() -> None:
    root = PYPROJECT.parent
    importers = set()
    for path in (root / "gateway").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            if any(n == "pymodbus" or n.startswith("pymodbus.") for n in names):
                importers.add(path.relative_to(root).as_posix())
    assert importers == {"gateway/modbus/adapter.py"}


def test_installed_pymodbus_is_the_pinned_one() -> None:
    assert PIN.specifier.contains(INSTALLED), (
        f"pymodbus {INSTALLED} is installed but pyproject.toml pins pymodbus{PIN.specifier}"
    )


async def test_a_read_through_an_adapter_client() -> None:
    async with server(registers) as port:
        client = client_for(port)
        async with connected(client):
            rr = await client.read_holding_registers(10, count=2, device_id=1)
    assert not adapter.is_error_response(rr)
    assert rr.function_code == 3
    assert rr.registers == [0x0001, 0x0203]


class Ours(Exception):
    """Set on the pending request (not a TimeoutError: pymodbus catches those)."""


async def test_the_client_timer_is_off_and_fail_pending_ends_the_request() -> None:
    async with server(silent) as port:
        # A client timeout far below our wait: only one_timer keeps it from firing.
        raw = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=0.05, retries=0)
        assert not adapter.response_timer_off(raw)
        client = adapter.one_timer(raw)
        assert adapter.response_timer_off(client), upgrade_broke(
            "ctx.comm_params.timeout_connect: one_timer no longer reaches it"
        )
        assert await client.connect()
        try:
            request = asyncio.create_task(client.read_holding_registers(0, count=1, device_id=1))
            await asyncio.sleep(0.4)
            assert not request.done(), upgrade_broke(
                "ctx.comm_params.timeout_connect (the per-request answer timeout): the "
                "client's own timer still ends a request"
            )
            adapter.fail_pending(client, Ours())
            try:
                async with asyncio.timeout(1.0):
                    await request
            except Ours:
                pass
            except TimeoutError:
                pytest.fail(
                    upgrade_broke("ctx.response_future: failing it no longer ends a request")
                )
            else:
                pytest.fail(upgrade_broke("ctx.response_future: a failed future gave a result"))
        finally:
            client.close()


async def test_a_dropped_link_fails_the_pending_request_at_once() -> None:
    async def hang_up(header: bytes, pdu: bytes, writer: asyncio.StreamWriter) -> None:
        writer.close()

    client: Any = None

    def lost(connected: bool) -> None:
        if not connected:
            adapter.fail_pending(client, adapter.ConnectionException("connection lost"))

    async with server(hang_up) as port:
        client = client_for(port, lost)
        assert await client.connect()
        try:
            async with asyncio.timeout(2.0):
                with pytest.raises(adapter.ConnectionException):
                    await client.read_holding_registers(0, count=1, device_id=1)
        except TimeoutError:
            pytest.fail(upgrade_broke("trace_connect or ctx.response_future on a dropped link"))
        finally:
            client.close()


async def test_flush_input_forgets_a_partial_answer() -> None:
    sent = asyncio.Event()

    async def half(header: bytes, pdu: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(reply(header, bytes([3, 2, 0x12, 0x34]))[:8])  # header and function only
        await writer.drain()
        sent.set()

    async with server(half) as port:
        client = client_for(port)
        assert await client.connect()
        try:
            request = asyncio.create_task(client.read_holding_registers(0, count=1, device_id=1))
            await sent.wait()
            for _ in range(100):
                if getattr(client.ctx, "recv_buffer", b""):
                    break
                await asyncio.sleep(0.01)
            assert getattr(client.ctx, "recv_buffer", b""), upgrade_broke(
                "ctx.recv_buffer: a partial frame is no longer kept there"
            )
            adapter.flush_input(client)
            assert client.ctx.recv_buffer == b"", upgrade_broke("ctx.recv_buffer")
            adapter.fail_pending(client, Ours())
            with pytest.raises(Ours):
                await request
        finally:
            client.close()


async def test_an_exception_answer_is_an_error_response() -> None:
    async def refuse(header: bytes, pdu: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(reply(header, bytes([pdu[0] | 0x80, 2])))

    async with server(refuse) as port:
        client = client_for(port)
        async with connected(client):
            rr = await client.read_holding_registers(0, count=1, device_id=1)
    assert adapter.is_error_response(rr), upgrade_broke("how an exception answer is returned")
    assert rr.exception_code == 2


async def test_register_answers_decode_as_pymodbus_own_classes_do() -> None:
    """FC03 and FC04 answers come back as our classes (one unpack of all words) with the words
    pymodbus' own classes read from the same bytes, and print without listing every word."""
    async with server(registers) as port:
        ours, stock = client_for(port), stock_client(port)
        async with connected(ours, stock):
            for fc, cls in (
                (3, adapter.HoldingRegistersResponse),
                (4, adapter.InputRegistersResponse),
            ):
                for count in (1, 25, 125):
                    read = "read_holding_registers" if fc == 3 else "read_input_registers"
                    rr = await getattr(ours, read)(0, count=count, device_id=1)
                    expected = await getattr(stock, read)(0, count=count, device_id=1)
                    assert type(rr) is cls, upgrade_broke("client.register of answer classes")
                    assert rr.function_code == fc and not adapter.is_error_response(rr)
                    body = bytes(range(2 * count))  # what ``registers`` answers
                    assert rr.registers == list(struct.unpack(f">{count}H", body))
                    assert rr.registers == expected.registers
            assert "125 registers" in str(rr) and str(rr.registers) not in str(rr)
            assert str(rr.registers) in str(expected)  # pymodbus' own form lists every word


async def test_odd_or_overlong_byte_counts_read_as_pymodbus_own_classes_read_them() -> None:
    """An odd byte count gives its whole words (the bus then reports too few: a bad frame); a
    byte count beyond the frame is a frame pymodbus cannot decode: the request goes on waiting
    until the bus' timer ends it. Both as with pymodbus' own classes."""

    async def odd(header: bytes, pdu: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(reply(header, bytes([pdu[0], 3, 1, 2, 3])))

    async def overlong(header: bytes, pdu: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(reply(header, bytes([pdu[0], 9, 1, 2])))

    async with server(odd) as port:
        ours, stock = client_for(port), stock_client(port)
        async with connected(ours, stock):
            rr = await ours.read_holding_registers(0, count=2, device_id=1)
            expected = await stock.read_holding_registers(0, count=2, device_id=1)
            assert rr.registers == expected.registers == [0x0102]
    async with server(overlong) as port:
        client = client_for(port)
        async with connected(client):
            task = asyncio.create_task(client.read_holding_registers(0, count=2, device_id=1))
            await asyncio.sleep(0.3)
            assert not task.done()
            adapter.fail_pending(client, Ours())
            with pytest.raises(Ours):
                await task
