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

Its parts: ``admission`` (the handshake's checks), ``link`` (one charge point's connection and
the library's routing), ``clocks`` (each charger's clock offset), ``transactions`` (transaction
ids, replays and the session manager's calls), ``mapping`` (OCPP values to ours).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog
from ocpp.v16 import call
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from gateway.config import DeviceConfig, OcppConfig
from gateway.errors import CommandError, DeviceError
from gateway.model import (
    AuthSource,
    AuthStatus,
    ChargerStatus,
    Clock,
    DeviceSample,
    Flag,
    SystemClock,
)
from gateway.ocpp.admission import SUBPROTOCOL, charge_point_id, check_request, peer
from gateway.ocpp.clocks import ChargePointClocks
from gateway.ocpp.link import WIRE_LOG, ChargePointLink
from gateway.ocpp.mapping import (
    id_tag_status,
    parse_meter_values,
    status_of,
    timestamp,
)
from gateway.ocpp.transactions import TransactionBook, TransactionSink
from gateway.ports import KeyValueStore
from gateway.sessions import Grant, TransactionStart

__all__ = ["AuthorizerPort", "OcppServer"]

log = structlog.get_logger(__name__)

PROFILE_ID_BASE = 1000  # our TxDefaultProfile per connector: id 1000 + connector, stack level 0
REMOTE_START_TIMEOUT_S = 120.0  # a remote start waits this long for the StartTransaction
UNIQUE_IDS_KEPT = 512  # answers remembered per charge point for resent calls
# No AC session delivers more (22 kW for 9 hours): a MeterValues register further from
# meterStart than this is another register (lifetime vs per session), not this transaction's.
MAX_SESSION_WH = 200_000.0
ABANDON_AFTER_S = 900.0  # Available this long while connected, no StopTransaction: estimated end

# websockets logs every handshake header at DEBUG, the charger's Authorization (its password)
# among them: never below INFO, whatever the gateway's log level.
_ws_logger = logging.getLogger("gateway.ocpp.websockets")
_ws_logger.setLevel(logging.INFO)


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
        self._authorizer = authorizer
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
        self._links: dict[str, ChargePointLink] = {}
        self._clocks = ChargePointClocks(self._clock)
        self._tx = TransactionBook(sessions, store, self._clocks, self._clock.time)
        self._idle_since: dict[str, float] = {}  # device -> monotonic time it showed no EV
        self.abandon_after_s = ABANDON_AFTER_S
        self._answers: dict[str, OrderedDict[str, str]] = {}
        self._server: Server | None = None

    # ------------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> OcppServer:
        if not logging.getLogger().isEnabledFor(logging.DEBUG):
            WIRE_LOG.setLevel(logging.WARNING)  # the library logs every frame at INFO
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
            process_request=functools.partial(check_request, self.config, self._charge_points),
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
            await self._tx.end_abandoned(device_id)

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
    async def _serve_link(self, ws: ServerConnection) -> None:
        cp_id = charge_point_id(ws.request.path) if ws.request else ""
        if ws.subprotocol != SUBPROTOCOL:  # websockets refuses a client offering none of ours
            await ws.close(1002, "ocpp1.6 only")
            return
        old = self._links.get(cp_id)
        link = ChargePointLink(cp_id, ws, self, self._tx)
        self._clocks.forget(cp_id)  # measured anew on every connection
        self._links[cp_id] = link
        if old is not None:
            log.warning("ocpp_replaced_connection", charge_point_id=cp_id)
            await old.ws.close(1000, "replaced by a new connection")
        log.info("ocpp_connected", charge_point_id=cp_id, peer=peer(ws))
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
    def now(self) -> float:
        return self._clock.time()

    def observe_clock(self, cp_id: str, text: str | None) -> None:
        self._clocks.observe(cp_id, text)

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
    async def start_transaction(
        self, cp_id: str, connector_id: int, id_tag: str, meter_start: int, ts_text: str
    ) -> tuple[int, dict[str, Any]]:
        key = self._tx.start_key(cp_id, connector_id, id_tag, meter_start, ts_text)
        seen = await self._tx.start_seen(key)
        if seen is None:  # authorized outside the lock: a slow cloud answer holds up no one
            status, grant, expires = await self.authorize(cp_id, connector_id, id_tag)
        async with self._tx.lock:
            seen = await self._tx.start_seen(key)
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
                session_id = self._tx.open_session(cp_id, transaction_id)
                if session_id is not None:
                    await self._tx.started(key, cp_id, transaction_id, info, session_id)
                    return transaction_id, info
                status, grant, _ = await self.authorize(cp_id, connector_id, id_tag)
            else:
                info = {"status": id_tag_status(status)}
                if expires is not None:
                    info["expiryDate"] = timestamp(expires)
                transaction_id = await self._tx.give_out(key, info)
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
            if self._clocks.skew_s(cp_id):
                attrs["clock_skew_s"] = round(self._clocks.skew_s(cp_id), 1)
            session_id = await self._tx.sessions.begin_transaction(
                TransactionStart(
                    conn.device.id,
                    grant,
                    self._clocks.event_time(ts_text, cp_id),
                    float(meter_start),
                    attrs,
                )
            )
            await self._tx.started(key, cp_id, transaction_id, info, session_id)
        return transaction_id, info

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
        await self._tx.meter_values(
            cp_id, conn.device.id if conn is not None else None, transaction_id, samples
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

    def _link_of(self, device_id: str) -> tuple[_Connector, ChargePointLink]:
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
        # The idTag the charger will report in StartTransaction (20 characters at most).
        id_tag = (token or (known.id if known is not None else user))[:20]
        grant = Grant.remote(user, token, known, now, tag=id_tag)
        if self._tx.connector_session(device_id) is not None:
            raise CommandError("busy", f"charger {device_id} has a session")
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
        state = self._tx.connector_session(device_id)
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
