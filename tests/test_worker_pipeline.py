"""Worker pipelining: the next batch is read and decoded while one is scored (once a batch has gone through
cleanly); nothing is acknowledged before its result is written; stopping finishes the batch in flight. The
promises of a worker that cannot score (one batch taken, then none) hold with prefetch: tests/test_poison.py
runs with the default, and was run with prefetch on too."""
import threading

from contracts.connection import connect
from contracts.keys import FRAME_GROUP
from workers.worker import Worker, WorkerSettings

from .test_pipeline import KEYS, ingest, publish, results, wait_for


def test_the_next_batch_is_read_and_decoded_while_one_is_scored(redis_server, synthetic_bank_bytes):
    client = connect(redis_server.url)
    publish(client, synthetic_bank_bytes)
    ingest(redis_server.url, 24)
    stop = threading.Event()
    # refresh_s: no refresh (a drain point) falls between the two batches this test watches
    worker = Worker(connect(redis_server.url), WorkerSettings(name="w", device="cpu", max_batch=8, max_wait_ms=10,
                                                              refresh_s=60, prefetch=True), KEYS, stop)
    gate, scoring = threading.Event(), threading.Event()
    prepared: list[int] = []
    scored: list[int] = []
    outcomes, prepare = worker._outcomes, worker._prepare

    def gated(decoded):  # the second batch's scoring waits until the test has looked (the first goes through:
        scored.append(1)  # prefetching starts once a batch has had its outcomes with nothing held)
        if len(scored) == 2:
            scoring.set()
            assert gate.wait(120)
        return outcomes(decoded)

    def counted(batch):
        decoded = prepare(batch)
        prepared.append(sum(len(items) for items in decoded.values()))
        return decoded

    worker._outcomes, worker._prepare = gated, counted
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        wait_for(scoring.is_set)
        wait_for(lambda: len(prepared) >= 3)  # batch 3 read from Redis and decoded while batch 2 is being scored
        assert prepared[:3] == [8, 8, 8]
        assert client.xpending(KEYS.frames("cam-1"), FRAME_GROUP)["pending"] == 16  # 2 and 3 held, unacknowledged
        assert len(results(client)) == 8  # batch 1's; nothing of batch 2 written before its scoring finished
        gate.set()
        wait_for(lambda: len(results(client)) == 24)
    finally:
        gate.set()
        stop.set()
        thread.join(timeout=60)
    assert len({r.seq for r in results(client)}) == 24  # each frame once
    assert client.xpending(KEYS.frames("cam-1"), FRAME_GROUP)["pending"] == 0
    assert worker.report.results == 24 and worker.report.batches == 3


def test_stopping_finishes_the_batch_in_flight(redis_server, synthetic_bank_bytes):
    client = connect(redis_server.url)
    publish(client, synthetic_bank_bytes)
    ingest(redis_server.url, 8)
    stop = threading.Event()
    worker = Worker(connect(redis_server.url), WorkerSettings(name="w", device="cpu", max_batch=8, refresh_s=60, prefetch=True),
                    KEYS, stop)
    outcomes = worker._outcomes

    def stop_then_score(decoded):  # the stop arrives while the batch is in flight
        stop.set()
        return outcomes(decoded)

    worker._outcomes = stop_then_score
    worker.run()
    assert len(results(client)) == 8 and client.xpending(KEYS.frames("cam-1"), FRAME_GROUP)["pending"] == 0
