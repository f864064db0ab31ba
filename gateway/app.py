"""Wiring: one TaskGroup running the pollers, the session manager, the readings writer, the
retention loop and the uplink.

Data flows one way: modbus -> samples -> sessions -> store -> outbox -> uplink. Commands come back
from the uplink through ``SiteCommands`` (a gateway.ports.CommandTarget), never by the session
logic importing MQTT code.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import structlog

from gateway import __version__
from gateway.config import GatewayConfig
from gateway.live import LiveState
from gateway.model import Clock, DeviceKind, DeviceSample, SystemClock, Token
from gateway.profiles import Profile, load_profiles

__all__ = ["Gateway", "SiteCommands", "run_gateway"]

log = structlog.get_logger(__name__)

READINGS_FLUSH_S = 1.0
READINGS_BATCH = 500
PRUNE_EVERY_S = 300.0
SNAPSHOT_EVERY_S = 30.0


def _short(value: Any) -> Any:
    return round(value, 3) if isinstance(value, float) else value


def _json(payload: Mapping[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


class SiteCommands:
    """Routes cloud commands to the parts that own the state they change."""

    def __init__(self, gateway: Gateway) -> None:
        self._gw = gateway

    async def remote_start(self, charger_id: str, user: str, token: str | None) -> dict[str, Any]:
        return await self._gw.sessions.remote_start(charger_id, user, token)

    async def remote_stop(self, charger_id: str | None, session_id: str | None) -> dict[str, Any]:
        return await self._gw.sessions.remote_stop(charger_id, session_id)

    async def update_tokens(
        self, version: int, mode: str, tokens: Sequence[Token], remove: Sequence[str]
    ) -> dict[str, Any]:
        return await self._gw.authorizer.update_tokens(version, mode, tokens, remove)

    async def update_tariffs(self, version: int, tariffs: Mapping[str, Any]) -> dict[str, Any]:
        book = self._gw.tariffs
        book.replace(version, dict(tariffs))
        await self._gw.store.kv_put("tariffs", {"version": version, "tariffs": dict(tariffs)})
        return {"version": version, "tariffs": sorted(tariffs)}

    async def auth_response(
        self, request_id: str, status: str, user: str | None, expires_at: float | None
    ) -> None:
        await self._gw.authorizer.auth_response(request_id, status, user, expires_at)


class Gateway:
    """One site's gateway. ``async with Gateway(config) as gw: await gw.run()``."""

    def __init__(
        self,
        config: GatewayConfig,
        profiles: Mapping[str, Profile] | None = None,
        *,
        clock: Clock | None = None,
        live: LiveState | None = None,
        time_scale: float = 1.0,
    ) -> None:
        self.config = config
        self.profiles = (
            dict(profiles) if profiles is not None else load_profiles(config.drivers_path)
        )
        self.clock = clock or SystemClock()
        self.live = live or LiveState()
        self._stack = AsyncExitStack()
        self._samples: asyncio.Queue[DeviceSample] = asyncio.Queue(maxsize=10_000)
        self._readings: list[tuple[str, float, Mapping[str, Any]]] = []
        self._last_values: dict[str, Mapping[str, Any]] = {}
        self._kinds = {d.id: self.profiles[d.driver].kind for d in config.devices}
        self.uplink: Any = None
        # >1 only under a sped-up simulator: counters then rise faster than real time allows.
        self.time_scale = time_scale

    async def __aenter__(self) -> Gateway:
        from gateway.auth import Authorizer
        from gateway.billing.cost import make_pricer
        from gateway.billing.signing import Signer
        from gateway.billing.tariff import TariffBook
        from gateway.modbus.bus import BusPool
        from gateway.modbus.engine import Chargers, DeviceDriver, DevicePoller
        from gateway.records import seal
        from gateway.sessions import SessionManager
        from gateway.store import Store

        cfg = self.config
        Path(cfg.storage.path).parent.mkdir(parents=True, exist_ok=True)
        self.signer = Signer.load_or_create(Path(cfg.storage.path).with_name("evgw-signing.key"))
        self.store = await self._stack.enter_async_context(
            Store.for_site(cfg, sealer=lambda record: seal(record, self.signer.sign))
        )
        self.tariffs = TariffBook(cfg.tariffs, cfg.billing)
        saved = await self.store.kv_get("tariffs")  # the last `tariffs` command, if any
        if saved:
            try:
                self.tariffs.replace(saved["version"], saved["tariffs"])
            except Exception as exc:  # a stored push that no longer validates is not fatal
                log.error("stored_tariffs_invalid", error=str(exc))
        buses = await self._stack.enter_async_context(BusPool.from_config(cfg))
        self.drivers = {
            dev.id: DeviceDriver(dev, self.profiles[dev.driver], buses.for_device(dev), self.clock)
            for dev in cfg.devices
        }
        self.chargers = Chargers(self.drivers)
        # Load management stands between the session manager and the chargers: a charger the
        # session manager stopped never gets a limit > 0 (which would restart most chargers).
        self.load: Any = None
        control: Any = self.chargers
        if cfg.grid is not None and cfg.grid.max_current_a is not None:
            from gateway.loadmgmt import LoadBalancer, LoadManager

            balancer = LoadBalancer.from_config(cfg, self.profiles, self.chargers.can_control)
            self.load = LoadManager(cfg, balancer, self.chargers, self.clock)
            control = self.load
        self.commands = SiteCommands(self)
        if cfg.uplink is not None:
            from gateway.uplink.mqtt import MqttUplink

            self.uplink = MqttUplink(
                cfg.uplink, cfg.site.id, self.store, self.commands, self.clock, version=__version__
            )
            self.uplink.set_public_key(self.signer.public_key_payload())
        self.authorizer = Authorizer(cfg.auth, self.store, self.uplink, self.clock)
        await self.authorizer.load()
        self.sessions = SessionManager(
            cfg,
            self.store,
            self.authorizer,
            control,
            make_pricer(cfg.site.timezone),
            self._resolve_tariff,
            self.clock,
            self._on_session_event,
            charger_ids=[d for d, kind in self._kinds.items() if kind is DeviceKind.CHARGER],
            time_scale=self.time_scale,
            plug_reset_counters=[
                d.id for d in cfg.devices if _plug_reset_counter(self.profiles[d.driver])
            ],
            prefer_session_counters=[
                d.id
                for d in cfg.devices
                if _plug_reset_counter(self.profiles[d.driver])
                and self.profiles[d.driver].has("energy_wh")
                and self.profiles[d.driver].register("energy_wh").scale > 1.0
            ],
        )
        self.poller = DevicePoller(list(self.drivers.values()), self._on_sample)
        self.web: Any = None
        if cfg.web is not None:
            from gateway.web.server import WebServer

            self.web = await self._stack.enter_async_context(WebServer(self, cfg.web))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if hasattr(self, "sessions"):
            await self.sessions.aclose()
        await self._flush_readings()
        await self._stack.aclose()

    def _resolve_tariff(self, charger_id: str, user_group: str | None) -> Any:
        dev = self.config.device(charger_id)
        return self.tariffs.resolve(dev.tariff, user_group)

    def _on_sample(self, sample: DeviceSample) -> None:
        try:
            self._samples.put_nowait(sample)
        except asyncio.QueueFull:
            log.error("sample_queue_full", device_id=sample.device_id)

    async def _on_session_event(self, kind: str, payload: dict[str, Any]) -> None:
        self.live.on_session_event(kind, payload)
        if kind == "status":
            device = payload.pop("device_id", None) or payload.get("charger_id")
            if self.uplink is not None:
                self.uplink.publish_status(device, payload)
        elif kind == "session_started":
            await self.store.enqueue("event", "sessions/started", _json(payload))
        if self.uplink is not None:
            self.uplink.notify()

    async def run(self) -> None:
        """Run until cancelled."""
        await self.sessions.resume()
        log.info(
            "gateway_started",
            site=self.config.site.id,
            devices=len(self.drivers),
            uplink=self.config.uplink.url if self.config.uplink else None,
            buffer=self.config.storage.path,
        )
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.sessions.run(), name="sessions")
            tg.create_task(self.poller.run(), name="poller")
            if self.load is not None:
                tg.create_task(self.load.run(), name="load")
            tg.create_task(self._consume_samples(), name="samples")
            tg.create_task(self._readings_writer(), name="readings-writer")
            tg.create_task(self._housekeeping(), name="housekeeping")
            if self.uplink is not None:
                tg.create_task(self.uplink.run(), name="uplink")
            if self.web is not None:
                tg.create_task(self.web.run(), name="web")

    async def _consume_samples(self) -> None:
        while True:
            sample = await self._samples.get()
            kind = self._kinds.get(sample.device_id, DeviceKind.METER)
            self.live.on_sample(sample, kind.value)
            if sample.online:
                self._last_values[sample.device_id] = sample.values
            if sample.online and sample.values:
                self._readings.append((sample.device_id, sample.ts, dict(sample.values)))
            if self.load is not None:
                self.load.on_sample(sample)
            await self.sessions.on_sample(sample)
            if len(self._readings) >= READINGS_BATCH:
                await self._flush_readings()

    async def _flush_readings(self) -> None:
        if not self._readings or not hasattr(self, "store"):
            return
        batch, self._readings = self._readings, []
        await self.store.add_readings(batch)
        if self.uplink is not None:
            self.uplink.notify()

    async def _readings_writer(self) -> None:
        next_snapshot = 0.0
        while True:
            await asyncio.sleep(READINGS_FLUSH_S)
            now = self.clock.monotonic()
            if now >= next_snapshot:
                next_snapshot = now + SNAPSHOT_EVERY_S
                self._log_snapshot()
            await self._flush_readings()
            self.live.backlog = await self.store.outbox_backlog()
            for session in self.sessions.tracker.sessions():
                self.live.on_session_event(
                    "session_updated",
                    {"session_id": session.session_id, "energy_wh": round(session.energy())},
                )
            if self.uplink is not None:
                self.live.uplink_online = bool(self.uplink.online)

    def _log_snapshot(self) -> None:
        """One line per device with its decoded values: what an installer watches."""
        for dev in sorted(self.live.devices.values(), key=lambda d: d.device_id):
            values = self._last_values.get(dev.device_id, {})
            log.info(
                "device_values",
                device_id=dev.device_id,
                online=dev.online,
                status=dev.status,
                error=dev.error,
                **{k: _short(v) for k, v in values.items()},
            )

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(PRUNE_EVERY_S)
            await self.store.prune()


def _plug_reset_counter(profile: Profile) -> bool:
    """The profile has a session energy counter that restarts at every plug-in."""
    return profile.has("session_energy_wh") and profile.session_energy_resets == "plug"


async def run_gateway(
    config: GatewayConfig,
    *,
    live: LiveState | None = None,
    ready: Callable[[Gateway], Awaitable[None] | None] | None = None,
    time_scale: float = 1.0,
) -> int:
    async with Gateway(config, live=live, time_scale=time_scale) as gw:
        if ready is not None:
            res = ready(gw)
            if asyncio.iscoroutine(res):
                await res
        await gw.run()
    return 0
