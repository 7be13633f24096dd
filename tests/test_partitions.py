"""Partitions and slow networks (issue 19) against a real redis-server, through tests/faultproxy.py's FaultProxy:
a worker or a store cut off (packets held, connections left open: a blackhole) for longer than claim_idle_ms while
another takes over what it held, then healed; replies delayed by seconds. Each frame gets exactly one result and
each anomalous result exactly one alarm (the loser's acknowledge-and-write or commit script finds the entry no
longer pending and writes nothing), and no process is stuck: the cut-off one serves again once healed."""
import threading
import time

from contracts.keys import FRAME_GROUP, STORE_GROUP, Keys
from contracts.messages import Result
from ingest.camera import CameraIngest, IngestSettings
from ingest.sources import SyntheticLine
from runtime import scripts
from runtime.connection import ClientTimeouts, connect
from store.alarms.feed import read_alarms
from store.alarms.rules import AlarmRule
from store.service import ResultsStore, StoreSettings
from workers.banks.registry import BankRegistry
from workers.worker import Worker, WorkerSettings

from .faultproxy import FaultProxy
from .test_pipeline import results, wait_for

KEYS = Keys()
CLAIM_IDLE_MS = 1500
ONE_OF_ONE = AlarmRule(k=1, n=1, cooldown_s=0)  # every anomalous result must raise its alarm


class Process:
    """A worker or store on its own thread with its own stop event."""

    def __init__(self, service):
        self.service, self.stop = service, service.stop
        self.thread = threading.Thread(target=service.run, daemon=True)
        self.thread.start()

    def end(self) -> None:
        self.stop.set()
        self.thread.join(timeout=60)
        assert not self.thread.is_alive(), "a process did not stop"


def worker(url, name, **settings) -> Process:
    return Process(Worker(connect(url), WorkerSettings(name=name, refresh_s=0.2, claim_idle_ms=CLAIM_IDLE_MS,
                                                       device="cpu", **settings), KEYS, threading.Event()))


def store(url, name) -> Process:
    return Process(ResultsStore(connect(url), StoreSettings(name=name, default_rule=ONE_OF_ONE, refresh_s=0.2,
                                                            claim_idle_ms=CLAIM_IDLE_MS), KEYS, threading.Event()))


def ingest(client, frames, seed, camera="cam-1"):
    """`frames` more frames of the synthetic line (numbered on from the camera's last)."""
    line = SyntheticLine(seed=seed, defect_rate=0.3, max_frames=frames)
    CameraIngest(client, line, IngestSettings(camera=camera, maxlen=10_000), KEYS).run()


def expected_alarms(client) -> list[int]:
    """The seqs whose result is over its threshold: with a 1-of-1 rule, each raises one alarm."""
    return sorted(r.seq for r in results(client) if r.threshold is not None and r.score >= r.threshold)


def alarm_seqs(client) -> list[int]:
    return sorted(a.seq for a in read_alarms(client, KEYS)[0])


def stat(client, name) -> int:
    return int(client.hget(KEYS.camera_stats("cam-1"), name) or 0)


def test_a_blackholed_call_times_out_and_the_same_client_works_once_healed(redis_server):
    import redis

    applied = connect(redis_server.url).connection_pool.connection_kwargs  # connect() sets every timeout itself
    assert (applied["socket_timeout"], applied["socket_connect_timeout"], applied["socket_keepalive"]) == (
        ClientTimeouts().socket_s, ClientTimeouts().connect_s, True)
    quick = ClientTimeouts(socket_s=0.5, connect_s=0.5, retries=2, backoff_cap_s=0.2)
    with FaultProxy(redis_server.port) as proxy:
        client = connect(proxy.url, timeouts=quick)
        client.set("k", "v")
        proxy.blackhole()
        started = time.monotonic()
        try:
            client.get("k")
            raise AssertionError("a call across a partition returned")
        except (redis.TimeoutError, redis.ConnectionError):
            took = time.monotonic() - started
        assert 1.5 <= took < 10, took  # each of the 3 tries waited socket_s for its reply (and the reconnects)
        proxy.heal()
        assert client.get("k") == b"v"  # the same client, by itself


def test_a_worker_cut_off_longer_than_claim_idle_writes_no_duplicate_and_serves_again(redis_server,
                                                                                      synthetic_bank_bytes):
    client = connect(redis_server.url)
    BankRegistry(client, KEYS).publish("default", synthetic_bank_bytes, activate=True)
    client.sadd(KEYS.cameras, "cam-1")
    ack_and_write = scripts.library().function("ack_and_write").encode()  # FCALL names it
    scripts.load_library(client)  # before the proxy: FUNCTION LOAD's text names every function too
    the_store = store(redis_server.url, "store-1")
    with FaultProxy(redis_server.port) as proxy:
        proxy.blackhole_on(ack_and_write)  # cut off once it has scored its first batch, before it writes
        cut_off = worker(proxy.url, "cut-off", max_batch=4)
        wait_for(lambda: cut_off.service.readiness()[0], 120)
        ingest(client, 12, seed=4)
        wait_for(lambda: proxy.holes == 1, 60)
        began = time.monotonic()
        other = worker(redis_server.url, "other", max_batch=4)  # takes the rest, and reclaims the cut-off one's
        wait_for(lambda: stat(client, "results") == 12, 120)
        wait_for(lambda: time.monotonic() - began > ClientTimeouts().socket_s + 2, 30)  # its calls time out
        assert proxy.holding and cut_off.thread.is_alive()
        proxy.heal()  # its held write reaches Redis now, and its client's retry of it too: both refused
        other.end()
        done_before = cut_off.service.report.results
        ingest(client, 6, seed=5)  # the healed worker alone serves the next frames
        wait_for(lambda: stat(client, "results") == 18, 120)
        wait_for(lambda: cut_off.service.report.results - done_before == 6, 30)
        cut_off.end()
    wait_for(lambda: len(alarm_seqs(client)) == len(expected_alarms(client)), 60)
    the_store.end()
    a, b = cut_off.service.report, other.service.report
    assert sorted(r.seq for r in results(client)) == list(range(18))  # each frame once
    assert b.reclaimed >= 1 and a.frames >= 4 + 6  # it scored its first batch, which the other worker took over
    assert a.results + b.results == 18 < a.frames + b.frames  # scored twice, written once: the loser was refused
    assert client.xpending(KEYS.frames("cam-1"), FRAME_GROUP)["pending"] == 0
    assert alarm_seqs(client) == expected_alarms(client)  # each anomalous result one alarm (late ones included)


def test_a_store_cut_off_longer_than_claim_idle_raises_no_duplicate_alarm_and_serves_again(redis_server):
    client = connect(redis_server.url)
    client.sadd(KEYS.cameras, "cam-1")
    commit = scripts.library().function("commit_results").encode()  # FCALL names it
    scripts.load_library(client)  # before the proxy: FUNCTION LOAD's text names every function too

    def add(seqs):
        for seq in seqs:
            result = Result(camera="cam-1", line="l", seq=seq, captured_at=float(seq), scored_at=time.time(),
                            score=5.0 if seq % 3 == 0 else 0.1, threshold=1.0, anomalous=seq % 3 == 0,
                            bank="default", bank_version=1, worker="w")
            client.xadd(KEYS.results("cam-1"), {"m": result.pack()})

    with FaultProxy(redis_server.port) as proxy:
        proxy.blackhole_on(commit)  # cut off once it has read results, before it commits them
        cut_off = store(proxy.url, "cut-off")
        wait_for(lambda: cut_off.service.readiness()[0], 60)
        add(range(30))
        wait_for(lambda: proxy.holes == 1, 60)
        began = time.monotonic()
        other = store(redis_server.url, "other")
        wait_for(lambda: client.hget(KEYS.latest("cam-1"), "seq") == b"29"
                 and client.xpending(KEYS.results("cam-1"), STORE_GROUP)["pending"] == 0, 60)
        wait_for(lambda: time.monotonic() - began > ClientTimeouts().socket_s + 2, 30)
        assert proxy.holding and cut_off.thread.is_alive()
        proxy.heal()
        other.end()
        before = cut_off.service.report.results
        add(range(30, 45))
        wait_for(lambda: client.hget(KEYS.latest("cam-1"), "seq") == b"44", 60)
        wait_for(lambda: cut_off.service.report.results - before == 15, 30)
        cut_off.end()
    raised = alarm_seqs(client)
    assert raised == [s for s in range(45) if s % 3 == 0]  # each once: none lost, none twice
    assert other.service.report.results >= 1  # it took over what the cut-off store held
    assert cut_off.service.report.results + other.service.report.results == 45  # each result committed once
    assert stat(client, "alarms") == 15


def test_replies_delayed_by_seconds_lose_and_duplicate_nothing(redis_server, synthetic_bank_bytes):
    # a worker and the store whose every reply takes 2.5 s, longer than claim_idle_ms: the other worker reclaims
    # frames the slow one has been handed but not yet seen; one of the two writes wins
    client = connect(redis_server.url)
    BankRegistry(client, KEYS).publish("default", synthetic_bank_bytes, activate=True)
    client.sadd(KEYS.cameras, "cam-1")
    with FaultProxy(redis_server.port) as proxy:
        slow, slow_store = worker(proxy.url, "slow", max_batch=4), store(proxy.url, "slow-store")
        wait_for(lambda: slow.service.readiness()[0], 120)
        proxy.delay(2.5)
        fast = worker(redis_server.url, "fast", max_batch=4)
        ingest(client, 16, seed=6)
        wait_for(lambda: stat(client, "results") == 16, 120)
        wait_for(lambda: len(alarm_seqs(client)) >= len(expected_alarms(client)), 60)
        time.sleep(3)  # late writes of the slow ones land meanwhile
        for process in (fast, slow, slow_store):
            process.end()
    assert sorted(r.seq for r in results(client)) == list(range(16))
    assert slow.service.report.results + fast.service.report.results == 16
    assert alarm_seqs(client) == expected_alarms(client)
    assert client.xpending(KEYS.frames("cam-1"), FRAME_GROUP)["pending"] == 0
    assert client.xpending(KEYS.results("cam-1"), STORE_GROUP)["pending"] == 0


def test_a_proxy_losing_a_share_of_replies_runs_every_command_and_loses_only_its_reply(redis_server):
    """The fault of bench/soak.py --lost-replies: a share of replies (any command) dropped, the connection closed.
    A plain RESP client (one INCR, one reply; a new connection after each closed one) sees one closed connection per
    dropped reply, while the server ran every command."""
    import socket

    import redis

    calls, failed, sock = 300, 0, None
    with FaultProxy(redis_server.port, drop_rate=0.2, seed=1, settle_s=0.05) as proxy:
        for _ in range(calls):
            sock = sock or socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
            sock.sendall(b"*2\r\n$4\r\nINCR\r\n$4\r\nruns\r\n")
            if not sock.recv(64).startswith(b":"):  # b"": closed without its reply
                failed += 1
                sock.close()
                sock = None
        counted = int(redis.Redis(port=redis_server.port).get("runs"))
    assert proxy.replies == calls and failed == proxy.dropped  # one reply per call; each dropped one is an error
    assert 0.1 * calls < proxy.dropped < 0.3 * calls  # about the share asked for (a seeded draw)
    assert counted == calls  # the command behind every lost reply ran
