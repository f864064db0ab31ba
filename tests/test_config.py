"""Site config: loading, line-numbered problems, cross-field checks, secrets, JSON Schema."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from gateway.config import (
    GatewayConfig,
    Secret,
    check_config,
    config_json_schema,
    format_duration,
    load_config,
    parse_duration,
)
from gateway.errors import ConfigError
from gateway.model import AuthStatus, TokenType
from gateway.yamlpos import load_yaml

REPO = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO / "config"
EXAMPLE = CONFIG_DIR / "example-site.yaml"


def problems_of(tmp_path: Path, text: str, name: str = "site.yaml") -> list[str]:
    """Load ``text`` as a config file; the problems as ``LINE:COL: path: message``."""
    file = tmp_path / name
    file.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(file)
    assert all(p.file == str(file) for p in info.value.problems)
    return [str(p).removeprefix(f"{file}:") for p in info.value.problems]


# --- the example and every shipped config -------------------------------------------------


def test_example_site_loads() -> None:
    config = load_config(EXAMPLE)
    assert config.site.id == "example-depot"
    assert config.site.timezone == "Europe/Berlin"
    # relative paths resolve against the config file's directory
    assert config.storage.path == str(CONFIG_DIR / "var" / "example-buffer.db")
    assert config.uplink is not None
    assert (config.uplink.scheme, config.uplink.host, config.uplink.port) == (
        "mqtt",
        "127.0.0.1",
        1883,
    )
    drivers = {d.driver for d in config.devices}
    chargers_tcp = {
        d.driver for d in config.devices if d.host and d.driver not in ("eastron-sdm630",)
    }
    assert len(chargers_tcp) >= 3
    assert "heidelberg-ec" in drivers and "eastron-sdm630" in drivers
    ports = [d.port for d in config.devices if d.host]
    assert len(ports) == len(set(ports)), "every simulated TCP device needs its own port"
    rtu = config.device("cp4")
    assert rtu.bus == "rs485-1"
    bus = config.bus("rs485-1")
    assert (bus.baudrate, bus.bytesize, bus.parity, bus.stopbits) == (19200, 8, "E", 1)
    assert config.device("cp2").meter == "m-cp2"
    types = {t.type for t in config.auth.tokens}
    assert types == {TokenType.RFID, TokenType.KEYFOB, TokenType.APP}
    statuses = {t.status for t in config.auth.tokens}
    assert AuthStatus.BLOCKED in statuses and AuthStatus.EXPIRED in statuses
    assert any(t.expires_at is not None for t in config.auth.tokens)
    assert {"standard", "staff", "parking"} <= set(config.tariffs)
    assert config.billing.groups == {"staff": "staff"}
    assert config.billing.default_tariff == "standard"
    assert config.grid is not None and config.grid.meter == "m-site"
    assert config.device("cp1").poll_interval_s == 1.0
    assert config.auth.cache_ttl_s == 30 * 86400
    assert config.source == str(EXAMPLE)


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    code, text = check_config(path)
    assert code == 0, text
    assert f"{path}: OK" in text


def test_check_config_summary_and_failure(tmp_path: Path) -> None:
    code, text = check_config(EXAMPLE)
    assert code == 0
    assert "site example-depot" in text
    assert "uplink mqtt://127.0.0.1:1883 as evgw-example-depot" in text
    assert "cp4: heidelberg-ec at bus rs485-1 unit 1" in text
    bad = tmp_path / "bad.yaml"
    bad.write_text("site: {id: x}\nstorage: {path: b.db}\nfoo: 1\nbar: 2\n")
    code, text = check_config(bad)
    assert code == 2
    assert text.splitlines() == [
        f"{bad}:3:1: foo: unknown key 'foo'",
        f"{bad}:4:1: bar: unknown key 'bar'",
    ]


# --- broken configs: exact messages with line and column ----------------------------------

HEAD = "site: {id: t1}\nstorage: {path: ./b.db}\n"  # two lines: case lines start at 3
BUS = "buses:\n  - {id: rs485-1, type: rtu, port: /dev/ttyUSB0}\n"

SERIAL_WAYS = (
    "a serial (RTU) device is reached in one of three ways: bus: of an rtu bus (an RS-485 port "
    "on this machine), bus: of an rtu-over-tcp bus (a transparent serial server), or "
    "host:/port:/unit: of a Modbus TCP gateway (protocol converter such as Waveshare, USR, "
    "Elfin, Moxa MGate: Modbus TCP in, RTU out)"
)
THREE_WAYS = "a Modbus TCP device is reached by host: (port:, unit:); " + SERIAL_WAYS

BROKEN: list[tuple[str, str, list[str]]] = [
    (
        "unknown top-level key",
        "site: {id: t1}\nstorage: {path: ./b.db}\ndevcies: []\n",
        ["3:1: devcies: unknown key 'devcies' (did you mean 'devices'?)"],
    ),
    (
        "unknown nested key",
        "site: {id: t1}\nstorage:\n  path: ./b.db\n  max_size: 10\n",
        ["4:3: storage.max_size: unknown key 'max_size' (did you mean 'max_size_mb'?)"],
    ),
    (
        "unknown key in a flow mapping is located at the key",
        "site: {id: t1}\nstorage: {path: ./b.db}\nuplink: {url: mqtt://127.0.0.1, clientid: x}\n",
        ["3:33: uplink.clientid: unknown key 'clientid' (did you mean 'client_id'?)"],
    ),
    (
        "wrong type",
        "site: {id: t1}\nstorage: {path: ./b.db, max_size_mb: lots}\n",
        ["2:38: storage.max_size_mb: expected an integer, got 'lots'"],
    ),
    (
        "out of range",
        "site: {id: t1}\nstorage: {path: ./b.db, readings_retention_days: 0}\n",
        ["2:50: storage.readings_retention_days: must be between 1 and 3650, got 0"],
    ),
    (
        "bad duration",
        "site: {id: t1}\nstorage: {path: ./b.db}\nauth: {request_timeout: 5 parsecs}\n",
        [
            "3:25: auth.request_timeout: invalid duration '5 parsecs': use a number of seconds "
            "or a number with a unit (ms, s, m, h, d), e.g. 500ms or 2m"
        ],
    ),
    (
        "poll interval below 100ms",
        "site: {id: t1}\nstorage: {path: ./b.db}\ndevices:\n"
        "  - {id: cp1, driver: abb-terra-ac, host: 127.0.0.1, poll_interval: 50ms}\n",
        ["4:69: devices[0].poll_interval: must be between 100ms and 1h, got 50ms"],
    ),
    (
        "bad site id and time zone",
        "site: {id: depot 7, timezone: Europe/Berln}\nstorage: {path: ./b.db}\n",
        [
            "1:12: site.id: must be 1 to 64 characters of A-Z a-z 0-9 _ -, got 'depot 7'",
            "1:31: site.timezone: unknown time zone 'Europe/Berln' (did you mean 'Europe/Berlin'?)",
        ],
    ),
    (
        "bad url scheme and wildcard topic prefix",
        "site: {id: t1}\nstorage: {path: ./b.db}\nuplink:\n"
        "  url: http://broker.example.net:8883\n  topic_prefix: evgw/#\n",
        [
            "4:8: uplink.url: unsupported scheme 'http': use mqtt:// or mqtts://",
            "5:17: uplink.topic_prefix: must not contain the MQTT wildcards + or #, got 'evgw/#'",
        ],
    ),
    (
        "credentials in the url are refused without echoing them",
        "site: {id: t1}\nstorage: {path: ./b.db}\nuplink: {url: 'mqtt://u:hunter2@host'}\n",
        ["3:15: uplink.url: credentials do not belong in the url: use username and password_file"],
    ),
    (
        "missing password file",
        "site: {id: t1}\nstorage: {path: ./b.db}\nuplink:\n  url: mqtts://broker.example.net\n"
        "  username: depot\n  password_file: secrets/mqtt.secret\n",
        [
            "6:18: uplink.password_file: cannot read password file {dir}/secrets/mqtt.secret: "
            "No such file or directory"
        ],
    ),
    (
        "literal password",
        "site: {id: t1}\nstorage: {path: ./b.db}\nuplink:\n  url: mqtts://broker.example.net\n"
        "  username: depot\n  password: hunter2-literal\n",
        [
            "6:13: uplink.password: must be an environment variable reference like "
            '"${MQTT_PASSWORD}" '
            "(a literal password belongs in password_file)"
        ],
    ),
    (
        "missing environment variable",
        "site: {id: t1}\nstorage: {path: ./b.db}\nuplink:\n  url: mqtts://broker.example.net\n"
        '  username: depot\n  password: "${EVGW_TEST_UNSET_PASSWORD}"\n',
        ["6:13: uplink.password: environment variable EVGW_TEST_UNSET_PASSWORD is not set"],
    ),
    (
        "device naming an unknown bus, meter, tariff and driver",
        HEAD + BUS + "devices:\n"
        "  - {id: cp1, driver: abb-terra-ac, bus: rs485-2, unit: 1, meter: m9, tariff: gold}\n"
        "  - {id: cp2, driver: abb-terra-acc, host: 127.0.0.1}\n"
        "tariffs:\n"
        '  standard: {currency: EUR, elements: [{components: [{type: energy, price: "0.30"}]}]}\n',
        [
            "6:42: devices[0].bus: unknown bus 'rs485-2' (did you mean 'rs485-1'?)",
            "6:67: devices[0].meter: unknown meter device 'm9' (no meters are defined)",
            "6:79: devices[0].tariff: unknown tariff 'gold' (defined tariffs: standard)",
            "7:23: devices[1].driver: unknown driver 'abb-terra-acc' "
            "(did you mean 'abb-terra-ac'?)",
        ],
    ),
    (
        "duplicate ids",
        "site: {id: t1}\nstorage: {path: ./b.db}\nbuses:\n"
        "  - {id: rs485-1, type: rtu, port: /dev/ttyUSB0}\n"
        "  - {id: rs485-1, type: rtu, port: /dev/ttyUSB1}\n"
        "devices:\n"
        "  - {id: m1, driver: eastron-sdm630, bus: rs485-1, unit: 1}\n"
        "  - {id: m1, driver: eastron-sdm630, bus: rs485-1, unit: 2}\n"
        "auth:\n  tokens:\n"
        '    - {id: "04A2B3C4", type: rfid, user: alice}\n'
        '    - {id: "04a2b3c4", type: rfid, user: bob}\n'
        '    - {id: "04:A2:B3:C4", type: rfid, user: carol}\n',
        [
            "5:10: buses[1].id: duplicate bus id 'rs485-1' (first defined at line 4)",
            "8:10: devices[1].id: duplicate device id 'm1' (first defined at line 7)",
            "12:12: auth.tokens[1].id: duplicate token id '04a2b3c4' (first defined at line 11; "
            "token ids are compared in one normal form (case, hex separators, NUL and spaces "
            "ignored))",
            "13:12: auth.tokens[2].id: duplicate token id '04:A2:B3:C4' (first defined at line "
            "11; token ids are compared in one normal form (case, hex separators, NUL and "
            "spaces ignored))",
        ],
    ),
    (
        "same unit twice on one bus and on one TCP endpoint",
        HEAD + BUS + "devices:\n"
        "  - {id: m1, driver: eastron-sdm630, bus: rs485-1, unit: 2}\n"
        "  - {id: m2, driver: eastron-sdm630, bus: rs485-1, unit: 2}\n"
        "  - {id: cp1, driver: abb-terra-ac, host: 10.0.0.5, port: 502, unit: 1}\n"
        "  - {id: cp2, driver: abb-terra-ac, host: 10.0.0.5, unit: 1}\n",
        [
            "7:58: devices[1].unit: unit 2 on bus 'rs485-1' is already used by device 'm1'",
            "9:59: devices[3].unit: unit 1 at 10.0.0.5:502 is already used by device 'cp1'",
        ],
    ),
    (
        "charger profile as meter, meter with meter and tariff",
        HEAD + BUS + "devices:\n"
        "  - {id: cp1, driver: abb-terra-ac, host: 127.0.0.1, meter: cp2}\n"
        "  - {id: cp2, driver: abb-terra-ac, host: 127.0.0.2}\n"
        "  - {id: m1, driver: eastron-sdm630, bus: rs485-1, unit: 2, meter: m1, tariff: standard}\n"
        "grid: {meter: cp1}\n",
        [
            "6:61: devices[0].meter: 'cp2' is a charger (abb-terra-ac), not a meter",
            "8:61: devices[2].meter: only chargers take meter; 'm1' is a meter (eastron-sdm630)",
            "8:72: devices[2].tariff: only chargers take tariff; 'm1' is a meter (eastron-sdm630)",
            "9:15: grid.meter: 'cp1' is a charger (abb-terra-ac), not a meter",
        ],
    ),
    (
        "host and bus both set, neither set, port and broadcast unit on a bus",
        HEAD + BUS + "devices:\n"
        "  - {id: cp1, driver: abb-terra-ac, host: 127.0.0.1, bus: rs485-1}\n"
        "  - {id: m1, driver: eastron-sdm630}\n"
        "  - {id: m2, driver: eastron-sdm630, bus: rs485-1, port: 502, unit: 0}\n",
        [
            "6:54: devices[0].bus: set either host (Modbus TCP) or bus (serial line), not both",
            "7:5: devices[1]: needs host or bus: " + THREE_WAYS,
            "8:52: devices[2].port: port is for Modbus TCP devices (with host); "
            "a device on a bus is reached through the bus",
            "8:69: devices[2].unit: unit 0 is the broadcast address of a serial bus: "
            "no device answers it",
        ],
    ),
    (
        "YAML syntax error",
        "site: {id: t1}\nstorage:\n  path: ./b.db\n   max_size_mb: 10\n",
        ["4:15: <root>: YAML syntax error: mapping values are not allowed here"],
    ),
    (
        "empty file",
        "# nothing here\n",
        ["1:1: <root>: the file is empty: expected a mapping with at least site and storage"],
    ),
    (
        "missing required keys",
        "site: {timezone: UTC}\nuplink: {}\n",
        [
            "1:1: storage: missing required key 'storage'",
            "1:7: site.id: missing required key 'id'",
            "2:9: uplink.url: missing required key 'url'",
        ],
    ),
    (
        "tariff problems located at the value inside the tariff",
        HEAD + "tariffs:\n  std:\n    currency: EUR\n    elements:\n"
        '      - components: [{type: energy, price: "0.30"}]\n'
        "      - components:\n          - {type: time, price: lots}\n"
        "  vat:\n    {currency: EUR, vat_percent: 120, "
        "elements: [{components: [{type: flat, price: 1}]}]}\n",
        [
            "9:33: tariffs.std.elements[1].components[0].price: not a decimal number: 'lots'",
            "11:34: tariffs.vat.vat_percent: must be within 0..100, got 120",
        ],
    ),
    (
        "tariff bounds: prices, decimals, step sizes",
        HEAD + "tariffs:\n  big:\n    currency: EUR\n    elements:\n"
        "      - components: [{type: energy, price: 1e30}]\n"
        "      - components: [{type: flat, price: '0.1234567'}]\n"
        "      - components: [{type: time, price: '1', step_size: 86401}]\n"
        "  cap: {currency: EUR, max_price: 2000000000, elements: [{components: "
        "[{type: flat, price: 1}]}]}\n",
        [
            "7:44: tariffs.big.elements[0].components[0].price: must be at most 1000000000, "
            "got '1e30'",
            # every problem of a tariff at once, not only its first
            "8:42: tariffs.big.elements[1].components[0].price: at most 6 decimal places, "
            "got '0.1234567'",
            "9:58: tariffs.big.elements[2].components[0].step_size: must be at most 86400, "
            "got 86401",
            "10:35: tariffs.cap.max_price: must be at most 1000000000, got 2000000000",
        ],
    ),
    (
        "tariff problems, billing and token references, token types",
        "site: {id: t1}\nstorage: {path: ./b.db}\ntariffs:\n  standard:\n    currency: EUR\n"
        "    elements:\n"
        '      - components: [{type: energy, price: "0.30", stepsize: 10}]\n'
        "billing:\n  default_tariff: standrd\n  groups: {staff: free}\n"
        "auth:\n  tokens:\n"
        '    - {id: "A1", type: rfid, user: alice, group: staf, expires_at: 2026-01-01}\n'
        "    - {id: 1234, type: card, user: bob}\n",
        [
            "7:52: tariffs.standard.elements[0].components[0].stepsize: unknown key "
            "'stepsize' (did you mean 'step_size'?)",
            "9:19: billing.default_tariff: unknown tariff 'standrd' (did you mean 'standard'?)",
            "10:19: billing.groups.staff: unknown tariff 'free' (defined tariffs: standard)",
            "13:50: auth.tokens[0].group: group 'staf' has no tariff in billing.groups "
            "(did you mean 'staff'?)",
            "13:68: auth.tokens[0].expires_at: expected an RFC 3339 timestamp "
            "with a time zone like "
            '"2026-12-31T23:59:59Z", got a date',
            "14:12: auth.tokens[1].id: expected a string, got a number: quote the value",
            "14:24: auth.tokens[1].type: must be one of rfid, keyfob, app; got 'card'",
        ],
    ),
    (
        "enums, bus shapes, tls over plain mqtt, missing files and directories",
        "site: {id: t1}\nstorage: {path: ./b.db}\nbuses:\n"
        "  - {id: rs485-1, type: rtu, port: /dev/ttyUSB0, baudrate: 9601, parity: X, stopbits: 3}\n"
        "  - {id: gw, type: rtu-over-tcp, port: /dev/ttyUSB1}\n"
        "uplink:\n  url: mqtt://broker:1883\n  readings_qos: 2\n"
        '  tls: {ca_file: missing-ca.pem, insecure: "yes"}\n'
        "log_level: verbose\ndrivers_path: ./no-such-dir\n",
        [
            "4:60: buses[0].baudrate: must be one of 1200, 2400, 4800, 9600, 19200, 38400, 57600, "
            "115200; got 9601",
            "4:74: buses[0].parity: must be one of N, E, O; got 'X'",
            "4:87: buses[0].stopbits: must be one of 1, 2; got 3",
            "5:5: buses[1].host: an rtu-over-tcp bus needs host (the serial server)",
            "5:34: buses[1].port: port is the serial device of an rtu bus; "
            "an rtu-over-tcp bus uses host and tcp_port",
            "8:17: uplink.readings_qos: must be one of 0, 1; got 2",
            "9:3: uplink.tls: tls is set but the url is mqtt://: use mqtts:// for TLS",
            "9:18: uplink.tls.ca_file: cannot read {dir}/missing-ca.pem: No such file or directory",
            "9:44: uplink.tls.insecure: expected true or false, got 'yes'",
            "10:12: log_level: must be one of debug, info, warning, error; got 'verbose'",
            "11:15: drivers_path: directory not found: {dir}/no-such-dir",
        ],
    ),
    (
        "unit 255 only over TCP, driver without the transport",
        HEAD + BUS + "devices:\n"
        "  - {id: m1, driver: eastron-sdm630, bus: rs485-1, unit: 255}\n"
        "  - {id: cp1, driver: abb-terra-ac, host: 127.0.0.1, unit: 250}\n"
        "  - {id: cp2, driver: alfen-eve, bus: rs485-1, unit: 3}\n",
        [
            "6:58: devices[0].unit: must be between 1 and 247 on a serial bus, got 255",
            "7:60: devices[1].unit: must be between 0 and 247, or 255, got 250",
            "8:39: devices[2].bus: driver alfen-eve does not support rtu (it supports tcp): "
            "it is a Modbus TCP device: give it host: (port:, unit:), not bus:",
        ],
    ),
    (
        "serial devices behind a Modbus TCP gateway: RTU unit ids, two devices on one unit",
        HEAD + "devices:\n"
        "  - {id: m1, driver: eastron-sdm630, host: 10.0.0.9, unit: 0}\n"
        "  - {id: m2, driver: eastron-sdm120, host: 10.0.0.9, unit: 255}\n"
        "  - {id: m3, driver: eastron-sdm630, host: 10.0.0.9, port: 502, unit: 4}\n"
        "  - {id: m4, driver: eastron-sdm120, host: 10.0.0.9, unit: 4}\n",
        [
            "4:60: devices[0].unit: must be between 1 and 247 for a serial device behind a "
            "Modbus TCP gateway (its RS-485 address), got 0",
            "5:60: devices[1].unit: must be between 1 and 247 for a serial device behind a "
            "Modbus TCP gateway (its RS-485 address), got 255",
            "7:60: devices[3].unit: unit 4 at 10.0.0.9:502 is already used by device 'm3'",
        ],
    ),
    (
        "endpoints: duplicate, unused, bad values",
        HEAD + "devices:\n"
        "  - {id: m1, driver: eastron-sdm630, host: 10.0.0.9, unit: 2}\n"
        "endpoints:\n"
        "  - {host: 10.0.0.9, inter_request_delay: 20ms}\n"
        "  - {host: 10.0.0.9, port: 502, baudrate: 9601, timeout: 0s}\n"
        "  - {host: 10.0.0.19, inter_request_delay: soon}\n"
        "  - {port: 503}\n",
        [
            "7:12: endpoints[1].host: duplicate endpoint 10.0.0.9:502 (first defined at line 6)",
            "7:43: endpoints[1].baudrate: must be one of 1200, 2400, 4800, 9600, 19200, 38400, "
            "57600, 115200; got 9601",
            "7:58: endpoints[1].timeout: must be between 10ms and 1m, got 0s",
            "8:5: endpoints[2]: no device uses 10.0.0.19:502: set host: 10.0.0.19 (and port: "
            "502) on the devices behind it (did you mean '10.0.0.9'?)",
            "8:44: endpoints[2].inter_request_delay: invalid duration 'soon': use a number of "
            "seconds or a number with a unit (ms, s, m, h, d), e.g. 500ms or 2m",
            "9:5: endpoints[3].host: missing required key 'host'",
        ],
    ),
]


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in BROKEN], ids=[c[0] for c in BROKEN])
def test_broken_config_messages(tmp_path: Path, text: str, expected: list[str]) -> None:
    wanted = [e.replace("{dir}", str(tmp_path)) for e in expected]
    assert problems_of(tmp_path, text) == wanted


def test_many_problems_reported_at_once_and_sorted(tmp_path: Path) -> None:
    text = (
        "log_level: loud\n"
        "site: {id: 'bad id!'}\n"
        "storage: {path: b.db, max_size_mb: -1}\n"
        "devices:\n"
        "  - {id: cp1, driver: abb-terra-ac, host: 127.0.0.1, poll_interval: soon}\n"
        "extra: true\n"
    )
    got = problems_of(tmp_path, text)
    assert [p.split(": ", 1)[0] for p in got] == ["1:12", "2:12", "3:36", "5:69", "6:1"]
    file = tmp_path / "site.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(file)
    # one line per problem, in file order: what `evgw check-config` prints
    assert str(info.value).splitlines() == [f"{file}:{p}" for p in got]
    assert info.value.exit_code == 2


def test_missing_file_is_a_problem(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert [str(p) for p in info.value.problems] == [
        f"{missing}:1:1: <root>: cannot read file: No such file or directory"
    ]


# --- secrets --------------------------------------------------------------------------------

SECRET_VALUE = "s3cr3t-Pa55word-xyzzy"


def _uplink_config(tmp_path: Path, password_line: str, extra: str = "") -> Path:
    file = tmp_path / "site.yaml"
    file.write_text(
        "site: {id: t1}\nstorage: {path: ./b.db}\nuplink:\n  url: mqtts://broker.example.net\n"
        f"  username: depot\n  {password_line}\n{extra}",
        encoding="utf-8",
    )
    return file


def test_password_file_resolved_relative_and_never_shown(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "mqtt.secret").write_text(SECRET_VALUE + "\n")
    config = load_config(_uplink_config(tmp_path, "password_file: secrets/mqtt.secret"))
    assert config.uplink is not None
    assert isinstance(config.uplink.password, Secret)
    assert config.uplink.password.reveal() == SECRET_VALUE
    assert SECRET_VALUE not in repr(config)
    assert SECRET_VALUE not in check_config(config.source)[1]
    # with another problem in the file, the error text still never carries the secret
    file = _uplink_config(tmp_path, "password_file: secrets/mqtt.secret", "log_level: loud\n")
    with pytest.raises(ConfigError) as info:
        load_config(file)
    assert SECRET_VALUE not in str(info.value)


def test_password_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVGW_TEST_MQTT_PASSWORD", SECRET_VALUE)
    config = load_config(_uplink_config(tmp_path, 'password: "${EVGW_TEST_MQTT_PASSWORD}"'))
    assert config.uplink is not None and config.uplink.password is not None
    assert config.uplink.password.reveal() == SECRET_VALUE
    assert SECRET_VALUE not in repr(config) and SECRET_VALUE not in repr(config.uplink)
    monkeypatch.setenv("EVGW_TEST_MQTT_PASSWORD", "")
    assert problems_of(tmp_path, (tmp_path / "site.yaml").read_text()) == [
        "6:13: uplink.password: environment variable EVGW_TEST_MQTT_PASSWORD is empty"
    ]


def test_secret_problems_never_echo_the_secret(tmp_path: Path) -> None:
    (tmp_path / "empty.secret").write_text("\n")
    assert problems_of(
        tmp_path, _uplink_config(tmp_path, "password_file: empty.secret").read_text()
    ) == [f"6:18: uplink.password_file: password file {tmp_path}/empty.secret is empty"]
    for line in (f"password: {SECRET_VALUE}", "password: 123456789", "password: [a, b]"):
        got = problems_of(tmp_path, _uplink_config(tmp_path, line).read_text())
        assert len(got) == 1 and got[0].startswith("6:13: uplink.password: ")
        assert SECRET_VALUE not in got[0] and "123456789" not in got[0]
    both = "password_file: x\n  password: '${X}'"
    assert problems_of(tmp_path, _uplink_config(tmp_path, both).read_text()) == [
        "7:3: uplink.password: set either password_file or password, not both"
    ]


# --- durations ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("500ms", 0.5),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1d", 86400.0),
        ("1h30m", 5400.0),
        ("1.5s", 1.5),
        (" 2s ", 2.0),
        ("3", 3.0),
        ("0.25", 0.25),
        (2, 2.0),
        (0.1, 0.1),
        (0, 0.0),
    ],
)
def test_parse_duration(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text", ["", "s", "1 parsec", "-1s", "1sec", "1s2", "ms", True, None, [], -3, float("nan")]
)
def test_parse_duration_rejects(text: object) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.1, "100ms"),
        (1, "1s"),
        (1.5, "1.5s"),
        (120, "2m"),
        (3600, "1h"),
        (90, "90s"),
        (86400 * 30, "30d"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == pytest.approx(seconds)


# --- the models' JSON Schema ----------------------------------------------------


def test_schema_file_is_up_to_date() -> None:
    on_disk = json.loads((CONFIG_DIR / "schema.json").read_text())
    assert on_disk == config_json_schema(), (
        "config/schema.json is stale: regenerate it with "
        "`python -m gateway.config > config/schema.json`"
    )


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate_against_json_schema(path: Path) -> None:
    schema = config_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    doc = load_yaml(path)
    jsonschema.Draft202012Validator(schema).validate(doc.data)


def test_json_schema_rejects_what_the_loader_rejects() -> None:
    validator = jsonschema.Draft202012Validator(config_json_schema())
    good = {"site": {"id": "s1"}, "storage": {"path": "b.db"}}
    assert validator.is_valid(good)
    for bad in (
        {**good, "extra": 1},
        {"site": {"id": "bad id"}, "storage": {"path": "b.db"}},
        {**good, "devices": [{"id": "cp1", "driver": "x", "poll_interval": "soon"}]},
        {**good, "devices": [{"id": "cp1", "driver": "x", "unit": 300}]},
        {**good, "uplink": {"url": "mqtt://h", "readings_qos": 2}},
        {"storage": {"path": "b.db"}},
    ):
        assert not validator.is_valid(bad), bad


def test_minimal_config_gets_defaults(tmp_path: Path) -> None:
    file = tmp_path / "site.yaml"
    file.write_text("site: {id: s1}\nstorage: {path: /var/lib/evgw/b.db}\n")
    config = load_config(file)
    assert isinstance(config, GatewayConfig)
    assert config.site.timezone == "UTC"
    assert config.storage.path == "/var/lib/evgw/b.db"
    assert (config.storage.max_size_mb, config.storage.readings_retention_days) == (512, 30)
    assert config.uplink is None and config.grid is None
    assert config.auth.offline_policy == "allow_known" and config.auth.tokens == ()
    assert config.billing.groups == {} and config.tariffs == {}
    assert config.log_level == "info" and config.drivers_path is None


def test_uplink_defaults_and_profile_defaults(tmp_path: Path) -> None:
    file = tmp_path / "site.yaml"
    file.write_text(
        "site: {id: s1}\nstorage: {path: b.db}\nuplink: {url: 'mqtts://broker.example.net'}\n"
        "devices:\n  - {id: cp1, driver: abb-terra-ac, host: 127.0.0.1}\n"
    )
    config = load_config(file)
    assert config.uplink is not None
    assert config.uplink.client_id == "evgw-s1"
    assert config.uplink.port == 8883 and config.uplink.password is None
    assert (config.uplink.keepalive_s, config.uplink.inflight_window) == (30.0, 50)
    dev = config.device("cp1")
    assert (dev.port, dev.unit, dev.poll_interval_s) == (502, 1, 1.0)


def test_empty_optional_sections_mean_none(tmp_path: Path) -> None:
    file = tmp_path / "site.yaml"
    file.write_text(
        "site: {id: s1}\nstorage: {path: b.db}\nuplink:\nbuses:\ndevices:\nauth:\ntariffs:\n"
    )
    config = load_config(file)
    assert config.uplink is None
    assert config.devices == () and config.buses == () and config.tariffs == {}
    assert config.auth.tokens == ()
    # ...but a required section cannot be empty
    assert problems_of(tmp_path, "site:\nstorage: {path: b.db}\n") == [
        "1:6: site: expected a mapping, got an empty value"
    ]


def test_profile_problems_are_reported_with_the_config_problems(tmp_path: Path) -> None:
    drivers = tmp_path / "drivers"
    drivers.mkdir()
    broken = drivers / "my-meter.yaml"
    broken.write_text("slug: my-meter\nkind: meterx\n")
    file = tmp_path / "site.yaml"
    file.write_text(
        "site: {id: s1}\nstorage: {path: b.db}\ndrivers_path: drivers\nlog_level: loud\n"
        "devices:\n  - {id: m1, driver: my-meter, bus: rs485-1}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(file)
    in_profile = [p for p in info.value.problems if p.file == str(broken)]
    assert any(p.line == 2 and p.path == "kind" for p in in_profile), in_profile
    in_config = [
        str(p).removeprefix(f"{file}:") for p in info.value.problems if p.file == str(file)
    ]
    assert in_config == [
        "4:12: log_level: must be one of debug, info, warning, error; got 'loud'",
        "6:37: devices[0].bus: unknown bus 'rs485-1' (no buses are defined)",
    ]


def test_site_profiles_from_drivers_path_are_known(tmp_path: Path) -> None:
    """A site's own profile (here a copy of a shipped meter under a new slug) can be used."""
    shipped = REPO / "drivers" / "eastron-sdm630.yaml"
    drivers = tmp_path / "site-drivers"
    drivers.mkdir()
    text = shipped.read_text().replace("slug: eastron-sdm630", "slug: my-sdm630")
    (drivers / "my-sdm630.yaml").write_text(text)
    file = tmp_path / "site.yaml"
    file.write_text(
        "site: {id: s1}\nstorage: {path: b.db}\ndrivers_path: site-drivers\n"
        "buses:\n  - {id: rs485-1, type: rtu, port: /dev/ttyUSB0}\n"
        "devices:\n  - {id: m1, driver: my-sdm630, bus: rs485-1, unit: 7}\n"
        "  - {id: cp1, driver: abb-terra-ac, host: 127.0.0.1, meter: m1}\n"
    )
    config = load_config(file)
    assert config.drivers_path == str(drivers)
    assert config.device("cp1").meter == "m1"


def test_defaulted_enums_have_the_enum_type(tmp_path: Path) -> None:
    # A token without `status:` must carry AuthStatus.ACCEPTED, not the bare string: the
    # authorizer calls `.value` on it (found by the demo: every authorization failed).
    path = tmp_path / "site.yaml"
    path.write_text(
        "site: {id: s1}\nstorage: {path: ./b.db}\n"
        "auth: {tokens: [{id: 'AA11', type: rfid, user: u1}]}\n",
        encoding="utf-8",
    )
    token = load_config(path).auth.tokens[0]
    assert token.status is AuthStatus.ACCEPTED
    assert token.type is TokenType.RFID


def test_check_config_refuses_a_price_of_1e30(tmp_path: Path) -> None:
    # It passed before and left every session unpriced (the cost overflowed).
    path = tmp_path / "site.yaml"
    path.write_text(
        HEAD + "devices:\n  - {id: cp1, driver: keba-p30, host: 10.0.0.5, tariff: std}\n"
        "tariffs:\n  std: {currency: EUR, elements: [{components: "
        '[{type: energy, price: "1e30"}]}]}\n'
    )
    code, text = check_config(path)
    assert code == 2
    assert text.splitlines() == [
        f"{path}:6:71: tariffs.std.elements[0].components[0].price: "
        "must be at most 1000000000, got '1e30'"
    ]


# --- uplink.command_key ------------------------------------------------------------------------


def _key_files(directory: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private = Ed25519PrivateKey.generate()
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    pem = serialization.Encoding.PEM
    (directory / "cloud.pub.pem").write_bytes(private.public_key().public_bytes(pem, pub))
    (directory / "cloud.pem").write_bytes(
        private.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    ec_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    (directory / "ec.pub.pem").write_bytes(ec_key.public_bytes(pem, pub))
    (directory / "text.pem").write_text("hello\n")


def test_command_key_loads_and_check_config_says_so(tmp_path: Path) -> None:
    _key_files(tmp_path)
    file = tmp_path / "site.yaml"
    file.write_text(
        "site: {id: t1}\nstorage: {path: ./b.db}\nuplink:\n  url: mqtt://broker\n"
        "  command_key: cloud.pub.pem\n  command_max_age: 2m\n",
        encoding="utf-8",
    )
    config = load_config(file)
    assert config.uplink is not None
    assert config.uplink.command_key == str(tmp_path / "cloud.pub.pem")
    assert config.uplink.command_max_age_s == 120.0
    code, text = check_config(file)
    assert code == 0
    assert f"commands: signed by {tmp_path}/cloud.pub.pem, at most 2m old" in text
    assert "warning" not in text


def test_without_command_key_check_config_warns(tmp_path: Path) -> None:
    file = tmp_path / "site.yaml"
    file.write_text(
        "site: {id: t1}\nstorage: {path: ./b.db}\nuplink: {url: mqtt://broker}\n",
        encoding="utf-8",
    )
    config = load_config(file)
    assert config.uplink is not None and config.uplink.command_key is None
    assert config.uplink.command_max_age_s == 300.0
    code, text = check_config(file)
    assert code == 0
    assert "warning: uplink.command_key is not set: commands and auth responses are not " in text


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("command_key: cloud.pem", "{dir}/cloud.pem holds a private key: give the gateway only"),
        ("command_key: ec.pub.pem", "{dir}/ec.pub.pem is a "),
        ("command_key: text.pem", "{dir}/text.pem is not a PEM public key"),
        ("command_key: missing.pem", "cannot read {dir}/missing.pem: No such file or directory"),
        ("command_max_age: 5m", "command_max_age needs command_key"),
        ("command_key: cloud.pub.pem\n  command_max_age: 2h", "must be between 5s and 1h"),
    ],
)
def test_bad_command_key_lines(tmp_path: Path, line: str, message: str) -> None:
    _key_files(tmp_path)
    problems = problems_of(
        tmp_path,
        f"site: {{id: t1}}\nstorage: {{path: ./b.db}}\nuplink:\n  url: mqtt://broker\n  {line}\n",
    )
    assert len(problems) == 1, problems
    assert problems[0].startswith("5:") or problems[0].startswith("6:")
    assert "uplink.command_" in problems[0]
    assert message.format(dir=tmp_path) in problems[0]


# --- serial devices behind Modbus TCP gateways -----------------------------------------------


def _site_drivers(tmp_path: Path, slug: str, transports: str) -> None:
    shipped = REPO / "drivers" / "eastron-sdm630.yaml"
    drivers = tmp_path / "site-drivers"
    drivers.mkdir(exist_ok=True)
    text = shipped.read_text().replace("slug: eastron-sdm630", f"slug: {slug}")
    text = text.replace("transports: [rtu, rtu-over-tcp]", f"transports: {transports}")
    assert f"transports: {transports}" in text
    (drivers / f"{slug}.yaml").write_text(text)


def test_every_serial_profile_passes_behind_a_modbus_tcp_gateway(tmp_path: Path) -> None:
    """host/port/unit works for any serial profile; devices behind one gateway share it and get
    a timeout sized for the serial line (2400 baud SDM120: 1.7 s; an endpoint's settings win)."""
    from gateway.profiles import load_profiles

    serial = sorted(s for s, p in load_profiles().items() if "rtu" in p.connection.transports)
    assert len(serial) >= 4
    lines = [
        f"  - {{id: d{i}, driver: {slug}, host: 10.0.0.9, unit: {i + 1}}}"
        for i, slug in enumerate(serial)
    ]
    file = tmp_path / "site.yaml"
    file.write_text(
        HEAD
        + "devices:\n"
        + "\n".join(lines)
        + "\n  - {id: sdm120, driver: eastron-sdm120, host: 10.0.0.10, port: 4196, unit: 3}\n"
        "  - {id: fast, driver: eastron-sdm120, host: 10.0.0.11, unit: 3, timeout: 300ms}\n"
        "  - {id: cp1, driver: abb-terra-ac, host: 10.0.0.12, meter: sdm120}\n"
        "  - {id: cp2, driver: keba-p30, host: 10.0.0.9}\n"
        "endpoints:\n  - {host: 10.0.0.9, inter_request_delay: 20ms, timeout: 2s}\n"
    )
    code, text = check_config(file)
    assert code == 0, text
    config = load_config(file)
    for i, slug in enumerate(serial):
        dev = config.device(f"d{i}")
        assert (dev.driver, dev.host, dev.port, dev.unit, dev.timeout_s) == (
            slug,
            "10.0.0.9",
            502,
            i + 1,
            2.0,
        )
    assert config.device("sdm120").timeout_s == 1.7  # 2400 baud, the profile's default
    assert config.device("fast").timeout_s == 0.3  # the device's own timeout wins
    assert config.device("cp1").timeout_s == 1.0  # a Modbus TCP charger keeps the usual one
    assert config.device("cp2").timeout_s == 2.0  # everything at the endpoint gets its timeout
    ep = config.endpoint("10.0.0.9", 502)
    assert ep is not None and (ep.inter_request_delay_s, ep.timeout_s, ep.baudrate) == (
        0.02,
        2.0,
        None,
    )
    assert config.endpoint("10.0.0.10", 4196) is None
    assert "endpoint 10.0.0.9:502 shared by d0," in text and "20ms between requests" in text


def test_endpoint_baudrate_sizes_the_timeout(tmp_path: Path) -> None:
    from gateway.config import serial_answer_timeout_s

    assert [serial_answer_timeout_s(b) for b in (1200, 2400, 9600, 19200, 115200)] == [
        2.9,
        1.7,
        1.0,
        1.0,
        1.0,
    ]
    file = tmp_path / "site.yaml"
    file.write_text(
        HEAD + "devices:\n  - {id: m1, driver: eastron-sdm630, host: 10.0.0.9, unit: 2}\n"
        "endpoints:\n  - {host: 10.0.0.9, baudrate: 1200}\n"
    )
    assert load_config(file).device("m1").timeout_s == 2.9


def test_a_transport_that_does_not_fit_explains_the_three_ways(tmp_path: Path) -> None:
    _site_drivers(tmp_path, "tcp-server-only", "[rtu-over-tcp]")
    _site_drivers(tmp_path, "plain-rtu", "[rtu]")
    text = (
        HEAD + "drivers_path: site-drivers\n"
        "buses:\n  - {id: line, type: rtu, port: /dev/ttyUSB0}\n"
        "  - {id: srv, type: rtu-over-tcp, host: 10.0.0.20}\n"
        "devices:\n"
        "  - {id: m1, driver: tcp-server-only, bus: line, unit: 2}\n"
        "  - {id: m2, driver: plain-rtu, bus: srv, unit: 3}\n"  # rtu works through a server
        "  - {id: m3, driver: plain-rtu, host: 10.0.0.9, unit: 3}\n"  # and through a gateway
    )
    assert problems_of(tmp_path, text) == [
        "8:44: devices[0].bus: driver tcp-server-only does not support rtu (it supports "
        "rtu-over-tcp): " + SERIAL_WAYS,
    ]


# --- buses[].timeout ---------------------------------------------------------------------------


def test_bus_timeout_is_the_answer_timeout_of_its_devices(tmp_path: Path) -> None:
    """A device on a bus without a timeout of its own gets the bus's; its own wins. On the wire
    (a real RTU-over-TCP server answering slower and faster): test_modbus_rtu.py,
    test_buses_timeout_is_the_answer_timeout_of_its_devices."""
    file = tmp_path / "site.yaml"
    file.write_text(
        "site: {id: s1}\nstorage: {path: b.db}\n"
        "buses:\n  - {id: line, type: rtu-over-tcp, host: 127.0.0.1, timeout: 300ms}\n"
        "  - {id: plain, type: rtu-over-tcp, host: 127.0.0.2}\n"
        "devices:\n  - {id: m1, driver: eastron-sdm630, bus: line, unit: 2}\n"
        "  - {id: m2, driver: eastron-sdm630, bus: line, unit: 3, timeout: 2s}\n"
        "  - {id: m3, driver: eastron-sdm630, bus: plain, unit: 2}\n"
    )
    config = load_config(file)
    assert config.device("m1").timeout_s == 0.3  # the bus's
    assert config.device("m2").timeout_s == 2.0  # its own wins
    assert config.device("m3").timeout_s == 1.0  # neither: the usual default
