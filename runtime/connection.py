"""Redis connections from a URL (redis://, rediss://) with optional secrets file; retries with backoff.

The URL may name a single Redis or any node of a Redis Cluster: `connect` asks the server (HELLO's
`mode`, else INFO's `cluster_enabled`) and returns redis-py's `RedisCluster` for a cluster, a plain
`Redis` otherwise. Code that must know where a key lives (a pipeline of Lua scripts, which redis-py's
cluster pipeline refuses) asks `node_groups`."""
from __future__ import annotations

import os
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

DEFAULT_URL = "redis://127.0.0.1:6379/0"


def redis_url(url: str | None = None) -> str:
    return url or os.environ.get("REDIS_URL") or DEFAULT_URL


def redacted(url: str) -> str:
    """The URL with any password replaced, safe for logs and status output."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


@dataclass(frozen=True)
class ClientTimeouts:
    """How long a client waits on Redis before it gives up on a connection, and how often it tries again.

    A partition (packets dropped, no connection refused: a blackholed proxy, a cable pulled, a VM paused) gives
    no error at all; without a socket timeout a read waits for ever (TCP keepalive's defaults take hours). So
    every reply is waited for at most `socket_s` (per socket read: a large bank that keeps arriving is not cut
    off; the longest quiet command here is a 200 ms blocking read), a connection at most `connect_s`; then
    redis-py's Retry reconnects and sends the command again, `retries` times with exponential backoff (0.1 s
    doubling up to `backoff_cap_s`: about 21 s in all, which rides out a restart of Redis inside the call). A
    call then fails with a TimeoutError or ConnectionError, which the long-running loops (runtime.streams.serve,
    ingest) answer by backing off and trying again: a blackholed process notices within `socket_s`, keeps no
    thread blocked, and carries on by itself once the network heals. At most (retries + 1) x (socket_s +
    connect_s) + 21 s pass inside one call while the partition lasts (about 111 s with these values).
    A connection idle for `health_check_s` is checked with a PING before it is used, and TCP keepalive is on.
    """

    socket_s: float = 5.0
    connect_s: float = 5.0
    retries: int = 8
    backoff_base_s: float = 0.1
    backoff_cap_s: float = 5.0
    health_check_s: int = 30


def connect(url: str | None = None, password_file: str | Path | None = None,
            timeouts: ClientTimeouts = ClientTimeouts()) -> redis.Redis | RedisCluster:
    """A client that retries connection errors and timeouts with exponential backoff (redis-py's own Retry,
    see ClientTimeouts): a `RedisCluster` when the URL names a node of a cluster, else a `Redis`.

    The password may come from the URL, from `password_file`, or from REDIS_PASSWORD_FILE.
    """
    password_file = password_file or os.environ.get("REDIS_PASSWORD_FILE")
    kwargs = {}
    if password_file:
        kwargs["password"] = Path(password_file).read_text().strip()
    common = dict(socket_timeout=timeouts.socket_s, socket_connect_timeout=timeouts.connect_s,
                  socket_keepalive=True, health_check_interval=timeouts.health_check_s,
                  retry=Retry(ExponentialBackoff(cap=timeouts.backoff_cap_s, base=timeouts.backoff_base_s),
                              retries=timeouts.retries), **kwargs)
    counter = ConnectCounter(initialise=True)
    client = redis.Redis.from_url(redis_url(url), retry_on_error=[redis.ConnectionError, redis.TimeoutError],
                                  redis_connect_func=counter, **common)
    if not cluster_enabled(client):
        _COUNTERS[client] = counter
        return client
    client.close()
    counter = ConnectCounter(initialise=False)  # RedisCluster initialises each node's connection itself first
    cluster = RedisCluster.from_url(redis_url(url), redis_connect_func=counter, **common)
    _COUNTERS[cluster] = counter
    return cluster


class ConnectCounter:
    """Counts the connections a client opens, per thread (the thread that opens one is the thread whose command
    needed it). A connection is opened again after every connection error: a lost reply (which redis-py's retry
    answers by sending the command again, from the same thread), a restart, a failover. A consumer that reads with
    XREADGROUP ">" compares its own thread's count before and after a read: a change means a reply may have been
    lost, its entries delivered to this consumer but never seen (runtime.streams.CameraStreams). Counting per
    thread keeps a worker's writer thread, opening a connection of its own, from making its reader read again."""

    def __init__(self, initialise: bool):
        self._initialise, self._lock = initialise, threading.Lock()
        self.counts: dict[int, int] = {}  # thread ident -> connections opened by that thread

    def __call__(self, connection) -> None:
        if self._initialise:
            connection.on_connect()  # what redis-py does when no connect function is given
        with self._lock:
            thread = threading.get_ident()
            self.counts[thread] = self.counts.get(thread, 0) + 1


_COUNTERS: "weakref.WeakKeyDictionary[object, ConnectCounter]" = weakref.WeakKeyDictionary()


def connections_opened(client) -> int | None:
    """How many connections the calling thread has opened so far through a client made by `connect` (None for a
    client made elsewhere)."""
    counter = _COUNTERS.get(client)
    return None if counter is None else counter.counts.get(threading.get_ident(), 0)


def cluster_enabled(client: redis.Redis) -> bool:
    """Whether the server is a node of a Redis Cluster: HELLO's `mode` (allowed to every ACL user), else
    INFO's `cluster_enabled`."""
    try:
        hello = client.execute_command("HELLO")
        mode = hello.get("mode", hello.get(b"mode"))
        if mode is not None:
            return (mode.decode() if isinstance(mode, bytes) else mode) == "cluster"
    except redis.ResponseError:
        pass
    return bool(int(client.info("cluster").get("cluster_enabled", 0)))


def is_cluster(client) -> bool:
    return isinstance(client, RedisCluster)


def node_groups(client, keys: list[str]) -> list[tuple[redis.Redis, list[int]]]:
    """The positions of `keys` grouped by the server that holds them, with a plain client of that server:
    one group (the client itself) on a single Redis; one per master on a cluster (from the client's slot map)."""
    if not is_cluster(client):
        return [(client, list(range(len(keys))))] if keys else []
    groups: dict[str, tuple[redis.Redis, list[int]]] = {}
    for i, key in enumerate(keys):
        node = client.get_node_from_key(key)
        groups.setdefault(node.name, (client.get_redis_connection(node), []))[1].append(i)
    return list(groups.values())


def refresh_topology(client) -> None:
    """After a fault met through a node's own client (see node_groups): reread the cluster's slot map."""
    if is_cluster(client):
        try:
            client.nodes_manager.initialize()
        except (redis.RedisError, redis.exceptions.RedisClusterException):
            pass  # the next command through the cluster client tries again
