"""The fault matrix: one simulated site, the real gateway process, a real mosquitto behind a
fault proxy, a persistent subscriber, and every fault kind applied in turn (a phase per kind).

How sessions are counted: the runner drives every EV itself (plug in, RFID, charge, full, leave)
on the in-process simulator, so it knows each session's truth (the simulator's energy) and the
phase it ended in. At the end the gateway's records (buffer and cloud) are matched to the truth
per charger in order: a truth session with no record is lost, a record with no truth is spurious,
a record delivered more than once is duplicated (allowed: at-least-once), energy must equal the
truth within counter resolution unless the record is flagged ``start_latched`` (the gateway was
down when the car began to draw and the charger keeps no plug-reset session counter: the energy
before the first reading is unknown and never invented, so it may only be lower).

A car is never swapped while the gateway is blind (killed, or its charger faulted): before a
plug-in the runner waits until the gateway has watched the free connector for a second. A swap
inside one blind window cannot be told from a counter reset on a coarse counter; that is a
limit of the devices, not a fault the gateway can handle.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import glob
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.config import load_config
from gateway.profiles import load_profiles
from gateway.records import GENESIS, record_hash
from gateway.sim.server import Fault, FaultKind
from gateway.sim.site import SimSite
from tests.support.mqtt_broker import FaultProxy, MosquittoBroker, free_port
from tests.support.uplink import PREFIX, ROOT, SITE, Recorder

# Debian's libfaketime (scripts/test.sh installs it); its path names the architecture
FAKETIME_LIB = next(iter(sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))), "")

TAGS = ["04A2B3C4D5E6F7", "FOB-0042", "CAROL-0001"]
TOKENS = (
    '    - {id: "04A2B3C4D5E6F7", type: rfid, user: alice}\n'
    '    - {id: "FOB-0042", type: keyfob, user: bob}\n'
    '    - {id: "CAROL-0001", type: rfid, user: carol}\n'
)
# charger id -> (driver, shows a tag, on the RS-485 bus)
MATRIX_CHARGERS: dict[str, tuple[str, bool, bool]] = {
    "cp1": ("webasto-next", True, False),
    "cp2": ("vestel-evc04", True, False),
    "cp3": ("abb-terra-ac", False, False),
    "cp4": ("abb-terra-ac", False, True),  # Modbus RTU on a pty: the line-noise fault's target
}
SOAK_DRIVERS = [("webasto-next", True), ("vestel-evc04", True), ("abb-terra-ac", False)]

# faults that restart the gateway: a soak leaves them out to watch one process's memory (the
# matrix's long run covers them)
RESTARTING = ("kill", "kill-drain", "term", "clock-jump")


@dataclass
class Truth:
    charger: str
    energy_wh: float
    counter_start_wh: float | None
    counter_end_wh: float | None
    tag: str | None
    phase: str


@dataclass
class PhaseResult:
    fault: str
    cycles: int = 0
    expected: int = 0
    received: int = 0
    duplicated: int = 0
    lost: int = 0
    spurious: int = 0
    energy_bad: int = 0
    latched: int = 0
    seconds: float = 0.0


@dataclass
class RunResult:
    phases: list[PhaseResult] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    rss_kb: list[tuple[float, int]] = field(default_factory=list)  # (s since start, VmRSS)
    sessions: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems and all(
            p.lost == 0 and p.spurious == 0 and p.energy_bad == 0 for p in self.phases
        )

    def table(self) -> str:
        head = (
            f"{'fault':<22} {'cycles':>6} {'expected':>8} {'received':>8} {'duplicated':>10} "
            f"{'lost':>5} {'energy!=':>8} {'latched':>7} {'seconds':>7}"
        )
        rows = [head, "-" * len(head)]
        total = PhaseResult("total")
        for p in self.phases:
            rows.append(_row(p))
            for name in ("cycles", "expected", "received", "duplicated", "lost", "spurious"):
                setattr(total, name, getattr(total, name) + getattr(p, name))
            total.energy_bad += p.energy_bad
            total.latched += p.latched
            total.seconds += p.seconds
        rows += ["-" * len(head), _row(total)]
        if total.spurious:
            rows.append(f"spurious records (no simulated session behind them): {total.spurious}")
        return "\n".join(rows)


def _row(p: PhaseResult) -> str:
    return (
        f"{p.fault:<22} {p.cycles:>6} {p.expected:>8} {p.received:>8} {p.duplicated:>10} "
        f"{p.lost:>5} {p.energy_bad:>8} {p.latched:>7} {p.seconds:>7.0f}"
    )


class Site:
    """Everything one run needs; ``async with Site(...)``."""

    def __init__(
        self,
        workdir: Path,
        *,
        seed: int,
        speed: float = 20.0,
        soak_devices: int = 0,
        poll: str = "200ms",
        log: Callable[[str], None] = print,
    ) -> None:
        self.dir = workdir
        self.rng = random.Random(seed)
        self.seed = seed
        self.speed = speed
        self.log = log
        self.poll = poll
        self.chargers: dict[str, tuple[str, bool, bool]] = (
            dict(MATRIX_CHARGERS)
            if not soak_devices
            else {
                f"cp{n + 1}": (SOAK_DRIVERS[n % 3][0], SOAK_DRIVERS[n % 3][1], False)
                for n in range(soak_devices)
            }
        )
        self.pty = f"/tmp/evgw-rel-{os.getpid()}-{seed}-rs485"
        self.broker = MosquittoBroker(workdir / "mosquitto")
        self.proxy: FaultProxy | None = None
        self.recorder: Recorder | None = None
        self.sim: SimSite | None = None
        self.gateway: subprocess.Popen[bytes] | None = None
        self.gateway_log = workdir / "gateway.log"
        self.data_dir = workdir / "data"  # the buffer's file system (a small tmpfs when allowed)
        self.tmpfs = False
        self.faketime_file = workdir / "faketime"
        self.faketime = False
        self.truths: list[Truth] = []
        self.phase = "start"
        self.healthy_since: float | None = None
        self._polls_at: dict[str, int] | None = None  # reads per charger when a fault ended
        self.stop_traffic = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._stack = contextlib.AsyncExitStack()
        self.kills = 0
        self.broker_restarts = 0
        self.crashes: list[str] = []  # the gateway exited by itself (restarted as systemd would)
        self.expect_exit = False
        self.gw_lock = asyncio.Lock()
        self.harness_errors: list[str] = []
        self.findings: list[str] = []  # gateway misbehaviour that is no lost session
        self._scanned = 0
        self._started: dict[str, int] = {}

    # ---------------------------------------------------------------------------- set-up
    def _site_yaml(self) -> str:
        assert self.proxy is not None
        devices = []
        bus = ""
        ports: set[int] = {self.proxy.port, self.broker.port}
        for cid, (driver, _, on_bus) in self.chargers.items():
            if on_bus:
                devices.append(
                    f"  - {{id: {cid}, driver: {driver}, bus: rs485-1, unit: 1, "
                    f"poll_interval: {self.poll}, timeout: 300ms}}\n"
                )
                bus = (
                    "buses:\n  - {id: rs485-1, type: rtu, "
                    f"port: {self.pty}, baudrate: 19200, parity: N, stopbits: 1, timeout: 300ms}}\n"
                )
            else:
                devices.append(
                    f"  - {{id: {cid}, driver: {driver}, host: 127.0.0.1, port: {_port(ports)}, "
                    f"poll_interval: {self.poll}, timeout: 300ms}}\n"
                )
        return (
            f"site: {{id: {SITE}, timezone: UTC}}\n"
            # the size cap below the 96 MB file system, as an operator sets it (readings pruned)
            f"storage: {{path: {self.data_dir}/buffer.db, max_size_mb: 48}}\n"
            f'uplink: {{url: "mqtt://127.0.0.1:{self.proxy.port}", client_id: evgw-reliability, '
            f"topic_prefix: {PREFIX}, keepalive: 5s}}\n"
            + bus
            + "devices:\n"
            + "".join(devices)
            + "auth:\n  tokens:\n"
            + TOKENS
        )

    async def __aenter__(self) -> Site:
        await self._stack.__aenter__()
        try:
            await self._setup()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def _setup(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(exist_ok=True)
        self.tmpfs = _mount_tmpfs(self.data_dir, "96m")
        if self.tmpfs:
            self._stack.callback(_umount, self.data_dir)
        await self.broker.start()
        self._stack.callback(self.broker.kill)
        self.proxy = FaultProxy(self.broker.port)
        await self.proxy.start()
        self._stack.push_async_callback(self.proxy.close)
        self.recorder = Recorder(self.broker.port, client_id=f"cloud-reliability-{self.seed}")
        if len(self.chargers) > 10:  # a soak: the sessions only, not every reading
            self.recorder.topic_filter = f"{ROOT}/sessions/#"
        self._spawn_task(self.recorder.run(), "recorder")
        await _until(self.recorder.connected.is_set, 10, "the cloud subscriber")
        config_path = self.dir / "site.yaml"
        config_path.write_text(self._site_yaml())
        config = load_config(config_path)
        profiles = load_profiles(config.drivers_path)
        self.sim = SimSite(
            config,
            profiles,
            speed=self.speed,
            truth_path=self.dir / "truth.jsonl",
            seed=self.seed,
            traffic=False,
        )
        await self._stack.enter_async_context(self.sim)
        self._stack.push_async_callback(self._stop_gateway)
        self._stack.push_async_callback(self._cancel_tasks)
        await self.start_gateway()
        self._spawn_task(self._watch(), "watchdog")
        for cid in self.chargers:
            self._spawn_task(self._visits(cid), f"visits-{cid}")

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    def _spawn_task(self, coro: Awaitable[Any], name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        task.add_done_callback(self._task_done)
        self._tasks.append(task)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.harness_errors.append(f"{task.get_name()}: {task.exception()!r}")
            self.log(f"harness task {task.get_name()} failed: {task.exception()!r}")

    async def _cancel_tasks(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # ---------------------------------------------------------------------------- the gateway
    def _starts(self) -> int:
        if not self.gateway_log.exists():
            return 0
        return self.gateway_log.read_text(errors="replace").count('"gateway_started"')

    def _spawn_gateway(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if self.faketime:
            env |= {
                "LD_PRELOAD": FAKETIME_LIB,
                "FAKETIME_TIMESTAMP_FILE": str(self.faketime_file),
                "FAKETIME_CACHE_DURATION": "1",
                "DONT_FAKE_MONOTONIC": "1",
            }
        with self.gateway_log.open("ab") as out:
            self.gateway = subprocess.Popen(
                [sys.executable, "-m", "gateway", "--log-json", "run", "-c", "site.yaml"],
                cwd=self.dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    async def start_gateway(self, wait: bool = True) -> None:
        starts = self._starts()
        self._spawn_gateway()
        if wait:
            await self.wait_started(starts + 1)

    async def wait_started(self, n: int, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self._starts() < n:
            if self.gateway is None or self.gateway.poll() is not None:
                raise RuntimeError(f"the gateway exited on its own:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the gateway did not start in {timeout_s:.0f} s")
            await asyncio.sleep(0.05)

    async def _watch(self) -> None:
        """systemd's part (Restart=always): a gateway that exits by itself is started again;
        every such exit is a finding."""
        while True:
            await asyncio.sleep(0.2)
            g = self.gateway
            if g is None or self.expect_exit or g.poll() is None:
                continue
            async with self.gw_lock:
                if self.gateway is not g or self.expect_exit:
                    continue
                why = _last_error(self.gateway_log)
                self.crashes.append(f"exit {g.returncode} in phase {self.phase}: {why}")
                self.log(f"the gateway exited {g.returncode} by itself: {why}")
                self.blind()
                await asyncio.sleep(1.0)
                try:
                    await self.start_gateway()
                except RuntimeError as exc:
                    self.log(f"restart failed: {exc}")
                    continue
                self.seeing()

    def log_tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.gateway_log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    async def _stop_gateway(self) -> None:
        if self.gateway is not None and self.gateway.poll() is None:
            self.gateway.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(self.gateway.wait, 20)
            except subprocess.TimeoutExpired:
                self.gateway.kill()
                self.gateway.wait()

    def rss_kb(self) -> int | None:
        if self.gateway is None or self.gateway.poll() is not None:
            return None
        try:
            for line in Path(f"/proc/{self.gateway.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        except OSError:
            return None
        return None

    # ---------------------------------------------------------------------------- EV traffic
    def blind(self) -> None:
        self.healthy_since = None
        self._polls_at = None

    def seeing(self) -> None:
        """The fault is over; the gateway sees the site again once it has read every charger
        anew (a logged start is not enough: under load the first poll came seconds later)."""
        if self.healthy_since is None and self._polls_at is None and self.sim is not None:
            self._polls_at = {cid: self.sim.image(cid).reads for cid in self.chargers}

    def _polled_again(self) -> None:
        if (
            self.healthy_since is None
            and self._polls_at is not None
            and self.sim is not None
            and all(self.sim.image(c).reads > n for c, n in self._polls_at.items())
        ):
            self.healthy_since, self._polls_at = time.monotonic(), None

    async def _wait_seen(self, since: float) -> None:
        """Until the gateway has watched the site, undisturbed, for a second after ``since``."""
        while True:
            self._polled_again()
            hs = self.healthy_since
            if hs is not None and time.monotonic() - max(hs, since) >= 1.0:
                return
            await asyncio.sleep(0.05)

    async def _visits(self, cid: str) -> None:
        assert self.sim is not None
        sim = self.sim
        charger = sim.charger(cid)
        _, shows_tag, _ = self.chargers[cid]
        rng = random.Random(f"{self.seed}:{cid}")
        await sim.sleep(rng.uniform(5, 120) * HOLD_SCALE[0])
        left = time.monotonic()
        n = 0
        while not self.stop_traffic.is_set():
            await self._wait_seen(left)
            if self.stop_traffic.is_set():
                return
            tag = TAGS[n % len(TAGS)] if shows_tag else None
            n += 1
            # Sped-up time: the gateway bounds a counter's rise by max power x wall-clock time, so
            # the simulated car draws at most 11 kW in wall-clock terms.
            charger.plug_in(power_w=rng.choice((0.25, 0.5, 1.0)) * 11_000.0 / self.speed)
            await sim.sleep(rng.uniform(5, 20))
            if tag is not None:
                # The simulated charger would deliver before the gateway authorized it; the
                # gateway bills from the authorization (the tag), so the car waits for it, as a
                # real charger does. Sped-up time would otherwise squeeze the tag and the start
                # into one poll interval.
                before = self.started(cid)
                charger.present_tag(tag)
                with contextlib.suppress(RuntimeError):  # not in 30 s: it charges anyway
                    await _until(
                        functools.partial(self._started_since, cid, before), 30.0, "a start"
                    )
            await sim.sleep(rng.uniform(5, 15))
            charger.start_charging()
            await sim.sleep(rng.uniform(120, 400) * CHARGE_SCALE[0])
            charger.suspend()  # the car is full: counters stand still before it leaves
            await sim.sleep(30)
            record = charger.unplug()
            left = time.monotonic()
            if record is not None:
                self.truths.append(
                    Truth(
                        cid,
                        float(record["energy_wh"]),
                        record.get("counter_start_wh"),
                        record.get("counter_end_wh"),
                        record["tag"],
                        self.phase,
                    )
                )
            await sim.sleep(rng.uniform(60, 240))

    # ---------------------------------------------------------------------------- checks
    def started(self, cid: str) -> int:
        """``sessions/started`` messages the cloud got for charger ``cid``."""
        assert self.recorder is not None
        messages = self.recorder.messages
        topic = f"{ROOT}/sessions/started"
        while self._scanned < len(messages):
            m = messages[self._scanned]
            self._scanned += 1
            if m.topic == topic:
                sid = m.json().get("charger_id")
                self._started[sid] = self._started.get(sid, 0) + 1
        return self._started.get(cid, 0)

    def _started_since(self, cid: str, before: int) -> bool:
        return self.started(cid) != before

    def received(self) -> list[dict[str, Any]]:
        assert self.recorder is not None
        return self.recorder.sessions()

    def delivered_per_charger(self) -> dict[str, int]:
        seen: dict[str, set[str]] = {}
        for rec in self.received():
            seen.setdefault(rec["charger_id"], set()).add(rec["session_id"])
        return {cid: len(ids) for cid, ids in seen.items()}

    def _all_delivered(self, upto: int | None = None) -> bool:
        want: dict[str, int] = {}
        for t in self.truths[:upto]:
            want[t.charger] = want.get(t.charger, 0) + 1
        have = self.delivered_per_charger()
        return all(have.get(cid, 0) >= n for cid, n in want.items())

    async def settle(self, timeout_s: float) -> bool:
        """Until every session finished so far reached the cloud (later ones may still travel:
        with many chargers one always has)."""
        deadline = time.monotonic() + timeout_s
        upto = len(self.truths)
        while not self._all_delivered(upto):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.2)
        return True

    async def drain_traffic(self, timeout_s: float) -> None:
        """No new cars; wait for the ones on site to leave."""
        assert self.sim is not None
        self.stop_traffic.set()
        deadline = time.monotonic() + timeout_s
        while any(c.ev is not None for c in self.sim.chargers.values()):
            if time.monotonic() > deadline:
                raise RuntimeError("cars still on site after the traffic was stopped")
            await asyncio.sleep(0.2)


# -------------------------------------------------------------------------------- the faults


Injector = Callable[[Site, random.Random], Awaitable[None]]


async def _restart_after(site: Site, sig: int, rng: random.Random) -> None:
    async with site.gw_lock:
        assert site.gateway is not None
        site.blind()
        site.expect_exit = True
        try:
            crashed = site.gateway.poll()
            site.gateway.send_signal(sig)
            rc = await asyncio.to_thread(site.gateway.wait)
            if sig == signal.SIGTERM and rc != 0 and crashed is None:
                why = _last_error(site.gateway_log)
                site.crashes.append(f"exit {rc} on SIGTERM in phase {site.phase}: {why}")
            if sig == signal.SIGKILL:
                site.kills += 1
            await site.start_gateway(wait=True)
        finally:
            site.expect_exit = False
        site.seeing()


async def fault_kill(site: Site, rng: random.Random) -> None:
    """SIGKILL at a random moment: sometimes during start-up (opening and migrating the
    buffer), mostly while it polls, commits sessions and publishes."""
    if rng.random() < 0.2:
        async with site.gw_lock:
            site.expect_exit = True
            try:
                await _kill_in_startup(site, rng)
            finally:
                site.expect_exit = False
        site.seeing()
        return
    await _restart_after(site, signal.SIGKILL, rng)


async def _kill_in_startup(site: Site, rng: random.Random) -> None:
    assert site.gateway is not None
    site.blind()
    starts = site._starts()
    site.gateway.send_signal(signal.SIGKILL)
    await asyncio.to_thread(site.gateway.wait)
    site.kills += 1
    site._spawn_gateway()
    await asyncio.sleep(rng.uniform(0.3, 2.5))  # inside start-up: imports, opening the buffer
    if site._starts() < starts + 1:
        site.gateway.send_signal(signal.SIGKILL)
        await asyncio.to_thread(site.gateway.wait)
        site.kills += 1
        await site.start_gateway(wait=True)
    else:
        await site.wait_started(starts + 1)


async def fault_kill_drain(site: Site, rng: random.Random) -> None:
    """SIGKILL while the outbox drains: the broker unreachable for a while (sessions queue up),
    then reachable again and the gateway killed moments after it reconnected."""
    assert site.proxy is not None
    site.proxy.refuse(True)
    site.proxy.drop_all()
    await _hold(rng, 3.0, 8.0)
    before = site.proxy.connections
    site.proxy.refuse(False)
    try:
        await _until(lambda: _reconnected(site, before), 60, "the gateway reconnecting")
    except RuntimeError:
        site.findings.append(f"no reconnect within 60 s after the broker came back ({site.phase})")
        site.log(site.findings[-1])
    await asyncio.sleep(rng.uniform(0.0, 0.5))
    await _restart_after(site, signal.SIGKILL, rng)


def _reconnected(site: Site, before: int) -> bool:
    return site.proxy is not None and site.proxy.connections > before


async def fault_term(site: Site, rng: random.Random) -> None:
    await _restart_after(site, signal.SIGTERM, rng)


async def fault_broker_term(site: Site, rng: random.Random) -> None:
    await site.broker.stop()
    await _hold(rng, 0.2, 2.0)
    await site.broker.start()
    site.broker_restarts += 1


async def fault_broker_kill(site: Site, rng: random.Random) -> None:
    site.broker.kill()
    await _hold(rng, 0.2, 2.0)
    await site.broker.start()
    site.broker_restarts += 1


async def fault_broker_kill_nopersist(site: Site, rng: random.Random) -> None:
    """SIGKILL and the broker's persistence file gone: it comes back knowing no session, no
    subscription and no queued message."""
    site.broker.kill()
    (site.broker.directory / "mosquitto.db").unlink(missing_ok=True)
    await _hold(rng, 0.2, 2.0)
    await site.broker.start()
    site.broker_restarts += 1


HOLD_SCALE = [1.0]  # the CI-sized run shortens every fault's duration
# ... and every charge: the cars on site when the faults are over must leave before the checks,
# and shorter charges also mean more sessions during the faults
CHARGE_SCALE = [1.0]
STOP_AT = [math.inf]  # monotonic time after which no further fault cycle starts


async def _hold(rng: random.Random, low: float = 0.5, high: float = 3.0) -> None:
    await asyncio.sleep(rng.uniform(low, high) * HOLD_SCALE[0])


async def fault_proxy_drop(site: Site, rng: random.Random) -> None:
    assert site.proxy is not None
    site.proxy.drop_all()
    await _hold(rng, 0.1, 1.0)


async def fault_proxy_reset(site: Site, rng: random.Random) -> None:
    assert site.proxy is not None
    site.proxy.reset_all()
    await _hold(rng, 0.1, 1.0)


async def fault_proxy_stall(site: Site, rng: random.Random) -> None:
    """The link goes dead without a close: nothing passes until the keepalive notices."""
    assert site.proxy is not None
    site.proxy.stall(True)
    await _hold(rng, 2.0, 10.0)
    site.proxy.stall(False)


async def fault_proxy_half_open(site: Site, rng: random.Random) -> None:
    assert site.proxy is not None
    before = site.proxy.connections
    site.proxy.half_open(True)
    try:
        await _until(lambda: _reconnected(site, before), 60, "the gateway reconnecting")
    except RuntimeError:
        site.findings.append(
            f"half-open link not noticed within 60 s (keepalive 5 s) in phase {site.phase}"
        )
        site.log(site.findings[-1])
    finally:
        site.proxy.half_open(False)


async def fault_proxy_throttle(site: Site, rng: random.Random) -> None:
    assert site.proxy is not None
    site.proxy.throttle(64_000 / 8)  # 64 kbit/s
    await _hold(rng, 3.0, 8.0)
    site.proxy.throttle(None)


def _device_fault(kind: FaultKind, *, rtu: bool = False) -> Injector:
    async def inject(site: Site, rng: random.Random) -> None:
        assert site.sim is not None
        ids = [c for c, (_, _, on_bus) in site.chargers.items() if on_bus == rtu] or list(
            site.chargers
        )
        cid = rng.choice(ids)
        fault = Fault(kind, code=rng.choice((4, 6)) if kind is FaultKind.EXCEPTION else 4)
        site.blind()
        site.sim.set_fault(cid, fault)
        await _hold(rng, 0.5, 2.5)
        site.sim.clear_fault(cid)
        site.seeing()

    return inject


async def fault_disk_full(site: Site, rng: random.Random) -> None:
    """The buffer's file system fills up (a tmpfs), then space comes back."""
    if not site.tmpfs:
        raise RuntimeError("disk-full needs a tmpfs mount (run as root)")
    filler = site.data_dir / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (1 << 20, 1 << 12, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    await _hold(rng, 2.0, 5.0)
    filler.unlink()


async def fault_clock(site: Site, rng: random.Random) -> None:
    """The wall clock jumps an hour forward or back (libfaketime on the gateway only;
    monotonic time is untouched, as with an NTP step)."""
    if not site.faketime:
        site.faketime_file.write_text("+0\n")
        site.faketime = True
        await _restart_after(site, signal.SIGTERM, rng)
    jump = rng.choice(("+3600", "-3600", "+86400", "-600"))
    site.faketime_file.write_text(f"{jump}\n")
    await _hold(rng, 2.0, 5.0)
    site.faketime_file.write_text("+0\n")
    await asyncio.sleep(1.2)  # libfaketime re-reads the file at most once a second


FAULTS: dict[str, Injector] = {
    "kill": fault_kill,
    "kill-drain": fault_kill_drain,
    "term": fault_term,
    "broker-term": fault_broker_term,
    "broker-kill": fault_broker_kill,
    "broker-kill-nopersist": fault_broker_kill_nopersist,
    "proxy-drop": fault_proxy_drop,
    "proxy-reset": fault_proxy_reset,
    "proxy-stall": fault_proxy_stall,
    "proxy-half-open": fault_proxy_half_open,
    "proxy-throttle-64k": fault_proxy_throttle,
    "device-timeout": _device_fault(FaultKind.NO_ANSWER),
    "device-garbage": _device_fault(FaultKind.GARBAGE),
    "device-exception": _device_fault(FaultKind.EXCEPTION),
    "device-disconnect": _device_fault(FaultKind.DROP),
    "rtu-noise": _device_fault(FaultKind.GARBAGE, rtu=True),
    "disk-full": fault_disk_full,
    "clock-jump": fault_clock,
}


# -------------------------------------------------------------------------------- helpers


async def _until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def _mount_tmpfs(path: Path, size: str) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    return done.returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def _port(taken: set[int]) -> int:
    """A free port none of the site's other addresses has (free_port alone may repeat one)."""
    while True:
        port = free_port()
        if port not in taken:
            taken.add(port)
            return port


def _last_error(log: Path) -> str:
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return "?"
    for line in reversed(lines[-200:]):
        if "Error" in line or '"error"' in line or "Traceback" in line:
            return line.strip()[:300]
    return lines[-1].strip()[:300] if lines else "?"


def faketime_available() -> bool:
    return bool(FAKETIME_LIB) and os.path.exists(FAKETIME_LIB)


# -------------------------------------------------------------------------------- the run


async def run_matrix(
    faults: list[str],
    cycles: int | dict[str, int],
    *,
    seed: int = 1,
    workdir: Path | None = None,
    speed: float = 20.0,
    soak_s: float = 0.0,
    soak_devices: int = 0,
    quick: bool = False,
    stop_after_s: float | None = None,
    log: Callable[[str], None] = print,
) -> RunResult:
    """Every fault of ``faults`` ``cycles`` times (a phase each), or with ``soak_s`` random faults
    for that long; then the checks. Returns the table's figures and every problem found."""
    result = RunResult()
    HOLD_SCALE[0] = 0.3 if quick else 1.0
    CHARGE_SCALE[0] = 0.5 if quick else 1.0
    tmp: tempfile.TemporaryDirectory[str] | None = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="evgw-reliability-")
        workdir = Path(tmp.name)
    rng = random.Random(seed)
    phases: dict[str, PhaseResult] = {}
    started = time.monotonic()
    STOP_AT[0] = started + stop_after_s if stop_after_s else math.inf
    try:
        async with Site(
            workdir,
            seed=seed,
            speed=speed,
            soak_devices=soak_devices,
            poll="1s" if soak_devices else "200ms",
            log=log,
        ) as site:
            site.seeing()
            rss_task = asyncio.ensure_future(_sample_rss(site, result, started))
            try:
                if soak_s:
                    await _soak(site, faults, rng, soak_s, phases, log)
                else:
                    for name in faults:
                        n = cycles if isinstance(cycles, int) else cycles.get(name, 1)
                        await _phase(site, name, n, rng, phases, log)
                        if time.monotonic() > STOP_AT[0]:
                            log("--stop-after reached: no further faults")
                            break
                site.phase = "end"
                await site.drain_traffic(600)
                if not await site.settle(180):
                    result.problems.append("not every session reached the cloud in 180 s")
                await asyncio.sleep(1.0)  # a late duplicate still on its way
            finally:
                rss_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await rss_task
            result.problems += [f"gateway crash: {c}" for c in site.crashes]
            result.problems += [f"harness: {e}" for e in site.harness_errors]
            result.problems += [f"finding: {f}" for f in site.findings]
            buffer_records = await _buffer_records(site)
            _check(site, buffer_records, phases, result)
            result.problems += [
                f"schema: {p}" for p in (site.recorder.problems if site.recorder else [])
            ]
            log(f"kills: {site.kills}, broker restarts: {site.broker_restarts}")
    finally:
        if tmp is not None:
            tmp.cleanup()
    result.phases = list(phases.values())
    return result


async def _phase(
    site: Site,
    name: str,
    cycles: int,
    rng: random.Random,
    phases: dict[str, PhaseResult],
    log: Callable[[str], None],
) -> None:
    inject = FAULTS[name]
    site.phase = name
    p = phases.setdefault(name, PhaseResult(name))
    t0 = time.monotonic()
    for _ in range(cycles):
        if time.monotonic() > STOP_AT[0]:
            log(f"{name}: stopped after {p.cycles} of {cycles} cycles (--stop-after)")
            break
        await _hold(rng, 0.2, 2.0)
        await inject(site, rng)
        p.cycles += 1
        if p.cycles % 50 == 0:
            log(
                f"{name}: {p.cycles}/{cycles} cycles, {len(site.truths)} sessions, "
                f"{len(site.crashes)} crashes, {time.monotonic() - t0:.0f} s"
            )
    if name == "clock-jump" and site.faketime:
        site.faketime = False
        await _restart_after(site, signal.SIGTERM, rng)
    # The CI-sized run (HOLD_SCALE < 1) does not wait here: the final check covers every
    # session all the same, and the waits (reconnect back-off) overlap with the next fault.
    if HOLD_SCALE[0] >= 1.0 and not await site.settle(120):
        log(f"{name}: not every session reached the cloud within 120 s after the faults")
    p.seconds += time.monotonic() - t0
    log(f"{name}: {p.cycles} cycles in {p.seconds:.0f} s, {len(site.truths)} sessions so far")


async def _soak(
    site: Site,
    faults: list[str],
    rng: random.Random,
    soak_s: float,
    phases: dict[str, PhaseResult],
    log: Callable[[str], None],
) -> None:
    end = time.monotonic() + soak_s
    last_report = 0.0
    while time.monotonic() < end:
        name = rng.choice(faults)
        site.phase = name
        p = phases.setdefault(name, PhaseResult(name))
        t0 = time.monotonic()
        await asyncio.sleep(rng.uniform(5.0, 30.0))
        await FAULTS[name](site, rng)
        if name == "clock-jump" and site.faketime:
            site.faketime = False
            await _restart_after(site, signal.SIGTERM, rng)
        p.cycles += 1
        p.seconds += time.monotonic() - t0
        if time.monotonic() - last_report > 300:
            last_report = time.monotonic()
            log(
                f"soak: {int(soak_s - (end - time.monotonic()))} s, {len(site.truths)} sessions, "
                f"gateway RSS {site.rss_kb()} kB"
            )
    await site.settle(300)


async def _sample_rss(site: Site, result: RunResult, started: float) -> None:
    while True:
        rss = site.rss_kb()
        if rss is not None:
            result.rss_kb.append((time.monotonic() - started, rss))
        await asyncio.sleep(10.0)


async def _buffer_records(site: Site) -> list[dict[str, Any]]:
    from gateway.store import Store

    async with Store.open(site.data_dir / "buffer.db", site_id=SITE, create=False) as store:
        records = await store.finished_sessions()
        still_open = await store.load_open_sessions()
    if still_open:
        site.log(f"still open in the buffer: {len(still_open)}")
    return list(records)


def _check(
    site: Site,
    buffer_records: list[dict[str, Any]],
    phases: dict[str, PhaseResult],
    result: RunResult,
) -> None:
    problems = result.problems
    got = site.received()
    deliveries: dict[str, int] = {}
    first: dict[str, dict[str, Any]] = {}
    for rec in got:
        sid = rec["session_id"]
        deliveries[sid] = deliveries.get(sid, 0) + 1
        if sid in first and first[sid] != rec:
            problems.append(f"{sid}: a duplicate differs from the first delivery")
        first.setdefault(sid, rec)
    # seq gap-free and the chain intact, in the buffer and at the cloud
    for label, records in (("buffer", buffer_records), ("cloud", list(first.values()))):
        prev = GENESIS
        for n, rec in enumerate(sorted(records, key=lambda r: r["seq"]), start=1):
            if rec["seq"] != n:
                problems.append(f"{label}: seq {rec['seq']} where {n} was due")
                break
            if rec["prev_hash"] != prev or rec["hash"] != record_hash(rec):
                problems.append(f"{label}: hash chain broken at seq {n}")
                break
            prev = rec["hash"]
    if {r["session_id"] for r in buffer_records} != set(first):
        problems.append(
            f"buffer holds {len(buffer_records)} sessions, the cloud got {len(first)} distinct"
        )
    firsts = [r["seq"] for r in first.values()]
    result.sessions = len(site.truths)
    # match the truth per charger in order
    for cid in site.chargers:
        theirs = [t for t in site.truths if t.charger == cid]
        mine = sorted((r for r in first.values() if r["charger_id"] == cid), key=lambda r: r["seq"])
        for i, truth in enumerate(theirs):
            p = phases.setdefault(truth.phase, PhaseResult(truth.phase))
            p.expected += 1
            if i >= len(mine):
                p.lost += 1
                problems.append(f"{cid}: session {i + 1} ({truth}) never reached the cloud")
                continue
            rec = mine[i]
            p.received += deliveries[rec["session_id"]]
            p.duplicated += deliveries[rec["session_id"]] - 1
            why = f"{cid} #{i + 1} in {truth.phase}: record {rec['energy_wh']} Wh {rec['flags']}"
            if "start_latched" in rec["flags"]:
                p.latched += 1
                if not 0 <= rec["energy_wh"] <= truth.energy_wh + 1:
                    p.energy_bad += 1
                    problems.append(f"{why}, truth {truth.energy_wh} Wh")
            elif abs(rec["energy_wh"] - truth.energy_wh) > 1:
                p.energy_bad += 1
                problems.append(f"{why}, truth {truth.energy_wh} Wh")
            if truth.tag is not None and (rec.get("user") or {}).get("token") != truth.tag:
                problems.append(f"{why}: token {rec.get('user')} where {truth.tag} showed")
        for rec in mine[len(theirs) :]:
            p = phases.setdefault("end", PhaseResult("end"))
            p.spurious += 1
            problems.append(f"{cid}: a record with no simulated session behind it: {rec}")
    if firsts != sorted(firsts):
        problems.append("first deliveries out of seq order")


def rss_summary(samples: list[tuple[float, int]]) -> str:
    if len(samples) < 4:
        return "RSS: too few samples"
    values = [kb for _, kb in samples]
    n = len(values)
    q = max(1, n // 4)
    first, last = sum(values[:q]) / q, sum(values[-q:]) / q
    return (
        f"gateway RSS: {len(samples)} samples, min {min(values)} kB, max {max(values)} kB, "
        f"first quarter mean {first:.0f} kB, last quarter mean {last:.0f} kB "
        f"({(last - first) / first * 100:+.1f} %)"
    )


def dump(result: RunResult, path: Path) -> None:
    path.write_text(
        json.dumps(
            {
                "ok": result.ok,
                "phases": [p.__dict__ for p in result.phases],
                "problems": result.problems,
                "rss_kb": result.rss_kb,
                "sessions": result.sessions,
            },
            indent=1,
        )
    )


def can_mount_tmpfs() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None
