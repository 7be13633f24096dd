"""`patchcore drift ack | events | set | settings`: a camera's drifted scene (store.alarms.drift) - acknowledge it
(its alarms flow again; who is recorded in the event and the state), list its events, or set the camera's own
drift settings (window, level, shares, policy: overrides of the store's, picked up live). Torch-free."""
from __future__ import annotations

import json
from typing import Annotated, Optional

import redis
import typer

from contracts.keys import check_camera
from contracts.messages import DriftEvent, MessageError
from runtime import scripts
from runtime.cameras import camera_list
from runtime.control import record as audit
from store.alarms.drift import (EVENTS_LISTED, DriftError, DriftSettings, acknowledge, overrides_from_json,
                                with_overrides)

from ..helptext import Typer
from .common import Connection, connection, fail

SWAP_ATTEMPTS = 5  # read-merge-write rounds of `drift set` before it gives up on a camera whose settings keep changing

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


def _help(name: str) -> str:
    text = DriftSettings.__dataclass_fields__[name].metadata["help"].removeprefix("Drift: ").replace("--drift-", "--")
    return f"This camera's: {text}"


def _stored(raw: bytes | None):
    """A camera's stored overrides as the audit's `before` (refused ones say why)."""
    if raw is None:
        return None
    try:
        return overrides_from_json(raw)
    except ValueError as exc:
        return {"refused": str(exc)}


@drift_app.command("set")
@connection
def drift_set(
    camera: Annotated[str, typer.Argument(help="Camera whose drift settings to set.")],
    window: Annotated[Optional[int], typer.Option(help=_help("window"))] = None,
    quantile: Annotated[Optional[float], typer.Option(help=_help("quantile"))] = None,
    level: Annotated[Optional[float], typer.Option(help=_help("level"))] = None,
    raise_share: Annotated[Optional[float], typer.Option(help=_help("raise_share"))] = None,
    clear_share: Annotated[Optional[float], typer.Option(help=_help("clear_share"))] = None,
    policy: Annotated[Optional[str], typer.Option(help=_help("policy"))] = None,
    delete: Annotated[bool, typer.Option(help="Remove the camera's overrides: the store's settings apply.")] = False,
    conn: Connection = None,
) -> None:
    """Set a camera's own drift settings (those given; the others keep their earlier override or the store's
    value), or --delete them; running stores apply them within a second, from the camera's next results."""
    try:
        check_camera(camera)
    except ValueError as exc:
        fail(str(exc))
    given = {name: value for name, value in (("window", window), ("quantile", quantile), ("level", level),
                                             ("raise_share", raise_share), ("clear_share", clear_share),
                                             ("policy", policy)) if value is not None}
    if delete == bool(given):
        fail("give the settings to change, or --delete (not both)")
    client, keys = conn.client(), conn.keys
    swap = scripts.load(client, "hash_field_swap")
    for _ in range(SWAP_ATTEMPTS):  # read, merge, write if nobody wrote in between (else merge into theirs)
        before = client.hget(keys.drift_settings, camera)
        previous = _stored(before)
        after = None
        if not delete:
            after = {**(previous if previous is not None and "refused" not in previous else {}), **given}
            try:  # checked against the defaults; a store started with other settings checks them again
                with_overrides(DriftSettings(), after)
            except ValueError as exc:
                fail(f"camera {camera}: {exc}")
        if scripts.hash_field_swap(swap, key=keys.drift_settings, field=camera, read=before,
                                   value=None if delete else json.dumps(after, sort_keys=True)):
            break
    else:
        fail(f"camera {camera}: its drift settings kept changing ({SWAP_ATTEMPTS} attempts); try again")
    if not (delete and before is None):  # deleting nothing changed nothing
        audit(client, keys, "drift.delete" if delete else "drift.set", camera, previous, after, camera=camera)
    typer.echo(json.dumps({"camera": camera, "overrides": after, "deleted": delete}))


@drift_app.command("settings")
@connection
def drift_settings(conn: Connection = None) -> None:
    """One JSON line per camera with drift overrides: the overrides as stored (or why a store refuses them)."""
    stored = conn.client().hgetall(conn.keys.drift_settings)
    for camera in sorted(stored):
        typer.echo(json.dumps({"camera": camera.decode(errors="replace"), "overrides": _stored(stored[camera])}))
