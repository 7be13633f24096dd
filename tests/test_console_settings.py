"""The console's per-camera settings (issue 18 item 5): the settings API (operators with the CSRF token write through
runtime.control, audited as console:<operator>; bad values write nothing), the sensitivity slider and the region
editor in a real headless browser against a real `patchcore console` process, the sink health table, and a running
worker picking up a factor the console set. Real redis-server throughout."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from console.auth import hash_password
from contracts.keys import Keys
from patchcore.cli import app
from patchcore.embedded_redis import free_port
from runtime.connection import connect
from contracts.control import CameraSettings
from runtime.control import CameraControl, read_audit

from .conftest import ROOT
from .test_acl_roles import acl_server, redis7  # noqa: F401 - acl_server: the fixture
from .test_console import Http, browser, click, read_lines, wait_for  # noqa: F401 - browser: the fixture
from .test_pipeline import Running, ingest, results

KEYS = Keys()
FRAME = (320, 240)  # width, height of the synthetic line's frames (the preview the editor draws on)


def registered_camera(url: str, frames: int = 2) -> None:
    """cam-1 registered with a preview of its latest frame, as its ingest leaves them."""
    ingest(url, frames, encoding="jpeg")


def audit_of(client, camera: str = "cam-1") -> list[tuple[str, str]]:
    return [(e.who, e.action) for e in read_audit(client, KEYS, camera).entries]


def test_the_settings_api_writes_only_for_an_operator_and_refuses_bad_values_whole(redis_server):
    from console.app import ConsoleServer, ConsoleSettings

    client = connect(redis_server.url)
    registered_camera(redis_server.url)
    settings = ConsoleSettings(port=free_port(), credentials={"op": hash_password("pw")}, interval_s=0.2)
    server = ConsoleServer(client, KEYS, settings).start()
    control = CameraControl(client, KEYS)
    try:
        http = Http(settings.url.rstrip("/"))
        status, shown = http.call("/api/cameras/cam-1/settings")  # a viewer reads
        assert status == 200 and shown["settings"] is None and shown["frame"] == {"width": FRAME[0], "height": FRAME[1]}
        assert http.call("/api/cameras/cam-9/settings")[0] == 404

        def nothing_written():
            return control.get("cam-1") is None and client.get(KEYS.camera_settings_version) is None \
                and not client.exists(KEYS.audit)

        anonymous = http.call("/api/session")[1]["csrf"]
        assert http.call("/api/cameras/cam-1/settings", {"threshold_factor": 1.5}, anonymous)[0] == 401  # logged out
        csrf = http.login("op", "pw")
        assert http.call("/api/cameras/cam-1/settings", {"threshold_factor": 1.5})[0] == 403  # no CSRF token
        assert http.call("/api/cameras/cam-1/settings", {"threshold_factor": 1.5}, anonymous)[0] == 403  # a stale one
        assert nothing_written()

        bad = [{"threshold_factor": float("nan")}, {"threshold": float("inf")}, {"threshold_offset": float("-inf")},
               {"threshold_factor": 0}, {"threshold_factor": True}, {"threshold_factor": "1.2"},
               {"roi_polygon": [[10, 10], [20, 20]]}, {"roi_polygon": [[0, 0], [FRAME[0] + 1, 0], [0, 100]]},
               {"roi_polygon": [[0, 0], [10, -1], [5, 5]]}, {"roi_polygon": [[0, 0], [10, 0], [5]]},
               {"roi_polygon": "0,0;10,0;5,5"}, {"colour": 1}, {}, {"reset": True, "threshold": 1.0},
               {"reset": "sensitivity", "threshold_factor": 2.0}, {"reset": "everything"}, [1, 2],
               {"threshold": 10 ** 400}, {"roi_polygon": [[0, 0], [10 ** 400, 0], [5, 5]]}]  # beyond a float
        for body in bad:
            status, answer = http.call("/api/cameras/cam-1/settings", body, csrf)
            assert status == 400 and answer["error"], (body, status, answer)
        assert http.call("/api/cameras/cam-9/settings", {"threshold_factor": 1.5}, csrf)[0] == 400  # unknown camera
        assert http.call("/api/cameras/cam%7B1%7D/settings", {"threshold_factor": 1.5}, csrf)[0] == 400  # no name
        assert nothing_written()

        status, done = http.call("/api/cameras/cam-1/settings", {"threshold_factor": 1.5}, csrf)
        assert status == 200 and done["settings"]["threshold_factor"] == 1.5 and done["settings"]["set_by"] == "console:op"
        square = [[10.5, 20], [FRAME[0], 20], [FRAME[0], FRAME[1]], [10.5, FRAME[1]]]  # the frame's edges are on it
        status, done = http.call("/api/cameras/cam-1/settings", {"roi_polygon": square}, csrf)
        assert status == 200 and done["settings"]["roi_polygon"] == square and done["settings"]["threshold_factor"] == 1.5
        stored = control.get("cam-1")
        assert stored.roi_polygon == tuple(map(tuple, square)) and stored.threshold_factor == 1.5
        status, done = http.call("/api/cameras/cam-1/settings", {"reset": "roi"}, csrf)
        assert status == 200 and done["settings"]["roi_polygon"] is None and control.get("cam-1").threshold_factor == 1.5
        status, done = http.call("/api/cameras/cam-1/settings", {"reset": True}, csrf)
        assert status == 200 and done["settings"] is None and control.get("cam-1") is None
        assert audit_of(client) == [("console:op", "camera.set")] * 3 + [("console:op", "camera.reset")]
    finally:
        server.stop()


def test_slider_region_editor_and_sink_health_in_a_browser(browser, redis_server, tmp_path):
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys as Key

    client = connect(redis_server.url)
    registered_camera(redis_server.url)
    error = '<img src=x onerror="document.title=1"> 503 from hooks.example'
    client.hset(KEYS.sink_health, "hook/s-1", json.dumps({  # the fields sinks/service.py writes every second
        "sink": "hook", "consumer": "s-1", "destination": "https://hooks.example/alarms", "state": "retrying",
        "pending": 7, "delivered": 40, "deadlettered": 1, "failures": 3, "trimmed": 0, "last_error": error,
        "failing_since_s": 12.5, "at": time.time()}))
    credentials = tmp_path / "operators"
    credentials.write_text(f"op:{hash_password('pw-op')}\n")
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "patchcore", "console", "--port", str(port), "--redis-url",
                                redis_server.url], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               cwd=ROOT, env={**os.environ, "PATCHCORE_CONSOLE_CREDENTIALS": str(credentials)})
    lines = read_lines(process)
    try:
        assert "operators can log in" in lines.get(timeout=60)
        url = f"http://127.0.0.1:{port}/"
        browser.get(url)
        wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, '[data-camera="cam-1"] button.open-settings'), 30,
                 "the camera card")

        # the sink health row, its error shown as text (no element made of it)
        row = '#sink-table tr[data-sink="hook/s-1"]'
        wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, row), 10, "the sink health row")
        cells = browser.execute_script(
            "return [...document.querySelectorAll(arguments[0] + ' td')].map(td => td.textContent)", row)
        assert cells[:9] == ["hook", "s-1", "https://hooks.example/alarms", "retrying", "7", "40", "1", "3", error]
        assert not browser.find_elements(By.CSS_SELECTOR, "#sink-table img") and browser.title != "1"

        # a viewer sees the settings read-only, and the server refuses its POST
        click(browser, '[data-camera="cam-1"] button.open-settings', "the settings button")
        wait_for(lambda: browser.find_element(By.ID, "camera-panel").is_displayed(), 10, "the settings panel")
        assert not browser.find_element(By.ID, "factor").is_enabled()
        assert not browser.find_element(By.ID, "factor-save").is_displayed()
        refused = browser.execute_async_script("""
            const done = arguments[arguments.length - 1];
            fetch('/api/session').then(r => r.json()).then(s => fetch('/api/cameras/cam-1/settings',
              {method: 'POST', headers: {'X-CSRF-Token': s.csrf, 'Content-Type': 'application/json'},
               body: '{"threshold_factor": 2}'})).then(r => done(r.status));""")
        assert refused == 401 and CameraControl(client, KEYS).get("cam-1") is None

        browser.find_element(By.ID, "login-user").send_keys("op")
        browser.find_element(By.ID, "login-password").send_keys("pw-op")
        browser.find_element(By.CSS_SELECTOR, "#login button").click()
        wait_for(lambda: browser.find_element(By.ID, "who").text == "operator op", 10, "the login")
        slider = browser.find_element(By.ID, "factor")
        assert slider.is_enabled() and browser.find_element(By.ID, "factor-save").is_displayed()

        # the slider: four steps of 0.05 up from 1, saved
        slider.send_keys(Key.ARROW_RIGHT * 4)
        assert browser.find_element(By.ID, "factor-value").text == "1.20"
        click(browser, "#factor-save", "save factor")
        wait_for(lambda: CameraControl(client, KEYS).get("cam-1"), 10, "the factor in Redis")
        shown = CliRunner().invoke(app, ["camera", "show", "cam-1", "--redis-url", redis_server.url])
        assert shown.exit_code == 0, shown.output
        assert json.loads(shown.output)["threshold_factor"] == pytest.approx(1.2)
        assert audit_of(client) == [("console:op", "camera.set")]
        assert read_audit(client, KEYS, "cam-1").entries[-1].to_dict()["after"]["threshold_factor"] == pytest.approx(1.2)

        # the region editor: four clicks on the frame, saved as the frame's pixels
        frame = browser.find_element(By.ID, "roi-frame")
        wait_for(lambda: browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", frame),
                 10, "the frame in the editor")
        box = browser.execute_script("arguments[0].scrollIntoView(); const r = arguments[0].getBoundingClientRect();"
                                     "return [r.left, r.top, r.width, r.height, arguments[0].naturalWidth,"
                                     " arguments[0].naturalHeight]", frame)
        left, top, width, height, natural_w, natural_h = box
        assert (natural_w, natural_h) == FRAME and width >= natural_w / 2  # shown large enough for 1-pixel clicks
        # clicks at whole viewport pixels (what a mouse gives); expected: the same spot in the frame's pixels
        clicks = [(round(left + width * fx), round(top + height * fy)) for fx, fy in ((0.1, 0.1), (0.9, 0.15),
                                                                                     (0.8, 0.9), (0.2, 0.8))]
        for x, y in clicks:
            actions = ActionBuilder(browser)
            actions.pointer_action.move_to_location(x, y).click()
            actions.perform()
        wait_for(lambda: len(browser.find_elements(By.CSS_SELECTOR, "#roi-svg circle.vertex")) == 4, 5, "4 vertices")
        click(browser, "#roi-save", "save region")
        wait_for(lambda: CameraControl(client, KEYS).get("cam-1").roi_polygon, 10, "the polygon in Redis")
        stored = CameraControl(client, KEYS).get("cam-1")
        expected = [((x - left) * natural_w / width, (y - top) * natural_h / height) for x, y in clicks]
        assert len(stored.roi_polygon) == 4 and stored.threshold_factor == pytest.approx(1.2)
        for (sx, sy), (ex, ey) in zip(stored.roi_polygon, expected):
            assert abs(sx - ex) <= 1 and abs(sy - ey) <= 1, (stored.roi_polygon, expected)
        wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#roi-svg polygon.stored"), 5, "the stored region shown")
        shots = ROOT / "docs" if os.environ.get("PATCHCORE_CONSOLE_SCREENSHOTS") else tmp_path
        browser.execute_script("document.getElementById('camera-panel').scrollIntoView()")
        browser.save_screenshot(str(shots / "console-settings.png"))
        assert audit_of(client) == [("console:op", "camera.set")] * 2
        browser.get("about:blank")
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_a_factor_set_in_the_console_reaches_a_running_worker(redis_server, synthetic_bank_bytes):
    from console.app import ConsoleServer, ConsoleSettings
    from scorer import bank_from_bytes
    from scorer.evaluate import bank_summary
    from workers.banks.registry import BankRegistry

    client = connect(redis_server.url)
    bank = bank_from_bytes(synthetic_bank_bytes)
    BankRegistry(client, KEYS).publish("default", synthetic_bank_bytes, bank_summary(bank), activate=True)
    calibrated = bank.calibration.threshold
    assert calibrated > 0
    settings = ConsoleSettings(port=free_port(), credentials={"op": hash_password("pw")}, interval_s=0.2)
    server = ConsoleServer(client, KEYS, settings).start()
    try:
        http = Http(settings.url.rstrip("/"))
        with Running(redis_server.url, device="cpu"):
            ingest(redis_server.url, 3, encoding="jpeg")
            wait_for(lambda: client.hget(KEYS.latest("cam-1"), "seq") == b"2", 120, "the first results stored")
            shown = http.call("/api/cameras/cam-1/settings")[1]
            assert shown["bank"] == "default" and shown["bank_threshold"] == pytest.approx(calibrated)
            assert shown["effective_threshold"] == pytest.approx(calibrated)
            before = results(client)
            assert [r.threshold for r in before] == pytest.approx([calibrated] * 3)
            factor = 1e-3  # every frame anomalous from now on
            status, done = http.call("/api/cameras/cam-1/settings", {"threshold_factor": factor}, http.login("op", "pw"))
            assert status == 200 and done["effective_threshold"] == pytest.approx(calibrated * factor)
            ingest(redis_server.url, 3, encoding="jpeg")
            wait_for(lambda: len(results(client)) == 6, 120, "the next results")
        after = results(client)[3:]
        version = done["settings"]["version"]
        assert all(r.settings_version == version and r.threshold == pytest.approx(calibrated * factor) and r.anomalous
                   for r in after), after
    finally:
        server.stop()


def test_the_preview_is_the_frame_as_sent_so_polygons_are_in_the_workers_pixels(redis_server):
    import cv2
    import numpy as np

    from console.data import ConsoleData

    client = connect(redis_server.url)
    for camera, encoding in (("cam-raw", "raw"), ("cam-jpeg", "jpeg")):
        ingest(redis_server.url, 1, camera=camera, encoding=encoding, max_side=160)  # 320x240 frames sent at 160x120
        preview = cv2.imdecode(np.frombuffer(client.get(KEYS.preview(camera)), np.uint8), cv2.IMREAD_COLOR)
        assert preview.shape == (120, 160, 3), camera
        assert ConsoleData(client, KEYS).frame_size(camera) == (160, 120)


@pytest.mark.skipif(redis7() is None, reason="the ACL file needs redis-server >= 7.0")
def test_a_console_on_the_viewer_role_reads_settings_but_cannot_write_them(acl_server):
    from console.app import ConsoleServer, ConsoleSettings

    operator = acl_server.client("operator")  # the ACL roles of deploy/redis, cam-1 registered by the operator
    CameraControl(operator, KEYS).set(CameraSettings("cam-1", threshold_factor=1.1))
    settings = ConsoleSettings(port=free_port(), credentials={"op": hash_password("pw")}, interval_s=0.2)
    server = ConsoleServer(acl_server.client("viewer"), KEYS, settings).start()
    try:
        http = Http(settings.url.rstrip("/"))
        status, shown = http.call("/api/cameras/cam-1/settings")
        assert status == 200 and shown["settings"]["threshold_factor"] == 1.1
        status, answer = http.call("/api/cameras/cam-1/settings", {"threshold_factor": 2.0}, http.login("op", "pw"))
        assert status == 403 and answer["error"]
    finally:
        server.stop()
    assert CameraControl(operator, KEYS).get("cam-1").threshold_factor == 1.1
    assert audit_of(operator) == [("operator", "camera.set")]


def test_concurrent_read_modify_writes_lose_no_change(redis_server):
    """The console and the CLI change some fields on top of the stored ones: twelve writers each adding 1 to the
    offset at once end at 12 (a lost update would end lower), each with its own version and audit entry (the entries
    in the order their writers got to append them)."""
    import threading

    from contracts.control import changed_settings

    def add_one() -> None:
        CameraControl(connect(redis_server.url), KEYS).update("cam-1", lambda base: changed_settings(
            "cam-1", base, {"threshold_offset": (base.threshold_offset or 0.0) + 1.0}), who="console:op")

    CameraControl(connect(redis_server.url), KEYS).set(CameraSettings("cam-1", threshold_factor=1.5))
    errors = []
    threads = [threading.Thread(target=lambda: errors.append(_error_of(add_one))) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [None] * 12
    client = connect(redis_server.url)
    stored = CameraControl(client, KEYS).get("cam-1")
    assert stored.threshold_offset == 12.0 and stored.threshold_factor == 1.5 and stored.version == 13
    afters = [e.to_dict()["after"] for e in read_audit(client, KEYS, "cam-1").entries[1:]]  # appended after each write
    assert {a["version"]: a["threshold_offset"] for a in afters} == {v: v - 1.0 for v in range(2, 14)}


def _error_of(call):
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - reported by the test
        return exc
    return None
