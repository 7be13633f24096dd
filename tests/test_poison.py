"""Poison vs infrastructure, against a real redis-server: infrastructure faults keep frames pending
(never dead-lettered) and show in status; poison is isolated from good frames and bounded by the
delivery count; `patchcore deadletter list | replay | purge`."""
import json
import subprocess
import sys
import threading
import time

import cv2
import numpy as np
import pytest

from runtime.connection import connect
from runtime.deadletter import DeadLetters, DeadLetterSettings
from contracts.keys import FRAME_GROUP, Keys
from contracts.messages import Frame
from workers.banks.registry import BankRegistry
from runtime.status import collect_status
from ingest.sources import SyntheticLine
from scorer import PatchCoreScorer
from workers.outcomes import Entry as _Entry
from workers.worker import Worker, WorkerSettings

from .test_pipeline import Running, ingest, results, wait_for

KEYS = Keys()
STREAM = KEYS.frames("cam-1")
STATS = KEYS.camera_stats("cam-1")


def fault(client) -> str:
    return (client.hget(STATS, "fault") or b"").decode()


def frame_bytes(seq: int, image: np.ndarray | None = None, shape=None, data=None) -> bytes:
    image = SyntheticLine(seed=5).render(seq) if image is None else image
    data = cv2.imencode(".jpg", image)[1].tobytes() if data is None else data
    return Frame(camera="cam-1", line="l", bank="default", seq=seq, captured_at=time.time(), encoding="jpeg",
                 shape=shape or (image.shape[0], image.shape[1], 3), data=data).pack()


def bump_deliveries(client, entry_id, times: int) -> None:
    """Deliver an entry `times` more times to consumers that die with it (each XCLAIM is a delivery)."""
    for i in range(times):
        client.xclaim(STREAM, FRAME_GROUP, f"crashed-{i}", 0, [entry_id])


@pytest.mark.parametrize("prefetch", [True, False], ids=["pipelined", "unpipelined"])
def test_without_a_loadable_bank_frames_stay_pending_show_the_fault_and_are_scored_once_one_arrives(
        redis_server, synthetic_bank_bytes, prefetch):
    client = connect(redis_server.url)
    registry = BankRegistry(client, KEYS)
    tampered = registry.publish("default", synthetic_bank_bytes, activate=True)
    client.setrange(KEYS.bank_blob("default", tampered), 200, b"!")  # the only version is refused
    ingest(redis_server.url, 12)
    with Running(redis_server.url, store=False, max_batch=4, claim_idle_ms=300, retry_initial_s=0.1,
                 retry_max_s=0.4, prefetch=prefetch) as running:
        wait_for(lambda: "refused" in fault(client))
        time.sleep(2.0)  # several claim_idle_ms periods and retries
        camera = collect_status(client)["cameras"][0]
        assert "no loadable active bank 'default'" in camera["fault"] and "sha256" in camera["fault"]
        assert camera["deadlettered"] == 0 and client.xlen(KEYS.deadletter("cam-1")) == 0
        pending = client.xpending_range(STREAM, FRAME_GROUP, "-", "+", 100)
        assert len(pending) == 4  # one batch held; the other frames were not taken
        assert {p["times_delivered"] for p in pending} == {1}  # waiting is not a delivery: no poison count
        assert {p["consumer"] for p in pending} == {b"w0"}  # kept fresh: nobody reclaimed them
        good = registry.publish("default", synthetic_bank_bytes, activate=True)
        wait_for(lambda: client.xlen(KEYS.results("cam-1")) == 12)
        wait_for(lambda: fault(client) == "")
        assert running.workers[0].report.held >= 8  # retried more than once
    got = results(client)
    assert sorted(r.seq for r in got) == list(range(12)) and {r.bank_version for r in got} == {good}
    assert client.xlen(KEYS.deadletter("cam-1")) == 0 and client.xpending(STREAM, FRAME_GROUP)["pending"] == 0


@pytest.mark.parametrize("prefetch", [True, False], ids=["pipelined", "unpipelined"])
def test_a_host_that_cannot_load_its_weights_lets_another_worker_score_its_frames(
        redis_server, synthetic_bank_bytes, tmp_path, prefetch):
    client = connect(redis_server.url)
    BankRegistry(client, KEYS).publish("default", synthetic_bank_bytes, activate=True)
    ingest(redis_server.url, 6)
    stop = threading.Event()
    common = dict(refresh_s=0.2, claim_idle_ms=500, max_batch=4, device="cpu", retry_initial_s=0.2, prefetch=prefetch)
    sick = Worker(connect(redis_server.url), WorkerSettings(name="sick", weights=str(tmp_path / "gone.pth"), **common),
                  KEYS, stop)
    healthy = Worker(connect(redis_server.url), WorkerSettings(name="healthy", **common), KEYS, stop)
    threads = [threading.Thread(target=sick.run, daemon=True)]
    threads[0].start()
    try:
        wait_for(lambda: sick.report.held >= 4)
        wait_for(lambda: fault(client) != "")  # the count comes first, then the fault on the camera (holds.add)
        assert "cannot load on this host" in fault(client) and "gone.pth" in fault(client)
        assert client.xpending(STREAM, FRAME_GROUP)["pending"] == 4  # a sick host takes one batch, then no more
        threads.append(threading.Thread(target=healthy.run, daemon=True))
        threads[1].start()
        wait_for(lambda: client.xlen(KEYS.results("cam-1")) == 6)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert sorted(r.seq for r in results(client)) == list(range(6))
    assert sick.report.results == 0 and healthy.report.results == 6
    assert client.xlen(KEYS.deadletter("cam-1")) == 0 and sick.report.deadlettered == 0


def test_a_frame_whose_scoring_raises_cannot_take_good_ones_down_and_is_dead_lettered_after_n_deliveries(
        redis_server, synthetic_bank_bytes, monkeypatch):
    real_score = PatchCoreScorer.score

    def score(self, images, **kwargs):  # fault injection: the real scorer, raising for one marked image
        if any((image < 12).all() for image in images):
            raise ValueError("this frame breaks the scorer")
        return real_score(self, images, **kwargs)

    monkeypatch.setattr(PatchCoreScorer, "score", score)
    client = connect(redis_server.url)
    BankRegistry(client, KEYS).publish("default", synthetic_bank_bytes, activate=True)
    client.sadd(KEYS.cameras, "cam-1")
    payloads = [frame_bytes(seq) for seq in range(6)]
    payloads[3] = poison = frame_bytes(3, np.full((240, 320, 3), 5, np.uint8))
    for payload in payloads:
        client.xadd(STREAM, {"m": payload})
    with Running(redis_server.url, store=False, max_batch=8, claim_idle_ms=300, max_deliveries=2) as running:
        wait_for(lambda: client.xlen(KEYS.deadletter("cam-1")) == 1)
        worker = running.workers[0]
    assert sorted(r.seq for r in results(client)) == [0, 1, 2, 4, 5]  # the good frames of its batch were scored
    letters = DeadLetters(client, KEYS)
    [letter] = letters.list()
    assert letter.reason == "poison: delivered 3 times without an outcome (limit 2)"
    assert letters.payload(letter) == poison
    assert worker.report.suspects == 2 and worker.report.results == 5  # scored alone twice, never crashed
    assert client.xpending(STREAM, FRAME_GROUP)["pending"] == 0 and client.xlen(STREAM) == 0


def test_a_frame_that_killed_its_workers_is_dead_lettered_by_its_delivery_count_without_being_decoded(
        redis_server, synthetic_bank_bytes):
    client = connect(redis_server.url)
    BankRegistry(client, KEYS).publish("default", synthetic_bank_bytes, activate=True)
    client.sadd(KEYS.cameras, "cam-1")
    bomb = cv2.imencode(".jpg", np.zeros((12000, 12000), np.uint8))[1].tobytes()  # 144 Mpixel in ~1.7 MB
    entry_id = client.xadd(STREAM, {"m": frame_bytes(0, shape=(320, 320, 3), data=bomb)})
    client.xgroup_create(STREAM, FRAME_GROUP, id="0")
    client.xreadgroup(FRAME_GROUP, "crashed", {STREAM: ">"})  # delivery 1 ...
    bump_deliveries(client, entry_id, 4)  # ... to 5, each consumer died with it
    with Running(redis_server.url, store=False, claim_idle_ms=0, max_deliveries=5):  # reclaims it: delivery 6
        wait_for(lambda: client.xlen(KEYS.deadletter("cam-1")) == 1)
    [letter] = DeadLetters(client, KEYS).list()
    assert letter.reason.startswith("poison: delivered 6 times") and letter.entry_id == entry_id.decode()
    assert client.xpending(STREAM, FRAME_GROUP)["pending"] == 0


def cli(url, *args) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "patchcore", "deadletter", *args, "--redis-url", url],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def test_deadletter_cli_lists_replays_once_and_purges(redis_server, synthetic_bank_bytes):
    client = connect(redis_server.url)
    BankRegistry(client, KEYS).publish("default", synthetic_bank_bytes, activate=True)
    client.sadd(KEYS.cameras, "cam-1")
    good = frame_bytes(7)
    ids = [client.xadd(STREAM, {"m": payload}) for payload in (good, b"garbage-1", b"garbage-2")]
    client.xgroup_create(STREAM, FRAME_GROUP, id="0")
    client.xreadgroup(FRAME_GROUP, "crashed", {STREAM: ">"})
    bump_deliveries(client, ids[0], 5)  # the good frame: dead-lettered as poison by its count
    worker = Worker(client, WorkerSettings(name="w", device="cpu"), KEYS)
    worker.process([_Entry(STREAM, i, p, time.time(), d) for i, p, d in zip(ids, (good, b"garbage-1", b"garbage-2"),
                                                                              (6, 1, 1))])
    listed = [json.loads(line) for line in cli(redis_server.url, "list").stdout.splitlines()]
    assert [d["entry_id"] for d in listed] == [i.decode() for i in ids]
    assert listed[0]["reason"].startswith("poison") and "msgpack" in listed[1]["reason"]
    assert all(d["replayable"] and d["camera"] == "cam-1" for d in listed)

    assert json.loads(cli(redis_server.url, "replay", listed[0]["id"]).stdout) == {"replayed": 1, "gone": 0,
                                                                                  "no_payload": 0}
    assert json.loads(cli(redis_server.url, "replay", listed[0]["id"]).stdout)["replayed"] == 0  # once only
    [(_, fields)] = client.xrange(STREAM)
    assert fields[b"m"] == good  # the original bytes, sequence number included
    assert client.hget(STATS, "replayed") == b"1"
    with Running(redis_server.url, store=False):
        wait_for(lambda: client.xlen(KEYS.results("cam-1")) == 1)
    assert [r.seq for r in results(client)] == [7]

    assert json.loads(cli(redis_server.url, "purge", listed[1]["id"]).stdout) == {"purged": 1}
    assert [d["id"] for d in map(json.loads, cli(redis_server.url, "list").stdout.splitlines())] == [listed[2]["id"]]
    done = subprocess.run([sys.executable, "-m", "patchcore", "deadletter", "purge", "--redis-url", redis_server.url],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--all" in done.stderr  # nothing is purged without naming it
    assert json.loads(cli(redis_server.url, "purge", "--all").stdout) == {"purged": 1}
    assert client.xlen(KEYS.deadletter("cam-1")) == 0 and client.xlen(KEYS.deadletter_payloads("cam-1")) == 0


def test_dead_letters_are_bounded_in_bytes(redis_server):
    client = connect(redis_server.url)
    client.xgroup_create(STREAM, FRAME_GROUP, id="0", mkstream=True)
    settings = DeadLetterSettings(maxlen=10_000, payloads=3, payload_bytes=1000)
    letters = DeadLetters(client, KEYS, settings)
    payloads = [bytes([i]) * 500 for i in range(5)] + [b"x" * 2000]
    for payload in payloads:
        entry_id = client.xadd(STREAM, {"m": payload})
        client.xreadgroup(FRAME_GROUP, "w", {STREAM: ">"})
        assert letters.add(STREAM, FRAME_GROUP, entry_id, payload, "test", "w")
        assert not letters.add(STREAM, FRAME_GROUP, entry_id, payload, "test", "w")  # acknowledged: once only
    listed = letters.list("cam-1")
    assert len(listed) == 6 and client.xlen(KEYS.deadletter_payloads("cam-1")) == 3  # only the newest 3 payloads kept
    assert [letters.payload(d) for d in listed] == [None, None, payloads[2], payloads[3], payloads[4], None]
    assert listed[-1].size == 2000 and listed[-1].head == b"x" * 64 and listed[-1].payload_id is None
    assert letters.replay(listed[:1]) == {"replayed": [], "gone": [], "no_payload": [listed[0].id]}
    memory = client.memory_usage(KEYS.deadletter_payloads("cam-1"))
    assert memory < 3 * 1000 + 4096  # about payloads x payload_bytes, whatever was dead-lettered
    assert int(client.hget(STATS, "deadlettered")) == 6


def test_dead_letter_payloads_expire(redis_server):
    client = connect(redis_server.url)
    client.xgroup_create(STREAM, FRAME_GROUP, id="0", mkstream=True)
    letters = DeadLetters(client, KEYS, DeadLetterSettings(payload_ttl_s=0))
    for payload in (b"first", b"second"):
        entry_id = client.xadd(STREAM, {"m": payload})
        client.xreadgroup(FRAME_GROUP, "w", {STREAM: ">"})
        letters.add(STREAM, FRAME_GROUP, entry_id, payload, "test", "w")
        time.sleep(0.01)
    first, second = letters.list("cam-1")
    assert letters.payload(first) is None  # older than the TTL when the second was written
    assert letters.payload(second) == b"second"  # the newest is trimmed by the next write
