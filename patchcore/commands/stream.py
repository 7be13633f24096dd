"""`patchcore ingest | store`: the services beside the cameras and Redis (ingest.camera, store.service), their
options the fields of IngestSettings, StoreSettings and AlarmRule. Torch-free."""
from __future__ import annotations

import json
from typing import Annotated

import typer

from ingest.camera import CameraIngest, IngestSettings
from ingest.sources import SourceError, parse_source
from store.alarms.drift import DriftSettings
from store.service import ResultsStore, StoreSettings

from ..helptext import Typer
from ..options import settings_options
from .common import (METRICS_OFF, Connection, MetricsPort, alarm_rule, connection, fail, rule_options, serve_metrics,
                     service_errors, stop_on_signals)

app = Typer()
DRIFT_FIELDS = ("window", "quantile", "level", "raise_share", "clear_share", "policy")  # as --drift-<field>


@app.command("ingest")
@settings_options(IngestSettings, "camera", "line", "bank", "fps", "max_side", "encoding", "jpeg_quality", "maxlen",
                  into="ingest")
@settings_options(IngestSettings, "max_frames", into="limits", rename={"max_frames": "frames"})
@settings_options(IngestSettings, "wait_replicas", "wait_ms", into="replication")
@connection
def ingest_command(
    source: Annotated[str, typer.Option(help="synthetic[:seed=N,defect_rate=R], video file, image folder, rtsp://|http:// URL, usb:N.")],
    ingest: dict = None,
    loop: Annotated[bool, typer.Option(help="Loop files and folders.")] = False,
    limits: dict = None, metrics_port: MetricsPort = METRICS_OFF, replication: dict = None, conn: Connection = None,
) -> None:
    """Push a camera's frames into Redis until the source ends or SIGINT/SIGTERM."""
    if ingest["encoding"] not in ("jpeg", "raw"):
        fail("--encoding must be jpeg or raw")
    try:
        src = parse_source(source, loop=loop)
    except SourceError as exc:
        fail(str(exc))
    settings = IngestSettings(**ingest, **limits, **replication)
    client = conn.client()
    with service_errors():
        camera = CameraIngest(client, src, settings, conn.keys, stop_on_signals())
        serve_metrics(metrics_port, client, lambda: (camera.connected.is_set(), {"camera": settings.camera}))
        report = camera.run()
    typer.echo(json.dumps(vars(report)))


@app.command("store")
@rule_options(StoreSettings().default_rule)
@settings_options(StoreSettings, "name", "reorder", into="store", options={"reorder": {"min": 1}})
@settings_options(DriftSettings, *DRIFT_FIELDS, into="drift", rename={name: f"drift_{name}" for name in DRIFT_FIELDS})
@connection
def store_command(rule: dict = None, store: dict = None, drift: dict = None, metrics_port: MetricsPort = METRICS_OFF,
                  conn: Connection = None) -> None:
    """Keep per-camera state and raise alarms (stream + Pub/Sub) until SIGINT/SIGTERM; tell a drifted scene from
    defects (--drift-*: one drift event, the camera's alarms held until `patchcore drift ack` or the scene returns)."""
    try:
        drift_settings = DriftSettings(**drift)
    except ValueError as exc:
        fail(str(exc))
    settings = StoreSettings(**store, default_rule=alarm_rule(rule), drift=drift_settings)
    client = conn.client()
    with service_errors():
        results = ResultsStore(client, settings, conn.keys, stop_on_signals())
        serve_metrics(metrics_port, client, results.readiness)
        report = results.run()
    typer.echo(json.dumps(vars(report)))
