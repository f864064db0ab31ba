"""Scenario 7, RTU on paper and in simulation.

On paper: the time one FC03 transaction occupies an RS-485 line, from frame sizes (request 8
bytes, response 5 + 2n bytes), 11 bits a character, t3.5 silence (3.5 characters up to 19200
baud, 1.75 ms above) after each frame, and the device's turnaround (20 ms typical). That is the
frame-time limit of the line.

In simulation: a socat pty pair, ``SimServer.rtu`` answering after ``Fault(delay_s=turnaround)``,
and the gateway's ``SerialBus`` reading. A pty has no baud rate (bytes arrive at once), so the
measured cycle is turnaround + the bus's own t3.5 gap + the scheduler's overhead; the overhead
is what the gateway adds to the paper figure on a real line, and the efficiency is
paper / (paper + overhead).
"""

from __future__ import annotations

import time
from typing import Any

from bench.common import Result, Size
from gateway.modbus.bus import SerialBus, rtu_frame_gap_s
from gateway.modbus.types import Table
from gateway.sim.pty import pty_pair
from gateway.sim.registers import RegisterImage
from gateway.sim.server import Fault, SimServer

BAUDRATES = (9600, 19200, 115200)
TURNAROUND_S = 0.020
REGISTERS = (10, 40)


def char_s(baudrate: int) -> float:
    return 11.0 / baudrate


def cycle_s(baudrate: int, registers: int, turnaround_s: float = TURNAROUND_S) -> float:
    """Line time of one FC03 transaction: request, gap, turnaround, response, gap."""
    request = 8 * char_s(baudrate)
    response = (5 + 2 * registers) * char_s(baudrate)
    return request + response + turnaround_s + 2 * rtu_frame_gap_s(baudrate)


def paper_table() -> list[dict[str, Any]]:
    rows = []
    for baud in BAUDRATES:
        for n in REGISTERS:
            c = cycle_s(baud, n)
            wire = (8 + 5 + 2 * n) * char_s(baud)
            rows.append(
                {
                    "baudrate": baud,
                    "registers": n,
                    "cycle_ms": c * 1000,
                    "requests_per_s": 1 / c,
                    "wire_share": wire / c,  # share of the cycle carrying bytes
                }
            )
    return rows


async def measure(baudrate: int, reads: int, registers: int = 10) -> float:
    """Mean seconds per read through SerialBus against a slow simulated device on a pty."""
    image = RegisterImage()
    image.set(Table.HOLDING, 0, list(range(1, registers + 1)))
    async with pty_pair() as (gw_path, sim_path):
        server = SimServer.rtu(sim_path, {1: image}, baudrate=baudrate)
        async with server:
            server.set_fault(1, Fault(delay_s=TURNAROUND_S))
            bus = SerialBus(gw_path, baudrate)
            try:
                await bus.read(1, Table.HOLDING, 0, registers, 1.0)  # open the port
                start = time.perf_counter()
                for _ in range(reads):
                    words = await bus.read(1, Table.HOLDING, 0, registers, 1.0)
                    assert words[0] == 1
                elapsed = time.perf_counter() - start
            finally:
                await bus.close()
    return elapsed / reads


async def run(size: Size) -> Result:
    reads = size.pick(15, 100)
    result = Result("rtu", f"7. RTU bus efficiency (FC03, {TURNAROUND_S * 1000:.0f} ms turnaround)")
    for row in paper_table():
        if row["registers"] != 10:
            continue
        baud = row["baudrate"]
        paper_s = row["cycle_ms"] / 1000
        pty_s = await measure(baud, reads)
        overhead_s = pty_s - TURNAROUND_S - rtu_frame_gap_s(baud)
        result.add(f"{baud} baud: paper cycle, 10 regs", paper_s * 1000, "ms")
        result.add(f"{baud} baud: pty cycle via SerialBus", pty_s * 1000, "ms")
        result.add(f"{baud} baud: scheduler overhead", overhead_s * 1000, "ms")
        result.add(
            f"{baud} baud: efficiency vs frame-time limit",
            paper_s / (paper_s + max(0.0, overhead_s)),
            "",
        )
    lines = ", ".join(
        f"{r['baudrate']} baud {r['registers']} regs {r['cycle_ms']:.1f} ms "
        f"({r['requests_per_s']:.1f} req/s, {r['wire_share']:.0%} on the wire)"
        for r in paper_table()
    )
    result.notes.append(f"Paper frame-time limits: {lines}.")
    result.notes.append(
        "The pty carries bytes instantly: the paper cycle on a real line is the pty figure "
        "plus the wire time, so overhead = pty cycle - turnaround - the bus's t3.5 gap."
    )
    return result
