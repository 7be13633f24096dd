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
