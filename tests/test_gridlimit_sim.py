"""The limit the grid can set, end to end: simulated chargers and a grid meter on the real Modbus
wire, the real ``Gateway``, and (for the cloud command) a real mosquitto.

Two three-phase EVs want 32 A each under a 32 A connection; load management shares it. Then:
- a ``limit`` command from the cloud lowers the site's draw (what the simulated grid meter
  measures) within two poll cycles, is published retained on ``P/S/grid/limit`` and expires;
- a grid operator's relay on a simulated Modbus I/O module, and a schedule, lower it too.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs
from test_loadmgmt_sim import grid_phase_a

from gateway.app import Gateway
from gateway.config import load_config
from gateway.modbus.types import Table
from gateway.model import rfc3339
from gateway.profiles import Profile
from gateway.sim.registers import RegisterImage
from gateway.sim.server import FaultKind, SimServer
from gateway.sim.site import SimSite
from gateway.uplink import pahoport
from tests.support.mqtt_broker import MosquittoBroker, free_port
from tests.support.uplink import PREFIX, SITE, Recorder, running, wait_until

POLL_S = 0.5
CONNECTION_A = 32.0

SITE_YAML = """
site: {{id: {site}, timezone: Europe/Berlin}}
storage: {{path: ./buffer.db}}
{uplink}
buses:
  - {{id: gw, type: rtu-over-tcp, host: 127.0.0.1, tcp_port: {p_bus}}}
devices:
  - {{id: cp1, driver: webasto-next, host: 127.0.0.1, port: {p1}, poll_interval: {poll}}}
  - {{id: cp2, driver: vestel-evc04, host: 127.0.0.1, port: {p2}, poll_interval: {poll}}}
  - {{id: grid, driver: eastron-sdm630, bus: gw, unit: 2, poll_interval: {poll}}}
auth:
  tokens:
    - {{id: "AAA-0001", type: rfid, user: alice}}
    - {{id: "BBB-0002", type: rfid, user: bob}}
grid:
  max_current_a: {max_a}
  meter: grid
{grid_extra}
"""


def write_site(tmp_path: Path, *, uplink: str = "", grid_extra: str = "") -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(
        SITE_YAML.format(
            site=SITE,
            uplink=uplink,
            p_bus=free_port(),
            p1=free_port(),
            p2=free_port(),
            poll=f"{int(POLL_S * 1000)}ms",
            max_a=CONNECTION_A,
            grid_extra=grid_extra,
        )
    )
    return path


async def retained(port: int, topic: str) -> dict[str, Any]:
    async with pahoport.Client("127.0.0.1", port, identifier="late-subscriber") as client:
        await client.subscribe(topic, qos=1)
        async with asyncio.timeout(5):
            async for message in client.messages:
                assert message.retain
                assert isinstance(message.payload, bytes)
                data: dict[str, Any] = json.loads(message.payload)
                return data
    raise AssertionError("no retained message")


async def both_charging(site: SimSite, gw: Gateway) -> None:
    for cid, tag in (("cp1", "AAA-0001"), ("cp2", "BBB-0002")):
        charger = site.charger(cid)
        charger.plug_in(tag=tag, power_w=22_000, phases=3)
        charger.start_charging()
    await wait_until(
        lambda: all(site.charger(c).power_w > 0 for c in ("cp1", "cp2")), 15, "both charging"
    )
    await wait_until(lambda: max(grid_phase_a(site)) <= CONNECTION_A, 10, "under the connection")


async def test_a_limit_command_lowers_the_draw_within_two_polls_and_expires(
    tmp_path: Path, mosquitto: MosquittoBroker, shipped_profiles: dict[str, Profile]
) -> None:
    uplink = (
        f'uplink: {{url: "mqtt://127.0.0.1:{mosquitto.port}", client_id: evgw-grid, '
        f"topic_prefix: {PREFIX}, keepalive: 5s}}"
    )
    config = load_config(write_site(tmp_path, uplink=uplink))
    recorder = Recorder(mosquitto.port)

    def limits_published() -> list[dict[str, Any]]:
        return [m.json() for m in recorder.on("grid/limit")]

    def reply(request_id: str) -> dict[str, Any] | None:
        for m in recorder.on("commands/limit/reply"):
            data: dict[str, Any] = m.json()
            if data["request_id"] == request_id:
                return data
        return None

    with capture_logs() as logs:
        async with (
            running(recorder.run(), "recorder"),
            SimSite(config, shipped_profiles, speed=1.0, traffic=False) as site,
            Gateway(config, shipped_profiles) as gw,
            running(gw.run(), "gateway"),
        ):
            await wait_until(recorder.connected.is_set, 5, "cloud subscriber")
            await wait_until(lambda: gw.uplink.online, 10, "gateway uplink")
            await both_charging(site, gw)
            await wait_until(lambda: limits_published(), 5, "grid/limit published")
            first = limits_published()[-1]
            assert (first["source"], first["max_current_a"]) == ("connection", CONNECTION_A)

            # The grid operator asks for 16 A for 6 s.
            expires = time.time() + 6.0
            command = {
                "request_id": "g-1",
                "scope": "site",
                "max_current_a": 16,
                "expires_at": rfc3339(expires),
                "reason": "grid operator: 14a EnWG",
            }
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            await recorder.publish("commands/limit", json.dumps(command))
            await wait_until(lambda: max(grid_phase_a(site)) <= 16.0, 2 * POLL_S + 1.0, "16 A")
            lowered_s = loop.time() - t0
            await wait_until(lambda: reply("g-1") is not None, 5, "reply")
            answer = reply("g-1")
            assert answer is not None and answer["ok"] is True, answer
            assert answer["result"]["in_force"]["source"] == "cloud"
            await wait_until(
                lambda: limits_published()[-1]["source"] == "cloud", 5, "cloud limit published"
            )
            published = limits_published()[-1]
            assert published["max_current_a"] == 16 and published["reason"] == command["reason"]
            assert published["expires_at"] is not None
            # The gateway's own grid meter readings show it as well.
            grid_sample = gw.load.balancer.grid_sample
            assert grid_sample is not None
            await wait_until(
                lambda: (
                    gw.load.last is not None
                    and gw.load.last.grid_a is not None
                    and max(gw.load.last.grid_a) <= 16.0
                ),
                3,
                "the polled meter shows it",
            )

            # A limit for an unknown charger is refused and changes nothing.
            bad = {"request_id": "g-2", "scope": "cp9", "max_current_a": 6}
            await recorder.publish("commands/limit", json.dumps(bad))
            await wait_until(lambda: reply("g-2") is not None, 5, "refusal")
            refusal = reply("g-2")
            assert refusal is not None and refusal["error"]["code"] == "unknown_charger"
            assert gw.load.grid_limit is not None and gw.load.grid_limit.site_a == 16

            # It expires: the connection's limit is back and the chargers get more again.
            await wait_until(
                lambda: limits_published()[-1]["source"] == "connection",
                expires - time.time() + 2 * 2.0 + 1.0,  # two evaluation intervals
                "limit expired",
            )
            await wait_until(lambda: max(grid_phase_a(site)) > 20.0, 15, "draw back up")
            # A late subscriber (the status page, a monitoring system) gets it retained.
            late = await retained(mosquitto.port, f"{PREFIX}/{SITE}/grid/limit")
            assert late["source"] == "connection" and late["max_current_a"] == CONNECTION_A
    events = [e for e in logs if e["event"] in ("grid_limit_changed", "grid_limit_expired")]
    assert [e["source"] for e in events if e["event"] == "grid_limit_changed"][:3] == [
        "connection",
        "cloud",
        "connection",
    ]
    assert any(e["event"] == "grid_limit_expired" and e["request_id"] == "g-1" for e in events)
    assert recorder.problems == []
    print(f"site draw under the new limit {lowered_s:.2f} s after the command was published")
    assert lowered_s <= 2 * POLL_S + 1.0, lowered_s


@pytest.mark.slow
async def test_a_relay_on_a_modbus_io_module_and_a_schedule(
    tmp_path: Path, shipped_profiles: dict[str, Profile]
) -> None:
    """A discrete input of a simulated I/O module: closed -> 12 A; unreadable -> 12 A too
    (when_offline: limit); open -> the all-day schedule's 20 A."""
    io = RegisterImage()
    io.set(Table.DISCRETE, 4, [0])
    async with SimServer.tcp("127.0.0.1", 0, {7: io}) as module:
        grid_extra = (
            f"  signal: {{host: 127.0.0.1, port: {module.port}, unit: 7, address: 4, "
            f"max_current_a: 12, poll_interval: {int(POLL_S * 1000)}ms, timeout: 300ms, "
            'reason: "ripple control"}\n'
            '  schedule: [{start: "00:00", end: "24:00", max_current_a: 20}]\n'
        )
        config = load_config(write_site(tmp_path, grid_extra=grid_extra))
        async with (
            SimSite(config, shipped_profiles, speed=1.0, traffic=False) as site,
            Gateway(config, shipped_profiles) as gw,
            running(gw.run(), "gateway"),
        ):
            await both_charging(site, gw)

            def source() -> str | None:
                return gw.grid_limit["source"] if gw.grid_limit else None

            await wait_until(lambda: source() == "schedule", 5, "schedule in force")
            # Both share the schedule's 20 A (minus 1 A margin and the base load).
            await wait_until(lambda: 16.0 <= max(grid_phase_a(site)) <= 20.0, 20, "using the 20 A")

            io.set(Table.DISCRETE, 4, [1])  # the grid operator closes the relay
            await wait_until(lambda: source() == "signal", 2 * POLL_S + 1, "relay read")
            await wait_until(lambda: max(grid_phase_a(site)) <= 12.0, 2 * POLL_S + 1, "12 A")
            assert gw.grid_limit is not None
            assert gw.grid_limit["signal"] is True and gw.grid_limit["reason"] == "ripple control"

            io.set(Table.DISCRETE, 4, [0])
            await wait_until(lambda: source() == "schedule", 4 * POLL_S + 2, "relay open")

            module.set_fault(7, FaultKind.NO_ANSWER)  # the module stops answering
            await wait_until(lambda: source() == "signal", 5, "unreadable module: limit")
            assert gw.grid_limit is not None and gw.grid_limit["signal"] is None
            assert "unreadable" in str(gw.grid_limit["reason"])
            await wait_until(lambda: max(grid_phase_a(site)) <= 12.0, 5, "12 A while unknown")


async def test_a_limit_command_must_be_signed_where_the_site_requires_it(
    tmp_path: Path, mosquitto: MosquittoBroker, shipped_profiles: dict[str, Profile]
) -> None:
    """With uplink.command_key (issue 11) a limit command is one like the others: signed, fresh
    and once, or refused with nothing changed."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from gateway.uplink.envelope import sign_message

    key = Ed25519PrivateKey.generate()
    key_file = tmp_path / "cloud.pub.pem"
    key_file.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    uplink = (
        f'uplink: {{url: "mqtt://127.0.0.1:{mosquitto.port}", client_id: evgw-grid, '
        f"topic_prefix: {PREFIX}, keepalive: 5s, command_key: {key_file}}}"
    )
    config = load_config(write_site(tmp_path, uplink=uplink))
    recorder = Recorder(mosquitto.port)
    topic = f"{PREFIX}/{SITE}/commands/limit"

    def reply(request_id: str) -> dict[str, Any] | None:
        for m in recorder.on("commands/limit/reply"):
            data: dict[str, Any] = m.json()
            if data["request_id"] == request_id:
                return data
        return None

    async with (
        running(recorder.run(), "recorder"),
        SimSite(config, shipped_profiles, speed=1.0, traffic=False),
        Gateway(config, shipped_profiles) as gw,
        running(gw.run(), "gateway"),
    ):
        await wait_until(recorder.connected.is_set, 5, "cloud subscriber")
        await wait_until(lambda: gw.uplink.online, 10, "gateway uplink")
        await wait_until(lambda: gw.load.grid_limit is not None, 10, "first decision")
        await asyncio.sleep(0.3)  # the gateway's subscriptions are in place
        unsigned = {"request_id": "u-1", "scope": "site", "max_current_a": 10}
        await recorder.publish("commands/limit", json.dumps(unsigned))
        await wait_until(lambda: reply("u-1") is not None, 10, "refusal")
        assert reply("u-1")["error"]["code"] == "unsigned"  # type: ignore[index]
        assert gw.load.grid_limit.site_a == CONNECTION_A
        good = sign_message(topic, {"request_id": "s-1", "scope": "site", "max_current_a": 10}, key)
        await recorder.publish("commands/limit", json.dumps(good))
        await wait_until(lambda: reply("s-1") is not None, 10, "answer")
        assert reply("s-1")["ok"] is True  # type: ignore[index]
        assert gw.load.grid_limit.site_a == 10 and gw.load.grid_limit.source == "cloud"
