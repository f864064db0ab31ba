"""A whole simulated site: every device of a site config served at its configured address, with
EV traffic (random and seeded, or scripted by a scenario).

- Modbus TCP devices are served on their ``host:port``; devices sharing one ``host:port`` are
  units of one server. Where only serial (RTU) profiles sit at a ``host:port``, that address is
  a simulated Modbus TCP gateway: requests go one at a time over a simulated serial line at the
  ``endpoints:`` baud rate (else the first serial profile's), with its wire time and delays.
  Only loopback hosts are served (a non-loopback device is reported and skipped: the simulator
  is not meant to impersonate devices on a real network).
- An ``rtu`` bus gets a socat pty pair whose gateway-side link is the bus's ``port:`` path; every
  unit of the bus is served on the other end. ``rtu-over-tcp`` buses are served on their
  ``host:tcp_port`` with RTU framing.
- A charger with ``meter:`` is billed by that meter, so the meter measures exactly that charger.
  The grid meter (``grid.meter``) measures every charger plus a base load. Other meters measure
  a base load only.

Simulated time runs ``speed`` times faster than real time; counters advance in simulated time.
Session truth (what really happened, JSON lines) goes to ``truth_path``.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import structlog

from gateway.config import BusConfig, DeviceConfig, GatewayConfig, is_loopback
from gateway.errors import GatewayError
from gateway.modbus.codec import encode
from gateway.model import Clock, DeviceKind, SystemClock, TokenType
from gateway.profiles import Profile
from gateway.sim.devices import SimCharger, SimMeter, TruthLog
from gateway.sim.pty import pty_pair
from gateway.sim.registers import RegisterImage
from gateway.sim.scenario import Scenario, ScenarioStep, load_scenario
from gateway.sim.server import Fault, FaultKind, SimServer

__all__ = ["ServedDevice", "SimSite", "TrafficProfile", "run_simulator"]

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class ServedDevice:
    device_id: str
    driver: str
    endpoint: str  # tcp://127.0.0.1:15020, rtu:/tmp/evgw-rs485-1 (gateway side), ...
    unit: int


@dataclass(frozen=True, slots=True)
class TrafficProfile:
    """Random EV traffic, in simulated seconds."""

    mean_idle_s: float = 600.0  # between an EV leaving and the next arriving
    # ... and never less: a gateway polling a sped-up site once a (real) second must see the
    # connector free, as it would at any real driver's pace, or two visits read as one.
    min_idle_s: float = 120.0
    tag_delay_s: tuple[float, float] = (3.0, 20.0)
    energy_need_wh: tuple[float, float] = (3_000.0, 30_000.0)
    power_w: tuple[float, ...] = (3_700.0, 7_400.0, 11_000.0, 22_000.0)
    suspend_probability: float = 0.25
    suspend_s: tuple[float, float] = (60.0, 600.0)
    linger_s: tuple[float, float] = (0.0, 1_200.0)  # plugged in after the car is full
    unknown_tag_probability: float = 0.1
    base_load_w: tuple[float, float] = (500.0, 3_000.0)


@dataclass(order=True)
class _Sleeper:
    wake_s: float
    seq: int
    future: asyncio.Future[None] = field(compare=False)


class SimSite:
    """Serve a site; use as ``async with SimSite(...) as site``."""

    def __init__(
        self,
        config: GatewayConfig,
        profiles: dict[str, Profile],
        *,
        speed: float = 1.0,
        scenario: Scenario | None = None,
        truth_path: str | Path | None = None,
        seed: int | None = None,
        traffic: bool | None = None,
        traffic_profile: TrafficProfile | None = None,
        tick_s: float = 0.05,
        clock: Clock | None = None,
        enforce_heartbeat: bool = True,
    ) -> None:
        if speed <= 0:
            raise ValueError("speed must be > 0")
        # OCPP charge points are not served here: they connect to the gateway themselves
        # (gateway.ocpp.sim).
        self.config = config.model_copy(update={"devices": config.modbus_devices})
        self.profiles = profiles
        self.speed = speed
        self.scenario = scenario
        self.truth = TruthLog(truth_path) if truth_path is not None else None
        self.seed = seed
        self.traffic = traffic if traffic is not None else (scenario is None or scenario.traffic)
        self.traffic_profile = traffic_profile or TrafficProfile()
        self.tick_s = tick_s
        self.clock: Clock = clock or SystemClock()
        self.enforce_heartbeat = enforce_heartbeat
        self._rng = random.Random(seed)
        self.sim_time_s = 0.0
        self.served: list[ServedDevice] = []
        self.skipped: list[tuple[str, str]] = []  # (device id, why)
        self.scenario_done = asyncio.Event()
        self._chargers: dict[str, SimCharger] = {}
        self._meters: dict[str, SimMeter] = {}
        self._images: dict[str, RegisterImage] = {}
        self._server_of: dict[str, tuple[SimServer, int]] = {}
        self._servers: list[SimServer] = []
        self._sleepers: list[_Sleeper] = []
        self._seq = itertools.count()
        self._stack: contextlib.AsyncExitStack | None = None
        self._task: asyncio.Task[None] | None = None

    # access for tests and the CLI -------------------------------------------------------------
    def charger(self, device_id: str) -> SimCharger:
        return self._chargers[device_id]

    def meter(self, device_id: str) -> SimMeter:
        return self._meters[device_id]

    @property
    def chargers(self) -> dict[str, SimCharger]:
        return dict(self._chargers)

    @property
    def meters(self) -> dict[str, SimMeter]:
        return dict(self._meters)

    def image(self, device_id: str) -> RegisterImage:
        return self._images[device_id]

    def server(self, device_id: str) -> SimServer:
        return self._server_of[device_id][0]

    def set_fault(self, device_id: str, fault: Fault | FaultKind | str) -> None:
        if not isinstance(fault, Fault):
            fault = Fault(FaultKind(fault))
        server, unit = self._server_of[device_id]
        server.set_fault(unit, fault)
        device = self._chargers.get(device_id) or self._meters.get(device_id)
        if device is not None:
            device.frozen = fault.kind is FaultKind.FROZEN

    def clear_fault(self, device_id: str) -> None:
        self.set_fault(device_id, Fault())

    def override(self, device_id: str, register: str, value: float, polls: int = 1) -> None:
        """Make ``device_id`` answer ``value`` (in the register's unit, before its scale) in
        register ``register`` for the next ``polls`` reads of it, e.g. an SDM630 showing
        1e30 kWh: ``override("m1", "energy_wh", 1e33, polls=3)``."""
        device = self._chargers.get(device_id) or self._meters.get(device_id)
        if device is None:
            raise KeyError(f"no simulated device {device_id!r}")
        spec = device.profile.register(register)
        server, unit = self._server_of[device_id]
        server.override(unit, spec.table, spec.address, encode(spec, value), polls)

    async def sleep(self, sim_s: float) -> None:
        """Wait ``sim_s`` simulated seconds."""
        await self.sleep_until(self.sim_time_s + sim_s)

    async def sleep_until(self, sim_time_s: float) -> None:
        if sim_time_s <= self.sim_time_s:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, _Sleeper(sim_time_s, next(self._seq), future))
        await future

    # building ---------------------------------------------------------------------------------
    def _profile(self, dev: DeviceConfig) -> Profile:
        try:
            return self.profiles[dev.driver]
        except KeyError:
            raise GatewayError(f"{dev.id}: no profile named {dev.driver!r}") from None

    def _build_devices(self) -> None:
        seeds = random.Random(self.seed)
        billed_by: dict[str, list[str]] = {}
        for dev in self.config.devices:
            profile = self._profile(dev)
            image = RegisterImage()
            self._images[dev.id] = image
            if profile.kind is DeviceKind.CHARGER:
                self._chargers[dev.id] = SimCharger(
                    profile,
                    image,
                    device_id=dev.id,
                    clock=self.clock,
                    speed=self.speed,
                    truth=self.truth,
                    seed=seeds.randrange(2**32),
                    enforce_heartbeat=self.enforce_heartbeat,
                    max_current_a=dev.max_current_a,
                )
                if dev.meter:
                    billed_by.setdefault(dev.meter, []).append(dev.id)
        grid_meter = self.config.grid.meter if self.config.grid else None
        low, high = self.traffic_profile.base_load_w
        for dev in self.config.devices:
            profile = self._profile(dev)
            if profile.kind is not DeviceKind.METER:
                continue
            if dev.id in billed_by:
                wired, base = [self._chargers[c] for c in billed_by[dev.id]], 0.0
            elif dev.id == grid_meter:
                wired, base = list(self._chargers.values()), round(seeds.uniform(low, high))
            else:
                wired, base = [], round(seeds.uniform(low, high))
            self._meters[dev.id] = SimMeter(
                profile,
                self._images[dev.id],
                device_id=dev.id,
                chargers=wired,
                base_load_w=base,
                seed=seeds.randrange(2**32),
            )

    async def _start_servers(self, stack: contextlib.AsyncExitStack) -> None:
        tcp_groups: dict[tuple[str, int], list[DeviceConfig]] = {}
        bus_groups: dict[str, list[DeviceConfig]] = {}
        for dev in self.config.devices:
            if dev.bus is not None:
                bus_groups.setdefault(dev.bus, []).append(dev)
            elif dev.host is not None:
                if not is_loopback(dev.host):
                    self._skip(dev.id, f"host {dev.host} is not a loopback address")
                    continue
                tcp_groups.setdefault((dev.host, dev.port), []).append(dev)
            else:
                self._skip(dev.id, "neither host nor bus")
        for (host, port), devs in tcp_groups.items():
            serial = [
                p for p in (self._profile(d) for d in devs) if "tcp" not in p.connection.transports
            ]
            # A converter fronts serial devices only; an address that mixes in a Modbus TCP
            # device is served as plain Modbus TCP (a simulator convenience, no real wiring).
            if serial and len(serial) == len(devs):
                endpoint = self.config.endpoint(host, port)
                line = serial[0].connection
                server = await stack.enter_async_context(
                    SimServer.tcp_gateway(
                        host,
                        port,
                        self._units(devs),
                        baudrate=(endpoint.baudrate if endpoint else None) or line.baudrate,
                        parity=line.parity,
                        stopbits=line.stopbits,
                        seed=self._rng.randrange(2**32),
                    )
                )
                self._register(server, devs, f"tcp-gateway://{host}:{server.port}")
                continue
            server = await stack.enter_async_context(
                SimServer.tcp(host, port, self._units(devs), seed=self._rng.randrange(2**32))
            )
            self._register(server, devs, f"tcp://{host}:{server.port}")
        for bus_id, devs in bus_groups.items():
            bus = self.config.bus(bus_id)
            await self._start_bus(stack, bus, devs)

    async def _start_bus(
        self, stack: contextlib.AsyncExitStack, bus: BusConfig, devs: list[DeviceConfig]
    ) -> None:
        if bus.type == "rtu-over-tcp":
            if bus.host is None or not is_loopback(bus.host):
                for dev in devs:
                    self._skip(dev.id, f"bus {bus.id} host {bus.host} is not a loopback address")
                return
            server = await stack.enter_async_context(
                SimServer.rtu_over_tcp(
                    bus.host, bus.tcp_port, self._units(devs), seed=self._rng.randrange(2**32)
                )
            )
            self._register(server, devs, f"rtu-over-tcp://{bus.host}:{server.port}")
            return
        if not bus.port:
            for dev in devs:
                self._skip(dev.id, f"bus {bus.id} has no port path")
            return
        gateway_path, sim_path = await stack.enter_async_context(pty_pair(gateway_link=bus.port))
        server = await stack.enter_async_context(
            SimServer.rtu(
                sim_path,
                self._units(devs),
                baudrate=bus.baudrate,
                parity=bus.parity,
                stopbits=bus.stopbits,
                bytesize=bus.bytesize,
                seed=self._rng.randrange(2**32),
            )
        )
        self._register(server, devs, f"rtu:{gateway_path}")

    def _units(self, devs: list[DeviceConfig]) -> dict[int, RegisterImage]:
        units: dict[int, RegisterImage] = {}
        for dev in devs:
            if dev.unit in units:
                raise GatewayError(f"{dev.id}: unit {dev.unit} is used twice on one address")
            units[dev.unit] = self._images[dev.id]
        return units

    def _register(self, server: SimServer, devs: list[DeviceConfig], endpoint: str) -> None:
        self._servers.append(server)
        for dev in devs:
            self._server_of[dev.id] = (server, dev.unit)
            self.served.append(ServedDevice(dev.id, dev.driver, endpoint, dev.unit))

    def _skip(self, device_id: str, why: str) -> None:
        self.skipped.append((device_id, why))
        log.warning("sim_device_not_served", device=device_id, reason=why)

    # lifecycle --------------------------------------------------------------------------------
    async def __aenter__(self) -> SimSite:
        self._build_devices()
        stack = contextlib.AsyncExitStack()
        await stack.__aenter__()
        try:
            await self._start_servers(stack)
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        self._task = asyncio.create_task(self._run(), name="sim_site")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.truth is not None:
            for charger in self._chargers.values():
                record = charger.open_session_record()
                if record is not None:
                    record["open"] = True
                    self.truth.write(record)
        if self._stack is not None:
            await self._stack.aclose()
            self._stack = None

    async def _run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._tick(), name="sim_tick")
            if self.scenario is not None:
                tg.create_task(self._play(self.scenario), name="sim_scenario")
            else:
                self.scenario_done.set()
            if self.traffic:
                for device_id in self._chargers:
                    if device_id in self._server_of:
                        tg.create_task(self._ev_traffic(device_id), name=f"sim_traffic_{device_id}")

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            await asyncio.sleep(self.tick_s)
            now = loop.time()
            self.advance(self.speed * (now - last))
            last = now

    def advance(self, sim_s: float) -> None:
        """Advance simulated time by ``sim_s`` now (the tick loop calls this; tests may too)."""
        self.sim_time_s += sim_s
        for charger in self._chargers.values():
            charger.step(sim_s)
        for meter in self._meters.values():
            meter.step(sim_s)
        while self._sleepers and self._sleepers[0].wake_s <= self.sim_time_s:
            sleeper = heapq.heappop(self._sleepers)
            if not sleeper.future.done():
                sleeper.future.set_result(None)

    # scenario ---------------------------------------------------------------------------------
    async def _play(self, scenario: Scenario) -> None:
        for step in scenario.steps:
            await self.sleep_until(step.at_s)
            try:
                self.apply(step)
            except (RuntimeError, KeyError) as exc:
                log.warning(
                    "sim_scenario_step_failed",
                    line=step.line,
                    device=step.device,
                    action=step.action,
                    error=str(exc),
                )
        self.scenario_done.set()
        log.info("sim_scenario_done", sim_time_s=round(self.sim_time_s, 1))

    def apply(self, step: ScenarioStep) -> None:
        log.info("sim_scenario_step", at_s=step.at_s, device=step.device, action=step.action)
        if step.action == "fault":
            assert step.fault is not None
            self.set_fault(step.device, step.fault)
            return
        if step.action == "clear_fault":
            self.clear_fault(step.device)
            return
        if step.action == "override":
            assert step.register is not None and step.value is not None
            try:
                self.override(step.device, step.register, step.value, step.polls)
            except (KeyError, ValueError) as exc:  # no such register, or not encodable
                log.error("sim_override_failed", device=step.device, error=str(exc))
            return
        charger = self._chargers[step.device]
        if step.action == "plug_in":
            charger.plug_in(
                tag=step.tag,
                power_w=step.power_w or 11_000.0,
                energy_need_wh=step.energy_need_wh,
                phases=step.phases or 3,
            )
        elif step.action == "tag":
            assert step.tag is not None
            charger.present_tag(step.tag)
        elif step.action == "start":
            charger.start_charging()
        elif step.action == "suspend":
            charger.suspend()
        elif step.action == "resume":
            charger.resume()
        elif step.action == "unplug":
            charger.unplug()

    # random traffic ---------------------------------------------------------------------------
    def _pick_tag(self, charger: SimCharger, rng: random.Random) -> str:
        tokens = self.config.auth.tokens
        if charger.profile.tag is None:
            app = [t.id for t in tokens if t.type is TokenType.APP]
            if app:
                return rng.choice(app)
        cards = [t.id for t in tokens if t.type in (TokenType.RFID, TokenType.KEYFOB)]
        if not cards or rng.random() < self.traffic_profile.unknown_tag_probability:
            return "04" + "".join(rng.choice("0123456789ABCDEF") for _ in range(12))
        return rng.choice(cards)

    async def _ev_traffic(self, device_id: str) -> None:
        charger = self._chargers[device_id]
        tp = self.traffic_profile
        rng = random.Random(f"{self.seed}:{device_id}")
        await self.sleep(rng.uniform(1.0, tp.mean_idle_s / 2))
        while True:
            if charger.ev is not None:  # someone else (a scenario, a test) has the connector
                while charger.ev is not None:
                    await self.sleep(60.0)
            else:
                await self._one_visit(charger, rng)
            await self.sleep(max(tp.min_idle_s, rng.expovariate(1.0 / tp.mean_idle_s)))

    async def _one_visit(self, charger: SimCharger, rng: random.Random) -> None:
        """One EV: arrive, identify, charge (maybe pause), leave. Gives up quietly if another
        actor unplugs or replaces the EV meanwhile."""
        tp = self.traffic_profile
        charger.plug_in(
            power_w=rng.choice(tp.power_w),
            energy_need_wh=rng.uniform(*tp.energy_need_wh),
            phases=rng.choice((1, 3, 3, 3)),
        )
        ev = charger.ev
        await self.sleep(rng.uniform(*tp.tag_delay_s))
        if charger.ev is not ev:
            return
        charger.present_tag(self._pick_tag(charger, rng))
        await self.sleep(rng.uniform(1.0, 5.0))
        if charger.ev is not ev:
            return
        charger.start_charging()
        if rng.random() < tp.suspend_probability:
            await self.sleep(rng.uniform(300.0, 1800.0))
            if charger.ev is not ev:
                return
            charger.suspend()
            await self.sleep(rng.uniform(*tp.suspend_s))
            if charger.ev is not ev:
                return
            charger.resume()
        # Leave when full (or after a long stay when the gateway kept it from charging).
        stay_limit = self.sim_time_s + 4 * 3600.0
        while charger.ev is ev and ev is not None and not ev.satisfied:
            if self.sim_time_s >= stay_limit:
                break
            await self.sleep(60.0)
        await self.sleep(rng.uniform(*tp.linger_s))
        if charger.ev is ev:
            charger.unplug()


def _print_served(site: SimSite, out: TextIO) -> None:
    for served in site.served:
        print(
            f"{served.device_id:<16} {served.driver:<22} {served.endpoint} unit {served.unit}",
            file=out,
        )
    for device_id, why in site.skipped:
        print(f"{device_id:<16} not served: {why}", file=out)
    out.flush()


async def run_simulator(
    config_path: str | Path,
    scenario_path: str | Path | None = None,
    speed: float = 1.0,
    duration_s: float | None = None,
    seed: int | None = None,
    truth_path: str | Path | None = None,
) -> int:
    """``evgw simulate``: serve every device of the site config until cancelled (Ctrl-C) or for
    ``duration_s`` real seconds. Prints where each device is served."""
    from gateway.config import load_config
    from gateway.profiles import load_profiles

    config = load_config(config_path)
    profiles = load_profiles(config.drivers_path)
    scenario = None
    if scenario_path is not None:
        scenario = load_scenario(
            scenario_path,
            device_ids=[d.id for d in config.devices],
            charger_ids=[
                d.id
                for d in config.devices
                if d.driver in profiles and profiles[d.driver].kind is DeviceKind.CHARGER
            ],
        )
    async with SimSite(
        config, profiles, speed=speed, scenario=scenario, truth_path=truth_path, seed=seed
    ) as site:
        _print_served(site, sys.stdout)
        ocpp_task = None
        if config.ocpp is not None and config.modbus_devices != config.devices:
            from gateway.ocpp.sim import simulate_charge_points

            ocpp_task = asyncio.get_running_loop().create_task(
                simulate_charge_points(config, speed, sys.stdout), name="sim-ocpp"
            )
        print(f"simulating at {speed:g}x; Ctrl-C to stop", file=sys.stdout, flush=True)
        try:
            if duration_s is not None:
                await asyncio.sleep(duration_s)
            else:
                await asyncio.Event().wait()
        finally:
            if ocpp_task is not None:
                ocpp_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ocpp_task
    return 0
