"""A second MQTT connection, to a broker on the site LAN, for Home Assistant (``homeassistant:
{broker: local}``): retained messages only, no outbox, no commands.

It keeps the latest payload per topic and publishes every one of them after each (re)connect, so
a broker that restarted without persistence gets the discovery and states again. Its will sets
``P/S/gateway/status`` to offline on that broker, which the Home Assistant entities use for
their availability, as they do on the cloud broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import aiomqtt
import structlog

from gateway import __version__
from gateway.config import HomeAssistantConfig
from gateway.model import Clock, SystemClock, rfc3339
from gateway.uplink import pahoport
from gateway.uplink.mqtt import backoff_delay

__all__ = ["LocalRetainedLink"]

log = structlog.get_logger(__name__)


def _encode(payload: dict[str, Any] | bytes) -> bytes:
    if isinstance(payload, bytes):
        return payload
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


class LocalRetainedLink:
    """``publish_retained`` like ``MqttUplink``'s; ``await link.run()`` until cancelled."""

    def __init__(
        self,
        config: HomeAssistantConfig,
        site_id: str,
        root: str,
        clock: Clock | None = None,
        *,
        backoff: tuple[float, float] = (0.5, 30.0),
    ) -> None:
        if config.url is None:
            raise ValueError("homeassistant.url is needed for broker: local")
        self.config = config
        self.site_id = site_id
        self.status_topic = f"{root}/gateway/status"
        self.clock = clock or SystemClock()
        self.backoff = backoff
        self.online = False
        self._retained: dict[str, bytes] = {}
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()

    def publish_retained(self, topic: str, payload: dict[str, Any] | bytes) -> None:
        self._retained[topic] = _encode(payload)
        self._dirty.add(topic)
        self._wake.set()

    def _status(self, state: str) -> bytes:
        return _encode({"state": state, "version": __version__, "ts": rfc3339(self.clock.time())})

    async def run(self) -> None:
        cfg = self.config
        failures = 0
        last_error: str | None = None
        while True:
            try:
                async with pahoport.Client(
                    cfg.host,
                    cfg.port,
                    identifier=cfg.client_id or f"evgw-ha-{self.site_id}",
                    username=cfg.username,
                    password=cfg.password.reveal() if cfg.password is not None else None,
                    will=aiomqtt.Will(self.status_topic, self._status("offline"), 1, True),
                    timeout=10,
                ) as client:
                    failures, last_error = 0, None
                    self.online = True
                    log.info("ha_broker_connected", url=cfg.url)
                    await client.publish(self.status_topic, self._status("online"), 1, True)
                    self._dirty.update(self._retained)
                    try:
                        await self._drain(client)
                    finally:
                        self.online = False
                        # A clean stop says so itself; the will covers every other way.
                        with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
                            async with asyncio.timeout(2):
                                await client.publish(
                                    self.status_topic, self._status("offline"), 1, True
                                )
            except aiomqtt.MqttError as exc:
                error = str(exc)
                failures += 1
                delay = backoff_delay(failures, *self.backoff)
                level = log.debug if error == last_error else log.warning
                level("ha_broker_disconnected", error=error, retry_in_s=round(delay, 2))
                last_error = error
                await asyncio.sleep(delay)

    async def _drain(self, client: aiomqtt.Client) -> None:
        while True:
            self._wake.clear()
            for topic in list(self._dirty):
                self._dirty.discard(topic)
                await client.publish(topic, self._retained[topic], qos=1, retain=True, timeout=10)
            await self._wake.wait()
