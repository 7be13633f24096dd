"""Worker pipelining: the next batch is read and decoded while one is scored, and the previous one's results are
written meanwhile (once a batch has gone through cleanly); nothing is acknowledged before its result is written;
results are written in batch order; stopping finishes the batches in flight. The
promises of a worker that cannot score (one batch taken, then none) hold pipelined and not: tests/test_poison.py
runs both; so do tests/test_faults.py (SIGKILL) and tests/test_up.py."""
import threading
import time

import pytest
import redis

from runtime.connection import connect
from contracts.keys import FRAME_GROUP
from workers.worker import Worker, WorkerSettings

from .test_pipeline import KEYS, ingest, publish, results, wait_for


STAGES = {"_scored": ("scorer", "score"), "_write": ("writer", "write")}  # the stage objects' methods


class GatedWorker:
    """A pipelined worker in a thread (max batch 8; no refresh, a drain point, within a test): the `gate`d stage
    ("_scored": the scorer stage's score, or "_write": the writer's write) waits on its `at`-th call until the test
    opens the gate (the first batch goes through: pipelining starts once a batch has had its outcomes with nothing held). Records the frames of
    each batch read and decoded (`prepared`) and the thread of each call of both stages (`calls`)."""

    def __init__(self, url: str, gate: str, at: int = 2):
        self.stop, self.gate, self.reached = threading.Event(), threading.Event(), threading.Event()
        self.worker = Worker(connect(url), WorkerSettings(name="w", device="cpu", max_batch=8, max_wait_ms=10,
                                                          refresh_s=60, prefetch=True), KEYS, self.stop)
        self.prepared: list[int] = []
        self.calls: dict[str, list[str]] = {"_scored": [], "_write": []}
        prepare = self.worker.reader.prepare

        def counted(batch):
            self.prepared.append(len(batch))
            return prepare(batch)

        self.worker.reader.prepare = counted
        for stage, calls in self.calls.items():
            owner, method = getattr(self.worker, STAGES[stage][0]), STAGES[stage][1]
            setattr(owner, method, self._wrap(getattr(owner, method), calls, at if stage == gate else 0))
        self.thread = threading.Thread(target=self.worker.run, daemon=True)

    def _wrap(self, original, calls: list[str], at: int):
        def stage(*args):
            calls.append(threading.current_thread().name)
            if len(calls) == at:
                self.reached.set()
                assert self.gate.wait(120)
            return original(*args)
        return stage

    def __enter__(self) -> "GatedWorker":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.gate.set()
        self.stop.set()
        self.thread.join(timeout=60)


def test_the_next_batch_is_read_and_decoded_while_one_is_scored(redis_server, synthetic_bank_bytes):
    client = connect(redis_server.url)
    publish(client, synthetic_bank_bytes)
    ingest(redis_server.url, 24)
    with GatedWorker(redis_server.url, "_scored") as gated:
        wait_for(gated.reached.is_set)  # batch 2 is being scored
        wait_for(lambda: len(gated.prepared) >= 3)  # batch 3 read from Redis and decoded meanwhile
        assert gated.prepared[:3] == [8, 8, 8]
        assert client.xpending(KEYS.frames("cam-1"), FRAME_GROUP)["pending"] == 16  # 2 and 3 held, unacknowledged
        assert len(results(client)) == 8  # batch 1's; nothing of batch 2 written before its scoring finished
        gated.gate.set()
        wait_for(lambda: len(results(client)) == 24)
    assert len({r.seq for r in results(client)}) == 24  # each frame once
    assert client.xpending(KEYS.frames("cam-1"), FRAME_GROUP)["pending"] == 0
    assert gated.worker.report.results == 24 and gated.worker.report.batches == 3


def test_a_batch_collected_while_one_is_scored_takes_every_frame_that_arrives_meanwhile(redis_server,
                                                                                      synthetic_bank_bytes):
    """Pipelined batches are as large as unpipelined ones at the same load: the batch being collected stays open
    (past max_wait_ms) until the scorer is free, instead of going on in small, costly batches."""
    client = connect(redis_server.url)
    publish(client, synthetic_bank_bytes)
    ingest(redis_server.url, 8)
    with GatedWorker(redis_server.url, "_scored") as gated:
        wait_for(lambda: len(results(client)) == 8)
        ingest(redis_server.url, 1, seed=1)
        wait_for(gated.reached.is_set)  # batch 2 (one frame) is being scored ...
        ingest(redis_server.url, 3, seed=2)  # ... while 3 frames arrive, and 3 more 0.3 s (30 x max_wait_ms) later
        time.sleep(0.3)
        ingest(redis_server.url, 3, seed=3)
        time.sleep(0.3)
        assert gated.prepared == [8, 1]  # batch 3 is still open
        gated.gate.set()
        wait_for(lambda: len(results(client)) == 15)
    assert gated.prepared == [8, 1, 6]
    assert [r.seq for r in results(client)] == list(range(15))


def test_results_are_written_while_the_next_batch_is_scored_and_in_order(redis_server, synthetic_bank_bytes):
    client = connect(redis_server.url)
    publish(client, synthetic_bank_bytes)
    ingest(redis_server.url, 24)
    with GatedWorker(redis_server.url, "_write") as gated:
        wait_for(gated.reached.is_set)  # batch 2's results wait to be written ...
        wait_for(lambda: len(gated.calls["_scored"]) >= 3)  # ... while batch 3 is scored
        assert client.xpending(KEYS.frames("cam-1"), FRAME_GROUP)["pending"] == 16  # 2 and 3: unacknowledged
        assert len(results(client)) == 8 and len(gated.calls["_write"]) == 2  # batch 3's results wait for batch 2's
        gated.gate.set()
        wait_for(lambda: len(results(client)) == 24)
    assert [r.seq for r in results(client)] == list(range(24))  # each frame once, in the order they arrived
    assert all(name.startswith("score") for name in gated.calls["_scored"])  # scored off the loop ...
    assert all(name.startswith("write") for name in gated.calls["_write"])  # ... and written off the scorer
    assert client.xpending(KEYS.frames("cam-1"), FRAME_GROUP)["pending"] == 0 and gated.worker.report.results == 24


def test_stopping_finishes_the_batch_in_flight(redis_server, synthetic_bank_bytes):
    client = connect(redis_server.url)
    publish(client, synthetic_bank_bytes)
    ingest(redis_server.url, 8)
    stop = threading.Event()
    worker = Worker(connect(redis_server.url), WorkerSettings(name="w", device="cpu", max_batch=8, refresh_s=60, prefetch=True),
                    KEYS, stop)
    score = worker.scorer.score

    def stop_then_score(decoded):  # the stop arrives while the batch is in flight
        stop.set()
        return score(decoded)

    worker.scorer.score = stop_then_score
    worker.run()
    assert len(results(client)) == 8 and client.xpending(KEYS.frames("cam-1"), FRAME_GROUP)["pending"] == 0


def test_a_worker_without_cameras_sees_the_first_one_at_once(redis_server, synthetic_bank_bytes):
    """The first camera's frames are read within a tick, not after the worker's next refresh (every 60 s here)."""
    client = connect(redis_server.url)
    publish(client, synthetic_bank_bytes)
    stop = threading.Event()
    worker = Worker(connect(redis_server.url), WorkerSettings(name="w", device="cpu", refresh_s=60), KEYS, stop)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        time.sleep(1.0)  # the worker has refreshed once, found no camera, and idles
        ingest(redis_server.url, 1)
        wait_for(lambda: len(results(client)) == 1, timeout=20)
    finally:
        stop.set()
        thread.join(timeout=60)


def test_a_batch_being_collected_when_redis_fails_is_kept_for_the_next_one(redis_server, synthetic_bank_bytes):
    """Frames already read into a batch that is still open (the scorer busy) are not dropped to wait for a
    reclaim when a read fails: they go first once Redis answers again, with no extra delivery."""
    client = connect(redis_server.url)
    publish(client, synthetic_bank_bytes)
    ingest(redis_server.url, 2)
    worker = Worker(connect(redis_server.url), WorkerSettings(name="w", device="cpu", max_batch=8, max_wait_ms=10,
                                                              refresh_s=60), KEYS)
    worker._maybe_refresh()  # the camera's stream is known
    worker.reader.streams.read_own("w")  # what a first collect does: nothing was pending to "w"
    worker._scoring = True  # a batch is being scored: the one being collected stays open
    read_blocking = worker.reader.streams.read_blocking

    def lost(*args, **kwargs):
        raise redis.ConnectionError("connection lost")

    worker.reader.streams.read_blocking = lost
    with pytest.raises(redis.ConnectionError):
        worker._collect()
    worker.reader.streams.read_blocking, worker._scoring = read_blocking, False
    batch = worker._collect()
    assert [e.entry_id for e in batch] == [i for i, _ in client.xrange(KEYS.frames("cam-1"))]  # both, in order
    worker.process(batch)
    assert [r.seq for r in results(client)] == [0, 1]
    assert client.xpending(KEYS.frames("cam-1"), FRAME_GROUP)["pending"] == 0
