"""Banks: HMAC-SHA256 signatures (a key only operators hold), blob retention, the bootstrap build. Real redis-server."""
import hashlib
import json
import logging

import pytest
from typer.testing import CliRunner

from runtime.connection import connect
from contracts.keys import Keys
from workers.banks.registry import BankRegistry, RegistryError, bank_signature, load_signing_key
from patchcore.cli import app
from workers.banks.cache import BankCache

KEYS = Keys()
KEY = b"k" * 32
OTHER_KEY = b"o" * 32


def refusals(caplog) -> list[str]:
    return [r.fields["error"] for r in caplog.records if r.getMessage().startswith("bank refused")]


def test_a_worker_with_a_key_refuses_unsigned_wrongly_signed_and_tampered_banks(redis_server, synthetic_bank_bytes,
                                                                                 caplog):
    client = connect(redis_server.url)
    operator = BankRegistry(client, KEYS, signing_key=KEY, keep_versions=10)
    cache = BankCache(BankRegistry(client, KEYS, signing_key=KEY), device="cpu")
    good = operator.publish("default", synthetic_bank_bytes, activate=True)
    assert cache.get("default").version == good

    unsigned = BankRegistry(client, KEYS, keep_versions=10).publish("default", synthetic_bank_bytes)
    wrong_key = BankRegistry(client, KEYS, signing_key=OTHER_KEY, keep_versions=10).publish("default",
                                                                                              synthetic_bank_bytes)
    tampered = operator.publish("default", synthetic_bank_bytes)  # then altered by a Redis writer without the key,
    client.setrange(KEYS.bank_blob("default", tampered), 200, b"!")  # who also recomputes the sha256
    altered = synthetic_bank_bytes[:200] + b"!" + synthetic_bank_bytes[201:]  # (bank_blob is its first chunk)
    record = json.loads(client.hget(KEYS.bank_versions("default"), tampered))
    client.hset(KEYS.bank_versions("default"), tampered,
                json.dumps({**record, "sha256": hashlib.sha256(altered).hexdigest()}))
    moved = operator.publish("default", synthetic_bank_bytes)  # a valid signature, copied to another version
    record = json.loads(client.hget(KEYS.bank_versions("default"), good))
    client.hset(KEYS.bank_versions("default"), moved, json.dumps(record))

    with caplog.at_level(logging.ERROR, logger="patchcore.worker"):
        for version in (unsigned, wrong_key, tampered, moved):
            operator.activate("default", version)
            served = cache.get("default")
            assert served is not None and served.version == good  # the active bank keeps serving
    reasons = refusals(caplog)
    assert len(reasons) == 4
    assert "is unsigned" in reasons[0]
    assert all("signature does not match" in reason for reason in reasons[1:])
    assert KEY.decode() not in caplog.text and OTHER_KEY.decode() not in caplog.text

    # without a key all four load (the sha256 proves nothing against a writer): the refusals are the signature's
    unkeyed = BankRegistry(client, KEYS)
    assert unkeyed.fetch("default", unsigned) == unkeyed.fetch("default", wrong_key) == synthetic_bank_bytes
    assert unkeyed.fetch("default", moved) == synthetic_bank_bytes
    assert unkeyed.fetch("default", tampered) == altered != synthetic_bank_bytes


def test_the_signature_covers_name_version_and_bytes():
    data = b"bank bytes"
    reference = bank_signature(KEY, "default", 1, data)
    assert reference == bank_signature(KEY, "default", 1, data)
    assert len({reference, bank_signature(KEY, "other", 1, data), bank_signature(KEY, "default", 2, data),
                bank_signature(KEY, "default", 1, data + b"!"), bank_signature(OTHER_KEY, "default", 1, data)}) == 5


def test_signing_key_files(tmp_path):
    short = tmp_path / "short.key"
    short.write_text("too short\n")
    with pytest.raises(RegistryError, match="at least 32"):
        load_signing_key(short)
    with pytest.raises(RegistryError, match="cannot read"):
        load_signing_key(tmp_path / "missing.key")
    good = tmp_path / "bank.key"
    good.write_text("ab" * 32 + "\n")
    assert load_signing_key(good) == b"ab" * 32


def test_bank_publish_signs_with_the_key_file_and_never_prints_it(redis_server, synthetic_bank_bytes, tmp_path,
                                                                 monkeypatch):
    bank, key = tmp_path / "a.bank", tmp_path / "bank.key"
    bank.write_bytes(synthetic_bank_bytes)
    secret = "f0" * 32
    key.write_text(secret + "\n")
    url = redis_server.url
    runner = CliRunner()
    signed = runner.invoke(app, ["bank", "publish", str(bank), "--name", "line1", "--activate",
                                 "--signing-key-file", str(key), "--redis-url", url])
    assert signed.exit_code == 0, signed.output
    assert json.loads(signed.output)["signed"] is True and secret not in signed.output
    monkeypatch.setenv("PATCHCORE_BANK_KEY_FILE", str(key))  # the environment names the same file
    assert json.loads(runner.invoke(app, ["bank", "publish", str(bank), "--name", "line1",
                                          "--redis-url", url]).output)["signed"] is True
    monkeypatch.delenv("PATCHCORE_BANK_KEY_FILE")
    assert json.loads(runner.invoke(app, ["bank", "publish", str(bank), "--name", "line1",
                                          "--redis-url", url]).output)["signed"] is False
    listing = runner.invoke(app, ["bank", "list", "--redis-url", url]).output
    assert "line1 v1" in listing and listing.count(" signed ") == 2 and listing.count(" unsigned ") == 1
    client = connect(url)
    verifier = BankRegistry(client, KEYS, signing_key=secret.encode())
    assert verifier.fetch("line1", 1) == verifier.fetch("line1", 2) == synthetic_bank_bytes
    with pytest.raises(RegistryError, match="unsigned"):
        verifier.fetch("line1", 3)
    short = tmp_path / "short.key"
    short.write_text("x")
    refused = runner.invoke(app, ["bank", "publish", str(bank), "--name", "line1", "--signing-key-file", str(short),
                                  "--redis-url", url])
    assert refused.exit_code == 2 and "at least 32" in refused.output
    assert [v.version for v in BankRegistry(client, KEYS).versions("line1")] == [1, 2, 3]  # nothing published


def test_publishing_keeps_the_newest_k_blobs_the_active_one_and_the_rollback_target(redis_server):
    client = connect(redis_server.url)
    registry = BankRegistry(client, KEYS, keep_versions=2)

    def blobs() -> list[int]:
        return sorted(v for v in range(1, 20) if client.exists(KEYS.bank_blob("line", v)))

    assert registry.publish("line", b"v1", activate=True) == 1
    assert registry.publish("line", b"v2", activate=True) == 2  # v1 becomes the rollback target
    for data in (b"v3", b"v4", b"v5"):
        registry.publish("line", data)
    assert blobs() == [1, 2, 4, 5]  # newest two, active v2, rollback target v1; v3 deleted
    assert [v.version for v in registry.versions("line")] == [1, 2, 4, 5]  # its record too
    with pytest.raises(RegistryError, match="no version 3"):
        registry.activate("line", 3)
    registry.activate("line", 4)  # history: 1, 2
    registry.publish("line", b"v6")
    registry.publish("line", b"v7")
    assert blobs() == [2, 4, 6, 7]  # v1 is no longer the rollback target (v2 is), v5 is old
    assert client.lrange(KEYS.bank_history("line"), 0, -1) == [b"2"]  # rollback never lands on a deleted version
    assert registry.rollback("line") == 2 and registry.fetch("line", 2) == b"v2"
    with pytest.raises(RegistryError, match="no earlier"):
        registry.rollback("line")
    with pytest.raises(RegistryError, match="at least 1"):
        BankRegistry(client, KEYS, keep_versions=0)


def test_bank_publish_keep_option(redis_server, synthetic_bank_bytes, tmp_path):
    bank = tmp_path / "a.bank"
    bank.write_bytes(synthetic_bank_bytes)
    for _ in range(3):
        result = CliRunner().invoke(app, ["bank", "publish", str(bank), "--name", "n", "--keep", "1",
                                          "--redis-url", redis_server.url])
        assert result.exit_code == 0, result.output
    assert [v.version for v in BankRegistry(connect(redis_server.url), KEYS).versions("n")] == [3]


def test_bank_build_from_the_synthetic_lines_first_frames(tmp_path, mobilenet):
    """What compose's one-shot bank-init runs when no folder of good images is mounted."""
    from scorer import load_bank

    out = tmp_path / "warm.bank"
    built = CliRunner().invoke(app, ["bank", "build", "--warmup-source", "synthetic", "--warmup-frames", "8",
                                     "--backbone", "mobilenet_v2", "--folds", "4", "--device", "cpu",
                                     "--no-progress", "--out", str(out)])
    assert built.exit_code == 0, built.output
    bank = load_bank(out)
    assert bank.calibration is not None and len(bank.calibration.good_scores) == 8  # every frame, by 4 contiguous folds
    for args in ([], ["--train", str(tmp_path), "--warmup-source", "synthetic"]):
        refused = CliRunner().invoke(app, ["bank", "build", "--out", str(tmp_path / "x.bank"), *args])
        assert refused.exit_code == 2 and "either --train or --warmup-source" in refused.output
