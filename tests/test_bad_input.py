"""Hostile and corrupt messages: never a crash, every message gets exactly one outcome (property-based)."""
import random
import time

import cv2
import msgpack
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.connection import connect
from contracts.keys import Keys
from contracts.messages import Frame, MessageError
from workers.banks.registry import BankRegistry
from ingest.sources import SyntheticLine
from workers.outcomes import Entry as _Entry
from workers.worker import Worker, WorkerSettings

KEYS = Keys()
GOOD = SyntheticLine(seed=9).render(0)
GOOD_FRAME = Frame(camera="cam-1", line="l", bank="default", seq=0, captured_at=1.0, encoding="jpeg",
                   shape=GOOD.shape, data=cv2.imencode(".jpg", GOOD)[1].tobytes())


def mutate(data: bytes, rng: random.Random) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        choice = rng.random()
        if choice < 0.4 and data:
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif choice < 0.7:
            data = data[: rng.randrange(len(data) + 1)]
        else:
            pos = rng.randrange(len(data) + 1)
            data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    return bytes(data)


def frame_fields():
    value = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(), st.text(max_size=20),
                      st.binary(max_size=64), st.lists(st.integers(-5, 10_000), max_size=4))
    keys = st.sampled_from(["schema", "camera", "line", "bank", "seq", "captured_at", "encoding", "shape", "data", "x"])
    return st.dictionaries(keys, value, max_size=10)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.binary(max_size=512), frame_fields().map(lambda d: msgpack.packb(d, use_bin_type=True))))
def test_unpack_accepts_or_refuses_with_a_reason_never_anything_else(payload):
    try:
        frame = Frame.unpack(payload)
    except MessageError as exc:
        assert str(exc)
    else:
        assert frame.encoding in ("jpeg", "raw") and len(frame.shape) == 3


@settings(max_examples=200, deadline=None)
@given(st.randoms(use_true_random=False))
def test_mutated_frames_are_refused_or_valid(rng):
    try:
        Frame.unpack(mutate(GOOD_FRAME.pack(), rng))
    except MessageError:
        pass


def test_worker_gives_every_hostile_message_one_outcome_and_keeps_running(redis_server, synthetic_bank_bytes):
    client = connect(redis_server.url)
    BankRegistry(client, KEYS).publish("default", synthetic_bank_bytes, activate=True)
    client.sadd(KEYS.cameras, "cam-1")
    rng = random.Random(4)
    payloads = [mutate(GOOD_FRAME.pack(), rng) for _ in range(40)]
    payloads += [Frame(**{**GOOD_FRAME.__dict__, "encoding": "raw", "shape": (1, 4096, 3), "data": bytes(4096 * 3)}).pack(),
                 Frame(**{**GOOD_FRAME.__dict__, "data": cv2.imencode(".png", np.zeros((3, 3), np.uint8))[1].tobytes()}).pack(),
                 GOOD_FRAME.pack()]
    entries = [_Entry(KEYS.frames("cam-1"), client.xadd(KEYS.frames("cam-1"), {"m": p}), p, time.time()) for p in payloads]
    client.xgroup_create(KEYS.frames("cam-1"), "workers", id="0")
    client.xreadgroup("workers", "w", {KEYS.frames("cam-1"): ">"}, count=len(payloads))
    worker = Worker(client, WorkerSettings(name="w", device="cpu"), KEYS)
    for begin in range(0, len(entries), 8):
        worker.process(entries[begin:begin + 8])
    outcomes = client.xlen(KEYS.results("cam-1")) + client.xlen(KEYS.deadletter("cam-1"))
    assert outcomes == len(payloads)
    assert client.xpending(KEYS.frames("cam-1"), "workers")["pending"] == 0
    reasons = [f[b"reason"].decode() for _, f in client.xrange(KEYS.deadletter("cam-1"))]
    assert any("aspect ratio" in r for r in reasons)  # the 1 x 4096 strip
    assert any("png header declares 3x3" in r for r in reasons)  # a 3x3 PNG claiming to be 240x320
    assert client.xlen(KEYS.results("cam-1")) >= 1  # the intact frame was scored
