"""Modbus buses: one object per physical serial line or TCP endpoint.

A bus owns one pymodbus async client and a lock: pymodbus keeps one transaction in flight per
client anyway, and on RS-485 only one frame may be on the wire. The bus applies its own timeout per
request: one watchdog timer per bus that fails the client's response future when the pending
request's deadline passes (the client's retries are off and its own response timer is switched
off, so there is never a second one). The watchdog is re-armed only when it fires early, not
per request: a bus doing a thousand requests a second schedules about one timer per timeout
period instead of a thousand. It keeps the
RTU inter-frame gap plus the gap a device asks for, reconnects after errors with capped,
jittered exponential backoff (requests fail fast with ``connect_failed`` meanwhile, so a dead
endpoint never holds up another bus), and turns every failure into
``gateway.errors.DeviceError(endpoint, reason, detail)``.

Reasons: ``timeout`` (nothing usable came back in time), ``exception_response`` (the device
answered with a Modbus exception; ``exception_code`` says which), ``bad_frame`` (bytes came
back that are not a valid answer: CRC error, wrong length, garbage), ``connection_lost`` (the
link dropped during the request), ``connect_failed`` (cannot open the link, or backing off).
"""

from __future__ import annotations

import asyncio
import os
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from gateway.closing import AsyncClosing
from gateway.errors import DeviceError
from gateway.modbus import adapter
from gateway.modbus.adapter import ConnectionException, ModbusException
from gateway.modbus.types import Table

if TYPE_CHECKING:
    from gateway.config import BusConfig, DeviceConfig, EndpointConfig, GatewayConfig

__all__ = [
    "REASONS",
    "Backoff",
    "BusPool",
    "BusStats",
    "ModbusBus",
    "RtuOverTcpBus",
    "SerialBus",
    "TcpBus",
    "rtu_frame_gap_s",
]

log = structlog.get_logger(__name__)

REASONS = frozenset(
    {"timeout", "exception_response", "bad_frame", "connection_lost", "connect_failed"}
)

# After this many timeouts in a row with no answer from any unit, a TCP link is presumed
# half-open and reopened (a single silent unit behind a gateway does not reset the link).
_TCP_SILENT_LIMIT = 3


def rtu_frame_gap_s(baudrate: int) -> float:
    """RTU t3.5: 3.5 characters of 11 bits, fixed at 1.75 ms above 19200 baud."""
    if baudrate > 19200:
        return 0.00175
    return 3.5 * 11.0 / baudrate


def _raise_swallowed_cancel() -> None:
    """Re-raise a cancellation that pymodbus lost.

    pymodbus awaits its response (and its connect) with ``asyncio.wait_for``, which on Python
    3.11 returns the result and drops a cancellation that arrives in the same loop iteration as
    the answer. The task then stays "cancelling" without ever seeing CancelledError and a
    TaskGroup waits for it forever. With the client's timeout switched off ``wait_for`` is a
    plain ``await``, but this check stays as the guard should a pymodbus version wrap it again.
    Our own ``asyncio.timeout`` (connects) has uncancelled its part by the time we get here.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class _Expired(Exception):
    """Our request timer fired: set on the client's response future (not a TimeoutError, which
    pymodbus would catch and count towards closing the link on its own)."""


# Read method of the pymodbus client for each table.
_READERS = {
    Table.HOLDING: "read_holding_registers",
    Table.INPUT: "read_input_registers",
    Table.COIL: "read_coils",
    Table.DISCRETE: "read_discrete_inputs",
}
_READ_FC = {Table.COIL: 1, Table.DISCRETE: 2, Table.HOLDING: 3, Table.INPUT: 4}
_WRITERS = {5: "write_coil", 6: "write_register", 15: "write_coils", 16: "write_registers"}


class Backoff:
    """Capped exponential backoff with +-``jitter`` relative spread."""

    __slots__ = ("_current_s", "initial_s", "jitter", "max_s")

    def __init__(self, initial_s: float = 0.5, max_s: float = 30.0, jitter: float = 0.2) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self.jitter = jitter
        self._current_s = 0.0

    def next_delay(self) -> float:
        self._current_s = (
            self.initial_s if self._current_s == 0.0 else min(self._current_s * 2, self.max_s)
        )
        spread = self._current_s * self.jitter
        return max(0.0, self._current_s + random.uniform(-spread, spread))

    def reset(self) -> None:
        self._current_s = 0.0


@dataclass(slots=True)
class BusStats:
    requests: int = 0
    errors: int = 0
    connects: int = 0


class ModbusBus(ABC):
    """One physical line or TCP endpoint, shared by every device on it."""

    frame_gap_s: float = 0.0
    reset_link_on_bad_frame: bool = True  # stream transports cannot resync after garbage

    def __init__(
        self, endpoint: str, *, connect_timeout_s: float = 2.0, backoff: Backoff | None = None
    ) -> None:
        self.endpoint = endpoint
        self.connect_timeout_s = connect_timeout_s
        self.stats = BusStats()
        self._backoff = backoff or Backoff()
        self._lock = asyncio.Lock()
        self._client: Any = None
        self._retry_at = 0.0  # loop time before which no reconnect is attempted
        self._last_io_end = 0.0
        self._rx_seen = False  # bytes arrived during the current request
        # The client's own answer timer could not be switched off (adapter.response_timer_off):
        # check after each request for a cancellation its ``wait_for`` swallowed.
        self._guard_cancel = True
        self._silent = 0
        self._closed = False
        self._deadline: float | None = None  # loop time the pending request times out at
        self._watchdog: asyncio.TimerHandle | None = None
        self._log = log.bind(bus=endpoint)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.endpoint!r})"

    # -- subclass hooks -------------------------------------------------------------------
    @abstractmethod
    def _make_client(self) -> Any:
        """A fresh pymodbus async client (``gateway.modbus.adapter``) with our trace hooks."""

    # -- public API -----------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._client is not None and bool(self._client.connected)

    async def read(
        self,
        unit: int,
        table: Table,
        address: int,
        count: int,
        timeout_s: float,
        *,
        gap_s: float = 0.0,
    ) -> list[int]:
        """Read ``count`` registers (or bits, as 0/1) of ``table`` at ``address`` from ``unit``.

        ``gap_s`` is extra bus silence the device needs before this request (a profile's
        ``inter_request_delay``).
        """
        # acquire/release rather than ``async with``: two coroutine frames less per request
        lock = self._lock
        await lock.acquire()
        try:
            client = self._client
            if client is None or self._closed or not client.connected or self.frame_gap_s or gap_s:
                client = await self._ready(timeout_s, gap_s)  # connect, or keep a gap first
            rr = await self._transact(
                getattr(client, _READERS[table]), address, count, True, unit, timeout_s, table
            )
            if table.is_bits:
                bits = getattr(rr, "bits", None) or []
                if len(bits) < count:
                    self._after_bad_frame()
                    raise self._fail(unit, "bad_frame", f"{len(bits)} bits for {count}")
                return [1 if b else 0 for b in bits[:count]]
            regs = getattr(rr, "registers", None)
            if regs is None or len(regs) != count:
                self._after_bad_frame()
                n = 0 if regs is None else len(regs)
                raise self._fail(unit, "bad_frame", f"{n} registers for {count}")
            # pymodbus builds a fresh list per response: hand it over without a copy.
            return regs if type(regs) is list else list(regs)
        finally:
            lock.release()

    async def write(
        self,
        unit: int,
        table: Table,
        address: int,
        values: Sequence[int],
        function: int,
        timeout_s: float,
        *,
        gap_s: float = 0.0,
    ) -> None:
        """Write ``values`` with function 5 (one coil), 6 (one register), 15 (coils) or 16."""
        if table.is_bits != (function in (5, 15)) or function not in (5, 6, 15, 16):
            raise ValueError(f"function {function} cannot write {table.value}")
        if function in (5, 6) and len(values) != 1:
            raise ValueError(f"function {function} writes exactly one value, got {len(values)}")
        if function == 5:
            arg: Any = bool(values[0])
        elif function == 6:
            arg = int(values[0])
        elif function == 15:
            arg = [bool(v) for v in values]
        else:
            arg = [int(v) for v in values]
        async with self._lock:
            client = await self._ready(timeout_s, gap_s)
            await self._transact(
                getattr(client, _WRITERS[function]),
                address,
                arg,
                False,
                unit,
                timeout_s,
                table,
                function,
            )

    async def close(self) -> None:
        self._closed = True
        async with self._lock:
            self._drop_client()
            if self._watchdog is not None:
                self._watchdog.cancel()
                self._watchdog = None

    # -- client hooks (adapter.ClientHooks): pymodbus calls these ---------------------
    def trace_packet(self, sending: bool, data: bytes) -> bytes:
        """Notes that bytes arrived during the request (a timeout then means a bad frame)."""
        if not sending and data:
            self._rx_seen = True
        return data

    def trace_connect(self, connected: bool) -> None:
        """A dropped link ends the pending request at once."""
        if connected:
            return
        # pymodbus leaves a request waiting out its timeout when the link drops: fail it now.
        adapter.fail_pending(self._client, ConnectionException("connection lost"))

    # -- internals ------------------------------------------------------------------------
    def _silence_s(self, gap_s: float) -> float:
        """Silence before the next request: on a serial line t3.5, then the device's own gap."""
        return self.frame_gap_s + gap_s

    def _fail(self, unit: int, reason: str, detail: str, code: int | None = None) -> DeviceError:
        _raise_swallowed_cancel()
        self.stats.errors += 1
        return DeviceError(f"{self.endpoint}#{unit}", reason, detail, exception_code=code)

    async def _ready(self, timeout_s: float, gap_s: float) -> Any:
        """Connected client, after the silence the line needs. Holds the lock."""
        if self._closed:
            raise DeviceError(self.endpoint, "connect_failed", "bus closed")
        loop = asyncio.get_running_loop()
        if not self.connected:
            now = loop.time()
            if now < self._retry_at:
                self.stats.errors += 1
                raise DeviceError(
                    self.endpoint, "connect_failed", f"retry in {self._retry_at - now:.1f}s"
                )
            await self._connect(
                min(timeout_s, self.connect_timeout_s) if timeout_s > 0 else self.connect_timeout_s
            )
        wait_s = self._last_io_end + self._silence_s(gap_s) - loop.time()
        if wait_s > 0:
            await asyncio.sleep(wait_s)
        return self._client

    async def _connect(self, timeout_s: float) -> None:
        self._drop_client()
        client = self._make_client()
        self._client = client
        self._guard_cancel = not adapter.response_timer_off(client)
        ok = False
        detail = "refused"
        try:
            async with asyncio.timeout(max(timeout_s, 0.05)):
                ok = bool(await client.connect())
        except TimeoutError:
            detail = "connect timed out"
        except (
            Exception
        ) as exc:  # OSError, SerialException, termios.error (bad settings): all mean "cannot open"
            detail = f"{type(exc).__name__}: {exc}"
        _raise_swallowed_cancel()
        if ok and client.connected:
            self._backoff.reset()
            self._silent = 0
            self.stats.connects += 1
            self._last_io_end = asyncio.get_running_loop().time()
            self._log.debug("modbus_connected")
            return
        self._drop_client()
        delay = self._backoff.next_delay()
        self._retry_at = asyncio.get_running_loop().time() + delay
        self.stats.errors += 1
        self._log.debug("modbus_connect_failed", detail=detail, retry_in_s=round(delay, 2))
        raise DeviceError(self.endpoint, "connect_failed", detail)

    def _drop_client(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            client.close()

    def _after_bad_frame(self) -> None:
        if self.reset_link_on_bad_frame:
            self._drop_client()
        else:
            self._flush()

    def _flush(self) -> None:
        """Forget buffered bytes so a garbled answer cannot bleed into the next one."""
        adapter.flush_input(self._client)

    def _arm(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        """The pending request times out at ``deadline``: keep a watchdog due no later."""
        self._deadline = deadline
        watchdog = self._watchdog
        if watchdog is not None:
            if watchdog.when() <= deadline:
                return  # it fires first and re-arms for this deadline then
            watchdog.cancel()
        self._watchdog = loop.call_at(deadline, self._on_watchdog, loop)

    def _on_watchdog(self, loop: asyncio.AbstractEventLoop) -> None:
        """Fail the pending request if its deadline has come, else wait for that deadline."""
        watchdog, self._watchdog = self._watchdog, None
        deadline = self._deadline
        if deadline is None:
            return  # no request pending: the next one arms a new watchdog
        if watchdog is not None and deadline > watchdog.when():
            self._watchdog = loop.call_at(deadline, self._on_watchdog, loop)
            return
        self._expire()

    def _expire(self) -> None:
        """The request timed out: fail the pending response (the await returns at once)."""
        self._deadline = None
        adapter.fail_pending(self._client, _Expired())

    async def _transact(
        self,
        method: Callable[..., Any],
        address: int,
        arg: Any,
        is_read: bool,
        unit: int,
        timeout_s: float,
        table: Table,
        function: int = 0,
    ) -> Any:
        """One request: ``method(address, count=arg)`` for reads, ``method(address, arg)`` for
        writes. Failures become DeviceError; the request description is only built for them."""
        self._rx_seen = False
        self.stats.requests += 1
        loop = asyncio.get_running_loop()
        self._arm(loop, loop.time() + timeout_s)
        try:
            if is_read:
                rr = await method(address, count=arg, device_id=unit)
            else:
                rr = await method(address, arg, device_id=unit)
        except _Expired:
            what = _what(table, address, arg, function)
            if self._rx_seen:
                # Bytes came, but no valid frame for this request: garbage or a CRC error.
                self._after_bad_frame()
                raise self._fail(
                    unit, "bad_frame", f"{what}: no valid frame in {timeout_s:g}s"
                ) from None
            self._silent += 1
            if self._silent >= _TCP_SILENT_LIMIT and self.reset_link_on_bad_frame:
                self._drop_client()  # probably half-open: reopen on the next request
            else:
                self._flush()
            raise self._fail(unit, "timeout", f"{what}: no answer in {timeout_s:g}s") from None
        except ConnectionException as exc:
            self._drop_client()
            raise self._fail(
                unit, "connection_lost", f"{_what(table, address, arg, function)}: {exc}"
            ) from None
        except ModbusException as exc:  # ModbusIOException included
            self._after_bad_frame()
            raise self._fail(
                unit, "bad_frame", f"{_what(table, address, arg, function)}: {exc}"
            ) from None
        except OSError as exc:
            self._drop_client()
            raise self._fail(
                unit, "connection_lost", f"{_what(table, address, arg, function)}: {exc}"
            ) from None
        except Exception as exc:  # anything else the client trips over is a frame it cannot use
            self._after_bad_frame()
            what = _what(table, address, arg, function)
            raise self._fail(unit, "bad_frame", f"{what}: {type(exc).__name__}: {exc}") from None
        finally:
            self._deadline = None
            self._last_io_end = loop.time()
        if self._guard_cancel:
            _raise_swallowed_cancel()
        self._silent = 0
        # pymodbus matches a reply to its request by transaction id only (TCP) and decodes
        # whatever function code it carries: an FC04 answer to an FC03 request came back as
        # data. A reply with another function code is a frame we cannot use. An exception
        # reply carries the request's code + 0x80, so the expected code is the fast path.
        expected = function or _READ_FC[table]
        got = getattr(rr, "function_code", None)
        if got != expected:
            if rr is not None and adapter.is_error_response(rr):
                code = int(getattr(rr, "exception_code", 0) or 0)
                what = _what(table, address, arg, function)
                raise self._fail(
                    unit, "exception_response", f"{what}: exception code {code}", code
                )
            self._after_bad_frame()
            what = _what(table, address, arg, function)
            raise self._fail(unit, "bad_frame", f"{what}: reply has function code {got}")
        return rr


def _what(table: Table, address: int, arg: Any, function: int) -> str:
    """The request, for error details."""
    if function:
        return f"write fc{function} {table.value}:{address}"
    return f"{table.value}:{address}+{arg}"


class TcpBus(ModbusBus):
    """Modbus TCP (MBAP framing) to one host:port; every unit behind it shares the link.

    Behind a Modbus TCP gateway (protocol converter) the units are serial devices on one RS-485
    line: the converter can only forward one request at a time, so the lock that keeps one
    request in flight per endpoint is exactly what it needs. ``inter_request_delay_s`` is the
    silence a slow converter needs after each answer; a device's own delay (its profile's
    ``inter_request_delay``) applies too, and the longer of the two is kept.
    """

    def __init__(
        self, host: str, port: int = 502, *, inter_request_delay_s: float = 0.0, **kw: Any
    ) -> None:
        super().__init__(f"tcp://{host}:{port}", **kw)
        self.host = host
        self.port = port
        self.frame_gap_s = inter_request_delay_s

    def _silence_s(self, gap_s: float) -> float:
        # No line timing of ours to add up: both are minimum pauses between requests.
        return max(self.frame_gap_s, gap_s)

    def _make_client(self) -> Any:
        return adapter.tcp_client(self.host, self.port, self)


class RtuOverTcpBus(ModbusBus):
    """RTU frames through a transparent serial server reached over TCP."""

    def __init__(self, host: str, port: int = 502, *, frame_gap_s: float = 0.0, **kw: Any) -> None:
        super().__init__(f"rtu+tcp://{host}:{port}", **kw)
        self.host = host
        self.port = port
        # The serial server owns the line timing; a gap can still be set for slow converters.
        self.frame_gap_s = frame_gap_s

    def _make_client(self) -> Any:
        return adapter.tcp_client(self.host, self.port, self, rtu_framing=True)


class SerialBus(ModbusBus):
    """An RS-485 line driven by this machine's serial port."""

    reset_link_on_bad_frame = False  # a serial port resyncs after a flush and t3.5 of silence

    def __init__(
        self,
        port: str,
        baudrate: int = 9600,
        parity: str = "N",
        stopbits: int = 1,
        bytesize: int = 8,
        **kw: Any,
    ) -> None:
        super().__init__(f"serial://{port}", **kw)
        self.port = port
        self.baudrate = baudrate
        self.parity = parity
        self.stopbits = stopbits
        self.bytesize = bytesize
        self.frame_gap_s = rtu_frame_gap_s(baudrate)

    def _make_client(self) -> Any:
        parity, bytesize = self.parity, self.bytesize
        if is_pseudo_terminal(self.port) and (parity != "N" or bytesize != 8):
            # A pty (the simulator's RS-485 stand-in) carries bytes, not characters: it has no
            # parity, and Linux refuses to set one on it (EINVAL). Real lines keep theirs.
            log.info("serial_pty_line_settings_ignored", port=self.port, parity=parity)
            parity, bytesize = "N", 8
        return adapter.serial_client(
            self.port,
            self,
            baudrate=self.baudrate,
            parity=parity,
            stopbits=self.stopbits,
            bytesize=bytesize,
        )


def is_pseudo_terminal(port: str) -> bool:
    """The serial port is (a link to) a pseudo-terminal slave such as socat creates."""
    return os.path.realpath(port).startswith("/dev/pts/")


def bus_from_config(cfg: BusConfig) -> ModbusBus:
    if cfg.type == "rtu":
        if not cfg.port:
            raise ValueError(f"bus {cfg.id}: rtu needs a port")
        return SerialBus(cfg.port, cfg.baudrate, cfg.parity, cfg.stopbits, cfg.bytesize)
    if cfg.type == "rtu-over-tcp":
        if not cfg.host:
            raise ValueError(f"bus {cfg.id}: rtu-over-tcp needs a host")
        return RtuOverTcpBus(cfg.host, cfg.tcp_port)
    raise ValueError(f"bus {cfg.id}: unknown type {cfg.type!r}")


class BusPool(AsyncClosing):
    """One bus per TCP endpoint or configured bus, shared by the devices on it.

    ``async with BusPool.from_config(config) as pool: pool.bus_for(device)``; buses connect on
    their first request and all close when the block ends.
    """

    def __init__(self, endpoints: Sequence[EndpointConfig] = ()) -> None:
        self._buses: dict[str, ModbusBus] = {}
        self._by_device: dict[str, ModbusBus] = {}
        self._endpoints = {(ep.host, ep.port): ep for ep in endpoints}

    @classmethod
    def from_config(cls, config: GatewayConfig) -> BusPool:
        pool = cls(config.endpoints)
        for bus_cfg in config.buses:
            pool._buses[f"bus:{bus_cfg.id}"] = bus_from_config(bus_cfg)
        for dev in config.modbus_devices:  # OCPP chargers connect by themselves
            pool._by_device[dev.id] = pool._bus_for_device(dev)
        return pool

    def _bus_for_device(self, dev: DeviceConfig) -> ModbusBus:
        if dev.bus:
            key = f"bus:{dev.bus}"
            if key not in self._buses:
                raise KeyError(f"device {dev.id}: no bus {dev.bus!r}")
            return self._buses[key]
        if not dev.host:
            raise ValueError(f"device {dev.id}: needs host or bus")
        key = f"tcp:{dev.host}:{dev.port}"
        if key not in self._buses:
            endpoint = self._endpoints.get((dev.host, dev.port))
            delay_s = endpoint.inter_request_delay_s if endpoint is not None else 0.0
            self._buses[key] = TcpBus(dev.host, dev.port, inter_request_delay_s=delay_s)
        return self._buses[key]

    def bus_for(self, device: DeviceConfig | str) -> ModbusBus:
        if isinstance(device, str):
            return self._by_device[device]
        if device.id in self._by_device:
            return self._by_device[device.id]
        bus = self._bus_for_device(device)
        self._by_device[device.id] = bus
        return bus

    @property
    def buses(self) -> list[ModbusBus]:
        return list(self._buses.values())

    async def close(self) -> None:
        for bus in self._buses.values():
            await bus.close()
