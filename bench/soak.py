"""Soak: cameras, workers and the store under random SIGKILLs, Redis killed and restarted from its AOF,
one camera sending garbage; optionally lost replies on every connection, or a Redis Cluster whose masters are
SIGKILLed. Nothing may be lost or duplicated, and every anomalous result raises exactly one alarm.

    .venv/bin/python bench/soak.py [--minutes 30] [--cameras 8] [--workers 2] [--fps 1]
                                   [--kill-every 45] [--redis-restarts 2] [--worker-threads N] [--json FILE]
                                   [--lost-replies P | --cluster --failovers N]

Every process is a real `patchcore` process (ingest per camera, workers, store) on a real redis-server
with `appendonly yes` and `appendfsync always`. During the soak:
- every `--kill-every` seconds a worker or the store (one time in three) is SIGKILLed and a
  replacement started at once, with the same consumer name for the store and a new name for workers;
- Redis itself is SIGKILLed `--redis-restarts` times, evenly spaced, down for 5 s, and started again
  from its AOF on the same port: every process has to ride out the outage;
- the last camera is garbage: raw XADDs of random bytes, msgpack that is not a frame, frames whose JPEG
  is corrupt, and frames whose encoded size contradicts their declared shape (all must be dead-lettered);
- `--lost-replies P`: every process (cameras, workers, store) reaches Redis through tests/faultproxy.py's
  FaultProxy, which drops a share P of the replies to whatever command and closes that connection (the
  command ran; redis-py's retry sends it again); the soak's own accounting and the garbage camera go direct;
- `--cluster`: a 3-master Redis Cluster with one replica each (tests/cluster.py, AOF on) in place of the single
  Redis; `--failovers N` times, evenly spaced, a master is SIGKILLed, its replica promoted, and the killed node
  started again (it rejoins as a replica). Cameras and workers write with WAIT 1 (--wait-replicas 1), so a write
  a failover could lose is one WAIT did not confirm. Not combined with --lost-replies (a cluster client finds
  the nodes' own addresses, past a proxy).

The store runs the rule 1-of-1 with no cooldown and drift off, so that every anomalous result (score at or over
its threshold) must raise exactly one alarm, on time or marked late.

At the end the cameras stop, the backlog drains, and it prints per camera: frames sent (accepted by
Redis: the camera's `ingested` counter, or the garbage sender's own count), results (distinct sequence
numbers in the results stream), duplicates, dead-lettered (with reasons), dropped, and lost
(sent - results - dead-lettered - dropped: must be 0) and gaps (sequence numbers up to the camera's last
with no result, not dead-lettered, not dropped: what a failover took from a camera's counters as well as from
its stream); anomalous results, alarms (of them late), missing alarms (must be 0), duplicate alarms and alarms
with no anomalous result; and the resident memory of every process slot and of Redis, sampled every
`--sample-s` seconds (a slot's process is marked `*` where it was replaced by a kill).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import msgpack

from store.alarms.feed import read_alarms
from store.service import StoreSettings
from runtime.connection import connect
from runtime.deadletter import DeadLetters
from contracts.keys import STORE_GROUP, Keys
from contracts.messages import Frame, Result
from workers.banks.registry import BankRegistry
from patchcore.embedded_redis import EmbeddedRedis
from patchcore.up import UpSettings, warmup_bank
from scorer import bank_to_bytes

from results import write_result  # bench/results.py, beside this script

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: its tests/ helpers
from tests.cluster import LocalCluster  # noqa: E402 - a real Redis Cluster on loopback
from tests.faultproxy import FaultProxy  # noqa: E402 - the TCP proxy that loses replies

STORE_RULE = ("--k", "1", "--n", "1", "--cooldown-s", "0", "--drift-policy", "off")  # every anomalous result alarms
STORE_QUIET_S = 3 * StoreSettings().quiet_s  # after the drain: the store has decided every window
CLUSTER_WAIT = ("--wait-replicas", "1", "--wait-ms", "500")  # cameras' and workers' writes confirmed by a replica

GARBAGE_KINDS = ("random bytes", "msgpack list", "corrupt jpeg", "shape mismatch")


def rss_mb(process: subprocess.Popen) -> int | None:
    """Resident memory of a running process, MB; None once it has exited."""
    if process.poll() is not None:
        return None
    try:
        for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024)
    except OSError:
        pass
    return None


def spawn(url: str, log_dir: Path, name: str, *args: str, threads: int = 0) -> subprocess.Popen:
    log = open(log_dir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child for its lifetime
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    return subprocess.Popen([sys.executable, "-m", "patchcore", *args, "--redis-url", url],
                            stdout=log, stderr=log, env=env)


class GarbageCamera(threading.Thread):
    """A broken camera: one message per 1/fps seconds, cycling through GARBAGE_KINDS; counts what Redis accepted."""

    def __init__(self, url: str, camera: str, fps: float, keys: Keys, seed: int):
        super().__init__(daemon=True)
        self.url, self.camera, self.interval, self.keys = url, camera, 1.0 / fps, keys
        self.rng = random.Random(seed)
        self.sent = Counter()
        self.stop = threading.Event()

    def message(self, seq: int, kind: str) -> bytes:
        if kind == "random bytes":
            return self.rng.randbytes(self.rng.randint(1, 4096))
        if kind == "msgpack list":
            return msgpack.packb([1, 2, 3, "not a frame"])
        data = b"\xff\xd8\xff\xe0" + self.rng.randbytes(2000)  # a JPEG start, then noise
        shape = (240, 320, 3)
        if kind == "shape mismatch":  # a valid 64 x 64 JPEG declared as 240 x 320
            import cv2
            import numpy as np

            ok, encoded = cv2.imencode(".jpg", np.full((64, 64, 3), 127, np.uint8))
            data = encoded.tobytes()
        return Frame(camera=self.camera, line="line-1", bank="default", seq=seq, captured_at=time.time(),
                     encoding="jpeg", shape=shape, data=data).pack()

    def run(self) -> None:
        client, seq = connect(self.url), 0
        while not self.stop.wait(self.interval):
            kind = GARBAGE_KINDS[seq % len(GARBAGE_KINDS)]
            try:
                client.sadd(self.keys.cameras, self.camera)
                client.xadd(self.keys.frames(self.camera), {"m": self.message(seq, kind)})
            except Exception:  # noqa: BLE001 - Redis is down (a restart): this message was not sent
                continue
            self.sent[kind] += 1
            seq += 1


class SingleRedis:
    """One redis-server with its AOF (appendfsync always); with `lost_replies` > 0 the processes reach it through a
    FaultProxy that drops that share of replies. `disrupt` SIGKILLs it and starts it again from its AOF."""

    def __init__(self, workdir: Path, lost_replies: float, seed: int):
        (workdir / "redis").mkdir()
        self.server = EmbeddedRedis(appendonly=True, data_dir=workdir / "redis", extra_args=["--appendfsync", "always"])
        self.lost_replies, self.seed = lost_replies, seed
        self.proxy: FaultProxy | None = None

    def __enter__(self) -> "SingleRedis":
        self.server.start()
        if self.lost_replies:
            self.proxy = FaultProxy(self.server.port, drop_rate=self.lost_replies, seed=self.seed).__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.proxy:
            self.proxy.__exit__()
        self.server.stop()

    @property
    def url(self) -> str:
        """Where the soak itself reads and writes: always direct."""
        return self.server.url

    @property
    def process_url(self) -> str:
        """Where cameras, workers and the store connect: through the proxy when replies are lost."""
        return self.proxy.url if self.proxy else self.server.url

    def disrupt(self) -> str:
        self.server.process.send_signal(signal.SIGKILL)
        self.server.process.wait()
        time.sleep(5)
        self.server.start(timeout=60)
        return "SIGKILL redis-server, restarted from its AOF after 5 s"

    def rss_mb(self) -> int | None:
        return rss_mb(self.server.process)

    def describe(self) -> str:
        """The Redis-side faults, in words (the soak tables' first column)."""
        lost = (f"{self.lost_replies:.0%} of replies to every process lost, connection closed "
                f"({self.proxy.dropped:,} of {self.proxy.replies:,}); " if self.proxy else "")
        return f"one Redis: {lost}SIGKILLed and restarted from its AOF"

    def faults(self) -> dict:
        if not self.proxy:
            return {}
        return {"lost_replies": self.lost_replies, "replies": self.proxy.replies, "replies_dropped": self.proxy.dropped}


class ClusterRedis:
    """A 3-master Redis Cluster with a replica each (tests/cluster.py); `disrupt` SIGKILLs a master, waits until its
    replica serves its slots, then starts the killed node again (it rejoins as a replica) and waits until it is in
    sync, so that the next failover finds a replica for every master."""

    def __init__(self, seed: int):
        self.cluster = LocalCluster(masters=3, replicas=1)
        self.rng = random.Random(seed)
        self.failover_s: list[float] = []

    def __enter__(self) -> "ClusterRedis":
        self.cluster.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.cluster.__exit__()

    @property
    def url(self) -> str:
        return self.cluster.url  # a live node: every client finds the others

    process_url = url

    def disrupt(self) -> str:
        victim = self.rng.choice(self.cluster.master_ports())
        self.cluster.kill(victim)
        killed_at = time.monotonic()
        self.cluster.wait_ok(120)
        took = time.monotonic() - killed_at
        self.failover_s.append(round(took, 1))
        self.cluster.restart(victim)
        self.cluster.wait_ok(120)
        return f"SIGKILL master redis-server :{victim}, its replica serving its slots after {took:.1f} s; :{victim} back as a replica"

    def rss_mb(self) -> int | None:
        """All nodes together."""
        sizes = [rss_mb(process) for process in self.cluster.processes.values()]
        return sum(size for size in sizes if size is not None) or None

    def describe(self) -> str:
        took = f", replica serving after {min(self.failover_s)}-{max(self.failover_s)} s" if self.failover_s else ""
        return f"3-master cluster, replicas, WAIT 1: masters SIGKILLed{took}"

    def faults(self) -> dict:
        return {"failover_s": self.failover_s}


class Soak:
    def __init__(self, args: argparse.Namespace, server: SingleRedis | ClusterRedis, workdir: Path):
        self.args, self.server, self.keys = args, server, Keys()
        self.rng = random.Random(args.seed)
        self.log_dir = workdir / "logs"
        self.log_dir.mkdir()
        self.cameras = [f"cam-{i}" for i in range(args.cameras - 1)]
        self.garbage_camera = f"cam-{args.cameras - 1}-garbage"
        self.processes: dict[str, subprocess.Popen] = {}  # slot -> current process
        self.started_at: dict[str, float] = {}  # slot -> when its current process started
        self.consumer: dict[str, str] = {}  # worker slot -> its consumer name
        self.replaced: set[str] = set()  # slots replaced since the last sample
        self.events: list[str] = []
        self.serial = 0
        self.samples: list[dict] = []
        self.wait = CLUSTER_WAIT if args.cluster else ()

    # processes -------------------------------------------------------------------------------------------
    def start_worker(self, slot: str) -> None:
        self.serial += 1
        self.started_at[slot], self.consumer[slot] = time.monotonic(), f"worker-{self.serial}"
        self.processes[slot] = spawn(self.server.process_url, self.log_dir, slot, "worker", "--name",
                                     f"worker-{self.serial}", "--claim-idle-ms", "3000", "--device", "cpu",
                                     *self.wait, threads=self.args.worker_threads)

    def start_store(self) -> None:
        self.started_at["store"] = time.monotonic()
        self.processes["store"] = spawn(self.server.process_url, self.log_dir, "store", "store", *STORE_RULE)

    def start_all(self) -> None:
        for i, camera in enumerate(self.cameras):
            self.processes[camera] = spawn(self.server.process_url, self.log_dir, camera, "ingest",
                                           "--source", f"synthetic:seed={i}", "--camera", camera,
                                           "--fps", str(self.args.fps), *self.wait)
        for i in range(self.args.workers):
            self.start_worker(f"worker{i}")
        self.start_store()

    def working(self, client) -> list[str]:
        """Slots whose process has run for --min-uptime s and (workers) has sent a heartbeat: killing a
        process that is still importing torch tests nothing (on a loaded machine that takes minutes)."""
        try:
            beating = {name.decode() for name in client.hkeys(self.keys.workers)}
        except Exception:  # noqa: BLE001 - Redis down: nothing to choose from now
            return []
        old = {slot for slot, at in self.started_at.items() if time.monotonic() - at >= self.args.min_uptime}
        return sorted(slot for slot in old if slot == "store" or self.consumer.get(slot) in beating)

    def kill_one(self, elapsed: float, client) -> None:
        candidates = self.working(client)
        if not candidates:
            self.events.append(f"{elapsed:6.0f} s no kill: no worker or store up for {self.args.min_uptime:g} s yet")
            return
        stores = [c for c in candidates if c == "store"]
        victim = stores[0] if stores and self.rng.random() < 1 / 3 else self.rng.choice(
            [c for c in candidates if c != "store"] or candidates)
        self.processes[victim].send_signal(signal.SIGKILL)
        self.processes[victim].wait()
        self.start_store() if victim == "store" else self.start_worker(victim)
        self.replaced.add(victim)
        self.events.append(f"{elapsed:6.0f} s SIGKILL {victim}")

    def restart_redis(self, elapsed: float) -> None:
        """Redis SIGKILLed: restarted from its AOF, or (a cluster) a master replaced by its replica."""
        self.events.append(f"{elapsed:6.0f} s {self.server.disrupt()}")
        self.replaced.add("redis")

    def sample(self, elapsed: float) -> None:
        row = {"t": round(elapsed), **{slot: rss_mb(p) for slot, p in self.processes.items()},
               "redis": self.server.rss_mb()}
        row["replaced"] = sorted(self.replaced)
        self.replaced = set()
        self.samples.append(row)

    # accounting ------------------------------------------------------------------------------------------
    def count(self, client) -> dict:
        """Per camera: frames and results (see the module's docstring), and the alarm accounting of the 1-of-1
        rule: `anomalous` results (distinct sequence numbers whose score is at or over their threshold), `alarms`
        (of them `late_alarms`), `missing_alarms` (anomalous with no alarm), `duplicate_alarms` (a second alarm for
        one sequence number) and `spurious_alarms` (an alarm whose frame has no anomalous result)."""
        alarms, _ = read_alarms(client, self.keys, count=1_000_000)
        per_camera = {}
        for camera in [*self.cameras, self.garbage_camera]:
            stats = {k.decode(): v.decode() for k, v in client.hgetall(self.keys.camera_stats(camera)).items()}
            results = [Result.unpack(fields[b"m"]) for _, fields in client.xrange(self.keys.results(camera))]
            seqs = [r.seq for r in results]
            anomalous = {r.seq for r in results if r.threshold is not None and r.score >= r.threshold}
            own = [a for a in alarms if a.camera == camera]
            alarmed = {a.seq for a in own}
            c = per_camera[camera] = {
                "sent": int(stats.get("ingested", 0)), "results": len(set(seqs)),
                "duplicates": len(seqs) - len(set(seqs)), "deadlettered": int(stats.get("deadlettered", 0)),
                "dropped": int(stats.get("dropped", 0)), "pending": client.xlen(self.keys.frames(camera)),
                "anomalous": len(anomalous), "alarms": len(own), "late_alarms": sum(bool(a.late_by) for a in own),
                "missing_alarms": len(anomalous - alarmed), "duplicate_alarms": len(own) - len(alarmed),
                "spurious_alarms": len(alarmed - anomalous), "missing_alarm_seqs": sorted(anomalous - alarmed)[:50]}
            if camera != self.garbage_camera and "last_seq" in stats:  # ingest numbers its frames from 0
                c["gaps"] = int(stats["last_seq"]) + 1 - c["results"] - c["deadlettered"] - c["dropped"]
        reasons = Counter()
        for letter in DeadLetters(client, self.keys).list():
            reasons[(letter.camera, letter.reason.split(":")[0][:60])] += 1
        return {"cameras": per_camera, "deadletter_reasons": reasons, "alarms": len(alarms),
                "duplicate_alarms": sum(c["duplicate_alarms"] for c in per_camera.values())}

    def store_caught_up(self, client) -> bool:
        """The store has read and committed every result (its group: nothing pending, nothing unread)."""
        for camera in [*self.cameras, self.garbage_camera]:
            stream = self.keys.results(camera)
            if not client.exists(stream):
                continue
            group = next((g for g in client.xinfo_groups(stream) if g["name"] in (STORE_GROUP, STORE_GROUP.encode())),
                         None)
            if group is None or group["pending"] or group.get("lag") not in (0, None):
                return False
            last = client.xinfo_stream(stream)["last-generated-id"]
            if group["last-delivered-id"] != last:
                return False
        return True

    def drained(self, counts: dict, garbage_sent: int) -> bool:
        cams = counts["cameras"]
        good = all(c["results"] + c["deadlettered"] + c["dropped"] >= c["sent"] for n, c in cams.items()
                   if n != self.garbage_camera)
        return good and cams[self.garbage_camera]["deadlettered"] + cams[self.garbage_camera]["results"] >= garbage_sent

    # the soak --------------------------------------------------------------------------------------------
    def run(self) -> dict:
        args = self.args
        self.start_all()
        garbage = GarbageCamera(self.server.url, self.garbage_camera, args.fps, self.keys, args.seed)
        garbage.start()
        client = connect(self.server.url)
        ready_wait = time.monotonic()
        while not client.hlen(self.keys.workers) and time.monotonic() - ready_wait < 1800:
            time.sleep(1)  # the soak's clock starts once a worker is up (model loaded, heartbeat sent)
        self.events.append(f"     0 s first worker heartbeat after {time.monotonic() - ready_wait:.0f} s of start-up")
        duration = args.minutes * 60
        restarts = [duration * (i + 1) / (args.redis_restarts + 1) for i in range(args.redis_restarts)]
        started = time.monotonic()
        next_kill, next_sample = args.kill_every, 0.0
        while (elapsed := time.monotonic() - started) < duration:
            time.sleep(0.5)
            if elapsed >= next_sample:
                self.sample(elapsed)
                next_sample += args.sample_s
            if restarts and elapsed >= restarts[0]:
                restarts.pop(0)
                self.restart_redis(elapsed)
            if elapsed >= next_kill:
                self.kill_one(elapsed, client)
                next_kill += args.kill_every
            for slot, process in self.processes.items():  # a process that died on its own is a finding
                if process.poll() is not None and not slot.startswith("cam"):
                    self.events.append(f"{elapsed:6.0f} s {slot} EXITED by itself (rc {process.returncode}); restarted")
                    self.start_store() if slot == "store" else self.start_worker(slot)
                    self.replaced.add(slot)
        garbage.stop.set()
        garbage.join()
        for camera in self.cameras:
            self.processes[camera].send_signal(signal.SIGTERM)
        for camera in self.cameras:
            self.processes[camera].wait(timeout=120)
        garbage_sent = sum(garbage.sent.values())
        drain_started = time.monotonic()
        while time.monotonic() - drain_started < args.drain_s:
            counts = self.count(client)
            if self.drained(counts, garbage_sent) and self.store_caught_up(client):
                break
            time.sleep(2)
        time.sleep(STORE_QUIET_S)  # the store decides the cameras' last windows once they have been quiet a while
        self.sample(time.monotonic() - started)
        for slot in [s for s in self.processes if not s.startswith("cam")]:
            self.processes[slot].send_signal(signal.SIGTERM)
        for slot in [s for s in self.processes if not s.startswith("cam")]:
            self.processes[slot].wait(timeout=120)
        counts = self.count(client)
        counts["cameras"][self.garbage_camera]["sent"] = garbage_sent
        counts["garbage_sent_by_kind"] = dict(garbage.sent)
        counts["drain_seconds"] = round(time.monotonic() - drain_started, 1)
        counts["redis_used_memory_mb"] = round(int(client.info("memory")["used_memory"]) / 2**20, 1)
        return counts


def rss_ranges(samples: list[dict]) -> dict:
    """Resident memory per kind of process (worker, store, camera, redis): 'low-high' MB over every sample."""
    seen: dict[str, list[float]] = {}
    for row in samples:
        for slot, mb in row.items():
            if slot in ("t", "replaced") or mb is None:
                continue
            kind = "camera" if slot.startswith("cam") else slot.rstrip("0123456789-_")
            seen.setdefault(kind, []).append(float(mb))
    return {kind: f"{min(mbs):.0f}-{max(mbs):.0f}" for kind, mbs in seen.items()}


def result_figures(soak: Soak, counts: dict, cams: dict, garbage: str) -> dict:
    """The figures of docs/guarantees.md's soak tables: the good cameras together, the garbage camera, kills."""
    fields = ("sent", "results", "duplicates", "deadlettered", "dropped", "lost")
    good = [c for name, c in cams.items() if name != garbage]
    rows = [{"cameras": f"{len(good)} good cameras", "deadlettered_note": "",
             **{k: sum(c[k] for c in good) for k in fields}},
            {"cameras": "garbage camera", "deadlettered_note": "(every one, with its reason)"
             if cams[garbage]["deadlettered"] == cams[garbage]["sent"] else "", **{k: cams[garbage][k] for k in fields}}]
    alarm_fields = ("anomalous", "alarms", "late_alarms", "missing_alarms", "duplicate_alarms", "spurious_alarms")
    return {"rows": rows, "alarms": counts["alarms"], "duplicate_alarms": counts["duplicate_alarms"],
            "drain_s": counts["drain_seconds"], "rss_mb": rss_ranges(soak.samples),
            "kills": {"worker": sum("SIGKILL worker" in e for e in soak.events),
                      "store": sum("SIGKILL store" in e for e in soak.events),
                      "redis": sum("redis-server" in e for e in soak.events)},
            "variant": variant(soak.args), "minutes": soak.args.minutes, "faults": soak.server.faults(),
            "redis_faults": soak.server.describe(),
            "good": {"cameras": len(good), **{k: sum(c[k] for c in good) for k in (*fields, *alarm_fields)},
                     "gaps": sum(c.get("gaps", 0) for c in good)},
            "garbage_deadlettered": cams[garbage]["deadlettered"], "garbage_sent": cams[garbage]["sent"],
            "alarm_accounting": {name: {k: c[k] for k in alarm_fields} for name, c in cams.items()}}


def variant(args: argparse.Namespace) -> str:
    """Which soak: its result file's name too."""
    return "soak-cluster" if args.cluster else "soak-lost-replies" if args.lost_replies else "soak"


def report(args: argparse.Namespace, soak: Soak, counts: dict) -> dict:
    cams = counts["cameras"]
    for c in cams.values():
        c["lost"] = c["sent"] - c["results"] - c["deadlettered"] - c["dropped"]
    total = {k: sum(c[k] for c in cams.values()) for k in ("sent", "results", "duplicates", "deadlettered",
                                                           "dropped", "lost", "pending")}
    print(f"soak {args.minutes:g} min on {os.cpu_count()} cores: {args.cameras} cameras at {args.fps:g} fps "
          f"(one sending garbage), {args.workers} workers, {sum('SIGKILL worker' in e for e in soak.events)} worker "
          f"and {sum('SIGKILL store' in e for e in soak.events)} store SIGKILLs, "
          f"{sum('redis-server' in e for e in soak.events)} Redis SIGKILLs "
          f"({'master failovers' if args.cluster else 'restarted from the AOF, appendfsync always'})")
    if args.lost_replies or args.cluster:
        print(f"faults: {soak.server.faults()}")
    print(f"{'camera':18s} {'sent':>6s} {'results':>7s} {'dup':>4s} {'dead':>5s} {'dropped':>7s} {'lost':>5s} "
          f"{'gaps':>5s} | {'anomal':>6s} {'alarms':>6s} {'late':>5s} {'missing':>7s} {'dupal':>5s} {'spur':>5s}")
    for name, c in cams.items():
        print(f"{name:18s} {c['sent']:6d} {c['results']:7d} {c['duplicates']:4d} {c['deadlettered']:5d} "
              f"{c['dropped']:7d} {c['lost']:5d} {str(c.get('gaps', '-')):>5s} | {c['anomalous']:6d} {c['alarms']:6d} "
              f"{c['late_alarms']:5d} {c['missing_alarms']:7d} {c['duplicate_alarms']:5d} {c['spurious_alarms']:5d}"
              + (f"  missing: {c['missing_alarm_seqs']}" if c["missing_alarms"] else ""))
    print(f"{'total':18s} {total['sent']:6d} {total['results']:7d} {total['duplicates']:4d} "
          f"{total['deadlettered']:5d} {total['dropped']:7d} {total['lost']:5d}")
    print(f"garbage sent by kind: {counts['garbage_sent_by_kind']}")
    print("dead letters by camera and reason:")
    for (stream, reason), n in sorted(counts["deadletter_reasons"].items()):
        print(f"  {n:5d}  {stream}  {reason}")
    print(f"alarms {counts['alarms']}, duplicate alarms {counts['duplicate_alarms']}; drained in "
          f"{counts['drain_seconds']} s; Redis used_memory at the end {counts['redis_used_memory_mb']} MB")
    print("events:")
    for event in soak.events:
        print("  " + event)
    slots = [s for s in soak.samples[0] if s not in ("t", "replaced")]
    print("resident memory (MB) over time; * = that slot's process was replaced since the previous sample")
    print(f"{'t (s)':>6s} " + " ".join(f"{s[:9]:>9s}" for s in slots))
    for row in soak.samples:
        print(f"{row['t']:6d} " + " ".join(f"{str(row.get(s) or '-') + ('*' if s in row['replaced'] else ''):>9s}"
                                           for s in slots))
    out = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "cameras": cams, "total": total, "alarms": counts["alarms"],
           "duplicate_alarms": counts["duplicate_alarms"], "garbage_sent_by_kind": counts["garbage_sent_by_kind"],
           "deadletter_reasons": {f"{s} | {r}": n for (s, r), n in counts["deadletter_reasons"].items()},
           "events": soak.events, "memory_mb": soak.samples, "redis_used_memory_mb": counts["redis_used_memory_mb"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--cameras", type=int, default=8, help="including the one garbage camera")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--fps", type=float, default=1)
    parser.add_argument("--kill-every", type=float, default=45)
    parser.add_argument("--min-uptime", type=float, default=60,
                        help="kill only workers (with a heartbeat) and stores that have run this long")
    parser.add_argument("--redis-restarts", type=int, default=2)
    parser.add_argument("--sample-s", type=float, default=120)
    parser.add_argument("--drain-s", type=float, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker-threads", type=int, default=0,
                        help="OMP_NUM_THREADS of each worker (0: the libraries' default); 1 on a shared machine")
    parser.add_argument("--lost-replies", type=float, default=0.0, metavar="P",
                        help="every process reaches Redis through a proxy that drops this share (0-1) of replies")
    parser.add_argument("--cluster", action="store_true",
                        help="a 3-master Redis Cluster with replicas; Redis SIGKILLs become master failovers")
    parser.add_argument("--failovers", type=int, default=None,
                        help="with --cluster: masters SIGKILLed and replaced by their replicas (default: --redis-restarts)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--bank", type=Path, default=None,
                        help="a bank file to publish (default: built from the synthetic line's first frames)")
    parser.add_argument("--logs", type=Path, default=None, help="keep every process's log in this folder")
    args = parser.parse_args()
    if not 0.0 <= args.lost_replies < 1.0:
        parser.error(f"--lost-replies must be in [0, 1), got {args.lost_replies}")
    if args.cluster and args.lost_replies:
        parser.error("--cluster and --lost-replies do not combine (a cluster client connects to the nodes' own addresses)")
    if args.failovers is not None:
        if not args.cluster:
            parser.error("--failovers needs --cluster (a single Redis is restarted: --redis-restarts)")
        args.redis_restarts = args.failovers
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        server = ClusterRedis(args.seed) if args.cluster else SingleRedis(workdir, args.lost_replies, args.seed)
        with server:
            blob = args.bank.read_bytes() if args.bank else bank_to_bytes(
                warmup_bank(UpSettings(source="synthetic"), workdir, progress=False))
            BankRegistry(connect(server.url), Keys()).publish("default", blob, activate=True)
            soak = Soak(args, server, workdir)
            try:
                counts = soak.run()
            finally:
                for process in soak.processes.values():
                    if process.poll() is None:
                        process.kill()
            out = report(args, soak, counts)
            write_result(variant(args), {**result_figures(soak, counts, out["cameras"], soak.garbage_camera),
                                  "settings": out["settings"]})
            if args.json:
                args.json.write_text(json.dumps(out, indent=1))
            logs = sorted(soak.log_dir.glob("*.log"))
            tracebacks = [p.name for p in logs if b"Traceback" in p.read_bytes()]
            print(f"process logs with a Traceback: {tracebacks or 'none'}")
            for name in tracebacks[:3]:
                print(f"--- {name} (tail)\n" + p_tail(soak.log_dir / name))
            if args.logs:
                args.logs.mkdir(parents=True, exist_ok=True)
                for path in logs:
                    (args.logs / path.name).write_bytes(path.read_bytes())


def p_tail(path: Path, lines: int = 25) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


if __name__ == "__main__":
    main()
