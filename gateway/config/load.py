"""Loading a site config: validate each part with the models, check between keys, build the
``GatewayConfig``; every problem of the file at once as ``FILE:LINE:COL: key.path: message``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gateway.config.checks import cross_check
from gateway.config.context import Ctx
from gateway.config.models import GatewayConfig
from gateway.config.values import OCPP_DRIVER
from gateway.errors import ConfigError, ConfigProblem
from gateway.schema import (
    adapter,
    format_duration,
    json_schema,
    validate_parts,
)
from gateway.yamlpos import load_yaml

__all__ = [
    "UNAUTHENTICATED_WARNING",
    "check_config",
    "config_json_schema",
    "load_config",
    "summarize",
]


def config_json_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of the config file, for editors. Checks between keys
    (references, duplicates, host XOR bus) are only in ``load_config``."""
    return json_schema(
        GatewayConfig,
        title="ev-site-gateway site configuration",
        id="https://github.com/ev-site-gateway/ev-site-gateway/config/schema.json",
    )


def load_config(path: str | Path) -> GatewayConfig:
    """Read, validate and resolve a site config. Raises ``ConfigError`` listing every problem
    (``FILE:LINE:COL: key.path: message``), sorted by position."""
    doc = load_yaml(path)
    if doc.data is None and not doc.problems:
        doc.problems.append(
            ConfigProblem(
                str(path),
                1,
                1,
                "",
                "the file is empty: expected a mapping with at least site and storage",
            )
        )
    if doc.data is None:
        raise ConfigError(doc.problems)
    context = {"base_dir": Path(path).absolute().parent}
    raw = validate_parts(GatewayConfig, doc.data, doc, context=context)
    if isinstance(raw, dict):
        cross_check(Ctx(doc), raw)
    if doc.problems or raw is None:
        raise ConfigError(doc.problems)
    # Every part is valid and resolved (secrets, defaults from profiles): build it as code does.
    config: GatewayConfig = adapter(GatewayConfig).validate_python(raw)
    return config.model_copy(update={"source": str(path)})


def check_config(path: str | Path) -> tuple[int, str]:
    """What ``evgw check-config`` prints: exit code 0 and a short summary of a valid file, or 2
    and every problem on its own line."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        return exc.exit_code, "\n".join(str(p) for p in exc.problems)
    return 0, summarize(config)


UNAUTHENTICATED_WARNING = (
    "warning: uplink.command_key is not set: commands and auth responses are not "
    "authenticated; anyone who can publish on the broker can start charging for any user "
    "(docs/security.md)"
)


def summarize(config: GatewayConfig) -> str:
    site = config.site
    lines = [
        f"{config.source}: OK",
        f"site {site.id}"
        + (f" ({site.name})" if site.name else "")
        + f", timezone {site.timezone}",
    ]
    lines.append(f"storage {config.storage.path} (max {config.storage.max_size_mb} MB)")
    if config.uplink is None:
        lines.append("uplink: none (buffering only)")
    else:
        up = config.uplink
        auth = f", user {up.username}" if up.username else ""
        lines.append(f"uplink {up.url} as {up.client_id}, topic prefix {up.topic_prefix}{auth}")
        if up.command_key is not None:
            lines.append(
                f"commands: signed by {up.command_key}, "
                f"at most {format_duration(up.command_max_age_s)} old"
            )
        else:
            lines.append(UNAUTHENTICATED_WARNING)
    if config.ocpp is not None:
        oc = config.ocpp
        lines.append(
            f"ocpp server ws{'s' if oc.security_profile == 2 else ''}://{oc.listen}, "
            f"security profile {oc.security_profile}"
        )
    lines.append(f"{len(config.devices)} device(s) on {len(config.buses)} bus(es):")
    for dev in config.devices:
        if dev.driver == OCPP_DRIVER:
            tariff = f", tariff {dev.tariff}" if dev.tariff else ""
            lines.append(f"  {dev.id}: ocpp charge point {dev.charge_point_id}{tariff}")
            continue
        where = f"{dev.host}:{dev.port}" if dev.host else f"bus {dev.bus}"
        extra = "".join(
            f", {k} {v}" for k, v in (("meter", dev.meter), ("tariff", dev.tariff)) if v
        )
        lines.append(
            f"  {dev.id}: {dev.driver} at {where} unit {dev.unit}, "
            f"every {format_duration(dev.poll_interval_s)}, "
            f"timeout {format_duration(dev.timeout_s)}{extra}"
        )
    for ep in config.endpoints:
        users = [d.id for d in config.devices if d.host == ep.host and d.port == ep.port]
        line = f"endpoint {ep.host}:{ep.port} shared by {', '.join(users)}: one request at a time"
        if ep.inter_request_delay_s:
            line += f", {format_duration(ep.inter_request_delay_s)} between requests"
        if ep.baudrate:
            line += f", serial line {ep.baudrate} baud"
        lines.append(line)
    if config.web is not None:
        access = (
            f"basic auth, users in {config.web.users_file}"
            if config.web.users_file
            else "no login: localhost only"
        )
        lines.append(f"web: status page, API and /metrics on {config.web.listen} ({access})")
    grid = config.grid
    if grid is not None and grid.max_current_a is not None:
        lowered = [f"{len(grid.schedule)} schedule rule(s)"] if grid.schedule else []
        if grid.signal:
            where = grid.signal.get("host") or f"bus {grid.signal.get('bus')}"
            lowered.append(
                f"relay at {where} unit {grid.signal.get('unit', 1)} "
                f"{grid.signal.get('table', 'discrete')} {grid.signal['address']}"
            )
        lowered.append("the cloud's limit command")
        lines.append(
            f"grid limit {grid.max_current_a:g} A per phase"
            + (f" (meter {grid.meter})" if grid.meter else "")
            + f"; lowered by {', '.join(lowered)}"
        )
    ha = config.homeassistant
    if ha.enabled:
        broker = ha.url if ha.broker == "local" else "the uplink's broker"
        lines.append(f"Home Assistant discovery under {ha.prefix}/ on {broker}")
    lines.append(
        f"{len(config.auth.tokens)} token(s), offline policy {config.auth.offline_policy}; "
        f"tariffs: {', '.join(sorted(config.tariffs)) or 'none'}"
    )
    return "\n".join(lines)
