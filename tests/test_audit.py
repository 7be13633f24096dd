"""The audit trail (issue 18 item 3): every change to what alarms or what is kept - camera settings, alarm rules, bank
publish/activate/rollback, alarm acknowledge/dismiss, dead-letter replay/purge - appended with who, when, before and
after; `patchcore audit` lists it; the console's Audit tab shows it to logged-in operators only. Real redis-server,
a real console server, real chromium where installed."""
from __future__ import annotations

import json
import time

import pytest
from typer.testing import CliRunner

from console.auth import hash_password
from contracts.control import CameraSettings
from contracts.keys import FRAME_GROUP, Keys
from contracts.messages import Alarm, Frame
from patchcore.cli import app
from patchcore.embedded_redis import free_port
from runtime.connection import connect
from runtime.control import AuditSettings, CameraControl, read_audit, record
from runtime.deadletter import DeadLetters
from runtime.streams import ensure_groups
from store.alarms.dismiss import dismiss_alarm
from store.alarms.log import acknowledge_alarm, alarm_id
from workers.banks.registry import BankRegistry

from .test_console import Http, browser  # noqa: F401 - the real chromium fixture
from .test_console_hardening import raw

KEYS = Keys()


def run(*args: str, url: str) -> str:
    result = CliRunner().invoke(app, [*args, "--redis-url", url])
    assert result.exit_code == 0, result.output
    return result.output


def audit_lines(url: str, *args: str) -> list[dict]:
    return [json.loads(line) for line in run("audit", "--json", *args, url=url).splitlines()]


def an_alarm(client, camera: str, seq: int) -> str:
    """An alarm in the camera's durable stream and its frame's kept copy (what the store and a worker leave)."""
    frame = Frame(camera=camera, line="l", bank="default", seq=seq, captured_at=time.time(), encoding="raw",
                  shape=(2, 2, 1), data=bytes(4))
    client.set(KEYS.frame_copy(camera, seq), frame.pack())
    client.sadd(KEYS.cameras, camera)
    message = Alarm(camera=camera, line="l", seq=seq, score=2.0, threshold=1.0, bank="default", bank_version=1,
                    raised_at=time.time(), rule="1-of-1").pack()
    return alarm_id(camera, client.xadd(KEYS.alarms(camera), {"m": message}).decode())


def dead_letters(client, camera: str, reasons: list[str]) -> DeadLetters:
    stream = KEYS.frames(camera)
    client.sadd(KEYS.cameras, camera)
    ensure_groups(client, [stream], FRAME_GROUP)
    frame = Frame(camera=camera, line="l", bank="default", seq=0, captured_at=1.0, encoding="raw", shape=(2, 2, 1),
                  data=bytes(4)).pack()
    for _ in reasons:
        client.xadd(stream, {"m": frame})
    letters = DeadLetters(client, KEYS)
    for (entry_id, _), reason in zip(client.xreadgroup(FRAME_GROUP, "w", {stream: ">"})[0][1], reasons):
        assert letters.add(stream, FRAME_GROUP, entry_id, frame, reason, "w")
    return letters


def test_every_change_is_audited_with_who_before_and_after(redis_server, synthetic_bank_bytes):
    url = redis_server.url
    client = connect(url)
    started = time.time()
    # camera settings and alarm rules from the CLI
    run("camera", "set", "cam-1", "--threshold-factor", "1.25", "--roi-polygon", "0,0;100,0;100,100", url=url)
    run("camera", "reset", "cam-1", url=url)
    run("camera", "reset", "cam-1", url=url)  # nothing to reset: nothing changed, nothing recorded
    run("rule", "cam-2", "--k", "3", "--n", "5", url=url)
    run("rule", "cam-2", "--k", "1", "--n", "1", url=url)
    run("rule", "cam-2", "--delete", url=url)
    # banks: publish (and activate), a second publish, a rollback
    registry = BankRegistry(client, KEYS)
    registry.publish("default", synthetic_bank_bytes, activate=True)
    registry.publish("default", synthetic_bank_bytes, activate=True)
    registry.rollback("default")
    # alarms and dead letters
    first = an_alarm(client, "cam-3", 7)
    acknowledge_alarm(client, KEYS, first)
    acknowledge_alarm(client, KEYS, first, "console:someone")  # the first acknowledgement is kept: no change
    dismiss_alarm(client, KEYS, "cam-3", 7)
    letters = dead_letters(client, "cam-4", ["decode failed", "decode failed", "too large"])
    listed = letters.list("cam-4")
    letters.replay([letter for letter in listed if letter.reason == "decode failed"])
    letters.purge([letter for letter in listed if letter.reason == "too large"], who="console:op")

    entries = audit_lines(url)
    assert [(e["action"], e["target"]) for e in entries] == [
        ("camera.set", "cam-1"), ("camera.reset", "cam-1"),
        ("rule.set", "cam-2"), ("rule.set", "cam-2"), ("rule.delete", "cam-2"),
        ("bank.publish", "default"), ("bank.activate", "default"), ("bank.publish", "default"),
        ("bank.activate", "default"), ("bank.rollback", "default"),
        ("alarm.acknowledge", "cam-3:7"), ("alarm.dismiss", "cam-3:7"),
        ("deadletter.replay", "cam-4"), ("deadletter.purge", "cam-4")]
    assert all(started - 1 <= e["at"] <= time.time() for e in entries)
    assert {e["who"] for e in entries[:-1]} == {"default"}  # ACL WHOAMI: the test server's default user
    assert entries[-1]["who"] == "console:op"
    settings, reset = entries[0], entries[1]
    assert settings["before"] is None and settings["after"]["threshold_factor"] == 1.25
    assert settings["after"]["roi_polygon"] == [[0, 0], [100, 0], [100, 100]] and settings["camera"] == "cam-1"
    assert reset["before"] == settings["after"] and reset["after"] is None
    rules = entries[2:5]
    assert rules[0]["before"] is None and (rules[0]["after"]["k"], rules[0]["after"]["n"]) == (3, 5)
    assert rules[1]["before"] == rules[0]["after"] and (rules[1]["after"]["k"], rules[1]["after"]["n"]) == (1, 1)
    assert rules[2]["before"] == rules[1]["after"] and rules[2]["after"] is None
    activations = [e for e in entries if e["action"] in ("bank.activate", "bank.rollback")]
    assert [(e["before"]["active"], e["after"]["active"]) for e in activations] == [(None, 1), (1, 2), (2, 1)]
    assert entries[5]["after"]["version"] == 1 and len(entries[5]["after"]["sha256"]) == 64
    assert entries[10]["before"] == {"acknowledged": False} and entries[10]["after"]["alarm"] == first
    assert entries[11]["after"] == {"dismissed": True, "queued_for_bank": "default"}
    replay, purge = entries[12], entries[13]
    assert replay["before"]["count"] == 2 and replay["after"] == {"replayed": [l.id for l in listed[:2]]}
    assert purge["before"]["reasons"] == {"too large": 1} and purge["after"] == {"purged": 1}

    # filters: a camera's changes, and those since a time
    assert [e["action"] for e in audit_lines(url, "--camera", "cam-3")] == ["alarm.acknowledge", "alarm.dismiss"]
    assert audit_lines(url, "--since", repr(time.time() + 60)) == []
    assert len(audit_lines(url, "--since", "10m")) == len(entries)
    assert len(audit_lines(url, "--count", "3")) == 3 and audit_lines(url, "--count", "3")[-1] == entries[-1]
    text = run("audit", url=url).splitlines()
    assert len(text) == len(entries) and "camera.set  cam-1" in text[0]
    result = CliRunner().invoke(app, ["audit", "--since", "yesterday-ish", "--redis-url", url])
    assert result.exit_code == 2 and "bad --since" in result.output


def test_the_trail_is_bounded_and_a_malformed_entry_is_skipped_and_counted(redis_server):
    client = connect(redis_server.url)
    for i in range(1000):
        record(client, KEYS, "camera.set", f"cam-{i}", None, {"i": i}, camera=f"cam-{i}", settings=AuditSettings(maxlen=50))
    assert client.xlen(KEYS.audit) < 300  # MAXLEN ~ 50: whole nodes trimmed, never the full 1000
    client.xadd(KEYS.audit, {"at": "not a time", "schema": "1"})  # a forged entry
    trail = read_audit(client, KEYS, count=10)
    assert trail.refused == 1 and [e.target for e in trail.entries] == [f"cam-{i}" for i in range(990, 1000)]
    with pytest.raises(ValueError):
        record(client, KEYS, "camera.set", "cam-1", None, {"huge": "x" * 100_000})


def test_the_audit_api_serves_logged_in_operators_only_and_names_them(redis_server, synthetic_bank_bytes):
    from console.app import ConsoleServer, ConsoleSettings

    client = connect(redis_server.url)
    registry = BankRegistry(client, KEYS)
    for _ in range(2):
        registry.publish("default", synthetic_bank_bytes, activate=True)
    CameraControl(client, KEYS).set(CameraSettings("cam-1", threshold=3.5))
    settings = ConsoleSettings(port=free_port(), credentials={"op": hash_password("pw-op")}, interval_s=0.2)
    server = ConsoleServer(client, KEYS, settings).start()
    try:
        http = Http(settings.url.rstrip("/"))
        status, page = http.call("/api/audit")
        assert status == 401 and "entries" not in page  # who changed what is for operators
        csrf = http.login("op", "pw-op")
        assert http.call("/api/banks/default/rollback", {}, csrf)[0] == 200
        status, page = http.call("/api/audit")
        assert status == 200 and page["refused"] == 0
        actions = [(e["action"], e["who"]) for e in page["entries"]]
        assert actions[-2:] == [("camera.set", "default"), ("bank.rollback", "console:op")]
        assert page["entries"][-1]["before"] == {"active": 2} and page["entries"][-1]["after"] == {"active": 1}
        assert [e["action"] for e in http.call("/api/audit?camera=cam-1")[1]["entries"]] == ["camera.set"]
        assert len(http.call("/api/audit?count=2")[1]["entries"]) == 2
        assert http.call("/api/audit?since=nan")[0] == 400 and http.call("/api/audit?count=x")[0] == 400
        assert raw(settings, "POST", "/api/audit", b"{}", {"X-CSRF-Token": csrf})[0] == 405  # read-only
    finally:
        server.stop()


def test_the_audit_tab_in_a_browser(browser, redis_server):
    from selenium.webdriver.common.by import By

    from console.app import ConsoleServer, ConsoleSettings

    from .test_console import wait_for

    client = connect(redis_server.url)
    CameraControl(client, KEYS).set(CameraSettings("cam-1", threshold_offset=0.5))
    CameraControl(client, KEYS).set(CameraSettings("cam-2", roi_polygon=((0, 0), (5, 0), (5, 5))), who="console:op")
    settings = ConsoleSettings(port=free_port(), credentials={"op": hash_password("pw-op")}, interval_s=0.2)
    server = ConsoleServer(client, KEYS, settings).start()
    try:
        browser.get(settings.url + "#audit")
        wait_for(lambda: "log in to read the audit trail" in browser.find_element(By.ID, "audit").text, 10,
                 "the audit tab asking for a login")
        assert not browser.find_elements(By.CSS_SELECTOR, "#audit-table tr[data-id]")
        browser.find_element(By.ID, "login-user").send_keys("op")
        browser.find_element(By.ID, "login-password").send_keys("pw-op")
        browser.find_element(By.CSS_SELECTOR, "#login button").click()
        wait_for(lambda: browser.find_element(By.ID, "who").text == "operator op", 10, "the login")
        rows = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#audit-table tr[data-id]"), 10, "the audit rows")
        cells = [[td.text for td in row.find_elements(By.TAG_NAME, "td")] for row in rows]
        assert [(c[1], c[2], c[3]) for c in cells] == [("console:op", "camera.set", "cam-2"),
                                                       ("default", "camera.set", "cam-1")]  # newest first
        assert '"threshold_offset":0.5' in cells[1][5].replace(" ", "") and cells[1][4] == "–"
        assert browser.find_element(By.CSS_SELECTOR, 'nav a[data-tab="audit"]').is_displayed()
    finally:
        server.stop()
