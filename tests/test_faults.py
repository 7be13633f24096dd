"""Fault injection against a real redis-server: killed, stopped and slow workers."""
import os
import signal
import subprocess
import sys
import time

import pytest

from runtime.connection import connect
from contracts.keys import FRAME_GROUP, Keys
from workers.banks.registry import BankRegistry
from workers.outcomes import Entry as _Entry
from workers.worker import Worker, WorkerSettings

from .test_pipeline import Running, ingest, results, wait_for

KEYS = Keys()


def worker_process(url, name, *args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "patchcore", "worker", "--redis-url", url, "--name", name,
                             "--device", "cpu", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_a_slow_worker_whose_frames_were_reclaimed_writes_nothing(redis_server, synthetic_bank_bytes):
    client = connect(redis_server.url)
    BankRegistry(client, KEYS).publish("default", synthetic_bank_bytes, activate=True)
    ingest(redis_server.url, 4)
    client.xgroup_create(KEYS.frames("cam-1"), FRAME_GROUP, id="0")
    slow = Worker(connect(redis_server.url), WorkerSettings(name="slow", device="cpu"), KEYS)
    taken = client.xreadgroup(FRAME_GROUP, "slow", {KEYS.frames("cam-1"): ">"}, count=4)[0][1]
    time.sleep(0.3)
    with Running(redis_server.url, store=False, claim_idle_ms=200):  # reclaims and finishes them
        wait_for(lambda: client.xlen(KEYS.results("cam-1")) == 4)
    slow.process([_Entry(KEYS.frames("cam-1"), entry_id, fields[b"m"], time.time()) for entry_id, fields in taken])
    assert slow.report.results == 0
    assert sorted(r.seq for r in results(client)) == [0, 1, 2, 3]  # one result per frame, not two


@pytest.mark.parametrize("pipelining", ["--no-prefetch", "--prefetch"])
def test_sigkill_mid_batch_loses_nothing_and_scores_nothing_twice(redis_server, synthetic_bank_bytes, pipelining):
    client = connect(redis_server.url)
    BankRegistry(client, KEYS).publish("default", synthetic_bank_bytes, activate=True)
    ingest(redis_server.url, 40)
    victim = worker_process(redis_server.url, "victim", "--max-batch", "4", pipelining)
    wait_for(lambda: client.xlen(KEYS.results("cam-1")) >= 4, timeout=120)

    def held_by_victim():
        return client.xpending_range(KEYS.frames("cam-1"), FRAME_GROUP, "-", "+", 100, consumername="victim")

    deadline = time.time() + 60
    while time.time() < deadline:  # freeze it while it holds frames (SIGSTOP, look, SIGCONT until it does)
        victim.send_signal(signal.SIGSTOP)
        if held_by_victim():
            break
        victim.send_signal(signal.SIGCONT)
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    held = held_by_victim()
    # the kill left part of a batch pending, never acknowledged (pipelined: a batch read, one scored, one written)
    assert 0 < len(held) <= 4 * (3 if pipelining == "--prefetch" else 1)
    done_by_victim = client.xlen(KEYS.results("cam-1"))
    assert done_by_victim < 40
    survivor = worker_process(redis_server.url, "survivor", "--claim-idle-ms", "500")
    try:
        wait_for(lambda: client.xlen(KEYS.results("cam-1")) >= 40, timeout=180)
        time.sleep(1.0)
    finally:
        survivor.terminate()
        survivor.wait(timeout=60)
    assert sorted(r.seq for r in results(client)) == list(range(40))
    assert client.xpending(KEYS.frames("cam-1"), FRAME_GROUP)["pending"] == 0
    assert client.xlen(KEYS.frames("cam-1")) == 0


def test_sigterm_finishes_the_current_batch_then_exits(redis_server, synthetic_bank_bytes):
    client = connect(redis_server.url)
    BankRegistry(client, KEYS).publish("default", synthetic_bank_bytes, activate=True)
    ingest(redis_server.url, 200)
    worker = worker_process(redis_server.url, "w", "--max-batch", "8")
    wait_for(lambda: client.xlen(KEYS.results("cam-1")) >= 8, timeout=120)
    worker.send_signal(signal.SIGTERM)
    out, err = worker.communicate(timeout=60)
    assert worker.returncode == 0, err.decode()[-2000:]
    # nothing left half-done: every frame it took was written and acknowledged
    assert client.xpending(KEYS.frames("cam-1"), FRAME_GROUP)["pending"] == 0
    written = client.xlen(KEYS.results("cam-1"))
    assert written < 200 and written + client.xlen(KEYS.frames("cam-1")) == 200


def test_a_bad_bank_version_is_refused_and_the_active_one_keeps_serving(redis_server, synthetic_bank_bytes):
    import numpy as np

    from scorer import MemoryBank, bank_to_bytes
    from scorer.config import CoresetConfig, FeatureConfig

    client = connect(redis_server.url)
    registry = BankRegistry(client, KEYS)
    good = registry.publish("default", synthetic_bank_bytes, activate=True)
    other_backbone = bank_to_bytes(MemoryBank(np.zeros((10, 1024), np.float32), FeatureConfig(
        backbone="resnet18", layers=("layer2", "layer3"), weights_sha256="ab" * 32), CoresetConfig()))
    bad_versions = [registry.publish("default", synthetic_bank_bytes[:-100]),  # truncated
                    registry.publish("default", other_backbone)]  # weights this worker cannot match
    tampered = registry.publish("default", synthetic_bank_bytes)
    client.setrange(KEYS.bank_blob("default", tampered), 200, b"!")  # bytes no longer match their sha256
    with Running(redis_server.url, store=False, max_batch=2) as running:
        for seq, version in enumerate([good, *bad_versions, tampered]):
            registry.activate("default", version)
            ingest(redis_server.url, 2, seed=seq)
            wait_for(lambda: client.xlen(KEYS.results("cam-1")) == 2 * (seq + 1))
    assert {r.bank_version for r in results(client)} == {good}  # every frame scored by the good bank
    assert running.workers[0].report.deadlettered == 0


def test_sigterm_stops_ingest_after_the_frame_in_hand(redis_server):
    camera = subprocess.Popen([sys.executable, "-m", "patchcore", "ingest", "--source", "synthetic", "--camera", "c1",
                               "--fps", "20", "--redis-url", redis_server.url],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    client = connect(redis_server.url)
    wait_for(lambda: client.xlen(KEYS.frames("c1")) >= 10, timeout=60)
    camera.send_signal(signal.SIGTERM)
    out, err = camera.communicate(timeout=30)
    assert camera.returncode == 0, err.decode()[-2000:]
    import json

    report = json.loads(out.decode().strip().splitlines()[-1])
    assert report["frames"] == client.xlen(KEYS.frames("c1")) == int(client.hget(KEYS.camera_stats("c1"), "ingested"))
    assert client.hget(KEYS.camera_stats("c1"), "state").decode().startswith("stopped")
