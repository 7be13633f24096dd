"""A loopback TCP proxy in front of a real redis-server that loses replies: the command reaches the
server and runs, its reply never reaches the client, the connection is closed. redis-py then sees a
connection error and its retry sends the command again - the fault that duplicates writes."""
from __future__ import annotations

import socket
import threading


class ReplyDroppingProxy:
    """`with ReplyDroppingProxy(redis_port, marker=b"EVALSHA", drops=1) as proxy: proxy.url`.

    The first `drops` client writes that contain `marker` are forwarded, the server's reply to them
    is swallowed and the client's connection closed after `settle_s`. Loopback only; every socket
    has a timeout and every thread is a daemon, so a broken test cannot hang.
    """

    def __init__(self, target_port: int, marker: bytes, drops: int = 1, settle_s: float = 0.3):
        self.target_port, self.marker, self.drops, self.settle_s = target_port, marker, drops, settle_s
        self.dropped = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._closing = threading.Event()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def __enter__(self) -> "ReplyDroppingProxy":
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._closing.set()
        self._listener.close()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                continue
            server = socket.create_connection(("127.0.0.1", self.target_port), timeout=30)
            client.settimeout(30)
            swallow = threading.Event()
            threading.Thread(target=self._upstream, args=(client, server, swallow), daemon=True).start()
            threading.Thread(target=self._downstream, args=(server, client, swallow), daemon=True).start()

    def _upstream(self, client: socket.socket, server: socket.socket, swallow: threading.Event) -> None:
        try:
            while data := client.recv(1 << 16):
                with self._lock:
                    hit = self.marker in data and self.dropped < self.drops and not swallow.is_set()
                    if hit:
                        self.dropped += 1
                        swallow.set()  # from now on the server's replies on this connection are lost
                server.sendall(data)
                if hit:
                    threading.Timer(self.settle_s, self._close, args=(client, server)).start()
        except OSError:
            pass
        finally:
            self._close(client, server)

    def _downstream(self, server: socket.socket, client: socket.socket, swallow: threading.Event) -> None:
        try:
            while data := server.recv(1 << 16):
                if not swallow.is_set():
                    client.sendall(data)
        except OSError:
            pass
        finally:
            self._close(client, server)

    @staticmethod
    def _close(*sockets: socket.socket) -> None:
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
