"""The least-privilege roles of deploy/redis/users.acl, rendered by deploy/redis/render-acl.sh and loaded by a real
redis-server (>= 7.0: the file uses read-only key patterns), each tried with the project's own code."""
import hashlib
import json
import re
import shutil
import subprocess
import threading
import time

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.backoff import NoBackoff
from redis.retry import Retry
from typer.testing import CliRunner

from store.alarms.feed import read_alarms
from runtime import scripts
from runtime.cameras import CameraLimits, CameraNotRegisteredError, register_camera
from runtime.connection import connect
from runtime import server_limits
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
USERS = ["camera-cam-1", "camera-cam-2", "camera-cam-3", "worker", "store", "sink", "operator", "viewer"]
SERVICE_ROLES = ["camera-cam-1", "worker", "store", "sink", "viewer"]  # every role but the operator
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
                    str(acl)], env={"CAMERAS": "cam-1 cam-2 cam-3", "PATH": "/usr/bin:/bin"}, check=True)
    text = acl.read_text()
    assert "pw-" not in text and text.count("user camera-") == 3  # hashed, one user per camera
    with EmbeddedRedis(binary=redis7(), config_file=ROOT / "deploy/redis/limits.conf",
                       extra_args=["--aclfile", str(acl)]) as server:
        prepared = AclServer(server.port, secrets)
        operator = prepared.client("operator")  # what the deploy tooling does before the services start:
        scripts.load_library(operator)  # load the Functions library
        for camera in ("cam-1", "cam-2"):  # register cameras it issued credentials for (cam-3: not yet)
            register_camera(operator, KEYS, camera)
        yield prepared


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
                   lambda: own.set(KEYS.bank_active("default"), 1),
                   lambda: own.xadd(KEYS.results("cam-1"), {"m": b"forged"}),  # no result or alarm of its own
                   lambda: own.xadd(KEYS.alarms("cam-1"), {"m": b"forged"})):
        with pytest.raises(DENIED):
            denied()


BUSY = "while true do end"  # a script that would make Redis answer BUSY to every client


@pytest.mark.parametrize("user", SERVICE_ROLES)
def test_no_service_role_runs_lua_of_its_own_or_changes_the_functions(acl_server, user):
    client, operator = acl_server.client(user), acl_server.client("operator")
    library = scripts.library()
    attempts = {
        "EVAL": lambda: client.eval(BUSY, 0),
        "SCRIPT LOAD": lambda: client.script_load(BUSY),
        "EVALSHA": lambda: client.evalsha(hashlib.sha1(BUSY.encode()).hexdigest(), 0),
        "FUNCTION LOAD": lambda: client.function_load(f"#!lua name=mine\nredis.register_function('spin', "
                                                      f"function() {BUSY} end)"),
        "FUNCTION DELETE": lambda: client.function_delete(library.name),
        "FUNCTION FLUSH": lambda: client.function_flush(),
    }
    for name, attempt in attempts.items():
        with pytest.raises(DENIED):
            attempt()
    assert scripts.loaded_libraries(client) == [library.name]  # it may list the library, and it is intact
    assert operator.ping() and operator.function_list(library="mine") == []  # Redis answers; nothing loaded
    if user != "viewer":  # a service role calls the operator's functions (FCALL), with its own key rights
        function = scripts.load(client, "deadletter_replay")
        with pytest.raises(DENIED):  # keys of no role's but the operator's
            function([KEYS.alarm_rules, KEYS.banks, KEYS.acknowledged, KEYS.dismissed], ["0-1", "0-1"])


def test_a_camera_writes_only_its_own_stream_within_the_operators_limits(acl_server):
    operator, camera = acl_server.client("operator"), acl_server.client("camera-cam-1")
    register_camera(operator, KEYS, "cam-1", CameraLimits(max_entry_bytes=1000, max_stream_len=5))
    add = scripts.load(camera, "add_frame")

    def frame(camera_name, seq, size=100, maxlen=1000):
        return scripts.add_frame(add, stream=KEYS.frames(camera_name), stats=KEYS.camera_stats(camera_name),
                                 limits=KEYS.camera_limits(camera_name), seq=seq, maxlen=maxlen, captured_at=1.0,
                                 frame=b"x" * size)

    assert [frame("cam-1", seq) for seq in range(8)][-1] >= 0
    assert operator.xlen(KEYS.frames("cam-1")) == 5  # the operator's cap, not the 1000 the camera asked for
    assert frame("cam-1", 8, size=1001) == scripts.REFUSED_SIZE  # an oversized frame, refused by the function
    stats = operator.hgetall(KEYS.camera_stats("cam-1"))
    assert stats[b"refused_size"] == b"1" and stats[b"capped"] == b"8" and stats[b"last_seq"] == b"7"
    with pytest.raises(DENIED):
        frame("cam-2", 0)  # another camera's stream, stats and limits: not its keys
    with pytest.raises(DENIED):
        camera.xadd(KEYS.frames("cam-2"), {"m": b"x"})
    assert operator.xlen(KEYS.frames("cam-2")) == 0
    for write in (lambda: camera.sadd(KEYS.cameras, "cam-99"), lambda: camera.sadd(KEYS.cameras, "cam-1"),
                  lambda: camera.hset(KEYS.camera_limits("cam-1"), "max_entry_bytes", 10 ** 12),
                  lambda: camera.delete(KEYS.camera_limits("cam-1")), lambda: camera.srem(KEYS.cameras, "cam-2"),
                  lambda: camera.xdel(KEYS.frames("cam-1"), "0-1"), lambda: camera.delete(KEYS.frames("cam-1"))):
        with pytest.raises(DENIED):
            write()
    assert operator.smembers(KEYS.cameras) == {b"cam-1", b"cam-2"}  # the operator's allow-list, unchanged
    # not promised (docs/operations.md): the camera role holds XADD on its own stream, so a direct XADD is not
    # bounded by the function (Redis 7 runs a function with its caller's rights: the function's XADD needs it)
    camera.xadd(KEYS.frames("cam-1"), {"m": b"x" * 2000})
    assert operator.xlen(KEYS.frames("cam-1")) == 6


def one_shot(acl_server, user: str) -> redis.Redis:
    """A client of `user` that sends each command once: Redis closes the connection on a command over its bounds."""
    return redis.Redis(port=acl_server.port, username=user, password=acl_server.password(user),
                       retry=Retry(NoBackoff(), 0))


def used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def test_the_shipped_bounds_sit_above_the_largest_default_frame_and_a_bank_chunk():
    """deploy/redis/limits.conf is runtime/server_limits.py's; an honest command fits it: a frame at the default
    camera limit with its stream key and command (FCALL add_frame: 4 arguments besides the frame), and a bank chunk."""
    assert (ROOT / "deploy/redis/limits.conf").read_text() == server_limits.config_text()
    assert server_limits.MAX_ARGUMENT_BYTES >= CameraLimits().max_entry_bytes + (1 << 20)
    assert server_limits.MAX_ARGUMENT_BYTES >= 2 * BankRegistry.CHUNK_BYTES
    assert server_limits.MAX_QUERY_BUFFER_BYTES > server_limits.MAX_ARGUMENT_BYTES
    honest_worker = WorkerSettings().max_batch * WorkerSettings().max_frame_bytes  # one XREADGROUP reply at most
    assert server_limits.MAX_CLIENTS_MEMORY_BYTES >= honest_worker + server_limits.MAX_ARGUMENT_BYTES
    assert min(server_limits.SERVER_LIMITS.values()) >= 1 << 20  # Redis' minimum for the first two


def test_redis_refuses_a_raw_camera_entry_over_the_shipped_bounds_and_memory_does_not_grow(acl_server):
    """Issue 22: the camera role holds XADD on its own stream (add_frame runs with its rights), so it can write an
    entry outside the function's size limit; the shipped config makes Redis refuse one over the bounds before it is
    stored: one field over proto-max-bulk-len, or many fields each under it (maxmemory-clients). An honest camera's
    frames, up to the default max_entry_bytes, still go in."""
    operator, stream = acl_server.client("operator"), KEYS.frames("cam-1")
    before = used_memory(operator)
    over = b"x" * (server_limits.MAX_ARGUMENT_BYTES + 1)
    under = b"y" * (server_limits.MAX_ARGUMENT_BYTES - (1 << 20))
    many = server_limits.MAX_CLIENTS_MEMORY_BYTES // len(under) + 1  # fields, each one under proto-max-bulk-len
    for attack in (lambda camera: camera.xadd(stream, {"m": over}),
                   lambda camera: camera.set(KEYS.preview("cam-1"), over),
                   lambda camera: camera.xadd(stream, {f"m{i}": under for i in range(many)})):
        with pytest.raises((redis.ConnectionError, redis.ResponseError)):  # Redis closes the connection
            attack(one_shot(acl_server, "camera-cam-1"))
        assert operator.xlen(stream) == 0 and not operator.exists(KEYS.preview("cam-1"))
        assert used_memory(operator) < before + (4 << 20)  # nothing stored, the command's buffers freed
    frames_into(acl_server.url("camera-cam-1"), "cam-1", 3)  # the honest camera carries on
    camera = acl_server.client("camera-cam-1")
    largest = b"z" * CameraLimits().max_entry_bytes  # the largest frame the default limits allow, through add_frame
    assert scripts.add_frame(scripts.load(camera, "add_frame"), stream=stream, stats=KEYS.camera_stats("cam-1"),
                             limits=KEYS.camera_limits("cam-1"), seq=10, maxlen=1000, captured_at=1.0,
                             frame=largest) == 0
    assert operator.xlen(stream) == 4
    assert operator.xrevrange(stream, count=1)[0][1][b"m"] == largest


def test_an_operator_publishes_a_bank_over_the_bound_in_chunks_and_a_worker_reads_it(acl_server,
                                                                                   synthetic_bank_bytes):
    """A bank larger than one command may carry (the real bank's bytes repeated past proto-max-bulk-len): one SET of
    it is refused, the registry's chunked publish works, and the worker role reads it back whole and verified."""
    key = b"s" * 32
    data = (synthetic_bank_bytes * (server_limits.MAX_ARGUMENT_BYTES // len(synthetic_bank_bytes) + 2))
    assert len(data) > server_limits.MAX_ARGUMENT_BYTES
    with pytest.raises((redis.ConnectionError, redis.ResponseError)):
        one_shot(acl_server, "operator").set(KEYS.bank_blob("big", 1), data)
    version = BankRegistry(acl_server.client("operator"), KEYS, signing_key=key).publish("big", data)
    assert BankRegistry(acl_server.client("worker"), KEYS, signing_key=key).fetch("big", version) == data
    (published,) = BankRegistry(acl_server.client("viewer"), KEYS).versions("big")
    assert published.chunks == -(-len(data) // BankRegistry.CHUNK_BYTES) and published.size == len(data)


def test_a_camera_the_operator_did_not_register_is_refused_with_the_command_to_run(acl_server):
    line = SyntheticLine(seed=1, max_frames=2)
    ingest = CameraIngest(acl_server.client("camera-cam-3"), line, IngestSettings(camera="cam-3"), KEYS)
    with pytest.raises(CameraNotRegisteredError, match="patchcore redis cameras cam-3"):
        ingest.run()
    operator = acl_server.client("operator")
    assert operator.sismember(KEYS.cameras, "cam-3") == 0 and operator.xlen(KEYS.frames("cam-3")) == 0
    registered = CliRunner().invoke(app, ["redis", "cameras", "cam-3", "--max-stream-len", "50", "--redis-url",
                                          acl_server.url("operator")])
    assert registered.exit_code == 0, registered.output
    assert operator.hget(KEYS.camera_limits("cam-3"), "max_stream_len") == b"50"
    frames_into(acl_server.url("camera-cam-3"), "cam-3", 2)


def test_a_service_finds_the_library_missing_and_names_the_command_to_run(acl_server):
    operator = acl_server.client("operator")
    operator.function_delete(scripts.library().name)
    with pytest.raises(scripts.FunctionsMissingError, match="patchcore redis load-functions"):
        scripts.load(acl_server.client("worker"), "ack_and_write")
    refused = CliRunner().invoke(app, ["store", "--redis-url", acl_server.url("store")])
    assert refused.exit_code == 2 and "patchcore redis load-functions" in refused.output, refused.output
    assert acl_server.password("store") not in refused.output
    assert scripts.loaded_libraries(operator) == []  # the store tried FUNCTION LOAD once, refused
    denied = CliRunner().invoke(app, ["redis", "load-functions", "--redis-url", acl_server.url("worker")])
    assert denied.exit_code == 2 and "may not load" in denied.output, denied.output
    loaded = CliRunner().invoke(app, ["redis", "load-functions", "--redis-url", acl_server.url("operator")])
    assert loaded.exit_code == 0 and json.loads(loaded.output)["primaries"] == {"server": "loaded"}, loaded.output
    assert scripts.loaded_libraries(acl_server.client("store")) == [scripts.library().name]


def history_keys() -> list[str]:
    """Alarm history, acknowledgements, dismissals (and the audit stream where contracts/keys.py has one)."""
    audit = getattr(KEYS, "audit", None)
    return [KEYS.alarms("cam-1"), KEYS.acknowledged, KEYS.dismissed] + ([audit] if isinstance(audit, str) else [])


@pytest.mark.parametrize("user", SERVICE_ROLES)
def test_history_is_append_only_for_every_service_role(acl_server, user):
    operator, client = acl_server.client("operator"), acl_server.client(user)
    operator.xadd(KEYS.alarms("cam-1"), {"m": b"an alarm"})
    operator.hset(KEYS.acknowledged, "cam-1:1", "{}")
    operator.hset(KEYS.dismissed, "cam-1:1", "{}")
    before = {key: operator.dump(key) for key in history_keys()}
    for key in history_keys():
        for rewrite in (lambda: client.delete(key), lambda: client.unlink(key), lambda: client.xdel(key, "0-1"),
                        lambda: client.xtrim(key, maxlen=0), lambda: client.set(key, b"x"),
                        lambda: client.expire(key, 1), lambda: client.rename(key, key + ":x"),
                        lambda: client.hdel(key, "cam-1:1"), lambda: client.hset(key, "cam-1:1", "rewritten"),
                        lambda: client.execute_command("XSETID", key, "9999999999999-0"),
                        lambda: client.xgroup_destroy(key, "g")):
            with pytest.raises(DENIED):
                rewrite()
    assert {key: operator.dump(key) for key in history_keys()} == before
    if user == "store":  # the store appends alarms (its commit function's XADD); no other role writes history
        client.xadd(KEYS.alarms("cam-1"), {"m": b"appended"})
        assert operator.xlen(KEYS.alarms("cam-1")) == 2
    else:
        with pytest.raises(DENIED):
            client.xadd(KEYS.alarms("cam-1"), {"m": b"forged"})


stats_fields = st.sampled_from([b"last_seq", b"ingested", b"results", b"dropped", b"deadlettered", b"alarms", b"state",
                                b"last_ingest_at", b"refused_size", b"capped", b"\xffbad field"])
camera_writes = st.lists(st.one_of(
    st.tuples(st.just("frame"), st.dictionaries(st.one_of(st.just(b"m"), st.binary(min_size=1, max_size=8)),
                                                st.binary(max_size=300), min_size=1, max_size=3)),
    st.tuples(st.just("stats"), st.dictionaries(stats_fields, st.one_of(st.binary(max_size=40), st.sampled_from(
        [b"nan", b"inf", b"-1", b"1e400", b"abc", b""])), min_size=1, max_size=4)),
    st.tuples(st.just("preview"), st.binary(max_size=200))), min_size=1, max_size=8)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(writes=camera_writes)
def test_arbitrary_bytes_in_every_key_a_camera_may_write_stop_no_reader(acl_server, writes):
    """As the camera role: arbitrary entries in its stream, fields in its stats, bytes as its preview. The worker's
    reader takes them and dead-letters each (as the worker role), `patchcore status` and the console's data (as the
    viewer) still answer with JSON."""
    from console.data import ConsoleData
    from runtime.deadletter import DeadLetters
    from runtime.status import collect_status
    from workers.reader import Reader

    operator, camera = acl_server.client("operator"), acl_server.client("camera-cam-1")
    operator.delete(KEYS.frames("cam-1"), KEYS.camera_stats("cam-1"), KEYS.preview("cam-1"), KEYS.deadletter("cam-1"),
                    KEYS.deadletter_payloads("cam-1"))
    for kind, value in writes:
        if kind == "frame":
            camera.xadd(KEYS.frames("cam-1"), value)
        elif kind == "stats":
            camera.hset(KEYS.camera_stats("cam-1"), mapping=value)
        else:
            camera.set(KEYS.preview("cam-1"), value)
    worker = acl_server.client("worker")
    reader = Reader(worker, WorkerSettings(name="w", max_wait_ms=1), KEYS, threading.Event())
    readable = reader.streams.refresh()
    batch = reader.collect(readable, lambda: False)
    assert len(batch) == sum(kind == "frame" for kind, _ in writes)
    prepared = reader.prepare(batch)
    assert len(prepared.outcomes) == len(batch) and not prepared.by_bank  # no arbitrary entry is a frame
    letters = DeadLetters(worker, KEYS)
    for entry, outcome in prepared.outcomes:
        assert letters.add(entry.stream, "workers", entry.entry_id, entry.raw, outcome.reason, "w")
    viewer = acl_server.client("viewer")
    status = collect_status(viewer, KEYS.prefix)
    json.dumps(status, allow_nan=False)
    assert "cam-1" in [c["camera"] for c in status["cameras"]]
    json.dumps(ConsoleData(viewer, KEYS).snapshot(), allow_nan=False)
    assert len(DeadLetters(viewer, KEYS).list("cam-1")) == len(batch)
