"""`patchcore camera set | show | reset` and `patchcore audit`: per-camera sensitivity and region of interest
(contracts/control.py, stored through runtime/control.py, applied by workers within a batch) and the audit trail of
every change to what alarms or what is kept. Torch-free.

The sensitivity and region options are shared with `patchcore score` (`camera_settings_options`), so an offline
score applies exactly what a worker applies."""
from __future__ import annotations

import json
import re
import time
from datetime import datetime
from pathlib import Path
from typing import Annotated, Optional

import redis
import typer

from contracts.control import CameraSettings, SettingsError, changed_settings, parse_polygon
from runtime.control import AUDIT_LIST_COUNT, CameraControl, SettingsConflictError, read_audit, read_settings

from ..helptext import Typer
from ..options import settings_options
from .common import Connection, connection, fail

app = Typer()
camera_app = Typer(help="Per-camera sensitivity and region of interest, applied by workers within a second.",
                   no_args_is_help=True)
app.add_typer(camera_app, name="camera")

RoiPolygon = Annotated[Optional[str], typer.Option(
    help='Region of interest: polygon vertices "x,y;x,y;..." in the camera frame\'s pixels (replaces the bank\'s ROI).')]
RoiMask = Annotated[Optional[Path], typer.Option(
    help="Region of interest: a mask image file (white = inspect, any resolution, stretched over the frame).")]
# --threshold, --threshold-factor and --threshold-offset: their help in CameraSettings' fields
sensitivity_options = settings_options(CameraSettings, "threshold", "threshold_factor", "threshold_offset",
                                       into="sensitivity")


def camera_settings(camera: str, base: CameraSettings | None, sensitivity: dict, roi_polygon: Optional[str],
                    roi_mask: Optional[Path], bank_threshold: bool = False, bank_roi: bool = False) -> CameraSettings:
    """`base` (the camera's stored settings, or none) with the options given on top (contracts.control.changed_settings:
    what the console writes too); bad values are a clear error."""
    if roi_polygon is not None and roi_mask is not None:
        fail("give --roi-polygon or --roi-mask, not both")
    try:
        return changed_settings(camera, base, sensitivity, None if roi_polygon is None else parse_polygon(roi_polygon),
                                None if roi_mask is None else roi_mask.read_bytes(), bank_threshold, bank_roi)
    except OSError as exc:
        fail(f"cannot read the mask {roi_mask}: {exc.strerror}")
    except SettingsError as exc:
        fail(str(exc))


def stored_settings(conn: Connection, camera: str) -> CameraSettings | None:
    """The camera's stored settings; stored ones that do not decode are a clear error."""
    try:
        return CameraControl(conn.client(), conn.keys).get(camera)
    except SettingsError as exc:
        fail(f"the stored settings of camera {camera!r} are refused: {exc}")
    except redis.RedisError as exc:  # `patchcore score --camera`: Redis is all it needs the network for
        fail(f"cannot read the settings of camera {camera!r} from Redis: {type(exc).__name__}: {exc}")


@camera_app.command("set")
@sensitivity_options
@connection
def camera_set(
    camera: Annotated[str, typer.Argument(help="Camera name.")],
    sensitivity: dict = None, roi_polygon: RoiPolygon = None, roi_mask: RoiMask = None,
    bank_threshold: Annotated[bool, typer.Option(help="Drop the camera's threshold settings: the bank's applies.")] = False,
    bank_roi: Annotated[bool, typer.Option(help="Drop the camera's region of interest: the bank's applies.")] = False,
    conn: Connection = None,
) -> None:
    """Set a camera's sensitivity and/or region of interest (options not given are kept); audited."""
    control = CameraControl(conn.client(), conn.keys)
    try:  # on the stored settings (refused ones are replaced, the audit keeps them), again if another writer came first
        stored = control.update(camera, lambda base: camera_settings(camera, base, sensitivity, roi_polygon, roi_mask,
                                                                     bank_threshold, bank_roi))
    except SettingsConflictError as exc:
        fail(str(exc))
    typer.echo(json.dumps(stored.describe()))


@camera_app.command("show")
@connection
def camera_show(camera: Annotated[Optional[str], typer.Argument(help="Camera name (default: every camera).")] = None,
                conn: Connection = None) -> None:
    """The cameras' settings as stored, one JSON line each (refused entries say why)."""
    stored = read_settings(conn.client(), conn.keys)
    for name in sorted(set(stored.cameras) | set(stored.refused)):
        if camera is not None and name != camera:
            continue
        if name in stored.refused:
            typer.echo(json.dumps({"camera": name, "refused": stored.refused[name]}))
        else:
            typer.echo(json.dumps(stored.cameras[name].describe()))
    if camera is not None and camera not in stored.cameras and camera not in stored.refused:
        typer.echo(json.dumps({"camera": camera, "settings": None}))


@camera_app.command("reset")
@connection
def camera_reset(camera: Annotated[str, typer.Argument(help="Camera name.")], conn: Connection = None) -> None:
    """Remove a camera's settings: the bank's threshold and ROI apply again; audited."""
    try:
        removed = CameraControl(conn.client(), conn.keys).reset(camera)
    except SettingsConflictError as exc:
        fail(str(exc))
    typer.echo(json.dumps({"camera": camera, "reset": removed}))


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def since_time(text: str) -> float:
    """--since: a duration back from now (30s, 10m, 2h, 7d), an ISO time (2026-12-03T15:00, local time unless
    it says), or unix seconds."""
    text = text.strip()
    match = _DURATION.match(text)
    if match:
        return time.time() - float(match.group(1)) * _UNITS[match.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        fail(f"bad --since {text!r}: a duration (30s, 10m, 2h, 7d), an ISO time or unix seconds")


@app.command("audit")
@connection
def audit_command(
    camera: Annotated[Optional[str], typer.Option(help="Only changes that concern this camera.")] = None,
    since: Annotated[Optional[str], typer.Option(help="From this time on: 10m, 2h, 7d, an ISO time or unix seconds.")] = None,
    count: Annotated[int, typer.Option(min=1, help="The newest this many.")] = AUDIT_LIST_COUNT,
    json_output: Annotated[bool, typer.Option("--json", help="One JSON line per change.")] = False,
    conn: Connection = None,
) -> None:
    """Who changed what alarms or what is kept (camera settings, alarm rules, banks, alarms, dead letters), oldest first."""
    log = read_audit(conn.client(), conn.keys, camera, None if since is None else since_time(since), count)
    for entry in log.entries:
        if json_output:
            typer.echo(json.dumps(entry.to_dict()))
        else:
            when = datetime.fromtimestamp(entry.at).isoformat(timespec="seconds")
            typer.echo(f"{when}  {entry.who}  {entry.action}  {entry.target}  before={entry.before}  after={entry.after}")
    if log.refused:
        typer.echo(f"{log.refused} audit entries refused (malformed; skipped)", err=True)

