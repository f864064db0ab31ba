"""Home Assistant MQTT discovery against a real mosquitto: the gateway on simulated chargers
(Modbus wire) publishes the discovery configs and the charger states, retained, on the cloud
broker (through the uplink) or on a local one (its own connection)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from gateway.app import Gateway
from gateway.config import load_config
from gateway.errors import ConfigError
from gateway.profiles import Profile
from gateway.sim.site import SimSite
from gateway.uplink import pahoport
from tests.support.mqtt_broker import MosquittoBroker, free_port
from tests.support.uplink import PREFIX, SITE, running, wait_until

ROOT = f"{PREFIX}/{SITE}"

SITE_YAML = """
site: {{id: {site}, timezone: Europe/Berlin}}
storage: {{path: ./buffer.db}}
{uplink}
devices:
  - {{id: cp1, driver: webasto-next, host: 127.0.0.1, port: {p1}, poll_interval: 300ms}}
  - {{id: cp2, driver: keba-p30, host: 127.0.0.1, port: {p2}, poll_interval: 300ms}}
auth:
  tokens: [{{id: "AAA-0001", type: rfid, user: alice}}]
homeassistant: {ha}
"""


def write_site(tmp_path: Path, uplink: str, ha: str) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(
        SITE_YAML.format(site=SITE, uplink=uplink, p1=free_port(), p2=free_port(), ha=ha)
    )
    return path


class Retained:
    """Subscribes to Home Assistant's prefix and the site's topics; keeps the latest per topic."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.latest: dict[str, Any] = {}
        self.ready = asyncio.Event()

    async def run(self) -> None:
        while True:
            try:
                async with pahoport.Client(
                    "127.0.0.1", self.port, identifier="home-assistant"
                ) as c:
                    await c.subscribe("homeassistant/#", qos=1)
                    await c.subscribe(f"{ROOT}/#", qos=1)
                    self.ready.set()
                    async for m in c.messages:
                        assert isinstance(m.payload, bytes)
                        self.latest[m.topic.value] = json.loads(m.payload) if m.payload else None
            except aiomqtt.MqttError:
                await asyncio.sleep(0.1)

    def configs(self) -> dict[str, dict[str, Any]]:
        return {
            t: p
            for t, p in self.latest.items()
            if t.startswith("homeassistant/") and t.endswith("/config")
        }


def check_discovery(configs: dict[str, dict[str, Any]]) -> None:
    node = f"evgw_{SITE}"
    expected = {
        f"homeassistant/sensor/{SITE}/{c}_{k}/config"
        for c in ("cp1", "cp2")
        for k in ("status", "power", "session_energy", "user")
    }
    assert expected <= set(configs), sorted(configs)
    assert len({p["unique_id"] for p in configs.values()}) == len(configs)
    status = configs[f"homeassistant/sensor/{SITE}/cp1_status/config"]
    assert status["state_topic"] == f"{ROOT}/ha/cp1/state"
    assert status["device_class"] == "enum" and "charging" in status["options"]
    assert status["availability_mode"] == "all"
    assert [a["topic"] for a in status["availability"]] == [
        f"{ROOT}/gateway/status",
        f"{ROOT}/ha/cp1/state",
    ]
    assert status["device"]["identifiers"] == [f"{node}_cp1"]
    assert status["device"]["manufacturer"] == "Webasto"
    assert status["device"]["via_device"] == node
    power = configs[f"homeassistant/sensor/{SITE}/cp2_power/config"]
    assert (power["device_class"], power["unit_of_measurement"], power["state_class"]) == (
        "power",
        "W",
        "measurement",
    )
    energy = configs[f"homeassistant/sensor/{SITE}/cp1_session_energy/config"]
    assert (energy["device_class"], energy["unit_of_measurement"], energy["state_class"]) == (
        "energy",
        "kWh",
        "total_increasing",
    )
    # The via_device exists as a device of its own.
    assert any(p["device"]["identifiers"] == [node] for p in configs.values())


async def check_states(retained: Retained, site: SimSite) -> None:
    state_topic = f"{ROOT}/ha/cp1/state"
    await wait_until(
        lambda: (retained.latest.get(state_topic) or {}).get("status") == "available", 5, "polled"
    )
    first = retained.latest[state_topic]
    assert first["online"] is True and first["user"] is None and first["power_w"] == 0
    cp1 = site.charger("cp1")
    cp1.plug_in(tag="AAA-0001", power_w=11_000)
    cp1.start_charging()

    def charging() -> bool:
        s = retained.latest.get(state_topic) or {}
        return s.get("status") == "charging" and s.get("user") == "alice"

    await wait_until(charging, 10, "charging by alice")
    await wait_until(
        lambda: (retained.latest[state_topic]["power_w"] or 0) > 10_000, 10, "power shown"
    )
    await wait_until(
        lambda: retained.latest[state_topic]["session_energy_kwh"] > 0, 10, "energy counting"
    )
    assert retained.latest[f"{ROOT}/ha/cp2/state"]["status"] == "available"


async def test_discovery_and_states_on_the_cloud_broker(
    tmp_path: Path, mosquitto: MosquittoBroker, shipped_profiles: dict[str, Profile]
) -> None:
    uplink = (
        f'uplink: {{url: "mqtt://127.0.0.1:{mosquitto.port}", client_id: evgw-ha, '
        f"topic_prefix: {PREFIX}, keepalive: 5s}}"
    )
    config = load_config(write_site(tmp_path, uplink, "{enabled: true, interval: 1s}"))
    retained = Retained(mosquitto.port)
    async with running(retained.run(), "ha"):
        async with (
            SimSite(config, shipped_profiles, speed=1.0, traffic=False) as site,
            Gateway(config, shipped_profiles) as gw,
            running(gw.run(), "gateway"),
        ):
            await wait_until(retained.ready.is_set, 5, "subscriber")
            await wait_until(lambda: len(retained.configs()) >= 9, 10, "discovery")
            check_discovery(retained.configs())
            await check_states(retained, site)
            assert retained.latest[f"{ROOT}/gateway/status"]["state"] == "online"
        # The gateway stopped: every entity's first availability topic says offline.
        await wait_until(
            lambda: retained.latest[f"{ROOT}/gateway/status"]["state"] == "offline", 5, "offline"
        )


async def test_discovery_on_a_local_broker_without_uplink(
    tmp_path: Path, mosquitto: MosquittoBroker, shipped_profiles: dict[str, Profile]
) -> None:
    ha = f'{{enabled: true, broker: local, url: "mqtt://127.0.0.1:{mosquitto.port}"}}'
    config = load_config(write_site(tmp_path, "", ha))
    assert config.uplink is None
    retained = Retained(mosquitto.port)
    async with (
        running(retained.run(), "ha"),
        SimSite(config, shipped_profiles, speed=1.0, traffic=False) as site,
        Gateway(config, shipped_profiles) as gw,
        running(gw.run(), "gateway"),
    ):
        await wait_until(retained.ready.is_set, 5, "subscriber")
        await wait_until(lambda: len(retained.configs()) >= 9, 10, "discovery")
        check_discovery(retained.configs())
        await check_states(retained, site)
        assert retained.latest[f"{ROOT}/gateway/status"]["state"] == "online"
        # The local broker restarts (no persistence): everything is published again.
        await mosquitto.restart()
        retained.latest.clear()
        await wait_until(lambda: len(retained.configs()) >= 9, 15, "discovery again")
        await wait_until(lambda: f"{ROOT}/ha/cp1/state" in retained.latest, 10, "state again")


@pytest.mark.parametrize(
    ("ha", "uplink", "message"),
    [
        ("{enabled: true}", False, "homeassistant.broker: broker: cloud needs an uplink"),
        ("{enabled: true, broker: local}", False, "homeassistant: broker: local needs url"),
        (
            '{enabled: true, url: "mqtt://127.0.0.1:1883"}',
            True,
            "homeassistant.url: url is for broker: local",
        ),
        (
            '{enabled: true, broker: local, url: "mqtts://h:8883"}',
            False,
            "homeassistant.url: the local broker is reached with mqtt://",
        ),
        ("{enabled: yes please}", False, "homeassistant.enabled: expected true or false"),
    ],
)
def test_bad_homeassistant_config(tmp_path: Path, ha: str, uplink: bool, message: str) -> None:
    up = 'uplink: {url: "mqtt://127.0.0.1:1883", client_id: x}' if uplink else ""
    with pytest.raises(ConfigError) as info:
        load_config(write_site(tmp_path, up, ha))
    assert message in str(info.value)


def test_states_are_sent_on_change_and_throttled() -> None:
    """Status, user and online changes go at once; power and energy at most every interval."""
    from gateway.homeassistant import ChargerInfo, HomeAssistant
    from gateway.live import LiveState
    from gateway.model import ChargerStatus, DeviceSample

    ha = HomeAssistant("s1", "evgw/s1", [ChargerInfo("cp1", "KEBA", "P30")], interval_s=5.0)
    live = LiveState()

    def sample(ts: float, power: float, status: ChargerStatus) -> None:
        live.on_sample(DeviceSample("cp1", ts, True, {"power_w": power}, status=status), "charger")

    assert ha.changes(live, 0.0)[0][1]["status"] == "unavailable"  # not polled yet
    sample(1.0, 0.0, ChargerStatus.AVAILABLE)
    assert [p["status"] for _, p in ha.changes(live, 1.0)] == ["available"]
    assert ha.changes(live, 1.5) == []  # nothing changed
    live.on_session_event(
        "session_started", {"session_id": "x", "charger_id": "cp1", "user": {"id": "alice"}}
    )
    sample(2.0, 11_000.0, ChargerStatus.CHARGING)
    ((topic, state),) = ha.changes(live, 2.0)
    assert topic == "evgw/s1/ha/cp1/state"
    assert state == {
        "status": "charging",
        "online": True,
        "power_w": 11_000,
        "session_energy_kwh": 0.0,
        "user": "alice",
    }
    live.on_session_event("session_updated", {"session_id": "x", "energy_wh": 1234})
    sample(3.0, 10_500.0, ChargerStatus.CHARGING)
    assert ha.changes(live, 3.0) == []  # only numbers changed: wait for the interval
    ((_, state),) = ha.changes(live, 7.0)
    assert (state["power_w"], state["session_energy_kwh"]) == (10_500, 1.234)
    live.on_sample(DeviceSample("cp1", 8.0, False, error="timeout"), "charger")
    ((_, state),) = ha.changes(live, 8.0)  # offline: at once
    assert state["online"] is False and state["status"] == "unavailable"
    topics = [t for t, _ in ha.discovery()]
    assert len(topics) == 5 and topics[-1] == "homeassistant/sensor/s1/gateway/config"
