"""Redis key and channel names: the one place they are spelled. All start with a configurable prefix."""
from __future__ import annotations

from dataclasses import dataclass

FRAME_GROUP = "workers"  # consumer group of the workers on every frame stream
STORE_GROUP = "store"  # consumer group of the store on every results stream


@dataclass(frozen=True)
class Keys:
    prefix: str = "pc"

    # cameras and frames
    @property
    def cameras(self) -> str:  # set of camera names that have a frame stream
        return f"{self.prefix}:cameras"

    def frames(self, camera: str) -> str:  # stream of Frame messages
        return f"{self.prefix}:frames:{camera}"

    def camera_stats(self, camera: str) -> str:  # hash: ingested, dropped, last_seq, results, deadlettered, state
        return f"{self.prefix}:stats:{camera}"

    def preview(self, camera: str) -> str:  # JPEG of the camera's latest frame (ingest, at most 1/s), with a TTL
        return f"{self.prefix}:preview:{camera}"

    @property
    def deadletter(self) -> str:  # stream: reason, stream, id, worker, at, size, head, payload (id below)
        return f"{self.prefix}:deadletter"

    @property
    def deadletter_payloads(self) -> str:  # stream: the original bytes of the newest dead letters (bounded)
        return f"{self.prefix}:deadletter:payloads"

    # results and alarms
    def results(self, camera: str) -> str:  # stream of Result messages
        return f"{self.prefix}:results:{camera}"

    def latest(self, camera: str) -> str:  # hash: the camera's latest result and alarm state
        return f"{self.prefix}:latest:{camera}"

    def alarm_state(self, camera: str) -> str:  # hash: version, window (the store's debounce state, JSON)
        return f"{self.prefix}:alarmstate:{camera}"

    def overlay(self, camera: str, seq: int) -> str:  # JPEG bytes, with a TTL
        return f"{self.prefix}:overlay:{camera}:{seq}"

    def frame_copy(self, camera: str, seq: int) -> str:  # an anomalous frame's Frame message, with a TTL
        return f"{self.prefix}:framecopy:{camera}:{seq}"

    @property
    def dismissed(self) -> str:  # hash: "<camera>:<seq>" -> JSON {at, bank, by}: alarms dismissed as false
        return f"{self.prefix}:alarms:dismissed"

    @property
    def acknowledged(self) -> str:  # hash: "<camera>:<seq>" -> JSON {at, by}: alarms an operator acknowledged
        return f"{self.prefix}:alarms:acknowledged"

    @property
    def alarms(self) -> str:  # durable stream of Alarm messages
        return f"{self.prefix}:alarms"

    @property
    def alarms_channel(self) -> str:  # Pub/Sub channel of Alarm messages (live, best effort)
        return f"{self.prefix}:alarms:live"

    @property
    def alarm_rules(self) -> str:  # hash: camera or "line:<name>" -> JSON AlarmRule overrides
        return f"{self.prefix}:alarm_rules"

    @property
    def workers(self) -> str:  # hash: worker name -> last heartbeat (unix s)
        return f"{self.prefix}:workers"

    # bank registry
    @property
    def banks(self) -> str:  # set of bank names
        return f"{self.prefix}:banks"

    def bank_versions(self, name: str) -> str:  # hash: version -> JSON metadata (sha256, size, published_at, ...)
        return f"{self.prefix}:bank:{name}:versions"

    def bank_blob(self, name: str, version: int) -> str:  # bank file bytes
        return f"{self.prefix}:bank:{name}:blob:{version}"

    def bank_active(self, name: str) -> str:  # string: the active version
        return f"{self.prefix}:bank:{name}:active"

    def bank_history(self, name: str) -> str:  # list of previously active versions, newest last (for rollback)
        return f"{self.prefix}:bank:{name}:history"

    def bank_counter(self, name: str) -> str:  # INCR source of version numbers
        return f"{self.prefix}:bank:{name}:next"

    def bank_updates(self, name: str) -> str:  # stream of good frames (Frame messages) queued for the next update
        return f"{self.prefix}:bank:{name}:updates"
