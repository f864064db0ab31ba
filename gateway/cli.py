"""The ``evgw`` command line: the only module that imports everything.

Every error a person can cause prints one clear line (no traceback unless ``--debug``) and exits
non-zero: 2 for usage and configuration problems, 1 for the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sqlite3
import sys
from collections.abc import Callable, Coroutine, Sequence
from datetime import date
from pathlib import Path
from typing import Any, NoReturn

from gateway import __version__
from gateway.errors import ConfigError, GatewayError, UsageError

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None


def _month(text: str) -> str:
    try:
        date.fromisoformat(text + "-01")
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a month (YYYY-MM): {text!r}") from None
    return text


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text!r}")
    return value


def _duration(text: str) -> float:
    from gateway.config import parse_duration

    try:
        return parse_duration(text)
    except (ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="evgw", description="Edge gateway for EV charging sites.")
    p.add_argument("--version", action="version", version=f"evgw {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    p.add_argument(
        "--log-json", action="store_true", default=None, help="JSON logs even on a terminal"
    )
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def cfg(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "-c", "--config", required=True, type=Path, help="site configuration (YAML)"
        )

    sp = sub.add_parser("run", help="run the gateway until SIGINT/SIGTERM")
    cfg(sp)

    sp = sub.add_parser("check-config", help="validate a site configuration")
    cfg(sp)
    sp.add_argument(
        "--schema", action="store_true", help="print the configuration's JSON Schema instead"
    )

    sp = sub.add_parser(
        "simulate", help="serve simulated devices for every device of a site config"
    )
    cfg(sp)
    sp.add_argument("--scenario", type=Path, help="scripted scenario (YAML)")
    sp.add_argument(
        "--speed", type=_positive_float, default=1.0, help="simulated seconds per second"
    )
    sp.add_argument("--duration", type=_duration, help="stop after this long (e.g. 60s)")
    sp.add_argument("--seed", type=int, help="random seed for EV arrivals")
    sp.add_argument(
        "--truth", type=Path, help="write the sessions the simulator produced (JSON lines)"
    )

    sp = sub.add_parser("demo", help="embedded broker + simulated site + gateway + live view")
    sp.add_argument(
        "--broker", help="use this MQTT broker (mqtt://host:port) instead of the embedded one"
    )
    sp.add_argument("--duration", type=_duration, help="stop after this long (e.g. 60s)")
    sp.add_argument(
        "--speed", type=_positive_float, default=30.0, help="simulated seconds per second"
    )
    sp.add_argument(
        "--dir", type=Path, help="where to keep the demo's files (default: a new temp dir)"
    )
    sp.add_argument("--no-view", action="store_true", help="log instead of drawing the live view")

    sp = sub.add_parser(
        "sign-command", help="sign a command or auth response as the cloud (uplink.command_key)"
    )
    sp.add_argument("--key", required=True, type=Path, help="the cloud's Ed25519 private key (PEM)")
    sp.add_argument(
        "--topic",
        required=True,
        help="the topic it goes to, e.g. evgw/depot-7/commands/start (it is signed too)",
    )
    sp.add_argument(
        "--new-key",
        action="store_true",
        help="create --key (mode 0600) and KEY.pub.pem for the gateways when it does not exist",
    )
    sp.add_argument("--issued-at", help="RFC 3339 UTC time to sign as issued_at (default: now)")
    sp.add_argument("payload", nargs="?", default="-", help="the JSON payload; - reads stdin")

    sp = sub.add_parser("web-user", help="manage the status page's users file")
    wsub = sp.add_subparsers(dest="web_user_command", required=True, parser_class=_Parser)
    wp = wsub.add_parser(
        "add", help="add a user or change a password (read from a prompt or stdin, never argv)"
    )
    wp.add_argument("file", type=Path, help="users file (web.users_file); created when missing")
    wp.add_argument("name", help="user name")

    sp = sub.add_parser("drivers", help="list device profiles, or show one")
    sp.add_argument("slug", nargs="?")
    sp.add_argument("--drivers-path", type=Path, help="also load site profiles from this directory")
    sp.add_argument("--json-schema", action="store_true", help="print the profile JSON Schema")

    sp = sub.add_parser("scan", help="probe unit ids and name the matching profile")
    g = sp.add_mutually_exclusive_group(required=True)
    g.add_argument("--tcp", metavar="HOST[:PORT]")
    g.add_argument("--serial", metavar="DEV")
    sp.add_argument("--baud", type=int, action="append", help="baud rate(s) to try (serial)")
    sp.add_argument("--units", default=None, help="unit id range, e.g. 1-10 or 1,2,255")
    sp.add_argument(
        "--timeout",
        type=_duration,
        default=None,
        help="per-request timeout (default 300ms on a serial line, 1s over TCP: a Modbus TCP "
        "gateway reports a silent unit only after its own timeout)",
    )

    sp = sub.add_parser("read", help="poll one device once and print decoded values")
    cfg(sp)
    sp.add_argument("device")
    sp.add_argument("--json", action="store_true")

    sp = sub.add_parser("sessions", help="sessions in the local buffer")
    cfg(sp)
    g = sp.add_mutually_exclusive_group()
    g.add_argument("--open", action="store_true", help="only open sessions")
    g.add_argument(
        "--unsynced", action="store_true", help="only finished sessions not yet delivered"
    )
    sp.add_argument("--json", action="store_true")

    def period(sp: argparse.ArgumentParser, formats: list[str], default: str) -> None:
        """A report over the local buffer: which days, in which format, to where."""
        sp.add_argument("--from", dest="start", type=_date, required=True, metavar="DATE")
        sp.add_argument("--to", dest="end", type=_date, required=True, metavar="DATE")
        sp.add_argument("--format", choices=formats, default=default)
        sp.add_argument("-o", "--output", type=Path, help="write to this file instead of stdout")

    sp = sub.add_parser("report", help="billing report from the local buffer")
    cfg(sp)
    sp.add_argument("--by", choices=["user", "charger"], required=True)
    period(sp, ["csv", "json", "html"], "csv")

    sp = sub.add_parser("stats", help="utilisation, peak hours and charts from the local buffer")
    cfg(sp)
    period(sp, ["csv", "json", "html", "svg"], "html")

    sp = sub.add_parser(
        "consume", help="reference cloud consumer: store finished sessions idempotently"
    )
    sp.add_argument(
        "--broker", required=True, help="mqtt[s]://[user@]host[:port] (no password here)"
    )
    sp.add_argument(
        "--db",
        required=True,
        help="sqlite:///path.db or postgresql://[user@]host/db (password: PGPASSWORD or .pgpass)",
    )
    sp.add_argument(
        "--password-file",
        type=Path,
        help=f"file holding the broker password (or set {BROKER_PASSWORD_ENV})",
    )
    sp.add_argument("--topic-prefix", default="evgw")
    sp.add_argument("--site", action="append", help="site id(s) to consume (default: all, +)")
    sp.add_argument("--client-id", default="evgw-consumer")
    sp.add_argument("--group", help="shared-subscription group ($share/GROUP/...)")
    sp.add_argument("--ca-file")
    sp.add_argument("--duration", type=_duration, help="stop after this long")
    sp.add_argument(
        "--trust",
        type=Path,
        metavar="DIR",
        help="trust only the keys in DIR/<site id>.pem (default: trust each site's first key)",
    )
    sp.add_argument(
        "--reserved-site",
        action="append",
        metavar="NAME",
        help="a broker account's name, never trusted on first use as a site "
        "(repeatable; default: cloud, billing, homeassistant)",
    )

    sp = sub.add_parser("trust", help="site keys and quarantine of the consumer's store")
    tsub = sp.add_subparsers(dest="action", required=True, parser_class=_Parser)
    tp = tsub.add_parser("add", help="trust a site's public key (releases what it signed)")
    tp.add_argument("--db", required=True)
    tp.add_argument("--site", required=True)
    tp.add_argument("--key", required=True, type=Path, help="PEM public key (or 64 hex)")
    tp.add_argument("--note", help="why (kept with the key)")
    tp = tsub.add_parser("list", help="every site key with its status")
    tp.add_argument("--db", required=True)
    tp.add_argument("--site")
    tp.add_argument("--json", action="store_true")
    tp = tsub.add_parser("revoke", help="stop trusting a key: what it signs is quarantined")
    tp.add_argument("--db", required=True)
    tp.add_argument("--site", required=True)
    tp.add_argument("key_id")
    tp.add_argument("--reason")
    tp = tsub.add_parser("quarantine", help="records and keys held in quarantine")
    tp.add_argument("--db", required=True)
    tp.add_argument("--site")
    tp.add_argument("--json", action="store_true")
    tp.add_argument("--released", action="store_true", help="also those released since")
    tp = tsub.add_parser("dismiss", help="close held messages you have looked into")
    tp.add_argument("--db", required=True)
    tp.add_argument("qid", nargs="*", help="quarantine ids (`evgw trust quarantine`)")
    tp.add_argument("--all", action="store_true", help="every held message (of --site)")
    tp.add_argument("--site")
    tp.add_argument("--note", required=True, help="why (kept with each message)")

    sp = sub.add_parser(
        "rotate-key", help="replace the gateway's signing key (the old key signs the handover)"
    )
    cfg(sp)

    sp = sub.add_parser("statement", help="a user's monthly statement from the consumer's store")
    sp.add_argument("--db", required=True)
    sp.add_argument("--user", required=True)
    sp.add_argument("--month", required=True, type=_month)
    sp.add_argument("--format", choices=["csv", "json", "html", "ocpi"], default="html")
    sp.add_argument("--timezone", default="UTC")
    sp.add_argument("-o", "--output", type=Path)

    sp = sub.add_parser("verify", help="check the hash chain and signatures of session records")
    src = sp.add_mutually_exclusive_group(required=True)
    src.add_argument("--file", type=Path, help="JSON lines (or a JSON array) of session records")
    src.add_argument("--db", help="the consumer's store (sqlite:///... or postgresql://...)")
    src.add_argument("-c", "--config", type=Path, help="the gateway's own buffer")
    sp.add_argument("--key", type=Path, help="public key (PEM or raw hex) to check signatures")
    sp.add_argument("--site", help="only this site")
    return p


def _run_async(coro_factory: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run one coroutine; SIGINT/SIGTERM cancel it, which is the only stop signal."""

    async def runner() -> int:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        stopping = False

        def stop() -> None:
            nonlocal stopping
            stopping = True
            task.cancel()

        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop)
        try:
            return await coro_factory()
        except asyncio.CancelledError:
            if stopping:
                return 0
            raise

    return asyncio.run(runner())


def _cmd_check_config(args: argparse.Namespace) -> int:
    from gateway.config import check_config, config_json_schema

    if args.schema:
        import json

        print(json.dumps(config_json_schema(), indent=2))
        return 0
    code, text = check_config(args.config)
    stream = sys.stdout if code == 0 else sys.stderr
    print(text, file=stream)
    return code


def _load(args: argparse.Namespace) -> Any:
    from gateway.config import load_config

    return load_config(args.config)


def _cmd_run(args: argparse.Namespace) -> int:
    from gateway.app import run_gateway

    config = _load(args)
    return _run_async(lambda: run_gateway(config))


def _cmd_simulate(args: argparse.Namespace) -> int:
    from gateway.sim.site import run_simulator

    return _run_async(
        lambda: run_simulator(
            args.config,
            scenario_path=args.scenario,
            speed=args.speed,
            duration_s=args.duration,
            seed=args.seed,
            truth_path=args.truth,
        )
    )


def _cmd_demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    return _run_async(
        lambda: run_demo(
            broker=args.broker,
            duration_s=args.duration,
            speed=args.speed,
            workdir=args.dir,
            view=not args.no_view,
        )
    )


def _cmd_web_user(args: argparse.Namespace) -> int:
    from gateway.web.users import add_user

    if sys.stdin.isatty():
        import getpass

        password = getpass.getpass(f"password for {args.name}: ")
        if getpass.getpass("again: ") != password:
            raise UsageError("the passwords differ: nothing changed")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    new = add_user(args.file, args.name, password)
    print(f"{'added' if new else 'changed the password of'} {args.name} in {args.file}")
    return 0


def _cmd_drivers(args: argparse.Namespace) -> int:
    import json

    from gateway.profiles import describe_profile, load_profiles, profile_json_schema

    if args.json_schema:
        print(json.dumps(profile_json_schema(), indent=2))
        return 0
    profiles = load_profiles(str(args.drivers_path) if args.drivers_path else None)
    if args.slug:
        if args.slug not in profiles:
            raise UsageError(f"no profile named {args.slug!r}; `evgw drivers` lists them")
        print(describe_profile(profiles[args.slug]))
        return 0
    width = max(len(s) for s in profiles)
    for slug in sorted(profiles):
        prof = profiles[slug]
        print(f"{slug:<{width}}  {prof.kind.value:<7}  {prof.manufacturer} {prof.model}")
    return 0


def _cmd_scan(args: argparse.Namespace) -> int:
    from gateway.modbus.commands import run_scan

    return _run_async(
        lambda: run_scan(
            tcp=args.tcp,
            serial=args.serial,
            bauds=args.baud,
            units=args.units,
            timeout_s=args.timeout,
        )
    )


def _cmd_read(args: argparse.Namespace) -> int:
    from gateway.modbus.commands import run_read

    config = _load(args)
    return _run_async(lambda: run_read(config, args.device, as_json=args.json))


def _cmd_sessions(args: argparse.Namespace) -> int:
    from gateway.store.cli import run_sessions

    config = _load(args)
    return _run_async(
        lambda: run_sessions(config, open_only=args.open, unsynced=args.unsynced, as_json=args.json)
    )


def _load_for_period(args: argparse.Namespace) -> Any:
    if args.end < args.start:
        raise UsageError("--to is before --from")
    return _load(args)


def _cmd_report(args: argparse.Namespace) -> int:
    from gateway.billing.report import run_report

    config = _load_for_period(args)
    return _run_async(
        lambda: run_report(
            config, by=args.by, start=args.start, end=args.end, fmt=args.format, output=args.output
        )
    )


def _cmd_stats(args: argparse.Namespace) -> int:
    from gateway.stats import run_stats

    config = _load_for_period(args)
    return _run_async(
        lambda: run_stats(
            config, start=args.start, end=args.end, fmt=args.format, output=args.output
        )
    )


BROKER_PASSWORD_ENV = "EVGW_BROKER_PASSWORD"
_PG_PASSWORD = "set PGPASSWORD or use ~/.pgpass (both read by libpq)"


def _no_password_in(url: str | None, flag: str, where: str) -> None:
    """A password on the command line shows in ``ps``, in the shell history and in process
    accounting: refused, with the way that works instead."""
    if url is None:
        return
    from urllib.parse import urlsplit

    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    if password:
        from gateway.redact import redact_url

        raise UsageError(
            f"{flag} {redact_url(url)}: a password does not belong on the command line "
            f"(anyone can read it with ps); {where}"
        )


def _broker_password(args: argparse.Namespace) -> str | None:
    if args.password_file is not None:
        try:
            text = args.password_file.read_text(encoding="utf-8")
        except OSError as exc:
            raise UsageError(
                f"--password-file {args.password_file}: cannot read: {exc.strerror}"
            ) from None
        except UnicodeDecodeError:
            raise UsageError(f"--password-file {args.password_file}: not UTF-8 text") from None
        password = text.strip("\r\n")
        if not password:
            raise UsageError(f"--password-file {args.password_file}: empty")
        return password
    import os

    return os.environ.get(BROKER_PASSWORD_ENV) or None


def _cmd_consume(args: argparse.Namespace) -> int:
    from gateway.cloud.consumer import RESERVED_SITES
    from gateway.cloud.subscriber import run_consumer

    _no_password_in(
        args.broker, "--broker", f"use --password-file FILE or the {BROKER_PASSWORD_ENV} variable"
    )
    _no_password_in(args.db, "--db", _PG_PASSWORD)
    password = _broker_password(args)
    return _run_async(
        lambda: run_consumer(
            broker=args.broker,
            db_url=args.db,
            topic_prefix=args.topic_prefix,
            sites=args.site,
            client_id=args.client_id,
            group=args.group,
            ca_file=args.ca_file,
            duration_s=args.duration,
            trust_dir=args.trust,
            password=password,
            reserved_sites=args.reserved_site or RESERVED_SITES,
        )
    )


def _cmd_trust(args: argparse.Namespace) -> int:
    from gateway.cloud import trustadmin

    _no_password_in(args.db, "--db", _PG_PASSWORD)
    # Each action has its own arguments (the subparsers require what it needs).
    actions: dict[str, Callable[[], Coroutine[Any, Any, int]]] = {
        "add": lambda: trustadmin.add_key(args.db, args.site, args.key, args.note),
        "list": lambda: trustadmin.list_keys(args.db, args.site, args.json),
        "revoke": lambda: trustadmin.revoke_key(args.db, args.site, args.key_id, args.reason),
        "quarantine": lambda: trustadmin.list_quarantine(
            args.db, args.site, args.json, args.released
        ),
        "dismiss": lambda: trustadmin.dismiss_held(
            args.db, args.qid, args.all, args.site, args.note
        ),
    }
    code = _run_async(actions[args.action])
    sys.stdout.flush()
    return code


def _cmd_rotate_key(args: argparse.Namespace) -> int:
    from gateway.billing.signing import history_path, rotate_key

    config = _load(args)
    path = Path(config.storage.path).with_name("evgw-signing.key")
    old, new = rotate_key(path, config.site.id)
    print(
        f"signing key {old} replaced by {new.key_id} ({path}); the handover statement is in "
        f"{history_path(path)}.\nRestart the gateway: it publishes the new key with the "
        "statement, and consumers that trust the old key trust the new one."
    )
    return 0


def _cmd_statement(args: argparse.Namespace) -> int:
    from gateway.cloud.statement import run_statement

    _no_password_in(args.db, "--db", _PG_PASSWORD)
    return _run_async(
        lambda: run_statement(
            db_url=args.db,
            user=args.user,
            month=args.month,
            fmt=args.format,
            tz=args.timezone,
            output=args.output,
        )
    )


def _cmd_sign_command(args: argparse.Namespace) -> int:
    import json

    from gateway.model import from_rfc3339
    from gateway.uplink.envelope import load_signing_key, schema_for_topic, sign_message
    from gateway.uplink.schemas import validate

    schema = schema_for_topic(args.topic)
    if schema is None:
        raise UsageError(
            f"--topic {args.topic!r} is no command topic (P/S/commands/start|stop|tokens|"
            "tariffs) nor P/S/auth/response"
        )
    issued_at = None
    if args.issued_at is not None:
        try:
            if not args.issued_at.upper().endswith("Z") and "+" not in args.issued_at[10:]:
                raise ValueError("no time zone")
            issued_at = from_rfc3339(args.issued_at)
        except ValueError:
            raise UsageError(f"--issued-at {args.issued_at!r} is no RFC 3339 time") from None
    text = sys.stdin.read() if args.payload == "-" else args.payload
    try:
        payload = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"the payload is not JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise UsageError("the payload must be a JSON object")
    key = load_signing_key(args.key, create=args.new_key)
    try:
        signed = sign_message(args.topic, payload, key, issued_at=issued_at)
    except ValueError as exc:
        raise UsageError(f"the payload cannot be signed: {exc}") from None
    problems = validate(schema, signed)
    if problems:
        raise UsageError(f"the payload is not a valid {schema}: {'; '.join(problems)}")
    print(json.dumps(signed, separators=(",", ":"), ensure_ascii=False))
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from gateway.billing.verify import run_verify

    _no_password_in(args.db, "--db", _PG_PASSWORD)
    config = _load(args) if args.config else None
    return _run_async(
        lambda: run_verify(
            file=args.file, db_url=args.db, config=config, key=args.key, site=args.site
        )
    )


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": _cmd_run,
    "check-config": _cmd_check_config,
    "simulate": _cmd_simulate,
    "demo": _cmd_demo,
    "web-user": _cmd_web_user,
    "drivers": _cmd_drivers,
    "scan": _cmd_scan,
    "read": _cmd_read,
    "sessions": _cmd_sessions,
    "report": _cmd_report,
    "stats": _cmd_stats,
    "consume": _cmd_consume,
    "statement": _cmd_statement,
    "verify": _cmd_verify,
    "trust": _cmd_trust,
    "rotate-key": _cmd_rotate_key,
    "sign-command": _cmd_sign_command,
}


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(0)


def main(argv: Sequence[str] | None = None) -> int:
    from gateway.logs import configure_logging

    args = build_parser().parse_args(argv)
    if args.command in ("run", "simulate", "demo", "consume"):
        # Until the event loop installs its own handler, SIGTERM means "stop now, cleanly".
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    quiet_default = "warning" if args.command not in ("run", "simulate", "consume") else "info"
    configure_logging("debug" if args.debug else quiet_default, json=args.log_json)
    try:
        return _COMMANDS[args.command](args)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return exc.exit_code
    except GatewayError as exc:
        if args.debug:
            raise
        print(f"evgw {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except sqlite3.Error as exc:
        # A buffer damaged while a tool reads it (quick_check at open passed): one line.
        if args.debug:
            raise
        print(
            f"evgw {args.command}: the local buffer cannot be read (damaged?): {exc}",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
