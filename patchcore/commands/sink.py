"""`patchcore sink webhook | mqtt | opcua | modbus`: one process delivering verdicts, alarms and drift events to one
destination (sinks/). Run several with the same --sink and different --name to share the work. Torch-free."""
from __future__ import annotations

import json
from dataclasses import asdict
from typing import Annotated, Optional

import typer

from contracts.keys import check_sink
from sinks.deadletters import LIST_COUNT, sink_dead_letters
from sinks.modbus import Modbus, ModbusSettings
from sinks.mqtt import Mqtt, MqttSettings
from sinks.opcua import OpcUa, OpcUaSettings
from sinks.service import SettingsError, Sink, SinkSettings
from sinks.webhook import Webhook, WebhookSettings

from ..helptext import Typer
from ..options import settings_options
from .common import METRICS_OFF, Connection, MetricsPort, connection, fail, serve_metrics, stop_on_signals

app = Typer()
sink_app = Typer(help="Deliver verdicts, alarms and drift events to the line: webhook, MQTT, OPC UA, Modbus TCP "
                                   "(at least once).",
                 no_args_is_help=True)
app.add_typer(sink_app, name="sink")

ModbusBlocks = Annotated[Optional[list[str]], typer.Option(  # a list: repeatable (the field is a tuple)
    "--map", help=ModbusSettings.__dataclass_fields__["blocks"].metadata["help"])]
SINK_FIELDS = ("sink", "name", "verdicts", "alarms", "drift", "batch", "max_pending", "claim_idle_ms", "max_backoff_s")


def run_sink(kind: str, make_destination, sink: dict, metrics_port: int, conn: Connection) -> None:
    """Build the settings and the destination (a clear error for bad ones), then run until SIGINT/SIGTERM."""
    try:
        settings = SinkSettings(**{**sink, "sink": sink["sink"] or kind})
        destination = make_destination()
    except SettingsError as exc:
        fail(str(exc))
    client = conn.client()
    process = Sink(client, destination, settings, conn.keys, stop_on_signals())
    serve_metrics(metrics_port, client, process.readiness)
    report = process.run()
    typer.echo(json.dumps(vars(report)))


@sink_app.command("webhook")
@settings_options(WebhookSettings, "url", "secret_file", "timeout_s", "ca_file", into="webhook")
@settings_options(SinkSettings, *SINK_FIELDS, into="sink")
@connection
def webhook_command(webhook: dict = None, sink: dict = None, metrics_port: MetricsPort = METRICS_OFF,
                    conn: Connection = None) -> None:
    """POST each message as signed JSON to a URL (HMAC-SHA256, Idempotency-Key); retried until a 2xx."""
    run_sink("webhook", lambda: Webhook(WebhookSettings(**webhook)), sink, metrics_port, conn)


@sink_app.command("mqtt")
@settings_options(MqttSettings, "host", "port", "topic_prefix", "client_id", "username", "password_file", "tls",
                  "ca_file", "cert_file", "key_file", "publish_timeout_s", into="mqtt",
                  rename={"password_file": "mqtt_password_file"})
@settings_options(SinkSettings, *SINK_FIELDS, into="sink")
@connection
def mqtt_command(mqtt: dict = None, sink: dict = None, metrics_port: MetricsPort = METRICS_OFF,
                 conn: Connection = None) -> None:
    """Publish each message at QoS 1 to <prefix>/<line>/<camera>/verdict|alarm|drift (last verdict and drift
    retained); an entry
    is acknowledged once the broker's PUBACK came."""
    client_id = f"patchcore-{sink['sink'] or 'mqtt'}-{sink['name']}"
    run_sink("mqtt", lambda: Mqtt(MqttSettings(**mqtt), client_id), sink, metrics_port, conn)


@sink_app.command("opcua")
@settings_options(OpcUaSettings, "url", "namespace_uri", "root", "username", "password_file", "timeout_s",
                  into="opcua", rename={"password_file": "opcua_password_file"})
@settings_options(SinkSettings, *SINK_FIELDS, into="sink")
@connection
def opcua_command(opcua: dict = None, sink: dict = None, metrics_port: MetricsPort = METRICS_OFF,
                  conn: Connection = None) -> None:
    """Write each verdict (Score, Threshold, Verdict, Timestamp, then Seq), alarm (AlarmSeq) and drift event
    (Drift, then DriftSeq) to the camera's nodes Objects/<root>/<camera>/ of an OPC UA server (a PLC)."""
    run_sink("opcua", lambda: OpcUa(OpcUaSettings(**opcua)), sink, metrics_port, conn)


@sink_app.command("modbus")
@settings_options(ModbusSettings, "host", "port", "unit", "map_file", "word_order", "timeout_s", into="modbus")
@settings_options(SinkSettings, *SINK_FIELDS, into="sink")
@connection
def modbus_command(modbus: dict = None, block: ModbusBlocks = None, sink: dict = None,
                   metrics_port: MetricsPort = METRICS_OFF, conn: Connection = None) -> None:
    """Write each verdict, alarm and drift event into its camera's block of coils and holding registers on a PLC
    (Modbus TCP), its heartbeat register last; the register map is in docs/sinks.md."""
    run_sink("modbus", lambda: Modbus(ModbusSettings(**modbus, blocks=tuple(block or ()))), sink, metrics_port,
             conn)


@sink_app.command("deadletters")
@connection
def deadletters_command(
    sink: Annotated[str, typer.Option(help="The sink's name (--sink of its processes).")],
    camera: Annotated[Optional[str], typer.Option(help="Only this camera's.")] = None,
    count: Annotated[int, typer.Option(help="The newest this many per camera.", min=1)] = LIST_COUNT,
    conn: Connection = None,
) -> None:
    """One JSON line per dead letter of a sink: camera, reason, idempotency key, origin, when."""
    try:
        check_sink(sink)
    except ValueError as exc:
        fail(str(exc))
    for letter in sink_dead_letters(conn.client(), conn.keys, sink, camera, count):
        typer.echo(json.dumps(asdict(letter)))
