"""Drift, not a flood (store.alarms.drift): the tracker alone, its event message, its script on a real server, and
the store on a real server fed results whose scores are drawn around the threshold (the scored lines are in
tests/test_drift_line.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from prometheus_client import REGISTRY
from typer.testing import CliRunner

from contracts.keys import Keys
from contracts.messages import DriftEvent, MessageError, Result
from patchcore.cli import app
from runtime import scripts
from runtime.connection import connect
from runtime.control import read_audit
from runtime.status import collect_status
from store.alarms.drift import (ACKNOWLEDGED, DRIFTED, NORMAL, DriftError, DriftSettings, DriftTracker, acknowledge,
                                overrides_from_json, state_json, with_overrides)
from store.alarms.feed import read_alarms
from store.alarms.rules import AlarmRule
from store.service import ResultsStore, StoreSettings

from .conftest import ROOT
from .test_console import browser  # noqa: F401 - the headless browser fixture
from .test_pipeline import wait_for as pipeline_wait_for

KEYS = Keys()
GOOD, SHIFTED = 0.7, 2.0  # score / threshold of a good frame, and of any frame of a drifted scene


def line_ratios(rng: np.random.Generator, frames: int, defect_rate: float = 0.15, period: int = 4) -> np.ndarray:
    """Score / threshold of a line whose parts cross in `period` frames: good ones 0.4-0.95, defective parts (a
    seeded share) 1.2-3 on every frame they cross."""
    parts = -(-frames // period)
    defect = np.repeat(rng.random(parts) < defect_rate, period)[:frames]
    return np.where(defect, rng.uniform(1.2, 3.0, frames), rng.uniform(0.4, 0.95, frames))


def feed(tracker: DriftTracker, ratios, start: int = 0) -> list[tuple[int, dict]]:
    """Each ratio as a frame of threshold 2.0; the events with the index of the frame that decided them."""
    events = []
    for i, ratio in enumerate(ratios, start):
        events += [(i, event) for event in tracker.add(i, float(ratio) * 2.0, 2.0, "line-1", 1000.0 + i)]
    return events


# ---- the tracker --------------------------------------------------------------------------------------

def test_isolated_defects_never_raise_drift():
    tracker = DriftTracker()
    ratios = line_ratios(np.random.default_rng(7), 20_000)  # the synthetic line's defect rate, 0.15
    assert (ratios >= 1).mean() > 0.12  # plenty of defects, in runs of a part
    assert feed(tracker, ratios) == [] and tracker.status == NORMAL


def test_a_shifted_scene_raises_one_drift_after_the_stated_delay_and_its_return_clears_it():
    settings = DriftSettings()
    assert (settings.raise_delay, settings.clear_delay) == (26, 16)  # ceil(0.8 * 32), ceil(0.5 * 32)
    tracker = DriftTracker(settings)
    events = feed(tracker, [GOOD] * 40 + [SHIFTED] * 100 + [GOOD] * 60)
    assert [(i, e["kind"]) for i, e in events] == [(40 + 25, "drift"), (140 + 15, "drift-cleared")]
    raised, cleared = events[0][1], events[1][1]
    assert raised["n"] == 1 and raised["share_over"] == pytest.approx(26 / 32) and raised["quantile_ratio"] >= 1
    assert cleared["n"] == 2 and cleared["share_over"] <= 0.5 and tracker.status == NORMAL


def test_a_camera_whose_drift_policy_is_turned_off_while_drifted_is_cleared_at_once():
    """An operator's `drift set CAM --policy off` while the camera is drifted: its next frame clears the drift (one
    event, so a sink's retained drift state and a PLC's Drift coil do not stay set), and nothing more is decided."""
    import dataclasses

    tracker = DriftTracker()
    events = feed(tracker, [SHIFTED] * 40)
    assert [e["kind"] for _, e in events] == ["drift"] and tracker.status != NORMAL
    tracker.settings = dataclasses.replace(tracker.settings, policy="off")  # as the store applies an override
    events = feed(tracker, [SHIFTED] * 40)
    assert [(i, e["kind"]) for i, e in events] == [(0, "drift-cleared")] and tracker.status == NORMAL


def test_a_shift_among_defects_is_found_no_later_than_the_stated_delay():
    rng = np.random.default_rng(3)
    for trial in range(20):
        tracker = DriftTracker()
        events = feed(tracker, np.concatenate([line_ratios(rng, 64), rng.uniform(1.1, 3, 80)]))
        assert len(events) == 1 and events[0][1]["kind"] == "drift"
        assert 64 <= events[0][0] <= 64 + DriftSettings().raise_delay - 1, trial


def test_alarms_are_held_while_drifted_and_marked_under_policy_mark():
    held = DriftTracker()
    feed(held, [SHIFTED] * 32)
    assert held.status == DRIFTED and held.holding and not held.marking
    held.hold()
    held.hold()
    assert held.held == 2 and held.episode["held"] == 2
    marked = DriftTracker(DriftSettings(policy="mark"))
    feed(marked, [SHIFTED] * 32)
    assert marked.marking and not marked.holding
    off = DriftTracker(DriftSettings(policy="off"))
    assert feed(off, [SHIFTED] * 100) == [] and not off.holding


def test_an_acknowledgement_releases_the_alarms_and_no_drift_is_raised_again_until_the_scene_returns():
    tracker = DriftTracker()
    feed(tracker, [SHIFTED] * 32)
    tracker.hold()
    event = tracker.acknowledge("alice", 2000.0)
    assert event["kind"] == "drift-acknowledged" and event["by"] == "alice" and event["n"] == 2 and event["held"] == 1
    assert tracker.status == ACKNOWLEDGED and not tracker.holding
    assert feed(tracker, [SHIFTED] * 200, start=32) == []  # still shifted: acknowledged, no new drift
    with pytest.raises(DriftError, match="not drifted"):
        tracker.acknowledge("bob", 2001.0)
    events = feed(tracker, [GOOD] * 32 + [SHIFTED] * 32, start=232)
    assert [e["kind"] for _, e in events] == ["drift-cleared", "drift"]  # back, then a second episode
    assert [e["n"] for _, e in events] == [3, 4]


def test_the_tracker_survives_its_json_with_the_window():
    tracker = DriftTracker()
    feed(tracker, [GOOD] * 10 + [SHIFTED] * 30)
    text = state_json(json.dumps({"decided": 5, "frames": {}}), tracker)
    assert json.loads(text)["decided"] == 5  # the debounce window's fields are kept
    again = DriftTracker.from_state(DriftSettings(), text)
    assert again.to_dict() == tracker.to_dict()
    assert feed(again, [SHIFTED] * 2, 40) == feed(tracker, [SHIFTED] * 2, 40)


@pytest.mark.parametrize("values, error", [
    ({"window": 1}, "window"), ({"quantile": 1.5}, "quantile"), ({"level": 0}, "level"),
    ({"raise_share": 0.5, "clear_share": 0.5}, "below raise_share"), ({"policy": "drop"}, "policy"),
])
def test_bad_drift_settings_are_refused_with_the_reason(values, error):
    with pytest.raises(ValueError, match=error):
        DriftSettings(**values)


# ---- the event message --------------------------------------------------------------------------------

def test_a_drift_event_round_trips_and_bad_ones_are_refused():
    event = DriftEvent(camera="cam-1", kind="drift", n=1, seq=65, at=1.0, line="l", window=32, share_over=0.8,
                       quantile_ratio=1.9, median_ratio=2.0, threshold=2.0, held=0)
    assert DriftEvent.unpack(event.pack()) == event
    assert "DRIFT camera=cam-1 seq=65" in event.describe()
    for bad, reason in [({"kind": "flood"}, "bad kind"), ({"n": 0}, "numbered from 1"),
                        ({"share_over": 1.5}, "share_over"), ({"by": "x"}, "by comes with"),
                        ({"at": float("nan")}, "bad at"), ({"camera": ""}, "bad camera")]:
        with pytest.raises(MessageError, match=reason):
            DriftEvent.unpack(DriftEvent(**{**vars(event), **bad}).pack())
    with pytest.raises(MessageError, match="schema"):
        DriftEvent.unpack(DriftEvent(**{**vars(event), "schema": 2}).pack())


# ---- the script ---------------------------------------------------------------------------------------

def test_commit_drift_writes_each_event_once_in_order_and_only_at_the_version_read(redis_server):
    client = connect(redis_server.url)
    script = scripts.load(client, "commit_drift")
    call = dict(state="st", drift="ev", stats="stats", maxlen=100, channel="ch")
    events = [scripts.NewEvent(n, f"event-{n}".encode()) for n in (1, 2)]
    client.hset("st", mapping={"version": 3, "window": "{}"})
    assert scripts.commit_drift(script, **call, version=2, window=None, events=events) == -1  # moved on
    assert client.xlen("ev") == 0
    assert scripts.commit_drift(script, **call, version=3, window=None, events=events[:1]) == 1
    assert scripts.commit_drift(script, **call, version=3, window=None, events=events) == 1  # 1 is skipped
    assert scripts.commit_drift(script, **call, version=3, window=None, events=events) == 0  # a retry: nothing
    assert [f[b"m"] for _, f in client.xrange("ev")] == [b"event-1", b"event-2"]
    assert client.hget("stats", "drift_events") == b"2" and client.hget("st", "drift_announced") == b"2"
    third = scripts.NewEvent(3, b"event-3")
    assert scripts.commit_drift(script, **call, version=3, window='{"new": 1}', events=[third]) == 1
    assert client.hmget("st", ["version", "window"]) == [b"4", b'{"new": 1}']
    assert scripts.commit_drift(script, **call, version=3, window='{"x": 1}', events=[]) == -1
    gap = scripts.NewEvent(9, b"event-9")
    assert scripts.commit_drift(script, **call, version=4, window=None, events=[gap]) == 0  # only the next number


# ---- the store on a real server ----------------------------------------------------------------------

def result(seq: int, ratio: float, camera: str = "cam-1", threshold: float = 2.0, at: float | None = None) -> Result:
    score = ratio * threshold
    return Result(camera=camera, line="line-1", seq=seq, captured_at=1000.0 + seq if at is None else at,
                  scored_at=time.time(), score=score, threshold=threshold, anomalous=score >= threshold, bank="b",
                  bank_version=1, worker="w")


def write_results(client, ratios, start: int = 0, camera: str = "cam-1") -> None:
    client.sadd(KEYS.cameras, camera)
    for i, ratio in enumerate(ratios, start):
        client.xadd(KEYS.results(camera), {"m": result(i, float(ratio), camera).pack()})


class Store:
    """A store in a thread (cooldown 0, so every 2-of-3 window over the threshold would alarm)."""

    def __init__(self, url, drift: DriftSettings = DriftSettings(), name: str = "store-1"):
        self.stop = threading.Event()
        self.client = connect(url)
        settings = StoreSettings(name=name, default_rule=AlarmRule(k=2, n=3, cooldown_s=0), refresh_s=0.2,
                                 drift=drift)
        self.store = ResultsStore(self.client, settings, KEYS, self.stop)
        self.thread = threading.Thread(target=self.store.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self.store

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(30)


def wait_for(predicate, timeout: float = 60.0) -> None:
    pipeline_wait_for(predicate, timeout)  # tests/test_pipeline.py's, with this file's longer default


def metric(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def drift_events(client, camera: str = "cam-1") -> list[DriftEvent]:
    return [DriftEvent.unpack(f[b"m"]) for _, f in client.xrange(KEYS.drift(camera))]


def alarm_seqs(client) -> list[int]:
    return sorted(alarm.seq for alarm in read_alarms(client, KEYS)[0])


def test_the_store_raises_one_drift_holds_the_alarms_counts_them_and_clears_on_return(redis_server):
    client = connect(redis_server.url)
    normal = line_ratios(np.random.default_rng(11), 60)
    ratios = np.concatenate([normal, np.full(100, SHIFTED), line_ratios(np.random.default_rng(12), 60)])
    write_results(client, ratios)
    held_before, raised_before = metric("patchcore_alarms_held_total", camera="cam-1"), \
        metric("patchcore_drift_events_total", kind="drift")
    with Store(redis_server.url) as store:
        wait_for(lambda: store.report.results == len(ratios))
    events = drift_events(client)
    assert [e.kind for e in events] == ["drift", "drift-cleared"]
    # the store's metrics say the same (this process's registry: the store ran in a thread)
    assert metric("patchcore_alarms_held_total", camera="cam-1") - held_before == store.report.held
    assert metric("patchcore_drift_events_total", kind="drift") - raised_before == 1
    assert metric("patchcore_drift", camera="cam-1") == 0
    raised, cleared = events
    assert 60 <= raised.seq <= 60 + DriftSettings().raise_delay - 1
    assert 160 <= cleared.seq < 160 + DriftSettings().window  # the line's defects among the returned frames add a few
    seqs = alarm_seqs(client)
    # no flood: no alarm is written between the drift and its clearing; the ones the window decided are held
    assert not [s for s in seqs if raised.seq < s <= cleared.seq]
    assert store.report.held == cleared.held > 30
    # isolated defects outside the drift still alarm, each on a defective part (2 of 3 over the threshold)
    over = ratios >= 1
    outside = [s for s in seqs if s < 60 or s > cleared.seq]
    assert outside and all(over[max(0, s - 2):s + 1].sum() >= 2 for s in outside)
    status = collect_status(client)["cameras"][0]
    assert status["drift"] == {"status": "normal", "held": cleared.held, "since_seq": None, "acknowledged_by": None}
    assert status["drift_events"] == 2


def test_isolated_defects_through_the_store_give_no_drift_event(redis_server):
    client = connect(redis_server.url)
    ratios = line_ratios(np.random.default_rng(5), 400)
    write_results(client, ratios)
    with Store(redis_server.url) as store:
        wait_for(lambda: store.report.results == len(ratios))
    assert drift_events(client) == [] and store.report.held == 0
    assert len(alarm_seqs(client)) >= 10  # the defects alarm as before


def test_ack_releases_the_alarms_records_who_and_the_status_says_so(redis_server):
    client = connect(redis_server.url)
    write_results(client, np.full(60, SHIFTED))
    with Store(redis_server.url) as store:
        wait_for(lambda: store.report.results == 60)
        line = CliRunner().invoke(app, ["status", "--redis-url", redis_server.url]).output
        assert metric("patchcore_drift", camera="cam-1") == 1
        assert "DRIFT since seq 31" in line and "alarms held" in line
        acked = CliRunner().invoke(app, ["drift", "ack", "cam-1", "--by", "alice", "--redis-url", redis_server.url])
        assert acked.exit_code == 0, acked.output
        assert json.loads(acked.output)["kind"] == "drift-acknowledged"
        before = alarm_seqs(client)
        write_results(client, np.full(40, SHIFTED), start=60)  # still shifted: the alarms flow again, no new drift
        wait_for(lambda: store.report.results == 100)
    assert [(e.kind, e.by) for e in drift_events(client)] == [("drift", None), ("drift-acknowledged", "alice")]
    assert len(alarm_seqs(client)) > len(before) and min(set(alarm_seqs(client)) - set(before)) >= 60
    status = collect_status(client)["cameras"][0]["drift"]
    assert status["status"] == "acknowledged" and status["acknowledged_by"] == "alice" and status["since_seq"] == 31
    again = CliRunner().invoke(app, ["drift", "ack", "cam-1", "--redis-url", redis_server.url, "--by", "bob"])
    assert again.exit_code == 2 and "not drifted" in again.output
    listed = CliRunner().invoke(app, ["drift", "events", "--redis-url", redis_server.url]).output.splitlines()
    assert [json.loads(line)["kind"] for line in listed] == ["drift", "drift-acknowledged"]


def test_an_event_left_in_the_outbox_is_written_once_by_the_next_store(redis_server):
    """A store that committed a drift and died before writing its event: the state's outbox holds it, and the next
    store writes it once (two stores started on it write it once between them)."""
    client = connect(redis_server.url)
    tracker = DriftTracker()
    decided = feed(tracker, [SHIFTED] * 32)
    assert [e["kind"] for _, e in decided] == ["drift"]
    client.sadd(KEYS.cameras, "cam-1")
    client.xgroup_create(KEYS.results("cam-1"), "store", id="0", mkstream=True)
    client.hset(KEYS.alarm_state("cam-1"), mapping={"version": 7, "window": state_json(json.dumps({}), tracker)})
    with Store(redis_server.url, name="s1") as one, Store(redis_server.url, name="s2") as two:
        wait_for(lambda: client.xlen(KEYS.drift("cam-1")) == 1)
        time.sleep(1.0)  # both refreshed several times
    assert [e.kind for e in drift_events(client)] == ["drift"]
    assert sum(s.report.drift_events.get("drift", 0) for s in (one, two)) == 1
    assert client.hget(KEYS.camera_stats("cam-1"), "drift_events") == b"1"


def test_acknowledging_a_camera_without_drift_is_refused(redis_server):
    client = connect(redis_server.url)
    with pytest.raises(DriftError, match="no alarm state"):
        acknowledge(client, KEYS, "cam-9", "alice")
    write_results(client, [GOOD] * 40)
    with Store(redis_server.url) as store:
        wait_for(lambda: store.report.results == 40)
    with pytest.raises(DriftError, match="not drifted"):
        acknowledge(client, KEYS, "cam-1", "alice")


def test_under_policy_mark_the_alarms_are_written_marked_and_none_is_held(redis_server):
    client = connect(redis_server.url)
    write_results(client, np.full(60, SHIFTED))
    with Store(redis_server.url, drift=DriftSettings(policy="mark")) as store:
        wait_for(lambda: store.report.results == 60)
    alarms = read_alarms(client, KEYS)[0]
    assert [e.kind for e in drift_events(client)] == ["drift"] and store.report.held == 0
    # decided from the frame that raised the drift (31: the first full window) on
    assert {a.drift for a in alarms if a.seq >= 31} == {True} and {a.drift for a in alarms if a.seq < 31} == {None}
    assert [a for a in alarms if a.drift][0].describe().startswith("DRIFT-MARKED ALARM")


def test_the_console_shows_a_drift_badge_with_the_held_alarms_and_then_the_acknowledgement(browser, redis_server):
    """In the real headless browser (tests/test_console.py's): the camera card's badge and its held-alarm count."""
    from selenium.webdriver.common.by import By

    from patchcore.embedded_redis import free_port

    client = connect(redis_server.url)
    write_results(client, np.full(60, SHIFTED))
    with Store(redis_server.url) as store:
        wait_for(lambda: store.report.results == 60)
    port = free_port()
    console = subprocess.Popen([sys.executable, "-m", "patchcore", "console", "--port", str(port), "--redis-url",
                                redis_server.url], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               cwd=ROOT, env={k: v for k, v in os.environ.items() if k != "PATCHCORE_CONSOLE_CREDENTIALS"})
    try:
        assert "console at" in console.stdout.readline()
        browser.get(f"http://127.0.0.1:{port}/")

        def badge() -> tuple[str, str] | None:  # read in one script: the live grid re-renders every second
            return browser.execute_script(
                "const c = document.querySelector('[data-camera=\"cam-1\"]'); if (!c) return null;"
                "const b = c.querySelector('.drift'); return [b.hidden ? '' : b.textContent,"
                " c.querySelector('[data-stat=\"alarms held\"]').textContent];")

        wait_for(lambda: badge() == ["DRIFT", str(store.report.held)], 60)
        assert store.report.held > 0
        title = browser.find_element(By.CSS_SELECTOR, '[data-camera="cam-1"] .drift').get_attribute("title")
        assert "frame 31" in title and "patchcore drift ack cam-1" in title
        acknowledge(client, KEYS, "cam-1", "alice")
        wait_for(lambda: badge() == ["drift acknowledged", str(store.report.held)], 30)
    finally:
        console.terminate()
        console.wait(timeout=30)


@pytest.mark.cluster
def test_on_a_redis_cluster_each_camera_on_every_master_raises_one_drift_and_is_acknowledged(redis_cluster):
    """Every key a drift write touches is the camera's (one slot): the store's commit, its event and the
    acknowledgement run on each master."""
    from .cluster import spread_cameras

    redis_cluster.wait_ok()
    redis_cluster.flush()
    client = connect(redis_cluster.url)
    cameras = spread_cameras(redis_cluster, KEYS, per_master=1)
    for camera in cameras:
        write_results(client, [GOOD] * 8 + [SHIFTED] * 40, camera=camera)
    with Store(redis_cluster.url) as store:
        wait_for(lambda: store.report.results == 48 * len(cameras))
        for camera in cameras:
            assert acknowledge(client, KEYS, camera, "alice")["kind"] == "drift-acknowledged"
    for camera in cameras:
        assert [(e.kind, e.by) for e in drift_events(client, camera)] == [("drift", None), ("drift-acknowledged", "alice")]
        assert 8 <= drift_events(client, camera)[0].seq < 8 + DriftSettings().raise_delay


def printed(result) -> list[dict]:
    """The command's JSON lines (each with "camera"): the store thread's log lines may share the captured output."""
    rows = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    return [row for row in rows if "camera" in row and "overrides" in row]


def test_a_cameras_own_drift_settings_apply_live_merge_and_go_when_deleted(redis_server):
    """`patchcore drift set` while a store runs: its next results are tracked with the camera's window (drift raised
    as the 8-frame window fills, not the default 32-frame one) or policy (off: no drift, the alarms flow); the other
    cameras keep the store's settings; a bad stored override is refused and the store's settings apply."""
    client = connect(redis_server.url)
    runner = CliRunner()
    url = ["--redis-url", redis_server.url]
    client.hset(KEYS.drift_settings, "cam-4", json.dumps({"window": 1}))  # written past the CLI: refused
    with Store(redis_server.url) as store:
        short = runner.invoke(app, ["drift", "set", "cam-1", "--window", "8", *url])
        assert short.exit_code == 0, short.output
        assert printed(short) == [{"camera": "cam-1", "overrides": {"window": 8}, "deleted": False}]
        assert runner.invoke(app, ["drift", "set", "cam-3", "--policy", "off", *url]).exit_code == 0
        wait_for(lambda: store.drift_for("cam-1").window == 8 and store.drift_for("cam-3").policy == "off")
        assert store.drift_for("cam-2") == store.drift_for("cam-4") == DriftSettings()
        for camera in ("cam-1", "cam-2", "cam-3"):
            write_results(client, np.full(40, SHIFTED), camera=camera)
        wait_for(lambda: store.report.results == 120)
    (one,), (two,) = drift_events(client, "cam-1"), drift_events(client, "cam-2")
    assert (one.kind, one.seq, one.window) == ("drift", 7, 8)  # every frame shifted: raised once 8 frames are in
    assert (two.kind, two.seq, two.window) == ("drift", 31, 32)
    assert drift_events(client, "cam-3") == []
    alarms = {camera: [a.seq for a in read_alarms(client, KEYS)[0] if a.camera == camera]
              for camera in ("cam-1", "cam-2", "cam-3")}
    assert max(alarms["cam-1"]) <= 7 and max(alarms["cam-2"]) <= 31  # held from the drift on
    assert max(alarms["cam-3"]) == 39  # policy off: every 2-of-3 window alarms
    # the options given are merged into the camera's overrides; --delete drops them; each change is audited
    merged = runner.invoke(app, ["drift", "set", "cam-1", "--level", "1.5", *url])
    assert printed(merged)[0]["overrides"] == {"level": 1.5, "window": 8}
    assert runner.invoke(app, ["drift", "set", "cam-3", "--delete", *url]).exit_code == 0
    listed = printed(runner.invoke(app, ["drift", "settings", *url]))
    assert [row["camera"] for row in listed] == ["cam-1", "cam-4"]
    assert listed[0]["overrides"] == {"level": 1.5, "window": 8} and "refused" not in listed[0]["overrides"]
    audit = [(e.action, e.target) for e in read_audit(client, KEYS).entries]
    assert audit == [("drift.set", "cam-1"), ("drift.set", "cam-3"), ("drift.set", "cam-1"), ("drift.delete", "cam-3")]
    for args, message in ((["cam-1", "--clear-share", "0.9"], "clear_share (0.9) must be below raise_share (0.8)"),
                          (["cam-1", "--window", "1"], "drift window must be an integer in [2, 1000]"),
                          (["cam-1", "--policy", "loud"], "drift policy must be one of"),
                          (["cam-1"], "give the settings to change, or --delete"),
                          (["cam-1", "--window", "8", "--delete"], "give the settings to change, or --delete"),
                          (["{cam}", "--window", "8"], "braces are not allowed")):
        refused = runner.invoke(app, ["drift", "set", *args, *url])
        assert refused.exit_code == 2 and message in refused.output, (args, refused.output)
    assert json.loads(client.hget(KEYS.drift_settings, "cam-1")) == {"level": 1.5, "window": 8}  # unchanged


def test_the_overrides_are_checked_against_the_store_that_applies_them():
    base = DriftSettings(raise_share=0.6, clear_share=0.3)
    assert with_overrides(base, overrides_from_json('{"window": 16}')) == DriftSettings(window=16, raise_share=0.6,
                                                                                         clear_share=0.3)
    with pytest.raises(ValueError, match="must be below raise_share"):
        with_overrides(base, overrides_from_json('{"clear_share": 0.7}'))  # fine with the defaults' 0.8, not here
    for text, message in (('[1]', "not a JSON object"), ('{"windw": 3}', "unknown fields"), ("{", "not JSON"),
                          ('{"window": "8"}', "must be an integer")):
        with pytest.raises(ValueError, match=message):
            with_overrides(base, overrides_from_json(text))
