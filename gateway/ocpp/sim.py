"""A simulated OCPP 1.6J charge point (one connector, an EV, an energy register), built on the
``ocpp`` package's client side, with the faults real ones show:

* the link drops mid-session (``disconnect``); transaction messages (StartTransaction,
  MeterValues of a transaction, StopTransaction with transactionData) are queued and replayed in
  order on ``connect``, with the transactionId of a start made offline filled in once the
  server has given it; status notifications are not queued (the current one is sent on connect);
* a clock that is off (``clock_skew_s``);
* the same call sent twice with the same uniqueId (``duplicate_next``), and meter values
  replayed newest first (``out_of_order``).

It answers RemoteStart/RemoteStopTransaction (starting or stopping its transaction),
SetChargingProfile (the limit caps its charging power), ChangeAvailability and Reset.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import ssl
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import structlog
from ocpp.routing import on
from ocpp.v16 import ChargePoint as _OcppChargePoint
from ocpp.v16 import call, call_result
from ocpp.v16.enums import Action
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from gateway.ocpp.mapping import timestamp

__all__ = ["SimChargePoint", "run_ev_cycles", "simulate_charge_points"]

log = structlog.get_logger(__name__)
_wire_logger = logging.getLogger("gateway.ocpp.sim.wire")  # every frame, at INFO: quiet
_wire_logger.setLevel(logging.WARNING)
_ws_logger = logging.getLogger("gateway.ocpp.sim.websockets")  # its headers carry the password
_ws_logger.setLevel(logging.INFO)

VOLTAGE_V = 230.0


@dataclass(slots=True)
class _Queued:
    unique_id: str
    action: str  # StartTransaction | MeterValues | StopTransaction
    fields: dict[str, Any]
    local_tx: int | None = None  # our placeholder id until the server gave one


@dataclass(slots=True)
class SimChargePoint:
    url: str  # ws://HOST:PORT (the charge point id is appended)
    cp_id: str
    password: str | None = None
    connector: int = 1
    meter_wh: float = 0.0
    phases: int = 3
    clock_skew_s: float = 0.0
    ssl_context: ssl.SSLContext | None = None
    vendor: str = "evgw"
    model: str = "sim-ac"
    # state
    status: str = "Available"
    transaction_id: int | None = None  # the server's id (or our negative placeholder offline)
    id_tag: str | None = None
    limit_a: float | None = None
    profiles: list[dict[str, Any]] = field(default_factory=list)
    availability: list[str] = field(default_factory=list)
    resets: list[str] = field(default_factory=list)
    answers: list[tuple[str, Any]] = field(default_factory=list)  # (action, result) sent
    duplicate_next: bool = False
    out_of_order: bool = False
    _queue: list[_Queued] = field(default_factory=list)
    _tx_map: dict[int, int] = field(default_factory=dict)  # placeholder -> server id
    _next_local: int = -1
    _client: _Client | None = None
    _ws: ClientConnection | None = None
    _recv: asyncio.Task[None] | None = None
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    # ----------------------------------------------------------------- link
    @property
    def online(self) -> bool:
        return self._client is not None

    def now(self) -> float:
        return time.time() + self.clock_skew_s

    async def connect(self, *, boot: bool = True) -> None:
        headers = {}
        if self.password is not None:
            token = base64.b64encode(f"{self.cp_id}:{self.password}".encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        ws = await connect(
            f"{self.url.rstrip('/')}/{self.cp_id}",
            subprotocols=[call_subprotocol()],
            additional_headers=headers,
            ssl=self.ssl_context,
            open_timeout=10,
            logger=_ws_logger,
        )
        self._ws = ws
        client = _Client(self.cp_id, ws, self)
        self._recv = asyncio.get_running_loop().create_task(
            self._receive(client), name=f"sim-ocpp-{self.cp_id}"
        )
        self._client = client
        if boot:
            await self._call(
                call.BootNotification(
                    charge_point_model=self.model, charge_point_vendor=self.vendor
                )
            )
        await self._send_status()
        await self.flush()

    async def _receive(self, client: _Client) -> None:
        with contextlib.suppress(ConnectionClosed):
            await client.start()
        if self._client is client:
            self._client = None

    async def disconnect(self) -> None:
        """Drop the link (as a lost network does): nothing more is sent until ``connect``."""
        ws, recv = self._ws, self._recv
        self._client = self._ws = self._recv = None
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.close()
        if recv is not None:
            recv.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await recv

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await self.disconnect()

    async def __aenter__(self) -> SimChargePoint:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ----------------------------------------------------------------- sending
    async def _call(self, payload: Any, unique_id: str | None = None) -> Any:
        client = self._client
        if client is None:
            raise ConnectionError("offline")
        result = await client.call(payload, unique_id=unique_id)
        self.answers.append((type(payload).__name__, result))
        return result

    async def _send_status(self, error_code: str = "NoError") -> None:
        if self._client is None:
            return
        await self._call(
            call.StatusNotification(
                connector_id=self.connector,
                error_code=error_code,
                status=self.status,
                timestamp=timestamp(self.now()),
            )
        )

    async def set_status(self, status: str, error_code: str = "NoError") -> None:
        self.status = status
        await self._send_status(error_code)

    def _build(self, item: _Queued) -> Any:
        fields = dict(item.fields)
        if "transaction_id" in fields:
            tx = fields["transaction_id"]
            fields["transaction_id"] = self._tx_map.get(tx, tx)
        return getattr(call, item.action)(**fields)

    async def _transaction_message(self, item: _Queued) -> None:
        self._queue.append(item)
        await self.flush()

    async def flush(self) -> None:
        """Send the queued transaction messages, oldest first (meter values newest first with
        ``out_of_order``); stops at the first failure and keeps the rest."""
        if self.out_of_order:  # each transaction's meter values newest first
            for tx in {q.fields.get("transaction_id") for q in self._queue}:
                meters = [
                    q
                    for q in self._queue
                    if q.action == "MeterValues" and q.fields.get("transaction_id") == tx
                ]
                rest = iter(reversed(meters))
                self._queue = [next(rest) if q in meters else q for q in self._queue]
        while self._queue and self._client is not None:
            item = self._queue[0]
            payload = self._build(item)
            try:
                result = await self._call(payload, unique_id=item.unique_id)
                if self.duplicate_next:
                    self.duplicate_next = False
                    again = await self._call(payload, unique_id=item.unique_id)
                    if again != result:
                        log.error("sim_duplicate_answer_differs", first=result, second=again)
            except (ConnectionError, ConnectionClosed, TimeoutError):
                return
            self._queue.pop(0)
            if item.action == "StartTransaction":
                real = int(result.transaction_id)
                assert item.local_tx is not None
                self._tx_map[item.local_tx] = real
                if self.transaction_id == item.local_tx:
                    self.transaction_id = real

    @property
    def queued(self) -> int:
        return len(self._queue)

    # ----------------------------------------------------------------- the EV
    async def plug_in(self) -> None:
        await self.set_status("Preparing")

    async def authorize(self, id_tag: str) -> str:
        """Authorize.req; offline the charge point accepts locally (its auth cache)."""
        if self._client is None:
            return "Accepted"
        result = await self._call(call.Authorize(id_tag=id_tag))
        return str(result.id_tag_info["status"])

    async def start(self, id_tag: str, *, authorize: bool = True) -> str:
        """Present ``id_tag`` and start the transaction (StartTransaction, queued offline)."""
        if authorize:
            status = await self.authorize(id_tag)
            if status != "Accepted":
                return status
        local = self._next_local
        self._next_local -= 1
        self.transaction_id = local
        self.id_tag = id_tag
        await self._transaction_message(
            _Queued(
                str(uuid.uuid4()),
                "StartTransaction",
                {
                    "connector_id": self.connector,
                    "id_tag": id_tag,
                    "meter_start": int(self.meter_wh),
                    "timestamp": timestamp(self.now()),
                },
                local_tx=local,
            )
        )
        await self.set_status("Charging")
        return "Accepted"

    def power_w(self, ev_power_w: float) -> float:
        if self.limit_a is None:
            return ev_power_w
        return min(ev_power_w, self.limit_a * VOLTAGE_V * self.phases)

    async def charge(self, seconds: float, ev_power_w: float, *, sleep: bool = False) -> float:
        """Deliver energy for ``seconds`` at the EV's power (capped by the charging profile)
        and send one MeterValues; returns the Wh delivered."""
        if sleep:
            await asyncio.sleep(seconds)
        power = self.power_w(ev_power_w)
        delivered = power * seconds / 3600.0
        self.meter_wh += delivered
        await self.meter_values(power)
        return delivered

    async def meter_values(self, power_w: float = 0.0, signed: str | None = None) -> None:
        amps = power_w / VOLTAGE_V / self.phases if power_w else 0.0
        sampled: list[dict[str, Any]] = [
            {
                "value": str(int(self.meter_wh)),
                "measurand": "Energy.Active.Import.Register",
                "unit": "Wh",
                "context": "Sample.Periodic",
            },
            {"value": f"{power_w:.0f}", "measurand": "Power.Active.Import", "unit": "W"},
        ]
        for phase in ("L1", "L2", "L3")[: self.phases]:
            sampled.append(
                {"value": f"{amps:.1f}", "measurand": "Current.Import", "phase": phase, "unit": "A"}
            )
        if signed is not None:
            sampled.append(
                {"value": signed, "format": "SignedData", "context": "Transaction.Begin"}
            )
        entry = {"timestamp": timestamp(self.now()), "sampledValue": sampled}
        fields: dict[str, Any] = {"connector_id": self.connector, "meter_value": [entry]}
        if self.transaction_id is not None:
            fields["transaction_id"] = self.transaction_id
            await self._transaction_message(_Queued(str(uuid.uuid4()), "MeterValues", fields))
        elif self._client is not None:
            await self._call(call.MeterValues(**fields))

    async def stop(self, reason: str = "EVDisconnected", signed: str | None = None) -> None:
        """StopTransaction with the final register and transactionData (queued offline)."""
        if self.transaction_id is None:
            return
        data: list[dict[str, Any]] = [
            {
                "timestamp": timestamp(self.now()),
                "sampledValue": [
                    {
                        "value": str(int(self.meter_wh)),
                        "measurand": "Energy.Active.Import.Register",
                        "unit": "Wh",
                        "context": "Transaction.End",
                    }
                ]
                + (
                    [{"value": signed, "format": "SignedData", "context": "Transaction.End"}]
                    if signed is not None
                    else []
                ),
            }
        ]
        tx = self.transaction_id
        self.transaction_id = None
        await self._transaction_message(
            _Queued(
                str(uuid.uuid4()),
                "StopTransaction",
                {
                    "meter_stop": int(self.meter_wh),
                    "timestamp": timestamp(self.now()),
                    "transaction_id": tx,
                    "reason": reason,
                    "id_tag": self.id_tag,
                    "transaction_data": data,
                },
            )
        )
        await self.set_status("Finishing")

    async def unplug(self) -> None:
        if self.transaction_id is not None:
            await self.stop("EVDisconnected")
        await self.set_status("Available")

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def call_subprotocol() -> Any:
    from gateway.ocpp.admission import SUBPROTOCOL

    return SUBPROTOCOL


class _Client(_OcppChargePoint):
    def __init__(self, cp_id: str, ws: ClientConnection, sim: SimChargePoint) -> None:
        super().__init__(cp_id, ws, response_timeout=30, logger=_wire_logger)
        self._sim = sim

    @on(Action.remote_start_transaction)
    async def on_remote_start(
        self, id_tag: str, **extra: Any
    ) -> call_result.RemoteStartTransaction:
        sim = self._sim
        if sim.transaction_id is not None or sim.status not in ("Preparing", "Available"):
            return call_result.RemoteStartTransaction(status="Rejected")
        # AuthorizeRemoteTxRequests false (the common default): start without Authorize.
        sim._spawn(sim.start(id_tag, authorize=False))
        return call_result.RemoteStartTransaction(status="Accepted")

    @on(Action.remote_stop_transaction)
    async def on_remote_stop(self, transaction_id: int) -> call_result.RemoteStopTransaction:
        sim = self._sim
        if sim.transaction_id is None or sim.transaction_id != transaction_id:
            return call_result.RemoteStopTransaction(status="Rejected")
        sim._spawn(sim.stop("Remote"))
        return call_result.RemoteStopTransaction(status="Accepted")

    @on(Action.set_charging_profile)
    async def on_set_charging_profile(
        self, connector_id: int, cs_charging_profiles: dict[str, Any]
    ) -> call_result.SetChargingProfile:
        sim = self._sim
        sim.profiles.append(cs_charging_profiles)
        periods = cs_charging_profiles["charging_schedule"]["charging_schedule_period"]
        sim.limit_a = float(periods[0]["limit"])
        return call_result.SetChargingProfile(status="Accepted")

    @on(Action.change_availability)
    async def on_change_availability(
        self, connector_id: int, type: str
    ) -> call_result.ChangeAvailability:
        sim = self._sim
        sim.availability.append(type)
        if sim.transaction_id is not None:
            return call_result.ChangeAvailability(status="Scheduled")
        sim._spawn(sim.set_status("Available" if type == "Operative" else "Unavailable"))
        return call_result.ChangeAvailability(status="Accepted")

    @on(Action.reset)
    async def on_reset(self, type: str) -> call_result.Reset:
        self._sim.resets.append(type)
        return call_result.Reset(status="Accepted")


async def run_ev_cycles(
    sim: SimChargePoint,
    id_tags: list[str],
    *,
    speed: float = 1.0,
    ev_power_w: float = 11000.0,
    charge_s: float = 600.0,
    step_s: float = 60.0,
    pause_s: float = 300.0,
) -> None:
    """EVs arriving one after another (``evgw demo``): plug in, tag, charge, leave. Times are
    simulated seconds, run ``speed`` times faster; reconnects when the link drops."""
    cycle = failures = 0
    while True:
        if not sim.online:
            try:
                await sim.connect()
                failures = 0
            except (OSError, ConnectionClosed, TimeoutError) as exc:
                failures += 1  # the gateway may still be starting: quiet at first
                level = log.warning if failures in (10, 100) else log.debug
                level("sim_ocpp_connect_failed", cp_id=sim.cp_id, error=str(exc), tries=failures)
                await asyncio.sleep(0.5)
                continue
        tag = id_tags[cycle % len(id_tags)]
        cycle += 1
        await sim.plug_in()
        await asyncio.sleep(10.0 / speed)
        if await sim.start(tag) != "Accepted":
            await sim.unplug()
            await asyncio.sleep(pause_s / speed)
            continue
        elapsed = 0.0
        while elapsed < charge_s and sim.transaction_id is not None:
            await asyncio.sleep(step_s / speed)
            await sim.charge(step_s, ev_power_w)
            elapsed += step_s
        await sim.unplug()
        await asyncio.sleep(pause_s / speed)


async def simulate_charge_points(config: Any, speed: float, out: Any) -> None:
    """``evgw simulate``: one simulated charge point per OCPP charger of the site config,
    connecting to its ``ocpp.listen`` address (0.0.0.0 as 127.0.0.1), with the configured
    password, EVs arriving with the site's first tokens. TLS (security profile 2) is not
    simulated: the simulator would need the gateway's CA."""
    from gateway.config import OCPP_DRIVER

    ocpp = config.ocpp
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(ocpp.host, ocpp.host)
    if ocpp.security_profile == 2:
        print("OCPP chargers not simulated: security_profile 2 (TLS)", file=out, flush=True)
        return
    tags = [t.id for t in config.auth.tokens if t.status.value == "accepted"][:3] or ["SIM-TAG"]
    host_part = f"[{host}]" if ":" in host else host
    sims = []
    for dev in config.devices:
        if dev.driver != OCPP_DRIVER:
            continue
        password = ocpp.passwords.get(dev.charge_point_id)
        sim = SimChargePoint(
            f"ws://{host_part}:{ocpp.port}",
            dev.charge_point_id,
            password=None if password is None else _wire_password(password.reveal()),
            connector=dev.connector,
            meter_wh=1_000_000.0,
        )
        sims.append(sim)
        print(
            f"  {dev.id}: OCPP charge point {dev.charge_point_id} connecting to "
            f"ws://{host_part}:{ocpp.port}/{dev.charge_point_id}",
            file=out,
            flush=True,
        )
    try:
        async with asyncio.TaskGroup() as tg:
            for sim in sims:
                tg.create_task(run_ev_cycles(sim, tags, speed=speed), name=f"sim-{sim.cp_id}")
    finally:
        for sim in sims:
            await sim.close()


def _wire_password(secret: str) -> str:
    """The password a charger sends for a passwords file entry (``hex:`` keys: the hex text,
    which the gateway accepts too; the simulator's client takes text)."""
    return secret[4:] if secret.startswith("hex:") else secret
