"""The web page's users file: one ``name:hash`` per line, the hash a PHC string of scrypt.

``alice:$scrypt$ln=15,r=8,p=1$<salt>$<hash>`` (salt and hash in unpadded standard base64).
scrypt is in the standard library (``hashlib.scrypt``, OpenSSL's implementation), so checking a
password needs no extra package; the parameters travel with each hash, so they can be raised later
without invalidating the file. Lines starting with ``#`` and blank lines are ignored.

Only the standard library is imported here: ``gateway.config`` validates the file with it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from gateway.errors import UsageError

__all__ = [
    "SCRYPT_LN",
    "UsersFileError",
    "add_user",
    "hash_password",
    "load_users",
    "verify_password",
]

# 2**15 x 8 x 128 bytes = 32 MiB per check, ~0.2 s on a 2-core x86 VM (more on a Pi): a guessing
# attacker pays that per try; the server caches a good check so a page load pays it once.
SCRYPT_LN = 15
SCRYPT_R = 8
SCRYPT_P = 1
_SALT_BYTES = 16
_KEY_BYTES = 32
_NAME_RE = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
_PHC_RE = re.compile(
    r"\$scrypt\$ln=(?P<ln>[0-9]{1,2}),r=(?P<r>[0-9]{1,2}),p=(?P<p>[0-9]{1,2})"
    r"\$(?P<salt>[A-Za-z0-9+/]+)\$(?P<hash>[A-Za-z0-9+/]+)"
)


class UsersFileError(UsageError):
    """The users file cannot be read or has a malformed line (``file:line: message``)."""


@dataclass(frozen=True, slots=True)
class _Hash:
    ln: int
    r: int
    p: int
    salt: bytes
    key: bytes


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _scrypt(password: str, salt: bytes, ln: int, r: int, p: int, size: int) -> bytes:
    maxmem = 2 * 128 * r * (2**ln) + 1024 * 1024 * p
    return hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=2**ln, r=r, p=p, maxmem=maxmem, dklen=size
    )


def hash_password(password: str, *, ln: int = SCRYPT_LN) -> str:
    """A new PHC string for ``password`` with a random salt."""
    salt = os.urandom(_SALT_BYTES)
    key = _scrypt(password, salt, ln, SCRYPT_R, SCRYPT_P, _KEY_BYTES)
    return f"$scrypt$ln={ln},r={SCRYPT_R},p={SCRYPT_P}${_b64(salt)}${_b64(key)}"


def _parse_hash(text: str) -> _Hash | None:
    m = _PHC_RE.fullmatch(text)
    if m is None:
        return None
    ln, r, p = int(m["ln"]), int(m["r"]), int(m["p"])
    if not (10 <= ln <= 20 and 1 <= r <= 32 and 1 <= p <= 16):
        return None
    try:
        salt, key = _unb64(m["salt"]), _unb64(m["hash"])
    except (binascii.Error, ValueError):
        return None
    if len(salt) < 8 or len(key) < 16:
        return None
    return _Hash(ln, r, p, salt, key)


def verify_password(password: str, phc: str) -> bool:
    """True when ``password`` matches the PHC string (constant-time comparison)."""
    h = _parse_hash(phc)
    if h is None:
        return False
    key = _scrypt(password, h.salt, h.ln, h.r, h.p, len(h.key))
    return hmac.compare_digest(key, h.key)


def load_users(path: str | Path) -> dict[str, str]:
    """``{name: phc}`` from a users file; raises UsersFileError naming the first bad line."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsersFileError(f"cannot read users file {file}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UsersFileError(f"users file {file} is not UTF-8 text") from None
    users: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, phc = line.partition(":")
        where = f"{file}:{number}"
        if not sep or not _NAME_RE.fullmatch(name):
            raise UsersFileError(
                f"{where}: expected NAME:HASH with a name of 1-64 characters of "
                "A-Z a-z 0-9 _ . @ - (create lines with evgw web-user add)"
            )
        if _parse_hash(phc) is None:
            raise UsersFileError(
                f"{where}: user '{name}': not an scrypt hash ($scrypt$ln=..,r=..,p=..$salt$hash)"
            )
        if name in users:
            raise UsersFileError(f"{where}: user '{name}' appears twice")
        users[name] = phc
    return users


def add_user(path: str | Path, name: str, password: str) -> bool:
    """Add ``name`` (or replace its password) in the users file, creating it with mode 0600.
    Returns True when the user was new. Other lines (and comments) are kept as they are."""
    if not _NAME_RE.fullmatch(name):
        raise UsersFileError(f"bad user name {name!r}: 1-64 characters of A-Z a-z 0-9 _ . @ -")
    if not password:
        raise UsersFileError("the password must not be empty")
    file = Path(path)
    lines: list[str] = []
    if file.exists():
        load_users(file)  # refuse to rewrite a file we cannot parse
        lines = file.read_text(encoding="utf-8").splitlines()
    entry = f"{name}:{hash_password(password)}"
    new = True
    for i, line in enumerate(lines):
        if line.strip().partition(":")[0] == name:
            lines[i], new = entry, False
    if new:
        lines.append(entry)
    tmp = file.with_name(file.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write("\n".join(lines) + "\n")
        out.flush()
        os.fsync(out.fileno())
        if file.exists():
            # Keep the mode and group an installer gave the file (e.g. 640 root:evgw).
            st = file.stat()
            os.fchmod(out.fileno(), stat.S_IMODE(st.st_mode))
            with contextlib.suppress(PermissionError):
                os.fchown(out.fileno(), st.st_uid, st.st_gid)
    os.replace(tmp, file)
    return new
