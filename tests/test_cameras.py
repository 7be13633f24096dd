"""Camera faults and back-pressure against a real redis-server."""
import threading

from runtime.connection import connect
from contracts.keys import Keys
from runtime.status import collect_status
from ingest.camera import CameraIngest, IngestSettings
from ingest.sources import CaptureSource, SourceError, SyntheticLine

KEYS = Keys()


class FlakyCamera(SyntheticLine):
    """A live camera (the synthetic line) that drops out for a few reads at given frame counts."""

    def __init__(self, outages: dict[int, int], **kwargs):
        super().__init__(live=True, **kwargs)
        self.outages = dict(outages)  # frame count -> failing reads
        self.opens = 0
        self.reads = 0

    def open(self) -> None:
        self.opens += 1

    def read(self):
        failing = self.outages.get(self._seq, 0)
        if failing:
            self.outages[self._seq] = failing - 1
            raise SourceError("stream stalled")
        return super().read()


def test_a_failing_camera_reconnects_with_backoff_and_other_cameras_carry_on(redis_server):
    client = connect(redis_server.url)
    flaky = FlakyCamera({5: 3, 12: 2}, max_frames=20)
    steady = SyntheticLine(seed=2, max_frames=20)
    runs = {}
    threads = [threading.Thread(target=lambda name=name, src=src: runs.__setitem__(name, CameraIngest(
        client, src, IngestSettings(camera=name, backoff_initial_s=0.05, backoff_max_s=0.2), KEYS).run()))
               for name, src in (("flaky", flaky), ("steady", steady))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert runs["flaky"].frames == 20 and runs["flaky"].source_errors == 5
    assert flaky.opens == 5  # reopened after each failed read
    assert runs["steady"].frames == 20 and runs["steady"].source_errors == 0
    assert client.xlen(KEYS.frames("flaky")) == 20 and client.xlen(KEYS.frames("steady")) == 20


def test_a_dead_camera_is_visible_in_status(redis_server):
    client = connect(redis_server.url)
    stop = threading.Event()
    dead = CaptureSource("rtsp://127.0.0.1:9/none", live=True, timeout_s=0.5)
    runner = threading.Thread(target=CameraIngest(client, dead, IngestSettings(camera="cam-dead", backoff_initial_s=0.05,
                                                                               backoff_max_s=0.1), KEYS, stop).run)
    runner.start()
    try:
        import time

        deadline = time.time() + 30
        state = ""
        while time.time() < deadline and "cannot open" not in state:
            cams = {c["camera"]: c for c in collect_status(client)["cameras"]}
            state = cams.get("cam-dead", {}).get("state", "")
            time.sleep(0.1)
        assert "cannot open" in state
    finally:
        stop.set()
        runner.join(timeout=30)


def test_without_workers_a_live_stream_stays_bounded_and_counts_its_drops(redis_server):
    client = connect(redis_server.url)
    live = SyntheticLine(seed=1, live=True, max_frames=600, width=64, height=48)
    report = CameraIngest(client, live, IngestSettings(camera="cam-1", maxlen=50), KEYS).run()
    length = client.xlen(KEYS.frames("cam-1"))
    assert length <= 50 + 100  # approximate trimming works in whole nodes of 100 entries
    assert report.dropped == 600 - length
    status = collect_status(client)["cameras"][0]
    assert status["dropped"] == report.dropped and status["ingested"] == 600
