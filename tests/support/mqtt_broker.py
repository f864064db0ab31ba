"""Test helpers: a real mosquitto per test, a test PKI, and a TCP fault proxy.

- ``MosquittoBroker``: ``/usr/sbin/mosquitto`` on a free 127.0.0.1 port with a temp config,
  persistence on (a restarted broker keeps persistent sessions and queued messages), optional
  TLS listener. ``await start()``, ``await stop()`` (SIGTERM: saves state), ``kill()`` (SIGKILL),
  ``await restart()``; the port stays the same across restarts.
- ``make_pki(dir)``: a CA, a server certificate for 127.0.0.1/localhost and a client
  certificate, generated with ``cryptography`` at test time.
- ``FaultProxy``: forwards TCP to a target and on demand drops every connection (FIN), resets
  them (RST), stalls (stops forwarding without closing), throttles bandwidth, refuses new
  connections, half-opens them (the broker side gone, the client side open and silent), or plays
  a 3.1.1-only broker refusing MQTT 5 CONNECTs.

Fixtures: ``mosquitto``, ``fault_proxy`` (in front of ``mosquitto``), ``test_pki``;
tests/conftest.py loads this module as a plugin, so every test file has them.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import getpass
import ipaddress
import os
import signal
import socket
import struct
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = [
    "FaultProxy",
    "MosquittoBroker",
    "Pki",
    "fault_proxy",
    "free_port",
    "make_pki",
    "mosquitto",
    "test_pki",
]

MOSQUITTO = "/usr/sbin/mosquitto"
HOST = "127.0.0.1"


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port nothing listens on, never one this process handed out before: the kernel may give
    two probes in a row the same port (the first was free again once closed), and a site with
    two devices on one port fails to load (seen in CI: "unit 255 at ... is already used")."""
    while True:
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


async def wait_port(port: int, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            _, writer = await asyncio.open_connection(HOST, port)
        except OSError:
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"nothing listens on {HOST}:{port}") from None
            await asyncio.sleep(0.02)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return


# ---------------------------------------------------------------------------------- PKI


@dataclass(frozen=True)
class Pki:
    ca_file: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    other_ca_file: str  # a CA that signed nothing of the above: a client trusting it must refuse


def make_pki(directory: Path) -> Pki:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> str:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return str(path)

    def write_cert(cert: x509.Certificate, path: Path) -> str:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return str(path)

    def ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(name(cn))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return key, cert

    def leaf(
        ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, cn: str, server: bool
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]
                ),
                critical=False,
            )
        return key, builder.sign(ca_key, hashes.SHA256())

    ca_key, ca_cert = ca("evgw test CA")
    _, other_cert = ca("evgw other CA")
    s_key, s_cert = leaf(ca_key, ca_cert, "localhost", server=True)
    c_key, c_cert = leaf(ca_key, ca_cert, "evgw-client", server=False)
    return Pki(
        ca_file=write_cert(ca_cert, directory / "ca.pem"),
        server_cert=write_cert(s_cert, directory / "server.pem"),
        server_key=write_key(s_key, directory / "server.key"),
        client_cert=write_cert(c_cert, directory / "client.pem"),
        client_key=write_key(c_key, directory / "client.key"),
        other_ca_file=write_cert(other_cert, directory / "other-ca.pem"),
    )


# ---------------------------------------------------------------------------------- broker


class MosquittoBroker:
    """One mosquitto process; the same ports and persistence directory across restarts."""

    def __init__(
        self,
        directory: Path,
        *,
        pki: Pki | None = None,
        require_client_cert: bool = False,
        extra_config: str = "",
        allow_anonymous: bool = True,
    ) -> None:
        self.allow_anonymous = allow_anonymous
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.tls_port = free_port() if pki is not None else None
        self.pki = pki
        self.require_client_cert = require_client_cert
        self.extra_config = extra_config
        self.process: subprocess.Popen[bytes] | None = None
        self.config_path = directory / "mosquitto.conf"
        self.log_path = directory / "mosquitto.log"

    @property
    def host(self) -> str:
        return HOST

    @property
    def url(self) -> str:
        return f"mqtt://{HOST}:{self.port}"

    @property
    def tls_url(self) -> str:
        if self.tls_port is None:
            raise RuntimeError("broker started without TLS")
        return f"mqtts://{HOST}:{self.tls_port}"

    def _write_config(self) -> None:
        lines = [
            # started as root, mosquitto would switch to user "mosquitto", which can read neither
            # the temp key files nor write the persistence directory
            f"user {getpass.getuser()}",
            "per_listener_settings false",
            f"allow_anonymous {'true' if self.allow_anonymous else 'false'}",
            "persistence true",
            f"persistence_location {self.directory}/",
            "persistence_file mosquitto.db",
            "autosave_interval 1",
            "max_queued_messages 0",  # no cap: a test subscriber may be offline for a while
            "max_inflight_messages 100",
            "set_tcp_nodelay true",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            f"listener {self.port} {HOST}",
        ]
        if self.pki is not None:
            lines += [
                f"listener {self.tls_port} {HOST}",
                f"cafile {self.pki.ca_file}",
                f"certfile {self.pki.server_cert}",
                f"keyfile {self.pki.server_key}",
                f"require_certificate {'true' if self.require_client_cert else 'false'}",
            ]
        self.config_path.write_text("\n".join(lines) + "\n" + self.extra_config + "\n")

    def _spawn(self) -> None:
        self._write_config()
        self.process = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.config_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    async def start(self) -> None:
        if self.running:
            return
        self._spawn()
        try:
            await wait_port(self.port)
            if self.tls_port is not None:
                await wait_port(self.tls_port)
        except TimeoutError:
            self.kill()
            raise RuntimeError(f"mosquitto did not start: {self.log_tail()}") from None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    async def stop(self) -> None:
        """Graceful stop (SIGTERM): mosquitto saves sessions and queued messages."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            for _ in range(500):
                if self.process.poll() is not None:
                    break
                await asyncio.sleep(0.01)
            else:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        """Crash (SIGKILL): state since the last autosave (1 s) is lost."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        self.process.wait()
        self.process = None

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        except OSError:
            return ""


# ---------------------------------------------------------------------------------- proxy


class FaultProxy:
    """TCP forwarder to ``target_port`` with fault switches (all take effect at once)."""

    def __init__(self, target_port: int, target_host: str = HOST) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self.bytes_per_s: float | None = None
        self.refusing = False
        self.v311_only = False
        self._held: set[asyncio.StreamWriter] = set()
        self._released = asyncio.Event()
        self._released.set()
        self.connections = 0
        self.bytes_forwarded = 0

    @property
    def url(self) -> str:
        return f"mqtt://{HOST}:{self.port}"

    def _spawn(self) -> None:
        self._write_config()
        self.process = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.config_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, HOST, self.port or 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self._released.set()
        self.drop_all()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._server is not None:
            await self._server.wait_closed()

    # fault switches
    def drop_all(self) -> None:
        """Close every open connection (FIN both ways)."""
        for client, server in list(self._links):
            client.close()
            server.close()
        self._links.clear()

    def reset_all(self) -> None:
        """Abort every open connection with RST."""
        for client, server in list(self._links):
            for writer in (client, server):
                sock = writer.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
                writer.transport.abort()
        self._links.clear()

    def half_open(self, on: bool = True) -> None:
        """The broker side of every open connection goes away while the client's side stays open
        and silent (a NAT or firewall that forgot the flow): the client can learn it only from its
        keepalive. ``half_open(False)`` finally closes the held client sides."""
        if not on:
            self._released.set()
            return
        self._released.clear()
        for client, server in list(self._links):
            self._held.add(client)
            server.transport.abort()

    def stall(self, on: bool = True) -> None:
        """Stop forwarding in both directions without closing anything (a dead link)."""
        if on:
            self._flowing.clear()
        else:
            self._flowing.set()

    def throttle(self, bytes_per_s: float | None) -> None:
        self.bytes_per_s = bytes_per_s

    def refuse(self, on: bool = True) -> None:
        """Close new connections at once (the broker's host is unreachable)."""
        self.refusing = on

    @property
    def open_connections(self) -> int:
        return len(self._links)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            if self.refusing:
                writer.close()
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.target)
            except OSError:
                writer.close()
                return
            self.connections += 1
            link = (writer, up_writer)
            self._links.add(link)
            first = True

            async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, up: bool) -> None:
                nonlocal first
                while True:
                    data = await src.read(65536)
                    if not data:
                        break
                    if up and first:
                        first = False
                        if self.v311_only and _connect_level(data) == 5:
                            writer.write(b"\x20\x02\x00\x01")  # CONNACK: unacceptable protocol
                            await writer.drain()
                            break
                    await self._flowing.wait()
                    rate = self.bytes_per_s  # may be switched off while a chunk waits
                    if rate:
                        for i in range(0, len(data), 1024):
                            chunk = data[i : i + 1024]
                            dst.write(chunk)
                            await dst.drain()
                            await asyncio.sleep(len(chunk) / rate)
                            await self._flowing.wait()
                    else:
                        dst.write(data)
                        await dst.drain()
                    self.bytes_forwarded += len(data)

            try:
                async with asyncio.TaskGroup() as tg:
                    a = tg.create_task(pump(reader, up_writer, True))
                    b = tg.create_task(pump(up_reader, writer, False))
                    await asyncio.wait({a, b}, return_when=asyncio.FIRST_COMPLETED)
                    for t in (a, b):
                        t.cancel()
            except* (OSError, ConnectionError):
                pass
            finally:
                self._links.discard(link)
                up_writer.close()
                if writer in self._held:
                    await self._released.wait()
                    self._held.discard(writer)
                writer.close()
        finally:
            self._tasks.discard(task)


def _connect_level(data: bytes) -> int | None:
    """Protocol level of an MQTT CONNECT packet at the start of ``data``."""
    if not data or data[0] >> 4 != 1:
        return None
    i = 1
    while i < len(data) and data[i] & 0x80:
        i += 1
    i += 1
    if len(data) < i + 7:
        return None
    name_len = int.from_bytes(data[i : i + 2], "big")
    level_at = i + 2 + name_len
    return data[level_at] if level_at < len(data) else None


# ---------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def test_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
async def mosquitto(tmp_path: Path) -> AsyncIterator[MosquittoBroker]:
    if not os.access(MOSQUITTO, os.X_OK):
        pytest.skip(f"{MOSQUITTO} is not installed")
    broker = MosquittoBroker(tmp_path / "mosquitto")
    await broker.start()
    try:
        yield broker
    finally:
        broker.kill()


@pytest.fixture
async def fault_proxy(mosquitto: MosquittoBroker) -> AsyncIterator[FaultProxy]:
    proxy = FaultProxy(mosquitto.port)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()
