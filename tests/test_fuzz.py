"""Fuzzing every input surface with hypothesis: config and profile files, Modbus replies on the
wire, MQTT command payloads, consumer records, CLI arguments. Never a crash or a raw traceback:
a value, or the surface's own clear error.

Sized for CI (the whole file runs in well under a minute). ``EVGW_FUZZ_EXAMPLES=N`` runs every
test with N examples and a fresh random seed each run (the long mode), for example
``EVGW_FUZZ_EXAMPLES=5000 pytest tests/test_fuzz.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import io
import json
import math
import os
import struct
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gateway.cli import main
from gateway.cloud.cloudstore import open_cloud_store
from gateway.cloud.consumer import SessionConsumer
from gateway.config import GatewayConfig, load_config
from gateway.errors import ConfigError, DeviceError
from gateway.modbus.bus import REASONS, TcpBus
from gateway.modbus.codec import CodecError, decode
from gateway.modbus.types import Table
from gateway.ports import TokenListPart
from gateway.profiles import Profile, load_profile
from gateway.uplink.commands import CommandHandler, MemoryRequestLog
from gateway.uplink.topics import Topics
from gateway.yamlpos import parse_yaml
from tests.support.consumer import make_chain, make_signer

REPO = Path(__file__).resolve().parent.parent
_LONG = int(os.environ.get("EVGW_FUZZ_EXAMPLES", "0") or 0)


def fuzz(ci_examples: int) -> Callable[[Any], Any]:
    """CI: a fixed number of examples, derandomized (the same ones every run, so CI never turns
    red by chance). Long mode: ``EVGW_FUZZ_EXAMPLES`` random ones."""
    return settings(
        max_examples=_LONG or ci_examples,
        derandomize=not _LONG,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# -------------------------------------------------------------------------- values and YAML

_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
    | st.sampled_from(["", "0", "-1", "1e400", "nan", "${NOPE}", "5m", "mqtt://", "a" * 300])
)
_DATA = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.text(max_size=12) | st.sampled_from(["site", "id", "devices"]), inner, max_size=4
        )
    ),
    max_leaves=12,
)


def _paths(data: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(data, dict):
        for k, v in data.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from _paths(v, (*prefix, i))


def _mutate(base: Any, path: tuple[Any, ...], value: Any, action: str) -> Any:
    """Replace, delete or add at ``path`` in a deep copy of ``base``."""
    out = copy.deepcopy(base)
    if not path:
        return value
    parent = out
    for part in path[:-1]:
        parent = parent[part]
    last = path[-1]
    if action == "delete":
        del parent[last]
    elif action == "add" and isinstance(parent, dict):
        parent[f"{last}_x"] = value
    else:
        parent[last] = value
    return out


def _dump(data: Any) -> str:
    return yaml.safe_dump(data, allow_unicode=True, sort_keys=False)


@contextlib.contextmanager
def _scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="evgw-fuzz-") as d:
        yield Path(d)


def _example_config() -> Any:
    return yaml.safe_load((REPO / "config" / "example-site.yaml").read_text())


_EXAMPLE = _example_config()
_EXAMPLE_PATHS = list(_paths(_EXAMPLE))


@pytest.mark.slow
@fuzz(60)
@given(
    path=st.sampled_from(_EXAMPLE_PATHS),
    value=_DATA,
    action=st.sampled_from(["replace", "delete", "add"]),
)
def test_mutated_site_config_loads_or_says_why(
    path: tuple[Any, ...], value: Any, action: str
) -> None:
    data = _mutate(_EXAMPLE, path, value, action)
    with _scratch() as d:
        file = d / "site.yaml"
        file.write_text(_dump(data), encoding="utf-8")
        try:
            config = load_config(file)
        except ConfigError as exc:
            assert exc.problems and all(str(p).startswith(str(file)) for p in exc.problems)
            assert "Traceback" not in str(exc)
        else:
            assert isinstance(config, GatewayConfig)


@fuzz(150)
@given(text=st.text(max_size=400) | st.binary(max_size=400).map(lambda b: b.decode("latin-1")))
def test_any_text_as_yaml_is_data_or_problems(text: str) -> None:
    doc = parse_yaml(text, "x.yaml")
    assert doc.data is None or not doc.problems or isinstance(doc.problems, list)
    for p in doc.problems:
        assert str(p).startswith("x.yaml:")


def _shipped_profile_files() -> list[Path]:
    return sorted((REPO / "drivers").glob("*.yaml"))


_PROFILES = {p.name: yaml.safe_load(p.read_text()) for p in _shipped_profile_files()}
_PROFILE_PATHS = [(name, path) for name, data in _PROFILES.items() for path in _paths(data)]


@pytest.mark.slow
@fuzz(60)
@given(
    target=st.sampled_from(_PROFILE_PATHS),
    value=_DATA,
    action=st.sampled_from(["replace", "delete", "add"]),
)
def test_mutated_profile_loads_or_says_why(
    target: tuple[str, tuple[Any, ...]], value: Any, action: str
) -> None:
    name, path = target
    data = _mutate(_PROFILES[name], path, value, action)
    with _scratch() as d:
        file = d / name
        file.write_text(_dump(data), encoding="utf-8")
        try:
            profile = load_profile(file)
        except ConfigError as exc:
            assert exc.problems and "Traceback" not in str(exc)
        else:
            assert isinstance(profile, Profile)


# -------------------------------------------------------------------------- Modbus

_WORD = st.integers(min_value=0, max_value=0xFFFF)
_NAN_WORDS = st.sampled_from(
    [[0x7FC0, 0x0000], [0x7F80, 0x0000], [0xFF80, 0x0000], [0xFFFF, 0xFFFF]]
)


@fuzz(80)
@given(data=st.data())
def test_every_shipped_register_decodes_to_a_value_or_codec_error(
    shipped_profiles: dict[str, Profile], data: st.DataObject
) -> None:
    profile = data.draw(st.sampled_from(sorted(shipped_profiles)))
    for spec in shipped_profiles[profile].registers:
        words = data.draw(
            st.lists(_WORD, min_size=spec.count, max_size=spec.count)
            | (
                _NAN_WORDS.map(lambda w, n=spec.count: (w * n)[:n])
                if spec.count >= 2
                else st.nothing()
            )
            | st.lists(_WORD, max_size=spec.count + 2)
        )
        try:
            value = decode(spec, words)
        except CodecError:
            assert len(words) != spec.count
            continue
        assert value is None or isinstance(value, int | float | str)
        if isinstance(value, float):
            assert math.isfinite(value)


# A raw Modbus TCP server that answers every request with the bytes the example chose.
_READ_FC = {Table.COIL: 1, Table.DISCRETE: 2, Table.HOLDING: 3, Table.INPUT: 4}


@st.composite
def _replies(draw: st.DrawFn) -> tuple[str, int, bytes]:
    """(kind, function code, PDU after the function code)."""
    kind = draw(
        st.sampled_from(["good", "wrong_fc", "short", "long", "bad_count", "exception", "garbage"])
    )
    if kind == "good":
        return kind, 3, b""
    if kind == "wrong_fc":
        # FC04 (the other register read) is the one that decodes cleanly as registers.
        fc = draw(st.sampled_from([4, 1, 2, 16]) | st.integers(0, 127).filter(lambda f: f != 3))
        return kind, fc, b""
    if kind == "exception":
        return kind, 0x83, bytes([draw(st.integers(0, 255))])
    return kind, draw(st.integers(0, 255)), draw(st.binary(max_size=20))


async def _serve_once(count: int, kind: str, fc: int, extra: bytes, regs: list[int]) -> list[int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            while True:
                head = await reader.readexactly(7)
                tid, _, length, unit = struct.unpack(">HHHB", head)
                await reader.readexactly(length - 1)
                body = struct.pack(f">{count}H", *regs)
                if kind in ("good", "wrong_fc"):
                    pdu = bytes([fc, len(body)]) + body
                elif kind == "short":
                    pdu = bytes([3, len(body)]) + body[: len(body) // 2]
                elif kind == "long":
                    pdu = bytes([3, len(body) + 2]) + body + b"\x00\x01"
                elif kind == "bad_count":
                    pdu = bytes([3, (len(body) + 7) % 256]) + body
                elif kind == "exception":
                    pdu = bytes([fc]) + extra
                else:
                    pdu = bytes([fc]) + extra
                writer.write(struct.pack(">HHHB", tid, 0, len(pdu) + 1, unit) + pdu)
                await writer.drain()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    bus = TcpBus("127.0.0.1", port)
    try:
        return await bus.read(1, Table.HOLDING, 0, count, 0.3)
    finally:
        await bus.close()
        server.close()
        with contextlib.suppress(Exception):
            await server.wait_closed()


@fuzz(40)
@given(reply=_replies(), regs=st.lists(_WORD, min_size=1, max_size=8))
def test_modbus_reply_on_the_wire_is_data_only_when_it_answers_the_request(
    reply: tuple[str, int, bytes], regs: list[int]
) -> None:
    kind, fc, extra = reply
    try:
        words = asyncio.run(_serve_once(len(regs), kind, fc, extra, regs))
    except DeviceError as exc:
        assert exc.reason in REASONS
        # pymodbus drops the link on a function code it does not know (connection_lost):
        # any of the reasons will do, as long as it is an error and not data.
        assert kind != "good"
        return
    # Data only for a well-formed FC03 reply with the registers asked for.
    assert kind in ("good", "long", "garbage") or (kind == "wrong_fc" and fc == 3)
    assert len(words) == len(regs)
    if kind == "good":
        assert words == regs


# -------------------------------------------------------------------------- MQTT commands


class _Target:
    """A CommandTarget that accepts everything the schemas let through."""

    async def remote_start(self, charger_id: str, user: str, token: str | None) -> dict[str, Any]:
        return {"charger_id": charger_id}

    async def remote_stop(self, charger_id: str | None, session_id: str | None) -> dict[str, Any]:
        return {}

    async def update_tokens(
        self, version: int, mode: str, tokens: Any, remove: Any
    ) -> dict[str, Any]:
        return {"version": version}

    async def update_token_part(self, part: TokenListPart) -> dict[str, Any]:
        return {"version": part.version, "part": part.index}

    async def update_tariffs(self, version: int, tariffs: Any) -> dict[str, Any]:
        return {"version": version}

    async def auth_response(self, request_id: str, status: str, user: Any, expires_at: Any) -> None:
        return None

    async def set_grid_limit(self, request_id: str, scope: str, *args: Any) -> dict[str, Any]:
        return {"scope": scope}

    async def change_availability(self, charger_id: str, available: bool) -> dict[str, Any]:
        return {"charger_id": charger_id}

    async def reset(self, charger_id: str, hard: bool) -> dict[str, Any]:
        return {"charger_id": charger_id}


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=15,
)
_COMMAND_BASES = {
    "start": {"request_id": "r1", "charger_id": "cp1", "user": "alice", "token": None},
    "stop": {"request_id": "r2", "charger_id": "cp1"},
    "tokens": {
        "request_id": "r3",
        "version": 2,
        "mode": "replace",
        "tokens": [{"id": "04A2", "type": "rfid", "user": "bob"}],
    },
    "tariffs": {"request_id": "r4", "version": 2, "tariffs": {}},
    "limit": {"request_id": "r5", "scope": "site", "max_current_a": 16, "expires_at": None},
    "availability": {"request_id": "r6", "charger_id": "cp1", "available": False},
    "reset": {"request_id": "r7", "charger_id": "cp1", "type": "soft"},
}


@st.composite
def _command_payloads(draw: st.DrawFn) -> bytes:
    how = draw(st.sampled_from(["bytes", "json", "mutated"]))
    if how == "bytes":
        return draw(st.binary(max_size=300))
    if how == "json":
        return json.dumps(draw(_JSON)).encode()
    base = copy.deepcopy(draw(st.sampled_from(list(_COMMAND_BASES.values()))))
    key = draw(st.sampled_from(sorted(base)) | st.text(max_size=8))
    base[key] = draw(_JSON)
    return json.dumps(base).encode()


@fuzz(200)
@given(
    name=st.sampled_from(
        ["start", "stop", "tokens", "tariffs", "limit", "availability", "reset", "launch", "auth"]
    ),
    payload=_command_payloads(),
    retained=st.booleans(),
)
def test_any_command_payload_gets_a_reply_never_an_exception(
    name: str, payload: bytes, retained: bool
) -> None:
    topics = Topics("evgw", "depot-7")
    handler = CommandHandler(topics, _Target(), MemoryRequestLog())  # type: ignore[arg-type]
    topic = topics.auth_response if name == "auth" else f"{topics.root}/commands/{name}"
    reply = asyncio.run(handler.handle(topic, payload, retained=retained))
    if retained:
        assert reply is None
        return
    assert reply is not None
    body = json.loads(reply.encode())
    assert body["ok"] in (True, False)
    if not body["ok"]:
        assert body["error"]["code"] != "internal_error", body
    busy = handler.busy(topic, payload)
    assert busy is not None and json.loads(busy.encode())["error"]["code"] == "busy"


# -------------------------------------------------------------------------- consumer records

_CHAIN: list[dict[str, Any]] = []
_KEY: list[bytes] = []


def _chain() -> list[dict[str, Any]]:
    if not _CHAIN:
        with _scratch() as d:
            signer = make_signer(d)
            _CHAIN.extend(make_chain(3, signer))
            _KEY.append(json.dumps(signer.public_key_payload()).encode())
    return _CHAIN


@st.composite
def _records(draw: st.DrawFn) -> bytes:
    how = draw(st.sampled_from(["bytes", "json", "mutated", "mutated", "deleted"]))
    if how == "bytes":
        return draw(st.binary(max_size=300))
    if how == "json":
        return json.dumps(draw(_JSON)).encode()
    rec = copy.deepcopy(draw(st.sampled_from(_chain())))
    paths = [p for p in _paths(rec) if p]
    path = draw(st.sampled_from(paths))
    if how == "deleted":
        rec = _mutate(rec, path, None, "delete")
    else:
        rec = _mutate(rec, path, draw(_JSON), "replace")
    return json.dumps(rec).encode()


@pytest.mark.slow
@fuzz(40)
@given(payloads=st.lists(_records(), min_size=1, max_size=4))
def test_consumer_takes_any_record_without_an_exception(payloads: list[bytes]) -> None:
    async def run() -> list[str]:
        with _scratch() as d:
            async with open_cloud_store(f"sqlite:///{d / 'cloud.db'}") as store:
                consumer = SessionConsumer(store)
                _chain()
                assert await consumer.handle("evgw/depot-7/gateway/key", _KEY[0]) == "key"
                outcomes = [
                    await consumer.handle(
                        "evgw/depot-7/sessions/finished", json.dumps(_chain()[0]).encode()
                    )
                ]
                for p in payloads:
                    outcomes.append(await consumer.handle("evgw/depot-7/sessions/finished", p))
                return outcomes

    outcomes = asyncio.run(run())
    assert outcomes[0] == "stored"
    assert set(outcomes) <= {
        "stored",
        "duplicate",
        "conflict",
        "quarantined",
        "rejected",
        "ignored",
        "key",
    }


# -------------------------------------------------------------------------- CLI arguments

_SUBCOMMANDS = [
    "check-config",
    "sessions",
    "report",
    "statement",
    "verify",
    "sign-command",
    "drivers",
]
_OPTIONS = [
    "-c",
    "--config",
    "--db",
    "--user",
    "--month",
    "--from",
    "--to",
    "--by",
    "--format",
    "--file",
    "--key",
    "--site",
    "--topic",
    "--json",
    "--open",
    "--unsynced",
    "-o",
    "--timezone",
    "--debug",
]
_ARG_VALUES = st.sampled_from(
    [
        "",
        "x",
        "-",
        "2026-13",
        "2026-01",
        "2026-01-01",
        "user",
        "charger",
        "csv",
        "json",
        "html",
        "sqlite:///",
        "postgresql://u@127.0.0.1:1/x",
        "/nonexistent/site.yaml",
        "evgw/x/commands/start",
        "{}",
        "[",
        "\x00",
        "--",
        "9" * 30,
    ]
) | st.text(max_size=15)


@fuzz(60)
@given(
    sub=st.sampled_from(_SUBCOMMANDS),
    rest=st.lists(st.sampled_from(_OPTIONS) | _ARG_VALUES, max_size=7),
)
def test_cli_arguments_give_an_exit_code_never_a_traceback(sub: str, rest: list[str]) -> None:
    assume("--debug" not in rest)  # --debug asks for tracebacks on purpose
    err, out = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    with _scratch() as d, contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        os.chdir(d)
        try:
            code = main([sub, *rest])
        except SystemExit as exc:  # argparse usage errors and --help
            code = exc.code if isinstance(exc.code, int) else 2
        finally:
            os.chdir(cwd)
    assert code in (0, 1, 2), (code, err.getvalue())
    assert "Traceback" not in err.getvalue() + out.getvalue()


@pytest.mark.parametrize("site", ["#", "+", "a/b", "", "depot/#"])
def test_consume_with_a_wildcard_site_is_one_clear_error(site: str, tmp_path: Path) -> None:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(
            [
                "consume",
                "--broker",
                "mqtt://127.0.0.1:1",
                "--db",
                f"sqlite:///{tmp_path / 'c.db'}",
                "--site",
                site,
            ]
        )
    assert code == 2
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1 and "--site" in lines[0], err.getvalue()
