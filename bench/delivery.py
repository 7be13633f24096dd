"""What the delivery guarantees cost on the Redis side: each new script against the plain commands it
replaced, measured in the same run on the same embedded server.

    .venv/bin/python bench/delivery.py [--frames 2000] [--frame-kb 30]

- ingest: ADD_FRAME (idempotent append) vs the old MULTI (XLEN, XADD, XLEN, HSET, HINCRBY)
- worker read: READ_FAIR (hard cap over 20 backlogged cameras) vs one XREADGROUP with COUNT per stream
- store: one COMMIT_RESULTS per batch of 32 results (window kept in Redis) vs the old MULTI of HSET + XACK
"""
from __future__ import annotations

import argparse
import platform
import time

from contracts.connection import connect
from contracts.keys import FRAME_GROUP, STORE_GROUP, Keys
from contracts.messages import Result
from contracts.streams import ADD_FRAME, CameraStreams
from patchcore.embedded_redis import EmbeddedRedis, find_redis_server, server_version
from store.alarms import AlarmRule
from store.service import ResultsStore, StoreSettings

KEYS = Keys()


def timed(label: str, fn, n: int) -> float:
    started = time.perf_counter()
    fn()
    per_op = (time.perf_counter() - started) / n * 1e6
    print(f"  {label:58s} {per_op:8.1f} us")
    return per_op


def ingest(client, frames: int, payload: bytes) -> None:
    add = client.register_script(ADD_FRAME)

    def old():
        for seq in range(frames):
            with client.pipeline(transaction=True) as pipe:
                pipe.xlen("old"), pipe.xadd("old", {"m": payload}, maxlen=256, approximate=True), pipe.xlen("old")
                pipe.hset("old:stats", mapping={"last_seq": seq, "last_ingest_at": time.time()})
                pipe.hincrby("old:stats", "ingested", 1)
                pipe.execute()

    def new():
        for seq in range(frames):
            add(keys=["new", "new:stats"], args=[seq, 256, time.time(), payload])

    base = timed("ingest: MULTI XLEN/XADD/XLEN/HSET/HINCRBY (before)", old, frames)
    ratio = timed("ingest: ADD_FRAME script (idempotent)", new, frames) / base
    print(f"  -> x{ratio:.2f}")


def worker_reads(client, frames: int, payload: bytes, cameras: int = 20, cap: int = 8) -> None:
    for prefix in ("a", "b"):
        with client.pipeline(transaction=False) as pipe:
            for c in range(cameras):
                pipe.sadd(f"{prefix}:cameras", f"cam-{c}")
                for _ in range(frames // cameras):
                    pipe.xadd(f"{prefix}:frames:cam-{c}", {"m": payload})
            pipe.execute()
    old_streams = CameraStreams(client, "a:cameras", lambda c: f"a:frames:{c}", FRAME_GROUP, 0)
    new_streams = CameraStreams(client, "b:cameras", lambda c: f"b:frames:{c}", FRAME_GROUP, 0)
    old_streams.refresh(), new_streams.refresh()
    got = {"old": 0, "new": 0}

    def old():
        while reply := client.xreadgroup(FRAME_GROUP, "w", {s: ">" for s in old_streams.names}, count=cap):
            got["old"] += sum(len(entries) for _, entries in reply)

    def new():
        while reply := new_streams.read_fair("w", cap):
            got["new"] += sum(len(entries) for _, entries in reply)

    base = timed(f"worker read, {cameras} cameras: XREADGROUP COUNT {cap} (before), per frame", old, frames)
    ratio = timed(f"worker read: READ_FAIR cap {cap}, per frame", new, frames) / base
    print(f"  -> x{ratio:.2f} (frames read: {got['old']} / {got['new']}; batches of up to {cameras * cap} "
          f"before, {cap} now)")


def store_commits(client, url: str, results: int, batch: int = 32) -> None:
    packed = [Result(camera="cam-1", line="l", seq=s, captured_at=float(s), scored_at=time.time(),
                     score=5.0 if s % 9 < 2 else 0.1, threshold=1.0, anomalous=s % 9 < 2, bank="b", bank_version=1,
                     worker="w").pack() for s in range(results)]
    for stream in ("a:results", KEYS.results("cam-1")):
        client.xgroup_create(stream, STORE_GROUP, id="0", mkstream=True)
        with client.pipeline(transaction=False) as pipe:
            for m in packed:
                pipe.xadd(stream, {"m": m})
            pipe.execute()
    client.sadd(KEYS.cameras, "cam-1")

    def old():
        while reply := client.xreadgroup(STORE_GROUP, "s", {"a:results": ">"}, count=batch):
            with client.pipeline(transaction=True) as pipe:
                for entry_id, fields in reply[0][1]:
                    r = Result.unpack(fields[b"m"])
                    pipe.hset("a:latest", mapping={"seq": r.seq, "score": r.score, "anomalous": int(r.anomalous),
                                                   "bank": r.bank, "bank_version": r.bank_version})
                    pipe.xack("a:results", STORE_GROUP, entry_id)
                pipe.execute()

    store = ResultsStore(connect(url), StoreSettings(default_rule=AlarmRule(k=2, n=3, cooldown_s=0), batch=batch,
                                                     refresh_s=3600), KEYS)
    store._streams.refresh()

    def new():
        while store.report.results < results:
            store._step()

    base = timed(f"store, batches of {batch}: MULTI HSET + XACK (before), per result", old, results)
    ratio = timed("store: COMMIT_RESULTS + window in Redis, per result", new, results) / base
    print(f"  -> x{ratio:.2f} ({store.report.alarms} alarms)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=2000)
    parser.add_argument("--frame-kb", type=int, default=30)
    args = parser.parse_args()
    binary = find_redis_server()
    print(f"{platform.processor() or platform.machine()}, {platform.node()}; server {binary} "
          f"v{'.'.join(map(str, server_version(binary)))}; {args.frames} frames of {args.frame_kb} KB")
    payload = bytes(args.frame_kb * 1024)
    with EmbeddedRedis() as server:
        client = connect(server.url)
        ingest(client, args.frames, payload)
        worker_reads(client, args.frames, payload)
        store_commits(client, server.url, args.frames)


if __name__ == "__main__":
    main()
