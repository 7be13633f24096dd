"""Operator commands against a real redis-server: bank publish/list/activate/rollback, rule, status."""
import json

from typer.testing import CliRunner

from runtime.connection import connect
from contracts.keys import Keys
from workers.banks.registry import BankRegistry
from patchcore.cli import app

KEYS = Keys()


def cli(url, *args):
    result = CliRunner().invoke(app, [*args, "--redis-url", url])
    assert result.exit_code == 0, result.output
    return result.output


def test_bank_registry_commands(redis_server, synthetic_bank_bytes, tmp_path):
    bank = tmp_path / "a.bank"
    bank.write_bytes(synthetic_bank_bytes)
    url = redis_server.url
    assert json.loads(cli(url, "bank", "publish", str(bank), "--name", "line1", "--activate"))["version"] == 1
    assert json.loads(cli(url, "bank", "publish", str(bank), "--name", "line1"))["version"] == 2
    listing = cli(url, "bank", "list")
    assert "* line1 v1" in listing and "  line1 v2" in listing and "mobilenet_v2" in listing
    cli(url, "bank", "activate", "line1", "2")
    assert "* line1 v2" in cli(url, "bank", "list")
    assert json.loads(cli(url, "bank", "rollback", "line1"))["active"] == 1
    refused = CliRunner().invoke(app, ["bank", "rollback", "line1", "--redis-url", url])
    assert refused.exit_code == 2 and "no earlier active version" in refused.output
    corrupt = tmp_path / "bad.bank"
    corrupt.write_bytes(synthetic_bank_bytes[:-10])
    refused = CliRunner().invoke(app, ["bank", "publish", str(corrupt), "--name", "line1", "--redis-url", url])
    assert refused.exit_code == 2 and "truncated or corrupt" in refused.output
    assert [v.version for v in BankRegistry(connect(url)).versions("line1")] == [1, 2]  # nothing published


def test_status_reports_cameras_workers_banks_and_redacts_passwords(redis_server):
    client = connect(redis_server.url)
    client.sadd(KEYS.cameras, "cam-1")
    client.hset(KEYS.camera_stats("cam-1"), mapping={"last_seq": 41, "ingested": 42, "results": 40, "dropped": 1,
                                                      "deadlettered": 1, "state": "running"})
    client.xadd(KEYS.frames("cam-1"), {"m": b"x"})
    client.hset(KEYS.workers, "w1", 0)
    status = json.loads(cli(redis_server.url, "status", "--json"))
    cam = status["cameras"][0]
    assert (cam["camera"], cam["last_seq"], cam["ingested"], cam["results"], cam["dropped"], cam["deadlettered"],
            cam["backlog"]) == ("cam-1", 41, 42, 40, 1, 1, 1)
    assert "w1" in status["workers"]
    from runtime.connection import redacted

    assert redacted("redis://user:s3cret@host:6380/0") == "redis://user:***@host:6380/0"


def test_alarm_rule_override(redis_server):
    cli(redis_server.url, "rule", "cam-7", "--k", "1", "--n", "1", "--threshold", "3.5")
    stored = json.loads(connect(redis_server.url).hget(KEYS.alarm_rules, "cam-7"))
    assert stored == {"k": 1, "n": 1, "cooldown_s": 10.0, "threshold": 3.5}
    bad = CliRunner().invoke(app, ["rule", "cam-7", "--k", "4", "--n", "3", "--redis-url", redis_server.url])
    assert bad.exit_code == 2 and "k <= n" in bad.output
