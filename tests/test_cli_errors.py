"""A CLI call that the world outside refuses ends with one line naming what failed and why (exit 1), not a
traceback: Redis unreachable, an ACL refusal, Redis out of memory, a source that cannot be opened (issue 19)."""
from __future__ import annotations

import socket
import subprocess
import sys

import redis

from runtime.connection import connect


def patchcore(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "patchcore", *args], capture_output=True, text=True, timeout=timeout)


def one_line_error(done: subprocess.CompletedProcess, starts: str) -> None:
    assert done.returncode == 1, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("{")]  # logs are JSON
    assert len(lines) == 1 and lines[0].startswith(f"error: {starts}"), done.stderr[-2000:]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_redis_that_cannot_be_reached(redis_server):
    one_line_error(patchcore("status", "--redis-url", f"redis://127.0.0.1:{closed_port()}/0"), "cannot reach Redis")


def test_a_command_the_users_acl_refuses(redis_server):
    client = connect(redis_server.url)
    client.acl_setuser("limited", enabled=True, passwords=["+secret-pw"], commands=["+ping", "+hello"], keys=["pc:*"])
    url = redis_server.url.replace("redis://", "redis://limited:secret-pw@")
    done = patchcore("status", "--redis-url", url)
    one_line_error(done, "Redis refused a command to this user (ACL)")
    assert "secret-pw" not in done.stderr + done.stdout  # secrets never printed


def test_a_redis_out_of_memory(redis_server):
    client = connect(redis_server.url)
    client.config_set("maxmemory", 1)
    try:
        one_line_error(patchcore("rule", "cam-1", "--k", "1", "--n", "1", "--redis-url", redis_server.url),
                       "Redis is out of memory")
    finally:
        client.config_set("maxmemory", 0)
    assert client.hgetall("pc:alarm_rules") == {}  # refused whole: nothing written


def test_a_source_that_cannot_be_opened(tmp_path):
    one_line_error(patchcore("up", "--source", str(tmp_path / "no-such-video.mp4"), "--frames", "5"),
                   "cannot open the source")


def test_refusals_are_told_apart_by_type_not_text():
    from ingest.sources import SourceError
    from patchcore.errors import refusal

    assert refusal(redis.exceptions.NoPermissionError("")).startswith("Redis refused a command to this user")
    assert refusal(redis.exceptions.ReadOnlyError("x")).startswith("Redis is a read-only replica")
    assert refusal(redis.exceptions.ConnectionError("out of memory")).startswith("cannot reach Redis")
    assert refusal(SourceError("cannot open rtsp://x")) == "cannot open the source: cannot open rtsp://x"
    assert refusal(ValueError("NOPERM")) is None  # a bug keeps its traceback


def test_eval_of_a_folder_without_a_test_set_says_so_before_building(tmp_path):
    """Bad input (exit 2): a data folder with training images but no test/ is refused with the layout expected,
    before any bank is built (no weights are loaded: --weights names a file that does not exist), not a traceback."""
    (tmp_path / "train" / "good").mkdir(parents=True)
    done = patchcore("eval", "--data", str(tmp_path), "--backbone", "mobilenet_v2", "--weights",
                     str(tmp_path / "absent.pth"), "--no-progress")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert f"error: {tmp_path / 'test'} not found: expected the MVTec layout test/<type>" in done.stderr


def test_a_console_whose_port_is_taken_says_so(redis_server):
    """`patchcore console` says where it listens only once it does: a port another process holds is an error
    (exit 2) naming the address, and no "console at" line is printed."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = patchcore("console", "--port", str(port), "--redis-url", redis_server.url, timeout=60)
    assert done.returncode == 2 and "console at" not in done.stdout, (done.stdout, done.stderr[-2000:])
    assert f"error: the console could not start on http://127.0.0.1:{port}/" in done.stderr
