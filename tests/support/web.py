"""A simulated site (real Modbus TCP and RTU-over-TCP servers) and the real gateway with its web
server on a free port, for the web tests (API, SSE, metrics, auth, the page in Chromium)."""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema

from gateway.app import Gateway
from gateway.config import load_config
from gateway.profiles import Profile
from gateway.sim.site import SimSite
from tests.support.mqtt_broker import free_port
from tests.support.uplink import running, wait_until

SPEED = 60.0  # simulated seconds per second
OPENAPI = Path(__file__).resolve().parents[2] / "gateway" / "web" / "static" / "openapi.json"

SITE_YAML = """
site: {{id: web-site, timezone: Europe/Berlin, name: "Depot West"}}
storage: {{path: ./buffer.db}}
{uplink}
buses:
  - {{id: gw, type: rtu-over-tcp, host: 127.0.0.1, tcp_port: {p_bus}}}
devices:
  - {{id: cp1, driver: keba-p30, host: 127.0.0.1, port: {p1}, poll_interval: 200ms}}
  - {{id: cp2, driver: webasto-next, host: 127.0.0.1, port: {p2}, poll_interval: 200ms}}
  - {{id: grid, driver: eastron-sdm630, bus: gw, unit: 2, poll_interval: 200ms}}
auth:
  tokens:
    - {{id: "04A2B3C4D5E6F7", type: rfid, user: alice}}
    - {{id: "FOB-0042", type: keyfob, user: bob}}
tariffs:
  standard:
    currency: EUR
    vat_percent: 19
    elements: [{{components: [{{type: energy, price: "0.30"}}, {{type: flat, price: "1.00"}}]}}]
billing: {{default_tariff: standard}}
grid: {{max_current_a: 40, meter: grid}}
web: {{{web}}}
"""


@dataclass
class WebSite:
    gw: Gateway
    site: SimSite
    url: str  # http://127.0.0.1:PORT/


def write_site(
    tmp_path: Path, *, broker_port: int | None = None, users_file: Path | None = None
) -> Path:
    uplink = (
        f'uplink: {{url: "mqtt://127.0.0.1:{broker_port}", client_id: evgw-web, keepalive: 5s}}'
        if broker_port
        else ""
    )
    web = f'listen: "127.0.0.1:{free_port()}"'
    if users_file is not None:
        web += f", users_file: {users_file}"
    path = tmp_path / "site.yaml"
    path.write_text(
        SITE_YAML.format(uplink=uplink, p_bus=free_port(), p1=free_port(), p2=free_port(), web=web)
    )
    return path


@contextlib.asynccontextmanager
async def web_site(
    tmp_path: Path,
    profiles: dict[str, Profile],
    *,
    broker_port: int | None = None,
    users_file: Path | None = None,
) -> AsyncIterator[WebSite]:
    config = load_config(write_site(tmp_path, broker_port=broker_port, users_file=users_file))
    async with (
        SimSite(config, profiles, speed=SPEED, traffic=False) as site,
        Gateway(config, profiles, time_scale=SPEED) as gw,
        running(gw.run(), "gateway"),
    ):
        assert gw.web is not None
        await wait_until(lambda: "cp1" in gw.live.devices, 5, "first poll")
        yield WebSite(gw, site, gw.web.url)


async def start_charging(site: SimSite, charger: str = "cp1", tag: str = "04A2B3C4D5E6F7") -> None:
    """An EV plugs in, its driver shows a card, the car draws."""
    ev = site.charger(charger)
    ev.plug_in(power_w=11_000)
    await site.sleep(5)
    ev.present_tag(tag)
    await site.sleep(10)
    ev.start_charging()


def openapi() -> dict[str, Any]:
    return json.loads(OPENAPI.read_text())


def validate(instance: Any, schema_name: str) -> None:
    """Validate against a schema of the checked-in OpenAPI file (OpenAPI 3.1 schemas are JSON
    Schema 2020-12)."""
    spec = openapi()
    jsonschema.Draft202012Validator(
        {"$ref": f"#/components/schemas/{schema_name}", "components": spec["components"]},
        format_checker=jsonschema.FormatChecker(),
    ).validate(instance)


def basic(user: str, password: str) -> dict[str, str]:
    """An HTTP basic auth header (RFC 7617, UTF-8)."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


async def get_json(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession(headers=headers) as http, http.get(url) as resp:
        return resp.status, await resp.json()
