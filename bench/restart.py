"""Scenario 6, restart: from process start to the first poll and to resumed open sessions, with
a large readings buffer. Gateway: ``python -m gateway run -c cfg`` as a subprocess (JSON logs on
stderr: ``session_resumed``, ``gateway_started``); the first poll is the moment the simulator
sees its first read. Baseline: a bare Python process opening the same SQLite file with
``sqlite3``, reading the open sessions, and reading the same blocks with a pymodbus client."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import HOST, PROFILE, REPO, Result, SimProcess, Size, child_env, tempdir
from bench.ingest import sample_values
from gateway.sessions import OpenSession
from gateway.store import Store

DEVICES = 5
OPEN_SESSIONS = 3
TARGET_S = 2.0

RAW = """
import sqlite3, sys, json, asyncio, time
from pymodbus.client import AsyncModbusTcpClient
db = sqlite3.connect(sys.argv[1])
rows = db.execute("SELECT session_id, charger_id, state FROM open_sessions").fetchall()
states = [json.loads(s) for _, _, s in rows]
t_sessions = time.time()
async def main():
    c = AsyncModbusTcpClient("127.0.0.1", port=int(sys.argv[2]))
    await c.connect()
    for address, count in json.loads(sys.argv[3]):
        await c.read_holding_registers(address, count=count, device_id=1)
    c.close()
asyncio.run(main())
print(json.dumps({"sessions": len(states), "sessions_ts": t_sessions, "polled_ts": time.time()}))
"""


async def prepare(path: Path, readings: int) -> None:
    async with Store.open(path, site_id="bench", max_size_mb=8192) as store:
        values = sample_values()
        for i in range(0, readings, 5000):
            n = min(5000, readings - i)
            await store.add_readings(
                [(f"cp{(i + j) % DEVICES}", 1.79e9 + i + j, values) for j in range(n)]
            )
        for i in range(OPEN_SESSIONS):
            s = OpenSession(
                session_id=f"0190a000-0000-7000-8000-00000000000{i}",
                charger_id=f"cp{i}",
                connector=1,
                started_at=time.time() - 600,
                user={"id": f"user{i}", "token": f"TAG{i}", "token_type": "rfid", "auth": "local"},
                source="energy_wh",
                last_activity_ts=time.time() - 5,
            )
            await store.save_open_session(s.session_id, s.charger_id, s.to_state())


def config(tmp: Path, ports: list[int]) -> Path:
    lines = [
        "site: {id: bench, timezone: UTC}",
        f"storage: {{path: {tmp / 'buffer.db'}, max_size_mb: 8192}}",
        "devices:",
    ]
    for i, port in enumerate(ports):
        lines.append(
            f"  - {{id: cp{i}, driver: {PROFILE}, host: {HOST}, port: {port}, unit: 1, "
            "poll_interval: 1s}"
        )
    path = tmp / "site.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


async def gateway_restart(cfg: Path, sim: SimProcess) -> dict[str, Any]:
    sim.first_request_ts = None
    t0 = time.time()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "run",
        "-c",
        str(cfg),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=child_env(),
        cwd=str(REPO),
    )
    assert proc.stderr is not None
    events: dict[str, float] = {}
    resumed = 0
    tail: list[str] = []
    try:
        async with asyncio.timeout(60):
            while "gateway_started" not in events or sim.first_request_ts is None:
                try:
                    line = await asyncio.wait_for(proc.stderr.readline(), 0.05)
                except TimeoutError:
                    continue
                if not line:
                    raise RuntimeError("gateway exited early:\n" + "".join(tail[-20:]))
                del tail[:-20]
                tail.append(line.decode(errors="replace"))
                now = time.time()
                try:
                    event = json.loads(line).get("event")
                except (ValueError, AttributeError):
                    continue
                if event == "session_resumed":
                    resumed += 1
                events.setdefault(str(event), now)
                if event == "session_resumed":
                    events["last_session_resumed"] = now
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(10):
                    await proc.communicate()
            except TimeoutError:
                proc.kill()
                await proc.wait()
    assert sim.first_request_ts is not None
    return {
        "first_poll_s": sim.first_request_ts - t0,
        "sessions_s": events.get("last_session_resumed", events["gateway_started"]) - t0,
        "started_s": events["gateway_started"] - t0,
        "resumed": resumed,
    }


async def raw_restart(db: Path, port: int) -> dict[str, float]:
    from bench.poll import raw_blocks

    blocks = json.dumps([[a, c] for _, a, c in raw_blocks()])
    t0 = time.time()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", RAW, str(db), str(port), blocks, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    data = json.loads(out)
    return {"first_poll_s": data["polled_ts"] - t0, "sessions_s": data["sessions_ts"] - t0}


async def run(size: Size) -> Result:
    readings = size.pick(20_000, 1_000_000)
    result = Result(
        "restart", f"6. Restart ({readings:,} buffered readings, {OPEN_SESSIONS} open sessions)"
    )
    with tempdir() as tmp:
        await prepare(tmp / "buffer.db", readings)
        # A fresh simulator each: it announces only its first read.
        async with SimProcess(DEVICES) as sim:
            gw = await gateway_restart(config(tmp, sim.ports), sim)
        async with SimProcess(1) as sim:
            raw = await raw_restart(tmp / "buffer.db", sim.ports[0])
    result.add("gateway: start to open sessions resumed", gw["sessions_s"], "s", at_most=TARGET_S)
    result.add("gateway: start to first poll", gw["first_poll_s"], "s", at_most=TARGET_S)
    result.add("gateway: start to gateway_started", gw["started_s"], "s")
    result.add("sessions resumed", float(gw["resumed"]), "", at_least=OPEN_SESSIONS)
    result.add("raw python+sqlite3+pymodbus: first poll", raw["first_poll_s"], "s")
    result.add("ratio gateway/raw (first poll)", gw["first_poll_s"] / raw["first_poll_s"], "")
    result.notes.append(
        "`python -m gateway run -c site.yaml` as a subprocess, no uplink; times from just "
        "before the spawn to the event's arrival on its stderr (sessions) or to the "
        "simulator's first read (first poll)."
    )
    return result
