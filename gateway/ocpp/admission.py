"""Who may open an OCPP connection: the websocket handshake's checks.

A charge point connects to ``ws://HOST:PORT/{charge_point_id}`` offering subprotocol
``ocpp1.6``; it must be one of the site's charge points and, from security profile 1 on, send
HTTP basic auth with its id as user and its password from the site's password file.
"""

from __future__ import annotations

import base64
import hmac
from collections.abc import Collection
from http import HTTPStatus
from urllib.parse import unquote

import structlog
from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from gateway.config import OcppConfig

__all__ = ["SUBPROTOCOL", "charge_point_id", "check_request", "password_ok", "peer"]

log = structlog.get_logger(__name__)

SUBPROTOCOL = Subprotocol("ocpp1.6")


def charge_point_id(path: str) -> str:
    """The last path segment of ``/{charge_point_id}`` (a prefix path is allowed)."""
    return unquote(path.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1])


def peer(ws: ServerConnection) -> str | None:
    addr = ws.remote_address
    return f"{addr[0]}:{addr[1]}" if addr else None


def check_request(
    config: OcppConfig,
    charge_points: Collection[str],
    connection: ServerConnection,
    request: Request,
) -> Response | None:
    """None to go on with the handshake, else the refusal to send."""
    cp_id = charge_point_id(request.path)
    who = peer(connection)
    offered = request.headers.get("Sec-WebSocket-Protocol", "")
    if SUBPROTOCOL not in [p.strip() for p in offered.split(",")]:
        # OCPP-J 1.6 section 3.1.2: the version is named in Sec-WebSocket-Protocol.
        log.warning(
            "ocpp_no_subprotocol",
            charge_point_id=cp_id[:64],
            offered=offered[:64] or None,
            peer=who,
        )
        return connection.respond(HTTPStatus.BAD_REQUEST, "subprotocol ocpp1.6 needed\n")
    if cp_id not in charge_points:
        log.warning("ocpp_unknown_charge_point", charge_point_id=cp_id[:64], peer=who)
        return connection.respond(HTTPStatus.NOT_FOUND, "unknown charge point\n")
    if config.security_profile >= 1 and not password_ok(config, cp_id, request.headers):
        log.warning("ocpp_auth_failed", charge_point_id=cp_id, peer=who)
        response = connection.respond(HTTPStatus.UNAUTHORIZED, "unauthorized\n")
        response.headers["WWW-Authenticate"] = 'Basic realm="ocpp"'
        return response
    return None


def password_ok(config: OcppConfig, cp_id: str, headers: Headers) -> bool:
    """HTTP basic auth with the charge point id as user. The 1.6 security whitepaper's
    AuthorizationKey is 16-20 bytes, possibly not text: a password file entry
    ``hex:...`` gives those bytes; the hex text itself is accepted too (some chargers
    send the key as configured instead of decoded)."""
    expected = config.passwords.get(cp_id)
    header = headers.get("Authorization", "")
    if expected is None or not header.startswith("Basic "):
        return False
    try:
        credentials = base64.b64decode(header[6:].strip(), validate=True)
    except ValueError:
        return False
    user, _, password = credentials.partition(b":")
    secret = expected.reveal()
    accepted = [secret.encode()]
    if secret.startswith("hex:"):
        try:
            accepted = [bytes.fromhex(secret[4:]), secret[4:].encode()]
        except ValueError:
            return False
    good = False
    for candidate in accepted:  # compared with each, in constant time
        good |= hmac.compare_digest(password, candidate)
    return user == cp_id.encode() and good
