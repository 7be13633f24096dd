"""Webhook destination: one HTTP POST per message (httpx, one kept-alive connection), JSON body, signed.

Headers: `Content-Type: application/json`, `Idempotency-Key: <the message's id>`, `X-Patchcore-Timestamp: <unix
seconds>` and, with a secret, `X-Patchcore-Signature: sha256=<hex HMAC-SHA256 of "<timestamp>.<body>" under the
secret>` (docs/sinks.md has a receiver that checks it). A 2xx reply confirms the message; 408, 429, 5xx and
network errors are failures for now (retried with backoff); any other status is a permanent refusal (the
message goes to the sink's dead letters with the status and the start of the reply).
"""
from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence
from urllib.parse import urlsplit

import httpx

from .messages import Message
from .service import Attempt, SettingsError

SIGNATURE_HEADER = "X-Patchcore-Signature"
TIMESTAMP_HEADER = "X-Patchcore-Timestamp"
IDEMPOTENCY_HEADER = "Idempotency-Key"
RETRIED_STATUSES = frozenset({408, 429})  # 4xx that say "not now" rather than "never"
REASON_BYTES = 200  # of a refusing reply's body kept in the dead letter


@dataclass(frozen=True)
class WebhookSettings:
    url: str = field(metadata={"help": "http:// or https:// URL the messages are POSTed to."})
    secret_file: Path | None = field(default=None, metadata={
        "help": "File holding the HMAC-SHA256 signing secret (never logged); without it messages go unsigned.",
        "envvar": "PATCHCORE_WEBHOOK_SECRET_FILE"})
    timeout_s: float = field(default=5.0, metadata={"help": "Seconds to wait for a reply before retrying."})
    ca_file: Path | None = field(default=None, metadata={"help": "CA bundle for an https:// URL (default: the "
                                                                 "system's)."})

    def __post_init__(self):
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SettingsError(f"bad webhook URL {self.url[:200]!r}: http:// or https:// with a host expected")
        if self.timeout_s <= 0:
            raise SettingsError("timeout_s must be positive")


def read_secret(path: Path) -> bytes:
    """The secret in `path` (a trailing newline dropped); SettingsError if unreadable or empty (never its text)."""
    try:
        secret = path.read_bytes().rstrip(b"\r\n")
    except OSError as exc:
        raise SettingsError(f"cannot read the webhook secret file {path}: {exc.strerror}") from None
    if not secret:
        raise SettingsError(f"the webhook secret file {path} is empty")
    return secret


def signature(secret: bytes, timestamp: str, body: bytes) -> str:
    """The X-Patchcore-Signature value: sha256=<hex HMAC-SHA256 of b"<timestamp>.<body>">."""
    return "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


class Webhook:
    def __init__(self, settings: WebhookSettings):
        self.settings = settings
        self._secret = read_secret(settings.secret_file) if settings.secret_file else None
        parts = urlsplit(settings.url)
        self.description = f"webhook {parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}{parts.path}"
        verify = str(settings.ca_file) if settings.ca_file else True
        self._client = httpx.Client(timeout=settings.timeout_s, verify=verify, follow_redirects=False)

    def headers(self, message: Message, body: bytes) -> dict[str, str]:
        timestamp = str(int(time.time()))
        headers = {"Content-Type": "application/json", IDEMPOTENCY_HEADER: message.key, TIMESTAMP_HEADER: timestamp}
        if self._secret is not None:
            headers[SIGNATURE_HEADER] = signature(self._secret, timestamp, body)
        return headers

    def deliver(self, messages: Sequence[Message]) -> Attempt:
        done: list[str | None] = []
        for message in messages:
            body = message.json
            try:
                reply = self._client.post(self.settings.url, content=body, headers=self.headers(message, body))
            except httpx.HTTPError as exc:  # connection refused, reset, timeout, TLS...
                return Attempt(done, f"{type(exc).__name__}: {exc}")
            if reply.is_success:
                done.append(None)
            elif reply.status_code >= 500 or reply.status_code in RETRIED_STATUSES:
                return Attempt(done, f"HTTP {reply.status_code}")
            else:
                done.append(f"HTTP {reply.status_code}: {reply.text[:REASON_BYTES]}")
        return Attempt(done)

    def close(self) -> None:
        self._client.close()
