"""The OCPP-J 1.6 server ("central system" for the site's OCPP chargers).

Charge points connect to ``ws://HOST:PORT/{charge_point_id}`` with subprotocol ``ocpp1.6``.
Everything they report goes into the gateway's own domain, never a parallel one:

* BootNotification, Heartbeat, StatusNotification and MeterValues become ``DeviceSample``s (the
  live status topic, readings, load management);
* Authorize and StartTransaction's idTag go through the site's ``Authorizer``;
* StartTransaction / MeterValues / StopTransaction (with transactionData) open, feed and close
  a session in the ``SessionManager`` (same guards, tariffs, records, uplink); the session keeps
  its UUIDv7 and carries the OCPP transactionId in its ``ocpp`` attribute.

Messages may arrive twice (a charger resends a call whose answer it lost, or replays its queue
after an outage): a call whose uniqueId was answered is answered again with the same result;
a StartTransaction already seen (same connector, idTag, timestamp and meterStart) gets the same
transactionId; a StopTransaction for a finished transaction is acknowledged and changes nothing.

Towards the chargers it is a ``ChargerControl`` (current limits as SetChargingProfile with
purpose TxDefaultProfile) and the target of cloud start/stop (RemoteStart/RemoteStopTransaction),
availability and reset commands.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import ssl
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Protocol

import structlog
from ocpp.routing import on
from ocpp.v16 import ChargePoint as _OcppChargePoint
from ocpp.v16 import call, call_result
from ocpp.v16.enums import Action
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from gateway.config import DeviceConfig, OcppConfig
from gateway.errors import CommandError, DeviceError
from gateway.model import (
    AuthSource,
    AuthStatus,
    ChargerStatus,
    Clock,
    DeviceSample,
    Flag,
    StopReason,
    SystemClock,
)
from gateway.ocpp.mapping import (
    id_tag_status,
    parse_meter_values,
    parse_timestamp,
    signed_documents,
    status_of,
    stop_reason_of,
    timestamp,
)
from gateway.sessions import Grant

__all__ = ["SUBPROTOCOL", "OcppServer", "TransactionSink"]

log = structlog.get_logger(__name__)

SUBPROTOCOL = Subprotocol("ocpp1.6")
PROFILE_ID_BASE = 1000  # our TxDefaultProfile per connector: id 1000 + connector, stack level 0
REMOTE_START_TIMEOUT_S = 120.0  # a remote start waits this long for the StartTransaction
UNIQUE_IDS_KEPT = 512  # answers remembered per charge point for resent calls
FUTURE_SLACK_S = 5.0  # a charger's timestamp ahead of ours by more is its clock, not the event
# No AC session delivers more (22 kW for 9 hours): a MeterValues register further from
# meterStart than this is another register (lifetime vs per session), not this transaction's.
MAX_SESSION_WH = 200_000.0
SKEW_TOLERANCE_S = 2.0  # clock offsets up to this are latency and jitter: not corrected
ABANDON_AFTER_S = 900.0  # Available this long while connected, no StopTransaction: estimated end

# The library logs every frame at INFO; frames are ours to log (without secrets, at debug).
_wire_logger = logging.getLogger("gateway.ocpp.wire")
# websockets logs every handshake header at DEBUG, the charger's Authorization (its password)
# among them: never below INFO, whatever the gateway's log level.
_ws_logger = logging.getLogger("gateway.ocpp.websockets")
_ws_logger.setLevel(logging.INFO)


class TransactionSink(Protocol):
    """What the server needs of the session manager (gateway.sessions.SessionManager)."""

    async def begin_transaction(
        self,
        charger_id: str,
        grant: Grant,
        ts: float,
        meter_start_wh: float,
        ocpp: Mapping[str, Any],
    ) -> str: ...

    async def transaction_meter(
        self, session_id: str, ts: float, energy_wh: float, power_w: float | None = None
    ) -> None: ...

    async def end_transaction(
        self,
        session_id: str,
        ts: float,
        meter_stop_wh: float,
        reason: StopReason,
        ocpp: Mapping[str, Any] | None = None,
        *,
        estimated: bool = False,
    ) -> bool: ...

    def open_sessions(self) -> list[dict[str, Any]]: ...


class KeyValueStore(Protocol):
    async def kv_get(self, key: str, default: Any = None) -> Any: ...

    async def kv_put(self, key: str, value: Any) -> None: ...


class AuthorizerPort(Protocol):
    async def authorize(self, token_id: str, token_type: str, charger_id: str) -> Any: ...

    def lookup_user(self, user: str) -> Any: ...


@dataclass(slots=True)
class _Connector:
    device: DeviceConfig
    status: ChargerStatus | None = None
    error_code: str | None = None
    values: dict[str, float] = field(default_factory=dict)
    remote: tuple[str, Grant, float] | None = None  # (idTag, grant, monotonic deadline)


class OcppServer:
    """``async with OcppServer(...) as server: await server.run()``."""

    def __init__(
        self,
        config: OcppConfig,
        devices: Sequence[DeviceConfig],
        sessions: TransactionSink,
        authorizer: AuthorizerPort,
        store: KeyValueStore,
        on_sample: Callable[[DeviceSample], Awaitable[None] | None],
        clock: Clock | None = None,
    ) -> None:
        self.config = config
        self._sessions = sessions
        self._authorizer = authorizer
        self._store = store
        self._on_sample = on_sample
        self._clock = clock or SystemClock()
        self._connectors: dict[tuple[str, int], _Connector] = {}
        self._by_device: dict[str, _Connector] = {}
        for dev in devices:
            assert dev.charge_point_id is not None
            conn = _Connector(dev)
            self._connectors[(dev.charge_point_id, dev.connector)] = conn
            self._by_device[dev.id] = conn
        self._charge_points = {cp for cp, _ in self._connectors}
        self._links: dict[str, _Link] = {}
        self._skew: dict[str, float] = {}  # charge point -> its clock minus ours, seconds
        self._idle_since: dict[str, float] = {}  # device -> monotonic time it showed no EV
        self.abandon_after_s = ABANDON_AFTER_S
        self._answers: dict[str, OrderedDict[str, str]] = {}
        self._tx_lock = asyncio.Lock()
        self._server: Server | None = None

    # ------------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> OcppServer:
        if not logging.getLogger().isEnabledFor(logging.DEBUG):
            _wire_logger.setLevel(logging.WARNING)  # the library logs every frame at INFO
        ssl_ctx = None
        if self.config.security_profile == 2:
            ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            assert self.config.cert_file and self.config.key_file
            ssl_ctx.load_cert_chain(self.config.cert_file, self.config.key_file)
        self._server = await serve(
            self._serve_link,
            self.config.host,
            self.config.port,
            subprotocols=[SUBPROTOCOL],
            process_request=self._check_request,
            ssl=ssl_ctx,
            ping_interval=60,
            ping_timeout=60,
            logger=_ws_logger,
        )
        log.info(
            "ocpp_listening",
            listen=self.config.listen,
            security_profile=self.config.security_profile,
            charge_points=sorted(self._charge_points),
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def run(self) -> None:
        """Close abandoned transactions until cancelled (the server itself runs from
        ``__aenter__``)."""
        while True:
            await asyncio.sleep(min(60.0, self.abandon_after_s / 4))
            await self.close_abandoned()

    async def close_abandoned(self) -> None:
        """A connector that has shown no EV (Available) for ``abandon_after_s`` while its
        charger was connected, yet never sent the StopTransaction of its open transaction (a
        charger that lost its queue, e.g. in a power cut): its session is closed at its last
        activity with the last reading, flagged ``end_estimated``. Chargers send their queued
        messages right after connecting, so this waits long enough to never race them."""
        now = self._clock.monotonic()
        for device_id, since in list(self._idle_since.items()):
            conn = self._by_device[device_id]
            if now - since < self.abandon_after_s or conn.device.charge_point_id not in self._links:
                continue
            del self._idle_since[device_id]
            async with self._tx_lock:
                state = self._connector_session(device_id)
                if state is None:
                    continue
                ocpp = dict(state.get("ocpp") or {})
                cp_id, transaction_id = str(ocpp.get("charge_point_id")), ocpp.get("transaction_id")
                log.warning(
                    "ocpp_transaction_abandoned",
                    charge_point_id=cp_id,
                    transaction_id=transaction_id,
                    session_id=state["session_id"],
                )
                last_wh = state.get("last_wh")
                await self._sessions.end_transaction(
                    str(state["session_id"]),
                    float(state.get("last_activity_ts") or state["started_at"]),
                    float(last_wh if last_wh is not None else state.get("meter_start_wh") or 0),
                    StopReason.UNKNOWN,
                    estimated=True,
                )
                await self._store.kv_put(
                    f"ocpp.tx/{cp_id}/{transaction_id}",
                    {"session_id": state["session_id"], "open": False, "estimated": True},
                )

    @property
    def listening(self) -> bool:
        return self._server is not None

    @property
    def port(self) -> int:
        """The port actually bound (``listen`` may say 0 in tests)."""
        assert self._server is not None
        for sock in self._server.sockets:
            return int(sock.getsockname()[1])
        raise RuntimeError("the OCPP server is not listening")

    def handles(self, device_id: str) -> bool:
        return device_id in self._by_device

    def connected(self, device_id: str) -> bool:
        conn = self._by_device.get(device_id)
        return conn is not None and conn.device.charge_point_id in self._links

    # ------------------------------------------------------------------ handshake
    def _check_request(self, connection: ServerConnection, request: Request) -> Response | None:
        cp_id = _charge_point_id(request.path)
        peer = _peer(connection)
        offered = request.headers.get("Sec-WebSocket-Protocol", "")
        if SUBPROTOCOL not in [p.strip() for p in offered.split(",")]:
            # OCPP-J 1.6 section 3.1.2: the version is named in Sec-WebSocket-Protocol.
            log.warning(
                "ocpp_no_subprotocol",
                charge_point_id=cp_id[:64],
                offered=offered[:64] or None,
                peer=peer,
            )
            return connection.respond(HTTPStatus.BAD_REQUEST, "subprotocol ocpp1.6 needed\n")
        if cp_id not in self._charge_points:
            log.warning("ocpp_unknown_charge_point", charge_point_id=cp_id[:64], peer=peer)
            return connection.respond(HTTPStatus.NOT_FOUND, "unknown charge point\n")
        if self.config.security_profile >= 1 and not self._password_ok(cp_id, request.headers):
            log.warning("ocpp_auth_failed", charge_point_id=cp_id, peer=peer)
            response = connection.respond(HTTPStatus.UNAUTHORIZED, "unauthorized\n")
            response.headers["WWW-Authenticate"] = 'Basic realm="ocpp"'
            return response
        return None

    def _password_ok(self, cp_id: str, headers: Headers) -> bool:
        """HTTP basic auth with the charge point id as user. The 1.6 security whitepaper's
        AuthorizationKey is 16-20 bytes, possibly not text: a password file entry
        ``hex:...`` gives those bytes; the hex text itself is accepted too (some chargers
        send the key as configured instead of decoded)."""
        expected = self.config.passwords.get(cp_id)
        header = headers.get("Authorization", "")
        if expected is None or not header.startswith("Basic "):
            return False
        try:
            credentials = base64.b64decode(header[6:].strip(), validate=True)
        except ValueError:
            return False
        user, _, password = credentials.partition(b":")
        secret = expected.reveal()
        accepted = [secret.encode()]
        if secret.startswith("hex:"):
            try:
                accepted = [bytes.fromhex(secret[4:]), secret[4:].encode()]
            except ValueError:
                return False
        good = False
        for candidate in accepted:  # compared with each, in constant time
            good |= hmac.compare_digest(password, candidate)
        return user == cp_id.encode() and good

    async def _serve_link(self, ws: ServerConnection) -> None:
        cp_id = _charge_point_id(ws.request.path) if ws.request else ""
        if ws.subprotocol != SUBPROTOCOL:  # websockets refuses a client offering none of ours
            await ws.close(1002, "ocpp1.6 only")
            return
        old = self._links.get(cp_id)
        link = _Link(cp_id, ws, self)
        self._skew.pop(cp_id, None)  # measured anew on every connection
        self._links[cp_id] = link
        if old is not None:
            log.warning("ocpp_replaced_connection", charge_point_id=cp_id)
            await old.ws.close(1000, "replaced by a new connection")
        log.info("ocpp_connected", charge_point_id=cp_id, peer=_peer(ws))
        await self._emit_all(cp_id, online=True)
        try:
            await link.start()
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd else None
            log.info("ocpp_disconnected", charge_point_id=cp_id, code=code)
        finally:
            if self._links.get(cp_id) is link:
                del self._links[cp_id]
                await self._emit_all(cp_id, online=False)

    # ------------------------------------------------------------------ samples
    async def _emit(self, conn: _Connector, *, online: bool = True) -> None:
        dev = conn.device
        if online:
            sample = DeviceSample(
                dev.id,
                self._clock.time(),
                True,
                dict(conn.values),
                status=conn.status,
                error=conn.error_code if conn.status is ChargerStatus.FAULTED else None,
            )
        else:
            sample = DeviceSample(dev.id, self._clock.time(), False, error="ocpp_disconnected")
        res = self._on_sample(sample)
        if res is not None:
            await res

    async def _emit_all(self, cp_id: str, *, online: bool) -> None:
        for (cp, _), conn in self._connectors.items():
            if cp == cp_id:
                await self._emit(conn, online=online)

    def connector(self, cp_id: str, connector_id: int) -> _Connector | None:
        return self._connectors.get((cp_id, connector_id))

    # ------------------------------------------------------------------ idempotence
    def answered(self, cp_id: str, unique_id: str) -> str | None:
        answers = self._answers.get(cp_id)
        return None if answers is None else answers.get(unique_id)

    def remember_answer(self, cp_id: str, unique_id: str, frame: str) -> None:
        answers = self._answers.setdefault(cp_id, OrderedDict())
        answers[unique_id] = frame
        while len(answers) > UNIQUE_IDS_KEPT:
            answers.popitem(last=False)

    # ------------------------------------------------------------------ time
    def observe_clock(self, cp_id: str, text: str | None) -> None:
        """A StatusNotification's timestamp, sent live (chargers do not queue them): its offset
        from our clock. The largest offset of a connection wins: a status a charger replays
        late would look like a clock running behind."""
        if not text:
            return
        try:
            skew = parse_timestamp(text) - self._clock.time()
        except ValueError:
            return
        before = self._skew.get(cp_id)
        if before is not None and skew <= before:
            return
        self._skew[cp_id] = skew
        if abs(skew) > SKEW_TOLERANCE_S and (before is None or abs(skew - before) > 1.0):
            log.warning("ocpp_clock_skew", charge_point_id=cp_id, skew_s=round(skew, 1))

    def clock_skew_s(self, cp_id: str) -> float:
        skew = self._skew.get(cp_id, 0.0)
        return skew if abs(skew) > SKEW_TOLERANCE_S else 0.0

    def event_time(self, text: str | None, cp_id: str | None = None) -> float:
        """A charger's timestamp on our clock (its measured skew taken off); never later than
        now (a clock running ahead), now when it is missing or unreadable."""
        now = self._clock.time()
        if not text:
            return now
        try:
            ts = parse_timestamp(text)
        except ValueError:
            log.warning("ocpp_bad_timestamp", value=text[:40])
            return now
        if cp_id is not None:
            ts -= self.clock_skew_s(cp_id)
        if ts > now + FUTURE_SLACK_S:
            log.warning("ocpp_clock_ahead", ahead_s=round(ts - now, 1))
            return now
        return ts

    # ------------------------------------------------------------------ authorization
    async def authorize(
        self, cp_id: str, connector_id: int | None, id_tag: str
    ) -> tuple[AuthStatus, Grant | None, float | None]:
        """(status, grant when accepted, expiry) for an idTag shown at a charge point."""
        conn = None
        if connector_id is not None:
            conn = self.connector(cp_id, connector_id)
        if conn is None:
            conn = next((c for (cp, _), c in self._connectors.items() if cp == cp_id), None)
        if conn is None:
            return AuthStatus.UNKNOWN, None, None
        remote = conn.remote
        if remote is not None and remote[0] == id_tag and self._clock.monotonic() < remote[2]:
            return AuthStatus.ACCEPTED, remote[1], None
        decision = await self._authorizer.authorize(id_tag, "rfid", conn.device.id)
        if not decision.accepted:
            return decision.status, None, None
        token = decision.token
        grant = Grant(
            user=decision.user,
            token=token.id if token is not None else id_tag,
            token_type=token.type.value if token is not None else "rfid",
            auth=decision.source,
            at=self._clock.time(),
            group=token.group if token is not None else None,
            flags=(Flag.OFFLINE_AUTHORIZED.value,) if decision.offline_unknown else (),
            tag=id_tag,
        )
        return decision.status, grant, token.expires_at if token is not None else None

    # ------------------------------------------------------------------ transactions
    def _open_session(self, cp_id: str, transaction_id: int) -> str | None:
        for state in self._sessions.open_sessions():
            ocpp = state.get("ocpp") or {}
            if (
                ocpp.get("charge_point_id") == cp_id
                and ocpp.get("transaction_id") == transaction_id
            ):
                return str(state["session_id"])
        return None

    async def start_transaction(
        self, cp_id: str, connector_id: int, id_tag: str, meter_start: int, ts_text: str
    ) -> tuple[int, dict[str, Any]]:
        key = (
            "ocpp.start/"
            + hashlib.sha256(
                json.dumps([cp_id, connector_id, id_tag, meter_start, ts_text]).encode()
            ).hexdigest()[:32]
        )
        seen = await self._store.kv_get(key)
        if seen is None:  # authorized outside the lock: a slow cloud answer holds up no one
            status, grant, expires = await self.authorize(cp_id, connector_id, id_tag)
        async with self._tx_lock:
            seen = await self._store.kv_get(key)
            conn = self.connector(cp_id, connector_id)
            if seen is not None:
                transaction_id, info = int(seen["transaction_id"]), dict(seen["id_tag_info"])
                if "session_id" in seen or conn is None:
                    log.info(
                        "ocpp_start_transaction_repeated",
                        charge_point_id=cp_id,
                        transaction_id=transaction_id,
                    )
                    return transaction_id, info
                # Given out, but the gateway stopped before the session was written (or
                # after, before this entry was completed): finish what was begun.
                session_id = self._open_session(cp_id, transaction_id)
                if session_id is not None:
                    await self._started(key, cp_id, transaction_id, info, session_id)
                    return transaction_id, info
                status, grant, _ = await self.authorize(cp_id, connector_id, id_tag)
            else:
                info = {"status": id_tag_status(status)}
                if expires is not None:
                    info["expiryDate"] = timestamp(expires)
                transaction_id = int(await self._store.kv_get("ocpp.next_transaction_id", 1))
                await self._store.kv_put("ocpp.next_transaction_id", transaction_id + 1)
                # Written before the session: a replay after a crash gets the same id.
                await self._store.kv_put(
                    key, {"transaction_id": transaction_id, "id_tag_info": info}
                )
            if conn is None:
                log.error(
                    "ocpp_unknown_connector",
                    charge_point_id=cp_id,
                    connector_id=connector_id,
                    transaction_id=transaction_id,
                )
                return transaction_id, info
            if grant is None:
                # The charger may deliver energy anyway (StopTransactionOnInvalidId false):
                # the transaction is recorded, without a user.
                log.warning(
                    "ocpp_start_refused_token",
                    charge_point_id=cp_id,
                    id_tag=id_tag,
                    status=status.value,
                )
                grant = Grant(
                    user=None,
                    token=id_tag,
                    token_type="rfid",
                    auth=AuthSource.LOCAL,
                    at=self._clock.time(),
                    flags=(Flag.UNIDENTIFIED.value,),
                    tag=id_tag,
                )
            conn.remote = None
            self._idle_since.pop(conn.device.id, None)  # a transaction: the EV is there
            attrs: dict[str, Any] = {
                "charge_point_id": cp_id,
                "connector_id": connector_id,
                "transaction_id": transaction_id,
                "id_tag": id_tag,
            }
            if self.clock_skew_s(cp_id):
                attrs["clock_skew_s"] = round(self.clock_skew_s(cp_id), 1)
            session_id = await self._sessions.begin_transaction(
                conn.device.id,
                grant,
                self.event_time(ts_text, cp_id),
                float(meter_start),
                attrs,
            )
            await self._started(key, cp_id, transaction_id, info, session_id)
        return transaction_id, info

    async def _started(
        self, key: str, cp_id: str, transaction_id: int, info: dict[str, Any], session_id: str
    ) -> None:
        await self._store.kv_put(
            key, {"transaction_id": transaction_id, "id_tag_info": info, "session_id": session_id}
        )
        await self._store.kv_put(
            f"ocpp.tx/{cp_id}/{transaction_id}", {"session_id": session_id, "open": True}
        )

    async def meter_values(
        self,
        cp_id: str,
        connector_id: int,
        transaction_id: int | None,
        entries: Sequence[Mapping[str, Any]],
    ) -> None:
        samples = parse_meter_values(entries)
        conn = self.connector(cp_id, connector_id)
        if conn is not None and samples:
            newest = samples[-1]
            conn.values.update(newest.values)
            await self._emit(conn)
        async with self._tx_lock:
            session_id = None
            if transaction_id is not None:
                session_id = self._open_session(cp_id, transaction_id)
                if session_id is None:
                    known = await self._store.kv_get(f"ocpp.tx/{cp_id}/{transaction_id}")
                    if known is not None:  # closing values sent after StopTransaction
                        log.info(
                            "ocpp_meter_values_after_stop",
                            charge_point_id=cp_id,
                            transaction_id=transaction_id,
                        )
                        return
            if session_id is None and conn is not None:
                # Clock-aligned values often come without transactionId, and some chargers
                # send a wrong one (0): they belong to the connector's running transaction.
                state = self._connector_session(conn.device.id)
                if state is not None:
                    session_id = str(state["session_id"])
                    transaction_id = int((state.get("ocpp") or {})["transaction_id"])
            if session_id is None or transaction_id is None:
                return
            await self._feed(cp_id, transaction_id, session_id, samples)

    def _connector_session(self, device_id: str) -> dict[str, Any] | None:
        return next(
            (s for s in self._sessions.open_sessions() if s.get("charger_id") == device_id), None
        )

    async def _feed(
        self, cp_id: str, transaction_id: int, session_id: str, samples: Sequence[Any]
    ) -> None:
        now = self._clock.time()
        skew = self.clock_skew_s(cp_id)
        state = next(
            (s for s in self._sessions.open_sessions() if s["session_id"] == session_id), {}
        )
        start_wh = state.get("meter_start_wh")
        last_ts = state.get("last_counter_ts")
        for sample in samples:
            if sample.energy_wh is None:
                continue
            ts = min(sample.ts - skew, now)
            if last_ts is not None and ts <= last_ts:
                continue  # replayed out of order (or the same instant): nothing new
            last_ts = ts
            if start_wh is not None and not 0 <= sample.energy_wh - start_wh <= MAX_SESSION_WH:
                # Some chargers count meterStart/meterStop per session from 0 and report their
                # lifetime register in MeterValues (or the other way round): not the register
                # of this transaction. Its energy comes from meterStop.
                log.warning(
                    "ocpp_meter_values_other_register",
                    charge_point_id=cp_id,
                    transaction_id=transaction_id,
                    meter_start_wh=start_wh,
                    value_wh=sample.energy_wh,
                )
                continue
            await self._sessions.transaction_meter(session_id, ts, sample.energy_wh, sample.power_w)
        docs = signed_documents(samples)
        if docs:
            key = f"ocpp.signed/{cp_id}/{transaction_id}"
            kept = dict(await self._store.kv_get(key, {}) or {})
            if "start" in docs and "start" not in kept:
                kept["start"] = docs["start"]
            if "stop" in docs:
                kept["stop"] = docs["stop"]
            await self._store.kv_put(key, kept)

    async def stop_transaction(
        self,
        cp_id: str,
        transaction_id: int,
        meter_stop: int,
        ts_text: str,
        reason: str | None,
        id_tag: str | None,
        transaction_data: Sequence[Mapping[str, Any]] | None,
    ) -> None:
        async with self._tx_lock:
            session_id = self._open_session(cp_id, transaction_id)
            if session_id is None:
                known = await self._store.kv_get(f"ocpp.tx/{cp_id}/{transaction_id}")
                if known is not None and known.get("estimated"):
                    log.error(  # the record is sealed: an operator must know the difference
                        "ocpp_stop_after_estimated_end",
                        charge_point_id=cp_id,
                        transaction_id=transaction_id,
                        session_id=known.get("session_id"),
                        meter_stop_wh=meter_stop,
                    )
                elif known is not None and not known.get("open", True):
                    log.info(
                        "ocpp_stop_transaction_repeated",
                        charge_point_id=cp_id,
                        transaction_id=transaction_id,
                    )
                else:
                    log.error(
                        "ocpp_stop_unknown_transaction",
                        charge_point_id=cp_id,
                        transaction_id=transaction_id,
                        meter_stop_wh=meter_stop,
                    )
                return
            samples = parse_meter_values(transaction_data or ())
            await self._feed(cp_id, transaction_id, session_id, samples)
            extra: dict[str, Any] = {}
            signed = await self._store.kv_get(f"ocpp.signed/{cp_id}/{transaction_id}")
            if signed:
                extra["signed_meter_values"] = dict(signed)
            if id_tag is not None:
                extra["stop_id_tag"] = id_tag
            await self._sessions.end_transaction(
                session_id,
                self.event_time(ts_text, cp_id),
                float(meter_stop),
                stop_reason_of(reason),
                extra,
            )
            await self._store.kv_put(
                f"ocpp.tx/{cp_id}/{transaction_id}", {"session_id": session_id, "open": False}
            )

    async def status_notification(
        self, cp_id: str, connector_id: int, status: str, error_code: str
    ) -> None:
        conn = self.connector(cp_id, connector_id)
        if conn is None:
            if connector_id != 0:
                log.warning(
                    "ocpp_unknown_connector", charge_point_id=cp_id, connector_id=connector_id
                )
            else:
                log.info("ocpp_charge_point_status", charge_point_id=cp_id, status=status)
            return
        mapped = status_of(status)
        if mapped is None:
            log.warning("ocpp_unknown_status", charge_point_id=cp_id, status=status[:32])
            return
        conn.status = mapped
        conn.error_code = None if error_code == "NoError" else error_code
        if mapped is ChargerStatus.AVAILABLE:
            self._idle_since.setdefault(conn.device.id, self._clock.monotonic())
        else:
            self._idle_since.pop(conn.device.id, None)
        if not mapped.plugged:
            conn.values.pop("power_w", None)
            for phase in ("l1", "l2", "l3"):
                conn.values.pop(f"current_{phase}_a", None)
        await self._emit(conn)

    # ------------------------------------------------------------------ ChargerControl
    def can_control(self, device_id: str) -> bool:
        return device_id in self._by_device

    async def set_enabled(self, device_id: str, enabled: bool) -> None:
        """Nothing to write: an OCPP charger starts on an accepted idTag and stops by
        RemoteStopTransaction (``remote_stop``)."""
        log.debug("ocpp_set_enabled_ignored", device_id=device_id, enabled=enabled)

    async def set_current_limit(self, device_id: str, current_a: float) -> None:
        conn, link = self._link_of(device_id)
        limit = round(max(0.0, current_a), 1)  # the 1.6 schema allows one decimal
        profile = {
            "chargingProfileId": PROFILE_ID_BASE + conn.device.connector,
            "stackLevel": 0,
            "chargingProfilePurpose": "TxDefaultProfile",
            "chargingProfileKind": "Relative",
            "chargingSchedule": {
                "chargingRateUnit": "A",
                "chargingSchedulePeriod": [{"startPeriod": 0, "limit": limit}],
            },
        }
        result = await link.request(
            device_id,
            call.SetChargingProfile(
                connector_id=conn.device.connector, cs_charging_profiles=profile
            ),
        )
        if result.status != "Accepted":
            raise DeviceError(device_id, "limit_rejected", f"SetChargingProfile {result.status}")
        log.debug("ocpp_limit_set", device_id=device_id, limit_a=limit)

    def _link_of(self, device_id: str) -> tuple[_Connector, _Link]:
        conn = self._by_device.get(device_id)
        if conn is None:
            raise DeviceError(device_id, "not_ocpp", "not an OCPP charger")
        link = self._links.get(str(conn.device.charge_point_id))
        if link is None:
            raise DeviceError(device_id, "offline", "the charge point is not connected")
        return conn, link

    # ------------------------------------------------------------------ commands
    async def _command_call(self, device_id: str, payload: Any) -> Any:
        try:
            _, link = self._link_of(device_id)
            return await link.request(device_id, payload)
        except DeviceError as exc:
            code = "charger_offline" if exc.reason in ("offline", "timeout") else "charger_error"
            raise CommandError(code, str(exc)) from None

    async def remote_start(self, device_id: str, user: str, token: str | None) -> dict[str, Any]:
        conn = self._by_device[device_id]
        now = self._clock.time()
        known = self._authorizer.lookup_user(user)
        if known is not None and known.status_at(now) is not AuthStatus.ACCEPTED:
            raise CommandError("not_authorized", f"user {user!r} is {known.status_at(now).value}")
        if any(s.get("charger_id") == device_id for s in self._sessions.open_sessions()):
            raise CommandError("busy", f"charger {device_id} has a session")
        # The idTag the charger will report in StartTransaction (20 characters at most).
        id_tag = (token or (known.id if known is not None else user))[:20]
        grant = Grant(
            user=user,
            token=token if token is not None else (known.id if known is not None else None),
            token_type="app" if token is not None or known is None else known.type.value,
            auth=AuthSource.REMOTE,
            at=now,
            group=known.group if known is not None else None,
            tag=id_tag,
        )
        conn.remote = (id_tag, grant, self._clock.monotonic() + REMOTE_START_TIMEOUT_S)
        result = await self._command_call(
            device_id,
            call.RemoteStartTransaction(id_tag=id_tag, connector_id=conn.device.connector),
        )
        if result.status != "Accepted":
            conn.remote = None
            raise CommandError("rejected", f"charge point answered {result.status}")
        return {"charger_id": device_id, "session_id": None, "started": False, "ocpp": "accepted"}

    async def remote_stop(self, device_id: str, session_id: str | None) -> dict[str, Any]:
        state = next(
            (s for s in self._sessions.open_sessions() if s.get("charger_id") == device_id), None
        )
        if state is None or (session_id is not None and state["session_id"] != session_id):
            raise CommandError("no_session", f"no open session {session_id or ''} on {device_id}")
        transaction_id = int((state.get("ocpp") or {})["transaction_id"])
        result = await self._command_call(
            device_id, call.RemoteStopTransaction(transaction_id=transaction_id)
        )
        if result.status != "Accepted":
            raise CommandError("rejected", f"charge point answered {result.status}")
        # The session ends with the charger's StopTransaction (exact meterStop).
        return {"charger_id": device_id, "session_id": state["session_id"], "stopped": True}

    async def change_availability(self, device_id: str, operative: bool) -> dict[str, Any]:
        conn = self._by_device[device_id]
        result = await self._command_call(
            device_id,
            call.ChangeAvailability(
                connector_id=conn.device.connector,
                type="Operative" if operative else "Inoperative",
            ),
        )
        if result.status == "Rejected":
            raise CommandError("rejected", "charge point answered Rejected")
        return {"charger_id": device_id, "status": str(result.status)}

    async def reset(self, device_id: str, hard: bool) -> dict[str, Any]:
        result = await self._command_call(device_id, call.Reset(type="Hard" if hard else "Soft"))
        if result.status != "Accepted":
            raise CommandError("rejected", f"charge point answered {result.status}")
        return {"charger_id": device_id, "status": str(result.status)}


def _charge_point_id(path: str) -> str:
    """The last path segment of ``/{charge_point_id}`` (a prefix path is allowed)."""
    from urllib.parse import unquote

    return unquote(path.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1])


def _peer(ws: ServerConnection) -> str | None:
    addr = ws.remote_address
    return f"{addr[0]}:{addr[1]}" if addr else None


class _Link(_OcppChargePoint):
    """One charge point's websocket: the library routes calls to the handlers below."""

    def __init__(self, cp_id: str, ws: ServerConnection, server: OcppServer) -> None:
        super().__init__(
            cp_id, ws, response_timeout=server.config.call_timeout_s, logger=_wire_logger
        )
        self.ws = ws
        self._srv = server

    async def route_message(self, raw_msg: str) -> None:
        unique_id = _call_id(raw_msg)
        if unique_id is not None:
            frame = self._srv.answered(self.id, unique_id)
            if frame is not None:
                log.info("ocpp_call_repeated", charge_point_id=self.id, unique_id=unique_id[:36])
                await self._connection.send(frame)
                return
        await super().route_message(raw_msg)

    async def _send(self, message: str) -> None:
        reply_id = _reply_id(message)
        if reply_id is not None:
            self._srv.remember_answer(self.id, reply_id, message)
        _wire_logger.debug("%s: send %s", self.id, message)
        await self._connection.send(message)

    async def request(self, device_id: str, payload: Any) -> Any:
        try:
            result = await self.call(payload, suppress=False)
        except TimeoutError:
            what = type(payload).__name__
            raise DeviceError(device_id, "timeout", f"no answer to {what}") from None
        except ConnectionClosed:
            raise DeviceError(device_id, "offline", "the charge point disconnected") from None
        except Exception as exc:  # a CallError from the charger
            raise DeviceError(device_id, "call_error", str(exc)[:200]) from None
        return result

    # ---- calls from the charge point
    @on(Action.boot_notification)
    async def on_boot_notification(
        self, charge_point_vendor: str, charge_point_model: str, **extra: Any
    ) -> call_result.BootNotification:
        log.info(
            "ocpp_boot",
            charge_point_id=self.id,
            vendor=charge_point_vendor,
            model=charge_point_model,
            firmware=extra.get("firmware_version"),
        )
        return call_result.BootNotification(
            current_time=timestamp(self._srv._clock.time()),
            interval=int(self._srv.config.heartbeat_interval_s),
            status="Accepted",
        )

    @on(Action.heartbeat)
    async def on_heartbeat(self) -> call_result.Heartbeat:
        return call_result.Heartbeat(current_time=timestamp(self._srv._clock.time()))

    @on(Action.status_notification)
    async def on_status_notification(
        self, connector_id: int, error_code: str, status: str, **extra: Any
    ) -> call_result.StatusNotification:
        self._srv.observe_clock(self.id, extra.get("timestamp"))
        await self._srv.status_notification(self.id, connector_id, status, error_code)
        return call_result.StatusNotification()

    @on(Action.authorize)
    async def on_authorize(self, id_tag: str) -> call_result.Authorize:
        status, _, expires = await self._srv.authorize(self.id, None, id_tag)
        info: dict[str, Any] = {"status": id_tag_status(status)}
        if expires is not None:
            info["expiryDate"] = timestamp(expires)
        return call_result.Authorize(id_tag_info=info)

    @on(Action.start_transaction)
    async def on_start_transaction(
        self, connector_id: int, id_tag: str, meter_start: int, timestamp: str, **extra: Any
    ) -> call_result.StartTransaction:
        transaction_id, info = await self._srv.start_transaction(
            self.id, connector_id, id_tag, meter_start, timestamp
        )
        return call_result.StartTransaction(transaction_id=transaction_id, id_tag_info=info)

    @on(Action.meter_values)
    async def on_meter_values(
        self, connector_id: int, meter_value: list[dict[str, Any]], **extra: Any
    ) -> call_result.MeterValues:
        await self._srv.meter_values(
            self.id, connector_id, extra.get("transaction_id"), _camel_entries(meter_value)
        )
        return call_result.MeterValues()

    @on(Action.stop_transaction)
    async def on_stop_transaction(
        self, meter_stop: int, timestamp: str, transaction_id: int, **extra: Any
    ) -> call_result.StopTransaction:
        await self._srv.stop_transaction(
            self.id,
            transaction_id,
            meter_stop,
            timestamp,
            extra.get("reason"),
            extra.get("id_tag"),
            _camel_entries(extra.get("transaction_data") or []),
        )
        if extra.get("id_tag") is not None:
            return call_result.StopTransaction(id_tag_info={"status": "Accepted"})
        return call_result.StopTransaction()

    @on(Action.data_transfer)
    async def on_data_transfer(self, vendor_id: str, **extra: Any) -> call_result.DataTransfer:
        log.info("ocpp_data_transfer", charge_point_id=self.id, vendor_id=vendor_id[:255])
        return call_result.DataTransfer(status="UnknownVendorId")

    @on(Action.firmware_status_notification)
    async def on_firmware_status(self, status: str) -> call_result.FirmwareStatusNotification:
        log.info("ocpp_firmware_status", charge_point_id=self.id, status=status)
        return call_result.FirmwareStatusNotification()

    @on(Action.diagnostics_status_notification)
    async def on_diagnostics_status(self, status: str) -> call_result.DiagnosticsStatusNotification:
        log.info("ocpp_diagnostics_status", charge_point_id=self.id, status=status)
        return call_result.DiagnosticsStatusNotification()


def _call_id(raw: str) -> str | None:
    """The uniqueId of a CALL frame ``[2, id, action, payload]``, else None."""
    try:
        msg = json.loads(raw)
    except ValueError:
        return None
    if isinstance(msg, list) and len(msg) == 4 and msg[0] == 2 and isinstance(msg[1], str):
        return msg[1]
    return None


def _reply_id(frame: str) -> str | None:
    """The uniqueId of a CALLRESULT or CALLERROR frame we send."""
    try:
        msg = json.loads(frame)
    except ValueError:
        return None
    if isinstance(msg, list) and msg and msg[0] in (3, 4) and isinstance(msg[1], str):
        return msg[1]
    return None


def _camel_entries(entries: list[Any]) -> list[dict[str, Any]]:
    """The library hands payloads over in snake_case; the mapping reads the wire's camelCase."""
    from ocpp.charge_point import snake_to_camel_case

    return [snake_to_camel_case(e) for e in entries if isinstance(e, dict)]
