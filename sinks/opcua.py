"""OPC UA destination (asyncua's synchronous client): each message written to the camera's nodes on a PLC-style
server, so the PLC matches the part at the reject gate by its sequence number.

Node layout (defined on the server, by the PLC programmer; docs/sinks.md): under the Objects folder, the object
`<ns>:<root>` holds one object (folder) per camera, `<ns>:<camera>`, with the variables
    Verdict    Boolean   true: the frame is anomalous (reject)
    Score      Double    its anomaly score
    Threshold  Double    the threshold it was judged with (NaN: none)
    Seq        Int64     the frame's sequence number (written last in the same Write request)
    AlarmSeq   Int64     sequence number of the camera's latest alarm
    Timestamp  DateTime  the frame's capture time (UTC)
    Drift      Boolean   true: the camera's whole scene has drifted (from a drift event to its drift-cleared)
    DriftSeq   Int64     number of the camera's latest drift event (written last with Drift)
where <ns> is the index of `namespace_uri` on that server. A verdict writes Score, Threshold, Verdict, Timestamp
and Seq in one Write request, in that order (a PLC that triggers on Seq finds the others already set); an alarm
writes AlarmSeq; a drift event Drift then DriftSeq. Nodes are looked up once per camera and kind of message
(TranslateBrowsePathsToNodeIds), so a server without the Drift nodes still takes verdicts and alarms.

A missing node or a wrong type (BadNoMatch, BadNodeIdUnknown, BadTypeMismatch, BadNotWritable, BadUserAccessDenied,
...) is a permanent refusal (dead letter); a lost connection, a timeout or any other status is a failure for now:
the session is closed and opened again on the next try.
"""
from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from asyncua import ua
from asyncua.sync import Client
from asyncua.ua import uaerrors

from .messages import ALARM, DRIFT, VERDICT, Message
from .service import Attempt, SettingsError
from .webhook import read_secret

VERDICT_NODES = ("Score", "Threshold", "Verdict", "Timestamp", "Seq")  # written in this order, Seq last
ALARM_NODES = ("AlarmSeq",)
DRIFT_NODES = ("Drift", "DriftSeq")  # DriftSeq last
NODES = {VERDICT: VERDICT_NODES, ALARM: ALARM_NODES, DRIFT: DRIFT_NODES}  # by message kind
TYPES = {"Score": ua.VariantType.Double, "Threshold": ua.VariantType.Double, "Verdict": ua.VariantType.Boolean,
         "Timestamp": ua.VariantType.DateTime, "Seq": ua.VariantType.Int64, "AlarmSeq": ua.VariantType.Int64,
         "Drift": ua.VariantType.Boolean, "DriftSeq": ua.VariantType.Int64}
# statuses that say "never" for this message (its camera's nodes are missing, of another type, not writable)
PERMANENT = (uaerrors.BadNoMatch, uaerrors.BadNodeIdUnknown, uaerrors.BadTypeMismatch, uaerrors.BadNotWritable,
             uaerrors.BadUserAccessDenied, uaerrors.BadOutOfRange, uaerrors.BadBrowseNameInvalid,
             uaerrors.BadWriteNotSupported, uaerrors.BadAttributeIdInvalid)
TRANSIENT = (OSError, TimeoutError, concurrent.futures.TimeoutError, ua.UaError)


@dataclass(frozen=True)
class OpcUaSettings:
    url: str = field(default="opc.tcp://localhost:4840", metadata={"help": "OPC UA server endpoint."})
    namespace_uri: str = field(default="urn:patchcore:line", metadata={"help": "Namespace of the nodes (its index is "
                                                                               "asked from the server)."})
    root: str = field(default="Patchcore", metadata={"help": "Object under Objects that holds one folder per camera."})
    username: str | None = field(default=None, metadata={"help": "OPC UA user name."})
    password_file: Path | None = field(default=None, metadata={
        "help": "File holding the OPC UA password (never logged).", "envvar": "PATCHCORE_OPCUA_PASSWORD_FILE"})
    timeout_s: float = field(default=5.0, metadata={"help": "Seconds to wait for the server before retrying."})

    def __post_init__(self):
        if not self.url.startswith("opc.tcp://"):
            raise SettingsError(f"bad OPC UA URL {self.url[:200]!r}: opc.tcp://host:port expected")
        if not self.root or not self.namespace_uri:
            raise SettingsError("the OPC UA root and namespace URI must not be empty")
        if self.password_file is not None and self.username is None:
            raise SettingsError("an OPC UA password needs a --username")
        if self.timeout_s <= 0:
            raise SettingsError("timeout_s must be positive")


def values(message: Message) -> list[tuple[str, object]]:
    """(node name, value) of a message, in write order."""
    if message.kind == ALARM:
        return [("AlarmSeq", message.seq)]
    if message.kind == DRIFT:
        return [("Drift", bool(message.body["drifted"])), ("DriftSeq", int(message.body["n"]))]
    body = message.body
    threshold = body["threshold"]
    return [("Score", float(body["score"])), ("Threshold", float("nan") if threshold is None else float(threshold)),
            ("Verdict", bool(body["anomalous"])),
            ("Timestamp", datetime.fromtimestamp(body["captured_at"], timezone.utc).replace(tzinfo=None)),
            ("Seq", message.seq)]


class OpcUa:
    def __init__(self, settings: OpcUaSettings):
        self.settings = settings
        self._password = read_secret(settings.password_file).decode() if settings.password_file else None
        self.description = f"opcua {settings.url.split('@')[-1]} {settings.root}"
        self._client: Client | None = None
        self._ns: int | None = None
        self._nodes: dict[tuple[str, str], dict] = {}  # (camera, message kind) -> node name -> node

    def _connect(self) -> None:
        if self._client is not None:
            return
        client = Client(self.settings.url, timeout=self.settings.timeout_s)
        if self.settings.username is not None:
            client.set_user(self.settings.username)
            if self._password is not None:
                client.set_password(self._password)
        try:
            client.connect()
            self._ns = client.get_namespace_index(self.settings.namespace_uri)
        except BaseException:
            self._close(client)
            raise
        self._client = client

    def _camera_nodes(self, camera: str, kind: str) -> dict:
        """The nodes a message of `kind` writes for `camera` (looked up once per connection)."""
        nodes = self._nodes.get((camera, kind))
        if nodes is None:
            folder = self._client.nodes.objects.get_child([f"{self._ns}:{self.settings.root}", f"{self._ns}:{camera}"])
            nodes = {name: folder.get_child(f"{self._ns}:{name}") for name in NODES[kind]}
            self._nodes[(camera, kind)] = nodes
        return nodes

    def deliver(self, messages: Sequence[Message]) -> Attempt:
        done: list[str | None] = []
        try:
            self._connect()
        except ValueError:  # the namespace is not (yet) on the server: a configuration to fix, messages kept
            return Attempt(done, f"namespace {self.settings.namespace_uri!r} unknown to the server")
        except TRANSIENT as exc:
            return Attempt(done, f"{type(exc).__name__}: {exc}")
        for message in messages:
            try:
                nodes = self._camera_nodes(message.camera, message.kind)
                pairs = values(message)
                self._client.write_values([nodes[name] for name, _ in pairs],
                                          [ua.DataValue(ua.Variant(value, TYPES[name])) for name, value in pairs])
                done.append(None)
            except PERMANENT as exc:
                done.append(f"{type(exc).__name__}: {exc}"[:500])
            except TRANSIENT as exc:
                self._drop()
                return Attempt(done, f"{type(exc).__name__}: {exc}")
        return Attempt(done)

    def _drop(self) -> None:
        client, self._client, self._nodes = self._client, None, {}
        if client is not None:
            self._close(client)

    @staticmethod
    def _close(client: Client) -> None:
        try:
            client.disconnect()  # also stops the client's own event-loop thread
        except Exception:  # noqa: BLE001 - a session that is already gone: nothing left to close
            pass

    def close(self) -> None:
        self._drop()
