"""Simulated Modbus servers: register images served over TCP, RTU (serial / pty), RTU-over-TCP and
through a simulated Modbus TCP gateway (protocol converter), with per-unit fault injection.

Why our own framing and not pymodbus' server: pymodbus 3.16 deprecates its datastore API
(``ModbusDeviceContext`` & co., gone in 4.0) and marks the replacement (``SimData``) experimental.
A Modbus server is small (eight function codes, MBAP or CRC framing), and owning the frame loop
makes every fault trivial and exact: stay silent, answer an exception, send garbage, hang up. The
gateway's client side is the real pymodbus client, and the tests drive this server with it. So
the simulator imports no pymodbus at all and nothing else in the project depends on a pymodbus
server API.

Unknown unit ids: on RTU (and RTU-over-TCP) the line stays silent, as a real RS-485 bus does when
nobody has that address; on Modbus TCP the server answers exception 0x0B "gateway target device
failed to respond", as TCP<->RTU gateways do. Unit 0 on RTU is a broadcast: writes go to every
unit and nobody answers.

A simulated Modbus TCP gateway (``SimServer.tcp_gateway``) takes MBAP requests from any number
of TCP clients and forwards each as an RTU frame onto one simulated serial line, one at a time
(a converter has one line): the request and the answer take their time on the wire at the line's
baud rate, the device its turnaround; a device that stays silent (or garbles its answer) costs
the converter's response timeout and comes back as exception 0x0B, as Moxa MGate and similar
converters answer. Every forwarded request is logged (``transactions``) so tests can prove that
a client never had two requests pending and kept its pauses.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import random
import struct
import termios
import tty
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import structlog

from gateway.modbus.types import Table
from gateway.sim.registers import (
    EXC_GATEWAY_TARGET,
    READ_TABLES,
    RegisterImage,
    exception_pdu,
    handle_pdu,
)

__all__ = [
    "Fault",
    "FaultKind",
    "LineTransaction",
    "SerialLine",
    "SimServer",
    "crc16",
]

log = structlog.get_logger(__name__)


class FaultKind(StrEnum):
    NONE = "none"
    NO_ANSWER = "no_answer"  # stay silent: the client times out
    EXCEPTION = "exception"  # answer a Modbus exception (``Fault.code``)
    GARBAGE = "garbage"  # answer random, short bytes instead of a frame
    DROP = "drop"  # close the connection (TCP); on RTU nothing to close: silent like no_answer
    FROZEN = "frozen"  # values stop changing; the server answers normally (devices handle it)


@dataclass(frozen=True, slots=True)
class Fault:
    """How a unit misbehaves. ``code`` is the exception code for ``exception`` (2 illegal data
    address, 4 device failure, 6 busy, ...); ``delay_s`` delays every answer (a slow device, or
    with a short client timeout a late one)."""

    kind: FaultKind = FaultKind.NONE
    code: int = 4
    delay_s: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", FaultKind(self.kind))
        if not 1 <= self.code <= 255:
            raise ValueError(f"exception code out of 1..255: {self.code}")

    @property
    def active(self) -> bool:
        return self.kind is not FaultKind.NONE or self.delay_s > 0


NO_FAULT = Fault()


@dataclass(slots=True)
class Override:
    """Words a unit answers at ``table:address`` instead of its own for the next ``polls`` read
    requests touching them: a meter that answers garbage for a while (1e30 kWh, -5 kWh)."""

    table: Table
    address: int
    words: list[int]
    polls: int


class _ServerClosing(Exception):
    """The server is closing: a connection handler ends instead of waiting out a delay."""


class _Reply(StrEnum):
    SEND = "send"
    SILENT = "silent"
    GARBAGE = "garbage"
    DROP = "drop"


def crc16(data: bytes) -> int:
    """Modbus RTU CRC-16 (poly 0xA001 reflected, init 0xFFFF); sent low byte first."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def _rtu_frame(unit: int, pdu: bytes) -> bytes:
    body = bytes([unit]) + pdu
    return body + crc16(body).to_bytes(2, "little")


def _rtu_request_length(buf: bytes | bytearray) -> int | None:
    """Length of the request frame at the start of ``buf``, None if more bytes are needed,
    0 if the function code is unknown (length cannot be known)."""
    if len(buf) < 2:
        return None
    fc = buf[1]
    if 1 <= fc <= 6:
        return 8
    if fc in (15, 16):
        if len(buf) < 7:
            return None
        return 9 + buf[6]
    return 0


@dataclass(frozen=True, slots=True)
class SerialLine:
    """The settings of a simulated serial line, and what they mean on the wire and in termios."""

    baudrate: int = 9600
    parity: str = "N"
    stopbits: int = 1
    bytesize: int = 8

    def char_bits(self) -> int:
        """Bits on the wire per character: start, data, parity (if any), stop."""
        return 1 + self.bytesize + (0 if self.parity.upper() == "N" else 1) + self.stopbits

    def wire_s(self, nbytes: int) -> float:
        """Time ``nbytes`` take on the line at its baud rate."""
        return nbytes * self.char_bits() / self.baudrate

    def termios_speed(self) -> int | None:
        """The termios speed constant of the baud rate (None for a rate termios does not name)."""
        speed: int | None = getattr(termios, f"B{self.baudrate}", None)
        return speed

    def termios_cflag(self, cflag: int) -> int:
        """``cflag`` with its parity, stop-bit and character-size bits set for this line."""
        cflag &= ~(termios.PARENB | termios.PARODD | termios.CSTOPB | termios.CSIZE)
        cflag |= {5: termios.CS5, 6: termios.CS6, 7: termios.CS7}.get(self.bytesize, termios.CS8)
        if self.parity.upper() in ("E", "O"):
            cflag |= termios.PARENB
        if self.parity.upper() == "O":
            cflag |= termios.PARODD
        if self.stopbits == 2:
            cflag |= termios.CSTOPB
        return cflag


@dataclass(frozen=True, slots=True)
class LineTransaction:
    """One request forwarded by a simulated Modbus TCP gateway, in loop time (seconds)."""

    unit: int
    received_s: float  # the MBAP request arrived
    line_start_s: float  # the converter put it on the serial line
    answered_s: float  # the answer (or the 0x0B timeout exception) was sent back
    pending: int  # MBAP requests waiting at the converter when this one arrived (itself included)


class SimServer:
    """Serves ``{unit_id: RegisterImage}`` until the ``async with`` block ends.

    ``SimServer.tcp(host, port, units)`` speaks Modbus TCP (port 0 picks a free port: see
    ``.port``); ``SimServer.rtu(path, units, ...)`` speaks RTU on a serial device (a pty end from
    :func:`pty_pair` in tests); ``SimServer.rtu_over_tcp(host, port, units)`` speaks RTU frames
    over TCP. Faults are set per unit at run time with :meth:`set_fault`.
    """

    def __init__(
        self,
        transport: str,
        units: Mapping[int, RegisterImage],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        path: str = "",
        line: SerialLine = SerialLine(),
        seed: int | None = None,
        turnaround_s: float = 0.005,
        response_timeout_s: float = 0.5,
        line_peer: str | None = None,
    ) -> None:
        if transport not in ("tcp", "rtu", "rtu-over-tcp", "tcp-gateway"):
            raise ValueError(f"unknown transport {transport!r}")
        self.transport = transport
        self.units: dict[int, RegisterImage] = dict(units)
        self.host = host
        self.port = port
        self.path = path
        self.line = line
        self._faults: dict[int, Fault] = {}
        self._overrides: dict[int, list[Override]] = {}
        self._rng = random.Random(seed)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._fd: int | None = None
        # RTU on a pty: the gateway's end of the pair, to read the line speed it set (a pty
        # carries bytes at any speed; a real line garbles them when the speeds differ).
        self.line_peer = line_peer
        self._peer_fd: int | None = None
        self.wrong_speed_frames = 0  # requests ignored because the client's baud rate differs
        self._rtu_buf = bytearray()
        self._rtu_resync: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # Connection handlers end by themselves when the server closes (Python 3.11 logs a
        # spurious error for a handler task that is cancelled instead).
        self._handlers: set[asyncio.Task[Any]] = set()
        self._closing = asyncio.Event()
        self.requests = 0  # frames received (all units), for tests and stats
        # Modbus TCP gateway: the serial line behind it.
        self.turnaround_s = turnaround_s  # a device's answer starts this long after the request
        self.response_timeout_s = response_timeout_s  # the converter gives up on a silent unit
        self._line = asyncio.Lock()
        self._pending = 0
        self.max_pending = 0  # most MBAP requests ever waiting at once
        self.transactions: collections.deque[LineTransaction] = collections.deque(maxlen=10_000)

    # constructors -----------------------------------------------------------------------------
    @classmethod
    def tcp(
        cls, host: str, port: int, units: Mapping[int, RegisterImage], *, seed: int | None = None
    ) -> SimServer:
        return cls("tcp", units, host=host, port=port, seed=seed)

    @classmethod
    def rtu_over_tcp(
        cls, host: str, port: int, units: Mapping[int, RegisterImage], *, seed: int | None = None
    ) -> SimServer:
        return cls("rtu-over-tcp", units, host=host, port=port, seed=seed)

    @classmethod
    def tcp_gateway(
        cls,
        host: str,
        port: int,
        units: Mapping[int, RegisterImage],
        *,
        baudrate: int = 9600,
        parity: str = "N",
        stopbits: int = 1,
        turnaround_s: float = 0.005,
        response_timeout_s: float = 0.5,
        seed: int | None = None,
    ) -> SimServer:
        """A Modbus TCP gateway (MBAP in, RTU out) with ``units`` on its serial line."""
        return cls(
            "tcp-gateway",
            units,
            host=host,
            port=port,
            line=SerialLine(baudrate, parity, stopbits),
            turnaround_s=turnaround_s,
            response_timeout_s=response_timeout_s,
            seed=seed,
        )

    @classmethod
    def rtu(
        cls,
        path: str,
        units: Mapping[int, RegisterImage],
        baudrate: int = 9600,
        parity: str = "N",
        stopbits: int = 1,
        bytesize: int = 8,
        *,
        seed: int | None = None,
        line_peer: str | None = None,
    ) -> SimServer:
        """RTU on the serial device ``path``. With ``line_peer`` (the client's end of a pty pair)
        the units answer only while the client's line speed equals ``baudrate``, as on a wire."""
        return cls(
            "rtu",
            units,
            path=path,
            line=SerialLine(baudrate, parity, stopbits, bytesize),
            seed=seed,
            line_peer=line_peer,
        )

    # faults -----------------------------------------------------------------------------------
    def set_fault(self, unit: int, fault: Fault | FaultKind | str) -> None:
        if not isinstance(fault, Fault):
            fault = Fault(FaultKind(fault))
        if fault.active:
            self._faults[unit] = fault
        else:
            self._faults.pop(unit, None)
        log.info("sim_fault_set", endpoint=self.endpoint, unit=unit, fault=fault.kind.value)

    def clear_fault(self, unit: int) -> None:
        self.set_fault(unit, NO_FAULT)

    def override(
        self, unit: int, table: Table | str, address: int, words: Iterable[int], polls: int = 1
    ) -> Override:
        """Answer ``words`` at ``table:address`` of ``unit`` for the next ``polls`` reads that
        touch them; the unit's own values come back afterwards."""
        if polls < 1:
            raise ValueError(f"polls must be at least 1, got {polls}")
        entry = Override(Table(table), address, [int(w) for w in words], polls)
        if not all(0 <= w <= 0xFFFF for w in entry.words):
            raise ValueError("override words must be in 0..65535")
        self._overrides.setdefault(unit, []).append(entry)
        log.info(
            "sim_override_set",
            endpoint=self.endpoint,
            unit=unit,
            table=entry.table.value,
            address=address,
            polls=polls,
        )
        return entry

    def _read_overridden(self, unit: int, image: RegisterImage, pdu: bytes) -> bytes | None:
        """The answer to a read with the unit's active overrides applied, or None."""
        entries = self._overrides.get(unit)
        if not entries or len(pdu) < 5 or pdu[0] not in (3, 4):
            return None
        table = READ_TABLES[pdu[0]]
        start, count = struct.unpack(">HH", pdu[1:5])
        hit = [
            o
            for o in entries
            if o.table is table and o.address < start + count and start < o.address + len(o.words)
        ]
        if not hit:
            return None
        saved = [(o, image.get(table, o.address, len(o.words))) for o in hit]
        for o in hit:
            image.set(table, o.address, o.words)
        try:
            reply = handle_pdu(image, pdu)
        finally:
            for o, words in reversed(saved):
                image.set(table, o.address, words)
        for o in hit:
            o.polls -= 1
        self._overrides[unit] = [o for o in entries if o.polls > 0]
        return reply

    def fault(self, unit: int) -> Fault:
        return self._faults.get(unit, NO_FAULT)

    @property
    def endpoint(self) -> str:
        if self.transport == "rtu":
            return f"rtu:{self.path}"
        return f"{self.transport}://{self.host}:{self.port}"

    # lifecycle --------------------------------------------------------------------------------
    async def __aenter__(self) -> SimServer:
        if self.transport == "rtu":
            self._open_serial()
        else:
            stream = self.transport == "rtu-over-tcp"
            handler = self._serve_rtu_stream if stream else self._serve_tcp
            self._server = await asyncio.start_server(handler, self.host, self.port)
            self.port = self._server.sockets[0].getsockname()[1]
        log.info("sim_server_started", endpoint=self.endpoint, units=sorted(self.units))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        self._closing.set()
        if self._peer_fd is not None:
            os.close(self._peer_fd)
            self._peer_fd = None
        if self._fd is not None:
            loop = asyncio.get_running_loop()
            loop.remove_reader(self._fd)
            if self._rtu_resync is not None:
                self._rtu_resync.cancel()
            os.close(self._fd)
            self._fd = None
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            if self._handlers:
                await asyncio.wait(set(self._handlers), timeout=1.0)
            await self._server.wait_closed()
            self._server = None
        log.info("sim_server_stopped", endpoint=self.endpoint)

    # decision shared by all framings ----------------------------------------------------------
    def _answer(self, unit: int, pdu: bytes, *, tcp: bool) -> tuple[_Reply, bytes, float]:
        self.requests += 1
        image = self.units.get(unit)
        if image is None:
            if tcp:
                return _Reply.SEND, exception_pdu(pdu[0] if pdu else 0, EXC_GATEWAY_TARGET), 0.0
            return _Reply.SILENT, b"", 0.0
        fault = self._faults.get(unit, NO_FAULT)
        kind = fault.kind
        if kind is FaultKind.NO_ANSWER or image.silent:
            return _Reply.SILENT, b"", 0.0
        if kind is FaultKind.DROP:
            return _Reply.DROP, b"", fault.delay_s
        if kind is FaultKind.GARBAGE:
            size = self._rng.randint(1, 5)
            return _Reply.GARBAGE, bytes(self._rng.getrandbits(8) for _ in range(size)), 0.0
        if kind is FaultKind.EXCEPTION:
            return _Reply.SEND, exception_pdu(pdu[0] if pdu else 0, fault.code), fault.delay_s
        reply = self._read_overridden(unit, image, pdu)
        if reply is None:
            reply = handle_pdu(image, pdu)
        return _Reply.SEND, reply, fault.delay_s

    # Modbus TCP -------------------------------------------------------------------------------
    async def _pause(self, seconds: float) -> None:
        """Sleep ``seconds``; raise ``_ServerClosing`` at once when the server closes."""
        try:
            async with asyncio.timeout(seconds):
                await self._closing.wait()
        except TimeoutError:
            return
        raise _ServerClosing

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        handler = asyncio.current_task()
        if handler is not None:
            self._handlers.add(handler)
        try:
            while True:
                header = await reader.readexactly(7)
                tid, pid, length, unit = struct.unpack(">HHHB", header)
                if length < 2 or length > 254:
                    break  # not Modbus: hang up like real devices do
                pdu = await reader.readexactly(length - 1)
                if self.transport == "tcp-gateway":
                    reply, data, delay_s = await self._through_line(unit, pdu)
                else:
                    reply, data, delay_s = self._answer(unit, pdu, tcp=True)
                if delay_s:
                    await self._pause(delay_s)
                if reply is _Reply.DROP:
                    break
                if reply is _Reply.SILENT:
                    continue
                if reply is _Reply.GARBAGE:
                    writer.write(data)
                else:
                    writer.write(struct.pack(">HHHB", tid, pid, len(data) + 1, unit) + data)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, _ServerClosing):
            pass
        finally:
            if handler is not None:
                self._handlers.discard(handler)
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    # Modbus TCP gateway: one serial line behind -----------------------------------------------
    async def _through_line(self, unit: int, pdu: bytes) -> tuple[_Reply, bytes, float]:
        """Forward one MBAP request onto the serial line and wait for its answer; requests from
        every connection queue here, as they do in a converter with one line."""
        loop = asyncio.get_running_loop()
        received = loop.time()
        self._pending += 1
        pending = self._pending
        self.max_pending = max(self.max_pending, pending)
        try:
            async with self._line:
                start = loop.time()
                request = _rtu_frame(unit, pdu)
                timed_out = (exception_pdu(pdu[0] if pdu else 0, EXC_GATEWAY_TARGET), 0.0)
                # t3.5 of silence, then the request's characters
                await self._pause(self.line.wire_s(len(request)) + self.line.wire_s(1) * 3.5)
                replies = self._rtu_frames(bytearray(request))
                result: tuple[_Reply, bytes, float]
                if unit == 0:
                    result = (_Reply.SILENT, b"", 0.0)  # broadcast: applied, never answered
                elif not replies or replies[0][1] in (_Reply.GARBAGE, _Reply.DROP):
                    # Silence, or an answer that fails its CRC: the converter waits it out.
                    await self._pause(self.response_timeout_s)
                    result = (_Reply.SEND, *timed_out)
                else:
                    _, _, data, delay_s = replies[0]
                    answer = _rtu_frame(unit, data)
                    late_s = self.turnaround_s + delay_s
                    if late_s > self.response_timeout_s:
                        await self._pause(self.response_timeout_s)
                        result = (_Reply.SEND, *timed_out)
                    else:
                        await self._pause(late_s + self.line.wire_s(len(answer)))
                        result = (_Reply.SEND, answer[1:-2], 0.0)
                self.transactions.append(
                    LineTransaction(unit, received, start, loop.time(), pending)
                )
                return result
        finally:
            self._pending -= 1

    # RTU framing over a stream (RTU-over-TCP) -------------------------------------------------
    async def _serve_rtu_stream(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._writers.add(writer)
        buf = bytearray()
        try:
            while True:
                chunk = await reader.read(512)
                if not chunk:
                    break
                buf += chunk
                for unit, reply, data, delay_s in self._rtu_frames(buf):
                    if delay_s:
                        await asyncio.sleep(delay_s)
                    if reply is _Reply.DROP:
                        return
                    out = data if reply is _Reply.GARBAGE else _rtu_frame(unit, data)
                    writer.write(out)
                    await writer.drain()
        except ConnectionError:
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _rtu_frames(self, buf: bytearray) -> list[tuple[int, _Reply, bytes, float]]:
        """Consume complete request frames from ``buf``; return the replies to send."""
        out: list[tuple[int, _Reply, bytes, float]] = []
        while True:
            length = _rtu_request_length(buf)
            if length is None or len(buf) < (length or 0):
                return out
            if length == 0:
                # Unknown function code: its length is unknowable; a real device waits for the
                # line to go quiet. Drop what we have.
                buf.clear()
                return out
            frame = bytes(buf[:length])
            if crc16(frame[:-2]).to_bytes(2, "little") != frame[-2:]:
                del buf[:1]  # bad CRC: resynchronise byte by byte, answer nothing
                continue
            del buf[:length]
            unit, pdu = frame[0], frame[1:-2]
            if unit == 0:  # broadcast: apply writes everywhere, never answer
                for image in self.units.values():
                    handle_pdu(image, pdu)
                continue
            reply, data, delay_s = self._answer(unit, pdu, tcp=False)
            if reply is _Reply.SILENT:
                continue
            out.append((unit, reply, data, delay_s))

    # RTU on a serial device -------------------------------------------------------------------
    def _open_serial(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        try:
            tty.setraw(fd)
            attrs = termios.tcgetattr(fd)
            speed = self.line.termios_speed()
            if speed is not None:
                attrs[4] = attrs[5] = speed
            attrs[2] = self.line.termios_cflag(attrs[2]) | termios.CLOCAL | termios.CREAD
            try:
                termios.tcsetattr(fd, termios.TCSANOW, attrs)
            except termios.error:
                # Some kernels' ptys refuse PARENB (EINVAL). A pty has no wire, so parity means
                # nothing there: carry on without it rather than fail the simulation.
                attrs[2] &= ~(termios.PARENB | termios.PARODD)
                termios.tcsetattr(fd, termios.TCSANOW, attrs)
                log.warning(
                    "sim_serial_parity_unsupported", path=self.path, parity=self.line.parity
                )
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        if self.line_peer is not None:
            # Held open for the server's life: closing a pty slave's last descriptor hangs up
            # the pair. Its termios are the tty's, shared with the client's descriptor.
            self._peer_fd = os.open(self.line_peer, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        asyncio.get_running_loop().add_reader(fd, self._on_serial_readable)

    def _client_speed_matches(self) -> bool:
        if self._peer_fd is None:
            return True
        want = self.line.termios_speed()
        attrs = termios.tcgetattr(self._peer_fd)
        return want is None or attrs[5] == want  # ospeed: what the client sends at

    def _on_serial_readable(self) -> None:
        if self._fd is None:
            return
        try:
            chunk = os.read(self._fd, 512)
        except BlockingIOError:
            return
        except OSError as exc:  # EIO: the other end of the pty is not open right now
            if exc.errno == 5:
                return
            raise
        if not chunk:
            return
        if not self._client_speed_matches():
            self.wrong_speed_frames += 1
            self._rtu_buf.clear()  # characters at another baud rate: noise, never a frame
            return
        self._rtu_buf += chunk
        # A partial frame followed by silence is noise: forget it (the t3.5 rule, loosely).
        if self._rtu_resync is not None:
            self._rtu_resync.cancel()
        loop = asyncio.get_running_loop()
        for unit, reply, data, delay_s in self._rtu_frames(self._rtu_buf):
            out = data if reply is _Reply.GARBAGE else _rtu_frame(unit, data)
            if reply is _Reply.DROP:
                continue  # nothing to hang up on a serial line: silence
            if delay_s:
                loop.call_later(delay_s, self._serial_write, out)
            else:
                self._serial_write(out)
        if self._rtu_buf:
            self._rtu_resync = loop.call_later(0.5, self._rtu_buf.clear)

    def _serial_write(self, data: bytes) -> None:
        if self._fd is None:
            return
        try:
            os.write(self._fd, data)
        except OSError as exc:  # the reader went away; the request is lost like on a real line
            log.debug("sim_serial_write_failed", path=self.path, error=str(exc))
