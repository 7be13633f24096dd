"""Redis key and channel names: the one place they are spelled. All start with a configurable prefix.

Hash tags (Redis Cluster): every key of one camera carries the tag `{<camera>}` (its frames, results,
stats, latest state, alarm window, overlays, frame copies, alarms and dead letters), so each atomic step
of the pipeline (a Lua script, a MULTI) touches one hash slot; the bank registry (and the dismissals and
update queues written with it) carries `{bank}`. The remaining keys (camera set, workers, alarm rules) are
only ever used alone. On a single Redis the tags are plain characters of the names.
"""
from __future__ import annotations

from dataclasses import dataclass

FRAME_GROUP = "workers"  # consumer group of the workers on every frame stream
STORE_GROUP = "store"  # consumer group of the store on every results stream
SINK_GROUP_PREFIX = "sink:"  # a sink's consumer group on the results and alarm streams: this + the sink's name
MAX_SINK_NAME = 64  # characters


MAX_CAMERA_NAME = 128  # characters


def check_camera(camera: str) -> str:
    """A camera name: 1 to MAX_CAMERA_NAME printable characters, no braces (they delimit its hash tag)."""
    if not isinstance(camera, str) or not 0 < len(camera) <= MAX_CAMERA_NAME:
        raise ValueError(f"bad camera name {str(camera)[:200]!r}: 1 to {MAX_CAMERA_NAME} characters")
    if "{" in camera or "}" in camera:
        raise ValueError(f"bad camera name {camera!r}: braces are not allowed (they delimit its hash tag)")
    if not camera.isprintable():
        raise ValueError(f"bad camera name {camera!r}: control characters are not allowed")
    return camera


def check_sink(name: str) -> str:
    """A sink's name (its consumer group and dead letters): 1 to MAX_SINK_NAME letters, digits, `-`, `_` or `.`."""
    if not isinstance(name, str) or not 0 < len(name) <= MAX_SINK_NAME \
            or not all(c.isascii() and (c.isalnum() or c in "-_.") for c in name):
        raise ValueError(f"bad sink name {str(name)[:200]!r}: 1 to {MAX_SINK_NAME} letters, digits, '-', '_' or '.'")
    return name


def sink_group(name: str) -> str:
    """The consumer group of sink `name` on every results and alarm stream (its own position in each)."""
    return SINK_GROUP_PREFIX + check_sink(name)


@dataclass(frozen=True)
class CameraNames:
    """The members of the camera set, sorted: the valid names, and those refused (any process may read the set,
    and a camera credential may add to it, so a bad member is skipped and reported, never fatal)."""
    names: tuple[str, ...]
    refused: tuple[bytes, ...]


def camera_names(members) -> CameraNames:
    """Split raw members of the camera set (bytes or str) into valid camera names and refused members."""
    names, refused = [], []
    for member in members:
        raw = member.encode(errors="surrogateescape") if isinstance(member, str) else bytes(member)
        try:
            names.append(check_camera(raw.decode("utf-8")))
        except (UnicodeDecodeError, ValueError):
            refused.append(raw)
    return CameraNames(tuple(sorted(names)), tuple(sorted(refused)))


def camera_of(key: str | bytes) -> str:
    """The camera whose hash tag a per-camera key carries (`pc:frames:{cam-1}` -> `cam-1`)."""
    key = key.decode() if isinstance(key, bytes) else key
    start = key.find("{")
    end = key.find("}", start + 1)
    if start < 0 or end < 0:
        raise ValueError(f"{key!r} is not a per-camera key")
    return key[start + 1:end]


@dataclass(frozen=True)
class Keys:
    prefix: str = "pc"

    def _camera(self, kind: str, camera: str) -> str:
        return f"{self.prefix}:{kind}:{{{check_camera(camera)}}}"

    @property
    def _bank(self) -> str:  # the registry's hash tag: all of it in one slot
        return f"{self.prefix}:{{bank}}"

    # cameras and frames
    @property
    def cameras(self) -> str:  # set of camera names that have a frame stream
        return f"{self.prefix}:cameras"

    def frames(self, camera: str) -> str:  # stream of Frame messages
        return self._camera("frames", camera)

    def camera_stats(self, camera: str) -> str:  # hash: ingested, dropped, last_seq, results, deadlettered, state
        return self._camera("stats", camera)

    def camera_limits(self, camera: str) -> str:  # hash: max_entry_bytes, max_stream_len (operators write; add_frame reads)
        return self._camera("limits", camera)

    def deadletter(self, camera: str) -> str:  # stream: reason, stream, id, worker, at, size, head, payload (id below)
        return self._camera("deadletter", camera)

    def preview(self, camera: str) -> str:  # JPEG of the camera's latest frame (ingest, at most 1/s), with a TTL
        return self._camera("preview", camera)

    def deadletter_payloads(self, camera: str) -> str:  # stream: the original bytes of its newest dead letters (bounded)
        return self._camera("deadletter:payloads", camera)

    # results and alarms
    def results(self, camera: str) -> str:  # stream of Result messages
        return self._camera("results", camera)

    def latest(self, camera: str) -> str:  # hash: the camera's latest result and alarm state
        return self._camera("latest", camera)

    def alarm_state(self, camera: str) -> str:  # hash: version, window (the store's debounce and drift state,
        return self._camera("alarmstate", camera)  # JSON), drift_announced (the last drift event written)

    def drift(self, camera: str) -> str:  # stream of the camera's DriftEvent messages (drift, cleared, acknowledged)
        return self._camera("drift", camera)

    @property
    def drift_channel(self) -> str:  # Pub/Sub channel of DriftEvent messages (live, best effort)
        return f"{self.prefix}:drift:live"

    def overlay(self, camera: str, seq: int) -> str:  # JPEG bytes, with a TTL
        return f"{self._camera('overlay', camera)}:{seq}"

    def frame_copy(self, camera: str, seq: int) -> str:  # an anomalous frame's Frame message, with a TTL
        return f"{self._camera('framecopy', camera)}:{seq}"

    @property
    def dismissed(self) -> str:  # hash: "<camera>:<seq>" -> JSON {at, bank, by}: alarms dismissed as false
        return f"{self._bank}:dismissed"  # in the registry's slot: written together with a bank's update queue

    def alarms(self, camera: str) -> str:  # durable stream of the camera's Alarm messages (store.alarms.feed reads all)
        return self._camera("alarms", camera)

    @property
    def acknowledged(self) -> str:  # hash: "<camera>:<seq>" -> JSON {at, by}: alarms an operator acknowledged
        return f"{self.prefix}:alarms:acknowledged"

    @property
    def alarms_channel(self) -> str:  # Pub/Sub channel of Alarm messages (live, best effort)
        return f"{self.prefix}:alarms:live"

    @property
    def alarm_rules(self) -> str:  # hash: camera or "line:<name>" -> JSON AlarmRule overrides
        return f"{self.prefix}:alarm_rules"

    @property
    def drift_settings(self) -> str:  # hash: camera -> JSON of its DriftSettings overrides (store.alarms.drift)
        return f"{self.prefix}:drift_settings"

    # sinks (sinks/: verdicts and alarms delivered to MQTT, webhooks, OPC UA)
    @property
    def sink_health(self) -> str:  # hash: "<sink>/<consumer>" -> JSON {destination, state, pending, delivered, ...}
        return f"{self.prefix}:sinks:health"

    def sink_deadletter(self, sink: str, camera: str) -> str:  # stream: what sink `sink` refused for good, with why
        return f"{self._camera('sinkdeadletter', camera)}:{check_sink(sink)}"  # the camera's slot: acked atomically

    # per-camera control (contracts/control.py) and the audit trail: the settings hash and its version counter
    # share the `{control}` hash tag (runtime/lua/camera_settings_write.lua writes both at once)
    @property
    def camera_settings(self) -> str:  # hash: camera -> packed CameraSettings (sensitivity, region of interest)
        return f"{self.prefix}:{{control}}:camera_settings"

    @property
    def camera_settings_version(self) -> str:  # string: the highest CameraSettings version written (workers poll it)
        return f"{self.prefix}:{{control}}:camera_settings:version"

    @property
    def audit(self) -> str:  # stream of AuditEntry fields: who changed what alarms or what is kept (append-only)
        return f"{self.prefix}:audit"

    @property
    def workers(self) -> str:  # hash: worker name -> last heartbeat (unix s)
        return f"{self.prefix}:workers"

    # bank registry
    @property
    def banks(self) -> str:  # set of bank names
        return f"{self._bank}:names"

    def bank_versions(self, name: str) -> str:  # hash: version -> JSON metadata (sha256, size, published_at, ...)
        return f"{self._bank}:{name}:versions"

    def bank_blob(self, name: str, version: int) -> str:  # bank file bytes: the whole file, or its chunk 0
        return f"{self._bank}:{name}:blob:{version}"

    def bank_blob_chunk(self, name: str, version: int, index: int) -> str:  # chunk `index` >= 1 of a chunked bank
        if index < 1:  # chunk 0 is bank_blob: a bank of one chunk is stored as before chunking
            raise ValueError(f"bank chunk index {index}: chunk 0 is bank_blob")
        return f"{self._bank}:{name}:blob:{version}:{index}"

    def bank_active(self, name: str) -> str:  # string: the active version
        return f"{self._bank}:{name}:active"

    def bank_history(self, name: str) -> str:  # list of previously active versions, newest last (for rollback)
        return f"{self._bank}:{name}:history"

    def bank_counter(self, name: str) -> str:  # INCR source of version numbers
        return f"{self._bank}:{name}:next"

    def bank_updates(self, name: str) -> str:  # stream of good frames (Frame messages) queued for the next update
        return f"{self._bank}:{name}:updates"
