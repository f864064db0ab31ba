"""Checks between config keys that one section's model cannot make alone: secrets read from
files and the environment, TLS and uplink options, the OCPP server, Home Assistant, grid limits,
tariffs, tokens and the web server. Each reports into the document with the position of the key
it is about; ``cross_check`` runs them all on the validated parts of a file."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from gateway.billing.tariff import tariff_set_problems
from gateway.config.context import Ctx, choices_hint, ids, keys_at, unknown
from gateway.config.devices import check_buses, check_devices
from gateway.config.values import CP_ID_RE, Secret, is_loopback, split_listen
from gateway.errors import ConfigError, GatewayError
from gateway.profiles import Profile, load_profiles
from gateway.yamlpos import PathT

__all__ = ["cross_check"]


def _load_profiles(ctx: Ctx, raw: dict[str, Any]) -> dict[str, Profile] | None:
    if "drivers_path" in keys_at(ctx, ()) and "drivers_path" not in raw:
        return None  # already reported; every driver would look unknown
    try:
        profiles = load_profiles(raw.get("drivers_path"))
    except ConfigError as exc:
        ctx.doc.problems.extend(exc.problems)
        return None
    return profiles


def _resolve_secret(ctx: Ctx, uplink: dict[str, Any], path: PathT = ("uplink",)) -> None:
    if "password_file" in uplink and "password" in uplink:
        ctx.add((*path, "password"), "set either password_file or password, not both", key=True)
        return
    secret: str | None = None
    where: PathT = path
    if "password_file" in uplink:
        where = (*path, "password_file")
        file = Path(uplink.pop("password_file"))
        try:
            text = file.read_text(encoding="utf-8")
        except OSError as exc:
            ctx.add(where, f"cannot read password file {file}: {exc.strerror}")
            return
        except UnicodeDecodeError:
            ctx.add(where, f"password file {file} is not UTF-8 text")
            return
        secret = text.rstrip("\r\n")
        if not secret:
            ctx.add(where, f"password file {file} is empty")
            return
    elif "password" in uplink:
        where = (*path, "password")
        var = uplink["password"][2:-1]
        value = os.environ.get(var)
        if value is None:
            ctx.add(where, f"environment variable {var} is not set")
            del uplink["password"]
            return
        if not value:
            ctx.add(where, f"environment variable {var} is empty")
            del uplink["password"]
            return
        secret = value
    if secret is not None:
        uplink["password"] = Secret(secret)
        if "username" not in uplink and "username" not in keys_at(ctx, path):
            ctx.add(where, "a password needs a username", key=True)


def _check_uplink(ctx: Ctx, raw: dict[str, Any]) -> None:
    uplink = raw.get("uplink")
    if not isinstance(uplink, dict):
        return
    _resolve_secret(ctx, uplink)
    if "client_id" not in uplink and isinstance(raw.get("site"), dict) and "id" in raw["site"]:
        uplink["client_id"] = f"evgw-{raw['site']['id']}"
    key_file = uplink.get("command_key")
    if isinstance(key_file, str):
        from gateway.uplink.envelope import load_command_key

        try:
            load_command_key(key_file)
        except GatewayError as exc:
            ctx.add(("uplink", "command_key"), str(exc))
    elif "command_max_age" in uplink and "command_key" not in keys_at(ctx, ("uplink",)):
        ctx.add(
            ("uplink", "command_max_age"),
            "command_max_age needs command_key (unsigned commands carry no age)",
            key=True,
        )
    url = uplink.get("url", "")
    tls = uplink.get("tls")
    if isinstance(tls, dict):
        if url.startswith("mqtt://"):
            ctx.add(
                ("uplink", "tls"),
                "tls is set but the url is mqtt://: use mqtts:// for TLS",
                key=True,
            )
        if ("cert_file" in tls) != ("key_file" in tls):
            have, need = (
                ("cert_file", "key_file") if "cert_file" in tls else ("key_file", "cert_file")
            )
            ctx.add(("uplink", "tls", have), f"{have} needs {need}", key=True)


def _check_homeassistant(ctx: Ctx, raw: dict[str, Any]) -> None:
    ha = raw["homeassistant"]
    path: PathT = ("homeassistant",)
    local = ha.get("broker") == "local"
    for key in ("url", "client_id", "username", "password", "password_file"):
        if key in ha and not local:
            ctx.add((*path, key), f"{key} is for broker: local (cloud uses the uplink's)", key=True)
    if not ha.get("enabled"):
        return
    if local:
        if "url" not in ha and "url" not in keys_at(ctx, path):
            ctx.add(path, "broker: local needs url (mqtt://host[:port] of the site's broker)")
        elif str(ha.get("url", "")).startswith("mqtts://"):
            ctx.add((*path, "url"), "the local broker is reached with mqtt:// on the site LAN")
        _resolve_secret(ctx, ha, path)
    elif "uplink" not in raw and "uplink" not in keys_at(ctx, ()):
        ctx.add((*path, "broker"), "broker: cloud needs an uplink (or use broker: local)")


def _check_grid_limits(ctx: Ctx, grid: dict[str, Any], buses: dict[str, dict[str, Any]]) -> None:
    """Limits the grid can set lower the connection's: without one they have nothing to lower."""
    present = keys_at(ctx, ("grid",))
    for key in ("schedule", "signal"):
        if key in present and grid.get(key) and "max_current_a" not in present:
            ctx.add(("grid", key), "needs grid.max_current_a (the limit it lowers)")
    limited: list[tuple[PathT, Any]] = [
        (("grid", "schedule", i), rule) for i, rule in enumerate(grid.get("schedule") or [])
    ]
    signal = grid.get("signal")
    if isinstance(signal, dict):
        limited.append((("grid", "signal"), signal))
        if ("host" in signal) == ("bus" in signal):
            ctx.add(("grid", "signal"), "needs host (Modbus TCP) or bus (RS-485), not both")
        elif "bus" in signal and signal["bus"] not in buses:
            ctx.add(("grid", "signal", "bus"), unknown("bus", signal["bus"], buses, "buses"))
    for path, item in limited:
        if isinstance(item, dict) and ("max_current_a" in item) == ("max_power_w" in item):
            ctx.add(path, "needs max_current_a or max_power_w (one of them)")


def _read_ocpp_passwords(ctx: Ctx, file: Path) -> dict[str, Secret] | None:
    where: PathT = ("ocpp", "passwords_file")
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        ctx.add(where, f"cannot read password file {file}: {exc.strerror}")
        return None
    except UnicodeDecodeError:
        ctx.add(where, f"password file {file} is not UTF-8 text")
        return None
    out: dict[str, Secret] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        cp_id, sep, password = line.partition(":")
        cp_id = cp_id.strip()
        # The line number is the file's, never the password: messages must not show it.
        if not sep or not re.fullmatch(CP_ID_RE, cp_id) or not password:
            ctx.add(where, f"{file} line {n}: expected CHARGE_POINT_ID:PASSWORD")
            continue
        if cp_id in out:
            ctx.add(where, f"{file} line {n}: charge point '{cp_id}' is listed twice")
            continue
        out[cp_id] = Secret(password)
    return out


def _check_ocpp(ctx: Ctx, raw: dict[str, Any]) -> None:
    ocpp = raw.get("ocpp")
    if not isinstance(ocpp, dict):
        return
    path: PathT = ("ocpp",)
    profile = ocpp.get("security_profile", 0)
    present = keys_at(ctx, path)
    if "passwords_file" in ocpp:
        passwords = _read_ocpp_passwords(ctx, Path(ocpp.pop("passwords_file")))
        if passwords is not None:
            ocpp["passwords"] = passwords
    if profile >= 1 and "passwords_file" not in present:
        ctx.add(
            (*path, "security_profile"),
            f"security_profile {profile} (basic auth) needs passwords_file",
        )
    if profile == 2:
        for key_name in ("cert_file", "key_file"):
            if key_name not in present:
                ctx.add(
                    (*path, "security_profile"),
                    f"security_profile 2 (TLS) needs {key_name}",
                )
    elif profile < 2:
        ctx.misplaced(
            path,
            present,
            ("cert_file", "key_file"),
            lambda name: f"{name} is for security_profile 2 (TLS); this is {profile}",
        )


def _check_tariffs(ctx: Ctx, raw: dict[str, Any]) -> None:
    """Through the same function as a ``tariffs`` push (gateway.billing.tariff)."""

    tariffs = raw.get("tariffs") or {}
    if not isinstance(tariffs, dict):
        return
    billing = raw.get("billing") if isinstance(raw.get("billing"), dict) else {}
    # A section whose own checks failed is not there to refer to: say nothing about references.
    tariffs_known = "tariffs" not in keys_at(ctx, ()) or "tariffs" in raw
    default = (billing or {}).get("default_tariff")
    groups = (billing or {}).get("groups") or {}
    problems = tariff_set_problems(
        tariffs,
        default_tariff=default if isinstance(default, str) else None,
        groups={g: t for g, t in groups.items() if isinstance(t, str)},
        chargers=ctx.tariff_refs,
        unknown=lambda name, known: unknown("tariff", name, known, "tariffs"),
    )
    for problem in problems:
        if problem.path[0] != "tariffs" and not tariffs_known:
            continue
        ctx.add(problem.path, problem.message, key=problem.key)


def _check_tokens(ctx: Ctx, raw: dict[str, Any]) -> None:
    auth = raw.get("auth")
    if not isinstance(auth, dict):
        return
    items = [(i, t) for i, t in enumerate(auth.get("tokens") or []) if isinstance(t, dict)]
    ids(ctx, items, ("auth", "tokens"), "token", fold=True)
    billing = raw.get("billing") if isinstance(raw.get("billing"), dict) else {}
    if "billing" in keys_at(ctx, ()) and "billing" not in raw:
        return
    groups = (billing or {}).get("groups") or {}
    for i, token in items:
        group = token.get("group")
        if group is not None and group not in groups:
            ctx.add(
                ("auth", "tokens", i, "group"),
                f"group '{group}' has no tariff in billing.groups"
                + choices_hint(group, groups, "groups"),
            )


def cross_check(ctx: Ctx, raw: dict[str, Any]) -> None:
    profiles = _load_profiles(ctx, raw)
    _check_uplink(ctx, raw)
    _check_ocpp(ctx, raw)
    buses = check_buses(ctx, raw)
    check_devices(ctx, raw, buses, profiles)
    if isinstance(raw.get("grid"), dict):
        _check_grid_limits(ctx, raw["grid"], buses)
    if isinstance(raw.get("homeassistant"), dict):
        _check_homeassistant(ctx, raw)
    _check_tariffs(ctx, raw)
    _check_tokens(ctx, raw)
    _check_web(ctx, raw)


def _check_web(ctx: Ctx, raw: dict[str, Any]) -> None:
    web = raw.get("web")
    if not isinstance(web, dict):
        return
    if "users_file" in web:
        from gateway.web.users import UsersFileError, load_users

        try:
            users = load_users(web["users_file"])
        except UsersFileError as exc:
            ctx.add(("web", "users_file"), str(exc))
            return
        if not users:
            ctx.add(
                ("web", "users_file"),
                f"no users in {web['users_file']}: add one with evgw web-user add FILE NAME",
            )
        return
    listen = web.get("listen")
    if listen is None and "listen" in keys_at(ctx, ("web",)):
        return  # invalid, already reported
    host, _ = split_listen(listen or "127.0.0.1:8080")
    if not is_loopback(host):
        where: PathT = ("web", "listen") if listen is not None else ("web",)
        shown = host or "every address"
        ctx.add(
            where,
            f"listening on {shown} (beyond localhost) needs authentication: set "
            "web.users_file (evgw web-user add FILE NAME creates it)",
        )
