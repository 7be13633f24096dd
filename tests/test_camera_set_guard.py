"""Everything read from the camera set and a camera's stats is validated before use: a camera credential may
SADD any member and HSET any field of its own stats hash. A bad member or field is skipped and reported; no
process exits, no console API answers 500, `patchcore status` still answers (issue 22, items 1 and 3)."""
from __future__ import annotations

import json
import subprocess
import sys

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contracts.keys import MAX_CAMERA_NAME, camera_names, check_camera
from runtime.connection import connect
from runtime.deadletter import DeadLetters
from runtime.status import collect_status
from runtime.streams import CameraStreams
from store.alarms.feed import read_alarms
from store.alarms.log import recent_alarms
from workers.banks.registry import BankRegistry

from .test_pipeline import KEYS, Running, ingest, results, wait_for

POISON = [b"bad{name}", b"}", b"\xff\xfe not utf-8", b"x" * (MAX_CAMERA_NAME + 1), b"tab\tname", b"", b"ok-but-{"]


def test_camera_names_keeps_the_valid_and_refuses_the_rest():
    found = camera_names([b"cam-2", "cam-1", *POISON, "kamera-\u00e9"])
    assert found.names == ("cam-1", "cam-2", "kamera-\u00e9")
    assert sorted(found.refused) == sorted(POISON)
    for bad in ("a{b", "a}b", "", "x" * (MAX_CAMERA_NAME + 1), "new\nline"):
        try:
            check_camera(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} accepted")


def test_poisoned_camera_names_stop_no_worker_or_store_and_status_lists_them(redis_server, synthetic_bank_bytes):
    client = connect(redis_server.url)
    BankRegistry(client, KEYS).publish("default", synthetic_bank_bytes, activate=True)
    client.sadd(KEYS.cameras, *POISON)  # before any process starts: each must come up with them
    with Running(redis_server.url) as running:
        ingest(redis_server.url, 6, camera="cam-1")
        wait_for(lambda: len(results(client)) == 6, 180)
        client.sadd(KEYS.cameras, b"late{poison}")  # and while they run
        ingest(redis_server.url, 6, camera="cam-2", seed=1)
        wait_for(lambda: len(results(client, "cam-2")) == 6, 180)
        assert all(t.is_alive() for t in running.threads)  # the worker and the store carry on
        wait_for(lambda: client.hget(KEYS.latest("cam-2"), "seq") == b"5", 60)  # the store too
    status = collect_status(client, KEYS.prefix)
    assert [c["camera"] for c in status["cameras"]] == ["cam-1", "cam-2"]
    assert status["refused_camera_names_count"] == len(POISON) + 1
    done = subprocess.run([sys.executable, "-m", "patchcore", "status", "--redis-url", redis_server.url],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"camera set: {len(POISON) + 1} members refused" in done.stdout and "camera cam-2:" in done.stdout


members = st.one_of(st.binary(min_size=0, max_size=300), st.text(max_size=40).map(str.encode))
values = st.one_of(st.binary(max_size=64), st.sampled_from([b"abc", b"nan", b"inf", b"-1", b"1e400", b"99" * 20,
                                                            b"\xff", b""]))
fields = st.sampled_from([b"last_seq", b"ingested", b"results", b"dropped", b"deadlettered", b"alarms", b"state",
                          b"replayed", b"fault", b"last_ingest_at", b"\xffbad field"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bad_members=st.lists(members, max_size=6), stats=st.dictionaries(fields, values, max_size=6))
def test_arbitrary_bytes_in_the_camera_set_and_a_cameras_stats_break_no_reader(redis_server, bad_members, stats):
    from console.data import ConsoleData

    client = connect(redis_server.url)
    client.flushall()
    client.sadd(KEYS.cameras, "cam-1", *bad_members)
    if stats:
        client.hset(KEYS.camera_stats("cam-1"), mapping=stats)
    status = collect_status(client, KEYS.prefix)
    json.dumps(status)  # what `patchcore status --json` and the console send: no NaN, no bytes
    assert "cam-1" in [c["camera"] for c in status["cameras"]]
    for camera in status["cameras"]:
        check_camera(camera["camera"])
        assert camera["last_ingest_at"] is None or isinstance(camera["last_ingest_at"], float)
        assert all(isinstance(camera[k], int) and camera[k] >= 0 for k in ("ingested", "results", "alarms"))
    snapshot = ConsoleData(client, KEYS).snapshot()
    json.dumps(snapshot, allow_nan=False)
    streams = CameraStreams(client, KEYS.cameras, KEYS.frames, "workers", refresh_s=0)
    assert all(check_camera(name.split("{")[1].rstrip("}")) for name in streams.refresh())
    read_alarms(client, KEYS), recent_alarms(client, KEYS), DeadLetters(client, KEYS).list()
