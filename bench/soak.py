"""Bounded soak: several cameras, workers killed with SIGKILL at random, nothing may be lost.

    .venv/bin/python bench/soak.py [--minutes 10] [--cameras 3] [--workers 2] [--fps 2] [--kill-every 30]

Every process is a real `patchcore` process on an embedded redis-server. Prints frames sent,
results, duplicates, dead-lettered, dropped, lost (sent - results - dead-lettered - dropped; must
be 0), and each process's memory (RSS) after warm-up and at the end.
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from contracts.connection import connect
from contracts.keys import Keys
from contracts.messages import Result
from contracts.registry import BankRegistry
from patchcore.embedded_redis import EmbeddedRedis
from patchcore.up import UpSettings, warmup_bank
from scorer import bank_to_bytes


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def spawn(url: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "patchcore", *args, "--redis-url", url],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--cameras", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--fps", type=float, default=2)
    parser.add_argument("--kill-every", type=float, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    keys = Keys()
    with EmbeddedRedis() as server, tempfile.TemporaryDirectory() as tmp:
        client = connect(server.url)
        bank = warmup_bank(UpSettings(source="synthetic"), Path(tmp), progress=False)
        BankRegistry(client, keys).publish("default", bank_to_bytes(bank), activate=True)
        cameras = {f"cam-{i}": spawn(server.url, "ingest", "--source", f"synthetic:seed={i}", "--camera", f"cam-{i}",
                                     "--fps", str(args.fps)) for i in range(args.cameras)}
        worker_args = ("worker", "--claim-idle-ms", "3000", "--device", "cpu")
        workers = {f"w{i}": spawn(server.url, *worker_args, "--name", f"w{i}") for i in range(args.workers)}
        store = spawn(server.url, "store")
        time.sleep(20)  # warm-up: models loaded
        memory_start = {name: rss_mb(p.pid) for name, p in {**cameras, **workers, "store": store}.items()}
        started, kills, next_kill, serial = time.time(), 0, time.time() + args.kill_every, args.workers
        steady_rss, next_sample = [], time.time()  # w0 is never killed: its memory over the whole soak
        while time.time() - started < args.minutes * 60:
            time.sleep(1)
            if time.time() >= next_sample:
                steady_rss.append(rss_mb(workers["w0"].pid))
                next_sample += 60
            if time.time() >= next_kill:
                # w0 is never killed, so its memory at start and end shows whether a worker's memory stays flat
                victim = rng.choice(sorted(set(workers) - {"w0"}) or sorted(workers))
                workers.pop(victim).send_signal(signal.SIGKILL)
                workers[f"w{serial}"] = spawn(server.url, *worker_args, "--name", f"w{serial}")
                serial, kills, next_kill = serial + 1, kills + 1, time.time() + args.kill_every
        for process in cameras.values():
            process.send_signal(signal.SIGTERM)
        for process in cameras.values():
            process.wait(timeout=60)

        def counts() -> tuple[int, int, int, int, int]:
            sent = dropped = dead = 0
            seen, total = set(), 0
            for camera in cameras:
                stats = client.hgetall(keys.camera_stats(camera))
                sent += int(stats.get(b"ingested", 0))
                dropped += int(stats.get(b"dropped", 0))
                dead += int(stats.get(b"deadlettered", 0))
                for _, fields in client.xrange(keys.results(camera)):
                    total += 1
                    seen.add((camera, Result.unpack(fields[b"m"]).seq))
            return sent, len(seen), total - len(seen), dead, dropped

        deadline = time.time() + 300
        while time.time() < deadline:  # drain what is still queued
            sent, results, duplicates, dead, dropped = counts()
            if results + dead + dropped >= sent:
                break
            time.sleep(2)
        memory_end = {name: rss_mb(p.pid) for name, p in {**workers, "store": store}.items()}
        for process in [*workers.values(), store]:
            process.send_signal(signal.SIGTERM)
        for process in [*workers.values(), store]:
            process.wait(timeout=60)
        sent, results, duplicates, dead, dropped = counts()
        print(f"soak {args.minutes:g} min, {args.cameras} cameras at {args.fps:g} fps, {args.workers} workers, "
              f"{kills} SIGKILLs")
        print(f"frames sent {sent}, results {results}, duplicates {duplicates}, dead-lettered {dead}, "
              f"dropped {dropped}, lost {sent - results - dead - dropped}")
        for name, start in memory_start.items():
            end = memory_end.get(name)
            print(f"  {name:8s} RSS {start:7.1f} MB after warm-up"
                  + (f", {end:7.1f} MB at the end" if end is not None else " (camera, stopped first)"
                     if name.startswith("cam") else " (killed during the soak)"))
        print("  w0 RSS each minute (MB): " + " ".join(f"{v:.0f}" for v in steady_rss))
        for name in sorted(set(memory_end) - set(memory_start)):
            print(f"  {name:8s} RSS {memory_end[name]:7.1f} MB at the end (replacement)")


if __name__ == "__main__":
    main()
