"""Secrets never reach output: every command runs with secrets set and all its output is searched
for them. Passwords are refused on the command line; URLs lose their password in errors; weak
transports get a loud warning."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.redact import redact_url
from tests.support.mqtt_broker import free_port

REPO = Path(__file__).resolve().parent.parent
MQTT_SECRET = "Mq77-s3cr3t-f0r-tests"
DB_SECRET = "Pg-s3cr3t-0f-the-db"
SECRETS = (MQTT_SECRET, DB_SECRET)


def _env(**extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "EVGW_TEST_MQTT_PASSWORD": MQTT_SECRET,
        "EVGW_BROKER_PASSWORD": MQTT_SECRET,
        "PGPASSWORD": DB_SECRET,
        **extra,
    }


def _run(*argv: str, timeout: float = 60, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=env or _env(),
    )
    return proc.stdout + proc.stderr


def _run_then_term(argv: list[str], marker: str, tmp_path: Path) -> str:
    """Run until ``marker`` shows in the output (then one more second), then SIGTERM."""
    log = tmp_path / f"out-{time.monotonic_ns()}.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", *argv],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO,
            env=_env(),
        )
        deadline = time.monotonic() + 60
        while marker not in log.read_text() and time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            time.sleep(0.1)
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    return log.read_text()


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A site whose uplink uses a password over plain mqtt:// to a broker that is not there."""
    config = tmp_path / "site.yaml"
    config.write_text(
        "site: {id: depot-7, timezone: Europe/Berlin}\n"
        f"storage: {{path: {tmp_path / 'b.db'}}}\n"
        "uplink:\n"
        f"  url: mqtt://127.0.0.1:{free_port()}\n"
        "  username: depot-7\n"
        '  password: "${EVGW_TEST_MQTT_PASSWORD}"\n'
    )
    return config


def _assert_clean(output: str) -> None:
    for secret in SECRETS:
        assert secret not in output, output[-3000:]


@pytest.mark.e2e
def test_every_command_keeps_secrets_out_of_its_output(site: Path, tmp_path: Path) -> None:
    port = free_port()
    db = tmp_path / "cloud.db"
    outputs = {
        "check-config": _run("check-config", "-c", str(site)),
        "run": _run_then_term(["--debug", "run", "-c", str(site)], "mqtt_disconnected", tmp_path),
        "sessions": _run("sessions", "-c", str(site)),
        "report": _run(
            "report", "-c", str(site), "--by", "user", "--from", "2026-01-01", "--to", "2026-02-01"
        ),
        "verify": _run("verify", "-c", str(site)),
        "consume": _run(
            "--debug",
            "consume",
            "--broker",
            f"mqtt://user@127.0.0.1:{port}",
            "--db",
            f"sqlite:///{db}",
            "--duration",
            "1s",  # connection refused, the debug log of a retry and its back-off
        ),
        "consume-pg": _run(
            "consume",
            "--broker",
            f"mqtt://user@127.0.0.1:{port}",
            "--db",
            f"postgresql://evgw@127.0.0.1:{free_port()}/cloud",
            "--duration",
            "2s",
        ),
        "statement": _run(
            "statement", "--db", f"sqlite:///{db}", "--user", "alice", "--month", "2026-01"
        ),
        "verify-db": _run("verify", "--db", f"sqlite:///{db}"),
    }
    for name, out in outputs.items():
        assert out, name
        _assert_clean(out)
    # The run really used the password, and said loudly that it goes over plain mqtt://.
    assert "uplink_password_in_clear" in outputs["run"]
    assert "mqtt_password_in_clear" in outputs["consume"]


@pytest.mark.e2e
@pytest.mark.parametrize(
    "argv",
    [
        ["consume", "--broker", f"mqtt://u:{MQTT_SECRET}@127.0.0.1:1", "--db", "sqlite:///x.db"],
        ["consume", "--broker", "mqtt://127.0.0.1:1", "--db", f"postgresql://u:{DB_SECRET}@h/db"],
        [
            "statement",
            "--db",
            f"postgresql://u:{DB_SECRET}@h/db",
            "--user",
            "a",
            "--month",
            "2026-01",
        ],
        ["verify", "--db", f"postgresql://u:{DB_SECRET}@h/db"],
    ],
)
def test_password_on_the_command_line_is_refused_without_echo(argv: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", *argv],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not belong on the command line" in lines[0]
    assert ":***@" in lines[0]
    _assert_clean(proc.stdout + proc.stderr)


@pytest.mark.e2e
def test_password_file_for_the_consumer(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    out = _run(
        "consume",
        "--broker",
        "mqtt://u@127.0.0.1:1",
        "--db",
        f"sqlite:///{tmp_path / 'c.db'}",
        "--password-file",
        str(empty),
    )
    assert "--password-file" in out and "empty" in out


@pytest.mark.e2e
def test_unreachable_postgres_error_is_redacted() -> None:
    port = free_port()
    out = _run(
        "statement",
        "--db",
        f"postgresql://evgw@127.0.0.1:{port}/cloud?password={DB_SECRET}",
        "--user",
        "a",
        "--month",
        "2026-01",
    )
    _assert_clean(out)
    assert "password=***" in out


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u:secret@127.0.0.1:1/db", "postgresql://u:***@127.0.0.1:1/db"),
        ("postgresql://u:se@c/r@h/db", "postgresql://u:***@h/db"),
        ("mqtt://u:p%40ss@h:1883", "mqtt://u:***@h:1883"),
        ("mqtt://h:1883", "mqtt://h:1883"),
        ("mqtt://user@h", "mqtt://user@h"),
        (
            "postgresql://h/db?password=xx&sslmode=require",
            "postgresql://h/db?password=***&sslmode=require",
        ),
        ("host=h password=abc dbname=x", "host=h password=*** dbname=x"),
        (
            "cannot connect to postgresql://u:pw@h/db: refused (a@b)",
            "cannot connect to postgresql://u:***@h/db: refused (a@b)",
        ),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@pytest.mark.e2e
def test_tls_insecure_is_a_loud_warning(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not used before the connection\n")
    config = tmp_path / "site.yaml"
    config.write_text(
        "site: {id: depot-7, timezone: Europe/Berlin}\n"
        f"storage: {{path: {tmp_path / 'b.db'}}}\n"
        f"uplink: {{url: 'mqtts://127.0.0.1:{free_port()}', tls: {{insecure: true}}}}\n"
    )
    out = _run_then_term(["run", "-c", str(config)], "uplink_tls_insecure", tmp_path)
    assert "uplink_tls_insecure" in out
    assert '"level": "warning"' in out.split("uplink_tls_insecure")[1].split("\n")[0]
