"""`patchcore bank publish | list | activate | rollback`: the bank registry in Redis (workers.banks.registry).
Torch-free: the scorer is imported only by `publish`, which checks the file the way a worker would."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from workers.banks.registry import BankRegistry, RegistryError

from ..helptext import Typer
from .common import Connection, SigningKeyFile, connection, fail, signing_key

app = Typer()  # the commands of `patchcore bank` defined here (patchcore/cli.py makes the group)


def registry(conn: Connection, signing_key_file: Optional[Path] = None, **settings) -> BankRegistry:
    return BankRegistry(conn.client(), conn.keys, signing_key=signing_key(signing_key_file), **settings)


@app.command("publish")
@connection
def bank_publish(
    bank: Annotated[Path, typer.Argument(help="Bank file to publish.")],
    name: Annotated[str, typer.Option(help="Bank name cameras refer to.")],
    activate: Annotated[bool, typer.Option(help="Make it the active version at once.")] = False,
    signing_key_file: SigningKeyFile = None,
    keep: Annotated[int, typer.Option(min=1, help="Keep the newest KEEP versions of NAME (and the active one and the "
                                                  "rollback target); older ones are deleted.")] = BankRegistry.KEEP_VERSIONS,
    conn: Connection = None,
) -> None:
    """Store a bank file in the registry (bytes + sha256, signed with the key) as a new version of NAME."""
    from scorer import BankError, bank_from_bytes
    from scorer.evaluate import bank_summary

    data = bank.read_bytes()
    try:
        summary = bank_summary(bank_from_bytes(data))  # never publish a file a worker would refuse
    except BankError as exc:
        fail(f"{bank}: {exc}")
    published = registry(conn, signing_key_file, keep_versions=keep)
    version = published.publish(name, data, {"file": bank.name, **summary}, activate)
    typer.echo(json.dumps({"name": name, "version": version, "active": activate, "signed": published.verifies}))


@app.command("list")
@connection
def bank_list(conn: Connection = None) -> None:
    """Banks in the registry with their versions; * marks the active one."""
    banks = registry(conn)
    for name in banks.names():
        active = banks.active(name)
        for v in banks.versions(name):
            mark = "*" if v.version == active else " "
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(v.published_at))
            typer.echo(f"{mark} {name} v{v.version}  {v.size / 1e6:.1f} MB  sha256 {v.sha256[:12]}  "
                       f"{'signed' if v.signed else 'unsigned'}  {when}Z  {v.meta.get('features', {}).get('backbone', '')}")


@app.command("activate")
@connection
def bank_activate(name: str, version: int, conn: Connection = None) -> None:
    """Make VERSION of NAME active; workers switch between batches."""
    try:
        registry(conn).activate(name, version)
    except RegistryError as exc:
        fail(str(exc))
    typer.echo(json.dumps({"name": name, "active": version}))


@app.command("rollback")
@connection
def bank_rollback(name: str, conn: Connection = None) -> None:
    """Re-activate the version that was active before the current one."""
    try:
        version = registry(conn).rollback(name)
    except RegistryError as exc:
        fail(str(exc))
    typer.echo(json.dumps({"name": name, "active": version}))
