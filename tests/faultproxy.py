"""A loopback TCP proxy in front of a real redis-server, with faults switchable while it runs:

- drop reply and close (`marker`, `drops`): the command reaches the server and runs, its reply never reaches the
  client, the connection is closed. redis-py then sees a connection error and its retry sends the command again -
  the fault that duplicates writes and, for a read of new stream entries, hands over the next ones.
- lose replies at random (`drop_rate`): each client write (a command, or a pipeline of them: any command) has its
  reply dropped with that probability and its connection closed, as with a marker: what bench/soak.py's
  `--lost-replies` puts in front of every process. Drawn per command, not per packet, so that a long reply (a
  bank of megabytes) is as likely to be lost as a short one.
- delay (`delay(seconds)`): every reply is held back that long (the commands go through at once): a slow network.
- blackhole (`blackhole()`, or `blackhole_on(marker)` from the first write that contains `marker`, that write
  included): nothing is forwarded either way and no connection is closed or refused - a partition, not a refusal.
  What was sent meanwhile is held and delivered in order once healed (`heal()`), as TCP's retransmissions would
  deliver it: a command the client gave up on may still reach the server after the partition.

Loopback only; every thread is a daemon and every blocking call has a timeout, so a broken test cannot hang.
"""
from __future__ import annotations

import collections
import random
import socket
import threading
import time

_EMPTY_REPLIES = (b"*0\r\n", b"*-1\r\n", b"_\r\n", b"$-1\r\n")  # an empty array, a null (RESP2 and 3)
_CLOSE = object()  # in a direction's queue: the sending side closed


class _Link:
    """One client connection and its server connection; per direction a queue of (received at, data)."""

    def __init__(self, client: socket.socket, server: socket.socket):
        self.client, self.server = client, server
        self.up: collections.deque = collections.deque()  # client -> server
        self.down: collections.deque = collections.deque()  # server -> client
        self.ready = threading.Condition()
        self.watch = False  # a marked command was sent: its reply is to be dropped
        self.swallow = False  # replies are lost from now on (the connection is about to close)
        self.doomed = False  # drop_rate drew this connection's next reply: it is to be dropped

    def close(self) -> None:
        for sock in (self.client, self.server):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        with self.ready:
            self.ready.notify_all()


class FaultProxy:
    """`with FaultProxy(redis_port) as proxy: connect(proxy.url)`; then `proxy.blackhole()`, `proxy.heal()`,
    `proxy.delay(2.5)`, ... at any time. With `marker`, the first `drops` replies to client writes that contain
    it (default one) are dropped and their connections closed `settle_s` later (with `only_nonempty`, replies that are an empty
    array or a null - a blocking read that timed out - pass and do not count). With `drop_rate` (0 to 1), the reply to
    every client write, whatever the command, is dropped with that probability (a `seed`ed draw) and its connection
    closed the same way; `replies` counts the writes drawn for, `dropped` the replies dropped. While the server is down, a
    client's connection is accepted and closed at once (`refused` counts them): a restarted server is found again."""

    def __init__(self, target_port: int, marker: bytes = b"", drops: int | None = None, settle_s: float = 0.3,
                 only_nonempty: bool = False, drop_rate: float = 0.0, seed: int = 0):
        if not 0.0 <= drop_rate <= 1.0:
            raise ValueError(f"drop_rate must be in [0, 1], got {drop_rate!r}")
        self.target_port, self.marker, self.settle_s = target_port, marker, settle_s
        self.drops = drops if drops is not None else int(bool(marker))  # a marker alone: one drop
        self.only_nonempty = only_nonempty
        self.drop_rate, self._rng = drop_rate, random.Random(seed)
        self.dropped = 0
        self.replies = 0  # client writes whose reply was drawn for (drop_rate)
        self.refused = 0  # client connections closed because the server could not be reached
        self.delay_s = 0.0
        self._holding = False  # blackholed: nothing forwarded either way
        self._hole_marker: bytes | None = None  # blackhole from the first write that contains it
        self.holes = 0  # how many times a blackhole began
        self._lock = threading.Lock()
        self._links: list[_Link] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._closing = threading.Event()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    # ---- switching faults -------------------------------------------------------------------------
    def delay(self, seconds: float) -> None:
        """Hold every reply back `seconds` from now on (0: none)."""
        self.delay_s = seconds
        self._wake()

    def blackhole(self) -> None:
        """Forward nothing either way from now on, closing nothing: a partition."""
        with self._lock:
            self.holes += not self._holding
            self._holding = True

    def blackhole_on(self, marker: bytes) -> None:
        """Blackhole from the first client write that contains `marker` (that write held too)."""
        with self._lock:
            self._hole_marker = marker

    def heal(self) -> None:
        """End a blackhole (armed or begun): what was held is delivered, in order."""
        with self._lock:
            self._holding, self._hole_marker = False, None
        self._wake()

    @property
    def holding(self) -> bool:
        return self._holding

    # ---- plumbing ---------------------------------------------------------------------------------
    def __enter__(self) -> "FaultProxy":
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._closing.set()
        self._listener.close()
        for link in list(self._links):
            link.close()

    def _wake(self) -> None:
        for link in list(self._links):
            with link.ready:
                link.ready.notify_all()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                continue
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:  # the server is down (a restart): the client sees its connection closed, and retries
                self.refused += 1
                client.close()
                continue
            server.settimeout(None)  # reads wait as long as the connection lives (a blackhole may last)
            client.settimeout(None)
            link = _Link(client, server)
            self._links.append(link)
            for target in (self._read_client, self._read_server):
                threading.Thread(target=target, args=(link,), daemon=True).start()
            for queue, sock in ((link.up, server), (link.down, client)):
                threading.Thread(target=self._send, args=(link, queue, sock), daemon=True).start()

    def _read_client(self, link: _Link) -> None:
        try:
            while data := link.client.recv(1 << 16):
                with self._lock:
                    if self._hole_marker is not None and self._hole_marker in data:
                        self._hole_marker = None
                        self.holes += not self._holding
                        self._holding = True
                    if self.marker and self.marker in data and self.dropped < self.drops:
                        link.watch = True
                    if self.drop_rate and not link.doomed:
                        self.replies += 1
                        link.doomed = self._rng.random() < self.drop_rate
                self._put(link, link.up, data)
        except OSError:
            pass
        self._put(link, link.up, _CLOSE)

    def _read_server(self, link: _Link) -> None:
        try:
            while data := link.server.recv(1 << 16):
                if link.watch and not link.swallow:
                    self._judge(link, data)
                if link.doomed and not link.swallow:
                    self._lose(link)
                if not link.swallow:
                    self._put(link, link.down, data)
        except OSError:
            pass
        self._put(link, link.down, _CLOSE)

    def _judge(self, link: _Link, reply: bytes) -> None:
        """The reply to a marked command: dropped (and the connection closed soon), unless it is empty and
        `only_nonempty` lets it pass."""
        link.watch = False
        if self.only_nonempty and reply.startswith(_EMPTY_REPLIES):
            return
        with self._lock:
            if self.dropped >= self.drops:
                return
            self.dropped += 1
        link.swallow = True
        threading.Timer(self.settle_s, link.close).start()

    def _lose(self, link: _Link) -> None:
        """`drop_rate` drew this reply: it is dropped, and the connection closed soon."""
        with self._lock:
            self.dropped += 1
        link.swallow = True
        threading.Timer(self.settle_s, link.close).start()

    @staticmethod
    def _put(link: _Link, queue: collections.deque, item) -> None:
        with link.ready:
            queue.append((time.monotonic(), item))
            link.ready.notify_all()

    def _send(self, link: _Link, queue: collections.deque, sock: socket.socket) -> None:
        """Forward one direction's data in order, once no blackhole holds it and (replies) its delay has passed."""
        replies = queue is link.down
        while not self._closing.is_set():
            with link.ready:
                if not queue:
                    link.ready.wait(0.2)
                    continue
                received, item = queue[0]
                wait = (received + self.delay_s - time.monotonic()) if replies else 0.0
                if self._holding or wait > 0:
                    link.ready.wait(0.05 if self._holding else min(wait, 0.05))
                    continue
                queue.popleft()
            if item is _CLOSE:
                link.close()
                return
            try:
                sock.sendall(item)
            except OSError:
                link.close()
                return


ReplyDroppingProxy = FaultProxy  # the name the lost-reply tests know it by
