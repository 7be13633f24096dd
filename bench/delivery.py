"""What the delivery guarantees cost on the Redis side: each new script against the plain commands it
replaced, measured in the same run on the same embedded server.

    .venv/bin/python bench/delivery.py [--frames 2000] [--frame-kb 30]

- ingest: add_frame.lua (idempotent append) vs the old MULTI (XLEN, XADD, XLEN, HSET, HINCRBY)
- worker read: read_fair.lua (hard cap over 20 backlogged cameras) vs one XREADGROUP with COUNT per stream
- store: one commit_results.lua per batch of 32 results (window kept in Redis) vs the old MULTI of HSET + XACK
  (the old in-memory window, a few Python operations per result, is left out of the baseline)
$PATCHCORE_REDIS_SERVER picks the server.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

from runtime.connection import connect
from contracts.keys import FRAME_GROUP, STORE_GROUP, Keys
from contracts.messages import Result
from runtime import scripts
from runtime.streams import CameraStreams
from patchcore.embedded_redis import EmbeddedRedis, find_redis_server, server_version
from store.alarms.rules import AlarmRule
from store.service import ResultsStore, StoreSettings

from results import write_result  # bench/results.py, beside this script

REPEATS = 3
MEASURED: list[dict] = []  # every compared pair of this run, written by main() with write_result


def compare(labels: tuple[str, str], make_runs, n: int) -> float:
    """Run before/after alternately REPEATS times (each on fresh keys from make_runs(i)); print the best
    time per operation of each and return the ratio after/before."""
    best = [float("inf"), float("inf")]
    for i in range(REPEATS):
        for j, run in enumerate(make_runs(i)):
            started = time.perf_counter()
            run()
            best[j] = min(best[j], (time.perf_counter() - started) / n * 1e6)
    for label, per_op in zip(labels, best):
        print(f"  {label:62s} {per_op:8.1f} us")
    MEASURED.append({"before": labels[0], "before_us": round(best[0], 1), "after": labels[1],
                     "after_us": round(best[1], 1), "x_before": round(best[1] / best[0], 2)})
    return best[1] / best[0]


def ingest(client, frames: int, payload: bytes) -> None:
    add = scripts.load(client, "add_frame")
    client.hset("limits", mapping={"max_entry_bytes": 1 << 30, "max_stream_len": 1 << 30})

    def runs(i):
        def old():
            for seq in range(frames):
                with client.pipeline(transaction=True) as pipe:
                    pipe.xlen(f"old{i}"), pipe.xadd(f"old{i}", {"m": payload}, maxlen=256, approximate=True)
                    pipe.xlen(f"old{i}"), pipe.hset(f"old{i}:stats", mapping={"last_seq": seq, "last_ingest_at": time.time()})
                    pipe.hincrby(f"old{i}:stats", "ingested", 1)
                    pipe.execute()

        def new():
            for seq in range(frames):
                scripts.add_frame(add, stream=f"new{i}", stats=f"new{i}:stats", limits="limits", seq=seq,
                                  maxlen=256, captured_at=time.time(), frame=payload)
        return old, new

    ratio = compare(("ingest: MULTI XLEN/XADD/XLEN/HSET/HINCRBY (before)", "ingest: add_frame script (idempotent)"),
                    runs, frames)
    print(f"  -> x{ratio:.2f}")


def worker_reads(client, frames: int, payload: bytes, cameras: int = 20, cap: int = 8) -> None:
    got = {"old": 0, "new": 0}

    def backlog(prefix):
        with client.pipeline(transaction=False) as pipe:
            for c in range(cameras):
                pipe.sadd(f"{prefix}:cameras", f"cam-{c}")
                for _ in range(frames // cameras):
                    pipe.xadd(f"{prefix}:frames:cam-{c}", {"m": payload})
            pipe.execute()
        streams = CameraStreams(client, f"{prefix}:cameras", lambda c: f"{prefix}:frames:{c}", FRAME_GROUP, 0)
        streams.refresh()
        streams.read_own("w")  # a reader's own pending entries go first (none here): then it reads new ones
        return streams

    def runs(i):
        old_streams, new_streams = backlog(f"a{i}"), backlog(f"b{i}")

        def old():
            while reply := client.xreadgroup(FRAME_GROUP, "w", {s: ">" for s in old_streams.names}, count=cap):
                got["old"] += sum(len(entries) for _, entries in reply)

        def new():
            while reply := new_streams.read_fair("w", cap):
                got["new"] += sum(len(entries) for _, entries in reply)
        return old, new

    ratio = compare((f"worker read, {cameras} cameras: XREADGROUP COUNT {cap} (before), per frame",
                     f"worker read: read_fair script cap {cap}, per frame"), runs, frames)
    print(f"  -> x{ratio:.2f} (frames read: {got['old']} / {got['new']}; batches of up to {cameras * cap} "
          f"before, {cap} now)")


def store_commits(client, url: str, results: int, batch: int = 32) -> None:
    packed = [Result(camera="cam-1", line="l", seq=s, captured_at=float(s), scored_at=time.time(),
                     score=5.0 if s % 9 < 2 else 0.1, threshold=1.0, anomalous=s % 9 < 2, bank="b", bank_version=1,
                     worker="w").pack() for s in range(results)]
    alarms = []

    def runs(i):
        keys = Keys(prefix=f"p{i}")
        for stream in (f"a{i}:results", keys.results("cam-1")):
            client.xgroup_create(stream, STORE_GROUP, id="0", mkstream=True)
            with client.pipeline(transaction=False) as pipe:
                for m in packed:
                    pipe.xadd(stream, {"m": m})
                pipe.execute()
        client.sadd(keys.cameras, "cam-1")
        store = ResultsStore(connect(url), StoreSettings(default_rule=AlarmRule(k=2, n=3, cooldown_s=0), batch=batch,
                                                         refresh_s=3600), keys)
        store._streams.refresh()

        def old():
            while reply := client.xreadgroup(STORE_GROUP, "s", {f"a{i}:results": ">"}, count=batch):
                with client.pipeline(transaction=True) as pipe:
                    for entry_id, fields in reply[0][1]:
                        r = Result.unpack(fields[b"m"])
                        pipe.hset(f"a{i}:latest", mapping={"seq": r.seq, "score": r.score, "bank": r.bank,
                                                           "anomalous": int(r.anomalous), "bank_version": r.bank_version})
                        pipe.xack(f"a{i}:results", STORE_GROUP, entry_id)
                    pipe.execute()

        def new():
            while store.report.results < results:
                store._step()
            alarms.append(store.report.alarms)
        return old, new

    ratio = compare((f"store, batches of {batch}: MULTI HSET + XACK (before), per result",
                     "store: commit_results script + window in Redis, per result"), runs, results)
    print(f"  -> x{ratio:.2f} ({alarms[0]} alarms)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=2000)
    parser.add_argument("--frame-kb", type=int, default=30)
    args = parser.parse_args()
    binary = find_redis_server()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.machine())
    print(f"{cpu}, {os.cpu_count()} cores; server {binary} "
          f"v{'.'.join(map(str, server_version(binary)))}; {args.frames} frames of {args.frame_kb} KB")
    payload = bytes(args.frame_kb * 1024)
    with EmbeddedRedis() as server:
        client = connect(server.url)
        ingest(client, args.frames, payload)
        worker_reads(client, args.frames, payload)
        store_commits(client, server.url, args.frames)
    write_result("delivery", {"server": f"{binary} v{'.'.join(map(str, server_version(binary)))}",
                              "frames": args.frames, "frame_kb": args.frame_kb, "rows": MEASURED})


if __name__ == "__main__":
    main()
