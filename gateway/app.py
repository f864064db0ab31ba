"""Wiring: one TaskGroup running the pollers, the session manager, the readings writer, the
retention loop and the uplink.

Data flows one way: modbus -> samples -> sessions -> store -> outbox -> uplink. Commands come back
from the uplink through ``SiteCommands`` (a gateway.ports.CommandTarget), never by the session
logic importing MQTT code.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, TypedDict

import structlog

from gateway import __version__
from gateway.config import OCPP_DRIVER, GatewayConfig
from gateway.live import LiveState
from gateway.modbus.types import DataType, RegisterSpec, value_range
from gateway.model import Clock, DeviceKind, DeviceSample, SystemClock, Token
from gateway.outgoing import EVENT_STREAM, STARTED_TOPIC
from gateway.ports import JsonObject, TokenListPart
from gateway.profiles import Profile, load_profiles
from gateway.records import SessionRecord
from gateway.sessions import MAX_COUNTER_WH, Counter
from gateway.wire import encode_reading

__all__ = ["Gateway", "SiteCommands", "run_gateway"]

log = structlog.get_logger(__name__)

READINGS_FLUSH_S = 1.0
READINGS_BATCH = 500
PRUNE_EVERY_S = 300.0
SNAPSHOT_EVERY_S = 30.0
GRID_LIMITS_KEY = "grid.cloud_limits"  # kv: the cloud's limits in force, kept over a restart


def _short(value: Any) -> Any:
    return round(value, 3) if isinstance(value, float) else value


def _json(payload: Mapping[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


class SiteCommands:
    """Routes cloud commands to the parts that own the state they change."""

    def __init__(self, gateway: Gateway) -> None:
        self._gw = gateway

    async def remote_start(self, charger_id: str, user: str, token: str | None) -> dict[str, Any]:
        ocpp = self._gw.ocpp
        if ocpp is not None and ocpp.handles(charger_id):  # RemoteStartTransaction
            return await ocpp.remote_start(charger_id, user, token)
        return await self._gw.sessions.remote_start(charger_id, user, token)

    async def remote_stop(self, charger_id: str | None, session_id: str | None) -> dict[str, Any]:
        ocpp = self._gw.ocpp
        if ocpp is not None and charger_id is None and session_id is not None:
            charger_id = self._gw.sessions.tracker.find_session(session_id)
        if ocpp is not None and charger_id is not None and ocpp.handles(charger_id):
            return await ocpp.remote_stop(charger_id, session_id)  # RemoteStopTransaction
        return await self._gw.sessions.remote_stop(charger_id, session_id)

    async def change_availability(self, charger_id: str, available: bool) -> dict[str, Any]:
        return await self._ocpp_charger(charger_id).change_availability(charger_id, available)

    async def reset(self, charger_id: str, hard: bool) -> dict[str, Any]:
        return await self._ocpp_charger(charger_id).reset(charger_id, hard)

    def _ocpp_charger(self, charger_id: str) -> Any:
        ocpp = self._gw.ocpp
        if ocpp is None or not ocpp.handles(charger_id):
            from gateway.errors import CommandError

            raise CommandError("not_supported", f"{charger_id!r} is not an OCPP charger")
        return ocpp

    async def update_tokens(
        self, version: int, mode: str, tokens: Sequence[Token], remove: Sequence[str]
    ) -> dict[str, Any]:
        return await self._gw.authorizer.update_tokens(version, mode, tokens, remove)

    async def update_token_part(self, part: TokenListPart) -> dict[str, Any]:
        return await self._gw.token_parts.add(part)

    async def update_tariffs(self, version: int, tariffs: Mapping[str, Any]) -> dict[str, Any]:
        book = self._gw.tariffs
        book.check(version, dict(tariffs))  # refused: nothing changes, nothing is stored
        # Stored before it applies: a failed write answers an error and changes nothing; a
        # crash after it keeps what the reply confirms.
        await self._gw.store.kv_put("tariffs", {"version": version, "tariffs": dict(tariffs)})
        book.replace(version, dict(tariffs))
        return {"version": version, "tariffs": sorted(tariffs)}

    async def auth_response(
        self, request_id: str, status: str, user: str | None, expires_at: float | None
    ) -> None:
        await self._gw.authorizer.auth_response(request_id, status, user, expires_at)

    async def set_grid_limit(
        self,
        request_id: str,
        scope: str,
        max_current_a: float | None,
        max_power_w: float | None,
        expires_at: float | None,
        reason: str | None,
    ) -> dict[str, Any]:
        from gateway.errors import CommandError
        from gateway.gridlimit import LimitValue

        load = self._gw.load
        if load is None or load.limits is None:
            raise CommandError(
                "unsupported", "this site has no load management (grid.max_current_a)"
            )
        lift = max_current_a is None and max_power_w is None
        value = None if lift else LimitValue(max_current_a, max_power_w)
        effective = await load.set_cloud_limit(request_id, scope, value, expires_at, reason)
        saved = [c.to_json() for c in load.limits.cloud_limits()]
        await self._gw.store.kv_put(GRID_LIMITS_KEY, saved)
        return {
            "scope": scope,
            "cleared": lift,
            "in_force": effective.payload(self._gw.clock.time()),
        }


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
        self._readings: list[tuple[str, float, bytes]] = []  # wire forms, stored in batches
        self._last_values: dict[str, Mapping[str, Any]] = {}
        self._kinds = {
            d.id: DeviceKind.CHARGER if d.driver == OCPP_DRIVER else self.profiles[d.driver].kind
            for d in config.devices
        }
        self.uplink: Any = None
        self.grid_limit: dict[str, Any] | None = None  # the retained grid/limit payload
        self.ocpp: Any = None  # gateway.ocpp.OcppServer when the site has OCPP chargers
        # >1 only under a sped-up simulator: counters then rise faster than real time allows.
        self.time_scale = time_scale

    async def __aenter__(self) -> Gateway:
        # One exit stack from start to stop: whatever fails half way through starting closes what
        # was already opened (the store's worker thread would otherwise keep the process alive,
        # and systemd would never restart it).
        try:
            return await self._start()
        except BaseException:
            await self._close()
            raise

    async def _start(self) -> Gateway:
        from gateway.auth import Authorizer
        from gateway.billing.cost import make_pricer, off_the_loop
        from gateway.billing.signing import Signer
        from gateway.billing.tariff import TariffBook
        from gateway.modbus.bus import BusPool
        from gateway.modbus.driver import Chargers, DeviceDriver
        from gateway.modbus.poller import DevicePoller
        from gateway.sessions import SessionManager
        from gateway.store import Store

        cfg = self.config
        Path(cfg.storage.path).parent.mkdir(parents=True, exist_ok=True)
        self.signer = Signer.load_or_create(Path(cfg.storage.path).with_name("evgw-signing.key"))
        self.store = await self._stack.enter_async_context(
            Store.for_site(
                cfg,
                sealer=lambda record, seq, prev_hash: record.sealed(
                    seq, prev_hash, self.signer.sign
                ),
            )
        )
        self.tariffs = TariffBook(
            cfg.tariffs,
            cfg.billing,
            chargers={d.id: d.tariff for d in cfg.devices if d.tariff is not None},
        )
        saved = await self.store.kv_get("tariffs")  # the last `tariffs` command, if any
        if saved:
            try:
                self.tariffs.replace(saved["version"], saved["tariffs"])
            except Exception as exc:  # a stored push that no longer validates is not fatal
                log.error("stored_tariffs_invalid", error=str(exc))
        modbus_cfg = cfg.model_copy(update={"devices": cfg.modbus_devices})
        ocpp_devices = [d for d in cfg.devices if d.driver == OCPP_DRIVER]
        buses = await self._stack.enter_async_context(BusPool.from_config(modbus_cfg))
        self.buses = buses
        self.drivers = {
            dev.id: DeviceDriver(dev, self.profiles[dev.driver], buses.bus_for(dev), self.clock)
            for dev in cfg.modbus_devices
        }
        self.chargers = Chargers(self.drivers)
        ocpp_route = None
        if ocpp_devices:
            from gateway.ocpp.control import OcppRoute

            ocpp_route = OcppRoute(self.chargers, [d.id for d in ocpp_devices])
        # Load management stands between the session manager and the chargers: a charger the
        # session manager stopped never gets a limit > 0 (which would restart most chargers).
        self.load: Any = None
        control: Any = ocpp_route or self.chargers
        if cfg.grid is not None and cfg.grid.max_current_a is not None:
            from gateway.gridlimit import GridLimits
            from gateway.loadmgmt import LoadBalancer, LoadManager

            balancer = LoadBalancer.from_config(
                modbus_cfg, self.profiles, self.chargers.can_control
            )
            if ocpp_route is not None:
                balancer = ocpp_route.with_chargers(balancer, ocpp_devices)
            limits = GridLimits.from_config(cfg.grid, cfg.site.timezone)
            saved_limits = await self.store.kv_get(GRID_LIMITS_KEY)
            if saved_limits:
                try:
                    limits.load(saved_limits)
                except (KeyError, TypeError, ValueError) as exc:
                    log.error("stored_grid_limits_invalid", error=str(exc))
            self.load = LoadManager(
                cfg,
                balancer,
                control,
                self.clock,
                limits=limits,
                on_limit=self._on_grid_limit,
            )
            control = self.load
        self.commands = SiteCommands(self)
        if cfg.uplink is not None:
            from gateway.uplink.mqtt import MqttUplink

            self.uplink = MqttUplink(
                cfg.uplink, cfg.site.id, self.store, self.commands, self.clock, version=__version__
            )
            self.uplink.set_public_key(self.signer.public_key_payload())
        self.homeassistant, self.ha_link = self._homeassistant_parts()
        self.authorizer = Authorizer(
            cfg.auth,
            self.store,
            self.uplink,
            self.clock,
            truncated_to=truncated_tags(cfg, self.profiles),
        )
        await self.authorizer.load()
        from gateway.tokenparts import TokenParts

        authorizer = self.authorizer
        self.token_parts = TokenParts(
            self.store, lambda: authorizer.cloud_version, authorizer.update_tokens
        )
        self.sessions = SessionManager(
            cfg,
            self.store,
            self.authorizer,
            control,
            off_the_loop(make_pricer(cfg.site.timezone)),
            self._resolve_tariff,
            self.clock,
            self,
            charger_ids=[d for d, kind in self._kinds.items() if kind is DeviceKind.CHARGER],
            time_scale=self.time_scale,
            profile_max_a=profile_max_currents(cfg, self.profiles),
            transactional=[d.id for d in ocpp_devices],
            **counter_facts(cfg, self.profiles),
        )
        self.poller = DevicePoller(list(self.drivers.values()), self._on_sample)
        if ocpp_route is not None:
            from gateway.ocpp.server import OcppServer

            assert cfg.ocpp is not None
            self.ocpp = OcppServer(
                cfg.ocpp,
                ocpp_devices,
                self.sessions,
                self.authorizer,
                self.store,
                self._on_sample,
                self.clock,
            )
            ocpp_route.attach(self.ocpp)
        self.web: Any = None
        if cfg.web is not None:
            from gateway.web.server import WebServer

            self.web = await self._stack.enter_async_context(WebServer(self, cfg.web))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._close()

    async def _close(self) -> None:
        try:
            if hasattr(self, "sessions"):
                await self.sessions.aclose()
            await self._flush_readings()
        finally:
            await self._stack.aclose()

    def _on_grid_limit(self, effective: Any) -> None:
        """The site limit in force changed: published retained on ``P/S/grid/limit``."""
        self.grid_limit = effective.payload(self.clock.time())
        if self.uplink is not None:
            self.uplink.publish_retained(self.uplink.topics.grid_limit, self.grid_limit)
        if self.ha_link is not None and self.ha_link is not self.uplink:
            self.ha_link.publish_retained(f"{self._root}/grid/limit", self.grid_limit)

    @property
    def _root(self) -> str:
        from gateway.uplink.topics import Topics

        prefix = self.config.uplink.topic_prefix if self.config.uplink else "evgw"
        return Topics(prefix, self.config.site.id).root

    def _homeassistant_parts(self) -> tuple[Any, Any]:
        """Home Assistant discovery and the link it is published on (None, None when off)."""
        cfg = self.config
        ha_cfg = cfg.homeassistant
        if not ha_cfg.enabled:
            return None, None
        from gateway.homeassistant import ChargerInfo, HomeAssistant

        chargers = [
            ChargerInfo(d.id, "OCPP", d.charge_point_id or d.id)
            if d.driver == OCPP_DRIVER
            else ChargerInfo(
                d.id, self.profiles[d.driver].manufacturer, self.profiles[d.driver].model
            )
            for d in cfg.devices
            if self._kinds[d.id] is DeviceKind.CHARGER
        ]
        ha = HomeAssistant(
            cfg.site.id,
            self._root,
            chargers,
            prefix=ha_cfg.prefix,
            version=__version__,
            interval_s=ha_cfg.interval_s,
            grid_limit=self.load is not None,
        )
        if ha_cfg.broker == "cloud":
            link: Any = self.uplink
        else:
            from gateway.uplink.halink import LocalRetainedLink

            link = LocalRetainedLink(ha_cfg, cfg.site.id, self._root, self.clock)
        for topic, payload in ha.discovery():
            link.publish_retained(topic, payload)
        return ha, link

    async def _homeassistant_states(self) -> None:
        while True:
            for topic, payload in self.homeassistant.changes(self.live, self.clock.time()):
                self.ha_link.publish_retained(topic, payload)
            await asyncio.sleep(1.0)

    def _signal_poller(self) -> Any:
        """The poller of the grid operator's relay, if the site has one."""
        from gateway.config import DeviceConfig
        from gateway.gridsignal import SignalPoller

        grid = self.config.grid
        if self.load is None or grid is None or not grid.signal:
            return None
        signal = grid.signal
        where = DeviceConfig(
            id="grid-signal",
            driver="grid-signal",
            host=signal.get("host"),
            port=signal.get("port", 502),
            bus=signal.get("bus"),
            unit=signal.get("unit", 1),
        )
        return SignalPoller(self.buses.bus_for(where), signal, self.load.on_signal)

    def device_kind(self, device_id: str) -> DeviceKind:
        """Charger or meter (an OCPP charge point has no Modbus profile to ask)."""
        return self._kinds[device_id]

    def _resolve_tariff(self, charger_id: str, user_group: str | None) -> Any:
        dev = self.config.device(charger_id)
        got = self.tariffs.resolve(dev.tariff, user_group)
        if got is None:
            return None
        return (got.tariff_id, got.version, got.data, got.fallback)

    def _on_sample(self, sample: DeviceSample) -> None:
        try:
            self._samples.put_nowait(sample)
        except asyncio.QueueFull:
            log.error("sample_queue_full", device_id=sample.device_id)

    # ------------------------------------------- gateway.ports.SessionEvents (the sessions)
    async def charger_status(self, charger_id: str, status: JsonObject) -> None:
        self.live.on_session_event("status", status)
        if self.uplink is not None:
            # The CONTRACT status payload names no device: the topic does.
            self.uplink.publish_status(
                charger_id, {k: v for k, v in status.items() if k != "device_id"}
            )
            self.uplink.notify()

    async def session_started(self, started: JsonObject) -> None:
        self.live.on_session_event("session_started", started)
        await self.store.enqueue(EVENT_STREAM, STARTED_TOPIC, _json(started))
        if self.uplink is not None:
            self.uplink.notify()

    async def session_finished(self, record: SessionRecord) -> None:
        # Stored and queued on the outbox by the store already: the uplink is woken for it.
        self.live.on_session_event("session_finished", record.to_dict())
        if self.uplink is not None:
            self.uplink.notify()

    async def run(self) -> None:
        """Run until cancelled."""
        await self.sessions.resume()
        if self.ocpp is not None:  # after resume: a replayed StopTransaction finds its session
            await self._stack.enter_async_context(self.ocpp)
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
            if self.homeassistant is not None:
                tg.create_task(self._homeassistant_states(), name="homeassistant")
                if self.ha_link is not self.uplink:
                    tg.create_task(self.ha_link.run(), name="homeassistant-link")
            signal = self._signal_poller()
            if signal is not None:
                tg.create_task(signal.run(), name="grid-signal")
            if self.ocpp is not None:
                tg.create_task(self.ocpp.run(), name="ocpp")
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
                # encoded now, in the form the uplink sends (gateway/wire.py), stored in batches
                wire = encode_reading(sample.ts, sample.values)
                self._readings.append((sample.device_id, sample.ts, wire))
            if self.load is not None:
                self.load.on_sample(sample)
            await self.sessions.on_sample(sample)
            if len(self._readings) >= READINGS_BATCH:
                await self._flush_readings()

    async def _flush_readings(self) -> None:
        if not self._readings or not hasattr(self, "store"):
            return
        batch, self._readings = self._readings, []
        await self.store.add_wire_readings(batch)
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


def energy_counter(spec: RegisterSpec) -> Counter:
    """Range and resolution of an energy counter register, for the plausibility checks."""
    rng = value_range(spec)
    if rng is None:  # a float register: its step grows with the value
        bits = 24 if spec.type is DataType.F32 else 53
        return Counter(MAX_COUNTER_WH, 1, bits, spec.scale)
    top = min(MAX_COUNTER_WH, math.floor(rng[1]))
    return Counter(max(0, top), max(1, math.ceil(abs(spec.scale))))


def truncated_tags(config: GatewayConfig, profiles: Mapping[str, Profile]) -> dict[str, int]:
    """Device id -> tag length, for devices whose profile says they show only part of a card
    id (``tag.truncated_to``): the ``Authorizer``'s ``truncated_to``."""
    out: dict[str, int] = {}
    for dev in config.modbus_devices:
        tag = profiles[dev.driver].tag
        if tag is not None and tag.truncated_to is not None:
            out[dev.id] = tag.truncated_to
    return out


def profile_max_currents(
    config: GatewayConfig, profiles: Mapping[str, Profile]
) -> dict[str, float]:
    """Device id -> its profile's ``current_limit.max_a``: the ``SessionManager``'s
    ``profile_max_a`` (the plausibility bound of its counters)."""
    return {
        d.id: limit.max_a
        for d in config.modbus_devices
        if (limit := profiles[d.driver].current_limit) is not None
    }


class CounterFacts(TypedDict):
    """The ``SessionManager``'s keyword arguments on counters (see :func:`counter_facts`)."""

    counters: dict[str, dict[str, Counter]]
    plug_reset_counters: list[str]
    prefer_session_counters: list[str]


def counter_facts(config: GatewayConfig, profiles: Mapping[str, Profile]) -> CounterFacts:
    """What the Modbus devices' profiles say of their energy counters, as the
    ``SessionManager`` takes it: range and resolution of each counter, the chargers whose
    session counter restarts at every plug-in, and those of them billed from that session
    counter rather than a coarse lifetime counter (scale above 1 Wh)."""
    devices = [(d.id, profiles[d.driver]) for d in config.modbus_devices]
    plug_reset = [cid for cid, profile in devices if _plug_reset_counter(profile)]
    return {
        "counters": {cid: _counters(profile) for cid, profile in devices},
        "plug_reset_counters": plug_reset,
        "prefer_session_counters": [
            cid
            for cid, profile in devices
            if cid in plug_reset
            and profile.has("energy_wh")
            and profile.register("energy_wh").scale > 1.0
        ],
    }


def _counters(profile: Profile) -> dict[str, Counter]:
    return {
        name: energy_counter(profile.register(name))
        for name in ("energy_wh", "session_energy_wh")
        if profile.has(name)
    }


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
