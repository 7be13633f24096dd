"""How a CLI call ends when the world outside refuses it: one line on stderr naming what failed and why, exit 1,
no traceback. Redis refusals are told apart by redis-py's exception types (never by their text); a source that
cannot be opened by ingest's SourceError. Anything else is a bug and keeps its traceback. Long-running processes
do not get here: their serve loops log a Redis fault once and carry on (runtime.streams.serve)."""
from __future__ import annotations

import sys

import redis
import typer

# most specific first: each names what failed, then redis-py's own words
REDIS_REFUSALS: tuple[tuple[type[BaseException], str], ...] = (
    (redis.exceptions.AuthenticationError, "Redis refused the credentials"),
    (redis.exceptions.NoPermissionError, "Redis refused a command to this user (ACL)"),
    (redis.exceptions.ReadOnlyError, "Redis is a read-only replica: connect to the primary"),
    (redis.exceptions.OutOfMemoryError, "Redis is out of memory (maxmemory, noeviction)"),
    (redis.exceptions.BusyLoadingError, "Redis is still loading its data set"),
    (redis.exceptions.TimeoutError, "Redis did not answer in time"),
    (redis.exceptions.ConnectionError, "cannot reach Redis"),
    (redis.exceptions.RedisClusterException, "the Redis Cluster refused"),
    (redis.exceptions.RedisError, "Redis refused"),
)


def refusal(exc: BaseException) -> str | None:
    """The one-line error for an exception the outside world raised, or None for anything else (a bug)."""
    from ingest.sources import SourceError

    if isinstance(exc, SourceError):
        return f"cannot open the source: {exc}"
    for kind, what in REDIS_REFUSALS:
        if isinstance(exc, kind):
            detail = " ".join(str(exc).split())[:300]
            return f"{what}: {detail}" if detail else what
    return None


def main() -> None:
    """The `patchcore` entry point: the Typer app, with refusals as one-line errors."""
    from .cli import app

    try:
        app()
    except Exception as exc:  # noqa: BLE001 - re-raised unless it is a known refusal
        message = refusal(exc)
        if message is None:
            raise
        typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
        sys.exit(1)
