"""The least-privilege roles of deploy/redis/users.acl, rendered by deploy/redis/render-acl.sh and loaded by a real
redis-server (>= 7.0: the file uses read-only key patterns), each tried with the project's own code."""
import json
import re
import shutil
import subprocess
import threading
import time

import pytest
import redis
from typer.testing import CliRunner

from store.alarms.feed import read_alarms
from runtime.connection import connect
from contracts.keys import Keys
from contracts.messages import Alarm, DriftEvent
from runtime import scripts
from workers.banks.registry import BankRegistry
from ingest.camera import CameraIngest, IngestSettings
from ingest.sources import SyntheticLine
from patchcore.cli import app
from patchcore.embedded_redis import EmbeddedRedis, find_redis_server
from store.alarms.rules import AlarmRule
from store.service import ResultsStore, StoreSettings
from workers.worker import Worker, WorkerSettings

from .conftest import ROOT
from .test_pipeline import results, wait_for

KEYS = Keys()
USERS = ["camera-cam-1", "camera-cam-2", "worker", "store", "sink", "operator", "viewer"]
DENIED = redis.exceptions.NoPermissionError


def redis7() -> str | None:
    for candidate in filter(None, [shutil.which("redis-server"), "/usr/bin/redis-server", find_redis_server()]):
        try:
            version = subprocess.run([candidate, "--version"], capture_output=True, text=True).stdout
        except OSError:
            continue
        if (found := re.search(r"v=(\d+)\.", version)) and int(found.group(1)) >= 7:
            return candidate
    return None


pytestmark = pytest.mark.skipif(redis7() is None, reason="the ACL file needs redis-server >= 7.0")


class AclServer:
    def __init__(self, port: int, secrets):
        self.port, self.secrets = port, secrets

    def password(self, user: str) -> str:
        return (self.secrets / user).read_text().strip()

    def url(self, user: str) -> str:
        return f"redis://{user}:{self.password(user)}@127.0.0.1:{self.port}/0"

    def client(self, user: str) -> redis.Redis:
        return connect(self.url(user))


@pytest.fixture
def acl_server(tmp_path):
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    for user in USERS:
        (secrets / user).write_text(f"pw-{user}-0123456789\n")
    acl = tmp_path / "users.acl"
    subprocess.run(["sh", str(ROOT / "deploy/redis/render-acl.sh"), str(ROOT / "deploy/redis/users.acl"), str(secrets),
                    str(acl)], env={"CAMERAS": "cam-1 cam-2", "PATH": "/usr/bin:/bin"}, check=True)
    text = acl.read_text()
    assert "pw-" not in text and text.count("user camera-") == 2  # hashed, one user per camera
    with EmbeddedRedis(binary=redis7(), extra_args=["--aclfile", str(acl)]) as server:
        yield AclServer(server.port, secrets)


def frames_into(url: str, camera: str, count: int, defect_rate: float = 0.3) -> SyntheticLine:
    line = SyntheticLine(seed=4, defect_rate=defect_rate, max_frames=count)
    report = CameraIngest(connect(url), line, IngestSettings(camera=camera, maxlen=1000), KEYS).run()
    assert report.frames == count
    return line


def test_nobody_connects_without_a_user(acl_server):
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=acl_server.port).set("pc:x", 1)
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=acl_server.port, username="worker", password="wrong").ping()


def test_a_camera_adds_frames_to_its_own_stream_and_nothing_else(acl_server, synthetic_bank_bytes):
    frames_into(acl_server.url("camera-cam-1"), "cam-1", 3)
    operator = acl_server.client("operator")
    assert operator.xlen(KEYS.frames("cam-1")) == 3
    assert int(operator.hget(KEYS.camera_stats("cam-1"), "ingested")) == 3
    camera = acl_server.client("camera-cam-1")
    assert operator.get(KEYS.preview("cam-1"))[:2] == b"\xff\xd8"  # its preview JPEG; SET on no other key:
    for key in (KEYS.cameras, KEYS.preview("cam-2"), KEYS.camera_stats("cam-1")):
        with pytest.raises(DENIED):
            camera.set(key, b"x")
    registry = BankRegistry(camera, KEYS)
    with pytest.raises(DENIED):
        registry.publish("default", synthetic_bank_bytes, activate=True)
    version = BankRegistry(operator, KEYS).publish("default", synthetic_bank_bytes)
    with pytest.raises(DENIED):
        registry.activate("default", version)
    with pytest.raises(DENIED):
        camera.set(KEYS.bank_active("default"), version)
    with pytest.raises(DENIED):
        camera.hset(KEYS.alarm_rules, "cam-1", json.dumps({"k": 1, "n": 1, "cooldown_s": 0, "threshold": 1e9}))
    with pytest.raises(DENIED):
        camera.xadd(KEYS.results("cam-1"), {"m": b"forged"})
    with pytest.raises(DENIED):
        camera.xadd(KEYS.frames("cam-2"), {"m": b"into another camera's stream"})
    with pytest.raises(DENIED):
        camera.xreadgroup("workers", "me", {KEYS.frames("cam-1"): ">"})
    with pytest.raises(DENIED):
        camera.xadd(KEYS.alarms("cam-1"), {"m": b"forged"})
    with pytest.raises(DENIED):
        camera.publish(KEYS.alarms_channel, b"forged")
    # a script runs with the caller's rights: its declared keys, and the keys it touches undeclared, are checked
    append = camera.register_script("return redis.call('XADD', ARGV[1], '*', 'm', 'forged')")
    with pytest.raises(DENIED):
        append(keys=[KEYS.results("cam-1")], args=[KEYS.results("cam-1")])
    with pytest.raises(redis.ResponseError, match="can't access|No permissions"):  # Redis 7.0 | Valkey 8 wording
        append(keys=[KEYS.frames("cam-1")], args=[KEYS.results("cam-1")])
    assert operator.xlen(KEYS.results("cam-1")) == 0
    assert operator.get(KEYS.bank_active("default")) is None and operator.hlen(KEYS.alarm_rules) == 0
    denied = CliRunner().invoke(app, ["bank", "activate", "default", str(version), "--redis-url",
                                      acl_server.url("camera-cam-1")])
    assert denied.exit_code != 0 and acl_server.password("camera-cam-1") not in denied.output


def test_a_worker_cannot_publish_banks_or_change_rules(acl_server, synthetic_bank_bytes):
    worker = acl_server.client("worker")
    operator = BankRegistry(acl_server.client("operator"), KEYS)
    version = operator.publish("default", synthetic_bank_bytes, activate=True)
    assert BankRegistry(worker, KEYS).fetch("default", version) == synthetic_bank_bytes  # it reads banks
    with pytest.raises(DENIED):
        BankRegistry(worker, KEYS).publish("default", synthetic_bank_bytes)
    second = operator.publish("default", synthetic_bank_bytes)
    with pytest.raises(redis.ResponseError):  # the queued SET is refused, the transaction aborted
        BankRegistry(worker, KEYS).activate("default", second)
    with pytest.raises(DENIED):
        worker.setrange(KEYS.bank_blob("default", version), 100, b"X")
    with pytest.raises(DENIED):
        worker.hset(KEYS.alarm_rules, "cam-1", "{}")
    with pytest.raises(DENIED):
        worker.xadd(KEYS.alarms("cam-1"), {"m": b"forged"})
    with pytest.raises(DENIED):
        worker.hset(KEYS.latest("cam-1"), "score", 0)
    with pytest.raises(DENIED):
        worker.flushall()
    assert operator.active("default") == version


def test_the_store_and_the_viewer(acl_server, synthetic_bank_bytes):
    store, viewer = acl_server.client("store"), acl_server.client("viewer")
    with pytest.raises(DENIED):
        BankRegistry(store, KEYS).publish("default", synthetic_bank_bytes)
    with pytest.raises(DENIED):
        store.hset(KEYS.alarm_rules, "cam-1", "{}")
    with pytest.raises(DENIED):
        store.xadd(KEYS.frames("cam-1"), {"m": b"x"})
    with pytest.raises(DENIED):
        store.set(KEYS.overlay("cam-1", 1), b"x")  # it reads overlays, never writes them
    frames_into(acl_server.url("camera-cam-1"), "cam-1", 2)
    BankRegistry(acl_server.client("operator"), KEYS).publish("default", synthetic_bank_bytes, activate=True)
    status = CliRunner().invoke(app, ["status", "--json", "--redis-url", acl_server.url("viewer")])
    assert status.exit_code == 0, status.output
    assert json.loads(status.output)["cameras"][0]["ingested"] == 2
    assert acl_server.password("viewer") not in status.output
    assert viewer.xrange(KEYS.frames("cam-1")) and viewer.get(KEYS.bank_active("default")) == b"1"
    for write in (lambda: viewer.set("pc:x", 1), lambda: viewer.xadd(KEYS.alarms("cam-1"), {"m": b"x"}),
                  lambda: viewer.hset(KEYS.alarm_rules, "cam-1", "{}"), lambda: viewer.publish(KEYS.alarms_channel, b"x"),
                  lambda: viewer.xgroup_create(KEYS.alarms("cam-1"), "mine", mkstream=True),
                  lambda: viewer.delete(KEYS.frames("cam-1")), lambda: viewer.incr(KEYS.bank_counter("default"))):
        with pytest.raises(DENIED):
            write()
    with pytest.raises(DENIED):
        BankRegistry(viewer, KEYS).publish("default", synthetic_bank_bytes)
    operator = acl_server.client("operator")
    with pytest.raises(DENIED):
        operator.config_set("appendonly", "no")
    with pytest.raises(DENIED):
        operator.flushall()
    with pytest.raises(DENIED):
        operator.set("other:key", 1)


def test_the_store_writes_drift_events_and_the_viewer_cannot(acl_server):
    event = DriftEvent(camera="cam-1", kind="drift", n=1, seq=40, at=1.0)

    def write_event(client):
        return scripts.commit_drift(scripts.load(client, "commit_drift"), state=KEYS.alarm_state("cam-1"),
                                    drift=KEYS.drift("cam-1"), stats=KEYS.camera_stats("cam-1"), version=0,
                                    window=None, maxlen=100, channel=KEYS.drift_channel,
                                    events=[scripts.NewEvent(1, event.pack())])

    with pytest.raises(DENIED):
        write_event(acl_server.client("viewer"))
    assert write_event(acl_server.client("store")) == 1
    assert [DriftEvent.unpack(f[b"m"]) for _, f in acl_server.client("viewer").xrange(KEYS.drift("cam-1"))] == [event]


def test_the_whole_pipeline_runs_with_each_process_on_its_own_role(acl_server, synthetic_bank_bytes, tmp_path):
    bank, key = tmp_path / "b.bank", tmp_path / "bank.key"
    bank.write_bytes(synthetic_bank_bytes)
    key.write_text("s" * 64)
    published = CliRunner().invoke(app, ["bank", "publish", str(bank), "--name", "default", "--activate",
                                         "--signing-key-file", str(key), "--redis-url", acl_server.url("operator")])
    assert published.exit_code == 0 and json.loads(published.output)["signed"], published.output
    # a camera's sensitivity, set by the operator and read by the worker (factor 1: the bank's threshold)
    sensitivity = CliRunner().invoke(app, ["camera", "set", "cam-1", "--threshold-factor", "1",
                                           "--redis-url", acl_server.url("operator")])
    assert sensitivity.exit_code == 0, sensitivity.output
    listener = acl_server.client("viewer").pubsub(ignore_subscribe_messages=True)
    listener.subscribe(KEYS.alarms_channel)
    stop = threading.Event()
    worker = Worker(acl_server.client("worker"), WorkerSettings(name="w1", refresh_s=0.2, max_batch=4,
                                                                bank_key=key.read_bytes()), KEYS, stop)
    store = ResultsStore(acl_server.client("store"), StoreSettings(default_rule=AlarmRule(k=1, n=1, cooldown_s=0),
                                                                   refresh_s=0.2), KEYS, stop)
    threads = [threading.Thread(target=worker.run, daemon=True), threading.Thread(target=store.run, daemon=True)]
    for thread in threads:
        thread.start()
    try:
        line = frames_into(acl_server.url("camera-cam-1"), "cam-1", 16)
        acl_server.client("camera-cam-1").xadd(KEYS.frames("cam-1"), {"m": b"not a frame"})  # poison, own stream
        wait_for(lambda: store.report.results == 16 and worker.report.deadlettered == 1)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    viewer = acl_server.client("viewer")
    got = results(viewer)
    assert sorted(r.seq for r in got) == list(range(16)) and {r.bank_version for r in got} == {1}
    assert {r.settings_version for r in got} == {json.loads(sensitivity.output)["version"]}
    trail = [json.loads(line) for line in CliRunner().invoke(app, ["audit", "--json", "--redis-url",
                                                                   acl_server.url("viewer")]).output.splitlines()]
    assert [(e["action"], e["who"]) for e in trail] == [("bank.publish", "operator"), ("bank.activate", "operator"),
                                                        ("camera.set", "operator")]  # ACL WHOAMI of each writer
    anomalous = sorted(r.seq for r in got if r.anomalous)
    assert anomalous and any(line.defect_at(s) for s in anomalous)
    alarms = read_alarms(viewer, KEYS)[0]
    assert sorted(a.seq for a in alarms) == anomalous  # k=1 of n=1: one alarm per anomalous frame
    assert all(a.overlay_jpeg for a in alarms)  # the store read the worker's overlays
    live, deadline = [], time.time() + 10
    while len(live) < len(alarms) and time.time() < deadline:
        if (message := listener.get_message(timeout=0.2)) is not None:
            live.append(Alarm.unpack(message["data"]).seq)
    assert sorted(live) == anomalous  # the viewer received them live
    assert viewer.xlen(KEYS.deadletter("cam-1")) == 1
    stats = viewer.hgetall(KEYS.camera_stats("cam-1"))
    assert (stats[b"ingested"], stats[b"results"], stats[b"deadlettered"], stats[b"alarms"]) == (
        b"16", b"16", b"1", str(len(alarms)).encode())


def test_a_sink_reads_acknowledges_and_dead_letters_on_its_own_role_and_deletes_nothing(acl_server, tmp_path):
    from sinks.service import Sink, SinkSettings
    from sinks.webhook import Webhook, WebhookSettings

    from .sinkservers import Receiver, write_alarms, write_results
    from .sinkservers import wait_for as until

    operator = acl_server.client("operator")
    write_results(operator, KEYS, "cam-1", range(6))
    write_alarms(operator, KEYS, "cam-1", [2])
    receiver = Receiver(None, refuse_seqs=frozenset({4})).start()
    sink = Sink(acl_server.client("sink"), Webhook(WebhookSettings(url=receiver.url)),
                SinkSettings(sink="hook", refresh_s=0.2, health_s=0.1), KEYS)
    thread = threading.Thread(target=sink.run, daemon=True)
    thread.start()
    try:
        assert until(lambda: len(receiver.received) == 6 and sink.report.deadlettered == 1, 30)
    finally:
        sink.stop.set()
        thread.join(20)
        receiver.stop()
    assert sink.report.delivered == 6
    assert operator.xlen(KEYS.sink_deadletter("hook", "cam-1")) == 1
    assert operator.hget(KEYS.sink_health, "hook/sink-1") is not None
    own = acl_server.client("sink")
    for denied in (lambda: own.delete(KEYS.results("cam-1")), lambda: own.xdel(KEYS.results("cam-1"), "0-1"),
                   lambda: own.xtrim(KEYS.alarms("cam-1"), maxlen=0), lambda: own.hset(KEYS.alarm_rules, "cam-1", "{}"),
                   lambda: own.set(KEYS.bank_active("default"), 1)):
        with pytest.raises(DENIED):
            denied()
