"""A thousand cameras (issue 19): N synthetic cameras at F frames/s each for a stated duration against one Redis
and against a local 3-master cluster (3 masters + 3 replicas, tests/cluster.py), with real `patchcore worker`
and `patchcore store` processes. Extends bench/scale.py (its cheap scorer: mobilenet_v2 with random weights, the
`full` view at 32 px, a bank of a few hundred patches; frames 64x48 JPEG) from a pre-filled queue to paced
cameras, so the latency measured is service, not queueing.

The cameras are one producer process: camera i's k-th frame is due at t0 + (i / N + k) / F (the N cameras
spread evenly over each period), and every due frame is encoded and appended through the real ingest path, the
add_frame function (runtime/scripts.py: idempotent, bounded by the camera's MAXLEN, trimmed frames counted as
`dropped`), pipelined per Redis node. The producer paces itself: a frame whose due time has passed is sent at
once, so a producer that falls behind shows as frames sent late (its own lag is reported, and capture time is
the moment of sending, so it does not hide in the latency).

Measured, over the run:
- every frame one outcome: per camera, results (the camera's results stream, no sequence number twice) +
  dead letters + frames trimmed by the stream bound = frames sent;
- latency capture -> result written (Result.scored_at - captured_at) of the frames scored while the cameras send
  (not of the backlog scored after they stop: its age is the drain's): p50 and p99 over all of them, each
  camera's p99, and fairness = the largest camera p99 / the median camera p99 (issue 19: at most 3);
- Redis: used_memory above the empty server's at the end (results streams hold what the store has read: up to
  the worker's results_maxlen per camera), and CPU (INFO cpu used_cpu_sys + used_cpu_user, summed over the
  masters) over the paced window, per camera and per frame;
- CPU of the workers, the store and the producer (/proc/<pid>/stat) per frame, and the cores each needs at the
  offered rate: the one that needs most is what breaks first as N x F grows (on a shared 2-core machine: the
  backbone in the workers; `capacity` is the frames/s 2 cores would score at the workers' measured cost).

    PYTHONPATH=. .venv/bin/python bench/thousand_cameras.py [--cameras 1000] [--fps 1] [--seconds 600]
        [--backends single cluster] [--workers 2]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np

FRAME_WIDTH, FRAME_HEIGHT = 64, 48
TICKS = os.sysconf("SC_CLK_TCK")


def frame_images(n: int = 16) -> list[np.ndarray]:
    """n small frames of the synthetic line (BGR uint8, FRAME_HEIGHT x FRAME_WIDTH x 3)."""
    from ingest.sources import SyntheticLine

    line = SyntheticLine(seed=0, width=FRAME_WIDTH, height=FRAME_HEIGHT)
    return [line.render(i) for i in range(n)]


def camera_names(n: int) -> list[str]:
    return [f"cam-{i:04d}" for i in range(n)]


def register(client, keys, names: list[str], max_stream_len: int) -> None:
    """An operator's step: every camera's limits (the stream bound `max_stream_len`, exact: add_frame trims to it
    and counts what it trimmed) and its member of the camera set (runtime.cameras.register_camera, pipelined)."""
    from dataclasses import asdict

    from runtime.cameras import CameraLimits

    limits = asdict(CameraLimits(max_stream_len=max_stream_len))
    with client.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.hset(keys.camera_limits(name), mapping=limits)
        pipe.execute()
    client.sadd(keys.cameras, *names)


def produce(url: str, prefix: str, cameras: int, fps: float, seconds: float, start_at: float, out) -> None:
    """The N cameras, paced (see the module docstring); puts (frames sent per camera, trimmed, lag p99 s, CPU s)
    on `out`. Runs in its own process: the bench's sampling must not steal its time."""
    from contracts.framecodec import encode_frame
    from contracts.keys import Keys
    from contracts.messages import Frame
    from ingest.camera import IngestSettings
    from runtime import scripts
    from runtime.connection import connect, node_groups

    keys, client, maxlen = Keys(prefix), connect(url), IngestSettings.maxlen  # a camera's default MAXLEN ~
    add = scripts.load(client, "add_frame")
    names, images = camera_names(cameras), frame_images()
    streams = [keys.frames(c) for c in names]
    stats, limits = [keys.camera_stats(c) for c in names], [keys.camera_limits(c) for c in names]
    node_of = {}  # camera index -> its node's plain client (one pipeline per node and send)
    for node, positions in node_groups(client, streams):
        node_of.update((i, node) for i in positions)
    total = int(cameras * fps * seconds)
    sent, trimmed, lags, j = np.zeros(cameras, np.int64), 0, [], 0
    cpu0 = time.process_time()
    while j < total:
        due = start_at + j / (cameras * fps)
        now = time.time()
        if due > now:
            time.sleep(due - now)
            continue
        batch = []  # every frame due by now, at most one period's worth
        while j < total and start_at + j / (cameras * fps) <= now and len(batch) < cameras:
            batch.append(j)
            j += 1
        lags.append(now - due)
        pipes, order = {}, {}
        for g in batch:
            i, seq = g % cameras, g // cameras
            data, shape = encode_frame(images[g % len(images)])
            frame = Frame(camera=names[i], line="line-1", bank="default", seq=seq, captured_at=time.time(),
                          encoding="jpeg", shape=shape, data=data)
            node = node_of[i]
            pipe = pipes.get(id(node)) or pipes.setdefault(id(node), node.pipeline(transaction=False))
            scripts.add_frame(add, stream=streams[i], stats=stats[i], limits=limits[i], seq=seq, maxlen=maxlen,
                              captured_at=frame.captured_at, frame=frame.pack(), pipe=pipe)
            order.setdefault(id(node), []).append(i)
        for key, pipe in pipes.items():
            for i, reply in zip(order[key], pipe.execute()):
                if reply < 0:  # -1 duplicate, -2 too large, -3 not registered: none expected here
                    raise RuntimeError(f"add_frame refused a frame of {names[i]}: {reply}")
                sent[i] += 1
                trimmed += reply
    out.put((sent.tolist(), int(trimmed), float(np.percentile(lags, 99)) if lags else 0.0,
             time.process_time() - cpu0))


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (/proc/<pid>/stat fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def redis_totals(client) -> tuple[float, int]:
    """(CPU seconds used, used_memory bytes) summed over the masters (the one server of a single Redis)."""
    from runtime.connection import is_cluster

    nodes = [client.get_redis_connection(n) for n in client.get_primaries()] if is_cluster(client) else [client]
    cpu, memory = 0.0, 0
    for node in nodes:
        info = node.info("cpu")
        cpu += float(info["used_cpu_sys"]) + float(info["used_cpu_user"])
        memory += int(node.info("memory")["used_memory"])
    return cpu, memory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Run:
    """One measurement's settings."""
    cameras: int
    fps: float
    seconds: float
    workers: int
    max_batch: int
    maxlen: int
    drain_s: float
    log: str | None  # the processes' logs go to this file (None: nowhere)


def service(url: str, prefix: str, run: Run, log) -> list[tuple[str, subprocess.Popen, int]]:
    """The real processes: `patchcore worker` x run.workers (one torch thread each: two share 2 cores) and
    `patchcore store`, each with a metrics port, their logs to `log`; returns (name, process, metrics port) of
    each once all are ready."""
    from runtime.health import is_ready

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    patchcore = [sys.executable, "-m", "patchcore"]
    common = ["--redis-url", url, "--prefix", prefix]
    procs, ports = [], []
    for w in range(run.workers):
        ports.append(free_port())
        procs.append((f"worker-{w}", subprocess.Popen(
            [*patchcore, "worker", *common, "--name", f"w{w}", "--device", "cpu", "--weights", "random",
             "--max-batch", str(run.max_batch), "--metrics-port", str(ports[-1])],
            env=env, stdout=log, stderr=subprocess.STDOUT)))
    ports.append(free_port())
    procs.append(("store", subprocess.Popen([*patchcore, "store", *common, "--metrics-port", str(ports[-1])],
                                            env=env, stdout=log, stderr=subprocess.STDOUT)))
    deadline = time.time() + 600
    procs = [(name, proc, port) for (name, proc), port in zip(procs, ports)]
    for name, proc, port in procs:
        while not is_ready(port):
            if time.time() > deadline or proc.poll() is not None:
                stop(procs)
                raise SystemExit(f"{name} did not become ready")
            time.sleep(0.5)
    return procs


def batched(port: int) -> float:
    """Frames a worker has taken into batches and scored so far (its patchcore_batch_size histogram's sum), those
    whose result was not written too (a frame the stream bound trimmed while the worker held it)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == "patchcore_batch_size_sum")


def stop(procs) -> None:
    for _, proc, _ in procs:
        proc.terminate()
    for _, proc, _ in procs:
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def outcomes(client, keys, names: list[str], fields=("results", "deadlettered", "dropped")) -> int:
    """Frames with an outcome so far, over all cameras: results + dead letters + frames trimmed by the bound
    (the camera stats hash's counters, written in the same atomic step as each outcome)."""
    with client.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.hmget(keys.camera_stats(name), list(fields))
        replies = pipe.execute()
    return sum(int(v or 0) for reply in replies for v in reply)


def measure(url: str, run: Run, bank: bytes, tag: str) -> dict:
    from contracts.keys import Keys
    from contracts.messages import Result
    from runtime.connection import connect
    from workers.banks.registry import BankRegistry

    prefix = f"thousand-{tag}"
    keys, client, names = Keys(prefix), connect(url), camera_names(run.cameras)
    _, memory_empty = redis_totals(client)
    BankRegistry(client, keys).publish("default", bank, activate=True)
    register(client, keys, names, run.maxlen)
    log = open(run.log, "ab") if run.log else subprocess.DEVNULL
    procs = service(url, prefix, run, log)
    try:  # the worker and store processes stop whatever happens (a dead producer: queue.Empty)
        context = mp.get_context("spawn")
        out = context.Queue()
        start_at = time.time() + 5  # the producer's imports and first connections
        producer = context.Process(target=produce, args=(url, prefix, run.cameras, run.fps, run.seconds, start_at,
                                                         out))
        producer.start()
        time.sleep(max(0.0, start_at - time.time()))
        cpu0 = {name: proc_cpu_s(p.pid) for name, p, _ in procs}
        redis_cpu0, _ = redis_totals(client)
        while producer.is_alive() and time.time() < start_at + run.seconds + 60:
            producer.join(1.0)  # (memory sampled below, at the end of the paced window)
        sent, trimmed, lag_p99, producer_cpu = out.get(timeout=60)
        producer.join(10)
        paced_end = time.time()
        paced_s = paced_end - start_at
        redis_cpu1, memory_paced = redis_totals(client)
        cpu1 = {name: proc_cpu_s(p.pid) for name, p, _ in procs}
        scored_frames = sum(batched(port) for name, _, port in procs if name.startswith("worker"))
        scored = outcomes(client, keys, names, ("results",))  # in the paced window (the queues were empty before it)
        total = sum(sent)
        backlog = total - outcomes(client, keys, names)  # frames not yet scored when the cameras stop
        deadline = time.time() + run.drain_s
        while outcomes(client, keys, names) < total and time.time() < deadline:
            time.sleep(1.0)
        time.sleep(3.0)  # the store's last commits
    finally:
        stop(procs)
    # every frame one outcome, per camera: results (no seq twice) + dead letters + trimmed = sent
    latencies, per_camera_p99, duplicates, missing, queued, drained = [], [], 0, 0, 0, 0
    for name, count in zip(names, sent):
        results = [Result.unpack(f[b"m"]) for _, f in client.xrange(keys.results(name))]
        seqs = [r.seq for r in results]
        duplicates += len(seqs) - len(set(seqs))
        stats = client.hmget(keys.camera_stats(name), ["deadlettered", "dropped"])
        waiting = client.xlen(keys.frames(name))  # still queued when the drain ended: no outcome yet, not lost
        queued += waiting
        missing += count - len(set(seqs)) - sum(int(v or 0) for v in stats) - waiting
        ms = np.array([(r.scored_at - r.captured_at) * 1000 for r in results if r.scored_at <= paced_end])
        drained += sum(r.scored_at > paced_end for r in results)
        latencies.append(ms)
        if len(ms):
            per_camera_p99.append(float(np.percentile(ms, 99)))
    every = np.concatenate(latencies) if latencies else np.zeros(0)
    _, memory_end = redis_totals(client)
    cpu = {name: cpu1[name] - cpu0[name] for name in cpu0}
    worker_cpu = sum(v for name, v in cpu.items() if name.startswith("worker"))
    median_p99 = float(np.median(per_camera_p99)) if per_camera_p99 else float("nan")
    offered = run.cameras * run.fps
    return {
        "cameras": run.cameras, "fps_per_camera": run.fps, "offered_frames_per_s": offered,
        "seconds": run.seconds, "workers": run.workers, "frames_sent": total, "trimmed": trimmed,
        "maxlen": run.maxlen, "results": int(len(every)) + drained, "results_after_cameras_stopped": drained, "duplicates": duplicates, "without_outcome": missing,
        "queued_after_drain": queued,
        "backlog_at_end": backlog, "producer_lag_p99_s": lag_p99,
        "p50_ms": float(np.percentile(every, 50)) if len(every) else float("nan"),
        "p99_ms": float(np.percentile(every, 99)) if len(every) else float("nan"),
        "camera_p99_median_ms": median_p99, "camera_p99_max_ms": max(per_camera_p99, default=float("nan")),
        "fairness": max(per_camera_p99, default=float("nan")) / median_p99,
        "redis_memory_kb_per_camera": (memory_paced - memory_empty) / run.cameras / 1024,
        "redis_memory_mb": memory_paced / 2**20, "redis_memory_end_mb": memory_end / 2**20,
        "scored_frames_per_s": scored / paced_s, "redis_cpu_ms_per_frame": (redis_cpu1 - redis_cpu0) * 1000 / total,
        "redis_cpu_ms_per_camera_s": (redis_cpu1 - redis_cpu0) * 1000 / run.cameras / paced_s,
        "redis_cores": (redis_cpu1 - redis_cpu0) / paced_s,
        "worker_cpu_ms_per_frame": worker_cpu * 1000 / max(scored, 1),
        "frames_batched": scored_frames, "worker_cpu_ms_per_batched_frame": worker_cpu * 1000 / max(scored_frames, 1),
        "worker_cores": worker_cpu / paced_s, "store_cores": cpu["store"] / paced_s,
        "store_cpu_ms_per_frame": cpu["store"] * 1000 / max(scored, 1),
        "producer_cores": producer_cpu / paced_s,
        "capacity_frames_per_s_2_cores": 2 * scored / worker_cpu if worker_cpu else float("nan"),
    }


COLUMNS = (("cameras", "{cameras}"), ("fps", "{fps_per_camera:g}"), ("sent", "{frames_sent}"),
           ("results", "{results}"), ("trimmed", "{trimmed}"), ("no outcome", "{without_outcome}"), ("dup", "{duplicates}"),
           ("p50 ms", "{p50_ms:.0f}"), ("p99 ms", "{p99_ms:.0f}"), ("fair", "{fairness:.2f}"),
           ("Redis KB/cam", "{redis_memory_kb_per_camera:.1f}"), ("Redis cores", "{redis_cores:.2f}"),
           ("worker cores", "{worker_cores:.2f}"), ("store cores", "{store_cores:.2f}"),
           ("backlog", "{backlog_at_end}"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cameras", type=int, default=1000)
    parser.add_argument("--fps", type=float, default=1.0, help="frames/s per camera")
    parser.add_argument("--seconds", type=float, default=600.0, help="how long the cameras send")
    parser.add_argument("--backends", nargs="+", default=["single", "cluster"], choices=["single", "cluster"])
    parser.add_argument("--workers", type=int, default=2, help="patchcore worker processes")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--maxlen", type=int, default=256,
                        help="each camera's stream bound (the operator's max_stream_len: exact, trimmed frames counted)")
    parser.add_argument("--drain-s", type=float, default=300.0, help="wait at most this for the backlog")
    parser.add_argument("--log", help="append the workers' and the store's logs to this file")
    parser.add_argument("--result", default="thousand_cameras", help="bench/results/<name>.json")
    args = parser.parse_args()
    from scale import tiny_bank  # bench/scale.py, beside this script
    from patchcore.embedded_redis import EmbeddedRedis
    from results import write_result  # bench/results.py, beside this script
    from tests.cluster import LocalCluster

    run = Run(args.cameras, args.fps, args.seconds, args.workers, args.max_batch, args.maxlen, args.drain_s, args.log)
    bank = tiny_bank()
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; {run.cameras} cameras "
          f"x {run.fps:g} frames/s for {run.seconds:.0f} s, {FRAME_WIDTH}x{FRAME_HEIGHT} JPEG; {run.workers} workers "
          f"(mobilenet_v2, random weights, full view 32 px), 1 store", flush=True)
    rows = []
    for backend in args.backends:
        with ExitStack() as stack:
            url = (stack.enter_context(EmbeddedRedis()).url if backend == "single"
                   else stack.enter_context(LocalCluster()).url)
            row = {"backend": "one Redis" if backend == "single" else "cluster 3+3",
                   **measure(url, run, bank, backend)}
        rows.append(row)
        print(backend, "  ".join(f"{h} {t.format(**row)}" for h, t in COLUMNS), flush=True)
        print(f"  producer lag p99 {row['producer_lag_p99_s']:.2f} s, {row['producer_cores']:.2f} cores; worker "
              f"{row['worker_cpu_ms_per_frame']:.2f} CPU-ms/frame (2 cores: {row['capacity_frames_per_s_2_cores']:.0f}"
              f" frames/s); Redis {row['redis_cpu_ms_per_frame']:.3f} CPU-ms/frame, "
              f"{row['redis_memory_mb']:.0f} MB", flush=True)
    write_result(args.result, {"frame": f"{FRAME_WIDTH}x{FRAME_HEIGHT} JPEG", "rows": rows})


if __name__ == "__main__":
    main()
