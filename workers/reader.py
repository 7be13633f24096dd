"""The reader stage (the loop thread): fair reads across the camera streams, reclaiming abandoned frames, and
unpacking and decoding a batch. It writes nothing to Redis but XREADGROUP/XAUTOCLAIM's delivery bookkeeping: frames it
cannot accept become DeadLetter outcomes, written by the writer."""
from __future__ import annotations

import functools
import threading
import time
from typing import Callable, Iterable

import redis

from contracts.framecodec import FrameDecodeError, decode_frames
from contracts.keys import FRAME_GROUP, Keys
from contracts.messages import Frame, MessageError
from runtime.streams import REDIS_ERRORS, CameraStreams, deliveries, reclaim
from scorer import resolve_device
from scorer.preprocess import decode_images
from workers.outcomes import Batch, DeadLetter, Decoded, Entry, Outcome
from workers.settings import WorkerSettings


class Reader:
    def __init__(self, client: redis.Redis, settings: WorkerSettings, keys: Keys, stop: threading.Event):
        self.client, self.settings, self.keys, self.stop = client, settings, keys, stop
        self.streams = CameraStreams(client, keys.cameras, keys.frames, FRAME_GROUP, settings.refresh_s)
        self._waiting: list[Entry] = []  # ours (pending) and in no batch yet: reclaimed, or read beyond the cap
        # JPEGs are decoded where they are scored (together, with nvJPEG, on a GPU)
        self._decode_many = functools.partial(decode_images, device=resolve_device(settings.device))

    def forget(self) -> None:
        """NOGROUP: the stream or its group is gone (data loss); re-create groups, drop the frames waiting."""
        self.streams.forget()
        self._waiting = []

    def reclaim(self) -> int:
        """Take over frames another consumer left unacknowledged for longer than claim_idle_ms; how many."""
        taken = []
        for stream in self.streams.names:
            claimed = list(reclaim(self.client, stream, FRAME_GROUP, self.settings.name, self.settings.claim_idle_ms))
            counts = deliveries(self.client, stream, FRAME_GROUP, self.settings.name, [i for i, _ in claimed])
            taken += [Entry(stream, entry_id, fields.get(b"m", b""), time.time(), counts.get(entry_id, 1))
                      for entry_id, fields in claimed]
        self._waiting = self._waiting + taken
        return len(taken)

    def collect(self, readable: list[str], scorer_busy: Callable[[], bool], held: Iterable[Entry] = ()) -> list[Entry]:
        """At most max_batch frames over the `readable` streams, waiting at most max_wait_ms after the first arrives.

        Reads go through CameraStreams.read_fair (a hard cap, and a backlogged camera cannot starve
        the others). Pipelined, a batch collected while the previous one is scored stays open until that
        one is scored (`scorer_busy` turns false, or the batch is full): it takes what arrived meanwhile, as
        an unpipelined worker's next batch would, instead of going on in small batches that cost more per frame.
        When nothing is waiting, one blocking read (COUNT 1 per stream) wakes on the first arrival; any frames
        it returns beyond the cap are already ours and go first next batch.

        This worker's own pending frames go first when CameraStreams says so (at start, after a new connection: a
        lost read reply): the caller has nothing in flight then (Worker._collect drains first), so what is pending
        to this worker and neither waiting here nor `held` was delivered and never seen. A read that finds them due
        mid-batch ends the batch; the next collect reads them.
        """
        cap = self.settings.max_batch
        if readable and self.streams.recovery_due(readable):
            self._recover(readable, held)
        batch, self._waiting = self._waiting[:cap], self._waiting[cap:]
        if not readable:
            self.stop.wait(0.1)
            return batch
        try:
            return self._fill(batch, cap, readable, scorer_busy)
        except REDIS_ERRORS:
            self._waiting = batch + self._waiting  # read (ours, pending): they go first once Redis answers again
            raise

    def _fill(self, batch: list[Entry], cap: int, readable: list[str], scorer_busy: Callable[[], bool]) -> list[Entry]:
        deadline = None
        while len(batch) < cap and not self.stop.is_set() and not self.streams.recovery_due(readable):
            reply = self.streams.read_fair(self.settings.name, cap - len(batch), readable)
            if not reply:
                if deadline is None:
                    block_ms = 200 if not batch else self.settings.max_wait_ms  # idle: wake to check `stop`
                else:
                    block_ms = int((deadline - time.monotonic()) * 1000)
                    if block_ms <= 0:
                        if not scorer_busy():
                            break
                        block_ms = 5  # the scorer is still busy: frames arriving meanwhile join this batch
                reply = self.streams.read_blocking(self.settings.name, cap - len(batch), readable, max(1, block_ms))
            now = time.time()
            entries = [Entry(stream, entry_id, (fields or {}).get(b"m", b""), now)
                       for stream, stream_entries in reply or [] for entry_id, fields in stream_entries]
            room = cap - len(batch)
            batch += entries[:room]
            self._waiting = self._waiting + entries[room:]
            if batch and deadline is None:
                deadline = time.monotonic() + self.settings.max_wait_ms / 1000
            if not reply and not batch:
                return batch
        return batch

    def _recover(self, readable: list[str], held: Iterable[Entry]) -> None:
        """This worker's own pending frames on `readable` streams that it does not hold (waiting or `held`): first
        in line, with their delivery counts (for the poison rule: a lost reply is not a delivery of its own)."""
        known = frozenset((e.stream, e.entry_id) for e in [*self._waiting, *held])
        found = self.streams.read_own(self.settings.name, readable, known)
        now, taken = time.time(), []
        for stream, entries in found:
            counts = deliveries(self.client, stream, FRAME_GROUP, self.settings.name, [i for i, _ in entries])
            taken += [Entry(stream, entry_id, fields.get(b"m", b""), now, counts.get(entry_id, 1))
                      for entry_id, fields in entries if entry_id in counts]  # not taken over meanwhile
        self._waiting = taken + self._waiting

    def prepare(self, batch: list[Entry]) -> Batch:
        """Unpack, check and decode the frames (JPEGs together); those that cannot be accepted get a DeadLetter.
        Decoded frames are grouped by bank name, each with its decoding time in ms."""
        rejected: list[tuple[Entry, Outcome]] = []
        frames: list[tuple[Entry, Frame, float]] = []
        for entry in batch:
            if entry.deliveries > self.settings.max_deliveries:
                rejected.append((entry, DeadLetter(f"poison: delivered {entry.deliveries} times without an outcome "
                                                   f"(limit {self.settings.max_deliveries})")))
                continue
            started = time.perf_counter()
            try:
                frame = Frame.unpack(entry.raw, self.settings.max_frame_bytes)
                if self.keys.frames(frame.camera) != entry.stream:
                    raise MessageError(f"frame of camera {frame.camera!r} arrived on {entry.stream}")
            except MessageError as exc:
                rejected.append((entry, DeadLetter(str(exc))))
                continue
            frames.append((entry, frame, (time.perf_counter() - started) * 1000))
        started = time.perf_counter()
        images = decode_frames([frame for _, frame, _ in frames], self.settings.max_pixels, self._decode_many)
        share_ms = (time.perf_counter() - started) * 1000 / max(1, len(frames))
        by_bank: dict[str, list[Decoded]] = {}
        for (entry, frame, unpack_ms), image in zip(frames, images):
            if isinstance(image, FrameDecodeError):
                rejected.append((entry, DeadLetter(str(image))))
                continue
            by_bank.setdefault(frame.bank, []).append(Decoded(entry, frame, image, unpack_ms + share_ms))
        return Batch(tuple(batch), {bank: tuple(items) for bank, items in by_bank.items()}, tuple(rejected))
