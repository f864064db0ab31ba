"""``web:`` in the site config, the users file and ``evgw web-user``: line-numbered errors, no
listening beyond localhost without authentication, passwords never on the command line."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.config import check_config, is_loopback, load_config, split_listen
from gateway.web.users import (
    UsersFileError,
    add_user,
    hash_password,
    load_users,
    verify_password,
)

HEAD = "site: {id: t1}\nstorage: {path: ./b.db}\n"  # web: starts on line 3


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(HEAD + text)
    return path


def test_web_is_off_unless_configured_and_defaults_to_localhost(tmp_path: Path) -> None:
    assert load_config(_write(tmp_path, "")).web is None
    web = load_config(_write(tmp_path, "web: {}\n")).web
    assert web is not None and (web.host, web.port, web.users_file) == ("127.0.0.1", 8080, None)
    web = load_config(_write(tmp_path, 'web: {listen: "[::1]:9000"}\n')).web
    assert web is not None and (web.host, web.port, web.local_only) == ("::1", 9000, True)


@pytest.mark.parametrize(
    ("listen", "message"),
    [
        ("0.0.0.0:8080", "listening on 0.0.0.0 (beyond localhost) needs authentication"),
        ("192.168.1.20:80", "listening on 192.168.1.20 (beyond localhost) needs authentication"),
        (":8080", "listening on every address (beyond localhost) needs authentication"),
        ("gateway.local:8080", "listening on gateway.local (beyond localhost) needs"),
    ],
)
def test_check_config_refuses_listening_beyond_localhost_without_users(
    tmp_path: Path, listen: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, f'web: {{listen: "{listen}"}}\n')
    assert main(["check-config", "-c", str(path)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"{path}:3:15: web.listen: {message}"), line
    assert "web.users_file" in line


@pytest.mark.parametrize(
    ("listen", "message"),
    [
        ("8080", "expected HOST:PORT (IPv6 as [ADDR]:PORT), got '8080'"),
        ("127.0.0.1:70000", "port must be 1 to 65535, got 70000"),
        ("http://127.0.0.1:80", "expected HOST:PORT"),
    ],
)
def test_bad_listen_addresses(tmp_path: Path, listen: str, message: str) -> None:
    code, text = check_config(_write(tmp_path, f'web: {{listen: "{listen}"}}\n'))
    assert code == 2
    assert f":3:15: web.listen: {message}" in text


def test_users_file_problems_are_reported_at_their_key(tmp_path: Path) -> None:
    users = tmp_path / "users"
    cfg = f'web: {{listen: "0.0.0.0:8080", users_file: {users}}}\n'
    code, text = check_config(_write(tmp_path, cfg))
    assert code == 2 and "web.users_file: cannot read" in text
    users.write_text("# nobody yet\n")
    code, text = check_config(_write(tmp_path, cfg))
    assert code == 2 and f"web.users_file: no users in {users}: add one with evgw web-user" in text
    users.write_text("alice:plaintext\n")
    code, text = check_config(_write(tmp_path, cfg))
    assert code == 2 and f"web.users_file: {users}:1: user 'alice': not an scrypt hash" in text
    users.write_text("")
    add_user(users, "alice", "s3cret")
    code, text = check_config(_write(tmp_path, cfg))
    assert code == 0, text


def test_loopback_addresses() -> None:
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.3.4.5", "::1", "localhost"))
    assert not any(is_loopback(h) for h in ("", "0.0.0.0", "::", "10.0.0.1", "example.org"))
    assert split_listen("[fe80::1]:443") == ("fe80::1", 443)


def test_password_hashes_verify_and_are_salted() -> None:
    one, two = hash_password("pw", ln=10), hash_password("pw", ln=10)
    assert one != two and one.startswith("$scrypt$ln=10,r=8,p=1$")
    assert verify_password("pw", one) and verify_password("pw", two)
    assert not verify_password("pW", one)
    assert not verify_password("pw", "$scrypt$ln=10,r=8,p=1$AAAA$AAAA")  # malformed: False
    assert not verify_password("pw", "plain")


def test_add_user_creates_private_file_and_replaces_passwords(tmp_path: Path) -> None:
    users = tmp_path / "users"
    assert add_user(users, "alice", "first") is True
    assert users.stat().st_mode & 0o777 == 0o600
    users.chmod(0o640)  # an installer let the service's group read it
    assert add_user(users, "bob", "other") is True
    assert users.stat().st_mode & 0o777 == 0o640
    assert add_user(users, "alice", "second") is False
    table = load_users(users)
    assert sorted(table) == ["alice", "bob"]
    assert verify_password("second", table["alice"]) and not verify_password(
        "first", table["alice"]
    )
    with pytest.raises(UsersFileError, match="bad user name"):
        add_user(users, "al ice", "x")
    users.write_text("alice:" + table["alice"] + "\nalice:" + table["alice"] + "\n")
    with pytest.raises(UsersFileError, match=r":2: user 'alice' appears twice"):
        load_users(users)


def test_web_user_cli_reads_the_password_from_stdin_not_argv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    users = tmp_path / "users"
    monkeypatch.setattr(sys, "stdin", io.StringIO("horse battery\n"))
    assert main(["web-user", "add", str(users), "carol"]) == 0
    assert f"added carol in {users}" in capsys.readouterr().out
    assert verify_password("horse battery", load_users(users)["carol"])
    assert "horse" not in users.read_text()
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n"))
    assert main(["web-user", "add", str(users), "dave"]) == 2
    assert "the password must not be empty" in capsys.readouterr().err
    assert "dave" not in load_users(users)
    # No way to pass a password as an argument.
    with pytest.raises(SystemExit):
        main(["web-user", "add", str(users), "erin", "password123"])
    assert os.path.exists(users)
