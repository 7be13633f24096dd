"""What the command modules share: a clear error exit, the Redis connection options (declared once, here),
signal handling, the metrics endpoint, signing keys and alarm rules.

Torch-free, like every module `patchcore status` and the services beside cameras load: the one import of the
scorer (search_config's) is inside its function."""
from __future__ import annotations

import contextlib
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Optional

import typer

from console.auth import CredentialsError, load_credentials
from contracts.keys import Keys
from runtime.cameras import CameraNotRegisteredError
from runtime.connection import connect
from runtime.scripts import FunctionsMissingError
from runtime.health import serve_process
from store.alarms.rules import AlarmRule
from workers.banks.registry import RegistryError, load_signing_key

from ..options import settings_options


def fail(message: str) -> None:
    """Exit 2 with `error: message` on stderr (bad input, a missing file, a refused bank...)."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@contextlib.contextmanager
def service_errors():
    """A service that may not prepare Redis itself (the Functions library, its camera's registration) exits with
    the error that names the operator's command, not a traceback."""
    try:
        yield
    except (FunctionsMissingError, CameraNotRegisteredError) as exc:
        fail(str(exc))


@dataclass(frozen=True)
class Connection:
    """Where the service's Redis is and how its keys are named: the options of every command that needs Redis.
    TLS is the URL's scheme (rediss://)."""

    redis_url: str | None = field(default=None, metadata={
        "help": "redis:// or rediss:// URL (default: $REDIS_URL).", "envvar": "REDIS_URL"})
    password_file: Path | None = field(default=None, metadata={
        "help": "File holding the Redis password (never logged).", "envvar": "REDIS_PASSWORD_FILE"})
    prefix: str = field(default=Keys.prefix, metadata={"help": "Prefix of every Redis key and channel."})

    @property
    def keys(self) -> Keys:
        return Keys(self.prefix)

    def client(self):
        """A client of the URL (or $REDIS_URL, or the local default), with the password file's password."""
        return connect(self.redis_url, self.password_file)


# --redis-url, --password-file and --prefix; the command receives them as its parameter `conn`, a Connection
connection = settings_options(Connection, "redis_url", "password_file", "prefix", into="conn", make=Connection)


METRICS_OFF = 0  # the default --metrics-port: no endpoint
MetricsPort = Annotated[int, typer.Option(envvar="PATCHCORE_METRICS_PORT", min=0, max=65535, help=(
    "Serve Prometheus /metrics, /healthz and /readyz on this port (0: off)."))]
SigningKeyFile = Annotated[Optional[Path], typer.Option(
    envvar="PATCHCORE_BANK_KEY_FILE", help="File holding the bank signing key (HMAC-SHA256, >= 32 bytes; never logged).")]
Search = Annotated[Optional[str], typer.Option(
    help="Nearest-neighbour search: auto (ivf on the CPU, half on CUDA), exact, subspace, half, ivf or hnsw "
         "(shortlists re-ranked exactly).")]
Progress = Annotated[bool, typer.Option(help="Show progress bars.")]


def serve_metrics(port: int, client, ready, keys=None) -> None:
    """/metrics, /healthz and /readyz on `port`, unless 0 (runtime.health.serve_process)."""
    try:
        serve_process(port, client, ready, keys)
    except OSError as exc:
        fail(f"cannot serve metrics on port {port}: {exc}")


def stop_on_signals():
    """An event set by SIGINT or SIGTERM: services finish what they hold and exit."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def signing_key(path: Optional[Path]) -> Optional[bytes]:
    try:
        return load_signing_key(path) if path else None
    except RegistryError as exc:
        fail(str(exc))


def rule_options(defaults):
    """--k, --n, --cooldown-s and --threshold with the defaults of the AlarmRule `defaults` (the store's default
    rule, or `up`'s); the command receives them as its parameter `rule` (a dict, for alarm_rule)."""
    return settings_options(defaults, "k", "n", "cooldown_s", "threshold", into="rule")


def alarm_rule(values: dict):
    """An AlarmRule from the k/n/cooldown_s/threshold options; out-of-range values are a clear error."""
    try:
        return AlarmRule(**values)
    except ValueError as exc:
        fail(str(exc))


def search_config(method: Optional[str], index: str):
    """The scorer's search settings: its defaults, with --search's method when given (checked against --index)."""
    from scorer.index import IndexError_, SearchConfig, check_engine

    try:
        config = SearchConfig() if method is None else SearchConfig.named(method)
        check_engine(config, index)
    except IndexError_ as exc:
        fail(str(exc))
    return config


def console_credentials(path) -> Optional[dict]:
    if not path:
        return None
    try:
        return load_credentials(path)
    except CredentialsError as exc:
        fail(str(exc))
