"""The console against ordinary web attacks (issue 22, items 5-9): server-side sessions that logout ends, a login
rate limit per user and per client (parallel guesses included), request body limits, a Host allow-list (DNS
rebinding), the security headers on every response. A real uvicorn server on loopback, plain HTTP clients."""
from __future__ import annotations

import http.client
import json
import logging
import threading
import urllib.request
from http.cookiejar import CookieJar

from console.auth import hash_password
from contracts.keys import Keys
from patchcore.embedded_redis import free_port
from runtime.connection import connect
from workers.banks.registry import BankRegistry

from .test_console import Http

KEYS = Keys()


def console(redis_server, **settings):
    from console.app import ConsoleServer, ConsoleSettings

    client = connect(redis_server.url)
    config = ConsoleSettings(port=free_port(), credentials={"op": hash_password("pw-op"), "op2": hash_password("pw-2")},
                             interval_s=0.2, **settings)
    return client, config, ConsoleServer(client, KEYS, config).start()


def raw(config, method: str, path: str, body: bytes = b"", headers: dict | None = None) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", config.port, timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}
    finally:
        connection.close()


def test_logout_ends_the_session_for_every_copy_of_its_cookie(redis_server, synthetic_bank_bytes):
    client, config, server = console(redis_server)
    try:
        registry = BankRegistry(client, KEYS)
        for _ in range(2):
            registry.publish("default", synthetic_bank_bytes, activate=True)
        browser = Http(config.url.rstrip("/"))
        csrf = browser.login("op", "pw-op")
        copied = Http(config.url.rstrip("/"))  # an attacker with a copy of the cookie
        jar = CookieJar()
        for cookie in next(h for h in browser.opener.handlers if hasattr(h, "cookiejar")).cookiejar:
            jar.set_cookie(cookie)
        copied.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
        assert copied.call("/api/session")[1]["user"] == "op"
        assert browser.call("/api/logout", {}, csrf)[0] == 200
        assert copied.call("/api/session")[1]["user"] is None
        assert copied.call("/api/banks/default/activate", {"version": 1}, csrf)[0] == 401
        assert registry.active("default") == 2
    finally:
        server.stop()


def test_failed_logins_lock_the_user_and_the_client_out_also_in_parallel(redis_server, caplog):
    caplog.set_level(logging.WARNING, logger="patchcore.console")
    _, config, server = console(redis_server, login_failures_per_user=3, login_failures_per_client=8)
    try:
        guesser = Http(config.url.rstrip("/"))
        token = guesser.call("/api/session")[1]["csrf"]
        codes = [guesser.call("/api/login", {"user": "op", "password": f"guess-{i}"}, token)[0] for i in range(5)]
        assert codes == [401, 401, 401, 429, 429]
        assert guesser.call("/api/login", {"user": "op", "password": "pw-op"}, token)[0] == 429  # locked, even right
        assert any("console login locked out" in r.getMessage() for r in caplog.records)
        # another user from the same client: its own limit, until the client's is reached
        results = []

        def guess(i: int) -> None:
            results.append(guesser.call("/api/login", {"user": "op2", "password": f"x-{i}"}, token)[0])
        threads = [threading.Thread(target=guess, args=(i,)) for i in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert results.count(401) <= 3 and results.count(429) >= 17  # parallel guesses are limited too
        fresh = Http(config.url.rstrip("/"))  # the client address is locked out now, whatever the user
        assert fresh.call("/api/login", {"user": "op2", "password": "pw-2"}, fresh.call("/api/session")[1]["csrf"])[0] == 429
    finally:
        server.stop()


def test_request_bodies_over_the_limit_are_refused_before_they_are_read(redis_server):
    _, config, server = console(redis_server, max_body_bytes=4096)
    try:
        status, headers = raw(config, "POST", "/api/login", b"x" * 1_000_000, {"Content-Type": "application/json"})
        assert status == 413 and headers["x-content-type-options"] == "nosniff"
        status, _ = raw(config, "POST", "/api/login", json.dumps({"user": "op", "password": "p" * 5000}).encode(),
                        {"Content-Type": "application/json"})
        assert status == 413
        assert raw(config, "POST", "/api/login", b"{}", {"Content-Type": "application/json"})[0] == 403  # no CSRF
    finally:
        server.stop()


def test_a_foreign_host_header_is_refused(redis_server):
    _, config, server = console(redis_server)
    try:
        assert raw(config, "GET", "/api/cameras", headers={"Host": f"127.0.0.1:{config.port}"})[0] == 200
        assert raw(config, "GET", "/api/cameras", headers={"Host": f"localhost:{config.port}"})[0] == 200
        # a page of rebind.example whose name now points at 127.0.0.1 sends its own name as Host
        assert raw(config, "GET", "/api/cameras", headers={"Host": f"rebind.example:{config.port}"})[0] == 400
        assert raw(config, "GET", "/", headers={"Host": "rebind.example"})[0] == 400
    finally:
        server.stop()


def test_every_response_carries_the_security_headers(redis_server):
    client, config, server = console(redis_server)
    try:
        client.sadd(KEYS.cameras, "cam-1")
        client.set(KEYS.preview("cam-1"), b"<script>not a jpeg</script>")  # camera-controlled bytes
        for path in ("/", "/api/session", "/api/cameras", "/static/app.js", "/api/cameras/cam-1/image.jpg",
                     "/api/cameras/nobody/image.jpg", "/api/alarms", "/no/such/page"):
            status, headers = raw(config, "GET", path)
            assert headers.get("x-content-type-options") == "nosniff", (path, status, headers)
            assert "frame-ancestors 'none'" in headers.get("content-security-policy", ""), path
            assert headers.get("x-frame-options") == "DENY", path
        status, headers = raw(config, "GET", "/api/cameras/cam-1/image.jpg")
        assert status == 200 and headers["content-type"] == "image/jpeg"
    finally:
        server.stop()
