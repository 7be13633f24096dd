"""Redis at its limits (issue 19): `maxmemory` reached under noeviction while 20 small cameras stream. Ingest
back-pressures (a live camera waits with its frame; Redis takes nothing it cannot hold and counts every frame it
took), the workers and the store ride it out without exiting, `patchcore status` says what is wrong, and once
memory frees every frame Redis took gets exactly one result: nothing acknowledged is lost."""
import shutil
import subprocess
import threading
import time

import pytest
import redis

from contracts.keys import FRAME_GROUP, Keys
from patchcore.embedded_redis import EmbeddedRedis
from ingest.camera import CameraIngest, IngestSettings
from ingest.sources import SyntheticLine
from runtime.connection import connect
from runtime.status import collect_status
from contracts.messages import Alarm
from store.alarms.rules import AlarmRule
from store.service import ResultsStore, StoreSettings
from workers.banks.registry import BankRegistry

from .test_pipeline import Running, results, wait_for

KEYS = Keys()
CAMERAS = [f"cam-{i:02d}" for i in range(20)]


def ingested(client) -> dict[str, int]:
    return {c: int(client.hget(KEYS.camera_stats(c), "ingested") or 0) for c in CAMERAS}


def guarded(run, errors: list) -> None:
    try:
        run()
    except BaseException as exc:  # noqa: BLE001 - the test asserts there are none
        errors.append(exc)


def memory_full_soon(client, margin=300_000) -> bool:
    """Lower maxmemory to ~300 KB above what Redis uses now (that falls as buffers of the bank's upload are freed),
    and say whether `patchcore status` reports memory full."""
    used, limit = (int(client.info("memory")[k]) for k in ("used_memory", "maxmemory"))
    if not limit or used + margin < limit:
        client.config_set("maxmemory", used + margin)
    return any("memory full" in f for f in collect_status(client)["redis_faults"])


def writes_refused(client) -> bool:
    """Whether Redis refuses a write now (used memory over maxmemory under noeviction): a probe SET of 64 KB (status
    already says "memory full" within 1 % of the limit, when a few small frames may still fit)."""
    try:
        client.set("test:probe", b"x" * 65536)
    except redis.exceptions.OutOfMemoryError:
        return True
    return False


def start_cameras(url: str, names, fps: float, stop: threading.Event, errors: list,
                  reports: dict | None = None) -> list[threading.Thread]:
    """Small live synthetic cameras (64x48, back-off 0.1-0.5 s, no previews) streaming into `url` until `stop`, each
    in a started thread; an exception goes to `errors`, a camera's report (when its run returns) to `reports`."""
    reports = {} if reports is None else reports
    threads = []
    for i, name in enumerate(names):
        camera = CameraIngest(connect(url), SyntheticLine(seed=i, live=True, width=64, height=48),
                              IngestSettings(camera=name, fps=fps, maxlen=100_000, backoff_initial_s=0.1,
                                             backoff_max_s=0.5, preview_interval_s=0), KEYS, stop)
        run = (lambda name=name, camera=camera: reports.setdefault(name, camera.run()))
        threads.append(threading.Thread(target=guarded, args=(run, errors), daemon=True))
        threads[-1].start()
    return threads


def test_memory_full_under_noeviction_back_pressures_ingest_and_loses_nothing_acknowledged(redis_server,
                                                                                          synthetic_bank_bytes):
    client = connect(redis_server.url)
    BankRegistry(client, KEYS).publish("default", synthetic_bank_bytes, activate=True)
    stop_cameras, errors = threading.Event(), []
    threads = start_cameras(redis_server.url, CAMERAS, 4, stop_cameras, errors)
    wait_for(lambda: all(n > 0 for n in ingested(client).values()), 60)
    client.config_set("maxmemory-policy", "noeviction")
    wait_for(lambda: memory_full_soon(client) and writes_refused(client), 120)
    # and held full: the limit 2 MB under what Redis uses, so freed buffers (the bank's upload, query buffers) do not
    # open room for a few more frames while the test counts
    client.config_set("maxmemory", int(client.info("memory")["used_memory"]) - 2_000_000)
    # back-pressure, measured before any worker runs (a worker frees memory: it deletes the frames it scored)
    time.sleep(1.0)
    before = sum(ingested(client).values())
    time.sleep(3.0)
    assert sum(ingested(client).values()) <= before + len(CAMERAS)  # at most a frame each got in
    with Running(redis_server.url, workers=1, store=True, max_batch=8, claim_idle_ms=2000,
                 retry_initial_s=0.1, retry_max_s=0.5) as running:
        time.sleep(1.0)
        assert all(t.is_alive() for t in threads + running.threads) and not errors, errors  # nobody exits
        lines = []
        wait_for(lambda: lines.extend(f for f in collect_status(client)["redis_faults"] if "memory full" in f)
                 or lines, 30)
        assert "noeviction" in lines[0] and "writes are refused" in lines[0] and "Raise maxmemory" in lines[0]
        stop_cameras.set()  # the cameras stop waiting; what Redis took is counted in `ingested`
        for thread in threads:
            thread.join(timeout=30)
        client.config_set("maxmemory", 0)  # memory frees (an operator raised the limit)
        took = ingested(client)
        wait_for(lambda: running.store.report.results == sum(took.values()), 300)
    assert not errors, errors
    for camera, count in took.items():  # every frame Redis acknowledged: exactly one result
        assert sorted(r.seq for r in results(client, camera)) == list(range(count)), camera
        assert client.xpending(KEYS.frames(camera), FRAME_GROUP)["pending"] == 0
    assert collect_status(client)["redis_faults"] == []


HUNDRED = [f"cam-{i:03d}" for i in range(100)]


def test_memory_full_with_a_hundred_cameras_loses_nothing_acknowledged_and_alarms_resume(redis_server,
                                                                                        synthetic_bank_bytes):
    """Issue 19: 100 small cameras stream into maxmemory (noeviction). Ingest back-pressures (each camera waits with
    its frame, and counts the writes Redis refused), the workers and the store ride it out, every frame Redis took
    gets exactly one result, and alarms resume once memory frees: the store's rule alarms on every result (k = 1 of
    n = 1, threshold 0), so each result must come with exactly one alarm, those after the limit was lifted too."""
    client = connect(redis_server.url)
    BankRegistry(client, KEYS).publish("default", synthetic_bank_bytes, activate=True)
    stop_cameras, errors, reports = threading.Event(), [], {}
    threads = start_cameras(redis_server.url, HUNDRED, 0.25, stop_cameras, errors, reports)

    def taken() -> dict[str, int]:
        with client.pipeline(transaction=False) as pipe:
            for camera in HUNDRED:
                pipe.hget(KEYS.camera_stats(camera), "ingested")
            return dict(zip(HUNDRED, (int(n or 0) for n in pipe.execute())))

    wait_for(lambda: all(n > 0 for n in taken().values()), 60)
    client.config_set("maxmemory-policy", "noeviction")
    wait_for(lambda: memory_full_soon(client) and writes_refused(client), 120)
    client.config_set("maxmemory", int(client.info("memory")["used_memory"]) - 2_000_000)  # held full (see above)
    time.sleep(1.0)
    before = sum(taken().values())
    time.sleep(4.0)  # each camera (one frame per 4 s) tries at least once
    assert sum(taken().values()) <= before + len(HUNDRED)  # at most a frame each got in: back-pressure
    every_result = AlarmRule(k=1, n=1, cooldown_s=0, threshold=0.0)
    with Running(redis_server.url, workers=1, store=False, max_batch=16, claim_idle_ms=2000, retry_initial_s=0.1,
                 retry_max_s=0.5) as running:
        store = ResultsStore(connect(redis_server.url), StoreSettings(default_rule=every_result, refresh_s=0.2), KEYS,
                             running.stop)
        store_thread = threading.Thread(target=guarded, args=(store.run, errors), daemon=True)
        store_thread.start()
        time.sleep(2.0)
        assert all(t.is_alive() for t in threads + running.threads + [store_thread]) and not errors, errors
        assert store.report.alarms == 0  # nothing could be written while memory was full
        full = taken()
        client.config_set("maxmemory", 0)  # memory frees (an operator raised the limit)
        wait_for(lambda: all(n > full[c] for c, n in taken().items()), 60)  # every camera got a frame in again
        stop_cameras.set()
        for thread in threads:
            thread.join(timeout=30)
        took = taken()
        wait_for(lambda: store.report.results == sum(took.values()), 300)
        wait_for(lambda: store.report.alarms == sum(took.values()), 30)
    store_thread.join(timeout=30)
    assert not errors, errors
    assert sorted(reports) == HUNDRED
    assert all(reports[c].frames == took[c] for c in HUNDRED)  # what each camera counted as sent, Redis took
    assert all(reports[c].redis_waits > 0 for c in HUNDRED)  # every camera waited: back-pressure, counted
    for camera, count in took.items():  # every frame Redis acknowledged: exactly one result, and one alarm
        assert sorted(r.seq for r in results(client, camera)) == list(range(count)), camera
        alarms = [Alarm.unpack(f[b"m"]) for _, f in client.xrange(KEYS.alarms(camera))]
        assert sorted(a.seq for a in alarms) == list(range(count)), camera
        assert max(a.seq for a in alarms) >= full[camera]  # alarms resumed: on frames taken after memory freed
        assert client.xpending(KEYS.frames(camera), FRAME_GROUP)["pending"] == 0
    assert collect_status(client)["redis_faults"] == []


def mount_tmpfs(path, size: str) -> bool:
    """A tmpfs of `size` at `path`; False where mounting is not permitted (needs root or CAP_SYS_ADMIN)."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def resize_tmpfs(path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True, capture_output=True, timeout=30)


def test_aof_on_a_full_disk_back_pressures_ingest_and_loses_nothing_acknowledged(tmp_path, synthetic_bank_bytes):
    # appendonly with fsync every second (the default) on a small tmpfs that fills: Redis refuses writes (MISCONF)
    # until it can write its AOF again; with `appendfsync always` it would exit instead (Redis's own rule)
    disk = tmp_path / "aof"
    if not mount_tmpfs(disk, "64m"):
        pytest.skip("mounting a tmpfs is not permitted here (needs root or CAP_SYS_ADMIN)")
    try:
        with EmbeddedRedis(data_dir=disk, appendonly=True) as server:
            client = connect(server.url)
            BankRegistry(client, KEYS).publish("default", synthetic_bank_bytes, activate=True)
            stop_cameras, errors = threading.Event(), []
            threads = start_cameras(server.url, CAMERAS, 4, stop_cameras, errors)
            wait_for(lambda: all(n > 0 for n in ingested(client).values()), 60)
            used_kb = shutil.disk_usage(disk).used // 1024
            resize_tmpfs(disk, f"{used_kb + 256}k")  # ~256 KB of room left
            wait_for(lambda: any("AOF" in f for f in collect_status(client)["redis_faults"]), 120)
            with Running(server.url, workers=1, store=True, max_batch=8, claim_idle_ms=2000,
                         retry_initial_s=0.1, retry_max_s=0.5) as running:
                time.sleep(1.0)
                before = sum(ingested(client).values())
                time.sleep(3.0)
                assert sum(ingested(client).values()) <= before + len(CAMERAS)  # back-pressure
                assert all(t.is_alive() for t in threads + running.threads) and not errors, errors
                stop_cameras.set()
                for thread in threads:
                    thread.join(timeout=30)
                resize_tmpfs(disk, "64m")  # the disk has room again: Redis writes its AOF and takes writes
                took = ingested(client)
                wait_for(lambda: running.store.report.results == sum(took.values()), 300)
            assert not errors, errors
            for camera, count in took.items():
                assert sorted(r.seq for r in results(client, camera)) == list(range(count)), camera
            assert collect_status(client)["redis_faults"] == []
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True, timeout=30)
