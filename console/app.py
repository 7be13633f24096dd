"""The operator console: a Starlette app over the console's reads, live by Server-Sent Events.

Read-only for everyone who can reach it; actions (acknowledge, dismiss, activate, roll back, replay,
purge, a camera's sensitivity and region of interest) need a logged-in operator (credentials file) and the session's CSRF token in `X-CSRF-Token`.
The session is a signed cookie (HttpOnly, SameSite=strict). Nothing secret is put in a page or a log.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import secrets
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

import redis
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from store.alarms.log import ENTRY_ID, AlarmLogError, LoggedAlarm, acknowledge_alarm, alarm_by_id, recent_alarms
from contracts.control import SENSITIVITY_FIELDS, SettingsError, changed_settings
from contracts.keys import Keys
from runtime.control import AUDIT_LIST_COUNT, SettingsConflictError, read_audit
from workers.banks.registry import RegistryError
from store.alarms.dismiss import DismissError, dismiss_alarm

from .auth import LoginLimiter, Operators, Sessions
from .data import ConsoleData

log = logging.getLogger("patchcore.console")
STATIC = Path(__file__).parent / "static"
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


class ConsoleError(RuntimeError):
    pass


@dataclass(frozen=True)
class ConsoleSettings:
    """A field's `metadata["help"]` is its option's help (`patchcore console --help`, patchcore/options.py)."""

    host: str = field(default="127.0.0.1", metadata={
        "help": "Address to bind; beyond localhost put it behind a TLS proxy."})
    port: int = field(default=8080, metadata={"help": "TCP port.", "min": 1, "max": 65535})
    credentials: dict[str, str] | None = field(default=None, repr=False)  # user -> scrypt hash; None: read-only
    session_key: bytes | None = field(default=None, repr=False)  # signs session cookies; None: random per process
    session_max_age_s: int = 8 * 3600
    allowed_hosts: tuple[str, ...] | None = field(default=None, metadata={
        "help": "A Host header the console answers (repeat for more; against DNS rebinding). Default: the loopback "
                "names and --host; bound to every address without it, any Host is answered (and logged so)."})
    max_body_bytes: int = field(default=64 * 1024, metadata={
        "help": "Request bodies larger than this are refused (413) before they are read.", "min": 1})
    login_failures_per_user: int = field(default=5, metadata={
        "help": "Failed logins of one user within --login-window-s before it is locked out.", "min": 1})
    login_failures_per_client: int = field(default=20, metadata={
        "help": "Failed logins from one client address within --login-window-s before it is locked out.", "min": 1})
    login_window_s: float = field(default=900.0, metadata={"help": "Window of the login limits, seconds.", "min": 1})
    lockout_s: float = field(default=900.0, metadata={"help": "How long a lockout lasts, seconds.", "min": 1})
    interval_s: float = 1.0  # live updates
    window_s: float = 300.0  # score sparkline span

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"


def _json(data, status: int = 200) -> JSONResponse:
    return JSONResponse(data, status_code=status, headers={"Cache-Control": "no-store"})


def _alarm(logged: LoggedAlarm) -> dict:
    alarm = logged.alarm
    return {"id": logged.id, "camera": alarm.camera, "line": alarm.line, "seq": alarm.seq, "score": alarm.score,
            "threshold": alarm.threshold, "bank": alarm.bank, "bank_version": alarm.bank_version,
            "raised_at": alarm.raised_at, "rule": alarm.rule, "overlay": alarm.overlay_jpeg is not None,
            "acknowledged": logged.acknowledged, "dismissed": logged.dismissed}


RESETS = {True: "all", "sensitivity": "sensitivity", "roi": "roi"}  # a settings body's `reset` -> what it drops


@dataclass(frozen=True)
class SettingsChange:
    """A settings body of the console's camera panel, checked for shape (the values by CameraSettings itself)."""
    sensitivity: dict  # any of SENSITIVITY_FIELDS -> number
    roi_polygon: tuple[tuple[float, float], ...] | None  # frame pixels
    reset: str | None  # "all" (remove the camera's settings), "sensitivity" or "roi" (the bank's applies again)


def _is_number(value) -> bool:
    """A JSON number that is a float's (an integer of 400 digits is not: float() of it overflows)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        float(value)
    except OverflowError:
        return False
    return True


def settings_change(body) -> SettingsChange:
    """`{"threshold_factor": 1.2, "roi_polygon": [[x, y], ...], "reset": "roi"}` and the like -> SettingsChange;
    anything else (unknown fields, wrong types, nothing to change, contradictions) is a SettingsError."""
    _check(isinstance(body, dict), "a JSON object expected")
    unknown = sorted(set(body) - {*SENSITIVITY_FIELDS, "roi_polygon", "reset"})
    _check(not unknown, f"unknown fields {unknown}: threshold, threshold_factor, threshold_offset, roi_polygon or "
                        "reset expected")
    sensitivity = {name: body[name] for name in SENSITIVITY_FIELDS if body.get(name) is not None}
    for name, value in sensitivity.items():
        _check(_is_number(value) and math.isfinite(value), f"bad {name} {str(value)[:40]}: a finite number expected")
    polygon = body.get("roi_polygon")
    if polygon is not None:
        _check(isinstance(polygon, list) and all(isinstance(p, list) and len(p) == 2 and all(map(_is_number, p))
                                                 for p in polygon), "bad roi_polygon: [[x, y], ...] pixels expected")
        polygon = tuple((float(x), float(y)) for x, y in polygon)
    reset = body.get("reset")
    _check(reset is None or (isinstance(reset, (bool, str)) and reset in RESETS),
           'bad reset: true (every setting), "sensitivity" or "roi" expected')
    reset = None if reset is None else RESETS[reset]
    _check(reset != "all" or not (sensitivity or polygon), "reset: true removes every setting: give nothing else")
    _check(reset != "sensitivity" or not sensitivity, 'reset "sensitivity" and a threshold contradict each other')
    _check(reset != "roi" or polygon is None, 'reset "roi" and a roi_polygon contradict each other')
    _check(bool(sensitivity or polygon or reset), "nothing to change: give threshold, threshold_factor, "
                                                  "threshold_offset, roi_polygon or reset")
    return SettingsChange(sensitivity, polygon, reset)


def _check(condition: bool, reason: str) -> None:
    if not condition:
        raise SettingsError(reason)


def inside_frame(polygon: tuple[tuple[float, float], ...], size: tuple[int, int] | None) -> None:
    """SettingsError unless every vertex lies on the frame of `size` (width, height) pixels (None: no frame)."""
    _check(size is not None, "no recent frame of this camera to place a polygon on (its preview expired or was never "
                             "written): use `patchcore camera set --roi-polygon`")
    width, height = size
    outside = [p for p in polygon if not (0 <= p[0] <= width and 0 <= p[1] <= height)]
    _check(not outside, f"roi_polygon point {outside[0] if outside else ''} outside the {width}x{height} frame")


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
ANY_ADDRESS = ("0.0.0.0", "::", "")


def allowed_hosts(settings: ConsoleSettings) -> list[str]:
    """The Host headers the console answers: the list given, else the loopback names and the bound address."""
    if settings.allowed_hosts is not None:
        return list(settings.allowed_hosts)
    if settings.host in ANY_ADDRESS:
        log.warning("console host allow-list", extra={"fields": {
            "allowed_hosts": "*", "why": f"bound to {settings.host or 'every address'} without --allowed-host: "
                                        "any Host header is answered (no DNS-rebinding protection)"}})
        return ["*"]
    return sorted({*LOOPBACK_HOSTS, settings.host, f"[{settings.host}]" if ":" in settings.host else settings.host})


class SecurityHeaders:
    """ASGI middleware: the security headers on every response (pages, APIs, static files, camera images); a
    header the response sets itself (an overlay's Cache-Control) is kept."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_headers(message):
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items()
                         if k.lower().encode() not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)
        await self.app(scope, receive, with_headers)


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` is refused with 413, by its Content-Length before it is
    read, or as it arrives when it has none."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers", [])).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_bytes:
            return await _json({"error": f"request body over {self.max_bytes} bytes"}, 413)(scope, receive, send)
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise BodyTooLarge()
            return message
        try:
            await self.app(scope, limited, send)
        except BodyTooLarge:
            await _json({"error": f"request body over {self.max_bytes} bytes"}, 413)(scope, receive, send)


class BodyTooLarge(Exception):
    pass


def create_app(client: redis.Redis, keys: Keys = Keys(), settings: ConsoleSettings = ConsoleSettings()) -> Starlette:
    data = ConsoleData(client, keys, window_s=settings.window_s, interval_s=settings.interval_s)
    operators = Operators(settings.credentials) if settings.credentials else None
    sessions = Sessions(settings.session_max_age_s)
    limiter = LoginLimiter(settings.login_failures_per_user, settings.login_failures_per_client,
                           settings.login_window_s, settings.lockout_s)

    def current_user(request: Request) -> str | None:
        """The operator of this session: only while the server still holds its session id (not after logout)."""
        return sessions.user(request.session.get("sid"))

    def csrf(request: Request) -> str:
        if "csrf" not in request.session:
            request.session["csrf"] = secrets.token_urlsafe(32)
        return request.session["csrf"]

    def action(name: str):
        """An operator action: 403 without the session's CSRF token, 401 without a logged-in operator."""
        def wrap(handler: Callable[[Request, str], Awaitable[Response]]):
            async def endpoint(request: Request) -> Response:
                token = request.headers.get("x-csrf-token", "")
                expected = request.session.get("csrf")
                if not expected or not hmac.compare_digest(token.encode(), expected.encode()):
                    return _json({"error": "missing or wrong CSRF token"}, 403)
                user = current_user(request)
                if not user:
                    return _json({"error": "log in as an operator first"}, 401)
                try:
                    response = await handler(request, user)
                except redis.exceptions.NoPermissionError:  # e.g. a console connected as the read-only `viewer` role
                    response = _json({"error": "the console's Redis user may not do this (connect it as `operator`)"},
                                     403)
                log.info("console action", extra={"fields": {"action": name, "user": user,
                                                             "path": request.url.path, "status": response.status_code}})
                return response
            return endpoint
        return wrap

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers=SECURITY_HEADERS)

    async def session(request: Request) -> Response:
        return _json({"user": current_user(request), "csrf": csrf(request), "login": operators is not None})

    async def login(request: Request) -> Response:
        token, expected = request.headers.get("x-csrf-token", ""), request.session.get("csrf")
        if not expected or not hmac.compare_digest(token.encode(), expected.encode()):
            return _json({"error": "missing or wrong CSRF token"}, 403)
        if operators is None:
            return _json({"error": "this console is read-only (started without operator credentials)"}, 403)
        try:
            body = await request.json()
            user, password = str(body["user"])[:200], str(body["password"])
        except (ValueError, KeyError, TypeError):
            return _json({"error": "user and password expected"}, 400)
        address = request.client.host if request.client else "unknown"
        wait = limiter.begin(user, address)
        if wait > 0:
            log.warning("console login locked out", extra={"fields": {
                "user": user if operators.known(user) else "(unknown)", "client": address, "retry_in_s": round(wait)}})
            return JSONResponse({"error": f"too many failed logins: try again in {wait:.0f} s"}, 429,
                                headers={"Retry-After": str(int(wait) + 1), "Cache-Control": "no-store"})
        if not await run_in_threadpool(operators.check, user, password):
            await asyncio.sleep(0.5)  # slows guessing; the scrypt check costs the rest
            # a password typed into the user field must not reach the log: only known names are logged
            log.warning("console login refused", extra={"fields": {"user": user if operators.known(user) else "(unknown)"}})
            return _json({"error": "wrong user or password"}, 401)
        limiter.succeeded(user, address)
        sessions.end(request.session.get("sid"))
        request.session.clear()  # a new session (and CSRF token) on login: no fixation
        request.session.update({"sid": sessions.open(user), "csrf": secrets.token_urlsafe(32)})
        log.info("console login", extra={"fields": {"user": user}})
        return _json({"user": user, "csrf": request.session["csrf"]})

    @action("logout")
    async def logout(request: Request, user: str) -> Response:
        sessions.end(request.session.get("sid"))  # a copy of the cookie is worth nothing from now on
        request.session.clear()
        return _json({"user": None, "csrf": csrf(request)})

    async def events(request: Request) -> Response:
        after = request.query_params.get("after", "")  # the newest alarm the page has: nothing in between is lost
        if not ENTRY_ID.match(after):
            newest = await run_in_threadpool(recent_alarms, client, keys, 1)
            after = newest[0].id if newest else "0-0-00"

        async def stream():
            nonlocal after
            seen: dict[str, None] = {after: None}  # ids sent (the lookback of recent_alarms returns them again)
            while True:
                snapshot = await run_in_threadpool(data.snapshot)
                yield f"event: cameras\ndata: {json.dumps(snapshot)}\n\n"
                alarms = [a for a in await run_in_threadpool(recent_alarms, client, keys, 50, after) if a.id not in seen]
                if alarms:
                    seen.update(dict.fromkeys(a.id for a in alarms))
                    for old in list(seen)[:-1000]:  # bounded: the lookback covers a few seconds of alarms
                        del seen[old]
                    after = max(seen, key=lambda alarm: tuple(map(int, alarm.split("-", 2)[:2])))
                    yield f"event: alarms\ndata: {json.dumps([_alarm(a) for a in alarms])}\n\n"
                await asyncio.sleep(settings.interval_s)
        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    async def cameras(request: Request) -> Response:
        return _json(await run_in_threadpool(data.snapshot))

    async def camera_image(request: Request) -> Response:
        jpeg = await run_in_threadpool(data.camera_image, request.path_params["camera"])
        if jpeg is None:
            return _json({"error": "no picture of this camera"}, 404)
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "no-store"})

    async def camera_frame(request: Request) -> Response:
        jpeg = await run_in_threadpool(data.camera_frame, request.path_params["camera"])
        if jpeg is None:
            return _json({"error": "no recent frame of this camera"}, 404)
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "no-store"})

    async def camera_settings(request: Request) -> Response:
        """The camera's settings, its bank's calibrated threshold and the effective one: for everyone (read-only)."""
        camera = request.path_params["camera"]
        if not await run_in_threadpool(data.known_camera, camera):
            return _json({"error": f"unknown camera {camera[:100]!r}"}, 404)
        return _json(await run_in_threadpool(data.camera_settings, camera))

    @action("camera settings")
    async def change_camera_settings(request: Request, user: str) -> Response:
        """Set or reset the camera's sensitivity and region of interest, as `patchcore camera set` (audited as
        console:<operator>); a bad value is a 400 and writes nothing."""
        camera = request.path_params["camera"]
        if not await run_in_threadpool(data.known_camera, camera):
            return _json({"error": f"unknown camera {camera[:100]!r}"}, 400)
        try:
            change = settings_change(await request.json())
        except ValueError as exc:  # SettingsError, or a body that is no JSON
            return _json({"error": str(exc) if isinstance(exc, SettingsError) else "a JSON object expected"}, 400)

        def write() -> None:
            who = f"console:{user}"
            if change.reset == "all":
                data.control.reset(camera, who)
                return
            if change.roi_polygon is not None:
                inside_frame(change.roi_polygon, data.frame_size(camera))
            data.control.update(camera, lambda base: changed_settings(  # refused settings are replaced (audited)
                camera, base, change.sensitivity, change.roi_polygon, bank_threshold=change.reset == "sensitivity",
                bank_roi=change.reset == "roi"), who)
        try:
            await run_in_threadpool(write)
        except SettingsError as exc:
            return _json({"error": str(exc)}, 400)
        except SettingsConflictError as exc:
            return _json({"error": str(exc)}, 409)
        return _json(await run_in_threadpool(data.camera_settings, camera))

    async def alarms(request: Request) -> Response:
        try:
            count = min(max(int(request.query_params.get("count", 50)), 1), 500)
        except ValueError:
            return _json({"error": "count must be an integer"}, 400)
        return _json([_alarm(a) for a in await run_in_threadpool(recent_alarms, client, keys, count)])

    async def alarm_overlay(request: Request) -> Response:
        try:
            logged = await run_in_threadpool(alarm_by_id, client, keys, request.path_params["id"])
        except AlarmLogError as exc:
            return _json({"error": str(exc)}, 404)
        if logged.alarm.overlay_jpeg is None:
            return _json({"error": "this alarm has no overlay"}, 404)
        return Response(logged.alarm.overlay_jpeg, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @action("acknowledge")
    async def acknowledge(request: Request, user: str) -> Response:
        try:
            logged = await run_in_threadpool(acknowledge_alarm, client, keys, request.path_params["id"], f"console:{user}")
        except AlarmLogError as exc:
            return _json({"error": str(exc)}, 404)
        return _json(_alarm(logged))

    @action("dismiss")
    async def dismiss(request: Request, user: str) -> Response:
        try:
            logged = await run_in_threadpool(alarm_by_id, client, keys, request.path_params["id"])
            bank = await run_in_threadpool(dismiss_alarm, client, keys, logged.alarm.camera, logged.alarm.seq,
                                           f"console:{user}")
            logged = await run_in_threadpool(alarm_by_id, client, keys, logged.id)
        except AlarmLogError as exc:
            return _json({"error": str(exc)}, 404)
        except DismissError as exc:
            return _json({"error": str(exc)}, 409)
        return _json({**_alarm(logged), "queued_for_bank": bank})

    async def banks(request: Request) -> Response:
        return _json(await run_in_threadpool(data.banks))

    async def bank_change(request: Request, change: Callable[[], int | None]) -> Response:
        try:
            await run_in_threadpool(change)
        except RegistryError as exc:
            return _json({"error": str(exc)}, 409)
        name = request.path_params["name"]
        return _json({"name": name, "active": await run_in_threadpool(data.registry.active, name)})

    @action("activate")
    async def activate(request: Request, user: str) -> Response:
        try:
            version = int((await request.json())["version"])
        except (ValueError, KeyError, TypeError):
            return _json({"error": "version (an integer) expected"}, 400)
        return await bank_change(request, lambda: data.registry.activate(request.path_params["name"], version,
                                                                          who=f"console:{user}"))

    @action("rollback")
    async def rollback(request: Request, user: str) -> Response:
        return await bank_change(request, lambda: data.registry.rollback(request.path_params["name"],
                                                                          who=f"console:{user}"))

    async def audit(request: Request) -> Response:
        """The audit trail, newest last: logged-in operators only (who changed what is no public information)."""
        if not current_user(request):
            return _json({"error": "log in as an operator to read the audit trail"}, 401)
        try:
            count = min(max(int(request.query_params.get("count", AUDIT_LIST_COUNT)), 1), 1000)
            since = request.query_params.get("since")
            since = None if since in (None, "") else float(since)
            if since is not None and not math.isfinite(since):
                raise ValueError(since)
        except ValueError:
            return _json({"error": "count must be an integer and since unix seconds"}, 400)
        camera = request.query_params.get("camera") or None
        trail = await run_in_threadpool(read_audit, client, keys, camera, since, count)
        return _json({"entries": [entry.to_dict() for entry in trail.entries], "refused": trail.refused})

    async def deadletters(request: Request) -> Response:
        return _json(await run_in_threadpool(data.deadletter_groups))

    async def reason(request: Request) -> str | None:
        try:
            value = (await request.json())["reason"]
        except (ValueError, KeyError, TypeError):
            return None
        return value if isinstance(value, str) else None

    @action("replay")
    async def replay(request: Request, user: str) -> Response:
        if (why := await reason(request)) is None:
            return _json({"error": "reason (a string) expected"}, 400)
        letters = await run_in_threadpool(data.deadletters_with_reason, why)
        outcome = await run_in_threadpool(data.deadletters.replay, letters, f"console:{user}")
        return _json({k: len(v) for k, v in outcome.items()})

    @action("purge")
    async def purge(request: Request, user: str) -> Response:
        if (why := await reason(request)) is None:
            return _json({"error": "reason (a string) expected"}, 400)
        letters = await run_in_threadpool(data.deadletters_with_reason, why)
        return _json({"purged": await run_in_threadpool(data.deadletters.purge, letters, f"console:{user}")})

    routes = [
        Route("/", index), Mount("/static", StaticFiles(directory=STATIC), name="static"),
        Route("/api/session", session), Route("/api/login", login, methods=["POST"]),
        Route("/api/logout", logout, methods=["POST"]), Route("/api/events", events),
        Route("/api/cameras", cameras), Route("/api/cameras/{camera}/image.jpg", camera_image),
        Route("/api/cameras/{camera}/frame.jpg", camera_frame),
        Route("/api/cameras/{camera}/settings", camera_settings, methods=["GET"]),
        Route("/api/cameras/{camera}/settings", change_camera_settings, methods=["POST"]),
        Route("/api/alarms", alarms), Route("/api/alarms/{id}/overlay.jpg", alarm_overlay),
        Route("/api/alarms/{id}/acknowledge", acknowledge, methods=["POST"]),
        Route("/api/alarms/{id}/dismiss", dismiss, methods=["POST"]),
        Route("/api/banks", banks), Route("/api/banks/{name}/activate", activate, methods=["POST"]),
        Route("/api/banks/{name}/rollback", rollback, methods=["POST"]),
        Route("/api/audit", audit), Route("/api/deadletters", deadletters), Route("/api/deadletters/replay", replay, methods=["POST"]),
        Route("/api/deadletters/purge", purge, methods=["POST"]),
    ]
    middleware = [Middleware(SecurityHeaders), Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts(settings)),
                  Middleware(BodyLimit, max_bytes=settings.max_body_bytes),
                  Middleware(SessionMiddleware, secret_key=(settings.session_key or secrets.token_bytes(32)).hex(),
                             session_cookie="patchcore_console", max_age=settings.session_max_age_s,
                             same_site="strict", https_only=False)]
    return Starlette(routes=routes, middleware=middleware)


class ConsoleServer:
    """uvicorn serving the console in a background thread (`start`/`stop`; `serve` blocks until a signal)."""

    def __init__(self, client: redis.Redis, keys: Keys = Keys(), settings: ConsoleSettings = ConsoleSettings()):
        import uvicorn

        self.settings = settings
        config = uvicorn.Config(create_app(client, keys, settings), host=settings.host, port=settings.port,
                                log_level="warning", access_log=False, timeout_graceful_shutdown=2, lifespan="off")
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    def serve(self) -> None:
        """After `start`: block until Ctrl-C or SIGTERM, then stop gracefully (what `patchcore console` runs, so
        that it says where it listens only once it does)."""
        previous = signal.signal(signal.SIGTERM, lambda *_: setattr(self.server, "should_exit", True))
        try:
            while self._thread is not None and self._thread.is_alive():
                self._thread.join(0.5)
        except KeyboardInterrupt:
            pass
        finally:
            signal.signal(signal.SIGTERM, previous)
            self.stop()

    def start(self, timeout: float = 10.0) -> "ConsoleServer":
        self._thread = threading.Thread(target=self.server.run, name="console", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ConsoleError(f"the console could not start on {self.settings.url} (is the port in use?)")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
