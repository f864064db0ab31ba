"""``/metrics``: the gateway in Prometheus text format (prometheus_client).

Events (polls, errors, poll latency, finished sessions and their energy) are counted as they
happen, through the poller's ``on_poll`` hook and the live view's session events; states (open
sessions, outbox backlog, uplink, PUBACK age, load-management set-points, meter counters) are
read from the gateway's parts at scrape time by one collector. Each gateway gets its own
registry, so two gateways in one process (tests) never share a series.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.model import DeviceKind, DeviceSample

if TYPE_CHECKING:
    from gateway.loadmgmt import LoadManager
    from gateway.web.view import SiteView

__all__ = ["CONTENT_TYPE", "GatewayMetrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Modbus TCP on a LAN answers in a few ms; RS-485 at 9600 baud with slow devices in 50-200 ms;
# a timeout is 1 s by default.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class GatewayMetrics:
    """The gateway's metrics: ``observe_poll`` for the poller, ``on_session_event`` for the
    session events, ``render()`` for a scrape."""

    def __init__(self, gw: SiteView) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.polls = Counter(
            "evgw_device_polls", "Polls of a device", ["device"], registry=self.registry
        )
        self.poll_errors = Counter(
            "evgw_device_poll_errors",
            "Polls that failed, by reason (timeout, connect_failed, exception_response, ...)",
            ["device", "reason"],
            registry=self.registry,
        )
        self.poll_latency = Histogram(
            "evgw_device_poll_duration_seconds",
            "Time one poll of a device took (all its register reads)",
            ["device"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.sessions_finished = Counter(
            "evgw_sessions_finished",
            "Sessions finished since the gateway started",
            ["charger"],
            registry=self.registry,
        )
        self.session_energy = Counter(
            "evgw_session_energy_wh",
            "Energy of the sessions finished since the gateway started, Wh",
            ["charger"],
            registry=self.registry,
        )
        for dev in gw.config.devices:  # every series exists from the first scrape
            self.polls.labels(dev.id)
            if gw.device_kind(dev.id) is DeviceKind.CHARGER:
                self.sessions_finished.labels(dev.id)
                self.session_energy.labels(dev.id)
        self.registry.register(_StateCollector(gw))

    def observe_poll(self, sample: DeviceSample, duration_s: float) -> None:
        self.polls.labels(sample.device_id).inc()
        self.poll_latency.labels(sample.device_id).observe(duration_s)
        if not sample.online:
            reason = (sample.error or "unknown").split(":", 1)[0]
            self.poll_errors.labels(sample.device_id, reason).inc()

    def on_session_event(self, kind: str, payload: dict[str, Any]) -> None:
        if kind == "session_finished":
            charger = str(payload.get("charger_id", ""))
            self.sessions_finished.labels(charger).inc()
            self.session_energy.labels(charger).inc(max(0, int(payload.get("energy_wh") or 0)))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector(Collector):
    """Gauges read from the gateway's parts at each scrape."""

    def __init__(self, gw: SiteView) -> None:
        self._gw = gw

    def describe(self) -> list[Metric]:
        return []  # the metric set depends on the config: no early description

    def collect(self) -> Iterator[Metric]:
        gw = self._gw
        online = GaugeMetricFamily(
            "evgw_device_online", "1 if the device's last poll answered", labels=["device"]
        )
        power = GaugeMetricFamily("evgw_device_power_w", "Active power, W", labels=["device"])
        energy = GaugeMetricFamily(
            "evgw_device_energy_wh", "The device's cumulative import counter, Wh", labels=["device"]
        )
        for dev_id, live in sorted(gw.live.devices.items()):
            online.add_metric([dev_id], 1.0 if live.online else 0.0)
            if live.online and live.power_w is not None:
                power.add_metric([dev_id], float(live.power_w))
            if live.online and live.energy_wh is not None:
                energy.add_metric([dev_id], float(live.energy_wh))
        yield online
        yield power
        yield energy

        open_ = GaugeMetricFamily("evgw_sessions_open", "Open sessions", labels=["charger"])
        open_energy = GaugeMetricFamily(
            "evgw_session_open_energy_wh",
            "Energy of the open session so far, Wh",
            labels=["charger"],
        )
        counts: dict[str, int] = {}
        for session in gw.sessions.tracker.sessions():
            counts[session.charger_id] = counts.get(session.charger_id, 0) + 1
            open_energy.add_metric([session.charger_id], round(session.energy()))
        for dev in gw.config.devices:
            if gw.device_kind(dev.id) is DeviceKind.CHARGER:
                open_.add_metric([dev.id], float(counts.get(dev.id, 0)))
        yield open_
        yield open_energy

        backlog = GaugeMetricFamily(
            "evgw_outbox_backlog", "Rows waiting to be delivered, by stream", labels=["stream"]
        )
        for stream, n in sorted(gw.live.backlog.items()):
            backlog.add_metric([stream], float(n))
        yield backlog
        yield GaugeMetricFamily(
            "evgw_buffer_size_bytes",
            "SQLite buffer on disk (database and WAL)",
            value=float(gw.store.size_bytes()),
        )

        if gw.uplink is not None:
            yield GaugeMetricFamily(
                "evgw_uplink_connected",
                "1 while connected to the MQTT broker",
                value=1.0 if gw.uplink.online else 0.0,
            )
            last = gw.uplink.stats.last_puback_monotonic
            if last is not None:
                yield GaugeMetricFamily(
                    "evgw_uplink_last_puback_age_seconds",
                    "Seconds since the broker last acknowledged a QoS 1 publish",
                    value=max(0.0, gw.clock.monotonic() - last),
                )

        if gw.load is not None:
            yield from _load_metrics(gw.load)


def _per_phase(name: str, documentation: str, amps: Sequence[float]) -> GaugeMetricFamily:
    gauge = GaugeMetricFamily(name, documentation, labels=["phase"])
    for i, value in enumerate(amps):
        gauge.add_metric([f"L{i + 1}"], value)
    return gauge


def _load_metrics(load: LoadManager) -> Iterator[Metric]:
    settings = load.balancer.settings
    effective = load.grid_limit
    yield GaugeMetricFamily(
        "evgw_grid_limit_a",
        "Site limit per phase in force, A (the connection's, or lower when the grid asks)",
        value=effective.site_a if effective is not None else settings.max_current_a,
    )
    source = GaugeMetricFamily(
        "evgw_grid_limit_source",
        "Where the limit in force comes from: 1 for the source in force",
        labels=["source"],
    )
    for name in ("connection", "schedule", "signal", "cloud"):
        current = effective.source if effective is not None else "connection"
        source.add_metric([name], 1.0 if name == current else 0.0)
    yield source
    yield GaugeMetricFamily(
        "evgw_grid_connection_limit_a",
        "The connection's own limit per phase (grid.max_current_a), A",
        value=settings.max_current_a,
    )
    limit = GaugeMetricFamily(
        "evgw_charger_current_limit_a",
        "Current limit last written to the charger by load management, A (0: paused)",
        labels=["charger"],
    )
    target = GaugeMetricFamily(
        "evgw_charger_current_target_a", "Load management's latest target, A", labels=["charger"]
    )
    decision = load.last
    for dev_id in sorted(load.balancer.specs):
        applied = load.balancer.applied(dev_id)
        if applied is not None:
            limit.add_metric([dev_id], applied)
        if decision is not None and dev_id in decision.targets:
            target.add_metric([dev_id], decision.targets[dev_id])
    yield limit
    yield target
    if decision is not None:
        yield _per_phase(
            "evgw_grid_available_a",
            "Current available to the managed chargers, per phase, A",
            decision.available_a,
        )
        if decision.grid_a is not None:
            yield _per_phase(
                "evgw_grid_current_a",
                "Measured current of the connection, per phase, A",
                decision.grid_a,
            )
    yield CounterMetricFamily(
        "evgw_load_limit_writes", "Current-limit writes since start", value=float(load.writes)
    )
    yield CounterMetricFamily(
        "evgw_load_limit_write_failures",
        "Current-limit writes that failed since start",
        value=float(load.write_failures),
    )
