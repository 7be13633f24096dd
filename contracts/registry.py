"""Bank registry in Redis: versioned bank bytes with their sha256, an active version, rollback history.

Workers on any host fetch banks from here; no shared filesystem is needed.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass

import redis

from .keys import Keys


class RegistryError(RuntimeError):
    pass


@dataclass(frozen=True)
class BankVersion:
    name: str
    version: int
    sha256: str
    size: int
    published_at: float
    meta: dict


class BankRegistry:
    def __init__(self, client: redis.Redis, keys: Keys = Keys(), max_bank_bytes: int = 2 << 30):
        self.client = client
        self.keys = keys
        self.max_bank_bytes = max_bank_bytes

    def publish(self, name: str, data: bytes, meta: dict | None = None, activate: bool = False) -> int:
        if not name or ":" in name:
            raise RegistryError(f"bad bank name {name!r}")
        if len(data) > self.max_bank_bytes:
            raise RegistryError(f"bank of {len(data)} bytes exceeds the {self.max_bank_bytes}-byte limit")
        version = int(self.client.incr(self.keys.bank_counter(name)))
        record = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "published_at": time.time(),
                  "meta": meta or {}}
        with self.client.pipeline(transaction=True) as pipe:
            pipe.set(self.keys.bank_blob(name, version), data)
            pipe.hset(self.keys.bank_versions(name), str(version), json.dumps(record))
            pipe.sadd(self.keys.banks, name)
            pipe.execute()
        if activate:
            self.activate(name, version)
        return version

    def names(self) -> list[str]:
        return sorted(n.decode() for n in self.client.smembers(self.keys.banks))

    def versions(self, name: str) -> list[BankVersion]:
        raw = self.client.hgetall(self.keys.bank_versions(name))
        out = []
        for version, record in raw.items():
            data = json.loads(record)
            out.append(BankVersion(name, int(version), data["sha256"], data["size"], data["published_at"], data["meta"]))
        return sorted(out, key=lambda v: v.version)

    def active(self, name: str) -> int | None:
        value = self.client.get(self.keys.bank_active(name))
        return int(value) if value is not None else None

    def activate(self, name: str, version: int) -> None:
        if not self.client.hexists(self.keys.bank_versions(name), str(version)):
            raise RegistryError(f"bank {name} has no version {version}")
        active_key, history_key = self.keys.bank_active(name), self.keys.bank_history(name)

        def swap(pipe: redis.client.Pipeline) -> None:  # WATCHed: concurrent activations cannot interleave
            current = pipe.get(active_key)
            pipe.multi()
            if current is not None and int(current) != version:
                pipe.rpush(history_key, current)
            pipe.set(active_key, version)

        self.client.transaction(swap, active_key)

    def rollback(self, name: str) -> int:
        """Re-activate the previously active version; returns it."""
        active_key, history_key = self.keys.bank_active(name), self.keys.bank_history(name)
        result: list[int] = []

        def pop(pipe: redis.client.Pipeline) -> None:
            previous = pipe.lindex(history_key, -1)
            if previous is None:
                raise RegistryError(f"bank {name} has no earlier active version to roll back to")
            pipe.multi()
            pipe.rpop(history_key)
            pipe.set(active_key, previous)
            result[:] = [int(previous)]

        self.client.transaction(pop, active_key, history_key)
        return result[0]

    def fetch(self, name: str, version: int) -> bytes:
        """Bank bytes, checked against the sha256 recorded at publication."""
        record = self.client.hget(self.keys.bank_versions(name), str(version))
        data = self.client.get(self.keys.bank_blob(name, version))
        if record is None or data is None:
            raise RegistryError(f"bank {name} version {version} is not in the registry")
        if hashlib.sha256(data).hexdigest() != json.loads(record)["sha256"]:
            raise RegistryError(f"bank {name} version {version}: bytes do not match their published sha256")
        return data
