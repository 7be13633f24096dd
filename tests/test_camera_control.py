"""Per-camera control (issue 18 item 2): camera settings decoded strictly, stored with a compare-and-set, followed by
running workers from their next batch; streamed verdicts agree with `patchcore score` under the same settings.
Real redis-server, real workers, real images (MVTec bottle when present, else the synthetic line)."""
from __future__ import annotations

import json
import threading
import time

import cv2
import msgpack
import numpy as np
import pytest
from typer.testing import CliRunner

from contracts.control import CameraSettings, SettingsError, parse_polygon
from contracts.keys import Keys
from contracts.messages import Frame, Result
from patchcore.cli import app
from runtime import scripts
from runtime.connection import connect
from runtime.control import CameraControl, SettingsWatch, read_audit, read_settings
from scorer import PatchCoreScorer, Region, bank_from_bytes
from workers.banks.registry import BankRegistry
from workers.worker import Worker, WorkerSettings

from .conftest import BOTTLE, synthetic_part
from .test_pipeline import wait_for as pipeline_wait_for

KEYS = Keys()


def png(mask: np.ndarray) -> bytes:
    return cv2.imencode(".png", mask.astype(np.uint8) * 255)[1].tobytes()


# ---- the settings themselves ------------------------------------------------------------------------------------

def test_settings_are_validated_and_decoded_strictly():
    square = parse_polygon("10,10; 90,10; 90,90; 10,90")
    settings = CameraSettings("cam-1", threshold_factor=1.5, threshold_offset=-0.25, roi_polygon=square)
    assert settings.effective_threshold(2.0) == pytest.approx(2.75)
    assert settings.effective_threshold(None) is None
    assert CameraSettings("cam-1", threshold=4.0).effective_threshold(2.0) == 4.0
    assert CameraSettings.unpack(settings.pack()) == settings
    # the polygon is filled at the frame's resolution: its inside, not its outside
    mask = settings.roi(100, 120)
    assert mask.shape == (100, 120) and mask[50, 50] and not mask[5, 5] and not mask[50, 100]
    assert abs(int(mask.sum()) - 80 * 80) < 2 * 81 + 2  # the area, up to the border pixels
    # a mask file: any resolution, white = inspect
    half = np.zeros((30, 40), bool)
    half[:, :20] = True
    masked = CameraSettings("cam-2", roi_mask=png(half))
    assert np.array_equal(masked.roi(480, 640), half) and CameraSettings.unpack(masked.pack()) == masked
    for bad in (dict(threshold=1.0, threshold_factor=2.0), dict(threshold_factor=0.0), dict(threshold=float("nan")),
                dict(roi_polygon=((0, 0), (1, 1))), dict(roi_polygon=square, roi_mask=png(half)),
                dict(roi_mask=b"not an image"), dict(roi_mask=png(np.zeros((4, 4), bool))),
                dict(roi_polygon=((0, 0), (-5, 1), (3, 3)))):
        with pytest.raises(SettingsError):
            CameraSettings("cam-1", **bad)
    with pytest.raises(SettingsError):
        CameraSettings("cam{1}")
    with pytest.raises(SettingsError):
        parse_polygon("1,2;3")
    # what a hostile writer could store: refused, never executed or half-read
    for packed in (b"\xc1", msgpack.packb([1, 2]), msgpack.packb({"camera": "cam-1", "schema": 99}),
                   msgpack.packb({"camera": "cam-1", "schema": 1, "threshold": "high"}),
                   msgpack.packb({"camera": "cam-1", "schema": 1, "roi_polygon": [[0, 0]] * 1000})):
        with pytest.raises(SettingsError):
            CameraSettings.unpack(packed)


# ---- the scripts and the store ----------------------------------------------------------------------------------

def test_settings_writes_compare_and_set_and_the_audit_stream_stays_bounded(redis_server):
    client = connect(redis_server.url)
    write = scripts.load(client, "camera_settings_write")
    first = CameraSettings("cam-1", threshold=3.0, version=1).pack()
    done = scripts.camera_settings_write(write, settings=KEYS.camera_settings, version_key=KEYS.camera_settings_version,
                                         read_version=0, camera="cam-1", packed=first)
    assert done.written and done.previous is None and client.get(KEYS.camera_settings_version) == b"1"
    stale = scripts.camera_settings_write(write, settings=KEYS.camera_settings, version_key=KEYS.camera_settings_version,
                                          read_version=0, camera="cam-1", packed=b"other")
    assert not stale.written and client.hget(KEYS.camera_settings, "cam-1") == first  # a lost race writes nothing
    gone = scripts.camera_settings_write(write, settings=KEYS.camera_settings, version_key=KEYS.camera_settings_version,
                                         read_version=1, camera="cam-1", packed=None)
    assert gone.written and gone.previous == first and not client.hexists(KEYS.camera_settings, "cam-1")

    append = scripts.load(client, "audit_append")
    ids = [scripts.audit_append(append, stream=KEYS.audit, maxlen=10, fields={"n": i}) for i in range(500)]
    assert len(set(ids)) == 500
    assert client.xlen(KEYS.audit) < 200  # MAXLEN ~ 10: trimmed by whole nodes, never growing without bound
    assert client.xrevrange(KEYS.audit, count=1)[0][1] == {b"n": b"499"}
    with pytest.raises(ValueError):
        scripts.audit_append(append, stream=KEYS.audit, maxlen=0, fields={"n": 1})


def test_a_server_out_of_memory_refuses_both_scripts_whole(redis_server):
    import redis

    client = connect(redis_server.url)
    client.config_set("maxmemory", 1)  # every write is now refused (OOM)
    try:
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            CameraControl(client, KEYS).set(CameraSettings("cam-1", threshold=1.0))
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            scripts.audit_append(scripts.load(client, "audit_append"), stream=KEYS.audit, maxlen=10, fields={"n": 1})
    finally:
        client.config_set("maxmemory", 0)
    assert client.dbsize() == 0  # no settings without their version, no entry: nothing half done


def test_concurrent_writers_each_get_their_own_version_and_audit_entry(redis_server):
    def write(i: int) -> None:
        CameraControl(connect(redis_server.url), KEYS).set(CameraSettings(f"cam-{i % 3}", threshold=float(i)))

    threads = [threading.Thread(target=write, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    client = connect(redis_server.url)
    stored = read_settings(client, KEYS)
    assert stored.version == 12 and sorted(stored.cameras) == ["cam-0", "cam-1", "cam-2"]
    trail = read_audit(client, KEYS)
    assert len(trail.entries) == 12 and {e.action for e in trail.entries} == {"camera.set"}
    versions = sorted(e.to_dict()["after"]["version"] for e in trail.entries)
    assert versions == list(range(1, 13))  # every write a version of its own, none lost
    assert all(e.who == "default" for e in trail.entries)  # ACL WHOAMI of the test server's connection


def test_a_worker_view_applies_good_entries_and_counts_refused_ones(redis_server):
    client = connect(redis_server.url)
    control = CameraControl(client, KEYS)
    watch = SettingsWatch(client, KEYS)
    assert not watch.check() and watch.cameras == {}
    control.set(CameraSettings("cam-1", threshold=2.5))
    client.hset(KEYS.camera_settings, "cam-2", b"\x93garbage")  # a bad entry from a writer gone wrong ...
    client.hset(KEYS.camera_settings, "cam-3", CameraSettings("cam-9", threshold=1.0).pack())  # ... and a misfiled one
    client.incr(KEYS.camera_settings_version)
    assert watch.check()
    assert list(watch.cameras) == ["cam-1"] and watch.of("cam-1").threshold == 2.5 and watch.refused == 2
    assert not watch.check()  # one GET, nothing reloaded while the version stands


# ---- a worker applies them --------------------------------------------------------------------------------------

def _images() -> tuple[list[np.ndarray], bytes]:
    """Real images (RGB) and a bank for them: a few MVTec bottle test images (good and defective) with a bank of 20
    training images when the data set is here, else synthetic parts with a synthetic-line bank."""
    from scorer import BuildConfig, CoresetConfig, FeatureConfig, bank_to_bytes, build_bank, load_image

    config = BuildConfig(features=FeatureConfig(backbone="mobilenet_v2"), coreset=CoresetConfig(fraction=0.1))
    if BOTTLE.is_dir():
        train = sorted((BOTTLE / "train" / "good").glob("*.png"))[:20]
        tests = (sorted((BOTTLE / "test" / "good").glob("*.png"))[:3]
                 + sorted((BOTTLE / "test" / "broken_large").glob("*.png"))[:3]
                 + sorted((BOTTLE / "test" / "contamination").glob("*.png"))[:2])
        bank = build_bank(train, config, device="cpu", progress=False)
        return [load_image(p) for p in tests], bank_to_bytes(bank)
    rng = np.random.default_rng(7)
    good = [synthetic_part(rng) for _ in range(30)]
    bank = build_bank(good, config, device="cpu", progress=False)
    return [synthetic_part(rng, defect=i % 2 == 1) for i in range(8)], bank_to_bytes(bank)


@pytest.fixture(scope="module")
def images_and_bank():
    return _images()


def push(client, camera: str, images: list[np.ndarray], first_seq: int = 0) -> None:
    """Frames of exact pixels (raw BGR): what the worker scores is what `patchcore score` reads from the PNG files."""
    client.sadd(KEYS.cameras, camera)
    for i, image in enumerate(images):
        bgr = np.ascontiguousarray(image[:, :, ::-1])
        frame = Frame(camera=camera, line="line-1", bank="default", seq=first_seq + i, captured_at=time.time(),
                      encoding="raw", shape=bgr.shape, data=bgr.tobytes())
        client.xadd(KEYS.frames(camera), {"m": frame.pack()})


class RunningWorker:
    def __init__(self, url, **settings):
        self.stop = threading.Event()
        self.worker = Worker(connect(url), WorkerSettings(name="w0", refresh_s=0.2, device="cpu", **settings), KEYS,
                             self.stop)
        self.thread = threading.Thread(target=self.worker.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=60)


def results(client, camera: str) -> dict[int, Result]:
    return {r.seq: r for r in (Result.unpack(f[b"m"]) for _, f in client.xrange(KEYS.results(camera)))}


def wait_for(predicate, timeout: float = 300.0) -> None:
    pipeline_wait_for(predicate, timeout)  # tests/test_pipeline.py's, with this file's longer default


def test_streamed_verdicts_agree_with_patchcore_score_under_a_cameras_threshold_and_roi(
        redis_server, images_and_bank, tmp_path):
    images, bank_bytes = images_and_bank
    client = connect(redis_server.url)
    BankRegistry(client, KEYS).publish("default", bank_bytes, activate=True)
    height, width = images[0].shape[:2]
    # the ROI: the left or the right half of the frame as a polygon, whichever changes some image's score (an image's
    # highest patch lies outside one of the two halves); the threshold: the ROI scores' own median, so both verdicts
    # occur (both computed here by an offline scorer, independently of any worker)
    offline = PatchCoreScorer(bank_from_bytes(bank_bytes), device="cpu")
    whole = offline.score(images, maps=False).image_scores
    half = width // 2
    for polygon in (f"0,0;{half},0;{half},{height - 1};0,{height - 1}",
                    f"{half},0;{width - 1},0;{width - 1},{height - 1};{half},{height - 1}"):
        roi = CameraSettings("cam-1", roi_polygon=parse_polygon(polygon)).roi(height, width)
        under_roi = offline.score(images, maps=False, regions=[Region(polygon, roi)] * len(images)).image_scores
        if np.abs(whole - under_roi).max() > 1e-3:
            break
    assert np.abs(whole - under_roi).max() > 1e-3  # the ROI changes what is scored: the whole frame scores otherwise
    threshold = float(np.median(under_roi))
    runner = CliRunner()
    set_ = runner.invoke(app, ["camera", "set", "cam-1", "--threshold", repr(threshold), "--roi-polygon", polygon,
                               "--redis-url", redis_server.url])
    assert set_.exit_code == 0, set_.output
    version = json.loads(set_.output)["version"]

    push(client, "cam-1", images)
    with RunningWorker(redis_server.url, max_batch=3):
        wait_for(lambda: len(results(client, "cam-1")) == len(images))
    streamed = results(client, "cam-1")

    bank_file, files = tmp_path / "line.bank", []
    bank_file.write_bytes(bank_bytes)
    for i, image in enumerate(images):
        files.append(tmp_path / f"{i:02d}.png")
        cv2.imwrite(str(files[-1]), image[:, :, ::-1])
    scored = runner.invoke(app, ["score", str(bank_file), *map(str, files), "--camera", "cam-1", "--device", "cpu",
                                 "--redis-url", redis_server.url])
    assert scored.exit_code == 0, scored.output
    lines = [json.loads(line) for line in scored.output.splitlines() if line.startswith("{")]
    assert len(lines) == len(images)
    verdicts = []
    for i, line in enumerate(lines):
        result = streamed[i]
        assert result.settings_version == version == line["settings_version"]
        assert result.threshold == pytest.approx(threshold) and line["threshold"] == pytest.approx(threshold)
        assert result.score == pytest.approx(line["score"], abs=1e-3)
        assert result.score == pytest.approx(float(under_roi[i]), rel=1e-4, abs=1e-4)  # the ROI, not the bank's
        assert result.anomalous == line["anomalous"] == (result.score >= threshold)
        verdicts.append(result.anomalous)
    assert any(verdicts) and not all(verdicts)
    # the same flags instead of --camera give the same lines (with version 0: not stored settings)
    flags = runner.invoke(app, ["score", str(bank_file), *map(str, files), "--threshold", repr(threshold),
                                "--roi-polygon", polygon, "--device", "cpu"])
    assert flags.exit_code == 0, flags.output
    again = [json.loads(line) for line in flags.output.splitlines() if line.startswith("{")]
    assert [(a["score"], a["anomalous"]) for a in again] == [(b["score"], b["anomalous"]) for b in lines]


def test_a_change_reaches_a_running_worker_within_a_second(redis_server, images_and_bank):
    images, bank_bytes = images_and_bank
    client = connect(redis_server.url)
    BankRegistry(client, KEYS).publish("default", bank_bytes, activate=True)
    control = CameraControl(client, KEYS)
    stop = threading.Event()

    def feed():  # a camera at about 5 frames/s, one frame at a time
        seq = 0
        while not stop.is_set():
            push(client, "cam-1", [images[seq % len(images)]], first_seq=seq)
            seq += 1
            time.sleep(0.2)

    feeder = threading.Thread(target=feed, daemon=True)
    with RunningWorker(redis_server.url, max_batch=1):
        feeder.start()
        try:
            wait_for(lambda: len(results(client, "cam-1")) >= 3)  # the worker is scoring
            changed_at = time.time()
            version = control.set(CameraSettings("cam-1", threshold=-1.0)).version  # every frame anomalous from now
            wait_for(lambda: any(r.settings_version == version for r in results(client, "cam-1").values()), 30)
            time.sleep(1.5)
        finally:
            stop.set()
            feeder.join()
    got = sorted(results(client, "cam-1").values(), key=lambda r: r.seq)
    # a frame picked after the change + 1 s (its queue time says when) was scored under the new settings
    picked = {r.seq: r.captured_at + r.timings_ms["queue"] / 1000 for r in got}
    late = [r for r in got if picked[r.seq] >= changed_at + 1.0]
    assert late and all(r.settings_version == version and r.anomalous and r.threshold == -1.0 for r in late)
    first = min(picked[r.seq] for r in got if r.settings_version == version)
    assert first - changed_at < 1.0
    assert all(r.settings_version is None for r in got if r.scored_at < changed_at)  # before: the bank's


def test_a_cameras_alarm_rule_reaches_a_running_store_within_a_second(redis_server):
    from store.alarms.rules import AlarmRule
    from store.service import ResultsStore, StoreSettings

    client = connect(redis_server.url)
    client.sadd(KEYS.cameras, "cam-1")
    stop = threading.Event()
    store = ResultsStore(connect(redis_server.url), StoreSettings(refresh_s=30.0), KEYS, stop)  # streams: rarely
    thread = threading.Thread(target=store.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: store.rule_for("cam-1", "l") == StoreSettings().default_rule, 30)
        time.sleep(1.0)  # the store is past its first reads
        result = CliRunner().invoke(app, ["rule", "cam-1", "--k", "4", "--n", "7", "--cooldown-s", "0",
                                          "--redis-url", redis_server.url])
        changed_at = time.time()  # the rule is in Redis
        assert result.exit_code == 0, result.output
        wait_for(lambda: store.rule_for("cam-1", "l") == AlarmRule(k=4, n=7, cooldown_s=0.0), 10)
        assert time.time() - changed_at < 1.0  # the store reads the rules every 0.5 s (streams every 30 s here)
        client.hset(KEYS.alarm_rules, "cam-1", "{not json")  # a bad rule: refused, the default applies again
        wait_for(lambda: store.rule_for("cam-1", "l") == StoreSettings().default_rule, 5)
    finally:
        stop.set()
        thread.join(timeout=30)


def test_a_defect_outside_a_cameras_roi_is_not_inspected(images_and_bank):
    from workers.camera import CameraRegions

    images, bank_bytes = images_and_bank
    scorer = PatchCoreScorer(bank_from_bytes(bank_bytes), device="cpu")
    clean = images[0]  # a good image
    height, width = clean.shape[:2]
    defect = clean.copy()  # a red scratch in the top-left quarter, which the whole-frame view inspects
    cv2.line(defect, (width // 8, height // 8), (width // 4, height // 5), (255, 40, 40), max(3, width // 60))
    settings = CameraSettings("cam-1", roi_polygon=parse_polygon(
        f"{width // 2},0;{width - 1},0;{width - 1},{height - 1};{width // 2},{height - 1}"), version=1)  # right half
    region = CameraRegions().region(settings, height, width)
    whole = scorer.score([clean, defect], maps=False).image_scores
    right = scorer.score([clean, defect], maps=False, regions=[region, region]).image_scores
    assert whole[1] > 1.2 * whole[0]  # the scratch is seen ...
    assert right[1] - right[0] < 0.25 * (whole[1] - whole[0])  # ... and left out when outside the camera's ROI
    # a batch that mixes cameras: each frame is scored under its own region, as when scored alone
    mixed = scorer.score([defect, defect, clean], maps=False, regions=[None, region, region]).image_scores
    np.testing.assert_allclose(mixed, [whole[1], right[1], right[0]], rtol=1e-4, atol=1e-4)


def test_settings_and_the_audit_trail_on_a_redis_cluster(redis_cluster):
    from redis.cluster import RedisCluster

    redis_cluster.wait_ok()
    redis_cluster.flush()
    client = connect(redis_cluster.url)
    assert isinstance(client, RedisCluster)
    control = CameraControl(client, KEYS)
    watch = SettingsWatch(client, KEYS)
    stored = control.set(CameraSettings("cam-1", threshold_offset=0.5, roi_polygon=((0, 0), (9, 0), (9, 9))))
    assert watch.check() and watch.of("cam-1") == stored  # the script and the MULTI read: one slot, {control}
    assert control.reset("cam-1") and watch.check() and watch.of("cam-1") is None
    trail = read_audit(client, KEYS)
    assert [(e.action, e.target) for e in trail.entries] == [("camera.set", "cam-1"), ("camera.reset", "cam-1")]
