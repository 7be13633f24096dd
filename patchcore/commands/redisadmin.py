"""`patchcore redis load-functions | cameras`: what an operator (or the deploy tooling) does to a Redis before the
services start: load the Redis Functions library the services call (runtime.scripts), and register cameras with
their limits (runtime.cameras). The service roles of deploy/redis/users.acl may do neither. Torch-free."""
from __future__ import annotations

import json
from typing import Annotated

import redis
import typer

from contracts.keys import check_camera
from runtime import scripts
from runtime.cameras import CameraLimits, register_camera

from ..helptext import Typer
from ..options import settings_options
from .common import Connection, connection, fail

app = Typer()
redis_app = Typer(help="Prepare a Redis for the service (an operator's rights): functions, cameras.",
                  no_args_is_help=True)
app.add_typer(redis_app, name="redis")


@redis_app.command("load-functions")
@connection
def load_functions(prune: Annotated[bool, typer.Option(
        "--prune", help="Delete the other versions of the library (after every process runs this version).")] = False,
        conn: Connection = None) -> None:
    """Load this version's Redis Functions library (runtime/lua/*.lua) on the server, or on every primary of a
    cluster; a version already loaded is left alone. Prints the library and what was done on each primary."""
    client = conn.client()
    try:
        done = scripts.load_library(client, prune=prune)
    except redis.exceptions.NoPermissionError as exc:
        fail(f"this Redis user may not load functions (FUNCTION LOAD is the operator's): {exc}")
    library = scripts.library()
    typer.echo(json.dumps({"library": library.name, "functions": [library.function(n) for n in scripts.names()],
                           "primaries": {label or "server": what for label, what in done.items()}}))


@redis_app.command("cameras")
@settings_options(CameraLimits, "max_entry_bytes", "max_stream_len", into="limits",
                  options={"max_entry_bytes": {"min": 1}, "max_stream_len": {"min": 1}})
@connection
def cameras(names: Annotated[list[str], typer.Argument(help="Camera names (those with a camera-<name> user).")],
            limits: dict = None, conn: Connection = None) -> None:
    """Register cameras: write each one's limits (what its add_frame may write) and add it to the camera set.
    A camera credential may do neither; run again to change the limits."""
    try:
        checked = [check_camera(name) for name in names]
    except ValueError as exc:
        fail(str(exc))
    settings = CameraLimits(**limits)
    client = conn.client()
    try:
        for name in checked:
            register_camera(client, conn.keys, name, settings)
    except redis.exceptions.NoPermissionError as exc:
        fail(f"this Redis user may not register cameras (an operator's step): {exc}")
    typer.echo(json.dumps({"registered": checked, **limits}))
