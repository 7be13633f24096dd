"""A sink process: reads verdicts (the cameras' results streams), alarms (their alarm streams) and/or drift events
(their drift streams, store.alarms.drift) with the sink's own consumer group, hands them to one destination
(sinks/webhook.py, mqtt.py, opcua.py, modbus.py) in order, and acknowledges an entry only once the destination
confirmed it: delivery at least once, every message with its idempotency key (sinks/messages.py).

- Several processes of one sink (the same `--sink`, different `--name`) share its group, like workers.
- Killed mid-delivery, a process loses nothing: what it had read stays pending to its consumer name; at start
  it reads those again from id 0, and entries left pending by a consumer that is gone are claimed after
  `claim_idle_ms`. A live process resets the idle time of what it holds, so no peer claims it while it retries.
- A destination that is down keeps the messages pending: the process holds at most `max_pending` (it stops
  reading new entries beyond that), retries with exponential backoff, and says so in its health (the hash
  Keys.sink_health, read by `patchcore status`) and its metrics.
- A permanent refusal (HTTP 4xx other than 408/429, an OPC UA bad node or type, a Modbus exception reply or a
  camera without a Modbus block, a message that does not decode) is acknowledged into the sink's dead letters with
  its reason (runtime/lua/sink_refuse.lua).
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import redis

from contracts.keys import Keys, camera_of, check_sink, sink_group
from runtime import scripts
from runtime.metrics import SINK_DEADLETTERED, SINK_FAILURES, sink_delivered, sink_health, sink_started
from runtime.streams import CameraStreams, keep_pending, serve

from .messages import Message, Unreadable, parse_entry

log = logging.getLogger("patchcore.sink")

HEAD_BYTES = 256  # of an unreadable entry's bytes kept in its dead letter


class SettingsError(ValueError):
    """Sink or destination settings that cannot work (a bad name, nothing to read, a missing file...)."""


@dataclass(frozen=True)
class Attempt:
    """What a destination did with a batch: `done` holds, for the first len(done) messages in order, None
    (confirmed) or the reason it refused that message for good; the others were not confirmed, `error` says
    why (the destination is down or failing for now: they are retried)."""
    done: list[str | None]
    error: str | None = None


class Destination(Protocol):
    description: str  # where it delivers, without secrets (the health hash and logs show it)

    def deliver(self, messages: Sequence[Message]) -> Attempt: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class SinkSettings:
    """A field's `metadata["help"]` is its option's help (`patchcore sink <kind> --help`)."""

    sink: str = field(default="", metadata={"help": "Sink name: its consumer group and dead letters; processes "
                                                    "with the same sink share the work (default: the destination kind)."})
    name: str = field(default="sink-1", metadata={"help": "Consumer name of this process (unique within the sink)."})
    verdicts: bool = field(default=True, metadata={"help": "Deliver every frame's verdict (the results streams)."})
    alarms: bool = field(default=True, metadata={"help": "Deliver alarms (the alarm streams)."})
    drift: bool = field(default=True, metadata={"help": "Deliver drift events: a camera's scene drifted, was "
                                                        "acknowledged, returned (the drift streams)."})
    batch: int = field(default=64, metadata={"help": "Messages handed to the destination at once, at most.", "min": 1})
    max_pending: int = field(default=1000, metadata={
        "help": "Messages held unconfirmed, at most: beyond it no new entry is read (they wait in Redis).", "min": 1})
    claim_idle_ms: int = field(default=30_000, metadata={
        "help": "Entries another consumer of the sink left pending this long are claimed (a process that died).",
        "min": 1})
    backoff_s: float = 0.1  # first wait after a failed attempt, doubled after each next failure
    max_backoff_s: float = field(default=10.0, metadata={"help": "Longest wait between attempts to a failing "
                                                                 "destination."})
    down_after_s: float = 5.0  # failing this long: state `down` (before: `retrying`)
    refresh_s: float = 2.0  # camera set reread, dead consumers' entries claimed, held entries kept
    health_s: float = 1.0  # the health hash written at most this often
    deadletter_maxlen: int = 10_000  # per camera and sink, approximate

    def __post_init__(self):
        if self.sink:
            try:
                check_sink(self.sink)
            except ValueError as exc:
                raise SettingsError(str(exc)) from None
        if not (self.verdicts or self.alarms or self.drift):
            raise SettingsError("a sink must deliver verdicts, alarms or drift events (one at least)")
        if min(self.batch, self.max_pending, self.claim_idle_ms) < 1 or self.backoff_s <= 0:
            raise SettingsError("batch, max_pending, claim_idle_ms and backoff_s must be positive")


@dataclass
class SinkReport:
    delivered: int = 0
    deadlettered: int = 0
    failures: int = 0  # attempts that failed for now
    recovered: int = 0  # entries read again from this consumer's pending list (a restart of the same name)
    claimed: int = 0  # entries claimed from consumers that were gone
    trimmed: int = 0  # entries trimmed from their stream while pending: nothing left to deliver
    last_error: str = ""


class SinkStreams(CameraStreams):
    """CameraStreams over several streams per camera (its results, alarms and/or drift events): on a single Redis one
    blocking XREADGROUP waits on all of them, so an alarm never waits behind an idle results stream."""

    def __init__(self, client: redis.Redis, cameras_key: str, streams_of: Sequence, group: str, refresh_s: float):
        super().__init__(client, cameras_key, None, group, refresh_s)
        self.streams_of = tuple(streams_of)

    def streams_for(self, cameras: list[str]) -> list[str]:
        return [stream_of(camera) for camera in cameras for stream_of in self.streams_of]


class Sink:
    def __init__(self, client: redis.Redis, destination: Destination, settings: SinkSettings, keys: Keys = Keys(),
                 stop: threading.Event | None = None):
        if not settings.sink:
            raise SettingsError("the sink needs a name (SinkSettings.sink)")
        self.client, self.destination, self.settings, self.keys = client, destination, settings, keys
        self.stop = stop or threading.Event()
        self.report = SinkReport()
        self.group = sink_group(settings.sink)
        self.label = f"{settings.sink}/{settings.name}"
        kinds = [stream_of for stream_of, wanted in ((keys.results, settings.verdicts), (keys.alarms, settings.alarms),
                                                     (keys.drift, settings.drift)) if wanted]
        self._streams = SinkStreams(client, keys.cameras, kinds, self.group, settings.refresh_s)
        self._refuse = scripts.load(client, "sink_refuse")
        self._held: list[Message] = []  # read, not yet confirmed: delivered in this order
        self._held_ids: set[tuple[str, bytes]] = set()
        self._failing_since: float | None = None
        self._backoff = settings.backoff_s
        self._next_try = 0.0
        self._next_health = 0.0
        sink_started(settings.sink)

    # -- the loop ------------------------------------------------------------------------------------------
    def run(self) -> SinkReport:
        log.info("sink started", extra={"fields": {"sink": self.label, "destination": self.destination.description}})
        try:
            serve(self._step, self.stop, log, self.label, on_lost_group=self._streams.forget)
        finally:
            self.destination.close()
            try:
                self._write_health("stopped")
            except redis.RedisError:
                pass
        return self.report

    def _step(self) -> None:
        if self._streams.due():
            self._refresh()
        if not self._streams.names:
            self.stop.wait(0.1)
            return
        self._fill()
        now = time.monotonic()
        if self._held and now >= self._next_try:
            self._deliver()
        elif self._held:
            self.stop.wait(min(self._next_try - now, 0.05))  # backing off; still reading up to max_pending
        if time.monotonic() >= self._next_health:
            self._write_health(self.state)

    @property
    def state(self) -> str:
        """ok, retrying (failing for less than down_after_s), or down."""
        if self._failing_since is None:
            return "ok"
        return "down" if time.monotonic() - self._failing_since >= self.settings.down_after_s else "retrying"

    def readiness(self) -> tuple[bool, dict]:
        """Ready (/readyz): the group joined on a stream and the destination not down."""
        return bool(self._streams.names) and self.state != "down", {"streams": len(self._streams.names),
                                                                    "state": self.state}

    # -- reading -------------------------------------------------------------------------------------------
    def _refresh(self) -> None:
        """Reread the camera set; keep what this process holds (no peer claims it); claim what dead peers left."""
        self._streams.refresh()
        by_stream: dict[str, list[bytes]] = {}
        for message in self._held:
            by_stream.setdefault(message.stream, []).append(message.entry_id)
        for stream, ids in by_stream.items():
            owned = keep_pending(self.client, stream, self.group, self.settings.name, ids)
            lost = set(ids) - owned
            if lost:  # another process claimed them (this one stalled past claim_idle_ms): it delivers them
                self._held = [m for m in self._held if not (m.stream == stream and m.entry_id in lost)]
                self._held_ids -= {(stream, entry_id) for entry_id in lost}
        for stream in self._streams.names:
            room = self.settings.max_pending - len(self._held)
            if room <= 0:
                break
            _, claimed, *_ = self.client.xautoclaim(stream, self.group, self.settings.name,
                                                    min_idle_time=self.settings.claim_idle_ms, start_id="0-0",
                                                    count=room)
            added = self._take([(stream, claimed)])
            if added:
                self.report.claimed += added
                log.warning("sink claimed entries", extra={"fields": {"sink": self.label, "stream": stream,
                                                                      "count": added}})

    def _fill(self) -> None:
        """Read up to the room left under max_pending: this consumer's own pending entries first (at start: a
        predecessor of the same name; after a new connection: a read whose reply was lost; CameraStreams.read_own),
        then new ones. Holding nothing, it waits up to 100 ms for the first new entry (one blocking read over
        every stream); holding some, it reads without waiting, capped over all streams (read_fair)."""
        room = self.settings.max_pending - len(self._held)
        if room <= 0:
            return
        per_stream = max(1, room // len(self._streams.names))  # with more streams than room: one each
        if self._streams.recovery_due():  # at start (a predecessor's name), after a new connection or a failed step
            added = self._take(self._streams.read_own(self.settings.name, known=frozenset(self._held_ids)))
            self.report.recovered += added
            return
        if self._held:
            self._take(self._streams.read_fair(self.settings.name, min(self.settings.batch, room)))
        else:
            self._take(self._streams.read_each(self.settings.name, min(self.settings.batch, per_stream), ">", 100))

    def _take(self, reply) -> int:
        """Hold the messages of `reply` ([(stream, [(id, fields)...])...]) not held yet; dead-letter the
        unreadable; acknowledge entries trimmed while pending. Returns how many were taken."""
        taken = 0
        for stream, entries in reply:
            for entry_id, fields in entries:
                if entry_id is None or (stream, entry_id) in self._held_ids:
                    continue
                if not fields:  # trimmed from its stream while pending: nothing left to deliver
                    self.client.xack(stream, self.group, entry_id)
                    self.report.trimmed += 1
                    continue
                message = parse_entry(self.keys, stream, entry_id, fields)
                if isinstance(message, Unreadable):
                    self._dead_letter(stream, entry_id, message.reason, {"head": message.raw[:HEAD_BYTES]})
                    continue
                self._held.append(message)
                self._held_ids.add((stream, entry_id))
                taken += 1
        return taken

    # -- delivering ----------------------------------------------------------------------------------------
    def _deliver(self) -> None:
        batch = self._held[:self.settings.batch]
        attempt = self.destination.deliver(batch)
        done = batch[:len(attempt.done)]
        delivered = [m for m, refusal in zip(done, attempt.done) if refusal is None]
        with self.client.pipeline(transaction=False) as pipe:
            for message in delivered:
                pipe.xack(message.stream, self.group, message.entry_id)
            pipe.execute()
        for message, refusal in zip(done, attempt.done):
            if refusal is not None:
                self._dead_letter(message.stream, message.entry_id, refusal,
                                  {"key": message.key, "body": message.json})
        now = time.time()
        sink_delivered(self.settings.sink, (m.kind for m in delivered), (now - m.written_at for m in delivered))
        self.report.delivered += len(delivered)
        self._held = self._held[len(done):]
        self._held_ids -= {(m.stream, m.entry_id) for m in done}
        if attempt.error is None:
            if self._failing_since is not None:
                log.info("sink destination back", extra={"fields": {"sink": self.label}})
            self._failing_since, self._backoff, self._next_try = None, self.settings.backoff_s, 0.0
            return
        self.report.failures += 1
        self.report.last_error = attempt.error[:500]
        SINK_FAILURES.labels(self.settings.sink).inc()
        if self._failing_since is None:
            self._failing_since = time.monotonic()
        log.warning("sink delivery failed", extra={"fields": {"sink": self.label, "error": self.report.last_error,
                                                              "pending": len(self._held), "retry_in_s": self._backoff}})
        self._next_try = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, self.settings.max_backoff_s)
        self._write_health(self.state)

    def _dead_letter(self, stream: str, entry_id: bytes, reason: str, extra: dict) -> None:
        """Acknowledge the entry into the sink's dead letters (of its camera) with `reason`."""
        camera = camera_of(stream)
        written = scripts.sink_refuse(
            self._refuse, stream=stream, group=self.group, entry_id=entry_id,
            deadletters=self.keys.sink_deadletter(self.settings.sink, camera), maxlen=self.settings.deadletter_maxlen,
            fields={"reason": reason, "stream": stream, "id": entry_id, "sink": self.settings.sink,
                    "consumer": self.settings.name, "destination": self.destination.description, "at": time.time(),
                    **extra})
        if written:
            self.report.deadlettered += 1
            SINK_DEADLETTERED.labels(self.settings.sink).inc()
            log.error("sink message dead-lettered", extra={"fields": {"sink": self.label, "stream": stream,
                                                                      "reason": reason[:500]}})

    def _write_health(self, state: str) -> None:
        self._next_health = time.monotonic() + self.settings.health_s
        sink_health(self.settings.sink, state, len(self._held))
        self.client.hset(self.keys.sink_health, self.label, json.dumps({
            "sink": self.settings.sink, "consumer": self.settings.name, "destination": self.destination.description,
            "state": state, "pending": len(self._held), "delivered": self.report.delivered,
            "deadlettered": self.report.deadlettered, "failures": self.report.failures, "trimmed": self.report.trimmed,
            "last_error": self.report.last_error, "failing_since_s": None if self._failing_since is None
            else round(time.monotonic() - self._failing_since, 1), "at": time.time()}))
