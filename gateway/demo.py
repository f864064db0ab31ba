"""``evgw demo``: an embedded MQTT broker, a simulated site, the gateway and a live view.

Nothing else needs to run: the broker is amqtt (pure Python, MQTT 3.1.1, so the gateway's
MQTT 5 -> 3.1.1 fallback is exercised too), the chargers and meters are the simulators serving
real Modbus TCP on loopback, and the gateway is the same code ``evgw run`` runs. One EV is
started by the demo acting as the cloud: it publishes a ``start`` command for an app user,
signed with a demo cloud key made in the demo's directory (``demo-cloud.pem``); the demo site's
``uplink.command_key`` names its public half, so the gateway takes signed commands only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
import tempfile
import uuid
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any, TextIO
from zoneinfo import ZoneInfo

import structlog

from gateway.live import LiveState, render_view

__all__ = ["DEMO_SCENARIO", "run_demo", "write_demo_config"]

log = structlog.get_logger(__name__)

# Simulated time: at the default speed of 30x the first sessions finish within half a minute.
DEMO_SCENARIO = """
traffic: true
steps:
  - {at: 2s, device: cp1, action: plug_in, power_w: 11000}
  - {at: 6s, device: cp1, action: tag, tag: "04A2B3C4"}
  - {at: 8s, device: cp1, action: start}
  - {at: 20s, device: cp2, action: plug_in, tag: "FOB-0042", power_w: 7400}
  - {at: 24s, device: cp2, action: start}
  - {at: 40s, device: cp3, action: plug_in, power_w: 22000}
  - {at: 100s, device: cp3, action: start}
  - {at: 8m, device: cp2, action: suspend}
  - {at: 10m, device: cp2, action: resume}
  - {at: 12m, device: cp1, action: unplug}
  - {at: 13m, device: cp1, action: plug_in, tag: "04DEAD01", power_w: 11000}
  - {at: 13m10s, device: cp1, action: start}
  - {at: 16m, device: cp2, action: unplug}
  - {at: 17m, device: cp1, action: unplug}
  - {at: 20m, device: cp3, action: unplug}
"""
APP_START_AT_S = 90.0  # simulated seconds: carol starts cp3 from the app


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _template() -> str:
    shipped = resources.files("gateway").joinpath("examples", "demo-site.yaml.in")
    if shipped.is_file():
        return shipped.read_text(encoding="utf-8")
    return (Path(__file__).resolve().parent.parent / "config" / "demo-site.yaml.in").read_text(
        encoding="utf-8"
    )


def write_demo_config(workdir: Path, broker_url: str, protocol: str = "auto") -> Path:
    """Write the demo's site config with free ports filled in; returns its path."""
    ports = _free_ports(6)
    text = _template().replace("mqtt://127.0.0.1:@BROKER_PORT@", broker_url)
    text = text.replace("@MQTT_PROTOCOL@", protocol)
    for name, port in zip(("CP1", "CP2", "CP3", "RS485", "WEB", "OCPP"), ports, strict=True):
        text = text.replace(f"@PORT_{name}@", str(port))
    demo_cloud_key(workdir)
    path = workdir / "demo-site.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def demo_cloud_key(workdir: Path) -> Any:
    """The demo cloud's signing key, made on first use: ``demo-cloud.pem`` (0600) and the
    public ``demo-cloud.pem.pub.pem`` the demo site config names as ``uplink.command_key``."""
    from gateway.uplink.envelope import load_signing_key

    return load_signing_key(workdir / "demo-cloud.pem", create=True)


@contextlib.asynccontextmanager
async def embedded_broker(port: int) -> Any:
    from amqtt.broker import Broker

    broker = Broker(
        {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
    )
    await broker.start()
    try:
        yield broker
    finally:
        await broker.shutdown()


async def _app_start(
    site: Any, broker_host: str, broker_port: int, prefix: str, site_id: str, key: Any
) -> None:
    """Act as the cloud: authorize carol on cp3 from the app once her car is plugged in."""
    import aiomqtt

    from gateway.uplink import pahoport
    from gateway.uplink.envelope import sign_message

    await site.sleep_until(APP_START_AT_S)
    request = {"request_id": str(uuid.uuid4()), "charger_id": "cp3", "user": "carol"}
    topic = f"{prefix}/{site_id}/commands/start"
    for attempt in range(20):
        try:
            async with pahoport.Client(
                broker_host,
                broker_port,
                identifier=f"evgw-demo-cloud-{uuid.uuid4().hex[:8]}",
                protocol=aiomqtt.ProtocolVersion.V311,
            ) as client:
                signed = sign_message(topic, request, key)  # issued now, at each attempt
                await client.publish(topic, json.dumps(signed).encode(), qos=1)
                log.info("demo_app_start_sent", request_id=request["request_id"])
                return
        except aiomqtt.MqttError:
            await asyncio.sleep(min(0.5 * (attempt + 1), 3.0))


async def _ocpp_charger(config: Any, speed: float) -> None:
    """The demo's OCPP charger: a simulated charge point connecting to the gateway's OCPP
    server, EVs arriving one after another (bob's key fob, then alice's card)."""
    from gateway.ocpp.sim import SimChargePoint, run_ev_cycles

    dev = next(d for d in config.devices if d.driver == "ocpp")
    sim = SimChargePoint(
        f"ws://127.0.0.1:{config.ocpp.port}", dev.charge_point_id, meter_wh=2_450_000
    )
    try:
        await run_ev_cycles(
            sim, ["FOB-0042", "04A2B3C4"], speed=speed, ev_power_w=7_400, charge_s=600
        )
    finally:
        await sim.close()


async def _view(live: LiveState, out: TextIO, redraw: bool, every_s: float, watch: str) -> None:
    while True:
        await asyncio.sleep(every_s)
        screen = render_view(live, title=f"evgw demo  (Ctrl-C stops)   watch: {watch}")
        if redraw:
            out.write("\x1b[H\x1b[2J" + screen + "\n")
        else:
            out.write(screen + "\n\n")
        out.flush()


async def run_demo(
    *,
    broker: str | None = None,
    duration_s: float | None = None,
    speed: float = 30.0,
    workdir: Path | None = None,
    view: bool = True,
    out: TextIO | None = None,
) -> int:
    from gateway.app import run_gateway
    from gateway.config import load_config
    from gateway.profiles import load_profiles
    from gateway.sim.scenario import parse_scenario
    from gateway.sim.site import SimSite

    out = out or sys.stdout
    workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="evgw-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    live = LiveState()
    config = None
    try:
        async with contextlib.AsyncExitStack() as stack:
            if broker is None:
                (broker_port,) = _free_ports(1)
                await stack.enter_async_context(embedded_broker(broker_port))
                broker_url = f"mqtt://127.0.0.1:{broker_port}"
            else:
                broker_url = broker
            config_path = write_demo_config(
                workdir, broker_url, "3.1.1" if broker is None else "auto"
            )
            config = load_config(config_path)
            assert config.uplink is not None
            profiles = load_profiles(config.drivers_path)
            charger_ids = [
                d.id for d in config.modbus_devices if profiles[d.driver].kind.value == "charger"
            ]
            scenario = parse_scenario(
                DEMO_SCENARIO,
                "<demo scenario>",
                device_ids=[d.id for d in config.devices],
                charger_ids=charger_ids,
            )
            site = await stack.enter_async_context(
                SimSite(
                    config,
                    profiles,
                    speed=speed,
                    scenario=scenario,
                    seed=7,
                    truth_path=workdir / "sim-truth.jsonl",
                )
            )
            prefix, site_id = config.uplink.topic_prefix, config.site.id
            host, port = config.uplink.host, config.uplink.port
            print(f"evgw demo: site '{site_id}' simulated at {speed:g}x in {workdir}", file=out)
            watch = f"mosquitto_sub -h {host} -p {port} -t '{prefix}/#' -v"
            if config.web is not None:
                watch = f"http://{config.web.listen}/   or   {watch}"
            print(f"watch the topics:  {watch}", file=out)
            print(f"buffer database:   {config.storage.path}", file=out)
            out.flush()

            def announce(gw: Any) -> None:
                if gw.web is not None:
                    print(f"status page:       {gw.web.url}", file=out)
                    out.flush()

            async with asyncio.TaskGroup() as tg:
                tg.create_task(
                    run_gateway(config, live=live, time_scale=speed, ready=announce),
                    name="demo_gateway",
                )
                tg.create_task(
                    _app_start(site, host, port, prefix, site_id, demo_cloud_key(workdir)),
                    name="demo_app_start",
                )
                if config.ocpp is not None:
                    tg.create_task(_ocpp_charger(config, speed), name="demo_ocpp_charger")
                if view:
                    redraw = out.isatty()
                    tg.create_task(
                        _view(live, out, redraw, 1.0 if redraw else 5.0, watch), name="demo_view"
                    )
                if duration_s is not None:
                    await asyncio.sleep(duration_s)
                    raise _DemoOver
    except* _DemoOver:
        pass
    finally:
        if config is not None:
            print(render_view(live, title="evgw demo: final state"), file=out)
            print(f"\nThe demo's database is {config.storage.path}", file=out)
            print(f"  evgw sessions -c {workdir / 'demo-site.yaml'}", file=out)
            print(
                f"  evgw report -c {workdir / 'demo-site.yaml'} --by user "
                "--from 2000-01-01 --to 2100-01-01 --format html -o report.html",
                file=out,
            )
            today = datetime.now(ZoneInfo(config.site.timezone)).date().isoformat()
            print(
                f"  evgw stats -c {workdir / 'demo-site.yaml'} --from {today} --to {today} "
                "-o stats.html",
                file=out,
            )
            out.flush()
    return 0


class _DemoOver(Exception):
    """Raised inside the task group when --duration is up, to stop every task."""
