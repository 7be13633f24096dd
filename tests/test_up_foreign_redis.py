"""`patchcore up` on a Redis it did not start (--redis-url or REDIS_URL) never publishes over or activates an
existing bank unless told to (--force, or a distinct --bank-name). Real redis-server."""
import json

from typer.testing import CliRunner

from runtime.connection import connect
from contracts.keys import Keys
from workers.banks.registry import BankRegistry
from patchcore.cli import app
from patchcore.embedded_redis import EmbeddedRedis

KEYS = Keys()


def test_up_leaves_a_foreign_redis_bank_alone_unless_told(tmp_path, synthetic_bank_bytes):
    bank = tmp_path / "demo.bank"
    bank.write_bytes(synthetic_bank_bytes)
    with EmbeddedRedis(extra_args=["--requirepass", "prod-secret"]) as server:
        url = f"redis://:prod-secret@127.0.0.1:{server.port}/0"
        client = connect(url)
        production = BankRegistry(client, KEYS).publish("default", synthetic_bank_bytes, activate=True)
        runner = CliRunner()
        up = ["up", "--bank", str(bank), "--frames", "4", "--no-progress"]
        for refused in (runner.invoke(app, [*up, "--redis-url", url]),
                        runner.invoke(app, up, env={"REDIS_URL": url})):  # the environment alone must not do it
            assert refused.exit_code == 2, refused.output
            assert "bank 'default' already exists" in refused.output and "--force" in refused.output
            assert "--bank-name" in refused.output and "prod-secret" not in refused.output
        registry = BankRegistry(client, KEYS)
        assert [v.version for v in registry.versions("default")] == [production]
        assert registry.active("default") == production and client.scard(KEYS.cameras) == 0  # nothing touched

        beside = runner.invoke(app, [*up, "--redis-url", url, "--bank-name", "demo", "--json", str(tmp_path / "a.json")])
        assert beside.exit_code == 0, beside.output
        assert json.loads((tmp_path / "a.json").read_text())["results_out"] == 4
        assert registry.active("default") == production and registry.active("demo") == 1

        forced = runner.invoke(app, [*up, "--redis-url", url, "--force"])
        assert forced.exit_code == 0, forced.output
        assert registry.active("default") == production + 1  # told to: published and activated
