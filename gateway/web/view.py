"""What the web server reads of the running gateway: a Protocol, so the web never imports the
app that wires it (``gateway.app.Gateway`` satisfies it; mypy checks that where the app builds
the ``WebServer``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from gateway.config import GatewayConfig
    from gateway.live import LiveState
    from gateway.loadmgmt import LoadManager
    from gateway.model import Clock, DeviceKind, DeviceSample
    from gateway.sessions import SessionManager
    from gateway.store import Store
    from gateway.uplink.mqtt import UplinkStats

__all__ = ["PollerView", "SiteView", "UplinkView"]


class PollerView(Protocol):
    """The poller's hook, told every poll (its sample and how long it took, s)."""

    on_poll: Callable[[DeviceSample, float], None] | None


class UplinkView(Protocol):
    @property
    def online(self) -> bool: ...

    @property
    def stats(self) -> UplinkStats: ...


class SiteView(Protocol):
    """The parts of a running gateway that the status page, ``/api/*`` and ``/metrics`` read;
    the web's only write is hooking its listeners onto ``live`` and ``poller``."""

    @property
    def config(self) -> GatewayConfig: ...

    @property
    def clock(self) -> Clock: ...

    @property
    def live(self) -> LiveState: ...

    @property
    def store(self) -> Store: ...

    @property
    def sessions(self) -> SessionManager: ...

    @property
    def poller(self) -> PollerView: ...

    @property
    def load(self) -> LoadManager | None: ...

    @property
    def uplink(self) -> UplinkView | None: ...

    def device_kind(self, device_id: str) -> DeviceKind: ...
