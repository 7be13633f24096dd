"""Drift on scored lines, end to end against a real redis-server: cameras (ingest) -> a worker scoring with a real
bank -> `patchcore store` as its own process (drift options from its command line). A brightness change and a
camera shift each give exactly one drift event within the stated delay, no alarm while drifted (the alarms the
window decided are held and counted), and a drift-cleared event once the scene returns; the synthetic line's
isolated defects still alarm, and give no drift event. The same on the sample video (skipped without it)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import cv2
import pytest

from contracts.framecodec import encode_frame
from contracts.keys import Keys
from contracts.messages import DriftEvent
from ingest.camera import CameraIngest, IngestSettings
from ingest.sources import CaptureSource, SyntheticLine, scene_change
from runtime.connection import connect
from runtime.status import collect_status
from scorer import BuildConfig, CalibrationConfig, CoresetConfig, FeatureConfig, bank_to_bytes, build_bank
from store.alarms.drift import DriftSettings
from store.alarms.feed import read_alarms
from workers.banks.registry import BankRegistry
from workers.worker import Worker, WorkerSettings

from .conftest import ROOT, VIDEO, needs_video
from .test_pipeline import wait_for as pipeline_wait_for

KEYS = Keys()
RAISE_DELAY, CLEAR_DELAY = DriftSettings().raise_delay, DriftSettings().clear_delay  # 26, 23 frames
VIDEO_SIDE = 320  # the sample video's frames shrunk to this longer side (ingest's --max-side)
COOLDOWN_S, FPS = 1.0, 20.0  # the alarm rule's cooldown at the cameras' pace: at most one alarm per 20 frames


class StoreProcess:
    """`patchcore store` in its own process: 2-of-3 alarms, a 1 s cooldown, the default drift settings (given on
    its command line, as an operator would); its JSON report read on SIGTERM."""

    def __init__(self, url: str):
        args = ["store", "--redis-url", url, "--k", "2", "--n", "3", "--cooldown-s", str(COOLDOWN_S),
                "--drift-window", str(DriftSettings().window), "--drift-policy", "hold"]
        self.process = subprocess.Popen([sys.executable, "-m", "patchcore", *args], cwd=ROOT, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
        self.report: dict = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.process.send_signal(signal.SIGTERM)
        out, err = self.process.communicate(timeout=60)
        assert self.process.returncode == 0, err.decode()[-2000:]
        self.report = json.loads(out.decode().strip().splitlines()[-1])


class Workers:
    def __init__(self, url: str):
        self.stop = threading.Event()
        self.worker = Worker(connect(url), WorkerSettings(name="w0", refresh_s=0.2, max_batch=8), KEYS, self.stop)
        self.thread = threading.Thread(target=self.worker.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(60)


def wait_for(predicate, timeout: float = 600.0) -> None:
    pipeline_wait_for(predicate, timeout)  # tests/test_pipeline.py's, with this file's longer default


def all_handled(client, camera: str, frames: int) -> bool:
    """Whether `camera` has `frames` results and the store has read and acknowledged them all."""
    if client.xlen(KEYS.results(camera)) < frames:
        return False
    group = next(g for g in client.xinfo_groups(KEYS.results(camera)) if g["name"] == b"store")
    return group["lag"] == 0 and group["pending"] == 0


def run_cameras(url: str, sources: dict, frames: int, max_side: int | None = None) -> dict:
    """Ingest every camera's source at FPS, a worker and a store process, until the store handled all frames; the
    store's report."""
    client = connect(url)
    threads = [threading.Thread(target=CameraIngest(connect(url), source, IngestSettings(
        camera=camera, fps=FPS, maxlen=10_000, max_frames=frames, max_side=max_side), KEYS).run, daemon=True)
        for camera, source in sources.items()]
    with StoreProcess(url) as store, Workers(url):
        for thread in threads:
            thread.start()
        wait_for(lambda: all(all_handled(client, camera, frames) for camera in sources))
    return store.report


def drift_events(client, camera: str) -> list[DriftEvent]:
    return [DriftEvent.unpack(f[b"m"]) for _, f in client.xrange(KEYS.drift(camera))]


def check_one_drift(client, camera: str, change_at: int, back_at: int) -> tuple[DriftEvent, DriftEvent, list[int]]:
    """One drift within RAISE_DELAY frames of the change, cleared within CLEAR_DELAY frames (plus the window's
    slack: a frame over the threshold left in it) of the return, no alarm between; the camera's alarm seqs."""
    events = drift_events(client, camera)
    assert [e.kind for e in events] == ["drift", "drift-cleared"], [e.describe() for e in events]
    raised, cleared = events
    assert change_at <= raised.seq < change_at + RAISE_DELAY, raised.describe()
    assert back_at <= cleared.seq < back_at + DriftSettings().window, cleared.describe()
    seqs = sorted(a.seq for a in read_alarms(client, KEYS)[0] if a.camera == camera)
    assert not [s for s in seqs if raised.seq < s <= cleared.seq], seqs  # no flood: held
    before = [s for s in seqs if change_at <= s <= raised.seq]  # decided before the drift was known
    assert len(before) <= RAISE_DELAY / (COOLDOWN_S * FPS) + 1, before
    assert cleared.held >= 1  # the window kept deciding alarms: held and counted
    return raised, cleared, seqs


def mostly_defects(line: SyntheticLine, seqs: list[int]) -> bool:
    """At least 3 in 4 of these alarms have a defective part in their 2-of-3 window (the bank's calibration allows
    good frames over the threshold at its false-alarm rate, so a few alarms on good parts are the bank's, not drift's)."""
    on_defects = [s for s in seqs if any(line.defect_at(f) for f in range(max(0, s - 2), s + 1))]
    return 4 * len(on_defects) >= 3 * len(seqs)


@pytest.fixture
def published(redis_server, synthetic_bank_bytes):
    BankRegistry(connect(redis_server.url), KEYS).publish("default", synthetic_bank_bytes, activate=True)
    return redis_server


def test_a_brightness_change_and_a_camera_shift_each_raise_one_drift_and_isolated_defects_still_alarm(published):
    url, client = published.url, connect(published.url)
    change_at, length, frames = 48, 80, 184  # normal 0..47, changed 48..127, normal again 128..183
    lines = {"lamp": SyntheticLine(seed=1, gain=2.0, change_at=change_at, change_frames=length),
             "knocked": SyntheticLine(seed=2, shift=30, change_at=change_at, change_frames=length),
             "steady": SyntheticLine(seed=3)}
    report = run_cameras(url, lines, frames)
    held = 0
    for camera in ("lamp", "knocked"):
        _, cleared, seqs = check_one_drift(client, camera, change_at, change_at + length)
        held += cleared.held
        assert mostly_defects(lines[camera], [s for s in seqs if s < change_at or s > cleared.seq])
    assert report["held"] == held and report["drift_events"] == {"drift": 2, "drift-cleared": 2}
    # the steady line: its defective parts alarm, and its scene never drifts
    steady = lines["steady"]
    assert drift_events(client, "steady") == []
    alarms = [a.seq for a in read_alarms(client, KEYS)[0] if a.camera == "steady"]
    assert alarms and mostly_defects(steady, alarms), alarms
    status = {c["camera"]: c for c in collect_status(client)["cameras"]}
    assert status["lamp"]["drift"]["status"] == "normal" and status["lamp"]["drift_events"] == 2
    assert status["steady"]["drift"]["held"] == 0


class ChangedVideo(CaptureSource):
    """The sample video, the scene changed (scene_change) on frames `change_at` .. `change_at + length - 1`."""

    def __init__(self, change_at: int, length: int, **change):
        super().__init__(str(VIDEO), live=False)
        self.change_at, self.length, self.change, self.seq = change_at, length, change, 0

    def read(self):
        frame = super().read()
        if frame is not None and self.change_at <= self.seq < self.change_at + self.length:
            frame = scene_change(frame, **self.change)
        self.seq += 1
        return frame


@pytest.fixture(scope="module")
def video_bank(tmp_path_factory, mobilenet):
    """A mobilenet bank of the sample video's steady first 150 frames (every third), each as the camera sends it
    (shrunk to 320 pixels, JPEG: encode_frame), calibrated as video frames (near-twins left out together)."""
    folder = tmp_path_factory.mktemp("video-good")
    capture = cv2.VideoCapture(str(VIDEO))
    for i in range(150):
        ok, frame = capture.read()
        assert ok
        if i % 3 == 0:
            (folder / f"{i:03d}.jpg").write_bytes(encode_frame(frame, max_side=VIDEO_SIDE)[0])
    capture.release()
    config = BuildConfig(features=FeatureConfig(backbone="mobilenet_v2"), coreset=CoresetConfig(fraction=0.1),
                         calibration=CalibrationConfig(contiguous=True))
    return bank_to_bytes(build_bank(sorted(folder.glob("*.*")), config, device="cpu", progress=False))


@needs_video
def test_the_sample_video_gives_one_drift_for_a_brightness_change_and_one_for_a_shift(redis_server, video_bank):
    url, client = redis_server.url, connect(redis_server.url)
    BankRegistry(client, KEYS).publish("default", video_bank, activate=True)
    change_at, length, frames = 40, 60, 150  # the video's steady frames 0..149, changed 40..99
    sources = {"lamp": ChangedVideo(change_at, length, gain=2.0), "knocked": ChangedVideo(change_at, length, shift=40)}
    report = run_cameras(url, sources, frames, max_side=VIDEO_SIDE)
    for camera in sources:
        check_one_drift(client, camera, change_at, change_at + length)
    assert report["drift_events"] == {"drift": 2, "drift-cleared": 2}
