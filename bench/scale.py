"""Scale-out: frames/s, Redis commands per frame, Redis CPU and latency for 1, 2 and 4 worker processes x
10, 50 and 200 cameras of small frames, against one Redis and against a local 3-master cluster
(3 masters + 3 replicas, tests/cluster.py). The scorer is made cheap on purpose (mobilenet_v2 with random
weights, the `full` view at 32 px, a bank of a few hundred patches), so what is measured is the plumbing:
ingest (one script per frame), workers (read, score, acknowledge-and-write), store (commit, alarms).

Every camera's frames are queued first (ingest threads, as fast as Redis takes them), then the workers
and the store start; frames/s = frames / (first result .. all results stored). Latency is capture ->
result written, so with the queue pre-filled it is mostly queueing: read p99 with that in mind.
Commands per frame and Redis CPU are INFO commandstats / INFO cpu deltas summed over the masters: for
ingest over the queueing phase, for workers + store over the window from the first stored result to the
last (process start-up, where idle workers poll, excluded; on a cluster an idle worker polls every node
every 10 ms, since one blocking XREADGROUP cannot span hash slots). The bench's own progress reads (one HGET
per camera every 50 ms) are taken off the command count; their CPU share stays in (small).

    PYTHONPATH=. .venv/bin/python bench/scale.py [--workers 1 2 4] [--cameras 10 50 200] [--frames 5]
        [--backends single cluster]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import threading
import time
from contextlib import ExitStack

import numpy as np

FRAME_SIDE = 32


class Frames:
    """A finite in-memory source of small synthetic frames (the ingest Source interface)."""

    live = False

    def __init__(self, images: list[np.ndarray], count: int):
        self.images, self.count, self.i = images, count, 0

    def open(self) -> None:
        self.i = 0

    def close(self) -> None:
        pass

    def read(self):
        if self.i >= self.count:
            return None
        self.i += 1
        return self.images[self.i % len(self.images)]


def small_images(n: int = 16) -> list[np.ndarray]:
    import cv2

    from ingest.sources import SyntheticLine

    line = SyntheticLine(seed=0)
    return [cv2.resize(line.render(i, defect=False), (FRAME_SIDE, FRAME_SIDE), interpolation=cv2.INTER_AREA)
            for i in range(n)]


def tiny_bank() -> bytes:
    from scorer import BuildConfig, CoresetConfig, FeatureConfig, bank_to_bytes, build_bank
    from scorer.calibration import CalibrationConfig
    from scorer.views import ViewConfig

    config = BuildConfig(features=FeatureConfig(backbone="mobilenet_v2"), view=ViewConfig(kind="full", size=FRAME_SIDE),
                         coreset=CoresetConfig(fraction=0.25), calibration=CalibrationConfig(folds=2))
    images = [np.ascontiguousarray(im[:, :, ::-1]) for im in small_images()]
    return bank_to_bytes(build_bank(images, config, weights="random", device="cpu", progress=False))


def run_worker(url: str, prefix: str, name: str, stop) -> None:
    import torch

    torch.set_num_threads(1)
    from runtime.connection import connect
    from contracts.keys import Keys
    from workers.worker import Worker, WorkerSettings

    Worker(connect(url), WorkerSettings(name=name, device="cpu", weights="random", refresh_s=0.5, max_batch=16),
           Keys(prefix), stop).run()


def run_store(url: str, prefix: str, stop) -> None:
    from runtime.connection import connect
    from contracts.keys import Keys
    from store.service import ResultsStore, StoreSettings

    ResultsStore(connect(url), StoreSettings(refresh_s=0.5), Keys(prefix), stop).run()


def server_totals(client) -> tuple[int, float]:
    """(commands served, CPU seconds used) summed over the masters (the one server of a single Redis)."""
    from runtime.connection import is_cluster

    nodes = [client.get_redis_connection(n) for n in client.get_primaries()] if is_cluster(client) else [client]
    calls, cpu = 0, 0.0
    for node in nodes:
        calls += sum(int(v["calls"]) for k, v in node.info("commandstats").items() if k != "cmdstat_info")
        info = node.info("cpu")
        cpu += float(info["used_cpu_sys"]) + float(info["used_cpu_user"])
    return calls, cpu


def measure(url: str, workers: int, cameras: int, frames: int, bank: bytes, images, tag: str) -> dict:
    from runtime.connection import connect
    from contracts.keys import Keys
    from contracts.messages import Result
    from workers.banks.registry import BankRegistry
    from ingest.camera import CameraIngest, IngestSettings

    prefix = f"scale-{tag}-{workers}w-{cameras}c"
    keys = Keys(prefix)
    client = connect(url)
    BankRegistry(client, keys).publish("default", bank, activate=True)
    calls0, _ = server_totals(client)
    names = [f"cam-{i}" for i in range(cameras)]
    feeders = [threading.Thread(target=lambda c=c: CameraIngest(connect(url), Frames(images, frames),
                                                                  IngestSettings(camera=c, maxlen=10 * frames), keys).run())
               for c in names]
    for t in feeders:
        t.start()
    for t in feeders:
        t.join()
    calls_ingested, _ = server_totals(client)
    context = mp.get_context("spawn")
    stop = context.Event()
    procs = [context.Process(target=run_worker, args=(url, prefix, f"w{i}", stop)) for i in range(workers)]
    procs.append(context.Process(target=run_store, args=(url, prefix, stop)))
    for p in procs:
        p.start()
    total = cameras * frames

    polls = 0  # this bench's own HGETs (one per camera per look), taken off the window's command count

    def stored() -> int:
        nonlocal polls
        polls += 1
        return sum(int(client.hget(keys.latest(c), "seq") or -1) + 1 for c in names)

    deadline, first, last = time.time() + 600, 0, 0
    while time.time() < deadline and (first := stored()) == 0:  # processes starting (torch import, bank load)
        time.sleep(0.05)
    calls1, cpu1 = server_totals(client)  # the window: from the first stored result to the last
    polls = 0
    while time.time() < deadline and (last := stored()) < total:
        time.sleep(0.05)
    calls2, cpu2 = server_totals(client)
    own = polls * len(names)
    stop.set()
    for p in procs:
        p.join(30)
    window = max(1, last - first)
    results = [Result.unpack(f[b"m"]) for c in names for _, f in client.xrange(keys.results(c))]
    scored = sorted(r.scored_at for r in results)
    span = scored[-1] - scored[0] if len(scored) > 1 else float("nan")
    latency = [(r.scored_at - r.captured_at) * 1000 for r in results]
    return {"frames": len(results), "frames_per_s": len(results) / span if span > 0 else float("nan"),
            "ingest_commands_per_frame": (calls_ingested - calls0) / total,
            "commands_per_frame": (calls2 - calls1 - own) / window,  # workers + store while frames flow
            "redis_cpu_ms_per_frame": (cpu2 - cpu1) * 1000 / window,  # (the bench's HGETs' CPU included: small)
            "p99_ms": float(np.percentile(latency, 99)) if latency else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--cameras", type=int, nargs="+", default=[10, 50, 200])
    parser.add_argument("--frames", type=int, default=10, help="frames per camera")
    parser.add_argument("--backends", nargs="+", default=["single", "cluster"], choices=["single", "cluster"])
    args = parser.parse_args()
    from patchcore.embedded_redis import EmbeddedRedis
    from results import write_result  # bench/results.py, beside this script
    from tests.cluster import LocalCluster

    bank, images = tiny_bank(), small_images()
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs; frames {FRAME_SIDE}x{FRAME_SIDE} JPEG, "
          f"{args.frames} per camera, mobilenet_v2 (random weights), full view {FRAME_SIDE} px")
    print("backend  workers cameras  frames  frames/s  ingest cmds/frame  cmds/frame  redis CPU ms/frame  p99 ms (queued)")
    rows = []  # docs/operations.md's scale table
    for backend in args.backends:
        with ExitStack() as stack:
            url = stack.enter_context(EmbeddedRedis()).url if backend == "single" else stack.enter_context(LocalCluster()).url
            for workers in args.workers:
                for cameras in args.cameras:
                    m = measure(url, workers, cameras, args.frames, bank, images, backend)
                    print(f"{backend:8s} {workers:7d} {cameras:7d} {m['frames']:7d} {m['frames_per_s']:9.1f} "
                          f"{m['ingest_commands_per_frame']:18.1f} {m['commands_per_frame']:11.1f} {m['redis_cpu_ms_per_frame']:19.3f} {m['p99_ms']:9.0f}",
                          flush=True)
                    rows.append({"backend": "one Redis" if backend == "single" else "cluster 3+3", "workers": workers,
                                 "cameras": cameras, "frames": m["frames"], "frames_per_s": m["frames_per_s"],
                                 "ingest_cmds_per_frame": m["ingest_commands_per_frame"],
                                 "worker_store_cmds_per_frame": m["commands_per_frame"],
                                 "redis_cpu_ms_per_frame": m["redis_cpu_ms_per_frame"], "p99_ms_queued": m["p99_ms"]})
    write_result("scale", {"frames_per_camera": args.frames, "frame_side": FRAME_SIDE, "rows": rows})


if __name__ == "__main__":
    main()
