"""The pipeline on a real Redis Cluster (3 masters + 3 replicas on loopback, tests/cluster.py): every process finds
the cluster from one node's URL, cameras spread over every master are scored exactly once, and a master killed
mid-stream is replaced by its replica while ingest, workers and store carry on. What asynchronous replication
loses at that moment is measured, without and with WAIT (printed; run with -s to see it)."""
import json
import threading
import time

import pytest
from redis.cluster import RedisCluster
from redis.crc import key_slot

from store.alarms.feed import read_alarms
from runtime.connection import connect
from contracts.keys import FRAME_GROUP, Keys
from workers.banks.registry import BankRegistry
from runtime.status import collect_status
from ingest.camera import CameraIngest, IngestSettings
from ingest.sources import SyntheticLine

from .cluster import spread_cameras
from .test_pipeline import Running, results, wait_for

pytestmark = pytest.mark.cluster
KEYS = Keys()


@pytest.fixture
def cluster(redis_cluster):
    redis_cluster.wait_ok()
    redis_cluster.flush()
    return redis_cluster


def test_a_cluster_is_found_from_any_node_and_a_single_redis_stays_plain(cluster, redis_server):
    replica = next(p for p in cluster.alive() if p not in cluster.master_ports())
    for url in (cluster.url, f"redis://127.0.0.1:{replica}/0"):
        client = connect(url)
        assert isinstance(client, RedisCluster) and len(client.get_primaries()) == 3
    assert not isinstance(connect(redis_server.url), RedisCluster)


def test_a_chunked_bank_is_published_read_and_pruned_on_a_cluster(cluster, synthetic_bank_bytes):
    """A bank in chunks (one SET each) on a cluster: every chunk in the registry's slot, read back whole and
    verified, and every chunk of a pruned version deleted."""
    client = connect(cluster.url)
    registry = BankRegistry(client, KEYS, signing_key=b"c" * 32, chunk_bytes=64 << 10, keep_versions=1)
    first = registry.publish("default", synthetic_bank_bytes)
    (published,) = registry.versions("default")
    assert published.chunks > 3
    old = [KEYS.bank_blob("default", first)] + [KEYS.bank_blob_chunk("default", first, i)
                                                for i in range(1, published.chunks)]
    assert {key_slot(key.encode()) for key in old} == {key_slot(KEYS.bank_versions("default").encode())}
    assert client.exists(*old) == len(old)
    second = registry.publish("default", synthetic_bank_bytes, activate=True)  # prunes the first
    assert registry.fetch("default", second) == synthetic_bank_bytes
    assert [v.version for v in registry.versions("default")] == [second] and client.exists(*old) == 0


def camera_stats(client, camera):
    return {k.decode(): v.decode() for k, v in client.hgetall(KEYS.camera_stats(camera)).items()}


def test_six_cameras_on_three_masters_are_scored_exactly_once_by_two_workers(cluster, synthetic_bank_bytes):
    client = connect(cluster.url)
    cameras = spread_cameras(cluster, KEYS, per_master=2)
    masters = {cluster.port_of_slot(key_slot(KEYS.frames(c).encode())) for c in cameras}
    assert len(cameras) == 6 and masters == set(cluster.master_ports()) and len(masters) == 3
    BankRegistry(client, KEYS).publish("default", synthetic_bank_bytes, activate=True)
    frames = 4
    with Running(cluster.url, workers=2, device="cpu", max_batch=4) as running:
        ingests = [threading.Thread(target=lambda c=c, i=i: CameraIngest(
            connect(cluster.url), SyntheticLine(seed=i, defect_rate=0.3, max_frames=frames),
            IngestSettings(camera=c, maxlen=1000), KEYS).run()) for i, c in enumerate(cameras)]
        for thread in ingests:
            thread.start()
        for thread in ingests:
            thread.join(120)
        wait_for(lambda: all(client.hget(KEYS.latest(c), "seq") == str(frames - 1).encode() for c in cameras), 300)
        assert all(t.is_alive() for t in running.threads)
    for camera in cameras:
        assert sorted(r.seq for r in results(client, camera)) == list(range(frames))  # each once, none missing
        stats = camera_stats(client, camera)
        assert stats["ingested"] == stats["results"] == str(frames) and "deadlettered" not in stats
        assert client.xlen(KEYS.frames(camera)) == 0 and client.xpending(KEYS.frames(camera), FRAME_GROUP)["pending"] == 0
    assert sum(w.report.results for w in running.workers) == 6 * frames
    alarms, _ = read_alarms(client, KEYS)
    assert len(alarms) == sum(int(camera_stats(client, c).get("alarms", 0)) for c in cameras)
    status = collect_status(client)
    assert [c["camera"] for c in status["cameras"]] == sorted(cameras) and status["redis_faults"] == []
    assert status["banks"] == {"default": 1}


def test_a_master_killed_mid_stream_is_replaced_and_every_process_carries_on(cluster, synthetic_bank_bytes):
    """Ingest asynchronous (what it loses is measured under a write storm below), workers with WAIT 1."""
    client = connect(cluster.url)
    cameras = spread_cameras(cluster, KEYS, per_master=1)
    BankRegistry(client, KEYS).publish("default", synthetic_bank_bytes, activate=True)
    victim = cluster.port_of_slot(key_slot(KEYS.frames(cameras[0]).encode()))
    frames, errors, reports = 24, [], {}

    def guard(name, run):
        try:
            reports[name] = run()
        except BaseException as exc:  # noqa: BLE001 - the test asserts there are none
            errors.append((name, exc))

    ingests = [CameraIngest(connect(cluster.url), SyntheticLine(seed=i, max_frames=frames),
                            IngestSettings(camera=c, fps=8, maxlen=1000, backoff_initial_s=0.1, backoff_max_s=0.5),
                            KEYS)
               for i, c in enumerate(cameras)]
    with Running(cluster.url, workers=2, device="cpu", max_batch=4, claim_idle_ms=2000, retry_initial_s=0.1,
                 retry_max_s=0.5, wait_replicas=1, wait_ms=500) as running:
        running.store.settings = type(running.store.settings)(**{**vars(running.store.settings), "claim_idle_ms": 2000})
        threads = [threading.Thread(target=guard, args=(c, i.run), daemon=True) for c, i in zip(cameras, ingests)]
        for thread in threads:
            thread.start()
        wait_for(lambda: client.xlen(KEYS.results(cameras[0])) >= 6, 300)
        cluster.kill(victim)
        killed_at = time.monotonic()
        cluster.wait_ok(60)
        failover_s = time.monotonic() - killed_at
        for thread in threads:
            thread.join(180)
        client = connect(cluster.url)
        wait_for(lambda: all(client.xlen(KEYS.frames(c)) == 0
                             and client.xpending(KEYS.results(c), "store")["pending"] == 0 for c in cameras), 240)
        alive = [t.is_alive() for t in running.threads]
    cluster.restart(victim)  # back as a replica of its promoted one, for the tests after this one
    assert errors == [] and all(alive)
    lost = {}
    for camera in cameras:
        seqs = [r.seq for r in results(client, camera)]
        assert len(seqs) == len(set(seqs))  # never scored twice into the results
        sent = reports[camera].frames
        assert sent == frames and set(seqs) <= set(range(sent))
        lost[camera] = sent - len(seqs)
    print(f"\nfailover: master :{victim} SIGKILLed, cluster ok again after {failover_s:.1f} s; frames sent "
          f"{len(cameras) * frames}, lost {lost}, scored twice (results lost with the master, scored again) "
          f"{sum(w.report.results for w in running.workers) - sum(len(results(client, c)) for c in cameras)}")
    assert all(n == 0 for c, n in lost.items() if c != cameras[0])  # only the killed master's camera can lose


@pytest.mark.parametrize("wait_replicas", [0, 1], ids=["async", "wait-1"])
def test_what_a_failover_loses_under_a_write_storm(cluster, wait_replicas):
    """Four cameras on one master push small frames as fast as it takes them (no workers: every frame sent stays
    in its stream); its replica stalls for 0.5 s (SIGSTOP: replication lag, as a slow link or host gives), then the
    master is SIGKILLed and the replica resumes and is promoted. Lost = acknowledged to ingest, absent after the
    failover: asynchronously, what the master took during the lag; with WAIT, ingest does not move on unconfirmed."""
    client = connect(cluster.url)
    victim = cluster.master_ports()[0]
    cameras = [c for c in (f"storm-{i}" for i in range(200))
               if cluster.port_of_slot(key_slot(KEYS.frames(c).encode())) == victim][:4]
    frames, errors, reports = 300, [], {}
    stop = threading.Event()

    def run(camera, seed):
        try:
            reports[camera] = CameraIngest(
                connect(cluster.url), SyntheticLine(seed=seed, width=64, height=48, max_frames=frames),
                IngestSettings(camera=camera, maxlen=10 * frames, backoff_initial_s=0.05, backoff_max_s=0.5,
                               wait_replicas=wait_replicas, wait_ms=100), KEYS, stop).run()
        except BaseException as exc:  # noqa: BLE001 - the test asserts there are none
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(c, i), daemon=True) for i, c in enumerate(cameras)]
    for thread in threads:
        thread.start()
    wait_for(lambda: sum(int(client.hget(KEYS.camera_stats(c), "ingested") or 0) for c in cameras) >= 200, 60)
    replica = cluster.replica_of(victim)
    cluster.pause(replica)
    time.sleep(0.5)
    cluster.kill(victim)
    cluster.resume(replica)
    cluster.wait_ok(60)
    cluster.restart(victim)  # back as the new master's replica, as a restarted pod: WAIT 1 is answered again
    for thread in threads:
        thread.join(120)
    assert errors == [] and len(reports) == len(cameras)
    client = connect(cluster.url)
    lost = {c: reports[c].frames - client.xlen(KEYS.frames(c)) for c in cameras}
    unconfirmed = sum(reports[c].unconfirmed for c in cameras)
    print(f"\nwrite storm ({'WAIT 1 100 ms' if wait_replicas else 'asynchronous'}): {len(cameras)} cameras x {frames} "
          f"frames on master :{victim}, SIGKILLed after 0.5 s of replica lag: lost {sum(lost.values())} {lost}, "
          f"unconfirmed by WAIT {unconfirmed}")
    assert all(reports[c].frames == frames for c in cameras) and all(n >= 0 for n in lost.values())
    if wait_replicas:
        assert sum(lost.values()) <= unconfirmed


def test_up_runs_the_demo_end_to_end_on_a_cluster_node(cluster, tmp_path, synthetic_bank_bytes):
    """`patchcore up --redis-url <one node>`: the demo finds the cluster, publishes its bank, and every frame it
    sends comes back as a result (counted by `up` and, independently, in the camera's results stream)."""
    from typer.testing import CliRunner

    from patchcore.cli import app

    bank = tmp_path / "demo.bank"
    bank.write_bytes(synthetic_bank_bytes)
    replica = next(p for p in cluster.alive() if p not in cluster.master_ports())
    out = tmp_path / "up.json"
    run = CliRunner().invoke(app, ["up", "--redis-url", f"redis://127.0.0.1:{replica}/0", "--bank", str(bank),
                                   "--frames", "12", "--fps", "0", "--no-progress", "--json", str(out)])
    assert run.exit_code == 0, run.output
    summary = json.loads(out.read_text())
    client = connect(cluster.url)
    assert summary["frames_in"] == summary["results_out"] == 12 and summary["dropped"] == 0
    assert len(results(client, "cam-1")) == 12
    assert BankRegistry(client, KEYS).active("default") == summary["bank_version"]


def test_the_functions_library_is_loaded_on_every_primary_and_called_by_the_first_key(cluster):
    from typer.testing import CliRunner

    from patchcore.cli import app
    from runtime import scripts
    from runtime.cameras import CameraLimits, register_camera

    for port in cluster.master_ports():
        cluster.node(port).function_flush()
    library = scripts.library()
    loaded = CliRunner().invoke(app, ["redis", "load-functions", "--redis-url", cluster.url])
    assert loaded.exit_code == 0, loaded.output
    done = json.loads(loaded.output)
    assert done["library"] == library.name and sorted(done["primaries"].values()) == ["loaded"] * 3
    for port in cluster.master_ports():
        assert scripts.loaded_libraries(cluster.node(port)) == [library.name]
    replicas = [port for port in cluster.alive() if port not in cluster.master_ports()]
    wait_for(lambda: all(scripts.loaded_libraries(cluster.node(port)) == [library.name] for port in replicas), 10)
    again = CliRunner().invoke(app, ["redis", "load-functions", "--redis-url", cluster.url])
    assert sorted(json.loads(again.output)["primaries"].values()) == ["present"] * 3
    client = connect(cluster.url)
    add = scripts.load(client, "add_frame")
    cameras = spread_cameras(cluster, KEYS, per_master=1)
    for camera in cameras:  # one camera per master: each call goes to the master of its first key's slot
        register_camera(client, KEYS, camera, CameraLimits(max_entry_bytes=10, max_stream_len=2))
        replies = [scripts.add_frame(add, stream=KEYS.frames(camera), stats=KEYS.camera_stats(camera),
                                     limits=KEYS.camera_limits(camera), seq=seq, maxlen=100, captured_at=1.0,
                                     frame=b"f" * (11 if seq == 3 else 5)) for seq in range(4)]
        assert replies[3] == scripts.REFUSED_SIZE
        port = cluster.port_of_slot(key_slot(KEYS.frames(camera).encode()))
        assert cluster.node(port).xlen(KEYS.frames(camera)) == 2  # the operator's cap, on that master
    assert {cluster.port_of_slot(key_slot(KEYS.frames(c).encode())) for c in cameras} == set(cluster.master_ports())
