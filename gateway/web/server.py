"""The gateway's web server (aiohttp): the status page, ``/api/*``, server-sent events and
``/metrics``. ``async with WebServer(gw, config) as web: await web.run()``.

One producer task builds the status document when the site changed (at most every
``PUSH_MIN_INTERVAL_S``) and only while somebody listens; every ``/api/events`` stream sends the
newest document it has not sent yet, so a slow client skips states instead of queueing them.
With ``web.users_file`` every request needs HTTP basic auth; scrypt checks run one at a time in
a thread and a good check is remembered (keyed by an HMAC of the credentials under a per-process
key) so a page load does not pay it per request.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import os
import time as _time
from collections.abc import Awaitable, Callable
from datetime import date, datetime, timedelta
from datetime import time as dtime
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import structlog
from aiohttp import web

from gateway.config import WebConfig
from gateway.errors import GatewayError
from gateway.records import SessionRecord
from gateway.web.metrics import CONTENT_TYPE, GatewayMetrics
from gateway.web.status import build_status, session_summary
from gateway.web.users import UsersFileError, load_users, verify_password

if TYPE_CHECKING:
    from gateway.web.view import SiteView

__all__ = ["PUSH_MIN_INTERVAL_S", "SessionsQueryError", "WebServer", "parse_sessions_query"]

log = structlog.get_logger(__name__)

PUSH_MIN_INTERVAL_S = 0.2
KEEPALIVE_S = 15.0
AUTH_CACHE_S = 600.0
_STATIC = ("index.html", "app.js", "style.css", "openapi.json")
_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".json": "application/json",
}
_SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
}


class SessionsQueryError(ValueError):
    """A bad query string of /api/sessions (answered with 400 and this message)."""


def _bound(text: str, name: str, zone: ZoneInfo, *, end: bool) -> float:
    try:
        day = date.fromisoformat(text) if len(text) == 10 else None
    except ValueError:
        raise SessionsQueryError(f"{name}: not a date (YYYY-MM-DD): {text!r}") from None
    if day is not None:
        if end:
            day += timedelta(days=1)  # a date as `to` includes that whole day
        return datetime.combine(day, dtime(0), tzinfo=zone).timestamp()
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise SessionsQueryError(
            f"{name}: expected YYYY-MM-DD or an RFC 3339 time like 2026-12-01T08:00:00Z, "
            f"got {text!r}"
        ) from None
    if moment.tzinfo is None:
        raise SessionsQueryError(f"{name}: a time needs its UTC offset (Z or +01:00): {text!r}")
    return moment.timestamp()


def parse_sessions_query(
    query: dict[str, str] | Any, timezone: str
) -> tuple[float | None, float | None, str | None, str | None]:
    """``from``/``to`` (dates in the site's zone, ``to`` inclusive; or RFC 3339 times, ``to``
    exclusive), ``charger``, ``user`` -> (since, until, charger, user)."""
    allowed = {"from", "to", "charger", "user"}
    for key in query:
        if key not in allowed:
            raise SessionsQueryError(f"unknown parameter {key!r}: use {', '.join(sorted(allowed))}")
    getall = getattr(query, "getall", None)
    for key in sorted(allowed):
        if getall is not None and len(getall(key, [])) > 1:
            raise SessionsQueryError(f"{key}: given more than once")
    zone = ZoneInfo(timezone)
    since = _bound(query["from"], "from", zone, end=False) if query.get("from") else None
    until = _bound(query["to"], "to", zone, end=True) if query.get("to") else None
    if since is not None and until is not None and until <= since:
        raise SessionsQueryError("to: must be after from")
    return since, until, query.get("charger") or None, query.get("user") or None


class _Hub:
    """The newest status document and a version number streams wait on."""

    def __init__(self) -> None:
        self.version = 0
        self.data: bytes | None = None
        self.listeners = 0
        self.closed = False
        self._cond = asyncio.Condition()

    async def publish(self, data: bytes) -> None:
        async with self._cond:
            self.version += 1
            self.data = data
            self._cond.notify_all()

    async def close(self) -> None:
        async with self._cond:
            self.closed = True
            self._cond.notify_all()

    async def next(self, seen: int) -> tuple[int, bytes | None]:
        """Wait for a document newer than version ``seen``; (version, None) when closing."""
        async with self._cond:
            await self._cond.wait_for(lambda: self.closed or self.version > seen)
            return self.version, None if self.closed else self.data


class _Auth:
    """HTTP basic auth against the users file (re-read when it changes on disk)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self._users: dict[str, str] = {}
        self._mtime: float | None = None
        self._key = os.urandom(32)
        self._good: dict[bytes, float] = {}
        self._lock = asyncio.Lock()
        self.reload()

    def reload(self) -> None:
        try:
            mtime = self.path.stat().st_mtime_ns
        except OSError as exc:
            log.error("web_users_file_unreadable", path=str(self.path), error=exc.strerror)
            self._users = {}
            return
        if mtime == self._mtime:
            return
        try:
            self._users = load_users(self.path)
        except UsersFileError as exc:
            log.error("web_users_file_invalid", error=str(exc))
            self._users = {}
        self._mtime = mtime
        self._good.clear()

    async def check(self, header: str | None) -> str | None:
        """The user name when ``header`` carries valid credentials, else None."""
        if not header or not header.startswith("Basic "):
            return None
        try:
            decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        name, sep, password = decoded.partition(":")
        if not sep:
            return None
        self.reload()
        phc = self._users.get(name)
        if phc is None:
            return None
        tag = hmac.new(self._key, f"{name}\0{password}\0{phc}".encode(), hashlib.sha256).digest()
        now = _time.monotonic()
        if self._good.get(tag, 0.0) > now:
            return name
        async with self._lock:  # one scrypt (32 MiB) at a time
            ok = await asyncio.to_thread(verify_password, password, phc)
        if not ok:
            log.warning("web_login_failed", user=name)
            return None
        if len(self._good) > 1000:
            self._good.clear()
        self._good[tag] = now + AUTH_CACHE_S
        return name


def _static_bytes(name: str) -> bytes:
    return resources.files("gateway.web").joinpath("static", name).read_bytes()


class WebServer:
    """Serves one gateway's page, API and metrics on ``config.listen``."""

    def __init__(
        self,
        gw: SiteView,
        config: WebConfig,
        *,
        links: dict[str, str] | None = None,
    ) -> None:
        self.gw = gw
        self.config = config
        # Other pages the status page links to (name -> URL path), e.g. the statistics page.
        self.links: dict[str, str] = dict(links or {"statistics": "/stats"})
        self.metrics = GatewayMetrics(gw)
        self._auth = _Auth(config.users_file) if config.users_file else None
        self._hub = _Hub()
        self._dirty = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._files = {name: _static_bytes(name) for name in _STATIC}

    # -- lifecycle ----------------------------------------------------------------------------
    @property
    def url(self) -> str:
        host = self.config.host or "0.0.0.0"
        shown = "127.0.0.1" if host in ("", "0.0.0.0") else host
        if ":" in shown:
            shown = f"[{shown}]"
        return f"http://{shown}:{self._port or self.config.port}/"

    async def __aenter__(self) -> WebServer:
        app = web.Application(middlewares=[self._headers, self._authenticate])
        app.router.add_get("/", self._index)
        app.router.add_get("/static/{name}", self._static)
        app.router.add_get("/api/status", self._status)
        app.router.add_get("/api/sessions", self._sessions)
        app.router.add_get("/api/events", self._events)
        app.router.add_get("/api/openapi.json", self._openapi)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/stats", self._stats)
        app.on_shutdown.append(self._on_shutdown)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host or None, self.config.port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise GatewayError(
                f"web: cannot listen on {self.config.listen}: {exc.strerror}"
            ) from exc
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        if sockets:
            self._port = sockets[0].getsockname()[1]
        self.gw.live.listeners.append(self._on_change)
        self.gw.poller.on_poll = self.metrics.observe_poll
        log.info(
            "web_listening",
            url=self.url,
            auth="basic" if self._auth else "none (localhost only)",
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        with contextlib.suppress(ValueError):
            self.gw.live.listeners.remove(self._on_change)
        await self._hub.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _on_shutdown(self, app: web.Application) -> None:
        await self._hub.close()  # ends every event stream

    def _on_change(self, kind: str, payload: Any) -> None:
        # Called inside the gateway's sample and session paths: it must never raise there.
        try:
            self.metrics.on_session_event(kind, payload)
        except Exception as exc:
            log.error("web_metrics_event_failed", kind=kind, error=str(exc))
        self._dirty.set()

    async def run(self) -> None:
        """Build the status document whenever the site changed and somebody listens."""
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            if self._hub.listeners:
                await self._push()
            await asyncio.sleep(PUSH_MIN_INTERVAL_S)

    async def _push(self) -> None:
        try:
            status = await build_status(self.gw, self.links)
        except Exception as exc:  # a display problem must never stop the gateway
            log.exception("web_status_failed", error=str(exc))
            return
        body = json.dumps(status, separators=(",", ":"), ensure_ascii=False)
        await self._hub.publish(f"event: status\ndata: {body}\n\n".encode())

    # -- middlewares --------------------------------------------------------------------------
    @web.middleware
    async def _headers(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            response = exc
        for key, value in _SECURITY_HEADERS.items():
            response.headers.setdefault(key, value)
        if isinstance(response, web.HTTPException):
            raise response
        return response

    @web.middleware
    async def _authenticate(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if self._auth is not None:
            user = await self._auth.check(request.headers.get("Authorization"))
            if user is None:
                raise web.HTTPUnauthorized(
                    text="authentication required\n",
                    headers={"WWW-Authenticate": 'Basic realm="evgw", charset="UTF-8"'},
                )
        return await handler(request)

    # -- handlers -----------------------------------------------------------------------------
    async def _index(self, request: web.Request) -> web.Response:
        return self._file("index.html")

    async def _static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self._files or name == "index.html":
            raise web.HTTPNotFound(text="not found\n")
        return self._file(name)

    async def _openapi(self, request: web.Request) -> web.Response:
        return self._file("openapi.json")

    def _file(self, name: str) -> web.Response:
        ctype = _TYPES[Path(name).suffix]
        return web.Response(
            body=self._files[name],
            content_type=ctype,
            charset="utf-8",
            headers={"Cache-Control": "no-cache"},
        )

    async def _status(self, request: web.Request) -> web.Response:
        status = await build_status(self.gw, self.links)
        return _json(status)

    async def _sessions(self, request: web.Request) -> web.Response:
        try:
            since, until, charger, user = parse_sessions_query(
                request.query, self.gw.config.site.timezone
            )
        except SessionsQueryError as exc:
            return _json({"error": str(exc)}, status=400)
        rows = await self.gw.store.finished_session_rows(
            since=since, until=until, user=user, charger=charger
        )
        return _json(
            {
                "schema": "evgw.sessions/1",
                "from": None if since is None else _rfc(since),
                "to": None if until is None else _rfc(until),
                "count": len(rows),
                "sessions": [
                    {
                        "summary": session_summary(
                            SessionRecord.from_dict(r["record"]), r["synced_at"]
                        ),
                        "record": r["record"],
                    }
                    for r in rows
                ],
            }
        )

    async def _stats(self, request: web.Request) -> web.Response:
        """``evgw stats`` of the running gateway: ``?from=&to=`` (local dates, default the last
        7 days) and ``format=html|svg|json|csv``."""
        from gateway.stats import FORMATS, collect_stats, render_stats

        zone = ZoneInfo(self.gw.config.site.timezone)
        today = datetime.fromtimestamp(self.gw.clock.time(), zone).date()
        fmt = request.query.get("format", "html")
        try:
            end = date.fromisoformat(request.query.get("to", today.isoformat()))
            start = date.fromisoformat(
                request.query.get("from", (end - timedelta(days=6)).isoformat())
            )
            if fmt not in FORMATS:
                raise ValueError(f"format must be one of {', '.join(FORMATS)}")
            if end < start or (end - start).days > 366:
                raise ValueError("from..to must be 1 to 367 days, from before to")
        except ValueError as exc:
            return _json({"error": str(exc)}, status=400)
        doc = await collect_stats(self.gw.store, self.gw.config, start, end)
        # Drawing the charts takes a while on a Pi: not in the gateway's event loop.
        text = await asyncio.to_thread(render_stats, doc, fmt)
        types = {
            "html": "text/html",
            "svg": "image/svg+xml",
            "json": "application/json",
            "csv": "text/csv",
        }
        response = web.Response(text=text, content_type=types[fmt], charset="utf-8")
        # The page is one file with inline styles (its own and each chart's) and no script.
        response.headers["Content-Security-Policy"] = (
            "default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'none'"
        )
        return response

    async def _metrics(self, request: web.Request) -> web.Response:
        body = self.metrics.render()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def _events(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",
            }
        )
        await response.prepare(request)
        self._hub.listeners += 1
        self._dirty.set()  # a fresh document for the newcomer
        seen = 0
        try:
            await response.write(b"retry: 2000\n\n")
            if self._hub.data is not None:  # what the others have now, at once
                seen = self._hub.version
                await response.write(self._hub.data)
            while True:
                try:
                    async with asyncio.timeout(KEEPALIVE_S):
                        seen, data = await self._hub.next(seen)
                except TimeoutError:
                    await response.write(b": keepalive\n\n")
                    continue
                if data is None:
                    break
                await response.write(data)
        except (ConnectionResetError, ConnectionError):
            pass  # the browser went away
        finally:
            self._hub.listeners -= 1
        return response


def _rfc(ts: float) -> str:
    from gateway.model import rfc3339

    return rfc3339(ts)


def _json(payload: Any, status: int = 200) -> web.Response:
    return web.Response(
        text=json.dumps(payload, ensure_ascii=False, separators=(",", ":")),
        status=status,
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )
