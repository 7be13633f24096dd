"""Banks stored in chunks (issue 22: the shipped Redis config bounds one command far below a bank's size): written one
chunk per command with the version record last, read back whole and checked exactly as before (sha256 and signature
over the whole bytes), versions published before chunking still load, pruning deletes every chunk, and a publish cut
off midway leaves no version and no chunk. Real redis-server; real bank bytes."""
import hashlib
import json
import math
import time

import pytest
import redis

from contracts.keys import Keys
from runtime.connection import connect
from workers.banks.cache import BankCache
from workers.banks.registry import BankRegistry, RegistryError, bank_signature

KEYS = Keys()
KEY = b"k" * 32
CHUNK = 64 << 10  # small chunks: the real bank spans many


def blob_keys(client, name: str) -> set[bytes]:
    """Every chunk key of bank `name` in Redis, whatever its version (SCAN, as an operator would look)."""
    return set(client.scan_iter(match=f"{KEYS.bank_blob(name, 0)[:-1]}*"))


def test_a_bank_is_stored_in_chunks_and_a_worker_loads_it_whole(redis_server, synthetic_bank_bytes):
    client = connect(redis_server.url)
    version = BankRegistry(client, KEYS, signing_key=KEY, chunk_bytes=CHUNK).publish("default", synthetic_bank_bytes,
                                                                                     activate=True)
    chunks = math.ceil(len(synthetic_bank_bytes) / CHUNK)
    assert chunks > 3
    record = json.loads(client.hget(KEYS.bank_versions("default"), version))
    assert record["chunks"] == chunks and record["size"] == len(synthetic_bank_bytes)
    assert record["sha256"] == hashlib.sha256(synthetic_bank_bytes).hexdigest()  # over the whole bytes
    assert record["hmac_sha256"] == bank_signature(KEY, "default", version, synthetic_bank_bytes)
    stored = [client.get(KEYS.bank_blob("default", version))] + [
        client.get(KEYS.bank_blob_chunk("default", version, i)) for i in range(1, chunks)]
    assert all(len(part) <= CHUNK for part in stored) and b"".join(stored) == synthetic_bank_bytes
    assert len(blob_keys(client, "default")) == chunks
    registry = BankRegistry(client, KEYS, signing_key=KEY)  # a reader's chunk size does not matter
    assert registry.fetch("default", version) == synthetic_bank_bytes
    assert registry.versions("default")[0].chunks == chunks
    cache = BankCache(registry, device="cpu")  # the worker's cache
    assert cache.get("default").version == version and cache.loaded() == {"default": version}


def test_a_changed_missing_or_miscounted_chunk_is_refused(redis_server):
    client = connect(redis_server.url)
    data = bytes(range(256)) * 1000  # 256,000 bytes: four chunks
    registry = BankRegistry(client, KEYS, signing_key=KEY, chunk_bytes=CHUNK, keep_versions=10)
    version = registry.publish("line", data)
    assert registry.fetch("line", version) == data
    client.setrange(KEYS.bank_blob_chunk("line", version, 3), 10, b"!")  # the last chunk, altered
    with pytest.raises(RegistryError):
        registry.fetch("line", version)
    unsigned = BankRegistry(client, KEYS, chunk_bytes=CHUNK, keep_versions=10)  # the sha256 alone refuses it too
    with pytest.raises(RegistryError):
        unsigned.fetch("line", version)

    second = registry.publish("line", data)
    client.delete(KEYS.bank_blob_chunk("line", second, 2))  # a middle chunk gone
    with pytest.raises(RegistryError):
        registry.fetch("line", second)

    third = registry.publish("line", data)
    record = json.loads(client.hget(KEYS.bank_versions("line"), third))
    for count in (3, 5, 0, -1, "4", 4.0, True, None, 1 << 20):  # fewer or more chunks than written, or not a count
        client.hset(KEYS.bank_versions("line"), third, json.dumps({**record, "chunks": count}))
        with pytest.raises(RegistryError):
            registry.fetch("line", third)
    client.hset(KEYS.bank_versions("line"), third, json.dumps(record))
    assert registry.fetch("line", third) == data
    with pytest.raises(RegistryError):
        BankRegistry(client, KEYS, signing_key=KEY, max_bank_bytes=len(data) - 1).fetch("line", third)
    with pytest.raises(ValueError):
        KEYS.bank_blob_chunk("line", third, 0)  # chunk 0 is bank_blob


def test_a_version_published_before_chunking_still_loads_and_is_pruned(redis_server, synthetic_bank_bytes):
    """The layout of a version published before chunks: one blob, a record without a chunk count."""
    client = connect(redis_server.url)
    client.set(KEYS.bank_counter("default"), 1)
    client.set(KEYS.bank_blob("default", 1), synthetic_bank_bytes)
    client.hset(KEYS.bank_versions("default"), "1", json.dumps({
        "sha256": hashlib.sha256(synthetic_bank_bytes).hexdigest(), "size": len(synthetic_bank_bytes),
        "published_at": time.time(), "meta": {}, "hmac_sha256": bank_signature(KEY, "default", 1,
                                                                               synthetic_bank_bytes)}))
    client.sadd(KEYS.banks, "default")
    client.set(KEYS.bank_active("default"), 1)
    registry = BankRegistry(client, KEYS, signing_key=KEY, chunk_bytes=CHUNK, keep_versions=1)
    assert registry.fetch("default", 1) == synthetic_bank_bytes
    assert registry.versions("default")[0].chunks == 1
    assert BankCache(registry, device="cpu").get("default").version == 1  # a worker loads it
    second = registry.publish("default", synthetic_bank_bytes, activate=True)  # v1 becomes the rollback target
    third = registry.publish("default", synthetic_bank_bytes, activate=True)  # v1 is pruned: old layout, deleted
    assert [v.version for v in registry.versions("default")] == [second, third]
    assert not client.exists(KEYS.bank_blob("default", 1))


def test_pruning_deletes_every_chunk(redis_server):
    client = connect(redis_server.url)
    registry = BankRegistry(client, KEYS, chunk_bytes=CHUNK, keep_versions=1)
    sizes = {registry.publish("line", b"%d" % v * (CHUNK * v // 2)): math.ceil(CHUNK * v // 2 / CHUNK)
             for v in range(2, 8)}
    newest = max(sizes)
    assert [v.version for v in registry.versions("line")] == [newest]
    expected = {KEYS.bank_blob("line", newest).encode()} | {
        KEYS.bank_blob_chunk("line", newest, i).encode() for i in range(1, sizes[newest])}
    assert blob_keys(client, "line") == expected  # no chunk of an older version is left


def test_a_publish_cut_off_midway_leaves_no_version_and_no_chunk(redis_server):
    """Redis runs out of memory after a few chunks: the record was never written (no reader sees a half bank), and
    the chunks written are deleted."""
    client = connect(redis_server.url)
    registry = BankRegistry(client, KEYS, chunk_bytes=256 << 10)
    data = bytes(range(256)) * (16 << 12)  # 16 MiB: 64 chunks
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", int(client.info("memory")["used_memory"]) + (2 << 20))
    try:
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            registry.publish("line", data)
    finally:
        client.config_set("maxmemory", 0)
    assert registry.versions("line") == [] and blob_keys(client, "line") == set()
    assert int(client.get(KEYS.bank_counter("line"))) == 1  # the version number it took is not reused
    version = registry.publish("line", data)
    assert version == 2 and registry.fetch("line", version) == data
