"""Recorded and synthetic sources are replayed at a camera's rate: frames are captured 1/fps apart (read from
their capture timestamps on a real redis-server), never early to catch up; `--fps 0` is unpaced; live sources
keep their own pace. The live status line of `patchcore up` is written only to a terminal."""
import io
import os
import threading
import time

import numpy as np
import pytest

from runtime.connection import connect
from contracts.keys import Keys
from contracts.messages import Frame
from ingest.camera import CameraIngest, IngestSettings
from ingest.sources import REPLAY_FPS, CaptureSource, FolderSource, SyntheticLine, replay_fps
from patchcore.up import LiveLine

KEYS = Keys()


def test_a_paced_synthetic_camera_captures_frames_one_interval_apart(redis_server):
    client = connect(redis_server.url)
    fps, count = 20.0, 30
    report = CameraIngest(client, SyntheticLine(seed=3), IngestSettings(camera="cam-1", fps=fps, max_frames=count),
                          KEYS, threading.Event()).run()
    assert report.frames == count
    frames = [Frame.unpack(f[b"m"]) for _, f in client.xrange(KEYS.frames("cam-1"))]
    assert [f.seq for f in frames] == list(range(count))
    gaps = np.diff([f.captured_at for f in frames])
    interval = 1.0 / fps
    assert gaps.min() >= interval - 0.002  # never faster than the camera (2 ms: wall vs monotonic clock)
    assert frames[-1].captured_at - frames[0].captured_at >= (count - 1) * interval - 0.002


class StallsOnce(SyntheticLine):
    """The synthetic line, with one read that takes 2.5 frame intervals (a slow disk, a hiccup)."""

    def read(self):
        if self._seq == 5:
            time.sleep(0.125)
        return super().read()


def test_a_late_frame_does_not_make_the_next_one_early(redis_server):
    client = connect(redis_server.url)
    CameraIngest(client, StallsOnce(seed=3), IngestSettings(camera="cam-1", fps=20.0, max_frames=10), KEYS,
                 threading.Event()).run()
    captured = [Frame.unpack(f[b"m"]).captured_at for _, f in client.xrange(KEYS.frames("cam-1"))]
    gaps = np.diff(captured)
    assert gaps[4] >= 0.12  # frame 5 came late ...
    assert gaps.min() >= 0.05 - 0.002  # ... and no frame after it was pushed early to catch up


def test_replay_rate_defaults_to_a_camera_for_recorded_sources_and_leaves_live_ones_alone(tmp_path):
    assert replay_fps(SyntheticLine(), None) == REPLAY_FPS == 10.0
    assert replay_fps(FolderSource(tmp_path), None) == REPLAY_FPS
    assert replay_fps(CaptureSource("clip.mp4", live=False), None) == REPLAY_FPS
    assert replay_fps(CaptureSource("rtsp://camera/stream", live=True), None) is None  # the camera sets the pace
    assert replay_fps(SyntheticLine(), 25) == 25.0 and replay_fps(CaptureSource(0, live=True), 5) == 5.0
    assert replay_fps(SyntheticLine(), 0) is None  # --fps 0: unthrottled, a throughput run
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="non-negative"):
            replay_fps(SyntheticLine(), bad)


def test_the_live_status_line_goes_to_a_terminal_only():
    quiet = io.StringIO()
    line = LiveLine(stream=quiet)
    line.show("frames in 3  out 2")
    assert not line.enabled and quiet.getvalue() == ""
    master, replica = os.openpty()
    with os.fdopen(replica, "w") as terminal:
        line = LiveLine(stream=terminal)
        assert line.enabled
        line.show("frames in 3  out 2")
        line.clear()
        assert not LiveLine(enabled=False, stream=terminal).enabled  # --no-progress
    written = b""
    while True:  # the terminal hands the writes over in pieces; EIO once all is read (its writer is closed)
        try:
            written += os.read(master, 1024)
        except OSError:
            break
    os.close(master)
    written = written.decode()
    assert written == "\r\x1b[Kframes in 3  out 2\r\x1b[K"
