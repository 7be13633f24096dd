"""One HTTP port per process: /metrics (prometheus-client's WSGI app), /healthz and /readyz.

/healthz: 200 when the process is alive and Redis answers PING within 2 s (`redis_alive`), else 503.
/readyz: 200 when the process's own readiness check says so (a worker: a bank loaded and its
consumer group joined; the store: its group joined; ingest: connected), else 503. Both answer a
small JSON body. Served by wsgiref on a thread per request, in a daemon thread.
"""
from __future__ import annotations

import json
import threading
import urllib.request
from socketserver import ThreadingMixIn
from typing import Callable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import redis
from prometheus_client import make_wsgi_app

from contracts.keys import FRAME_GROUP, Keys
from runtime.metrics import GpuMemoryCollector, LagCollector, register

Check = Callable[[], tuple[bool, dict]]


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - scrapes every few seconds are not worth a log line
        pass


def redis_alive(client: redis.Redis, timeout_s: float = 2.0) -> Check:
    """A check that PINGs Redis, answering within `timeout_s` whatever the client's own retries do."""
    def check() -> tuple[bool, dict]:
        outcome: dict = {}

        def ping():
            try:
                outcome["ok"] = bool(client.ping())
            except redis.RedisError as exc:
                outcome["error"] = f"{type(exc).__name__}: {exc}"

        thread = threading.Thread(target=ping, daemon=True)
        thread.start()
        thread.join(timeout_s)
        if outcome.get("ok"):
            return True, {"redis": "ok"}
        return False, {"redis": outcome.get("error", f"no PONG within {timeout_s} s")}
    return check


def both(*checks: Check) -> Check:
    """All of `checks`: ready when each is, details merged."""
    def check() -> tuple[bool, dict]:
        ok, details = True, {}
        for one in checks:
            passed, info = one()
            ok, details = ok and passed, details | info
        return ok, details
    return check


def serve_process(port: int, client: redis.Redis, ready: Check, keys: Keys | None = None) -> WSGIServer | None:
    """A process's endpoints on `port` (0: none): /healthz PINGs through `client`, /readyz asks `ready`;
    with `keys` (workers, `patchcore up`), /metrics also has the consumer lag per camera and GPU memory."""
    if not port:
        return None
    if keys is not None:
        register("lag", LagCollector(client, keys.cameras, keys.frames, FRAME_GROUP))
        register("gpu", GpuMemoryCollector())
    return serve(port, redis_alive(client), ready)


def serve(port: int, healthy: Check, ready: Check, host: str = "0.0.0.0") -> WSGIServer:
    """Start serving on `port` (0: any free port); returns the server (its `server_port`; `shutdown()` stops it)."""
    metrics = make_wsgi_app()

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path in ("/healthz", "/readyz"):
            ok, details = (healthy if path == "/healthz" else ready)()
            body = json.dumps({"ok": ok, **details}).encode()
            start_response("200 OK" if ok else "503 Service Unavailable",
                           [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        return metrics(environ, start_response)

    server = make_server(host, port, app, _Server, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name=f"metrics:{port}", daemon=True).start()
    return server


def is_ready(port: int, host: str = "127.0.0.1", timeout_s: float = 5.0) -> bool:
    """Whether the process serving on `port` answers /readyz with 200 (the client side of `serve`: bench scripts
    wait on it for the processes they start); False for a 503, a refused connection or no answer in `timeout_s`."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/readyz", timeout=timeout_s) as reply:
            return reply.status == 200
    except OSError:  # urllib's HTTPError (a 503) is an OSError too
        return False
