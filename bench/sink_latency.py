"""Verdict written to Redis -> received by the destination, through a `patchcore sink` process, on loopback.

    .venv/bin/python bench/sink_latency.py [--rate 100] [--seconds 20] [--cameras 4]

For each destination (webhook: an http.server receiver that checks signatures; MQTT: Debian's mosquitto and a
subscriber; OPC UA: an asyncua server with the PLC layout; Modbus TCP: a pymodbus server with a block per camera,
a verdict received when its heartbeat register is written; see tests/sinkservers.py) one `patchcore sink`
process runs against an embedded Redis while this script writes `--rate` verdicts per second, spread over
`--cameras` cameras, into their results streams (as workers do), for `--seconds`. The latency of a verdict is the
time its destination got it minus its `scored_at` (set just before its XADD; one clock: one machine). Every
verdict must arrive (at least once); p50, p99 and the maximum are over first arrivals. Figures go to
bench/results/sink_latency.json (table `sink_latency` in docs/sinks.md). A shared machine's load shows in them.
"""
from __future__ import annotations

import argparse
import datetime
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests/sinkservers.py: the same real destinations the tests use

import numpy as np  # noqa: E402

from contracts.keys import Keys  # noqa: E402
from contracts.messages import Result  # noqa: E402
from patchcore.embedded_redis import EmbeddedRedis  # noqa: E402
from runtime.connection import connect  # noqa: E402
from tests.sinkservers import (MOSQUITTO, ModbusPlc, Mosquitto, PlcServer, Receiver, Subscriber,  # noqa: E402
                               wait_for)

from results import write_result  # noqa: E402  (bench/results.py, beside this script)

KEYS = Keys()
SECRET = b"bench-secret"


SCORED_AT: dict[str, float] = {}  # "<camera>:<seq>" -> its scored_at (a Modbus block carries no time)


def produce(client, cameras: list[str], rate: float, seconds: float) -> int:
    """Write `rate` verdicts per second round-robin over `cameras` for `seconds`, paced; returns how many."""
    seqs = {camera: 0 for camera in cameras}
    start, sent = time.monotonic(), 0
    while time.monotonic() - start < seconds:
        due = start + sent / rate
        time.sleep(max(0.0, due - time.monotonic()))
        camera = cameras[sent % len(cameras)]
        now = time.time()
        result = Result(camera=camera, line="line-1", seq=seqs[camera], captured_at=now, scored_at=now, score=0.5,
                        threshold=1.0, anomalous=False, bank="bench", bank_version=1, worker="bench")
        client.xadd(KEYS.results(camera), {"m": result.pack()}, maxlen=100_000, approximate=True)
        SCORED_AT[f"{camera}:{result.seq}"] = now
        seqs[camera] += 1
        sent += 1
    return sent


def sink_process(url: str, kind: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "patchcore", "--log-level", "error", "sink", kind, "--redis-url",
                             url, "--sink", f"bench-{kind}", "--no-alarms", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)


def measure(kind: str, url: str, args: list[str], arrivals, client, cameras, rate, seconds) -> dict:
    """Run one sink process, produce, wait for every verdict; arrivals() -> [(key, scored_at, received_at)]."""
    process = sink_process(url, kind, *args)
    try:
        time.sleep(3.0)  # the process starts (imports) and joins its group before the clock starts
        sent = produce(client, cameras, rate, seconds)
        complete = wait_for(lambda: len({key for key, _, _ in arrivals()}) >= sent, 60, 0.1)
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=30)
        client.delete(*(KEYS.results(camera) for camera in cameras))  # the next sink starts on empty streams
    rows = arrivals()
    first: dict[str, float] = {}
    for key, scored_at, received_at in rows:
        first.setdefault(key, received_at - scored_at)
    latencies = np.array(sorted(first.values())) * 1000
    figures = {"destination": kind, "verdicts": sent, "received": len(first), "duplicates": len(rows) - len(first),
               "complete": bool(complete), "rate_per_s": rate, "seconds": seconds, "cameras": len(cameras),
               "latency_p50_ms": float(np.percentile(latencies, 50)) if len(latencies) else None,
               "latency_p99_ms": float(np.percentile(latencies, 99)) if len(latencies) else None,
               "latency_max_ms": float(latencies.max()) if len(latencies) else None}
    print(figures, flush=True)
    if not complete:
        print(err.decode(errors="replace")[-2000:], file=sys.stderr)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--cameras", type=int, default=4)
    args = parser.parse_args()
    cameras = [f"cam-{i}" for i in range(args.cameras)]
    rows = []
    with EmbeddedRedis() as redis_server, tempfile.TemporaryDirectory() as folder:
        client = connect(redis_server.url)
        client.sadd(KEYS.cameras, *cameras)
        secret = Path(folder) / "secret"
        secret.write_bytes(SECRET)

        receiver = Receiver(SECRET).start()
        try:
            rows.append(measure("webhook", redis_server.url, ["--url", receiver.url, "--secret-file", str(secret)],
                                lambda: [(r["key"], r["body"]["scored_at"], r["at"]) for r in list(receiver.received)],
                                client, cameras, args.rate, args.seconds))
        finally:
            receiver.stop()

        if MOSQUITTO is not None:
            broker = Mosquitto(Path(folder)).start()
            subscriber = Subscriber(broker.port, "patchcore/#")
            try:
                rows.append(measure("mqtt", redis_server.url, ["--host", "127.0.0.1", "--port", str(broker.port)],
                                    lambda: [(m[1]["id"], m[1]["scored_at"], m[3]) for m in list(subscriber.messages)],
                                    client, cameras, args.rate, args.seconds))
            finally:
                subscriber.stop()
                broker.stop()

        plc = PlcServer(cameras).start()
        try:
            def written():
                pairs = list(zip(list(plc.writes), list(plc.write_at)))
                return [(f"{camera}:{values['Seq']}", values["Timestamp"].replace(
                    tzinfo=datetime.timezone.utc).timestamp(), at)
                        for (camera, values), at in pairs if "Seq" in values]
            rows.append(measure("opcua", redis_server.url, ["--url", plc.url], written, client, cameras, args.rate,
                                args.seconds))
        finally:
            plc.stop()

        modbus = ModbusPlc(coils=16 * len(cameras), registers=16 * len(cameras)).start()
        try:
            bases = {16 * i: camera for i, camera in enumerate(cameras)}

            def committed():  # a verdict counts as received when its block's heartbeat (base + 10) is written
                rows, seqs = [], {}
                for (code, address, values), at in modbus.recorded_at():
                    if code == 16 and address in bases:
                        seqs[address] = values[0] << 16 | values[1]
                    elif code == 6 and address - 10 in seqs:
                        key = f"{bases[address - 10]}:{seqs.pop(address - 10)}"
                        rows.append((key, SCORED_AT[key], at))
                return rows
            blocks = [f"--map={camera}={base}" for base, camera in bases.items()]
            rows.append(measure("modbus", redis_server.url, ["--host", "127.0.0.1", "--port", str(modbus.port), *blocks],
                                committed, client, cameras, args.rate, args.seconds))
        finally:
            modbus.stop()
    write_result("sink_latency", {"rows": rows, "load_average_1min": round(os.getloadavg()[0], 2)})
    return 0 if all(row["complete"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
