"""`patchcore drift ack | events`: a camera's drifted scene (store.alarms.drift) - acknowledge it (its alarms flow
again; who is recorded in the event and the state), or list its events. Torch-free."""
from __future__ import annotations

import json
from typing import Annotated, Optional

import redis
import typer

from contracts.messages import DriftEvent, MessageError
from runtime.cameras import camera_list
from store.alarms.drift import EVENTS_LISTED, DriftError, acknowledge

from ..helptext import Typer
from .common import Connection, connection, fail

app = Typer()
drift_app = Typer(help="A camera whose whole scene drifted: acknowledge it, list the events.", no_args_is_help=True)
app.add_typer(drift_app, name="drift")


def who(client, given: Optional[str]) -> str:
    """Who acknowledges: --by when given, else the Redis user of the connection (ACL WHOAMI)."""
    if given:
        return given
    try:
        name = client.acl_whoami()
    except redis.ResponseError:  # WHOAMI not allowed for this user
        fail("say who acknowledges with --by (ACL WHOAMI is not allowed for this Redis user)")
    return f"redis:{name.decode() if isinstance(name, bytes) else name}"


@drift_app.command("ack")
@connection
def drift_ack(
    camera: Annotated[str, typer.Argument(help="Camera whose drift to acknowledge.")],
    by: Annotated[Optional[str], typer.Option(help="Who acknowledges (recorded; default: the Redis user).")] = None,
    conn: Connection = None,
) -> None:
    """Acknowledge a camera's drift: its defect alarms flow again at once; no new drift is raised until the scene
    has returned (a drift-cleared event)."""
    client = conn.client()
    try:
        event = acknowledge(client, conn.keys, camera, who(client, by))
    except (DriftError, ValueError) as exc:
        fail(f"camera {camera}: {exc}")
    typer.echo(json.dumps({"camera": camera, **event}))


@drift_app.command("events")
@connection
def drift_events(
    camera: Annotated[Optional[str], typer.Option(help="Only this camera's events.")] = None,
    count: Annotated[int, typer.Option(min=1, help="The newest this many per camera.")] = EVENTS_LISTED,
    conn: Connection = None,
) -> None:
    """One JSON line per drift event, per camera oldest first (drift, drift-cleared, drift-acknowledged)."""
    client = conn.client()
    for name in [camera] if camera else camera_list(client, conn.keys.cameras):
        try:
            entries = client.xrevrange(conn.keys.drift(name), count=count)[::-1]
        except ValueError as exc:  # not a camera name
            fail(str(exc))
        for entry_id, fields in entries:
            try:
                event = DriftEvent.unpack(fields.get(b"m", b""))
            except MessageError as exc:
                typer.echo(f"skipped a malformed drift event {entry_id.decode()}: {exc}", err=True)
                continue
            typer.echo(json.dumps({"id": entry_id.decode(), **vars(event)}))
