"""Consumer-group plumbing shared by ingest, the workers and the store (redis-py stream commands, the
fair multi-stream read, and the classification of Redis faults). The Lua scripts that make each write
happen once, even when a client retry sends it twice, are runtime/lua/*.lua, called through runtime.scripts."""
from __future__ import annotations

import logging
import re
import time
from typing import Callable, Iterator

import redis
from redis.exceptions import SlotNotCoveredError

from runtime import scripts
from runtime.connection import connections_opened, is_cluster, node_groups
from .cameras import camera_list

log = logging.getLogger("patchcore.streams")

MIN_REDIS_VERSION = (7, 0)  # XAUTOCLAIM reports deleted entries (6.2 returns nils without their ids)


class RedisVersionError(RuntimeError):
    """The server is older than MIN_REDIS_VERSION."""


def require_redis_7(client: redis.Redis) -> str:
    """The server's name and version (HELLO: allowed to every ACL user), or RedisVersionError if too old."""
    on_node = {"target_nodes": client.get_default_node()} if is_cluster(client) else {}  # HELLO names no key
    hello = client.execute_command("HELLO", **on_node)
    server, version = (hello.get(k, hello.get(k.encode(), b"")) for k in ("server", "version"))
    server, version = (v.decode() if isinstance(v, bytes) else str(v) for v in (server, version))
    numbers = tuple(int(part) for part in version.split(".")[:2] if part.isdigit())
    if numbers < MIN_REDIS_VERSION:
        raise RedisVersionError(f"{server} {version} is too old: patchcore needs Redis >= "
                                f"{'.'.join(map(str, MIN_REDIS_VERSION))} (or Valkey)")
    return f"{server} {version}"


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

    Entries trimmed from the stream meanwhile have nothing left to process: Redis >= 7 drops them
    from the pending list itself and lists their ids apart (reply[2]); they are not yielded. Their
    drop was counted by the writer that trimmed them (ingest's `dropped`), so nothing counts them here.
    """
    start = "0-0"
    while True:
        start, claimed, *_deleted = client.xautoclaim(stream, group, consumer, min_idle_time=min_idle_ms,
                                                      start_id=start, count=page)
        for entry in claimed:
            if entry is None or entry[0] is None:  # Redis 6.2: a deleted entry without its id
                raise RedisVersionError("XAUTOCLAIM returned a deleted entry without its id: Redis >= 7 needed")
            yield entry
        if start in (b"0-0", "0-0"):
            return


def stream_name(name: bytes | str) -> str:
    return name.decode() if isinstance(name, bytes) else name


# Replies that say "not now" rather than "never": memory full under noeviction (OOM), a replica after
# failover (READONLY), a server loading its data (LOADING), a replica cut off from its primary
# (MASTERDOWN), a busy script (BUSY), too few replicas (NOREPLICAS), a server that cannot persist (MISCONF: its AOF
# or RDB cannot be written, e.g. a full disk; writes resume once it can), a stream or group lost with the
# data (NOGROUP), a blocking read cut short by a demotion (UNBLOCKED); on a Redis Cluster, a slot moved
# or being moved (MOVED, ASK, TRYAGAIN, a script that met a key no longer on its node) or not served
# while a failover runs (CLUSTERDOWN). Inside a Lua script Redis may wrap them ("... -OOM command not allowed ..."), so
# they are matched anywhere at the start of a word.
_PASSING = re.compile(r"(?:^|[-\s])(OOM|READONLY|LOADING|MASTERDOWN|BUSY|NOREPLICAS|MISCONF|NOGROUP|TRYAGAIN|UNBLOCKED"
                      r"|CLUSTERDOWN|MOVED|ASK)\b")

# What a Redis call can raise: redis-py's errors, and the cluster client's error for a slot no known node serves.
REDIS_ERRORS = (redis.RedisError, SlotNotCoveredError)

_CLASSES = ((redis.exceptions.OutOfMemoryError, "oom"), (redis.exceptions.ReadOnlyError, "readonly"),
            (redis.exceptions.MasterDownError, "masterdown"), (redis.exceptions.TryAgainError, "tryagain"),
            (redis.exceptions.ClusterDownError, "clusterdown"), (SlotNotCoveredError, "clusterdown"),
            (redis.exceptions.AskError, "moved"), (redis.exceptions.ClusterError, "clusterdown"))


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
        if "non local key" in str(exc):  # a cross-slot script routed to a node that lost one of its slots
            return "moved"
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
        except REDIS_ERRORS as exc:
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
    camera set, creates `group` on streams it has not seen yet, and returns the stream names (the
    first refresh also checks the server's version). `read_fair()` reads at most `cap` new entries
    across all streams, starting each call where the last one stopped; `read_blocking()` waits for the
    first. On a Redis Cluster a multi-stream XREADGROUP cannot span slots: the streams are grouped by
    the node that holds them (from the client's slot map, so new cameras and moved slots need nothing
    by hand), each node is read by one script call with its share of the cap, and waiting is polling.

    Lost replies: a read of new entries (">") whose reply is lost on the way back (the connection then fails)
    is sent again by redis-py's retry on a new connection, and the second read hands over the *next* entries;
    the first delivery waits in the consumer's pending list, unseen, until someone reclaims it as abandoned
    (claim_idle_ms later, and out of order). So the consumer's own pending entries are read first (`read_own`,
    from id 0) before any new ones: at the start (a predecessor of the same name), on streams seen for the first
    time, after a read of new entries that raised, after the calling thread opened a connection (any connection
    error, a restart, a failover: runtime.connection.connections_opened) and when the caller says so (`reread`,
    after a step that failed). Until then a read of new entries reads nothing; one during which a connection was
    opened returns nothing (its entries are pending to the consumer) and the next read is `read_own`.
    """

    POLL_S = 0.01  # on a cluster: how often an idle reader looks again

    def __init__(self, client: redis.Redis, cameras_key: str, stream_of, group: str, refresh_s: float):
        self.client, self.cameras_key, self.stream_of, self.group = client, cameras_key, stream_of, group
        self.refresh_s = refresh_s
        self.names: list[str] = []
        self.server: str | None = None
        self._next = 0.0
        self._offset = 0
        self._read_fair = scripts.load(client, "read_fair")
        self._opened = connections_opened(client)  # the calling thread's count when it last looked
        self._unread: set[str] = set()  # streams whose own pending entries are to be read before new ones
        self.recovered = 0  # entries read_own found pending to the consumer and not known to the caller

    def due(self) -> bool:
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + self.refresh_s
        return True

    def forget(self) -> None:
        """After NOGROUP (data lost): the next refresh, due at once, re-creates the group on every stream."""
        self.names = []
        self._unread = set()
        self._next = 0.0

    def refresh(self) -> list[str]:
        if self.server is None:
            self.server = require_redis_7(self.client)
        streams = self.streams_for(camera_list(self.client, self.cameras_key))
        new = set(streams) - set(self.names)
        ensure_groups(self.client, sorted(new), self.group)
        self._unread |= new  # a predecessor of the same consumer name may have left entries pending there
        self.names = streams
        return streams

    def streams_for(self, cameras: list[str]) -> list[str]:
        """The streams read for `cameras` (one per camera here; a subclass may read several per camera)."""
        return [self.stream_of(camera) for camera in cameras]

    # ---- the consumer's own pending entries first ----------------------------------------------------
    def reread(self, streams: list[str] | None = None) -> None:
        """Read the consumer's own pending entries of `streams` (default all) before new ones: after a step
        that failed with entries taken and not finished."""
        self._unread |= set(self.names if streams is None else streams)

    def recovery_due(self, streams: list[str] | None = None) -> bool:
        """Whether the consumer's own pending entries of any of `streams` (default all) must be read (`read_own`)
        before new ones."""
        self._look()
        return not self._unread.isdisjoint(self.names if streams is None else streams)

    def _look(self) -> bool:
        """Whether the calling thread opened a connection since it last looked: if so, every stream is unread."""
        opened = connections_opened(self.client)
        if opened == self._opened:
            return False
        self._opened = opened
        self._unread = set(self.names)
        return True

    def read_own(self, consumer: str, streams: list[str] | None = None, known: frozenset = frozenset()
                 ) -> list[tuple[str, list[tuple[bytes, dict]]]]:
        """The entries pending to `consumer` on those of `streams` (default all) that are unread, from id 0, less
        `known` ((stream, entry id) pairs the caller holds already): [(stream, [(entry id, fields), ...]), ...],
        in id order. XPENDING lists them and XRANGE fetches them, so neither their delivery count nor their idle
        time changes (a lost reply is the same delivery, not a second one). Entries trimmed from their stream
        while pending have nothing left to process: they are acknowledged here and not returned (their drop was
        counted by the writer that trimmed them). Both commands are idempotent: a connection opened meanwhile
        changes nothing in the answer."""
        self._look()
        names = self.names if streams is None else streams
        todo = [s for s in names if s in self._unread]
        out, page = [], 1000
        for stream in todo:
            ids, start = [], "-"
            while True:
                rows = self.client.xpending_range(stream, self.group, min=start, max="+", count=page,
                                                  consumername=consumer)
                ids += [row["message_id"] for row in rows]
                if len(rows) < page:
                    break
                start = "(" + stream_name(rows[-1]["message_id"])
            ids = [i for i in ids if (stream, i) not in known and (stream, stream_name(i)) not in known]
            if not ids:
                continue
            with self.client.pipeline(transaction=False) as pipe:
                for entry_id in ids:
                    pipe.xrange(stream, min=entry_id, max=entry_id, count=1)
                found = pipe.execute()
            entries = [row[0] for row in found if row]
            gone = [entry_id for entry_id, row in zip(ids, found) if not row]
            if gone:
                self.client.xack(stream, self.group, *gone)
            if entries:
                out.append((stream, entries))
        self._look()
        self._unread -= set(todo)
        unseen = sum(len(entries) for _, entries in out)
        if unseen:
            self.recovered += unseen
            log.warning("own pending entries read again", extra={"fields": {
                "consumer": consumer, "group": self.group, "entries": unseen, "streams": len(out)}})
        return out

    def _new(self, streams: list[str], read: Callable[[], list]) -> list:
        """A read of new entries (">") from `streams`: nothing while their own pending entries are unread; nothing
        if the calling thread opened a connection during the read (it may have been sent again after its first
        reply was lost: what it delivered is pending to the consumer, read next by read_own)."""
        if self.recovery_due(streams):
            return []
        try:
            reply = read()
        except BaseException:
            self._unread |= set(streams)  # it may have delivered entries before it failed
            raise
        if self._look():
            return []
        return reply

    def read_fair(self, consumer: str, cap: int, streams: list[str] | None = None, start_id: str = ">"
                  ) -> list[tuple[str, list[tuple[bytes, dict]]]]:
        """Up to `cap` entries in all (from `streams`, default all), without blocking: new ones, or with
        `start_id` "0" those already delivered to `consumer` and not acknowledged (one pass):
        [(stream, [(entry id, fields), ...]), ...]."""
        names = self.names if streams is None else streams
        if not names or cap <= 0:
            return []
        if start_id == ">":
            return self._new(names, lambda: self._read_fair_now(consumer, cap, names, start_id))
        return self._read_fair_now(consumer, cap, names, start_id)

    def _read_fair_now(self, consumer: str, cap: int, names: list[str], start_id: str
                       ) -> list[tuple[str, list[tuple[bytes, dict]]]]:
        start = self._offset % len(names)
        order = names[start:] + names[:start]
        out = []
        groups = node_groups(self.client, order)  # one group on a single Redis; in rotated order on a cluster
        for i, (_, positions) in enumerate(groups):
            remaining = cap - sum(len(entries) for _, entries in out)
            if remaining <= 0:
                break
            part = [order[p] for p in positions]
            share = -(-remaining // (len(groups) - i))  # what is left, spread over the nodes still to read
            out += scripts.read_fair(self._read_fair, group=self.group, consumer=consumer, cap=share,
                                     start_id=start_id, streams=part)
        if out:  # the next call starts after the last stream served: every backlogged stream gets its turn
            self._offset = start + max(order.index(stream) for stream, _ in out) + 1
        return out

    def read_each(self, consumer: str, count: int, start_id: str = ">", block_ms: int | None = None
                  ) -> list[tuple[str, list[tuple[bytes, dict | None]]]]:
        """XREADGROUP over all streams, up to `count` entries from each, waiting up to `block_ms` for new ones
        (start_id ">"). On a cluster: read_fair with `count` as the cap over each node's streams, then polling."""
        if not self.names:
            return []
        if not is_cluster(self.client):
            def read():
                reply = self.client.xreadgroup(self.group, consumer, {s: start_id for s in self.names}, count=count,
                                               block=block_ms)
                return [(stream_name(stream), entries) for stream, entries in reply or []]
            return self._new(self.names, read) if start_id == ">" else read()
        reply = self.read_fair(consumer, count * len(self.names), start_id=start_id)
        if reply or not block_ms or start_id != ">":
            return reply
        return self.read_blocking(consumer, count, self.names, block_ms)

    def read_blocking(self, consumer: str, cap: int, streams: list[str], block_ms: int
                      ) -> list[tuple[str, list[tuple[bytes, dict]]]]:
        """Wait up to `block_ms` for new entries on `streams`. A single Redis blocks in one XREADGROUP
        (COUNT 1 per stream: it may return more than `cap`); a cluster polls read_fair every POLL_S."""
        if not is_cluster(self.client):
            def read():
                reply = self.client.xreadgroup(self.group, consumer, {s: ">" for s in streams}, count=1,
                                               block=block_ms)
                return [(stream_name(stream), entries) for stream, entries in reply or []]
            return self._new(streams, read)
        deadline = time.monotonic() + block_ms / 1000
        while True:
            reply = self.read_fair(consumer, cap, streams)
            if reply or time.monotonic() >= deadline or self.recovery_due(streams):
                return reply
            time.sleep(min(self.POLL_S, max(0.0, deadline - time.monotonic())))
