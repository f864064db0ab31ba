"""Home Assistant MQTT discovery: every charger as a Home Assistant device with four sensors.

Pure logic: what to publish, built from the site config and the live view (gateway/live.py);
the app hands the messages to a publisher (the uplink, or gateway/uplink/halink.py for a broker
on the site LAN). All messages are retained.

- ``{prefix}/sensor/{site}/{charger}_{key}/config``: discovery, one per sensor (status,
  power, session energy, user) and, with load management, the site's grid limit;
- ``P/S/ha/{charger}/state``: one JSON state per charger that the sensors' templates read:
  ``{"status", "online", "power_w", "session_energy_kwh", "user"}``, sent when the status, the
  user or the online flag changes, and otherwise at most every ``interval_s``;
- availability: both ``P/S/gateway/status`` (``state`` online/offline: the gateway's will) and
  the charger's own ``online`` flag must say online (``availability_mode: all``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.live import LiveState
from gateway.model import ChargerStatus

__all__ = ["ChargerInfo", "HomeAssistant"]

STATUSES = tuple(s.value for s in ChargerStatus)  # the sensor's options, in order


@dataclass(frozen=True, slots=True)
class ChargerInfo:
    device_id: str
    manufacturer: str
    model: str


class HomeAssistant:
    def __init__(
        self,
        site_id: str,
        root: str,
        chargers: Sequence[ChargerInfo],
        *,
        prefix: str = "homeassistant",
        version: str = "",
        interval_s: float = 5.0,
        grid_limit: bool = False,
    ) -> None:
        self.site_id = site_id
        self.root = root  # P/S
        self.prefix = prefix
        self.chargers = tuple(chargers)
        self.version = version
        self.interval_s = interval_s
        self.grid_limit = grid_limit
        self.node = f"evgw_{site_id}"  # unique ids and device identifiers
        # The topic's node level is the bare site id: a broker ACL can then allow a site's
        # gateway exactly its own discovery topics (mosquitto: homeassistant/sensor/%u/+/config).
        self.topic_node = site_id
        self._sent: dict[str, tuple[dict[str, Any], float]] = {}

    def state_topic(self, device_id: str) -> str:
        return f"{self.root}/ha/{device_id}/state"

    def config_topic(self, object_id: str) -> str:
        return f"{self.prefix}/sensor/{self.topic_node}/{object_id}/config"

    def _availability(self, state_topic: str | None) -> dict[str, Any]:
        topics: list[dict[str, Any]] = [
            {
                "topic": f"{self.root}/gateway/status",
                "value_template": "{{ value_json.state }}",
                "payload_available": "online",
                "payload_not_available": "offline",
            }
        ]
        if state_topic is not None:
            topics.append(
                {
                    "topic": state_topic,
                    "value_template": "{{ 'online' if value_json.online else 'offline' }}",
                    "payload_available": "online",
                    "payload_not_available": "offline",
                }
            )
        return {"availability": topics, "availability_mode": "all"}

    def _origin(self) -> dict[str, Any]:
        return {"name": "ev-site-gateway", "sw_version": self.version}

    def discovery(self) -> list[tuple[str, dict[str, Any]]]:
        """(topic, payload) of every discovery message."""
        out: list[tuple[str, dict[str, Any]]] = []
        gateway_device = {
            "identifiers": [self.node],
            "name": f"EV site {self.site_id}",
            "manufacturer": "ev-site-gateway",
            "model": "evgw",
            "sw_version": self.version,
        }
        sensors: list[tuple[str, str, dict[str, Any]]] = [
            (
                "status",
                "Status",
                {
                    "device_class": "enum",
                    "options": list(STATUSES),
                    "value_template": "{{ value_json.status }}",
                    "icon": "mdi:ev-station",
                },
            ),
            (
                "power",
                "Power",
                {
                    "device_class": "power",
                    "state_class": "measurement",
                    "unit_of_measurement": "W",
                    "value_template": "{{ value_json.power_w }}",
                },
            ),
            (
                "session_energy",
                "Session energy",
                {
                    "device_class": "energy",
                    "state_class": "total_increasing",
                    "unit_of_measurement": "kWh",
                    "value_template": "{{ value_json.session_energy_kwh }}",
                },
            ),
            (
                "user",
                "User",
                {"value_template": "{{ value_json.user or 'none' }}", "icon": "mdi:account"},
            ),
        ]
        for charger in self.chargers:
            state = self.state_topic(charger.device_id)
            device = {
                "identifiers": [f"{self.node}_{charger.device_id}"],
                "name": f"{self.site_id} {charger.device_id}",
                "manufacturer": charger.manufacturer,
                "model": charger.model,
                "via_device": self.node,
            }
            for key, name, extra in sensors:
                object_id = f"{charger.device_id}_{key}"
                payload = {
                    "name": name,
                    "unique_id": f"{self.node}_{object_id}",
                    "state_topic": state,
                    **extra,
                    **self._availability(state),
                    "device": device,
                    "origin": self._origin(),
                }
                out.append((self.config_topic(object_id), payload))
        if self.grid_limit:
            object_id = "grid_limit"
            out.append(
                (
                    self.config_topic(object_id),
                    {
                        "name": "Grid limit",
                        "unique_id": f"{self.node}_{object_id}",
                        "state_topic": f"{self.root}/grid/limit",
                        "device_class": "current",
                        "state_class": "measurement",
                        "unit_of_measurement": "A",
                        "value_template": "{{ value_json.max_current_a }}",
                        "json_attributes_topic": f"{self.root}/grid/limit",
                        **self._availability(None),
                        "device": gateway_device,
                        "origin": self._origin(),
                    },
                )
            )
        elif self.chargers:
            # The chargers name the gateway as via_device: it must exist as a device too.
            out.append(
                (
                    self.config_topic("gateway"),
                    {
                        "name": "Gateway",
                        "unique_id": f"{self.node}_gateway",
                        "state_topic": f"{self.root}/gateway/status",
                        "value_template": "{{ value_json.state }}",
                        "icon": "mdi:router-network",
                        "device": gateway_device,
                        "origin": self._origin(),
                    },
                )
            )
        return out

    def state(self, live: LiveState, device_id: str) -> dict[str, Any]:
        dev = live.devices.get(device_id)
        if dev is None:
            return {
                "status": "unavailable",
                "online": False,
                "power_w": None,
                "session_energy_kwh": None,
                "user": None,
            }
        session: Mapping[str, Any] = {}
        if dev.session_id is not None:
            session = live.open_sessions.get(dev.session_id, {})
        user = session.get("user")
        if isinstance(user, Mapping):
            user = user.get("id")
        energy = session.get("energy_wh")
        return {
            "status": dev.status if dev.status in STATUSES else "unavailable",
            "online": dev.online,
            "power_w": None if dev.power_w is None else round(dev.power_w),
            "session_energy_kwh": 0.0 if energy is None else round(energy / 1000, 3),
            "user": user if session else None,
        }

    def changes(self, live: LiveState, now: float) -> list[tuple[str, dict[str, Any]]]:
        """State messages due now: changed status, user or online flag at once; other changes
        after ``interval_s``."""
        out = []
        for charger in self.chargers:
            topic = self.state_topic(charger.device_id)
            state = self.state(live, charger.device_id)
            previous = self._sent.get(topic)
            if previous is not None:
                old, at = previous
                if old == state:
                    continue
                urgent = any(old[k] != state[k] for k in ("status", "online", "user"))
                if not urgent and now - at < self.interval_s:
                    continue
            self._sent[topic] = (state, now)
            out.append((topic, state))
        return out
