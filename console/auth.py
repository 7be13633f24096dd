"""Operator credentials for the console: scrypt password hashes (standard library) in a secrets file.

The file holds one `user:hash` line per operator (what `patchcore console hash-password` prints);
the hash is `scrypt$N$r$p$salt$key` with salt and key in base64. Passwords are never stored or logged.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import threading
import time
from pathlib import Path

N, R, P = 1 << 14, 8, 1  # scrypt cost: about 16 MiB and a few tens of ms per check
USER = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")


class CredentialsError(ValueError):
    pass


def hash_password(password: str, n: int = N, r: int = R, p: int = P) -> str:
    if not password:
        raise CredentialsError("an empty password is not allowed")
    salt = secrets.token_bytes(16)
    key = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=32)
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return f"scrypt${n}${r}${p}${b64(salt)}${b64(key)}"


def verify_password(password: str, encoded: str) -> bool:
    try:
        scheme, n, r, p, salt, key = encoded.split("$")
        if scheme != "scrypt":
            return False
        salt, key = base64.b64decode(salt, validate=True), base64.b64decode(key, validate=True)
        n, r, p = int(n), int(r), int(p)
    except ValueError:
        return False
    if not (2 <= n <= 1 << 20 and 1 <= r <= 32 and 1 <= p <= 16):  # a planted hash cannot make a check cost minutes
        return False
    derived = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=len(key), maxmem=1 << 30)
    return hmac.compare_digest(derived, key)


def load_credentials(path: str | Path) -> dict[str, str]:
    """user -> hash from the secrets file; a malformed line is an error naming its line number (not its text)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise CredentialsError(f"cannot read the operator credentials file {path}: {exc.strerror}") from None
    users = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, _, encoded = line.partition(":")
        if not USER.match(user) or not encoded.startswith("scrypt$") or encoded.count("$") != 5:
            raise CredentialsError(f"{path} line {number}: `user:scrypt$...` expected (from `patchcore console "
                                   "hash-password`)")
        users[user] = encoded
    if not users:
        raise CredentialsError(f"{path} holds no operator credential")
    return users


class Operators:
    """Checks a user and password against the credentials; unknown users cost the same time as known ones."""

    def __init__(self, credentials: dict[str, str]):
        self._credentials = dict(credentials)
        self._decoy = hash_password(secrets.token_hex(16))

    def known(self, user: str) -> bool:
        return user in self._credentials

    def check(self, user: str, password: str) -> bool:
        encoded = self._credentials.get(user)
        ok = verify_password(password, encoded or self._decoy)
        return ok and encoded is not None


class Sessions:
    """Logged-in sessions kept by the server: the signed cookie carries only a random session id, so logging out
    (or restarting the console after a password change) ends a session even for a copied cookie."""

    def __init__(self, max_age_s: float, max_sessions: int = 10_000):
        self.max_age_s, self.max_sessions = max_age_s, max_sessions
        self._sessions: dict[str, tuple[str, float]] = {}  # id -> (user, expires at on the monotonic clock)
        self._lock = threading.Lock()

    def open(self, user: str) -> str:
        sid = secrets.token_urlsafe(32)
        with self._lock:
            if len(self._sessions) >= self.max_sessions:  # the oldest go first
                for old in sorted(self._sessions, key=lambda s: self._sessions[s][1])[: len(self._sessions) // 10 + 1]:
                    del self._sessions[old]
            self._sessions[sid] = (user, time.monotonic() + self.max_age_s)
        return sid

    def user(self, sid: str | None) -> str | None:
        if not sid:
            return None
        with self._lock:
            found = self._sessions.get(sid)
            if found is None:
                return None
            if time.monotonic() >= found[1]:
                del self._sessions[sid]
                return None
            return found[0]

    def end(self, sid: str | None) -> None:
        with self._lock:
            self._sessions.pop(sid or "", None)


class LoginLimiter:
    """Failed logins per user and per client in a sliding window; past the limit, that user or client is locked
    out for `lockout_s`. An attempt counts as failed from the moment it starts until its password is proven, so
    guesses sent in parallel are limited as well as guesses sent one after another."""

    def __init__(self, per_user: int, per_client: int, window_s: float, lockout_s: float):
        self.limits = {"user": per_user, "client": per_client}
        self.window_s, self.lockout_s = window_s, lockout_s
        self._failures: dict[tuple[str, str], list[float]] = {}
        self._locked: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def begin(self, user: str, client: str) -> float:
        """0.0: go on (the attempt is counted as a failure until `succeeded`); else the seconds still locked."""
        now = time.monotonic()
        with self._lock:
            targets = (("user", user), ("client", client))
            wait = max((self._locked.get(t, 0.0) - now for t in targets), default=0.0)
            if wait > 0:
                return wait
            for target in targets:
                times = [t for t in self._failures.get(target, []) if t > now - self.window_s] + [now]
                self._failures[target] = times
                if len(times) > self.limits[target[0]]:
                    self._locked[target] = now + self.lockout_s
                    wait = max(wait, self.lockout_s)
            if len(self._failures) > 100_000:  # bounded: forget the quiet ones
                self._failures = {k: v for k, v in self._failures.items() if v[-1] > now - self.window_s}
            return wait

    def succeeded(self, user: str, client: str) -> None:
        with self._lock:
            for target in (("user", user), ("client", client)):
                if self._failures.get(target):
                    self._failures[target].pop()
