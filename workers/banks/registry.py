"""Bank registry in Redis: versioned bank bytes with their sha256, an active version, rollback history.

Workers on any host fetch banks from here; no shared filesystem is needed. With a signing key,
every version carries an HMAC-SHA256 over its name, version number and bytes: a registry that holds
the key signs what it publishes and loads only versions signed with it, so whoever can write to
Redis without holding the key cannot make a worker load a bank. Publishing keeps the blobs of the
newest `keep_versions` versions (and the active one and the rollback target) and deletes the rest.

A version's bytes are stored in chunks of at most `chunk_bytes` (one SET each), so no command carries a whole bank:
the shipped Redis config bounds one argument (`proto-max-bulk-len`, deploy/redis/limits.conf) far below a bank's size.
Chunk 0 is `bank_blob`, chunk i >= 1 `bank_blob_chunk` (all in the registry's slot); the version record, written last,
holds the chunk count, so a reader never sees a version whose chunks are not all written. A record without a count
(published before chunking) names one blob: it loads as before. The sha256 and the signature cover the whole bytes.
"""
from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from contracts.keys import Keys
from runtime.control import record as audit


class RegistryError(RuntimeError):
    pass


MIN_KEY_BYTES = 32


def load_signing_key(path: str | Path) -> bytes:
    """The bank signing key: the file's bytes, surrounding whitespace stripped (e.g. `openssl rand -hex 32`)."""
    try:
        key = Path(path).read_bytes().strip()
    except OSError as exc:
        raise RegistryError(f"cannot read the bank signing key file {path}: {exc.strerror}") from None
    if len(key) < MIN_KEY_BYTES:
        raise RegistryError(f"the bank signing key in {path} has {len(key)} bytes; at least {MIN_KEY_BYTES} are needed")
    return key


def bank_signature(key: bytes, name: str, version: int, data: bytes) -> str:
    """HMAC-SHA256 (hex) over the bank's name, version number and bytes."""
    mac = hmac.new(key, b"patchcore-bank-v1\0%s\0%d\0" % (name.encode(), version), hashlib.sha256)
    mac.update(data)
    return mac.hexdigest()


@dataclass(frozen=True)
class BankVersion:
    name: str
    version: int
    sha256: str
    size: int
    published_at: float
    meta: dict
    signed: bool = False
    chunks: int = 1  # Redis keys its bytes are stored in


class BankRegistry:
    """`signing_key`: sign on publish, and refuse to fetch versions not signed with it (None: no signatures).
    `keep_versions`: blobs kept per bank name after a publish, besides the active version and the rollback target.
    `chunk_bytes`: the most bytes of one chunk (one SET) of a published version."""

    KEEP_VERSIONS = 3  # the default of keep_versions (`patchcore bank publish --keep`)
    CHUNK_BYTES = 4 << 20  # the default of chunk_bytes: well under the shipped proto-max-bulk-len (tests check it)
    MAX_CHUNKS = 1 << 16  # a record naming more chunks is refused as unreadable

    def __init__(self, client: redis.Redis, keys: Keys = Keys(), max_bank_bytes: int = 2 << 30,
                 signing_key: bytes | None = None, keep_versions: int = KEEP_VERSIONS, chunk_bytes: int = CHUNK_BYTES):
        if keep_versions < 1:
            raise RegistryError("keep_versions must be at least 1")
        if chunk_bytes < 1:
            raise RegistryError("chunk_bytes must be at least 1")
        self.client = client
        self.keys = keys
        self.max_bank_bytes = max_bank_bytes
        self._signing_key = signing_key
        self.keep_versions = keep_versions
        self.chunk_bytes = chunk_bytes

    @property
    def verifies(self) -> bool:
        return self._signing_key is not None

    def publish(self, name: str, data: bytes, meta: dict | None = None, activate: bool = False,
                who: str | None = None) -> int:
        """Store `data` as bank `name`'s next version (activated at once with `activate`); audited (runtime.control:
        `who`, default the Redis user)."""
        if not name or ":" in name:
            raise RegistryError(f"bad bank name {name!r}")
        if len(data) > self.max_bank_bytes:
            raise RegistryError(f"bank of {len(data)} bytes exceeds the {self.max_bank_bytes}-byte limit")
        if len(data) > self.chunk_bytes * self.MAX_CHUNKS:
            raise RegistryError(f"bank of {len(data)} bytes needs more than {self.MAX_CHUNKS} chunks of "
                                f"{self.chunk_bytes} bytes")
        version = int(self.client.incr(self.keys.bank_counter(name)))
        view = memoryview(data)
        chunks = [view[start:start + self.chunk_bytes] for start in range(0, max(len(data), 1), self.chunk_bytes)]
        record = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "published_at": time.time(),
                  "meta": meta or {}, "chunks": len(chunks)}
        if self._signing_key is not None:
            record["hmac_sha256"] = bank_signature(self._signing_key, name, version, data)
        blob_keys = self._blob_keys(name, version, len(chunks))
        try:
            for key, chunk in zip(blob_keys, chunks):  # one command each, never the whole bank (no MULTI either:
                self.client.set(key, chunk)  # queued commands count against the client's query buffer limit)
            with self.client.pipeline(transaction=True) as pipe:  # the record last: readers see all chunks or none
                pipe.hset(self.keys.bank_versions(name), str(version), json.dumps(record))
                pipe.sadd(self.keys.banks, name)
                pipe.execute()
        except BaseException:
            with contextlib.suppress(redis.RedisError):  # no record names them: nothing else would delete them
                if not self.client.hexists(self.keys.bank_versions(name), str(version)):  # (EXEC's reply lost)
                    self.client.delete(*blob_keys)
            raise
        audit(self.client, self.keys, "bank.publish", name, None,
              {"version": version, "sha256": record["sha256"], "size": record["size"], "meta": record["meta"],
               "signed": "hmac_sha256" in record}, who=who)
        if activate:
            self.activate(name, version, who=who)
        pruned = self.prune(name)
        if pruned:
            audit(self.client, self.keys, "bank.prune", name, {"versions": pruned}, None, who=who)
        return version

    def _blob_keys(self, name: str, version: int, chunks: int) -> list[str]:
        """The keys of a version's `chunks` chunks, in order (chunk 0 is bank_blob, as before chunking)."""
        return [self.keys.bank_blob(name, version)] + [self.keys.bank_blob_chunk(name, version, index)
                                                       for index in range(1, chunks)]

    def _chunk_count(self, record: dict) -> int:
        """The chunk count of a parsed version record: 1 when it has none (published before chunking)."""
        chunks = record.get("chunks", 1)
        if type(chunks) is not int or not 1 <= chunks <= self.MAX_CHUNKS:
            raise ValueError(f"bad chunk count {chunks!r}")
        return chunks

    def prune(self, name: str) -> list[int]:
        """Delete the versions (every chunk and the record) older than the newest `keep_versions`, except the
        active one and the rollback target; returns the deleted version numbers."""
        versions_key, active_key, history_key = (self.keys.bank_versions(name), self.keys.bank_active(name),
                                                 self.keys.bank_history(name))
        deleted: list[int] = []

        def drop(pipe: redis.client.Pipeline) -> None:  # WATCHed: a concurrent activation retries it
            versions = sorted(int(v) for v in pipe.hkeys(versions_key))
            protected = set(versions[-self.keep_versions:])
            protected.update(int(v) for v in (pipe.get(active_key), pipe.lindex(history_key, -1)) if v is not None)
            old = [v for v in versions if v not in protected]
            records = pipe.hmget(versions_key, [str(v) for v in old]) if old else []
            pipe.multi()
            for version, record in zip(old, records):
                try:
                    chunks = self._chunk_count(json.loads(record))
                except (ValueError, TypeError, AttributeError):  # an unreadable record: its chunk 0 at least
                    chunks = 1
                pipe.delete(*self._blob_keys(name, version, chunks))
                pipe.hdel(versions_key, str(version))
                pipe.lrem(history_key, 0, str(version))  # rollback never lands on a deleted version
            deleted[:] = old

        self.client.transaction(drop, versions_key, active_key, history_key)
        return deleted

    def exists(self, name: str) -> bool:
        """Whether bank `name` was ever published here (a version, an active version or a version counter)."""
        return bool(self.client.exists(self.keys.bank_versions(name), self.keys.bank_active(name),
                                       self.keys.bank_counter(name)))

    def names(self) -> list[str]:
        return sorted(n.decode() for n in self.client.smembers(self.keys.banks))

    def versions(self, name: str) -> list[BankVersion]:
        raw = self.client.hgetall(self.keys.bank_versions(name))
        out = []
        for version, record in raw.items():
            data = json.loads(record)
            out.append(BankVersion(name, int(version), data["sha256"], data["size"], data["published_at"], data["meta"],
                                   "hmac_sha256" in data, data.get("chunks", 1)))
        return sorted(out, key=lambda v: v.version)

    def active(self, name: str) -> int | None:
        value = self.client.get(self.keys.bank_active(name))
        return int(value) if value is not None else None

    def rollback_target(self, name: str) -> int | None:
        """The version `rollback` would re-activate (None: nothing to roll back to)."""
        value = self.client.lindex(self.keys.bank_history(name), -1)
        return int(value) if value is not None else None

    def activate(self, name: str, version: int, who: str | None = None) -> None:
        """Make `version` the active one (the one before becomes the rollback target); audited."""
        before: list[int | None] = [None]
        versions_key, active_key = self.keys.bank_versions(name), self.keys.bank_active(name)
        history_key = self.keys.bank_history(name)

        def swap(pipe: redis.client.Pipeline) -> None:  # WATCHed: concurrent activations and prunes cannot interleave
            if not pipe.hexists(versions_key, str(version)):
                raise RegistryError(f"bank {name} has no version {version}")
            current = pipe.get(active_key)
            before[0] = None if current is None else int(current)
            pipe.multi()
            if current is not None and int(current) != version:
                pipe.rpush(history_key, current)
            pipe.set(active_key, version)

        self.client.transaction(swap, active_key, versions_key)
        audit(self.client, self.keys, "bank.activate", name, {"active": before[0]}, {"active": version}, who=who)

    def rollback(self, name: str, who: str | None = None) -> int:
        """Re-activate the previously active version; returns it. Audited."""
        active_key, history_key = self.keys.bank_active(name), self.keys.bank_history(name)
        result: list[int] = []

        def pop(pipe: redis.client.Pipeline) -> None:
            previous = pipe.lindex(history_key, -1)
            if previous is None:
                raise RegistryError(f"bank {name} has no earlier active version to roll back to")
            current = pipe.get(active_key)
            pipe.multi()
            pipe.rpop(history_key)
            pipe.set(active_key, previous)
            result[:] = [int(previous), None if current is None else int(current)]

        self.client.transaction(pop, active_key, history_key)
        audit(self.client, self.keys, "bank.rollback", name, {"active": result[1]}, {"active": result[0]}, who=who)
        return result[0]

    def fetch(self, name: str, version: int) -> bytes:
        """Bank bytes (its chunks joined), checked against the sha256 recorded at publication and, with a signing key,
        its signature."""
        record = self.client.hget(self.keys.bank_versions(name), str(version))
        if record is None:
            raise RegistryError(f"bank {name} version {version} is not in the registry")
        try:
            record = json.loads(record)
            published_sha256, chunks = record["sha256"], self._chunk_count(record)
        except (ValueError, TypeError, KeyError, AttributeError):
            raise RegistryError(f"bank {name} version {version}: unreadable registry record") from None
        data = self._read_chunks(name, version, chunks)
        if self._signing_key is not None:
            signature = record.get("hmac_sha256")
            if not isinstance(signature, str):
                raise RegistryError(f"bank {name} version {version} is unsigned; only banks signed with this "
                                    "worker's key are loaded")
            if not hmac.compare_digest(signature, bank_signature(self._signing_key, name, version, data)):
                raise RegistryError(f"bank {name} version {version}: signature does not match (signed with another "
                                    "key, or bytes or record altered)")
        if hashlib.sha256(data).hexdigest() != published_sha256:
            raise RegistryError(f"bank {name} version {version}: bytes do not match their published sha256")
        return data

    def _read_chunks(self, name: str, version: int, chunks: int) -> bytes:
        """A version's chunks joined, one GET each (no reply holds more than one chunk); at most max_bank_bytes."""
        parts, size = [], 0
        for index, key in enumerate(self._blob_keys(name, version, chunks)):
            part = self.client.get(key)
            if part is None:  # deleted by a prune since the record was read, or by hand
                raise RegistryError(f"bank {name} version {version} is not in the registry (chunk {index} of "
                                    f"{chunks} is missing)")
            size += len(part)
            if size > self.max_bank_bytes:
                raise RegistryError(f"bank {name} version {version} exceeds the {self.max_bank_bytes}-byte limit")
            parts.append(part)
        return b"".join(parts)
