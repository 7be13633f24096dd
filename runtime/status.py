"""What `patchcore status` reports, read from the keys the processes maintain; pruning dead consumers."""
from __future__ import annotations

import json
import math
import time
from collections import Counter

import redis

from runtime.connection import is_cluster
from runtime.deadletter import DeadLetters
from contracts.keys import FRAME_GROUP, STORE_GROUP, Keys
from runtime.metrics import consumer_lag, reason_kind
from runtime.streams import REDIS_ERRORS
from .cameras import camera_list, read_cameras

MAX_TEXT = 500  # characters of a free-text field shown (a camera writes its own state)
MAX_LISTED = 20  # refused camera names listed (all are counted)
DEAD_AFTER_S = 120.0  # a consumer idle this long (and without a fresh heartbeat) is marked dead
PRUNE_AFTER_S = 3600.0  # `patchcore status --prune` deletes consumers dead this long


def collect_status(client: redis.Redis, prefix: str = "pc", dead_after_s: float = DEAD_AFTER_S,
                   reasons: bool = True) -> dict:
    """Cameras, workers, banks, dead letters, consumers and server faults. `reasons`: count the dead letters by
    kind of reason (reads every dead letter: off for a caller that polls, e.g. the console every second)."""
    keys = Keys(prefix)
    found = read_cameras(client, keys.cameras)
    names = list(found.names)
    lags = consumer_lag(client, {camera: keys.frames(camera) for camera in names}, FRAME_GROUP)
    cameras = []
    for camera in names:
        stats = {k.decode(errors="replace"): v.decode(errors="replace")
                 for k, v in client.hgetall(keys.camera_stats(camera)).items()}
        stream = keys.frames(camera)
        try:
            pending = int(client.xpending(stream, FRAME_GROUP)["pending"])
        except redis.ResponseError:  # no worker group yet
            pending = 0
        cameras.append({
            "camera": camera,
            "last_seq": _count(stats, "last_seq", None),
            "ingested": _count(stats, "ingested"),
            "results": _count(stats, "results"),
            "pending": pending,  # delivered to a worker, not yet acknowledged
            "backlog": int(client.xlen(stream)),  # in the stream: waiting or pending (scored frames are deleted)
            "lag": lags.get(camera, 0),  # not yet delivered to a worker, plus pending (patchcore_consumer_lag)
            "dropped": _count(stats, "dropped"),
            "deadlettered": _count(stats, "deadlettered"),
            "alarms": _count(stats, "alarms"),
            "drift_events": _count(stats, "drift_events"),
            **window_counts(client, keys, camera),  # late results by outcome; sequence restarts
            "state": stats.get("state", "")[:MAX_TEXT],
            "replayed": _count(stats, "replayed"),
            "fault": stats.get("fault", "")[:MAX_TEXT],  # an infrastructure fault holding its frames pending (workers set it)
            "last_ingest_at": _time(stats, "last_ingest_at"),
        })
        cameras[-1]["liveness"] = liveness(cameras[-1]["state"], cameras[-1]["last_ingest_at"], time.time())
    now = time.time()
    workers = {w.decode(errors="replace"): now - beat for w, t in client.hgetall(keys.workers).items()
               if (beat := _time({"t": t.decode(errors="replace")}, "t")) is not None}
    banks = {}
    for name in sorted(n.decode() for n in client.smembers(keys.banks)):
        active = client.get(keys.bank_active(name))
        banks[name] = int(active) if active is not None else None
    deadletter = sum(int(client.xlen(keys.deadletter(c["camera"]))) for c in cameras)
    return {"cameras": cameras, "refused_camera_names": [repr(m[:200]) for m in found.refused[:MAX_LISTED]],
            "refused_camera_names_count": len(found.refused), "workers": workers, "banks": banks, "deadletter": deadletter,
            "deadletter_reasons": dict(Counter(reason_kind(letter.reason) for letter in DeadLetters(client, keys).list()))
            if reasons else None,
            "consumers": consumers(client, keys, names, dead_after_s), "redis_faults": redis_faults(client),
            "sinks": sink_health(client, keys, dead_after_s)}


SINK_STATES = ("ok", "retrying", "down", "stopped")  # what a sink process writes in its health
SINK_NUMBERS = ("pending", "delivered", "deadlettered", "failures", "trimmed")


def sink_health(client: redis.Redis, keys: Keys, dead_after_s: float = DEAD_AFTER_S) -> list[dict]:
    """Every sink process's health (the hash each writes every second, sinks/service.py): destination, state
    (ok, retrying, down, stopped; `gone` when not written for `dead_after_s`), pending, delivered,
    dead-lettered, failures, trimmed (entries trimmed from their stream before delivery), last error, age. A field that does not parse reads as empty: a row is shown
    whatever one process wrote."""
    now, rows = time.time(), []
    for label, text in sorted(client.hgetall(keys.sink_health).items()):
        try:
            data = json.loads(text)
            data = data if isinstance(data, dict) else {}
        except (ValueError, UnicodeDecodeError):
            data = {}
        name = label.decode(errors="replace")[:MAX_TEXT]
        sink, _, consumer = name.partition("/")
        at = _time({"at": str(data.get("at", ""))}, "at")
        state = data.get("state") if data.get("state") in SINK_STATES else "unknown"
        if state != "stopped" and (at is None or now - at > dead_after_s):
            state = "gone"
        rows.append({"sink": sink, "consumer": consumer, "state": state,
                     "destination": str(data.get("destination", ""))[:MAX_TEXT],
                     "last_error": str(data.get("last_error", ""))[:MAX_TEXT],
                     "age_s": None if at is None else max(0.0, now - at),
                     **{k: _count({k: str(data.get(k, ""))}, k) for k in SINK_NUMBERS}})
    return rows


def _count(stats: dict[str, str], name: str, default: int | None = 0) -> int | None:
    """A counter field of a stats hash (a camera may write its own: anything that is no count reads as `default`)."""
    text = stats.get(name, "")
    return int(text) if text.isdecimal() and len(text) <= 19 else default


def _time(stats: dict[str, str], name: str) -> float | None:
    """A timestamp field: a finite number of seconds, else None."""
    try:
        value = float(stats.get(name, ""))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


NO_DRIFT = {"status": "normal", "held": 0, "since_seq": None, "acknowledged_by": None}


def window_counts(client: redis.Redis, keys: Keys, camera: str) -> dict:
    """What the store counts with the camera's debounce window (store.alarms.rules): `late`, its late results by
    outcome (alarm, covered, quiet, under), and `sequence_restarts`, how often its numbering started again;
    nothing before the first, or where the window cannot be read. `drift` (store.alarms.drift): the scene's status
    (normal, drift, acknowledged), the alarms held in all, and the open episode's first frame and acknowledger."""
    text = client.hget(keys.alarm_state(camera), "window")
    try:
        window = json.loads(text) if text else {}
        late = window.get("late", {})
        return {"late": {str(k): int(v) for k, v in late.items() if int(v)} if isinstance(late, dict) else {},
                "sequence_restarts": int(window.get("restarts", 0)), "drift": _drift(window.get("drift"))}
    except (ValueError, TypeError, AttributeError, UnicodeDecodeError):
        return {"late": {}, "sequence_restarts": 0, "drift": dict(NO_DRIFT)}


def _drift(state) -> dict:
    if not isinstance(state, dict):
        return dict(NO_DRIFT)
    episode = state.get("episode") if isinstance(state.get("episode"), dict) else {}
    by = episode.get("acknowledged_by")
    return {"status": str(state.get("status", "normal"))[:32], "held": int(state.get("held", 0)),
            "since_seq": int(episode["raised_seq"]) if "raised_seq" in episode else None,
            "acknowledged_by": str(by)[:MAX_TEXT] if by is not None else None}


def consumers(client: redis.Redis, keys: Keys, cameras: list[str], dead_after_s: float = DEAD_AFTER_S) -> list[dict]:
    """Every consumer of the workers' group (frame streams) and the store's (results streams), from XINFO
    CONSUMERS: its smallest idle time over the streams, its pending entries in all, its heartbeat age
    (workers), and `dead`. Redis 7.0 counts idle time from a consumer's last delivery or claim, not from
    its last read, so a live consumer of a quiet stream looks idle: a worker is dead when idle and without
    a heartbeat for more than `dead_after_s`; a store (no heartbeat) when idle that long while holding
    pending results (a live store acknowledges within seconds)."""
    groups = [(FRAME_GROUP, keys.frames(camera)) for camera in cameras] + \
             [(STORE_GROUP, keys.results(camera)) for camera in cameras]
    with client.pipeline(transaction=False) as pipe:
        for group, stream in groups:
            pipe.xinfo_consumers(stream, group)
        replies = pipe.execute(raise_on_error=False)
    now = time.time()
    beats = {w.decode(): now - float(t) for w, t in client.hgetall(keys.workers).items()}
    rows: dict[tuple[str, str], dict] = {}
    for (group, stream), reply in zip(groups, replies):
        if isinstance(reply, Exception):  # no such stream or group yet
            continue
        for info in reply:
            name = info["name"].decode() if isinstance(info["name"], bytes) else str(info["name"])
            row = rows.setdefault((group, name), {"name": name, "group": group, "idle_s": float("inf"), "pending": 0,
                                                  "streams": []})
            row["idle_s"] = min(row["idle_s"], int(info["idle"]) / 1000)
            row["pending"] += int(info["pending"])
            row["streams"].append(stream)
    for row in rows.values():
        row["heartbeat_s"] = beats.get(row["name"]) if row["group"] == FRAME_GROUP else None
        if row["group"] == FRAME_GROUP:
            silent = row["heartbeat_s"] is None or row["heartbeat_s"] > dead_after_s
        else:
            silent = row["pending"] > 0
        row["dead"] = row["idle_s"] > dead_after_s and silent
    return sorted(rows.values(), key=lambda row: (row["group"], row["name"]))


def prune_dead(client: redis.Redis, prefix: str = "pc", after_s: float = PRUNE_AFTER_S) -> list[str]:
    """Delete the consumers idle (workers: and without a heartbeat) for more than `after_s` that hold no
    pending entries (XGROUP DELCONSUMER on each of their streams, and their heartbeat); those holding
    entries are left for a live consumer to reclaim. A live consumer deleted this way (a store on a quiet
    line) loses nothing: Redis re-creates it at its next delivery. Also deletes the health rows of sink
    processes gone or stopped for more than `after_s`. Returns "group/name" of each consumer deleted and
    "sink <sink>/<consumer>" of each sink row. Needs a user allowed XGROUP (operator)."""
    keys = Keys(prefix)
    cameras = camera_list(client, keys.cameras)
    pruned = []
    for row in consumers(client, keys, cameras, after_s):
        beat = row["heartbeat_s"]
        if row["pending"] or row["idle_s"] <= after_s or (beat is not None and beat <= after_s):
            continue
        for stream in row["streams"]:
            # a consumer that took entries since we looked has pending ones now: DELCONSUMER would drop them
            if client.xpending_range(stream, row["group"], "-", "+", 1, consumername=row["name"]):
                break
            client.xgroup_delconsumer(stream, row["group"], row["name"])
        else:
            if row["group"] == FRAME_GROUP:
                client.hdel(keys.workers, row["name"])
            pruned.append(f"{row['group']}/{row['name']}")
    for row in sink_health(client, keys, after_s):  # sink processes gone or stopped that long: their health rows
        if row["state"] in ("gone", "stopped") and (row["age_s"] is None or row["age_s"] > after_s):
            client.hdel(keys.sink_health, f"{row['sink']}/{row['consumer']}")
            pruned.append(f"sink {row['sink']}/{row['consumer']}")
    return pruned


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
    """Conditions of the server itself that make processes hold frames: memory full, a read-only replica, loading;
    on a Redis Cluster, those of every master, and the cluster's own state."""
    if is_cluster(client):
        try:
            state = client.cluster_info()
            masters = client.get_primaries()
        except REDIS_ERRORS as exc:
            return [f"unknown ({exc})"]
        faults = [] if state.get("cluster_state") == "ok" else [f"cluster state {state.get('cluster_state')}"]
        for node in masters:
            faults += [f"{node.name}: {fault}" for fault in redis_faults(client.get_redis_connection(node))]
        return faults
    try:
        info = client.info("memory") | client.info("replication") | client.info("persistence")
    except redis.ResponseError as exc:  # INFO not allowed for this user
        return [f"unknown ({exc})"]
    faults = []
    used, limit = int(info.get("used_memory", 0)), int(info.get("maxmemory", 0))
    # within 1 % of the limit counts as full: Valkey 8 refuses writes (OOM) while INFO's used_memory is still a few
    # KB under maxmemory (what it counts for eviction differs)
    if limit and used >= limit * 0.99 and info.get("maxmemory_policy") == "noeviction":
        faults.append(f"memory full ({used} of {limit} bytes, noeviction): writes are refused - cameras wait with "
                      f"their frame, workers and the store hold theirs; nothing is lost. Raise maxmemory or free memory")
    if info.get("aof_enabled") and info.get("aof_last_write_status", "ok") != "ok":
        faults.append("AOF write failing (disk full or failing): writes are refused (MISCONF) until Redis can write "
                      "its append-only file again - cameras wait with their frame, workers and the store hold theirs. "
                      "Free disk space")
    if info.get("role") == "slave":
        faults.append(f"read-only replica of {info.get('master_host')}:{info.get('master_port')}")
    if int(info.get("loading", 0)):
        faults.append("loading its data")
    return faults
