"""`patchcore status | alarms | alarm dismiss | rule | deadletter`: operating the running service (runtime.status,
store.alarms, runtime.deadletter). Torch-free: `patchcore status` starts without loading torch."""
from __future__ import annotations

import json
from typing import Annotated, Optional
from pathlib import Path

import typer

from contracts.messages import Alarm, MessageError
from runtime.connection import redacted, redis_url
from runtime.control import record as audit
from runtime.deadletter import LIST_COUNT, DeadLetterError, DeadLetters
from runtime.status import DEAD_AFTER_S, PRUNE_AFTER_S, collect_status, prune_dead
from store.alarms.dismiss import DismissError, dismiss_alarm
from store.alarms.rules import AlarmRule

from ..helptext import Typer
from .common import Connection, alarm_rule, connection, fail, rule_options, stop_on_signals

app = Typer()
alarm_app = Typer(help="Act on alarms: dismiss a false alarm.", no_args_is_help=True)
app.add_typer(alarm_app, name="alarm")
deadletter_app = Typer(help="Frames that got no result: list, replay onto their camera's stream, purge.",
                       no_args_is_help=True)
app.add_typer(deadletter_app, name="deadletter")


@app.command("rule")
@rule_options(AlarmRule)
@connection
def rule_command(
    target: Annotated[str, typer.Argument(help="Camera name, or line:<name> for a whole line.")],
    rule: dict = None,
    delete: Annotated[bool, typer.Option(help="Remove the override.")] = False,
    conn: Connection = None,
) -> None:
    """Set (or --delete) the alarm rule of a camera or line; stores pick it up within seconds."""
    client, keys = conn.client(), conn.keys
    after = None if delete else alarm_rule(rule)
    with client.pipeline(transaction=True) as pipe:
        pipe.hget(keys.alarm_rules, target)
        if delete:
            pipe.hdel(keys.alarm_rules, target)
        else:
            pipe.hset(keys.alarm_rules, target, after.to_json())
        before = pipe.execute()[0]
    if not (delete and before is None):  # deleting nothing changed nothing
        audit(client, keys, "rule.delete" if delete else "rule.set", target, _rule_state(before),
              None if after is None else json.loads(after.to_json()),
              camera="" if target.startswith("line:") else target)
    typer.echo(json.dumps({"target": target, "deleted": delete}))


def _rule_state(stored: bytes | None):
    """A stored rule as the audit's `before` (refused ones say why)."""
    if stored is None:
        return None
    try:
        return json.loads(AlarmRule.from_json(stored).to_json())
    except ValueError as exc:
        return {"refused": str(exc)}


@alarm_app.command("dismiss")
@connection
def alarm_dismiss(
    camera: Annotated[str, typer.Argument(help="Camera of the alarm.")],
    seq: Annotated[int, typer.Argument(help="Sequence number of the alarmed frame.")],
    conn: Connection = None,
) -> None:
    """Mark an alarm as a false alarm: its frame is queued as good for the next `patchcore bank update`."""
    try:
        bank = dismiss_alarm(conn.client(), conn.keys, camera, seq)
    except DismissError as exc:
        fail(str(exc))
    typer.echo(json.dumps({"camera": camera, "seq": seq, "dismissed": True, "queued_for_bank": bank}))


@app.command("alarms")
@connection
def alarms_command(
    count: Annotated[Optional[int], typer.Option(help="Exit after this many alarms.")] = None,
    save_overlays: Annotated[Optional[Path], typer.Option(help="Write each alarm's heatmap JPEG here.")] = None,
    conn: Connection = None,
) -> None:
    """Tail live alarms from Pub/Sub, one JSON line each (as any subscriber would)."""
    stop = stop_on_signals()
    pubsub = conn.client().pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(conn.keys.alarms_channel)
    seen = 0
    while not stop.is_set() and (count is None or seen < count):
        message = pubsub.get_message(timeout=0.5)
        if message is None:
            continue
        try:
            alarm = Alarm.unpack(message["data"])
        except MessageError as exc:  # someone else's malformed message: reported, not fatal
            typer.echo(f"skipped a malformed alarm: {exc}", err=True)
            continue
        line = {k: v for k, v in vars(alarm).items() if k != "overlay_jpeg"}
        if save_overlays and alarm.overlay_jpeg:
            save_overlays.mkdir(parents=True, exist_ok=True)
            target = save_overlays / f"{alarm.camera}_{alarm.seq}.jpg"
            target.write_bytes(alarm.overlay_jpeg)
            line["overlay_file"] = str(target)
        typer.echo(json.dumps(line), nl=True)
        seen += 1


@app.command("status")
@connection
def status_command(
    json_output: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    dead_after_s: Annotated[float, typer.Option(help="Mark a consumer dead when idle (and, a worker, without a "
                                                     "heartbeat) this long.")] = DEAD_AFTER_S,
    prune: Annotated[bool, typer.Option(help="Delete consumers dead for --prune-after-s that hold no pending "
                                             "frames (XGROUP DELCONSUMER; operator role).")] = False,
    prune_after_s: Annotated[float, typer.Option(help="With --prune: dead this long.")] = PRUNE_AFTER_S,
    conn: Connection = None,
) -> None:
    """Per camera: last sequence ingested, results, lag, pending, dropped, dead-lettered; consumers (dead ones
    marked); dead letters by reason; active banks."""
    client = conn.client()
    pruned = prune_dead(client, conn.prefix, prune_after_s) if prune else []
    status = collect_status(client, conn.prefix, dead_after_s)
    status["redis"] = redacted(redis_url(conn.redis_url))
    status["pruned"] = pruned
    if json_output:
        typer.echo(json.dumps(status, indent=2))
        return
    typer.echo(f"redis {status['redis']}")
    for cam in status["cameras"]:
        typer.echo(f"camera {cam['camera']}: last_seq {cam['last_seq']}  ingested {cam['ingested']}  results "
                   f"{cam['results']}  lag {cam['lag']}  pending {cam['pending']}  backlog {cam['backlog']}  dropped {cam['dropped']}  "
                   f"dead-lettered {cam['deadlettered']}  alarms {cam['alarms']}  state: {cam['state']}"
                   + ("  LATE: " + " ".join(f"{k} {v}" for k, v in sorted(cam["late"].items())) if cam["late"] else "")
                   + (f"  sequence restarts: {cam['sequence_restarts']}" if cam["sequence_restarts"] else "")
                   + drift_line(cam["drift"])
                   + (f"  FAULT: {cam['fault']}" if cam["fault"] else ""))
    if status["refused_camera_names_count"]:
        typer.echo(f"camera set: {status['refused_camera_names_count']} members refused (no camera name; skipped "
                   f"by every process): " + " ".join(status["refused_camera_names"]))
    for fault in status["redis_faults"]:
        typer.echo(f"redis FAULT: {fault}")
    for worker, seen in status["workers"].items():
        typer.echo(f"worker {worker}: seen {seen:.0f} s ago")
    for row in status["consumers"]:
        typer.echo(f"consumer {row['group']}/{row['name']}: idle {row['idle_s']:.0f} s  pending {row['pending']}"
                   + ("  DEAD" if row["dead"] else ""))
    for name in pruned:
        typer.echo(f"pruned consumer {name}")
    for row in status["sinks"]:
        typer.echo(f"sink {row['sink']}/{row['consumer']}: {row['state'].upper() if row['state'] != 'ok' else 'ok'}  "
                   f"{row['destination']}  pending {row['pending']}  delivered {row['delivered']}  dead-lettered "
                   f"{row['deadlettered']}" + (f"  last error: {row['last_error']}" if row["last_error"] else ""))
    if status["deadletter_reasons"]:
        typer.echo("dead letters: " + "  ".join(f"{kind} {n}" for kind, n in sorted(status["deadletter_reasons"].items())))
    for bank, version in status["banks"].items():
        typer.echo(f"bank {bank}: active v{version}")


def drift_line(drift: dict) -> str:
    """The camera's drift in `patchcore status`: while drifted, or acknowledged and not yet back, and held alarms."""
    held = f" ({drift['held']} alarms held in all)" if drift["held"] else ""
    if drift["status"] == "drift":
        return f"  DRIFT since seq {drift['since_seq']}: alarms held until `patchcore drift ack` or the scene returns{held}"
    if drift["status"] == "acknowledged":
        return f"  drift since seq {drift['since_seq']} acknowledged by {drift['acknowledged_by']}{held}"
    return f"  drift: none{held}" if drift["held"] else ""


Ids = Annotated[Optional[list[str]], typer.Argument(help="Dead-letter ids (from `deadletter list`).")]
CameraFilter = Annotated[Optional[str], typer.Option(help="Only this camera's dead letters.")]
All = Annotated[bool, typer.Option("--all", help="Every dead letter (of --camera, if given).")]


def selected(letters: DeadLetters, ids, camera, all_):
    if not ids and not all_:
        fail("name dead-letter ids, or --all (with --camera to limit it)")
    try:
        return letters.select(ids or [], camera)
    except DeadLetterError as exc:
        fail(str(exc))


@deadletter_app.command("list")
@connection
def deadletter_list(camera: CameraFilter = None,
                    count: Annotated[int, typer.Option(help="The newest this many.")] = LIST_COUNT,
                    conn: Connection = None) -> None:
    """One JSON line per dead letter, oldest first: id, camera, reason, size, whether it can be replayed."""
    for letter in DeadLetters(conn.client(), conn.keys).list(camera, count):
        typer.echo(json.dumps({"id": letter.id, "camera": letter.camera, "entry_id": letter.entry_id,
                               "reason": letter.reason, "worker": letter.worker, "at": letter.at, "size": letter.size,
                               "replayable": letter.payload_id is not None}))


@deadletter_app.command("replay")
@connection
def deadletter_replay(ids: Ids = None, camera: CameraFilter = None, all_: All = False, conn: Connection = None) -> None:
    """Put the original bytes back on the camera's stream (once) and remove the dead letter."""
    letters = DeadLetters(conn.client(), conn.keys)
    outcome = letters.replay(selected(letters, ids, camera, all_))
    typer.echo(json.dumps({k: len(v) for k, v in outcome.items()}))
    if outcome["no_payload"]:
        typer.echo(f"not replayable (bytes not kept or expired): {' '.join(outcome['no_payload'])}", err=True)


@deadletter_app.command("purge")
@connection
def deadletter_purge(ids: Ids = None, camera: CameraFilter = None, all_: All = False, conn: Connection = None) -> None:
    """Delete dead letters and their kept bytes."""
    letters = DeadLetters(conn.client(), conn.keys)
    typer.echo(json.dumps({"purged": letters.purge(selected(letters, ids, camera, all_))}))
