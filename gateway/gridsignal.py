"""Reads the grid operator's relay (a ripple-control receiver or control box contact wired to a
Modbus I/O module) and reports its state to load management (gateway/gridlimit.py).

One register or bit (``grid.signal``: table, address) is read every ``poll_interval`` on the bus
of the module; the relay is active when the value equals ``active``. A module that does not answer
is reported as None (unknown) and logged once per change of state, never raised.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import structlog

from gateway.errors import DeviceError
from gateway.modbus.types import Table

__all__ = ["SignalPoller"]

log = structlog.get_logger(__name__)


class _Reader(Protocol):
    async def read(
        self, unit: int, table: Table, address: int, count: int, timeout_s: float
    ) -> list[int]: ...


class SignalPoller:
    """``await poller.run()`` until cancelled; ``on_state`` gets True, False or None."""

    def __init__(
        self,
        bus: _Reader,
        signal: Mapping[str, Any],
        on_state: Callable[[bool | None], None],
    ) -> None:
        self.bus = bus
        self.unit = int(signal.get("unit", 1))
        self.table = Table(signal.get("table", "discrete"))
        self.address = int(signal["address"])
        self.active = int(signal.get("active", 1))
        self.interval_s = float(signal.get("poll_interval", 2.0))
        self.timeout_s = float(signal.get("timeout", 1.0))
        self.on_state = on_state
        self.state: bool | None = None
        self._reported = False

    async def poll(self) -> bool | None:
        """Read once and report."""
        try:
            words = await self.bus.read(self.unit, self.table, self.address, 1, self.timeout_s)
            state: bool | None = words[0] == self.active
            error = None
        except DeviceError as exc:
            state, error = None, exc.reason
        if state != self.state or not self._reported:
            fields = {"table": self.table.value, "address": self.address, "unit": self.unit}
            if state is None:
                log.warning("grid_signal_unreadable", error=error, **fields)
            else:
                log.info("grid_signal", active=state, **fields)
        self.state = state
        self._reported = True
        self.on_state(state)
        return state

    async def run(self) -> None:
        while True:
            await self.poll()
            await asyncio.sleep(self.interval_s)
