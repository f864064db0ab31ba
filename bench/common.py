"""Shared pieces: result types, medians, machine/version facts, simulator and broker processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import resource
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
MOSQUITTO = "/usr/sbin/mosquitto"
REPO = Path(__file__).resolve().parent.parent
PROFILE = "phoenix-charx"  # TCP charger; its read plan is 3 register blocks per poll (+1 slow)


@dataclass(frozen=True, slots=True)
class Size:
    """How big a scenario runs; ``quick`` is the CI size."""

    quick: bool = True
    repeats: int = 3

    def pick(self, quick: Any, full: Any) -> Any:
        return quick if self.quick else full


@dataclass(slots=True)
class Figure:
    name: str
    value: float | None
    unit: str = ""
    target: str = ""  # human text, e.g. ">= 0.8"
    ok: bool | None = None  # None: no target


@dataclass(slots=True)
class Result:
    scenario: str
    title: str
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    runs: int = 1

    def add(
        self,
        name: str,
        value: float | None,
        unit: str = "",
        *,
        at_least: float | None = None,
        at_most: float | None = None,
    ) -> Figure:
        target, ok = "", None
        if at_least is not None:
            target = f">= {at_least:g}"
            ok = value is not None and value >= at_least
        elif at_most is not None:
            target = f"<= {at_most:g}"
            ok = value is not None and value <= at_most
        fig = Figure(name, value, unit, target, ok)
        self.figures.append(fig)
        return fig

    def figure(self, name: str) -> Figure:
        for fig in self.figures:
            if fig.name == name:
                return fig
        raise KeyError(name)

    @property
    def missed(self) -> list[Figure]:
        return [f for f in self.figures if f.ok is False]


def median_result(results: Sequence[Result]) -> Result:
    """Per-figure median over repeated runs; targets re-checked on the median."""
    first = results[0]
    out = Result(first.scenario, first.title, runs=len(results))
    for fig in first.figures:
        values = [
            f.value
            for r in results
            for f in r.figures
            if f.name == fig.name and f.value is not None
        ]
        value = statistics.median(values) if values else None
        ok = fig.ok
        if fig.target and value is not None:
            bound = float(fig.target.split()[1])
            ok = value >= bound if fig.target.startswith(">=") else value <= bound
        out.figures.append(Figure(fig.name, value, fig.unit, fig.target, ok))
    seen: set[str] = set()
    for r in results:
        for note in r.notes:
            if note not in seen:
                seen.add(note)
                out.notes.append(note)
    return out


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    data = sorted(values)
    k = (len(data) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (k - lo)


# -- machine and versions -------------------------------------------------------------------------


def machine() -> dict[str, str]:
    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram = "?"
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal"):
                ram = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "ram": ram,
        "kernel": platform.release(),
        "load average at the end": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def _reference_workload() -> None:
    rows = []
    for i in range(20_000):
        sample = {"device": f"cp{i % 20}", "power_w": i * 1.5, "energy_wh": i, "status": "ok"}
        rows.append((sample["device"], json.dumps(sample)))
    conn = sqlite3.connect(":memory:")
    try:
        conn.execute("CREATE TABLE t (device TEXT, body TEXT)")
        conn.executemany("INSERT INTO t VALUES (?, ?)", rows)
        conn.execute("SELECT device, count(*), sum(length(body)) FROM t GROUP BY device").fetchall()
    finally:
        conn.close()


def host_speed_ms(runs: int = 5) -> float:
    """CPU milliseconds one thread takes for a fixed piece of work (Python objects, JSON,
    SQLite): the same in every run, so figures of runs on different hosts, or at the start and
    the end of one run, can be compared by it (lower is faster). Median of ``runs``."""
    times = []
    for _ in range(runs):
        t0 = time.process_time()
        _reference_workload()
        times.append((time.process_time() - t0) * 1000)
    return statistics.median(times)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("pymodbus", "aiomqtt", "paho-mqtt", "aiosqlite"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "missing"
    import sqlite3

    out["sqlite"] = sqlite3.sqlite_version
    out["mosquitto"] = mosquitto_version()
    return out


def mosquitto_version() -> str:
    if not os.path.exists(MOSQUITTO):
        return "missing"
    try:
        proc = subprocess.run(
            [MOSQUITTO, "-h"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    for line in (proc.stdout + proc.stderr).splitlines():
        if "version" in line:
            return line.split("version", 1)[1].split()[0]
    return "?"


# -- process figures ------------------------------------------------------------------------------

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds() -> float:
    """User + system CPU of this process (/proc/self/stat, all threads)."""
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def rss_mb() -> tuple[float, float]:
    """(current RSS, peak RSS) of this process in MB (MiB)."""
    cur = peak = 0.0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                cur = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) / 1024
    return cur, peak


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def tempdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="evgw-bench-") as tmp:
        yield Path(tmp)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    return env


# -- the simulator process ------------------------------------------------------------------------


class SimProcess:
    """``python -m bench.serve``: N simulated chargers, one Modbus TCP server (own port) each,
    in another process so their CPU is not the gateway's. ``ports`` once started."""

    def __init__(self, devices: int, *, delay_s: float = 0.0, profile: str = PROFILE) -> None:
        self.devices = devices
        self.delay_s = delay_s
        self.profile = profile
        self.ports: list[int] = []
        self.proc: asyncio.subprocess.Process | None = None
        self.first_request_ts: float | None = None
        self._watch: asyncio.Task[None] | None = None

    async def __aenter__(self) -> SimProcess:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.serve",
            "--devices",
            str(self.devices),
            "--delay-s",
            str(self.delay_s),
            "--profile",
            self.profile,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=None,  # its tracebacks belong on our stderr
            env=child_env(),
            cwd=str(REPO),
        )
        assert self.proc.stdout is not None
        try:
            async with asyncio.timeout(60):
                line = await self.proc.stdout.readline()
            if not line:
                raise RuntimeError("bench.serve exited before serving")
            self.ports = json.loads(line)["ports"]
        except BaseException:
            # never leave a simulator behind when the scenario cannot start
            if self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()
            raise
        self._watch = asyncio.create_task(self._read_events(), name="sim-events")
        return self

    def check_alive(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            code = None if self.proc is None else self.proc.returncode
            raise RuntimeError(f"the simulator process died during the run (exit {code})")

    async def _read_events(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            event = json.loads(line)
            if event.get("event") == "first_request":
                self.first_request_ts = float(event["ts"])

    async def __aexit__(self, *exc: object) -> None:
        assert self.proc is not None
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            async with asyncio.timeout(5):
                await self.proc.wait()
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch


# -- mosquitto ------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def mosquitto(workdir: Path) -> AsyncIterator[int]:
    """Our own mosquitto on a free loopback port (never 1883); yields the port."""
    if shutil.which(MOSQUITTO) is None:
        raise RuntimeError(f"{MOSQUITTO} is not installed")
    port = free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(
        f"listener {port} {HOST}\nallow_anonymous true\npersistence false\n"
        "max_inflight_messages 0\nmax_queued_messages 0\nlog_type error\n"
    )
    proc = subprocess.Popen(  # noqa: ASYNC220 - a daemon we stop ourselves; never awaited
        [MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 5
        while True:
            try:
                _, writer = await asyncio.open_connection(HOST, port)
                writer.close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("mosquitto did not start") from None
                await asyncio.sleep(0.02)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
