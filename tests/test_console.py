"""The operator console: its security over plain HTTP, and the whole console in a real headless browser
(Debian's chromium + chromedriver through Selenium) against `patchcore up` on a real redis-server."""
from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.cookiejar import CookieJar
from pathlib import Path

import pytest
from typer.testing import CliRunner

from console.auth import Operators, hash_password, load_credentials, verify_password
from runtime.connection import connect
from contracts.keys import Keys
from contracts.messages import Alarm
from workers.banks.registry import BankRegistry
from patchcore.cli import app
from patchcore.embedded_redis import free_port

from .conftest import ROOT

KEYS = Keys()
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


class Http:
    """A cookie-keeping client of one console (what a second browser tab or a script would do)."""

    def __init__(self, base: str):
        self.base = base
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))

    def call(self, path: str, body: dict | None = None, csrf: str | None = None) -> tuple[int, dict]:
        headers = {"Content-Type": "application/json"} | ({"X-CSRF-Token": csrf} if csrf is not None else {})
        request = urllib.request.Request(self.base + path, data=None if body is None else json.dumps(body).encode(),
                                         headers=headers, method="GET" if body is None else "POST")
        try:
            with self.opener.open(request, timeout=10) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    def login(self, user: str, password: str) -> str:
        """Log in; returns the session's CSRF token."""
        status, page = self.call("/api/login", {"user": user, "password": password}, self.call("/api/session")[1]["csrf"])
        assert status == 200, page
        return page["csrf"]


def test_password_hashes_verify_only_their_password(tmp_path):
    encoded = hash_password("correct horse")
    assert encoded.startswith("scrypt$") and "correct horse" not in encoded
    assert verify_password("correct horse", encoded) and not verify_password("correct hors", encoded)
    assert hash_password("correct horse") != encoded  # salted
    assert not verify_password("x", "scrypt$1048577$8$1$AAAA$AAAA")  # a planted, ruinously costly hash is refused
    operators = Operators({"op": encoded})
    assert operators.check("op", "correct horse") and not operators.check("other", "correct horse")
    creds = tmp_path / "operators"
    creds.write_text(f"# console operators\nop:{encoded}\n")
    assert load_credentials(creds) == {"op": encoded}
    creds.write_text("op:plain-text-password\n")
    with pytest.raises(ValueError, match="line 1") as refused:
        load_credentials(creds)
    assert "plain-text-password" not in str(refused.value)


def test_hash_password_command_prints_a_line_the_console_accepts(tmp_path):
    result = CliRunner().invoke(app, ["console", "hash-password", "--user", "anna"], input="s3cret pw\ns3cret pw\n")
    assert result.exit_code == 0, result.output
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith("anna:scrypt$") and "s3cret" not in result.stdout
    (tmp_path / "operators").write_text(line + "\n")
    assert Operators(load_credentials(tmp_path / "operators")).check("anna", "s3cret pw")


def test_actions_need_a_login_and_the_csrf_token_and_refusals_change_nothing(redis_server, synthetic_bank_bytes):
    from console.app import ConsoleServer, ConsoleSettings

    client = connect(redis_server.url)
    registry = BankRegistry(client, KEYS)
    for _ in range(2):
        registry.publish("default", synthetic_bank_bytes, {"source": "test"}, activate=True)
    assert registry.active("default") == 2
    settings = ConsoleSettings(port=free_port(), credentials={"op": hash_password("pw-op")}, interval_s=0.2)
    server = ConsoleServer(client, KEYS, settings).start()
    try:
        http = Http(settings.url.rstrip("/"))
        status, page = http.call("/api/session")
        assert status == 200 and page["user"] is None and page["login"] is True
        csrf = page["csrf"]
        # not logged in: 401, and nothing changes
        assert http.call("/api/banks/default/rollback", {}, csrf)[0] == 401
        assert http.call("/api/banks/default/activate", {"version": 1}, csrf)[0] == 401
        assert registry.active("default") == 2
        # wrong password, then no or a wrong CSRF token on login: refused
        assert http.call("/api/login", {"user": "op", "password": "nope"}, csrf)[0] == 401
        assert http.call("/api/login", {"user": "op", "password": "pw-op"})[0] == 403
        assert http.call("/api/login", {"user": "op", "password": "pw-op"}, "forged")[0] == 403
        status, login = http.call("/api/login", {"user": "op", "password": "pw-op"}, csrf)
        assert status == 200 and login["user"] == "op" and login["csrf"] != csrf  # a fresh session on login
        # logged in, but the pre-login token or none: 403, nothing changes
        assert http.call("/api/banks/default/rollback", {}, csrf)[0] == 403
        assert http.call("/api/banks/default/rollback", {})[0] == 403
        assert registry.active("default") == 2
        status, done = http.call("/api/banks/default/rollback", {}, login["csrf"])
        assert status == 200 and done["active"] == 1 and registry.active("default") == 1
        # another client without the session cookie is not logged in
        other = Http(settings.url.rstrip("/"))
        assert other.call("/api/banks/default/activate", {"version": 2}, other.call("/api/session")[1]["csrf"])[0] == 401
        assert registry.active("default") == 1
        # the pages hold no credential: the session endpoint and the page itself
        with urllib.request.urlopen(settings.url, timeout=10) as response:
            page_text = response.read().decode()
            assert "default-src 'self'" in response.headers["Content-Security-Policy"]
        assert "scrypt" not in page_text and "pw-op" not in page_text
        assert "scrypt" not in json.dumps(http.call("/api/session")[1])
        # read-only console (no credentials): login refused
        readonly = ConsoleSettings(port=free_port(), interval_s=0.2)
        second = ConsoleServer(client, KEYS, readonly).start()
        try:
            anonymous = Http(readonly.url.rstrip("/"))
            token = anonymous.call("/api/session")[1]["csrf"]
            assert anonymous.call("/api/login", {"user": "op", "password": "pw-op"}, token)[0] == 403
        finally:
            second.stop()
    finally:
        server.stop()


def test_patchcore_console_serves_read_only_without_credentials(redis_server):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "patchcore", "console", "--port", str(port), "--redis-url",
                                redis_server.url], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                               env={k: v for k, v in os.environ.items() if k != "PATCHCORE_CONSOLE_CREDENTIALS"})
    try:
        assert process.stdout.readline().strip() == f"console at http://127.0.0.1:{port}/ (read-only)"
        http = Http(f"http://127.0.0.1:{port}")
        session = wait_for(lambda: _try(lambda: http.call("/api/session")), 30, "the console to answer")
        assert session == (200, {"user": None, "csrf": session[1]["csrf"], "login": False})
    finally:
        process.terminate()
        process.wait(timeout=30)


def _try(call):
    try:
        return call()
    except OSError:  # not listening yet
        return None


def test_the_event_stream_sends_the_alarms_after_the_newest_one_the_page_has(redis_server):
    from console.app import ConsoleServer, ConsoleSettings

    client = connect(redis_server.url)

    def alarm(seq: int) -> bytes:
        return Alarm(camera="c1", line="l", seq=seq, score=2.0, threshold=1.0, bank="b", bank_version=1,
                     raised_at=time.time(), rule="1-of-1").pack()

    from store.alarms.log import alarm_id

    client.sadd(KEYS.cameras, "c1")
    first = alarm_id("c1", client.xadd(KEYS.alarms("c1"), {"m": alarm(1)}).decode())  # the page listed this one
    client.xadd(KEYS.alarms("c1"), {"m": alarm(2)})  # and this one came before its event stream opened
    settings = ConsoleSettings(port=free_port(), interval_s=0.2)
    server = ConsoleServer(client, KEYS, settings).start()
    try:
        with urllib.request.urlopen(f"{settings.url}api/events?after={first}", timeout=10) as response:
            text = ""
            while not re.search(r"event: alarms\ndata: .*\n\n", text):
                text += response.read1(65536).decode()
        events = dict(re.findall(r"event: (\w+)\ndata: (.*)\n\n", text))
        assert [a["seq"] for a in json.loads(events["alarms"])] == [2]
        assert [c["camera"] for c in json.loads(events["cameras"])["cameras"]] == ["c1"]
    finally:
        server.stop()


def test_ingest_keeps_a_preview_of_the_latest_frame_and_status_says_live_then_stopped(redis_server):
    import cv2
    import numpy as np

    from runtime.status import collect_status, liveness
    from ingest.camera import CameraIngest, IngestSettings
    from ingest.sources import SyntheticLine

    client = connect(redis_server.url)
    CameraIngest(client, SyntheticLine(seed=1, max_frames=3), IngestSettings(camera="c1", encoding="raw"), KEYS).run()
    jpeg = client.get(KEYS.preview("c1"))
    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert image.shape == (240, 320, 3) and 0 < client.ttl(KEYS.preview("c1")) <= 300
    assert collect_status(client)["cameras"][0]["liveness"] == "stopped"  # the source ended
    now = time.time()
    assert liveness("running", now - 1, now) == "live" and liveness("running", now - 60, now) == "dead"
    assert liveness("reconnecting: timeout", now - 60, now) == "reconnecting" and liveness("running", None, now) == "dead"


def test_dead_letters_grouped_by_reason_are_replayed_and_purged_from_the_console(redis_server):
    from console.app import ConsoleServer, ConsoleSettings
    from runtime.deadletter import DeadLetters
    from contracts.keys import FRAME_GROUP
    from contracts.messages import Frame
    from runtime.streams import ensure_groups

    client = connect(redis_server.url)
    stream = KEYS.frames("c1")
    client.sadd(KEYS.cameras, "c1")  # as its ingest would: dead letters are listed per registered camera
    ensure_groups(client, [stream], FRAME_GROUP)
    frame = Frame(camera="c1", line="l", bank="default", seq=0, captured_at=1.0, encoding="raw", shape=(2, 2, 1),
                  data=bytes(4)).pack()
    for _ in range(3):
        client.xadd(stream, {"m": frame})
    entries = client.xreadgroup(FRAME_GROUP, "w", {stream: ">"})[0][1]
    letters = DeadLetters(client, KEYS)
    for (entry_id, _), reason in zip(entries, ["decode failed", "decode failed", "too large"]):
        assert letters.add(stream, FRAME_GROUP, entry_id, frame, reason, "w")
    settings = ConsoleSettings(port=free_port(), credentials={"op": hash_password("pw")}, interval_s=0.2)
    server = ConsoleServer(client, KEYS, settings).start()
    try:
        http = Http(settings.url.rstrip("/"))
        groups = {g["reason"]: g for g in http.call("/api/deadletters")[1]}
        assert {r: (g["count"], g["replayable"], g["cameras"]) for r, g in groups.items()} == \
            {"decode failed": (2, 2, ["c1"]), "too large": (1, 1, ["c1"])}
        anonymous = http.call("/api/session")[1]["csrf"]
        assert http.call("/api/deadletters/purge", {"reason": "too large"}, anonymous)[0] == 401
        assert client.xlen(KEYS.deadletter("c1")) == 3
        csrf = http.login("op", "pw")
        assert http.call("/api/deadletters/replay", {"reason": "decode failed"}, csrf)[1] == \
            {"replayed": 2, "gone": 0, "no_payload": 0}
        assert client.xlen(stream) == 2  # back on the camera's stream, for the workers to score again
        assert http.call("/api/deadletters/purge", {"reason": "too large"}, csrf)[1] == {"purged": 1}
        assert client.xlen(KEYS.deadletter("c1")) == 0 and http.call("/api/deadletters")[1] == []
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------- the browser


@pytest.fixture
def browser(tmp_path):
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        pytest.skip("Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                 "--window-size=1100,760", f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)  # no Selenium Manager
    driver.set_script_timeout(15)
    yield driver
    driver.quit()


def read_lines(process: subprocess.Popen) -> queue.Queue:
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    return lines


def wait_for(condition, timeout: float, what: str, step: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def click(browser, css: str, what: str) -> None:
    """Click the element `css` finds, again if the live feed re-rendered it between finding and clicking."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    def attempt():
        try:
            browser.find_element(By.CSS_SELECTOR, css).click()
            return True
        except StaleElementReferenceException:
            return False

    wait_for(attempt, 10, what, step=0.05)


def test_the_console_in_a_browser_against_patchcore_up(browser, redis_server, synthetic_bank_bytes, tmp_path):
    from selenium.webdriver.common.by import By

    bank, key = tmp_path / "line.bank", tmp_path / "bank.key"
    bank.write_bytes(synthetic_bank_bytes)
    key.write_text("k" * 64)
    credentials = tmp_path / "operators"
    credentials.write_text(f"op:{hash_password('pw-op')}\n")
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "patchcore", "up", "--redis-url", redis_server.url, "--bank", str(bank),
         "--signing-key-file", str(key), "--source", "synthetic:seed=3,defect_rate=0.5", "--fps", "4",
         "--seconds", "240", "--k", "1", "--n", "1", "--cooldown-s", "1", "--no-progress", "--device", "cpu",
         "--console-port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
        env={**os.environ, "PATCHCORE_CONSOLE_CREDENTIALS": str(credentials)},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # a background job may inherit SIGINT ignored
    lines, output = read_lines(process), []
    shots = ROOT / "docs" if os.environ.get("PATCHCORE_CONSOLE_SCREENSHOTS") else tmp_path
    try:
        def console_line():
            while not lines.empty():
                output.append(lines.get())
            return next((m for line in output if (m := re.search(r"console at (http://\S+)", line))), None)

        try:
            url = wait_for(console_line, 300, "`up` to print the console's address").group(1)  # imports torch: slow
        except AssertionError as exc:
            raise AssertionError(f"{exc}; `up` printed: {''.join(output)[-3000:]}") from None
        assert url == f"http://127.0.0.1:{port}/"
        client = connect(redis_server.url)
        registry = BankRegistry(client, KEYS, signing_key=key.read_bytes())
        assert registry.active("default") == 1
        registry.publish("default", synthetic_bank_bytes, {"source": "test"}, activate=True)  # v2, rollback target v1

        # the camera grid: a card for cam-1 with its picture, a score sparkline and live state
        browser.get(url)
        card = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, '[data-camera="cam-1"]'), 30, "the camera card")[0]
        wait_for(lambda: browser.execute_script(
            "const i = arguments[0].querySelector('img.picture'); return i && i.complete && i.naturalWidth > 0;", card),
            15, "the camera's picture")
        wait_for(lambda: card.find_elements(By.CSS_SELECTOR, "svg.spark polyline.score"), 120, "the first result")
        assert card.find_element(By.CSS_SELECTOR, ".liveness").text == "live"

        def ingested() -> int:  # read in one script: the live grid replaces its counters every second
            return int(browser.execute_script(
                "return document.querySelector('[data-camera=\"cam-1\"] [data-stat=\"ingested\"]').textContent"))

        before = ingested()
        wait_for(lambda: ingested() > before, 10, "the grid to update without a reload")

        # an action without login is refused by the server, and changes nothing
        refused = browser.execute_async_script("""
            const done = arguments[arguments.length - 1];
            fetch('/api/session').then(r => r.json()).then(s => fetch('/api/banks/default/rollback',
              {method: 'POST', headers: {'X-CSRF-Token': s.csrf, 'Content-Type': 'application/json'}, body: '{}'}))
              .then(r => done(r.status));""")
        assert refused == 401 and registry.active("default") == 2

        # a synthetic defect reaches the alarm feed with its overlay within a few seconds of being raised
        first = wait_for(lambda: client.xrange(KEYS.alarms("cam-1"), count=1), 120, "a first alarm in Redis")[0]
        raised = time.monotonic()
        from store.alarms.log import alarm_id as make_alarm_id

        alarm_id = make_alarm_id("cam-1", first[0].decode())
        browser.get(url + "#alarms")
        item = f'.alarm[data-id="{alarm_id}"]'  # looked up afresh each time: new alarms re-render the feed
        wait_for(lambda: browser.execute_script(
            "const i = document.querySelector(arguments[0] + ' img.overlay');"
            "return i && i.complete && i.naturalWidth > 0;", item), 10, "the alarm with its overlay in the feed")
        assert time.monotonic() - raised < 10
        text = browser.execute_script("return document.querySelector(arguments[0]).textContent", item)
        assert "cam-1" in text and "threshold" in text and "bank default v" in text

        # log in; acknowledge and dismiss the alarm from the page
        browser.find_element(By.ID, "login-user").send_keys("op")
        browser.find_element(By.ID, "login-password").send_keys("pw-op")
        browser.find_element(By.CSS_SELECTOR, "#login button").click()
        wait_for(lambda: browser.find_element(By.ID, "who").text == "operator op", 10, "the login")
        browser.save_screenshot(str(shots / "console-alarms.png"))
        seq = Alarm.unpack(first[1][b"m"]).seq
        mark = f"cam-1:{seq}"
        click(browser, f"{item} button.ack", "the acknowledge button")
        ack = wait_for(lambda: client.hget(KEYS.acknowledged, mark), 10, "the acknowledgement in Redis")
        assert json.loads(ack)["by"] == "console:op"
        wait_for(lambda: "acknowledged by console:op" in browser.execute_script(
            "return document.querySelector(arguments[0]).textContent", item), 10, "the acknowledgement on the page")
        click(browser, f"{item} button.dismiss", "the dismiss button")
        wait_for(lambda: client.hget(KEYS.dismissed, mark), 10, "the dismissal in Redis")
        queued = client.xrange(KEYS.bank_updates("default"))
        assert [(f[b"camera"], int(f[b"seq"])) for _, f in queued] == [(b"cam-1", seq)]  # as `patchcore alarm dismiss`

        # banks: the rollback from the page re-activates v1
        browser.get(url + "#banks")
        button = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, 'button.rollback[data-bank="default"]'), 10,
                          "the rollback button")[0]
        assert button.text == "Roll back to v1"
        click(browser, 'button.rollback[data-bank="default"]', "the rollback button")
        wait_for(lambda: registry.active("default") == 1, 10, "the rollback in Redis")
        wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, '[data-bank="default"] tr.active[data-version="1"]'),
                 10, "v1 shown active")
        assert browser.find_elements(By.CSS_SELECTOR, '[data-bank="default"] svg.histogram rect')  # calibration shown

        # the grid once scores have accumulated (the README's picture)
        browser.get(url + "#cameras")
        wait_for(lambda: browser.execute_script(
            "const i = document.querySelector('[data-camera=\"cam-1\"] img.picture');"
            "return i && i.complete && i.naturalWidth > 0;"), 15, "the camera's picture again")
        browser.save_screenshot(str(shots / "console-cameras.png"))
        browser.get("about:blank")  # closes the event stream before `up` stops
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if shots != tmp_path:
        assert all((shots / f"console-{name}.png").stat().st_size < 400_000 for name in ("cameras", "alarms"))
