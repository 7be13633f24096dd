"""Metrics, health and readiness of real processes on a real Redis; `patchcore status` marks and prunes
dead consumers. Every metric is checked against what Redis itself holds."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import cv2
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from runtime.connection import connect
from contracts.keys import FRAME_GROUP, Keys
from contracts.messages import Alarm, Result
from workers.banks.registry import BankRegistry
from runtime.status import collect_status, prune_dead
from ingest.camera import CameraIngest, IngestSettings
from ingest.sources import SyntheticLine
from patchcore.cli import app
from workers.worker import Worker, WorkerSettings

KEYS = Keys()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def samples(port: int) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of one scrape."""
    status, text = get(port, "/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def wait_for(predicate, timeout=180.0, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if predicate():
                return
        except (urllib.error.URLError, ConnectionError):  # the server is not up yet
            pass
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def spawn(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "patchcore", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def test_processes_serve_metrics_that_match_redis_and_readiness_follows_the_bank(redis_server, synthetic_bank_bytes,
                                                                                tmp_path):
    url, camera, frames = redis_server.url, "cam-m", 12
    client = connect(url)
    line = SyntheticLine(seed=3)
    folder = tmp_path / "frames"
    folder.mkdir()
    for seq in range(frames):  # parts 1 and 2 (frames 4-11) defective: two alarms' worth of anomalous frames
        cv2.imwrite(str(folder / f"{seq:03d}.png"), line.render(seq, defect=4 <= seq < 12))
    ports = {"worker": free_port(), "store": free_port(), "ingest": free_port()}
    procs = [spawn("worker", "--redis-url", url, "--device", "cpu", "--name", "w-m", "--metrics-port",
                   str(ports["worker"])),
             spawn("store", "--redis-url", url, "--k", "2", "--n", "3", "--cooldown-s", "0", "--metrics-port",
                   str(ports["store"]))]
    try:
        wait_for(lambda: get(ports["worker"], "/healthz")[0] == 200, what="worker /healthz")
        assert json.loads(get(ports["worker"], "/healthz")[1])["redis"] == "ok"
        status, body = get(ports["worker"], "/readyz")
        assert status == 503 and json.loads(body)["banks"] == {}  # no bank yet: not ready
        # a folder source waits while its stream is full; no bank, so the worker holds what it took: 4 frames in
        procs.append(spawn("ingest", "--redis-url", url, "--source", str(folder), "--camera", camera, "--maxlen", "4",
                           "--metrics-port", str(ports["ingest"])))
        wait_for(lambda: int(client.hget(KEYS.camera_stats(camera), "ingested") or 0) >= 4, what="4 frames in")
        time.sleep(1.0)  # nothing moves while no bank is active
        assert get(ports["ingest"], "/readyz")[0] == 200
        ingested = int(client.hget(KEYS.camera_stats(camera), "ingested"))
        assert samples(ports["ingest"])[("patchcore_frames_ingested_total", (("camera", camera),))] == ingested == 4
        assert samples(ports["ingest"])[("patchcore_frames_dropped_total", (("camera", camera),))] == 0  # a series
        wait_for(lambda: samples(ports["worker"]).get(("patchcore_consumer_lag", (("camera", camera),))) == 4,
                 what="lag of 4")
        assert client.xlen(KEYS.frames(camera)) == 4
        assert get(ports["worker"], "/readyz")[0] == 503
        client.xadd(KEYS.frames(camera), {"m": b"\xc1 not msgpack"})  # one malformed frame: dead-lettered

        BankRegistry(client, KEYS).publish("default", synthetic_bank_bytes, activate=True)
        wait_for(lambda: get(ports["worker"], "/readyz")[0] == 200, what="worker ready")
        ready = json.loads(get(ports["worker"], "/readyz")[1])
        assert ready["banks"] == {"default": 1} and ready["frame_streams"] == 1
        wait_for(lambda: int(client.hget(KEYS.camera_stats(camera), "results") or 0) == frames, what="every result")
        wait_for(lambda: procs[2].poll() is not None, what="ingest to finish")
        wait_for(lambda: client.xpending(KEYS.results(camera), "store")["pending"] == 0
                 and client.xinfo_groups(KEYS.results(camera))[0]["lag"] == 0, what="store to catch up")
        assert get(ports["store"], "/readyz")[0] == 200

        results = [Result.unpack(f[b"m"]) for _, f in client.xrange(KEYS.results(camera))]
        anomalous = sum(r.anomalous for r in results)
        assert len(results) == frames and 0 < anomalous < frames
        worker = samples(ports["worker"])
        assert worker[("patchcore_results_total", (("camera", camera), ("verdict", "anomalous")))] == anomalous
        assert worker[("patchcore_results_total", (("camera", camera), ("verdict", "normal")))] == frames - anomalous
        for stage in ("queue", "decode", "score", "write"):
            assert worker[("patchcore_stage_seconds_count", (("stage", stage),))] == frames
        assert worker[("patchcore_end_to_end_latency_seconds_count", ())] == frames
        batches = worker[("patchcore_batch_size_count", ())]
        assert 1 <= batches and worker[("patchcore_batch_size_sum", ())] >= frames + 1  # each taken frame, once or more
        assert worker[("patchcore_deadlettered_total", (("reason", "malformed"),))] == client.xlen(KEYS.deadletter(camera)) == 1
        assert worker[("patchcore_bank_version", (("bank", "default"),))] == 1
        assert worker[("patchcore_consumer_lag", (("camera", camera),))] == client.xlen(KEYS.frames(camera)) == 0
        alarms = [Alarm.unpack(f[b"m"]) for _, f in client.xrange(KEYS.alarms(camera))]
        assert alarms and samples(ports["store"])[("patchcore_alarms_total", (("camera", camera),))] == len(alarms)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    assert get_refused(ports["worker"])  # the endpoints end with the process


def test_a_fresh_process_serves_its_known_counters_at_zero(redis_server):
    """A labelled counter has no series until its first increment unless started at 0: a `rate()` alert on the
    first dead letter (or alarm) needs the series before it. A fresh store, with one camera known and no result."""
    from runtime.metrics import DEADLETTER_REASONS, REASON_KINDS

    client = connect(redis_server.url)
    client.sadd(KEYS.cameras, "cam-z")
    port = free_port()
    store = spawn("store", "--redis-url", redis_server.url, "--metrics-port", str(port))
    try:
        wait_for(lambda: get(port, "/readyz")[0] == 200, 60, what="store ready")  # its group joined: camera known
        scraped = samples(port)
    finally:
        store.terminate()
        store.wait(timeout=30)
    reasons = {dict(labels)["reason"]: value for (name, labels), value in scraped.items()
               if name == "patchcore_deadlettered_total"}
    assert set(reasons) == {kind for kind, _ in REASON_KINDS} | {"other", "bad_result"} == set(DEADLETTER_REASONS)
    assert set(reasons.values()) == {0.0}
    assert scraped[("patchcore_alarms_total", (("camera", "cam-z"),))] == 0
    assert client.xlen(KEYS.deadletter("cam-z")) == 0 and client.xlen(KEYS.alarms("cam-z")) == 0


def test_both_verdicts_of_a_camera_are_served_from_its_first_result():
    from prometheus_client.registry import REGISTRY

    from runtime.metrics import results_written

    def value(verdict: str) -> float | None:
        return REGISTRY.get_sample_value("patchcore_results_total", {"camera": "cam-verdicts", "verdict": verdict})

    assert value("normal") is None and value("anomalous") is None  # no series before the camera is known
    now = time.time()
    results_written([("cam-verdicts", False, now - 1, now - 0.5, 0.01)] * 3, 0.02, 0.001, now)
    assert value("normal") == 3 and value("anomalous") == 0  # the anomalous series exists before its first result


def get_refused(port: int) -> bool:
    try:
        get(port, "/healthz")
    except (urllib.error.URLError, ConnectionError):
        return True
    return False


def test_healthz_says_503_when_redis_is_gone(redis_server):
    from runtime.health import serve_process

    client = connect(redis_server.url)
    server = serve_process(free_port(), client, lambda: (True, {}))
    try:
        assert get(server.server_port, "/healthz")[0] == 200
        redis_server.stop()
        status, body = get(server.server_port, "/healthz")
        assert status == 503 and "redis" in json.loads(body)
    finally:
        server.shutdown()
        server.server_close()


def test_is_ready_follows_readyz_and_a_closed_port():
    """runtime.health.is_ready, the one client of /readyz the bench scripts wait on: True for a 200, False for a
    503 and for a port nobody serves."""
    from runtime.health import is_ready, serve

    state = {"ready": False}
    server = serve(free_port(), lambda: (True, {}), lambda: (state["ready"], {}), host="127.0.0.1")
    try:
        assert get(server.server_port, "/readyz")[0] == 503 and not is_ready(server.server_port)
        state["ready"] = True
        assert get(server.server_port, "/readyz")[0] == 200 and is_ready(server.server_port)
    finally:
        server.shutdown()
        server.server_close()
    assert not is_ready(server.server_port, timeout_s=2)  # closed now: refused


def run_worker(url: str, name: str, seconds: float) -> Worker:
    stop = threading.Event()
    worker = Worker(connect(url), WorkerSettings(name=name, refresh_s=0.2, claim_idle_ms=600_000, device="cpu"),
                    KEYS, stop)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    time.sleep(seconds)
    stop.set()
    thread.join(timeout=30)
    return worker


def test_status_marks_stopped_workers_dead_and_prunes_only_those_without_pending_frames(redis_server):
    url = redis_server.url
    client = connect(url)
    client.sadd(KEYS.cameras, "cam-1")
    client.xadd(KEYS.frames("cam-1"), {"m": b"not a frame"})
    run_worker(url, "idle-1", 1.5)  # dead-lettered that one (a consumer with nothing pending), stopped
    CameraIngest(client, SyntheticLine(max_frames=3), IngestSettings(camera="cam-1"), KEYS).run()
    run_worker(url, "holder", 2.0)  # no bank published: took the 3 frames and holds them pending, stopped
    pending = client.xpending(KEYS.frames("cam-1"), FRAME_GROUP)
    assert pending["consumers"] == [{"name": b"holder", "pending": 3}]
    stop = threading.Event()
    alive = Worker(connect(url), WorkerSettings(name="alive", refresh_s=0.2, claim_idle_ms=600_000, device="cpu"),
                   KEYS, stop)
    thread = threading.Thread(target=alive.run, daemon=True)
    thread.start()
    try:
        CameraIngest(client, SyntheticLine(max_frames=2), IngestSettings(camera="cam-1"), KEYS).run()
        wait_for(lambda: client.xpending(KEYS.frames("cam-1"), FRAME_GROUP)["pending"] == 5, what="alive holds 2")
        time.sleep(2.5)  # alive keeps its held frames fresh and beats; the two stopped workers fall silent
        rows = {row["name"]: row for row in collect_status(client, dead_after_s=2.0)["consumers"]}
        assert {name: (row["dead"], row["pending"]) for name, row in rows.items()} == {
            "idle-1": (True, 0), "holder": (True, 3), "alive": (False, 2)}
        shown = CliRunner().invoke(app, ["status", "--dead-after-s", "2", "--redis-url", url])
        assert shown.exit_code == 0, shown.output
        lines = {line.split(":")[0]: line for line in shown.output.splitlines() if line.startswith("consumer ")}
        assert lines["consumer workers/holder"].endswith("pending 3  DEAD")
        assert lines["consumer workers/idle-1"].endswith("pending 0  DEAD")
        assert lines["consumer workers/alive"].endswith("pending 2")

        assert prune_dead(client, after_s=2.0) == ["workers/idle-1"]
        names = {c["name"] for c in client.xinfo_consumers(KEYS.frames("cam-1"), FRAME_GROUP)}
        assert names == {b"holder", b"alive"}  # the holder's frames stay pending, for `alive` to reclaim
        assert client.hget(KEYS.workers, "idle-1") is None
        assert client.xpending(KEYS.frames("cam-1"), FRAME_GROUP)["pending"] == 5
    finally:
        stop.set()
        thread.join(timeout=30)


def test_status_shows_lag_and_dead_letters_by_reason(redis_server):
    from runtime.deadletter import DeadLetters

    client = connect(redis_server.url)
    CameraIngest(client, SyntheticLine(max_frames=5), IngestSettings(camera="cam-1"), KEYS).run()
    stream = KEYS.frames("cam-1")
    client.xgroup_create(stream, FRAME_GROUP, id="0")
    taken = client.xreadgroup(FRAME_GROUP, "w", {stream: ">"}, count=3)[0][1]
    letters = DeadLetters(client, KEYS)
    letters.add(stream, FRAME_GROUP, taken[0][0], taken[0][1][b"m"], "poison: delivered 6 times without an outcome", "w")
    letters.add(stream, FRAME_GROUP, taken[1][0], taken[1][1][b"m"], "not a decodable PNG/JPEG/BMP image", "w")
    status = collect_status(client)
    # 2 never delivered + 1 pending; the dead-lettered two are gone from the stream
    assert status["cameras"][0]["lag"] == 3 == client.xlen(stream)
    assert status["deadletter_reasons"] == {"poison": 1, "undecodable": 1}
    shown = CliRunner().invoke(app, ["status", "--redis-url", redis_server.url])
    assert "lag 3" in shown.output and "dead letters: poison 1  undecodable 1" in shown.output


def test_dead_letter_reasons_fall_into_a_few_kinds():
    """The worker's real reasons (from the real checks) map to the bounded `reason` label."""
    import numpy as np
    import pytest

    from contracts.messages import Frame, MessageError
    from runtime.metrics import reason_kind
    from contracts.framecodec import FrameDecodeError, decode_frame

    def reason(call) -> str:
        with pytest.raises((MessageError, FrameDecodeError)) as caught:
            call()
        return str(caught.value)

    frame = Frame(camera="c", line="l", bank="b", seq=0, captured_at=0.0, encoding="jpeg", shape=(8, 8, 3),
                  data=b"GIF89a" + bytes(32))
    huge = Frame(camera="c", line="l", bank="b", seq=0, captured_at=0.0, encoding="raw", shape=(9000, 9000, 1),
                 data=np.zeros(1, np.uint8).tobytes())
    assert reason_kind(reason(lambda: Frame.unpack(b"\xc1"))) == "malformed"
    assert reason_kind(reason(lambda: Frame.unpack(frame.pack(), 16))) == "too_large"
    assert reason_kind(reason(lambda: decode_frame(frame))) == "undecodable"
    assert reason_kind(reason(lambda: decode_frame(huge))) == "too_large"
    assert reason_kind("poison: delivered 6 times without an outcome (limit 5)") == "poison"
    assert reason_kind("frame cannot be scored in bank 'default': more than 256 tiles") == "unscorable"


def test_up_serves_metrics_health_and_readiness_of_the_whole_demo(synthetic_bank_bytes, tmp_path):
    from prometheus_client.registry import REGISTRY

    from patchcore.up import UpSettings, run_up

    bank = tmp_path / "demo.bank"
    bank.write_bytes(synthetic_bank_bytes)
    port, done = free_port(), threading.Event()
    seen: dict = {"ready": set(), "health": set(), "lag": set()}

    def poll():
        while not done.is_set():
            try:
                seen["ready"].add(get(port, "/readyz")[0])
                seen["health"].add(get(port, "/healthz")[0])
                seen["lag"] |= {dict(labels)["camera"] for name, labels in samples(port)
                                if name == "patchcore_consumer_lag"}
            except (urllib.error.URLError, ConnectionError):  # not serving yet, or already stopped
                pass
            time.sleep(0.2)

    def counted(verdict: str) -> float:  # the process's registry is what /metrics serves
        return REGISTRY.get_sample_value("patchcore_results_total", {"camera": "cam-1", "verdict": verdict}) or 0.0

    before = counted("normal") + counted("anomalous")
    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        summary = run_up(UpSettings(bank=bank, frames=24, fps=6, device="cpu", metrics_port=port),
                         echo=lambda _: None, progress=False)
    finally:
        done.set()
        poller.join(timeout=30)
    assert summary["results_out"] == 24
    assert counted("normal") + counted("anomalous") - before == 24
    assert seen["health"] == {200} and 200 in seen["ready"] and seen["lag"] == {"cam-1"}
    assert get_refused(port)  # served for the run only
