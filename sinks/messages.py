"""What a sink delivers: one Message per results, alarm or drift entry, with its idempotency key and its JSON body.

The body is the same for every destination (docs/sinks.md): a verdict
`{"type": "verdict", "id": "verdict:<camera>:<seq>:<bank>", "camera", "line", "seq", "anomalous", "score",
"threshold", "bank", "bank_version", "captured_at", "scored_at"}`, an alarm
`{"type": "alarm", "id": "alarm:<camera>:<seq>", "alarm_id": "<camera>:<seq>", "camera", "line", "seq", "score",
"threshold", "bank", "bank_version", "raised_at", "rule", "k", "n", "over", "peak_seq", "peak_score", "late_by",
"overlay_key"}`, a drift event (store.alarms.drift)
`{"type": "drift", "id": "drift:<camera>:<n>", "camera", "line", "seq", "n", "event", "drifted", "at", "window",
"share_over", "quantile_ratio", "median_ratio", "threshold", "held", "by"}` where `event` is `drift` (the scene
moved: started), `drift-acknowledged` (an operator acknowledged it) or `drift-cleared` (the scene returned) and
`drifted` says whether the scene is drifted after it. `id` is the idempotency key: a message delivered twice (at
least once) carries the same one.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from contracts.keys import Keys, camera_of
from contracts.messages import DRIFT_KINDS, Alarm, DriftEvent, MessageError, Result

VERDICT, ALARM, DRIFT = "verdict", "alarm", "drift"
DRIFT_CLEARED = DRIFT_KINDS[1]  # the event after which the scene is no longer drifted


@dataclass(frozen=True)
class Message:
    kind: str  # VERDICT, ALARM or DRIFT
    stream: str  # the entry's stream (the camera's results, alarms or drift)
    entry_id: bytes
    camera: str
    line: str
    seq: int  # the frame's (a drift event: the frame that decided it, DriftEvent.seq)
    key: str  # idempotency key (the body's "id")
    body: dict  # JSON-able

    @property
    def json(self) -> bytes:
        """The body as compact JSON with sorted keys (what a webhook signs and an MQTT message carries)."""
        return json.dumps(self.body, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()

    @property
    def written_at(self) -> float:
        """When Redis wrote the entry (unix seconds, from its id's milliseconds)."""
        return int(self.entry_id.split(b"-")[0]) / 1000


@dataclass(frozen=True)
class Unreadable:
    """An entry that is no valid message: dead-lettered by the sink with `reason`, never delivered."""
    stream: str
    entry_id: bytes
    raw: bytes
    reason: str


def verdict_key(camera: str, seq: int, bank: str) -> str:
    return f"{VERDICT}:{camera}:{seq}:{bank}"


def alarm_key(camera: str, seq: int) -> str:
    return f"{ALARM}:{camera}:{seq}"


def drift_key(camera: str, n: int) -> str:
    """A drift event's key: its camera and number (DriftEvent.n: each number is written once per camera)."""
    return f"{DRIFT}:{camera}:{n}"


def _finite_or_none(value: float | None) -> float | None:
    """JSON has no NaN or infinity: a threshold that is none is null."""
    return None if value is None or value != value or value in (float("inf"), float("-inf")) else value


def verdict_message(stream: str, entry_id: bytes, result: Result) -> Message:
    body = {"type": VERDICT, "id": verdict_key(result.camera, result.seq, result.bank), "camera": result.camera,
            "line": result.line, "seq": result.seq, "anomalous": result.anomalous, "score": result.score,
            "threshold": _finite_or_none(result.threshold), "bank": result.bank, "bank_version": result.bank_version,
            "captured_at": result.captured_at, "scored_at": result.scored_at}
    return Message(VERDICT, stream, entry_id, result.camera, result.line, result.seq, body["id"], body)


def alarm_message(stream: str, entry_id: bytes, alarm: Alarm) -> Message:
    body = {"type": ALARM, "id": alarm_key(alarm.camera, alarm.seq), "alarm_id": f"{alarm.camera}:{alarm.seq}",
            "camera": alarm.camera, "line": alarm.line, "seq": alarm.seq, "score": alarm.score,
            "threshold": _finite_or_none(alarm.threshold), "bank": alarm.bank, "bank_version": alarm.bank_version,
            "raised_at": alarm.raised_at, "rule": alarm.rule, "k": alarm.k, "n": alarm.n, "over": alarm.over,
            "peak_seq": alarm.peak_seq, "peak_score": alarm.peak_score, "late_by": alarm.late_by,
            "overlay_key": alarm.overlay_key}
    return Message(ALARM, stream, entry_id, alarm.camera, alarm.line, alarm.seq, body["id"], body)


def drift_message(stream: str, entry_id: bytes, event: DriftEvent) -> Message:
    body = {"type": DRIFT, "id": drift_key(event.camera, event.n), "camera": event.camera, "line": event.line,
            "seq": event.seq, "n": event.n, "event": event.kind, "drifted": event.kind != DRIFT_CLEARED,
            "at": event.at, "window": event.window, "share_over": event.share_over,
            "quantile_ratio": event.quantile_ratio, "median_ratio": event.median_ratio,
            "threshold": _finite_or_none(event.threshold), "held": event.held, "by": event.by}
    return Message(DRIFT, stream, entry_id, event.camera, event.line, event.seq, body["id"], body)


def parse_entry(keys: Keys, stream: str, entry_id: bytes, fields: dict) -> Message | Unreadable:
    """The Message of a results, alarm or drift entry (`fields` as read: b"m" holds the packed message), or Unreadable
    with the reason when it does not decode or names another camera than its stream's."""
    camera = camera_of(stream)
    raw = fields.get(b"m", b"")
    try:
        if stream == keys.results(camera):
            result = Result.unpack(raw)
            message = verdict_message(stream, entry_id, result)
        elif stream == keys.alarms(camera):
            message = alarm_message(stream, entry_id, Alarm.unpack(raw))
        elif stream == keys.drift(camera):
            message = drift_message(stream, entry_id, DriftEvent.unpack(raw))
        else:
            raise MessageError(f"{stream} is neither results, alarms nor drift")
        if message.camera != camera:
            raise MessageError(f"{message.kind} of camera {message.camera!r} arrived on {stream}")
        return message
    except MessageError as exc:
        return Unreadable(stream, entry_id, raw, str(exc))
