"""The one module that knows pymodbus: the clients we build and the internals we reach into.

The pin ``pymodbus[serial]>=3.16.1,<3.17`` in pyproject.toml has one reason: beyond the public
client API (``AsyncModbus*Client``, its read/write methods, ``trace_packet``/``trace_connect``,
the exception and response classes) the bus relies on three attributes of the client's
transaction manager, ``client.ctx``, that pymodbus does not promise to keep:

- ``ctx.comm_params.timeout_connect``: the timeout each request awaits its answer with
  (``asyncio.wait_for``). ``one_timer`` sets it to None, a plain await, so the bus' own
  per-request timer is the only one (``response_timer_off`` says whether it took: the bus then
  skips a per-request guard against a cancellation lost inside ``wait_for``).
- ``ctx.response_future``: the future a pending request awaits. ``fail_pending`` fails it and
  the request ends at once with that exception (our timer, or a dropped link that pymodbus
  would otherwise leave waiting).
- ``ctx.recv_buffer`` (bytes received but not framed yet) and ``ctx.transport.flush()`` (serial
  only): ``flush_input`` forgets a garbled answer so it cannot bleed into the next one.

One documented extension point is used as well: ``client.register`` of our own answer classes
for FC03 and FC04 (``RegistersResponse``), which take the words out of a frame in one
``unpack`` where pymodbus' own classes unpack and append them one at a time.

tests/test_modbus_adapter.py checks each of these against a real pymodbus client and fails
naming the pin; nothing else in the project imports pymodbus (the simulator has its own
framing). Where an attribute is missing at run time the functions here do nothing rather than
raise: a bus then still works, with the client's far timeout instead of ours.
"""

from __future__ import annotations

import struct
from functools import cache
from typing import Any, Protocol

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.framer import FramerType
from pymodbus.pdu import ExceptionResponse, ModbusPDU

__all__ = [
    "CLIENT_TIMEOUT_S",
    "ClientHooks",
    "ConnectionException",
    "HoldingRegistersResponse",
    "InputRegistersResponse",
    "ModbusException",
    "fail_pending",
    "flush_input",
    "is_error_response",
    "one_timer",
    "response_timer_off",
    "serial_client",
    "tcp_client",
]

# The client's own timeout must never fire before ours: ours is per request, its is per client.
# Connects run under the bus' own ``asyncio.timeout``; once the client exists its response wait
# is switched off altogether (``one_timer``).
CLIENT_TIMEOUT_S = 3600.0


class ClientHooks(Protocol):
    """What a client reports to its bus (pymodbus' ``trace_packet``/``trace_connect``)."""

    def trace_packet(self, sending: bool, data: bytes) -> bytes:
        """Every frame sent or received; returns it unchanged."""
        ...

    def trace_connect(self, connected: bool) -> None:
        """The link opened or dropped."""
        ...


def tcp_client(host: str, port: int, hooks: ClientHooks, *, rtu_framing: bool = False) -> Any:
    """A Modbus TCP client (MBAP framing), or RTU frames over TCP with ``rtu_framing``; like
    every client here: no retries, no auto-reconnect (the bus reopens with its own backoff), our
    trace hooks, the client's own answer timer off, our register answer classes."""
    return _ours(
        AsyncModbusTcpClient(
            host,
            port=port,
            framer=FramerType.RTU if rtu_framing else FramerType.SOCKET,
            timeout=CLIENT_TIMEOUT_S,
            retries=0,
            reconnect_delay=0,
            trace_packet=hooks.trace_packet,
            trace_connect=hooks.trace_connect,
        )
    )


def serial_client(
    port: str,
    hooks: ClientHooks,
    *,
    baudrate: int,
    parity: str,
    stopbits: int,
    bytesize: int,
) -> Any:
    """An RTU client on a serial port."""
    return _ours(
        AsyncModbusSerialClient(
            port,
            framer=FramerType.RTU,
            baudrate=baudrate,
            parity=parity,
            stopbits=stopbits,
            bytesize=bytesize,
            timeout=CLIENT_TIMEOUT_S,
            retries=0,
            reconnect_delay=0,
            trace_packet=hooks.trace_packet,
            trace_connect=hooks.trace_connect,
        )
    )


@cache
def _words(count: int) -> struct.Struct:
    return struct.Struct(f">{count}H")


class RegistersResponse(ModbusPDU):
    """A register read's answer (byte count, then big-endian words), decoded by one ``unpack``
    of all its words. As pymodbus' own classes: a byte count beyond the frame raises
    ModbusIOException (a frame it could not decode), an odd one gives its whole words (the bus
    then finds too few of them: a bad frame)."""

    rtu_byte_count_pos = 2  # RTU: the frame's length is in its third byte (as FC03's own class)

    def encode(self) -> bytes:
        words = self.registers
        return struct.pack(f">B{len(words)}H", 2 * len(words), *words)

    def decode(self, data: bytes) -> None:
        size = data[0]
        if size >= len(data):
            raise ModbusIOException(
                f"byte count {size} in a {len(data)}-byte answer",
                function_code=self.function_code,
            )
        self.registers = list(_words(size // 2).unpack_from(data, 1))

    def __str__(self) -> str:
        # pymodbus formats every decoded answer for a debug line, logged or not; its own form
        # lists every word (1.6 us for 25 words, a tenth of the request's own cost). The words
        # are in the frame the bus' trace hook sees.
        return (
            f"{type(self).__name__}(dev_id={self.dev_id}, "
            f"transaction_id={self.transaction_id}, {len(self.registers)} registers)"
        )


class HoldingRegistersResponse(RegistersResponse):
    function_code = 3


class InputRegistersResponse(RegistersResponse):
    function_code = 4


def _ours(client: Any) -> Any:
    """What every client here gets: its own answer timer off (``one_timer``) and our answer
    classes for register reads."""
    for answer in (HoldingRegistersResponse, InputRegistersResponse):
        client.register(answer)
    return one_timer(client)


def one_timer(client: Any) -> Any:
    """Switch off the client's own response timer: ``wait_for(fut, None)`` is a plain await."""
    params = getattr(getattr(client, "ctx", None), "comm_params", None)
    if params is not None and hasattr(params, "timeout_connect"):
        params.timeout_connect = None
    return client


def response_timer_off(client: Any) -> bool:
    """True when ``one_timer`` took: the client awaits its answer plainly, so it cannot lose a
    cancellation the way ``asyncio.wait_for`` with a timeout can on Python 3.11."""
    params = getattr(getattr(client, "ctx", None), "comm_params", None)
    return params is not None and getattr(params, "timeout_connect", 0) is None


def fail_pending(client: Any, exc: BaseException) -> None:
    """End the request ``client`` is waiting on (if any) at once with ``exc``."""
    fut = getattr(getattr(client, "ctx", None), "response_future", None)
    if fut is not None and not fut.done():
        fut.set_exception(exc)


def flush_input(client: Any) -> None:
    """Forget buffered bytes so a garbled answer cannot bleed into the next one."""
    ctx = getattr(client, "ctx", None)
    if ctx is not None:
        ctx.recv_buffer = b""
        flush = getattr(getattr(ctx, "transport", None), "flush", None)
        if callable(flush):
            flush()


def is_error_response(response: Any) -> bool:
    """The device answered with a Modbus exception (``response.exception_code`` says which)."""
    return isinstance(response, ExceptionResponse) or bool(response.isError())
