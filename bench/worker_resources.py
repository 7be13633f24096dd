"""A worker's memory and CPU, read from its own /metrics (process_resident_memory_bytes,
process_cpu_seconds_total): what deploy/k8s's resource requests are sized from. Embedded redis-server, a
mobilenet_v2 bank of the synthetic line's first frames, a real `patchcore worker` process and a paced camera.

    .venv/bin/python bench/worker_resources.py [--fps 4] [--seconds 60] [--device cpu]

CPU is reported as CPU-seconds per frame (independent of what else runs on the machine) and as cores at
the given rate; memory as resident set size: after start, with the bank loaded, and the peak while scoring.
"""
from __future__ import annotations

import argparse
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from runtime.connection import connect
from runtime.health import is_ready
from contracts.keys import Keys
from workers.banks.registry import BankRegistry
from patchcore.embedded_redis import EmbeddedRedis
from patchcore.up import UpSettings, warmup_bank
from scorer import bank_to_bytes

from results import write_result  # bench/results.py, beside this script


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "patchcore_results_total":
                values["results"] = values.get("results", 0.0) + sample.value
            elif not sample.labels:
                values[sample.name] = sample.value
    return values


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fps", type=float, default=4.0)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-batch", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis() as server:
        client = connect(server.url)
        bank = warmup_bank(UpSettings(source="synthetic"), Path(tmp), progress=False)
        BankRegistry(client, Keys()).publish("default", bank_to_bytes(bank), activate=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        patchcore = [sys.executable, "-m", "patchcore"]
        worker = subprocess.Popen([*patchcore, "worker", "--redis-url", server.url, "--device", args.device,
                                   "--max-batch", str(args.max_batch), "--metrics-port", str(port)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        camera = None
        try:
            client.sadd(Keys().cameras, "cam-1")  # the worker joins its group before the first frame: ready
            deadline = time.time() + 600
            while not is_ready(port):
                if time.time() > deadline or worker.poll() is not None:
                    raise SystemExit("the worker did not become ready")
                time.sleep(0.5)
            loaded = scrape(port)
            frames = int(args.fps * args.seconds)
            camera = subprocess.Popen([*patchcore, "ingest", "--redis-url", server.url, "--source", "synthetic",
                                       "--camera", "cam-1", "--fps", str(args.fps), "--frames", str(frames)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            peak, first, last = loaded["process_resident_memory_bytes"], None, None
            while True:
                now = scrape(port)
                peak = max(peak, now["process_resident_memory_bytes"])
                if now.get("results", 0) >= 1 and first is None:
                    first = (time.time(), now)
                last = (time.time(), now)
                if now.get("results", 0) >= frames:
                    break
                if time.time() > deadline + args.seconds * 10:
                    raise SystemExit("the worker did not score every frame in time")
                time.sleep(1.0)
        finally:
            for proc in (camera, worker):
                if proc is not None:
                    proc.terminate()
                    proc.wait(timeout=60)
    (t0, m0), (t1, m1) = first, last
    scored = m1["results"] - m0["results"]
    cpu_per_frame = (m1["process_cpu_seconds_total"] - m0["process_cpu_seconds_total"]) / scored
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; device {args.device}; "
          f"mobilenet_v2 bank of {len(bank.features)} features; camera {args.fps} fps for {args.seconds:.0f} s")
    print(f"RSS with the bank loaded, before frames: {loaded['process_resident_memory_bytes'] / 2**20:.0f} MiB; "
          f"peak while scoring: {peak / 2**20:.0f} MiB")
    print(f"CPU: {cpu_per_frame:.3f} CPU-s per frame ({scored:.0f} frames); at {args.fps} fps "
          f"{cpu_per_frame * args.fps:.2f} cores; scored {scored / (t1 - t0):.2f} frames/s")
    write_result("worker_resources", {"fps": args.fps, "seconds": args.seconds, "rows": [{
        "device": args.device, "bank_features": len(bank.features), "frames": int(scored),
        "rss_loaded_mib": round(loaded["process_resident_memory_bytes"] / 2**20), "rss_peak_mib": round(peak / 2**20),
        "cpu_s_per_frame": round(cpu_per_frame, 3), "frames_per_s": round(scored / (t1 - t0), 2)}]})


if __name__ == "__main__":
    main()
