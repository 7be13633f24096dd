"""Every process (ingest, worker, store) rides out what a real redis-server replies when it is full
(OOM under noeviction), demoted to a replica (READONLY), loading its data (LOADING) or has lost a
stream and its consumer groups (NOGROUP): it backs off and carries on, and no frame is lost to it,
scored twice or dead-lettered."""
import threading
import time

import pytest
import redis

from runtime.connection import connect
from contracts.keys import FRAME_GROUP, Keys
from workers.banks.registry import BankRegistry
from runtime.status import collect_status
from runtime.streams import redis_fault
from ingest.camera import CameraIngest, IngestSettings
from ingest.sources import SyntheticLine
from patchcore.embedded_redis import EmbeddedRedis, free_port
from store.service import ResultsStore, StoreSettings
from workers.worker import Worker, WorkerSettings

from .test_pipeline import Running, results, wait_for

KEYS = Keys()
FRAMES = 40


class Pipeline(Running):
    """A camera, a worker and the store in threads, each on its own connection; errors are kept."""

    def __init__(self, url: str, frames: int = FRAMES):  # its own processes; Running gives __enter__ and __exit__
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.ingest = CameraIngest(connect(url), SyntheticLine(seed=1, max_frames=frames),
                                   IngestSettings(camera="cam-1", fps=10, maxlen=10_000, backoff_initial_s=0.1,
                                                  backoff_max_s=0.5), KEYS, self.stop)
        self.worker = Worker(connect(url), WorkerSettings(name="w", refresh_s=0.2, claim_idle_ms=2000, device="cpu",
                                                          max_batch=4, retry_initial_s=0.1, retry_max_s=0.5), KEYS, self.stop)
        self.store = ResultsStore(connect(url), StoreSettings(refresh_s=0.2, claim_idle_ms=2000), KEYS, self.stop)
        self.threads = [threading.Thread(target=self._guard, args=(p.run,), daemon=True)
                        for p in (self.ingest, self.worker, self.store)]

    def _guard(self, run) -> None:
        try:
            run()
        except BaseException as exc:  # noqa: BLE001 - the test asserts there are none
            self.errors.append(exc)

    def serving(self) -> bool:
        return not self.errors and self.threads[1].is_alive() and self.threads[2].is_alive()


def faults_logged(caplog) -> set[str]:
    return {r.fields.get("fault") for r in caplog.records if hasattr(r, "fields")}


def oom(client):
    client.config_set("maxmemory", 1)  # noeviction is the default policy: every write that may grow memory is refused
    return lambda: client.config_set("maxmemory", 0)


def readonly(client):
    client.execute_command("REPLICAOF", "127.0.0.1", free_port())  # demoted; its primary never answers
    return lambda: client.execute_command("REPLICAOF", "NO", "ONE")


@pytest.mark.parametrize("fault,condition,reply", [(oom, "memory full", "oom"), (readonly, "read-only replica", "readonly")])
def test_every_process_rides_out_a_full_or_read_only_redis(redis_server, synthetic_bank_bytes, fault, condition, reply,
                                                           caplog):
    client = connect(redis_server.url)
    BankRegistry(client, KEYS).publish("default", synthetic_bank_bytes, activate=True)
    with Pipeline(redis_server.url) as pipeline:
        wait_for(lambda: client.xlen(KEYS.results("cam-1")) >= 4)
        clear = fault(client)
        written = client.xlen(KEYS.results("cam-1"))
        time.sleep(4)
        assert client.xlen(KEYS.results("cam-1")) == written  # really refused: nothing written meanwhile
        assert any(condition in f for f in collect_status(client)["redis_faults"])
        assert pipeline.serving(), pipeline.errors
        assert reply in faults_logged(caplog)  # the processes did get those replies
        clear()
        wait_for(lambda: pipeline.store.report.results >= FRAMES, timeout=180)
        assert pipeline.serving(), pipeline.errors
    assert pipeline.errors == []
    assert sorted(r.seq for r in results(client)) == list(range(FRAMES))  # each frame once
    assert client.xlen(KEYS.deadletter("cam-1")) == 0 and client.xpending(KEYS.frames("cam-1"), FRAME_GROUP)["pending"] == 0
    assert collect_status(client)["redis_faults"] == []


def test_every_process_rides_out_a_lost_stream_and_its_groups(redis_server, synthetic_bank_bytes, caplog):
    client = connect(redis_server.url)
    BankRegistry(client, KEYS).publish("default", synthetic_bank_bytes, activate=True)
    with Pipeline(redis_server.url) as pipeline:
        wait_for(lambda: client.xlen(KEYS.results("cam-1")) >= 4)
        with client.pipeline(transaction=True) as pipe:  # data loss: both streams, with their groups
            pipe.hget(KEYS.camera_stats("cam-1"), "last_seq")
            pipe.delete(KEYS.frames("cam-1"), KEYS.results("cam-1"))
            last_seq = int(pipe.execute()[0])
        wait_for(lambda: pipeline.store.report.results > 0 and client.hget(KEYS.latest("cam-1"), "seq") == b"%d" % (FRAMES - 1),
                 timeout=180)
        assert pipeline.serving(), pipeline.errors
    seqs = [r.seq for r in results(client)]
    assert "nogroup" in faults_logged(caplog)
    assert len(seqs) == len(set(seqs))  # nothing twice
    assert set(range(last_seq + 1, FRAMES)) <= set(seqs)  # every frame sent after the loss was scored
    assert pipeline.errors == [] and client.xlen(KEYS.deadletter("cam-1")) == 0


def test_every_process_rides_out_a_restart_that_loads_its_data(tmp_path, synthetic_bank_bytes):
    port, data = free_port(), tmp_path / "redis-data"
    data.mkdir()
    server = EmbeddedRedis(port=port, appendonly=True, data_dir=data).start()
    client = connect(server.url)
    BankRegistry(client, KEYS).publish("default", synthetic_bank_bytes, activate=True)
    with client.pipeline(transaction=False) as pipe:  # enough keys that loading them takes seconds (below)
        for i in range(20_000):
            pipe.set(f"junk:{i}", i)
        pipe.execute()
    slow_load = ["--key-load-delay", "200", "--loading-process-events-interval-bytes", "1024"]
    try:
        with Pipeline(server.url) as pipeline:
            wait_for(lambda: client.xlen(KEYS.results("cam-1")) >= 4)
            client.bgrewriteaof()  # the AOF's base becomes an RDB snapshot, which loads key by key
            wait_for(lambda: client.info("persistence")["aof_rewrite_in_progress"] == 0)
            server.stop()
            server = EmbeddedRedis(port=port, appendonly=True, data_dir=data, extra_args=slow_load).start()
            probe = redis.Redis(port=port)  # no retries: sees what the processes see
            with pytest.raises(redis.BusyLoadingError):
                probe.ping()
            wait_for(lambda: probe.info("persistence")["loading"] == 0, timeout=120)
            wait_for(lambda: pipeline.store.report.results >= FRAMES and
                     client.xlen(KEYS.results("cam-1")) >= FRAMES, timeout=180)
            assert pipeline.serving(), pipeline.errors
        assert pipeline.errors == []
        assert sorted(r.seq for r in results(client)) == list(range(FRAMES))
        assert client.xlen(KEYS.deadletter("cam-1")) == 0
    finally:
        server.stop()


def test_redis_fault_names_the_replies_that_pass_and_no_others():
    assert redis_fault(redis.exceptions.OutOfMemoryError("command not allowed when used memory > 'maxmemory'")) == "oom"
    assert redis_fault(redis.exceptions.ReadOnlyError("You can't write against a read only replica.")) == "readonly"
    assert redis_fault(redis.BusyLoadingError("Redis is loading the dataset in memory")) == "loading"
    assert redis_fault(redis.ResponseError("NOGROUP No such key 'pc:frames:c' or consumer group 'workers'")) == "nogroup"
    assert redis_fault(redis.ResponseError(  # Redis 6.2 wraps a script's error
        "Error running script (call to f_1): @user_script:4: @user_script: 4: -OOM command not allowed")) == "oom"
    assert redis_fault(redis.ConnectionError("Connection refused")) == "outage"
    assert redis_fault(redis.ResponseError("MISCONF Errors writing to the AOF file: No space left on device")) == "misconf"
    assert redis_fault(redis.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value")) is None
    assert redis_fault(redis.ResponseError("BUSYGROUP Consumer Group name already exists")) is None
    assert redis_fault(redis.exceptions.NoPermissionError("this user has no permissions")) is None


def test_a_camera_stopped_during_an_outage_counts_only_the_frames_redis_took(redis_server):
    """Stopped while Redis refuses its frame (full): the frame in hand is not reported as sent."""
    client = connect(redis_server.url)
    stop = threading.Event()
    ingest = CameraIngest(connect(redis_server.url), SyntheticLine(seed=1, max_frames=1000),
                          IngestSettings(camera="cam-1", fps=20, backoff_initial_s=0.1, backoff_max_s=0.2), KEYS, stop)
    reports = []
    runner = threading.Thread(target=lambda: reports.append(ingest.run()), daemon=True)
    runner.start()
    wait_for(lambda: client.xlen(KEYS.frames("cam-1")) >= 5)
    clear = oom(client)
    try:
        time.sleep(1.0)  # the camera is now retrying a refused frame
        stop.set()
        runner.join(timeout=30)
    finally:
        clear()
    assert not runner.is_alive() and len(reports) == 1
    report = reports[0]
    assert report.frames == client.xlen(KEYS.frames("cam-1")) == int(client.hget(KEYS.camera_stats("cam-1"), "ingested"))
    assert "Redis outage" in report.ended and f"frame {report.frames} " in report.ended
