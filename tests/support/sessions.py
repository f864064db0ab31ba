"""The gateway's session pipeline over real Modbus, wired the way ``gateway.app`` wires it:
drivers on a bus pool, the authoriser (with the profiles' truncated tags), the session manager
(with the profiles' current limits) and a poller. Shared by the tests that run sessions
against the simulator."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from gateway.app import counter_facts, profile_max_currents, truncated_tags
from gateway.auth import Authorizer
from gateway.config import AuthConfig, DeviceConfig, GatewayConfig, SiteConfig, StorageConfig
from gateway.modbus.bus import BusPool
from gateway.modbus.driver import Chargers, DeviceDriver
from gateway.modbus.poller import DevicePoller
from gateway.model import SystemClock, Token, TokenType
from gateway.ports import JsonObject
from gateway.profiles import Profile
from gateway.records import SessionRecord
from gateway.sessions import SessionManager
from tests.support.mqtt_broker import free_port

EventCallback = Callable[[str, dict[str, Any]], Awaitable[None] | None]


class EventLog:
    """A ``gateway.ports.SessionEvents`` for tests: each event kept as (kind, payload) in order,
    kind "status", "session_started" or "session_finished", and handed to ``on_event`` (plain
    or async) when one is given."""

    def __init__(self, on_event: EventCallback | None = None) -> None:
        self.events: list[tuple[str, JsonObject]] = []
        self._on_event = on_event

    async def _add(self, kind: str, payload: JsonObject) -> None:
        self.events.append((kind, payload))
        if self._on_event is not None:
            res = self._on_event(kind, payload)
            if res is not None:
                await res

    async def charger_status(self, charger_id: str, status: JsonObject) -> None:
        assert status["device_id"] == charger_id
        await self._add("status", status)

    async def session_started(self, started: JsonObject) -> None:
        await self._add("session_started", started)

    async def session_finished(self, record: SessionRecord) -> None:
        await self._add("session_finished", record.to_dict())


def sim_site_config(tmp_path: Path, cp2_driver: str) -> GatewayConfig:
    """One simulated site on a free port: cp1 a KEBA P30 billed by meter m1, cp2 a charger of
    ``cp2_driver``; alice's card in the local list."""
    tcp: dict[str, Any] = {"host": "127.0.0.1", "port": free_port(), "poll_interval_s": 0.2}
    return GatewayConfig(
        site=SiteConfig(id="sim-site"),
        storage=StorageConfig(path=str(tmp_path / "buffer.db")),
        devices=(
            DeviceConfig(id="cp1", driver="keba-p30", unit=255, meter="m1", **tcp),
            DeviceConfig(id="m1", driver="eastron-sdm630", unit=2, **tcp),
            DeviceConfig(id="cp2", driver=cp2_driver, unit=1, **tcp),
        ),
        auth=AuthConfig(tokens=(Token("04A2B3C4D5E6F7", TokenType.RFID, "alice"),)),
    )


async def modbus_sessions(
    config: GatewayConfig,
    profiles: Mapping[str, Profile],
    pool: BusPool,
    store: Any,
    on_event: EventCallback,
    *,
    charger_ids: Iterable[str],
    time_scale: float,
) -> tuple[SessionManager, DevicePoller]:
    clock = SystemClock()
    drivers = {
        d.id: DeviceDriver(d, profiles[d.driver], pool.bus_for(d), clock) for d in config.devices
    }
    authorizer = Authorizer(
        config.auth, store, None, clock, truncated_to=truncated_tags(config, profiles)
    )
    await authorizer.load()
    manager = SessionManager(
        config,
        store,
        authorizer,
        Chargers(drivers),
        None,
        None,
        clock,
        EventLog(on_event),
        charger_ids=list(charger_ids),
        time_scale=time_scale,
        profile_max_a=profile_max_currents(config, profiles),
        **counter_facts(config, profiles),
    )
    return manager, DevicePoller(list(drivers.values()), manager.on_sample)
