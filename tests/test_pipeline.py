"""End to end against a real redis-server: ingest -> workers -> store, with the synthetic line."""
import threading
import time

import numpy as np
import pytest

from store.alarms.feed import read_alarms
from runtime.connection import connect
from runtime.deadletter import DeadLetters
from contracts.keys import FRAME_GROUP, Keys
from contracts.messages import Alarm, Frame, Result
from workers.banks.registry import BankRegistry, RegistryError
from ingest.camera import CameraIngest, IngestSettings
from ingest.sources import SyntheticLine
from scorer import PatchCoreScorer, bank_from_bytes, decode_image
from store.alarms.rules import AlarmRule
from store.service import ResultsStore, StoreSettings
from workers.worker import Worker, WorkerSettings

KEYS = Keys()


class Running:
    """Workers and a store in threads, stopped on exit."""

    def __init__(self, url, workers=1, store=True, **worker_settings):
        self.stop = threading.Event()
        self.workers = [Worker(connect(url), WorkerSettings(name=f"w{i}", refresh_s=0.2, **worker_settings), KEYS,
                               self.stop) for i in range(workers)]
        self.store = ResultsStore(connect(url), StoreSettings(default_rule=AlarmRule(k=2, n=3, cooldown_s=0),
                                                              refresh_s=0.2), KEYS, self.stop) if store else None
        runners = [w.run for w in self.workers] + ([self.store.run] if store else [])
        self.threads = [threading.Thread(target=r, daemon=True) for r in runners]

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)


def ingest(url, frames, camera="cam-1", seed=0, **settings):
    line = SyntheticLine(seed=seed, defect_rate=0.3, max_frames=frames)
    report = CameraIngest(connect(url), line, IngestSettings(camera=camera, maxlen=10_000, **settings), KEYS).run()
    assert report.frames == frames
    return line


def wait_for(predicate, timeout=120.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("timed out")


def results(client, camera="cam-1"):
    return [Result.unpack(f[b"m"]) for _, f in client.xrange(KEYS.results(camera))]


def publish(client, data, activate=True):
    return BankRegistry(client, KEYS).publish("default", data, activate=activate)


def test_two_workers_score_every_frame_exactly_once_and_alarm_on_defects(redis_server, synthetic_bank_bytes):
    client = connect(redis_server.url)
    publish(client, synthetic_bank_bytes)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(KEYS.alarms_channel)
    lines = [ingest(redis_server.url, 48, camera="cam-1", seed=1), ingest(redis_server.url, 32, camera="cam-2", seed=2)]
    with Running(redis_server.url, workers=2, max_batch=4) as running:  # both start on a full backlog
        wait_for(lambda: running.store.report.results == 80)
        # a worker's report counts a batch once its writer's event reaches the loop, just after the write
        wait_for(lambda: sum(w.report.results for w in running.workers) >= 80, 30)
        per_worker = [w.report.results for w in running.workers]
    assert sum(per_worker) == 80 and min(per_worker) > 0  # both shared the load
    for camera, line, n in (("cam-1", lines[0], 48), ("cam-2", lines[1], 32)):
        got = results(client, camera)
        assert sorted(r.seq for r in got) == list(range(n))  # every frame once, none twice
        truth = np.array([line.defect_at(r.seq) for r in got])
        verdict = np.array([r.anomalous for r in got])
        assert truth.any() and (~truth).any()
        assert (truth == verdict).mean() >= 0.95
        assert client.xlen(KEYS.frames(camera)) == 0  # scored frames are acknowledged and deleted
    alarms = read_alarms(client, KEYS)[0]
    assert alarms, "defective parts must raise alarms"
    for alarm in alarms:
        line = lines[0] if alarm.camera == "cam-1" else lines[1]
        assert any(line.defect_at(s) for s in range(max(0, alarm.seq - 2), alarm.seq + 1))  # its 2-of-3 window
        picture = decode_image(alarm.overlay_jpeg)  # the inspected region beside its heatmap, with a header
        assert picture.shape[1] > 2 * 200 and picture.shape[0] > 200
    live, deadline = [], time.time() + 3
    while time.time() < deadline and len(live) < len(alarms):
        if (m := pubsub.get_message(timeout=0.2)) is not None:
            live.append(Alarm.unpack(m["data"]))
    # Pub/Sub saw the same alarms as the durable stream
    assert sorted((a.camera, a.seq) for a in live) == sorted((a.camera, a.seq) for a in alarms)


def test_streamed_score_equals_offline_score_of_the_decoded_frame(redis_server, synthetic_bank_bytes):
    client = connect(redis_server.url)
    publish(client, synthetic_bank_bytes)
    ingest(redis_server.url, 6)
    frames = [Frame.unpack(f[b"m"]) for _, f in client.xrange(KEYS.frames("cam-1"))]
    with Running(redis_server.url, store=False, max_batch=8):
        wait_for(lambda: client.xlen(KEYS.results("cam-1")) == 6)
    offline = PatchCoreScorer(bank_from_bytes(synthetic_bank_bytes), device="cpu")
    expected = offline.score([decode_image(f.data) for f in frames], maps=False).image_scores
    streamed = {r.seq: r.score for r in results(client)}
    np.testing.assert_allclose([streamed[f.seq] for f in frames], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("view", ["full", "tiles"])
def test_streamed_score_equals_offline_score_in_every_view(redis_server, view):
    """A bank of another view (whole frame; tiles) through the worker: the same scores as offline, and
    the result's small map covers the whole frame."""
    from scorer import BuildConfig, CalibrationConfig, CoresetConfig, FeatureConfig, ViewConfig, bank_to_bytes, build_bank

    line = SyntheticLine(seed=0)
    good = [line.render(i * line.period + i % line.period, defect=False)[:, :, ::-1] for i in range(6)]
    views = {"full": ViewConfig("full", size=320), "tiles": ViewConfig("tiles", scale=1.0, tile=160)}
    bank = build_bank(good, BuildConfig(features=FeatureConfig(backbone="mobilenet_v2"), view=views[view],
                                        coreset=CoresetConfig(fraction=0.1), calibration=CalibrationConfig(folds=3)),
                      device="cpu", progress=False)
    client = connect(redis_server.url)
    publish(client, bank_to_bytes(bank))
    ingest(redis_server.url, 6)
    frames = [Frame.unpack(f[b"m"]) for _, f in client.xrange(KEYS.frames("cam-1"))]
    with Running(redis_server.url, store=False, max_batch=4, result_maps=True):
        wait_for(lambda: client.xlen(KEYS.results("cam-1")) == 6)
    expected = PatchCoreScorer(bank, device="cpu").score([decode_image(f.data) for f in frames], maps=False)
    streamed = {r.seq: r for r in results(client)}
    np.testing.assert_allclose([streamed[f.seq].score for f in frames], expected.image_scores, rtol=1e-4, atol=1e-4)
    assert streamed[frames[0].seq].patch_map_shape == (240 // 8, 320 // 8)  # the whole 320 x 240 frame


def test_bank_switch_mid_stream_loses_no_frame(redis_server, synthetic_bank_bytes):
    client = connect(redis_server.url)
    registry = BankRegistry(client, KEYS)
    v1 = registry.publish("default", synthetic_bank_bytes, activate=True)
    v2 = registry.publish("default", synthetic_bank_bytes)
    with Running(redis_server.url, store=False, max_batch=2):
        feeder = threading.Thread(target=ingest, args=(redis_server.url, 40), kwargs={"fps": 40})
        feeder.start()
        wait_for(lambda: client.xlen(KEYS.results("cam-1")) >= 10)
        registry.activate("default", v2)
        feeder.join()
        wait_for(lambda: client.xlen(KEYS.results("cam-1")) == 40)
    got = results(client)
    assert sorted(r.seq for r in got) == list(range(40))
    versions = [r.bank_version for r in sorted(got, key=lambda r: r.seq)]
    assert versions[0] == v1 and versions[-1] == v2
    assert versions == sorted(versions)  # switched once, between batches
    assert registry.rollback("default") == v1 and registry.active("default") == v1


def test_bad_frames_go_to_the_dead_letter_stream_and_the_worker_continues(redis_server, synthetic_bank_bytes):
    client = connect(redis_server.url)
    publish(client, synthetic_bank_bytes)
    client.sadd(KEYS.cameras, "cam-1")
    good = SyntheticLine(seed=3).render(0)
    import cv2

    jpeg = cv2.imencode(".jpg", good)[1].tobytes()
    base = dict(camera="cam-1", line="l", bank="default", captured_at=time.time(), encoding="jpeg",
                shape=good.shape)
    payloads = [
        Frame(seq=0, data=jpeg[: len(jpeg) // 3], **base).pack(),  # truncated JPEG
        b"\x92\x01\x02",  # valid msgpack ([1, 2]), but not a frame
        Frame(seq=3, data=jpeg, **{**base, "camera": "cam-9"}).pack(),  # on another camera's stream
        Frame(seq=4, data=jpeg, **base).pack(),  # fine
    ]
    for payload in payloads:
        client.xadd(KEYS.frames("cam-1"), {"m": payload})
    with Running(redis_server.url, store=False):
        wait_for(lambda: client.xlen(KEYS.deadletter("cam-1")) == 3 and client.xlen(KEYS.results("cam-1")) == 1)
    letters = DeadLetters(client, KEYS)
    reasons = {letters.payload(d): d.reason for d in letters.list()}  # original bytes kept
    assert set(reasons) == set(payloads[:3])
    assert "not a decodable" in reasons[payloads[0]]
    assert "not a map" in reasons[payloads[1]]
    assert "arrived on" in reasons[payloads[2]]
    assert int(client.hget(KEYS.camera_stats("cam-1"), "deadlettered")) == 3


def test_frames_a_dead_worker_left_pending_are_reclaimed(redis_server, synthetic_bank_bytes):
    client = connect(redis_server.url)
    publish(client, synthetic_bank_bytes)
    ingest(redis_server.url, 5)
    client.xgroup_create(KEYS.frames("cam-1"), FRAME_GROUP, id="0")
    taken = client.xreadgroup(FRAME_GROUP, "crashed", {KEYS.frames("cam-1"): ">"}, count=5)  # read, never acked
    assert len(taken[0][1]) == 5
    time.sleep(0.3)
    with Running(redis_server.url, store=False, claim_idle_ms=200):
        wait_for(lambda: client.xlen(KEYS.results("cam-1")) == 5)
    assert sorted(r.seq for r in results(client)) == list(range(5))
    assert client.xpending(KEYS.frames("cam-1"), FRAME_GROUP)["pending"] == 0


def test_registry_refuses_tampered_bytes_and_unknown_versions(redis_server, synthetic_bank_bytes):
    client = connect(redis_server.url)
    registry = BankRegistry(client, KEYS)
    version = registry.publish("default", synthetic_bank_bytes, activate=True)
    assert registry.fetch("default", version) == synthetic_bank_bytes
    client.setrange(KEYS.bank_blob("default", version), 100, b"X")
    with pytest.raises(RegistryError, match="sha256"):
        registry.fetch("default", version)
    with pytest.raises(RegistryError, match="no version 7"):
        registry.activate("default", 7)
    with pytest.raises(RegistryError, match="no earlier"):
        registry.rollback("default")


def test_results_can_carry_the_small_anomaly_map_and_alarms_reach_a_cli_subscriber(redis_server, synthetic_bank_bytes):
    import subprocess
    import sys

    client = connect(redis_server.url)
    publish(client, synthetic_bank_bytes)
    subscriber = subprocess.Popen([sys.executable, "-m", "patchcore", "alarms", "--count", "1", "--redis-url",
                                   redis_server.url], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(3)  # the subscriber is connected before anything is published
    line = ingest(redis_server.url, 24, seed=4)
    with Running(redis_server.url, result_maps=True):
        wait_for(lambda: client.xlen(KEYS.results("cam-1")) == 24)
        out, _ = subscriber.communicate(timeout=60)
    alarm = __import__("json").loads(out.decode().splitlines()[0])
    assert any(line.defect_at(s) for s in range(max(0, alarm["seq"] - 2), alarm["seq"] + 1))
    got = results(client)
    for r in got:
        grid = np.frombuffer(r.patch_map, np.uint8).reshape(r.patch_map_shape)
        assert r.patch_map_shape == (28, 28) and grid.max() == 255
    peak = {r.seq: r.patch_map_max for r in got}
    defective = [peak[r.seq] for r in got if line.defect_at(r.seq)]
    good = [peak[r.seq] for r in got if not line.defect_at(r.seq)]
    assert defective and good and min(defective) > max(good)  # the map's peak is where the defect is
