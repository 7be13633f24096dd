"""Frames held pending through an infrastructure fault (no loadable bank, a host that cannot score, Redis refusing
writes), owned by the loop thread alone: the writer reports Held outcomes back, the loop adds them here.

Held frames stay this worker's (their idle time kept fresh, their delivery count unchanged) and are retried with
backoff; the condition shows in their cameras' `fault`. A fault of this host makes it `sick`: it takes no frames
and lets its held ones go to other workers after claim_idle_ms (a counted delivery).
"""
from __future__ import annotations

import logging
import time

import redis

from contracts.keys import FRAME_GROUP, Keys, camera_of
from runtime.streams import REDIS_ERRORS, deliveries, keep_pending
from workers.outcomes import Entry, Held
from workers.settings import WorkerSettings

log = logging.getLogger("patchcore.worker")


class Holds:
    def __init__(self, client: redis.Redis, settings: WorkerSettings, keys: Keys):
        self.client, self.settings, self.keys = client, settings, keys
        self.entries: list[Entry] = []  # pending through an infrastructure fault, retried at retry_at
        self.retry_at = 0.0
        self.retry_s = settings.retry_initial_s
        self.sick = False  # this host cannot score now: take no frames, keep none from other workers
        self.faulted: frozenset[str] = frozenset()  # cameras whose `fault` this worker has set

    def due(self) -> bool:
        return bool(self.entries) and time.monotonic() >= self.retry_at

    def take(self) -> list[Entry]:
        """The held frames, to retry now (they are held again if still failing)."""
        retry, self.entries, self.sick = self.entries, [], False
        return retry

    def backoff(self) -> None:
        """After a retry: still failing, back off further; all through, the next fault starts afresh."""
        self.retry_s = min(self.retry_s * 2, self.settings.retry_max_s) if self.entries else self.settings.retry_initial_s
        self.retry_at = time.monotonic() + self.retry_s

    def forget(self) -> None:
        """NOGROUP: the frames are gone with their stream or group."""
        self.entries, self.sick = [], False

    def readable(self, streams: list[str]) -> list[str]:
        """Streams to read new frames from: none when sick, else not those of which a batch is held."""
        if self.sick:
            return []
        held: dict[str, int] = {}
        for entry in self.entries:
            held[entry.stream] = held.get(entry.stream, 0) + 1
        return [s for s in streams if held.get(s, 0) < self.settings.max_batch]

    def keep(self) -> None:
        """Keep held frames from looking abandoned (not when sick); forget those another consumer took or finished."""
        by_stream: dict[str, list[Entry]] = {}
        for entry in self.entries:
            by_stream.setdefault(entry.stream, []).append(entry)
        kept = []
        for stream, entries in by_stream.items():
            ids = [e.entry_id for e in entries]
            owned = (deliveries if self.sick else keep_pending)(self.client, stream, FRAME_GROUP, self.settings.name, ids)
            kept += [e for e in entries if e.entry_id in owned]
        self.entries = kept
        self.sick = self.sick and bool(kept)  # all taken over: probe with new frames again

    def add(self, held: tuple[tuple[Entry, Held], ...]) -> None:
        """Keep frames pending; show the fault on their cameras (and clear it on cameras no longer held)."""
        self.entries = self.entries + [entry for entry, _ in held]
        self.sick = self.sick or any(h.host_fault for _, h in held)
        reasons = {entry.stream: h.reason for entry, h in held}
        if held:
            self.retry_at = max(self.retry_at, time.monotonic() + self.retry_s)
            log.warning("frames held pending", extra={"fields": {"frames": len(held), "retry_in_s": self.retry_s,
                                                                 "reasons": sorted(set(reasons.values()))}})
        try:
            for stream, reason in reasons.items():
                camera = camera_of(stream)
                self.client.hset(self.keys.camera_stats(camera), mapping={
                    "fault": f"{reason} (worker {self.settings.name} holds its frames, retrying)",
                    "fault_at": time.time()})
                self.faulted = self.faulted | {camera}
            holding = {entry.stream for entry in self.entries}
            cleared = {c for c in self.faulted if self.keys.frames(c) not in holding}
            for camera in cleared:
                self.client.hdel(self.keys.camera_stats(camera), "fault", "fault_at")
            self.faulted = self.faulted - cleared
        except REDIS_ERRORS:  # the fault may be Redis itself (OOM, READONLY): status shows that from INFO
            pass
