"""`patchcore worker | up`: the scoring worker (workers.worker) and the whole service in one process
(patchcore.up), their options the fields of WorkerSettings and UpSettings. Loads torch; imports at the top."""
from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer

from scorer.views import ViewError
from workers.settings import WorkerSettings
from workers.worker import Worker

from ..helptext import Typer
from ..options import field_option, settings_options
from ..up import UpError, UpSettings, run_up
from .bank import compute_config
from .common import (METRICS_OFF, Connection, MetricsPort, Search, SigningKeyFile, Progress, alarm_rule, connection,
                     console_credentials, fail, rule_options, search_config, serve_metrics, signing_key,
                     service_errors, stop_on_signals)

app = Typer()
UP = UpSettings()  # up's defaults, the bank it builds included
Frames = field_option(UpSettings, "frames")  # up's --frames defaults to None: a file or folder ends by itself


@app.command("worker")
@settings_options(WorkerSettings, "max_batch", "max_wait_ms", "claim_idle_ms", "max_frame_bytes", "result_maps",
                  "max_pixels", "max_deliveries", "overlay_ttl_s", "device", "index",
                  into="worker")
@settings_options(WorkerSettings, "weights", "precision", "channels_last", "engine", "prefetch", into="backbone")
@settings_options(WorkerSettings, "wait_replicas", "wait_ms", into="replication")
@connection
def worker_command(
    name: Annotated[Optional[str], typer.Option(help="Consumer name (default: host-pid).")] = None,
    worker: dict = None, search: Search = None, backbone: dict = None, signing_key_file: SigningKeyFile = None,
    metrics_port: MetricsPort = METRICS_OFF, replication: dict = None, conn: Connection = None,
) -> None:
    """Score frames of every camera until SIGINT/SIGTERM (finishing the current batch).

    With a signing key, only banks signed with it are loaded; without one, any bank that matches its sha256."""
    # refused here, clearly, rather than when the first bank loads
    compute_config(backbone["precision"], backbone["channels_last"], worker["device"], backbone["engine"])
    settings = WorkerSettings(**worker, **backbone, **replication, search=search_config(search, worker["index"]),
                              bank_key=signing_key(signing_key_file))
    if name:
        settings = replace(settings, name=name)
    client = conn.client()
    with service_errors():
        scoring = Worker(client, settings, conn.keys, stop_on_signals())
        serve_metrics(metrics_port, client, scoring.readiness, conn.keys)
        report = scoring.run()
    typer.echo(json.dumps(vars(report)))


@app.command("up")
@settings_options(UP, "source", into="source")
@settings_options(UP, "seconds", "bank", "train", "warmup_frames", into="run")
@settings_options(UP.build.features, "backbone", into="features")
@settings_options(UP.build.coreset, "fraction", into="coreset", rename={"fraction": "coreset"})
@settings_options(UP.build.view, "kind", "size", "scale", "tile", "overlap", into="view", rename={"kind": "view"})
@settings_options(UP, "fps", "max_batch", "max_wait_ms", "prefetch", into="pace")
@rule_options(UP.rule)
@settings_options(UP, "device", "precision", "channels_last", "engine", into="compute")
@settings_options(UP, "redis_url", "bank_name", "force", into="registry")
@settings_options(UP, "metrics_port", "console_port", into="serve")
def up_command(
    source: dict = None,
    frames: Frames = None,  # None: the source's end (synthetic: UpSettings.frames)
    run: dict = None, features: dict = None, coreset: dict = None, view: dict = None, pace: dict = None,
    rule: dict = None, json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the summary here.")] = None,
    compute: dict = None, search: Search = None, progress: Progress = True, registry: dict = None,
    signing_key_file: SigningKeyFile = None, serve: dict = None,
) -> None:
    """The whole service in one command: embedded Redis, bank, ingest, worker, store; prints alarms.

    The bank is signed with --signing-key-file's key, or with a key made for this run."""
    # refused here, clearly, before Redis starts and a bank is built
    compute_config(compute["precision"], compute["channels_last"], compute["device"], compute["engine"])
    if frames is None and run["seconds"] is None and source["source"].startswith("synthetic"):
        frames = UP.frames  # the synthetic line never ends; files end by themselves, live sources at Ctrl-C
    try:
        build = replace(UP.build, features=replace(UP.build.features, **features),
                        view=replace(UP.build.view, **view), coreset=replace(UP.build.coreset, **coreset),
                        calibration=replace(UP.build.calibration, contiguous=run["train"] is None))
    except ViewError as exc:
        fail(str(exc))
    credentials = os.environ.get("PATCHCORE_CONSOLE_CREDENTIALS") if serve["console_port"] else None
    settings = UpSettings(**source, frames=frames, **run, **pace, **compute, **registry, **serve, build=build, rule=alarm_rule(rule),
                          search=search_config(search, "auto"), bank_key=signing_key(signing_key_file),
                          console_credentials=console_credentials(credentials))
    try:
        summary = run_up(settings, echo=typer.echo, progress=progress)
    except (UpError, OSError) as exc:
        fail(str(exc))
    text = json.dumps(summary, indent=2)
    typer.echo(text)
    if json_out:
        json_out.write_text(text + "\n")
