"""MQTT destination (paho-mqtt 2.x, MQTT 5): each message published at QoS 1 and confirmed by the broker's PUBACK
before its entry is acknowledged.

Topics: `<topic_prefix>/<line>/<camera>/verdict` (retained: a subscriber that connects gets each camera's last
verdict at once), `<topic_prefix>/<line>/<camera>/alarm` (not retained) and `<topic_prefix>/<line>/<camera>/drift`
(retained: the camera's last drift event says whether its scene is drifted now). A line or camera name is one topic
level: `%`, `/`, `+`, `#` and control characters in it are percent-encoded, and an empty line is `_`. The
payload is the message's JSON (sinks/messages.py), the MQTT 5 user property `idempotency-key` carries its id.

A PUBACK with an MQTT 5 failure reason code (>= 0x80: not authorized, topic name invalid, quota...) is a
permanent refusal (dead letter); no PUBACK within `publish_timeout_s`, a refused connection or a lost one is a
failure for now: the client is dropped (with what paho still queues) and a new one connects on the next try.
"""
from __future__ import annotations

import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .messages import ALARM, Message
from .service import Attempt, SettingsError
from .webhook import read_secret

EMPTY_LEVEL = "_"  # the topic level of an empty line name
_ESCAPED = {c: f"%{ord(c):02X}" for c in "%/+#"}


@dataclass(frozen=True)
class MqttSettings:
    host: str = field(default="localhost", metadata={"help": "MQTT broker host."})
    port: int = field(default=1883, metadata={"help": "MQTT broker port (8883 is the usual TLS port).",
                                              "min": 1, "max": 65535})
    topic_prefix: str = field(default="patchcore", metadata={"help": "First topic level(s): <prefix>/<line>/<camera>/"
                                                                     "verdict|alarm|drift."})
    client_id: str = field(default="", metadata={"help": "MQTT client id (default: patchcore-<sink>-<name>)."})
    username: str | None = field(default=None, metadata={"help": "MQTT user name."})
    password_file: Path | None = field(default=None, metadata={
        "help": "File holding the MQTT password (never logged).", "envvar": "PATCHCORE_MQTT_PASSWORD_FILE"})
    tls: bool = field(default=False, metadata={"help": "Connect with TLS (server certificate checked)."})
    ca_file: Path | None = field(default=None, metadata={"help": "CA bundle for TLS (default: the system's)."})
    cert_file: Path | None = field(default=None, metadata={"help": "Client certificate for TLS (with --key-file)."})
    key_file: Path | None = field(default=None, metadata={"help": "Client certificate's key for TLS."})
    keepalive_s: int = 30
    publish_timeout_s: float = field(default=5.0, metadata={"help": "Seconds to wait for the broker's PUBACK before "
                                                                    "retrying."})

    def __post_init__(self):
        if not self.topic_prefix or any(c in self.topic_prefix for c in "+#\0"):
            raise SettingsError(f"bad MQTT topic prefix {self.topic_prefix[:200]!r}: non-empty, without + or #")
        if (self.cert_file is None) != (self.key_file is None):
            raise SettingsError("--cert-file and --key-file come together")
        if self.password_file is not None and self.username is None:
            raise SettingsError("an MQTT password needs a --username")
        if self.publish_timeout_s <= 0:
            raise SettingsError("publish_timeout_s must be positive")


def topic_level(name: str) -> str:
    """A line or camera name as one topic level (see the module's docstring)."""
    if not name:
        return EMPTY_LEVEL
    return "".join(_ESCAPED.get(c, c if c.isprintable() else f"%{ord(c):02X}") for c in name)


def topic(prefix: str, message: Message) -> str:
    return f"{prefix}/{topic_level(message.line)}/{topic_level(message.camera)}/{message.kind}"


class Mqtt:
    def __init__(self, settings: MqttSettings, client_id: str):
        self.settings = settings
        self.client_id = settings.client_id or client_id
        self._password = read_secret(settings.password_file).decode() if settings.password_file else None
        self.description = f"mqtt {'mqtts' if settings.tls else 'mqtt'}://{settings.host}:{settings.port}/" \
                           f"{settings.topic_prefix}"
        self._client: mqtt.Client | None = None
        self._connected = threading.Event()
        self._lock = threading.Condition()
        self._acks: dict[int, int] = {}  # mid -> PUBACK reason code value

    # -- connection ----------------------------------------------------------------------------------------
    def _connect(self) -> str | None:
        """A connected client in self._client, or the reason there is none."""
        if self._client is not None and self._connected.is_set():
            return None
        self._drop()
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5)
        if self.settings.username is not None:
            client.username_pw_set(self.settings.username, self._password)
        if self.settings.tls:
            context = ssl.create_default_context(cafile=str(self.settings.ca_file) if self.settings.ca_file else None)
            if self.settings.cert_file is not None:
                context.load_cert_chain(str(self.settings.cert_file), str(self.settings.key_file))
            client.tls_set_context(context)
        refusal: list[str] = []

        def on_connect(client, userdata, flags, reason, properties):
            if reason.is_failure:
                refusal.append(f"connection refused: {reason}")
            else:
                self._connected.set()

        client.on_connect = on_connect
        client.on_disconnect = lambda *args: self._connected.clear()
        client.on_publish = self._on_publish
        self._connected.clear()
        try:
            client.connect(self.settings.host, self.settings.port, self.settings.keepalive_s, clean_start=True)
        except (OSError, ssl.SSLError) as exc:
            return f"{type(exc).__name__}: {exc}"
        client.loop_start()
        self._client = client
        deadline = time.monotonic() + self.settings.publish_timeout_s
        while not self._connected.is_set() and not refusal and time.monotonic() < deadline:
            self._connected.wait(0.01)
        if self._connected.is_set():
            return None
        self._drop()
        return refusal[0] if refusal else "no CONNACK in time"

    def _on_publish(self, client, userdata, mid, reason, properties) -> None:
        with self._lock:
            self._acks[mid] = reason.value
            self._lock.notify_all()

    def _drop(self) -> None:
        client, self._client = self._client, None
        self._connected.clear()
        if client is not None:
            client.disconnect()  # a DISCONNECT packet where the connection still stands, then the network thread
            client.loop_stop()
        with self._lock:
            self._acks.clear()

    # -- delivery ------------------------------------------------------------------------------------------
    def deliver(self, messages: Sequence[Message]) -> Attempt:
        error = self._connect()
        if error is not None:
            return Attempt([], error)
        sent = []
        for message in messages:
            properties = Properties(PacketTypes.PUBLISH)
            properties.UserProperty = ("idempotency-key", message.key)
            info = self._client.publish(topic(self.settings.topic_prefix, message), message.json, qos=1,
                                        retain=message.kind != ALARM, properties=properties)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                break
            sent.append(info.mid)
        done: list[str | None] = []
        deadline = time.monotonic() + self.settings.publish_timeout_s
        for mid in sent:  # the broker confirms in order: the first one missing ends the confirmed prefix
            with self._lock:
                while mid not in self._acks and time.monotonic() < deadline and self._connected.is_set():
                    self._lock.wait(min(0.05, max(0.0, deadline - time.monotonic())))
                code = self._acks.pop(mid, None)
            if code is None:
                error = "no PUBACK in time" if self._connected.is_set() else "connection lost"
                self._drop()  # what paho still holds would be sent again on reconnect: start clean
                return Attempt(done, error)
            done.append(None if code < 0x80 else f"PUBACK reason {mqtt.ReasonCode(PacketTypes.PUBACK, identifier=code)}")
        if len(sent) < len(messages):
            self._drop()
            return Attempt(done, "publish refused by the client: not connected")
        return Attempt(done)

    def close(self) -> None:
        self._drop()
