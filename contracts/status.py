"""What `patchcore status` reports, read from the keys the processes maintain."""
from __future__ import annotations

import time

import redis

from .keys import FRAME_GROUP, Keys


def collect_status(client: redis.Redis, prefix: str = "pc") -> dict:
    keys = Keys(prefix)
    cameras = []
    for camera in sorted(c.decode() for c in client.smembers(keys.cameras)):
        stats = {k.decode(): v.decode() for k, v in client.hgetall(keys.camera_stats(camera)).items()}
        stream = keys.frames(camera)
        try:
            pending = int(client.xpending(stream, FRAME_GROUP)["pending"])
        except redis.ResponseError:  # no worker group yet
            pending = 0
        cameras.append({
            "camera": camera,
            "last_seq": int(stats["last_seq"]) if "last_seq" in stats else None,
            "ingested": int(stats.get("ingested", 0)),
            "results": int(stats.get("results", 0)),
            "pending": pending,  # delivered to a worker, not yet acknowledged
            "backlog": int(client.xlen(stream)),  # in the stream: waiting or pending (scored frames are deleted)
            "dropped": int(stats.get("dropped", 0)),
            "deadlettered": int(stats.get("deadlettered", 0)),
            "alarms": int(stats.get("alarms", 0)),
            "state": stats.get("state", ""),
            "replayed": int(stats.get("replayed", 0)),
            "fault": stats.get("fault", ""),  # an infrastructure fault holding its frames pending (workers set it)
            "last_ingest_at": float(stats["last_ingest_at"]) if "last_ingest_at" in stats else None,
        })
        cameras[-1]["liveness"] = liveness(cameras[-1]["state"], cameras[-1]["last_ingest_at"], time.time())
    now = time.time()
    workers = {w.decode(): now - float(t) for w, t in client.hgetall(keys.workers).items()}
    banks = {}
    for name in sorted(n.decode() for n in client.smembers(keys.banks)):
        active = client.get(keys.bank_active(name))
        banks[name] = int(active) if active is not None else None
    return {"cameras": cameras, "workers": workers, "banks": banks, "deadletter": int(client.xlen(keys.deadletter)),
            "redis_faults": redis_faults(client)}


def liveness(state: str, last_ingest_at: float | None, now: float, stale_s: float = 10.0) -> str:
    """A camera in one word: live (frames arriving), reconnecting (its source failed; ingest retries),
    stopped (its ingest ended), dead (no frame for `stale_s` without a reason: the process is gone)."""
    if state.startswith(("reconnecting", "source error")):
        return "reconnecting"
    if state.startswith("stopped"):
        return "stopped"
    if last_ingest_at is None or now - last_ingest_at > stale_s:
        return "dead"
    return "live"


def redis_faults(client: redis.Redis) -> list[str]:
    """Conditions of the server itself that make processes hold frames: memory full, a read-only replica, loading."""
    try:
        info = client.info("memory") | client.info("replication") | client.info("persistence")
    except redis.ResponseError as exc:  # INFO not allowed for this user
        return [f"unknown ({exc})"]
    faults = []
    used, limit = int(info.get("used_memory", 0)), int(info.get("maxmemory", 0))
    if limit and used >= limit and info.get("maxmemory_policy") == "noeviction":
        faults.append(f"memory full ({used} of {limit} bytes, noeviction): writes are refused")
    if info.get("role") == "slave":
        faults.append(f"read-only replica of {info.get('master_host')}:{info.get('master_port')}")
    if int(info.get("loading", 0)):
        faults.append("loading its data")
    return faults
