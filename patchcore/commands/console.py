"""`patchcore console | console hash-password`: the operator console in the browser (console.app, console.auth),
its options the fields of ConsoleSettings. Torch-free."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from console.app import ConsoleError, ConsoleServer, ConsoleSettings
from console.auth import USER, CredentialsError, hash_password

from ..helptext import Typer
from ..options import settings_options
from .common import Connection, connection, console_credentials, fail

app = Typer()
console_app = Typer(help="The operator console in the browser: cameras, alarms, banks, dead letters.")
app.add_typer(console_app, name="console")
ConsoleCredentials = Annotated[Optional[Path], typer.Option(
    "--credentials", envvar="PATCHCORE_CONSOLE_CREDENTIALS",
    help="Operator credentials (`user:hash` lines from `patchcore console hash-password`); without it: read-only.")]

AllowedHosts = Annotated[Optional[list[str]], typer.Option(  # a list: repeatable (the field is a tuple)
    "--allowed-host", help=ConsoleSettings.__dataclass_fields__["allowed_hosts"].metadata["help"])]


@console_app.callback(invoke_without_command=True)
@settings_options(ConsoleSettings, "host", "port", "max_body_bytes", "login_failures_per_user",
                  "login_failures_per_client", "login_window_s", "lockout_s", into="console")
@connection
def console_command(ctx: typer.Context, console: dict = None, credentials: ConsoleCredentials = None,
                    allowed_host: AllowedHosts = None, conn: Connection = None) -> None:
    """Serve the console until Ctrl-C: read-only for everyone, actions for logged-in operators."""
    if ctx.invoked_subcommand is not None:
        return
    settings = ConsoleSettings(**console, credentials=console_credentials(credentials),
                               allowed_hosts=tuple(allowed_host) if allowed_host else None)
    try:
        server = ConsoleServer(conn.client(), conn.keys, settings).start()  # listening before it says so
    except ConsoleError as exc:  # the port in use, say
        fail(str(exc))
    typer.echo(f"console at {settings.url} ({'operators can log in' if settings.credentials else 'read-only'})")
    server.serve()


@console_app.command("hash-password")
def console_hash_password(
    user: Annotated[str, typer.Option(help="Operator name.")] = "operator",
) -> None:
    """Print a `user:hash` line (scrypt) for the console's credentials file; the password is asked twice, not echoed."""
    if not USER.match(user):
        fail("an operator name has 1-64 letters, digits or _ . @ -")
    password = typer.prompt("password", hide_input=True, confirmation_prompt=True, err=True)
    try:
        typer.echo(f"{user}:{hash_password(password)}")
    except CredentialsError as exc:
        fail(str(exc))
