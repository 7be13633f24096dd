"""Consumer-group plumbing shared by the workers and the store (redis-py stream commands)."""
from __future__ import annotations

import re
import time
from typing import Callable, Iterator

import redis


def ensure_groups(client: redis.Redis, streams: list[str], group: str) -> None:
    """Create `group` on each stream (and the stream) unless it exists; reads start at the beginning."""
    for stream in streams:
        try:
            client.xgroup_create(stream, group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise


def reclaim(client: redis.Redis, stream: str, group: str, consumer: str, min_idle_ms: int,
            page: int = 100) -> Iterator[tuple[bytes, dict]]:
    """Entries other consumers left unacknowledged for min_idle_ms, now owned by `consumer`.

    Entries deleted from the stream meanwhile (trimmed) have nothing left to process: acknowledged here.
    """
    start = "0-0"
    while True:
        reply = client.xautoclaim(stream, group, consumer, min_idle_time=min_idle_ms, start_id=start, count=page)
        start, claimed = reply[0], reply[1]
        for entry_id, fields in claimed:
            if fields:
                yield entry_id, fields
            else:
                client.xack(stream, group, entry_id)
        for entry_id in reply[2] if len(reply) > 2 else ():  # Redis 7 lists deleted ids separately
            client.xack(stream, group, entry_id)
        if start in (b"0-0", "0-0"):
            return


def stream_name(name: bytes | str) -> str:
    return name.decode() if isinstance(name, bytes) else name


# Acknowledge a delivered entry and, only if this call acknowledged it (it was still pending),
# append the outcome to another stream, delete the entry and count it - all atomically. A slow
# worker whose frame was meanwhile reclaimed and finished by another finds XACK = 0 and writes
# nothing, so each frame has exactly one outcome.
# KEYS: source stream, target stream, stats hash. ARGV: group, entry id, target maxlen, stats field, field, value, ...
ACK_AND_WRITE = """
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
local fields = {}
for i = 5, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', unpack(fields))
redis.call('XDEL', KEYS[1], ARGV[2])
redis.call('HINCRBY', KEYS[3], ARGV[4], 1)
return 1
"""


# Replies that say "not now" rather than "never": memory full under noeviction (OOM), a replica after
# failover (READONLY), a server loading its data (LOADING), a replica cut off from its primary
# (MASTERDOWN), a busy script (BUSY), too few replicas (NOREPLICAS), a stream or group lost with the
# data (NOGROUP), a blocking read cut short by a demotion (UNBLOCKED). Inside a Lua script Redis may wrap them ("... -OOM command not allowed ..."), so
# they are matched anywhere at the start of a word.
_PASSING = re.compile(r"(?:^|[-\s])(OOM|READONLY|LOADING|MASTERDOWN|BUSY|NOREPLICAS|NOGROUP|TRYAGAIN|UNBLOCKED)\b")


_CLASSES = ((redis.exceptions.OutOfMemoryError, "oom"), (redis.exceptions.ReadOnlyError, "readonly"),
            (redis.exceptions.MasterDownError, "masterdown"), (redis.exceptions.TryAgainError, "tryagain"))


def redis_fault(exc: BaseException) -> str | None:
    """The kind of a Redis error that passes with time ('outage', 'oom', 'readonly', 'loading',
    'nogroup', ...), or None for one that retrying cannot fix (a wrong command, no permission)."""
    if isinstance(exc, redis.BusyLoadingError):
        return "loading"
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
        return "outage"
    for kind, name in _CLASSES:  # redis-py strips the reply's first word when it maps it to a class
        if isinstance(exc, kind):
            return name
    if isinstance(exc, redis.ResponseError) and not isinstance(exc, redis.exceptions.NoPermissionError):
        match = _PASSING.search(str(exc))
        if match:
            return match.group(1).lower()
    return None


def serve(step: Callable[[], None], stop, log, name: str, on_lost_group: Callable[[], None] | None = None) -> None:
    """Call `step` until `stop` is set. Redis outages and the replies of `redis_fault` back off
    exponentially (0.1 s doubling to 10 s); after NOGROUP, `on_lost_group` lets the caller re-create
    its consumer groups. Any other error propagates."""
    backoff = 0.1
    while not stop.is_set():
        try:
            step()
            backoff = 0.1
        except redis.RedisError as exc:
            fault = redis_fault(exc)
            if fault is None:
                raise
            if fault == "nogroup" and on_lost_group is not None:
                on_lost_group()
            log.warning("redis unavailable", extra={"fields": {"process": name, "fault": fault, "error": str(exc),
                                                               "retry_in_s": backoff}})
            stop.wait(backoff)
            backoff = min(backoff * 2, 10.0)


def deliveries(client: redis.Redis, stream: str, group: str, consumer: str, ids: list[bytes]) -> dict[bytes, int]:
    """Delivery counts (XPENDING) of those `ids` that `consumer` owns; ids it does not own are left out."""
    if not ids:
        return {}
    with client.pipeline(transaction=False) as pipe:
        for entry_id in ids:
            pipe.xpending_range(stream, group, min=entry_id, max=entry_id, count=1, consumername=consumer)
        rows = pipe.execute()
    return {entry_id: int(found[0]["times_delivered"]) for entry_id, found in zip(ids, rows) if found}


def keep_pending(client: redis.Redis, stream: str, group: str, consumer: str, ids: list[bytes]) -> set[bytes]:
    """Of `ids`, those `consumer` still owns, with their idle time reset so that no other consumer
    reclaims them as abandoned. XCLAIM JUSTID leaves the delivery count as it is: waiting out an
    infrastructure fault is not a delivery."""
    owned = list(deliveries(client, stream, group, consumer, ids))
    if owned:
        client.xclaim(stream, group, consumer, 0, owned, justid=True)
    return set(owned)


class CameraStreams:
    """The per-camera streams a consumer group reads, rediscovered at most every `refresh_s`.

    `due()` says whether a refresh is due (and starts the next interval); `refresh()` rereads the
    camera set, creates `group` on streams it has not seen yet, and returns the stream names.
    """

    def __init__(self, client: redis.Redis, cameras_key: str, stream_of, group: str, refresh_s: float):
        self.client, self.cameras_key, self.stream_of, self.group = client, cameras_key, stream_of, group
        self.refresh_s = refresh_s
        self.names: list[str] = []
        self._next = 0.0

    def due(self) -> bool:
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + self.refresh_s
        return True

    def forget(self) -> None:
        """After NOGROUP (data lost): the next refresh, due at once, re-creates the group on every stream."""
        self.names = []
        self._next = 0.0

    def refresh(self) -> list[str]:
        cameras = sorted(c.decode() for c in self.client.smembers(self.cameras_key))
        streams = [self.stream_of(c) for c in cameras]
        ensure_groups(self.client, sorted(set(streams) - set(self.names)), self.group)
        self.names = streams
        return streams
