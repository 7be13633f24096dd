"""The bounds on one client's command that the shipped Redis config sets (issue 22): the one place they are written.

A function runs with its caller's rights (Redis 7), so a camera credential holds XADD on its own stream and can write
an entry outside add_frame's size limit; likewise SET on its preview picture. Redis itself bounds what one command
can carry:
- `proto-max-bulk-len`: one argument (a frame, a field, a bank chunk) of at most MAX_ARGUMENT_BYTES, else Redis
  answers a protocol error and closes the connection before the bytes are stored. Above the largest frame the
  default camera limits allow (runtime.cameras.CameraLimits.max_entry_bytes, 32 MiB, plus its message header) and
  above a bank chunk (workers.banks.registry, 4 MiB): tests/test_acl_roles.py checks both.
- `client-query-buffer-limit`: the bytes one client has sent that Redis has not parsed yet.
- `maxmemory-clients`: the memory of every client together (query and output buffers, and the arguments of a
  command being read). Only this bounds a command of many arguments (an XADD of many fields, each under
  proto-max-bulk-len: Redis 7.0 and Valkey 8.1 count parsed arguments in no per-client limit); past it Redis
  disconnects the clients using the most. Above an honest worker's batch (8 frames of up to 16 MiB, the worker's
  max_frame_bytes) and a bank chunk in flight per client.

deploy/redis/limits.conf is this module's `config_text()` (a test checks they agree); compose and Kubernetes start
Redis with that file, `patchcore up` and the tests' embedded server with `server_args()`.
"""
from __future__ import annotations

MAX_ARGUMENT_BYTES = 40 << 20  # proto-max-bulk-len (Redis' minimum: 1 MiB)
MAX_QUERY_BUFFER_BYTES = 64 << 20  # client-query-buffer-limit (Redis' minimum: 1 MiB)
MAX_CLIENTS_MEMORY_BYTES = 256 << 20  # maxmemory-clients: all clients together

SERVER_LIMITS: dict[str, int] = {
    "proto-max-bulk-len": MAX_ARGUMENT_BYTES,
    "client-query-buffer-limit": MAX_QUERY_BUFFER_BYTES,
    "maxmemory-clients": MAX_CLIENTS_MEMORY_BYTES,
}


def _mb(value: int) -> str:
    """A byte count in Redis config units (`40mb` is 40 * 1024 * 1024 bytes)."""
    return f"{value >> 20}mb" if value % (1 << 20) == 0 else str(value)


def server_args() -> list[str]:
    """The limits as redis-server command-line options (what an embedded server is started with)."""
    return [part for name, value in SERVER_LIMITS.items() for part in (f"--{name}", _mb(value))]


def config_text() -> str:
    """deploy/redis/limits.conf: the limits as a Redis config file (passed as redis-server's first argument)."""
    lines = ["# Bounds on one client's command (issue 22). Written by runtime/server_limits.py (config_text); a test",
             "# checks this file against it. Start Redis with it as the first argument: redis-server limits.conf ...",
             "# proto-max-bulk-len: one argument (a frame, a field, a bank chunk); client-query-buffer-limit: a",
             "# client's unparsed bytes; maxmemory-clients: every client's buffers and pending arguments together."]
    return "\n".join(lines + [f"{name} {_mb(value)}" for name, value in SERVER_LIMITS.items()]) + "\n"
