"""Simulated chargers for the benchmarks, in their own process.

``python -m bench.serve --devices N [--delay-s S] [--profile SLUG]`` serves N SimChargers, each
on its own Modbus TCP port (one server per charger, as on a real site where each charger has its
own address). Prints ``{"ports": [...]}`` once serving, ``{"event": "first_request", "ts": ...}``
on the first read, and exits when its stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time

from bench.common import HOST, PROFILE, raise_fd_limit
from gateway.modbus.types import Table
from gateway.profiles import load_profiles
from gateway.sim.devices import SimCharger
from gateway.sim.registers import RegisterImage
from gateway.sim.server import Fault, SimServer


class _WatchedImage(RegisterImage):
    """Says when the first read arrives (the gateway's first poll, for the restart figure)."""

    armed = False  # set once serving: the simulated devices read their own images before
    announced = False

    def get(self, table: Table | str, address: int, count: int = 1) -> list[int]:
        if _WatchedImage.armed and not _WatchedImage.announced:
            _WatchedImage.announced = True
            print(json.dumps({"event": "first_request", "ts": time.time()}), flush=True)
        return super().get(table, address, count)


async def serve(devices: int, delay_s: float, slug: str) -> None:
    raise_fd_limit()
    profile = load_profiles()[slug]
    async with contextlib.AsyncExitStack() as stack:
        ports = []
        for i in range(devices):
            image = _WatchedImage()
            SimCharger(profile, image, device_id=f"cp{i}", seed=i, enforce_heartbeat=False)
            server = await stack.enter_async_context(SimServer.tcp(HOST, 0, {1: image}))
            if delay_s > 0:
                server.set_fault(1, Fault(delay_s=delay_s))
            ports.append(server.port)
        _WatchedImage.armed = True
        print(json.dumps({"ports": ports}), flush=True)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while await reader.read(1024):
            pass


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.serve")
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--delay-s", type=float, default=0.0)
    parser.add_argument("--profile", default=PROFILE)
    args = parser.parse_args()
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    asyncio.run(serve(args.devices, args.delay_s, args.profile))


if __name__ == "__main__":
    main()
