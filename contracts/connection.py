"""Redis connections from a URL (redis://, rediss://) with optional secrets file; retries with backoff."""
from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialBackoff
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


def connect(url: str | None = None, password_file: str | Path | None = None,
            socket_timeout: float = 10.0) -> redis.Redis:
    """A client that retries connection errors with exponential backoff (redis-py's own Retry).

    The password may come from the URL, from `password_file`, or from REDIS_PASSWORD_FILE.
    """
    password_file = password_file or os.environ.get("REDIS_PASSWORD_FILE")
    kwargs = {}
    if password_file:
        kwargs["password"] = Path(password_file).read_text().strip()
    return redis.Redis.from_url(
        redis_url(url),
        socket_timeout=socket_timeout,
        socket_connect_timeout=5.0,
        health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=5.0, base=0.1), retries=8),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        **kwargs,
    )
