"""The gateway's session pipeline over real Modbus, wired the way ``gateway.app`` wires it:
drivers on a bus pool, the authoriser (with the profiles' truncated tags), the session manager
(with the profiles' current limits) and a poller. Shared by the tests that run sessions
against the simulator."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from gateway.app import profile_max_currents, truncated_tags
from gateway.auth import Authorizer
from gateway.config import GatewayConfig
from gateway.modbus.bus import BusPool
from gateway.modbus.engine import Chargers, DeviceDriver, DevicePoller
from gateway.model import SystemClock
from gateway.profiles import Profile
from gateway.sessions import Counter, EventSink, SessionManager


async def modbus_sessions(
    config: GatewayConfig,
    profiles: Mapping[str, Profile],
    pool: BusPool,
    store: Any,
    on_event: EventSink,
    *,
    charger_ids: Iterable[str],
    time_scale: float,
    counters: Mapping[str, Mapping[str, Counter]] | None = None,
) -> tuple[SessionManager, DevicePoller]:
    clock = SystemClock()
    drivers = {
        d.id: DeviceDriver(d, profiles[d.driver], pool.for_device(d), clock) for d in config.devices
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
        on_event,
        charger_ids=list(charger_ids),
        time_scale=time_scale,
        counters=counters,
        profile_max_a=profile_max_currents(config, profiles),
    )
    return manager, DevicePoller(list(drivers.values()), manager.on_sample)
