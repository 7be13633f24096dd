"""A consumer-group worker: dynamic batches across cameras, one backbone pass and one search per bank.

A frame is acknowledged (and deleted from its stream) in the same transaction that writes its
result, so a crash loses nothing: unacknowledged frames of a dead worker are reclaimed after
`claim_idle_ms`. Frames that cannot be accepted (malformed, undecodable, an image header that
disagrees with the frame) go to the dead-letter stream at once. Infrastructure faults (no loadable
bank, a host that cannot score: memory, device, files; Redis refusing writes) never do: the frames
stay pending, held by this worker (their idle time kept fresh, their delivery count unchanged) and
retried with backoff, and the condition shows in the camera's `fault`. A fault of this host
(its weights, memory or device) also stops it taking frames and lets its held ones go to other
workers after `claim_idle_ms` (a counted delivery). A batch whose scoring raises
anything else is split in halves until the frames that raise alone are found; those are left
pending, and a frame delivered more than `max_deliveries` times (XPENDING's count: each reclaim,
including after a worker died on it) is dead-lettered as poison.

Pipelining (`prefetch`, on by default): while one batch is scored (the
scoring thread) and the previous batch's results are written (the writer thread), the loop reads the next
batch from Redis and decodes it (JPEGs together, on the GPU when the worker scores there), from the first
batch that has its outcomes with nothing held on (until then, and after any hold, the next batch is read
only once the one in flight is written). At most one batch is scored and one written at a time, results
in batch order; both are finished before held frames are retried, streams refreshed or frames reclaimed,
and before the worker stops. A frame is still acknowledged only by the script that writes its outcome.
"""
from __future__ import annotations

import functools
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np
import redis
import torch

from runtime.connection import is_cluster, node_groups, refresh_topology
from runtime.deadletter import DeadLetters
from contracts.keys import FRAME_GROUP, Keys, camera_of
from contracts.framecodec import FrameDecodeError, decode_frames
from contracts.messages import Frame, MessageError, Result
from runtime.metrics import BATCH_SIZE, results_written
from workers.banks.registry import BankRegistry
from runtime import scripts
from runtime.streams import (REDIS_ERRORS, CameraStreams, deliveries, keep_pending, reclaim,
                               redis_fault, serve)
from scorer import BackboneError, resolve_device
from scorer.features import ComputeConfig
from scorer.preprocess import decode_images
from scorer.views import patch_canvas

from workers.banks.cache import BankCache
from workers.settings import WorkerReport, WorkerSettings

log = logging.getLogger("patchcore.worker")


@dataclass
class _Entry:
    stream: str
    entry_id: bytes
    raw: bytes
    picked_at: float
    deliveries: int = 1  # XPENDING's count when this worker got it


class Worker:
    def __init__(self, client: redis.Redis, settings: WorkerSettings = WorkerSettings(), keys: Keys = Keys(),
                 stop: threading.Event | None = None):
        self.client = client
        self.settings = settings
        self.keys = keys
        self.stop = stop or threading.Event()
        self.banks = BankCache(BankRegistry(client, keys, signing_key=settings.bank_key), settings.device,
                               settings.index, settings.weights, ComputeConfig(settings.precision, settings.channels_last),
                               search=settings.search)
        self.report = WorkerReport()
        self._ack_and_write = scripts.load(client, "ack_and_write")
        self._streams = CameraStreams(client, keys.cameras, keys.frames, FRAME_GROUP, settings.refresh_s)
        self._reclaimed: list[_Entry] = []
        self._deadletters = DeadLetters(client, keys, settings.deadletters)
        self._held: list[_Entry] = []  # pending through an infrastructure fault, retried at _retry_at
        self._retry_at = 0.0
        self._retry_s = settings.retry_initial_s
        self._sick = False  # this host cannot score now: take no frames, keep none from other workers
        self._faulted: set[str] = set()  # cameras whose `fault` this worker has set
        # JPEGs are decoded where they are scored (together, with nvJPEG, on a GPU)
        self._decode_many = functools.partial(decode_images, device=resolve_device(settings.device))
        self._scoring = ThreadPoolExecutor(1, thread_name_prefix="score")  # the batch in flight (prefetch) ...
        self._inflight: Future | None = None
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="write")  # ... and the one before it, written
        self._writing_batch: Future | None = None
        self._counting = threading.Lock()
        self._proven = False  # the last batch got its outcomes with nothing held: prefetching may go on

    # ---- the loop -------------------------------------------------------------------------------
    def run(self) -> WorkerReport:
        try:
            serve(self._step, self.stop, log, self.settings.name, on_lost_group=self._lost_group)
            self._drain()  # the batch in flight gets its outcomes before the worker stops
        except REDIS_ERRORS as exc:  # its frames stay pending: another worker reclaims them
            log.warning("stopped with a batch unwritten", extra={"fields": {"error": str(exc)}})
        finally:
            self._scoring.shutdown(wait=True)
            self._writer.shutdown(wait=True)
            unwritten = self._writing_batch.exception() if self._writing_batch is not None else None
            if unwritten is not None:  # its frames stay pending: another worker reclaims them
                log.warning("stopped with a batch unwritten", extra={"fields": {"error": str(unwritten)}})
        return self.report

    def _step(self) -> None:
        self._maybe_refresh()
        if self._held and time.monotonic() >= self._retry_at:
            # held frames change only while no batch is in flight (the writer holds frames, and moves _retry_at)
            self._drain()
            if time.monotonic() >= self._retry_at:
                retry, self._held, self._sick = self._held, [], False
                for begin in range(0, len(retry), self.settings.max_batch):
                    self.process(retry[begin:begin + self.settings.max_batch])
                # still failing: back off further; all through: the next fault starts afresh
                self._retry_s = min(self._retry_s * 2, self.settings.retry_max_s) if self._held else self.settings.retry_initial_s
                self._retry_at = time.monotonic() + self._retry_s
        if not self._proven:
            # until a batch has gone through cleanly (at the start, after any hold), read the next batch only
            # once the one in flight has its outcomes: a worker that turns out sick or bankless has taken one
            # batch, not two
            self._drain()
        batch = self._collect()
        if not batch:
            return
        if not self.settings.prefetch:
            self.process(batch)
            return
        decoded = self._prepare_or_hold(batch)  # while the previous batch is scored (and the one before written)
        self._wait_scored()  # its results may still be written while this batch is scored
        if decoded is not None:
            self._inflight = self._scoring.submit(self._finish, batch, decoded, True)

    def _drain(self) -> None:
        """Wait for the batch in flight to be scored and written; an exception of either (e.g. NOGROUP) is
        raised here, in the loop."""
        self._wait_scored()  # scored, and its writing handed on
        self._wait_written()

    def _wait_scored(self) -> None:
        inflight, self._inflight = self._inflight, None
        if inflight is not None:
            inflight.result()

    def _wait_written(self) -> None:
        writing, self._writing_batch = self._writing_batch, None
        if writing is not None:
            writing.result()

    def _lost_group(self) -> None:
        """NOGROUP: the stream or its group is gone (data loss); re-create groups, drop what we hold."""
        self._streams.forget()
        self._held, self._reclaimed, self._sick = [], [], False

    def _readable(self) -> list[str]:
        """Streams to read new frames from: not those of which this worker already holds a batch."""
        if self._sick:
            return []
        held: dict[str, int] = {}
        for entry in self._held:
            held[entry.stream] = held.get(entry.stream, 0) + 1
        return [s for s in self._streams.names if held.get(s, 0) < self.settings.max_batch]

    def _maybe_refresh(self) -> None:
        # a worker that reads no stream yet looks for cameras at every idle tick (0.1 s), not every refresh_s:
        # the first camera's first frames do not wait up to refresh_s to be seen
        if not self._streams.due() and self._streams.names:
            return
        self._drain()
        self._streams.refresh()
        self.client.hset(self.keys.workers, self.settings.name, time.time())
        self.banks.preload()  # every active bank, before its first frame: readiness means "can score"
        self._keep_held()
        self._reclaim()

    def _keep_held(self) -> None:
        """Keep held frames from looking abandoned; forget those another consumer took or finished."""
        by_stream: dict[str, list[_Entry]] = {}
        for entry in self._held:
            by_stream.setdefault(entry.stream, []).append(entry)
        kept = []
        for stream, entries in by_stream.items():
            ids = [e.entry_id for e in entries]
            owned = (deliveries if self._sick else keep_pending)(self.client, stream, FRAME_GROUP, self.settings.name, ids)
            kept += [e for e in entries if e.entry_id in owned]
        self._held = kept
        self._sick = self._sick and bool(kept)  # all taken over: probe with new frames again

    def _reclaim(self) -> None:
        """Take over frames another consumer left unacknowledged for longer than claim_idle_ms."""
        if self._sick:
            return
        for stream in self._streams.names:
            claimed = list(reclaim(self.client, stream, FRAME_GROUP, self.settings.name, self.settings.claim_idle_ms))
            counts = deliveries(self.client, stream, FRAME_GROUP, self.settings.name, [i for i, _ in claimed])
            for entry_id, fields in claimed:
                self._reclaimed.append(_Entry(stream, entry_id, fields.get(b"m", b""), time.time(),
                                              counts.get(entry_id, 1)))
                self.report.reclaimed += 1

    def _collect(self) -> list[_Entry]:
        """At most max_batch frames over all cameras, waiting at most max_wait_ms after the first arrives.

        Reads go through CameraStreams.read_fair (a hard cap, and a backlogged camera cannot starve
        the others). Pipelined, a batch collected while the previous one is scored stays open until that
        one is scored (or the batch is full): it takes what arrived meanwhile, as an unpipelined worker's
        next batch would, instead of going on in small batches that cost more per frame. When nothing is
        waiting, one blocking read (COUNT 1 per stream) wakes on the
        first arrival; any frames it returns beyond the cap are already ours and go first next batch.
        """
        cap = self.settings.max_batch
        batch, self._reclaimed = self._reclaimed[:cap], self._reclaimed[cap:]
        readable = self._readable()
        if not readable:
            self.stop.wait(0.1)
            return batch
        try:
            return self._fill(batch, cap, readable)
        except REDIS_ERRORS:
            self._reclaimed[:0] = batch  # read (ours, pending): they go first once Redis answers again
            raise

    def _fill(self, batch: list[_Entry], cap: int, readable: list[str]) -> list[_Entry]:
        deadline = None
        while len(batch) < cap and not self.stop.is_set():
            reply = self._streams.read_fair(self.settings.name, cap - len(batch), readable)
            if not reply:
                if deadline is None:
                    block_ms = 200 if not batch else self.settings.max_wait_ms  # idle: wake to check `stop`
                else:
                    block_ms = int((deadline - time.monotonic()) * 1000)
                    if block_ms <= 0:
                        if self._inflight is None or self._inflight.done():
                            break
                        block_ms = 5  # the scorer is still busy: frames arriving meanwhile join this batch
                reply = self._streams.read_blocking(self.settings.name, cap - len(batch), readable, max(1, block_ms))
            now = time.time()
            entries = [_Entry(stream, entry_id, (fields or {}).get(b"m", b""), now)
                       for stream, stream_entries in reply or [] for entry_id, fields in stream_entries]
            room = cap - len(batch)
            batch += entries[:room]
            self._reclaimed += entries[room:]
            if batch and deadline is None:
                deadline = time.monotonic() + self.settings.max_wait_ms / 1000
            if not reply and not batch:
                return batch
        return batch

    # ---- one batch ------------------------------------------------------------------------------
    def process(self, batch: list[_Entry]) -> None:
        """Give each frame of the batch its outcome, or hold it (infrastructure) or leave it pending (suspect)."""
        decoded = self._prepare_or_hold(batch)
        if decoded is not None:
            self._finish(batch, decoded)

    def _prepare_or_hold(self, batch: list[_Entry]) -> dict | None:
        self.report.batches += 1
        self.report.frames += len(batch)
        BATCH_SIZE.observe(len(batch))
        try:
            return self._prepare(batch)
        except REDIS_ERRORS as exc:  # dead-lettering failed: hold the batch (see _finish)
            held = self._redis_held(batch, exc)
            try:
                self._drain()  # the writer holds frames and sets _proven: it finishes first (one thread at a time)
            finally:
                self._hold(held)
                self._proven = False
            return None

    def _finish(self, batch: list[_Entry], decoded: dict, pipelined: bool = False) -> None:
        """Score the batch, then write its outcomes: here, or (`pipelined`) in the writer thread, once the
        previous batch's are written, while this thread goes on to the next batch."""
        try:
            scored, held = self._scored(decoded)
        except REDIS_ERRORS as exc:  # dead-lettering a refused frame failed: hold the batch (as in _write)
            scored, held = [], self._redis_held(batch, exc)
        if not pipelined:
            self._write(batch, scored, held)
            return
        try:
            self._wait_written()  # one batch being written at a time, in order; its exception goes to the loop
        finally:  # ... and this batch is still written (or held)
            self._writing_batch = self._writer.submit(self._write, batch, scored, held)

    def _write(self, batch: list[_Entry], scored: list, held: list[tuple[_Entry, str, bool]]) -> None:
        """Write the scored frames' results; hold `held` (and, if Redis refuses the writes, the whole batch)."""
        try:
            for active, items, result, score_ms in scored:
                self._write_results(active, items, result, score_ms)
        except REDIS_ERRORS as exc:  # e.g. OOM or READONLY while writing: outcomes already written stay
            held = self._redis_held(batch, exc)  # written (a retry finds them acknowledged, writes nothing twice)
        self._hold(held)
        self._proven = not held

    def _redis_held(self, batch: list[_Entry], exc: Exception) -> list[tuple[_Entry, str, bool]]:
        fault = redis_fault(exc)
        if fault in (None, "nogroup"):
            raise exc
        refresh_topology(self.client)  # a cluster's node met directly (results are written per node) moved or died
        return [(entry, f"redis {fault}: {exc}", False) for entry in batch]

    def _prepare(self, batch: list[_Entry]) -> dict[str, list[tuple[_Entry, Frame, np.ndarray, float]]]:
        """Unpack, check and decode the frames (JPEGs together); dead-letter those that cannot be accepted.
        Returns the decoded frames by bank name, each with its decoding time in ms."""
        frames: list[tuple[_Entry, Frame, float]] = []
        for entry in batch:
            if entry.deliveries > self.settings.max_deliveries:
                self._deadletter(entry, f"poison: delivered {entry.deliveries} times without an outcome "
                                        f"(limit {self.settings.max_deliveries})")
                continue
            started = time.perf_counter()
            try:
                frame = Frame.unpack(entry.raw, self.settings.max_frame_bytes)
                if self.keys.frames(frame.camera) != entry.stream:
                    raise MessageError(f"frame of camera {frame.camera!r} arrived on {entry.stream}")
            except MessageError as exc:
                self._deadletter(entry, str(exc))
                continue
            frames.append((entry, frame, (time.perf_counter() - started) * 1000))
        started = time.perf_counter()
        images = decode_frames([frame for _, frame, _ in frames], self.settings.max_pixels, self._decode_many)
        share_ms = (time.perf_counter() - started) * 1000 / max(1, len(frames))
        decoded: dict[str, list[tuple[_Entry, Frame, np.ndarray, float]]] = {}
        for (entry, frame, unpack_ms), image in zip(frames, images):
            if isinstance(image, FrameDecodeError):
                self._deadletter(entry, str(image))
                continue
            decoded.setdefault(frame.bank, []).append((entry, frame, image, unpack_ms + share_ms))
        return decoded

    def _scored(self, decoded: dict) -> tuple[list, list[tuple[_Entry, str, bool]]]:
        """Score the decoded frames by bank. Returns [(bank, items, result, ms per frame)] to write, and the
        frames to hold, why, and whether this host is the cause."""
        scored, held = [], []
        for bank_name, items in decoded.items():
            active = self.banks.get(bank_name)
            if active is None:
                reason, host = self.banks.why(bank_name)
                held += [(entry, f"no loadable active bank {bank_name!r}: {reason}", host) for entry, *_ in items]
                continue
            refusals = [(item, active.scorer.refusal(*item[2].shape[:2])) for item in items]
            for (entry, *_), reason in refusals:
                if reason is not None:
                    self._deadletter(entry, f"frame cannot be scored in bank {bank_name!r}: {reason}")
            items = [item for item, reason in refusals if reason is None]
            if not items:
                continue
            try:
                parts, suspects = self._score(active, items)
            except Exception as exc:  # noqa: BLE001 - classified by _host_fault; anything else is split
                held += [(entry, f"scoring failed on this host: {type(exc).__name__}: {exc}", True) for entry, *_ in items]
                continue
            scored += [(active, part, result, score_ms) for part, result, score_ms in parts]
            for entry, error in suspects:  # left pending: reclaimed after claim_idle_ms, counted each time
                self.report.suspects += 1
                log.error("frame raises when scored alone; left pending",
                          extra={"fields": {"stream": entry.stream, "id": entry.entry_id.decode(),
                                            "deliveries": entry.deliveries, "error": error}})
        return scored, held

    def _score(self, active, items):
        """Score `items` in one pass; if that raises (not a host fault), halve until the frames that
        raise on their own are found. Returns ([(items, result, ms per frame)], [(entry, error)])."""
        started = time.perf_counter()
        try:
            result = active.scorer.score([image for _, _, image, _ in items], maps=False)
        except Exception as exc:  # noqa: BLE001 - a poison batch must not take good frames down with it
            if _host_fault(exc):
                raise
            if len(items) == 1:
                return [], [(items[0][0], f"{type(exc).__name__}: {exc}")]
            log.warning("batch scoring failed; splitting it", extra={"fields": {"frames": len(items), "error": str(exc)}})
            half = len(items) // 2
            first, second = self._score(active, items[:half]), self._score(active, items[half:])
            return first[0] + second[0], first[1] + second[1]
        return [(items, result, (time.perf_counter() - started) * 1000 / len(items))], []

    def _hold(self, held: list[tuple[_Entry, str, bool]]) -> None:
        """Keep frames pending through an infrastructure fault; show it on their cameras; retry with backoff."""
        self._held += [entry for entry, _, _ in held]
        self._sick = self._sick or any(host for _, _, host in held)
        self.report.held += len(held)
        reasons = {entry.stream: reason for entry, reason, _ in held}
        if held:
            self._retry_at = max(self._retry_at, time.monotonic() + self._retry_s)
            log.warning("frames held pending", extra={"fields": {"frames": len(held), "retry_in_s": self._retry_s,
                                                                 "reasons": sorted(set(reasons.values()))}})
        try:
            for stream, reason in reasons.items():
                camera = camera_of(stream)
                self.client.hset(self.keys.camera_stats(camera), mapping={
                    "fault": f"{reason} (worker {self.settings.name} holds its frames, retrying)",
                    "fault_at": time.time()})
                self._faulted.add(camera)
            holding = {entry.stream for entry in self._held}
            cleared = {c for c in self._faulted if self.keys.frames(c) not in holding}
            for camera in cleared:
                self.client.hdel(self.keys.camera_stats(camera), "fault", "fault_at")
            self._faulted -= cleared
        except REDIS_ERRORS:  # the fault may be Redis itself (OOM, READONLY): status shows that from INFO
            pass

    def _write_results(self, active, items, result, score_ms: float) -> None:
        scorer = active.scorer
        threshold = scorer.threshold
        now = time.time()
        started = time.perf_counter()
        verdicts = scorer.verdict(result.image_scores)
        rows = np.flatnonzero(verdicts).tolist()
        maps = dict(zip(rows, scorer.heatmaps(result, rows)))  # heatmaps only for the frames that get an overlay
        rows_out = []  # (overlay key, jpeg, Result message) per item, in order
        for i, (entry, frame, image, decode_ms) in enumerate(items):
            score = float(result.image_scores[i])
            anomalous = bool(verdicts[i])
            overlay_key = jpeg = None
            if anomalous:
                overlay_key = self.keys.overlay(frame.camera, frame.seq)
                if isinstance(image, torch.Tensor):  # decoded on the GPU
                    image = image.cpu().numpy()
                jpeg = cv2.imencode(".jpg", scorer.overlay(image, maps[i], score), [cv2.IMWRITE_JPEG_QUALITY, 85])[1].tobytes()
            message = Result(
                camera=frame.camera, line=frame.line, seq=frame.seq, captured_at=frame.captured_at, scored_at=now,
                score=score, threshold=threshold, anomalous=anomalous, bank=active.name,
                bank_version=active.version, worker=self.settings.name,
                timings_ms={"queue": round((entry.picked_at - frame.captured_at) * 1000, 2),
                            "decode": round(decode_ms, 2), "score": round(score_ms, 2)},
                overlay_key=overlay_key, **(self._patch_map(patch_canvas(result.patch_scores[i], result.layouts[i]))
                   if self.settings.result_maps else {}))
            rows_out.append((overlay_key, jpeg, message))
        # One pipeline per server holding these cameras (one on a single Redis, where it is a MULTI unless it
        # waits for replicas: WAIT does not wait inside MULTI). On a cluster each frame's write is still one
        # atomic script (its keys share the camera's slot); the overlay is written before its result.
        transaction = not is_cluster(self.client) and not self.settings.wait_replicas
        written_rows: set[int] = set()  # positions in items whose result this worker wrote
        for node, positions in node_groups(self.client, [entry.stream for entry, *_ in items]):
            script_calls = []  # positions of the script replies among the pipeline's replies
            with node.pipeline(transaction=transaction) as pipe:
                for i in positions:
                    entry, frame = items[i][:2]
                    overlay_key, jpeg, message = rows_out[i]
                    if overlay_key is not None:
                        pipe.set(overlay_key, jpeg, ex=self.settings.overlay_ttl_s)
                        # the frame itself, so an operator can dismiss a false alarm into the next bank update
                        pipe.set(self.keys.frame_copy(frame.camera, frame.seq), entry.raw, ex=self.settings.overlay_ttl_s)
                    script_calls.append(len(pipe.command_stack))
                    scripts.ack_and_write(
                        self._ack_and_write, stream=entry.stream, group=FRAME_GROUP, entry_id=entry.entry_id,
                        target=self.keys.results(frame.camera), stats=self.keys.camera_stats(frame.camera),
                        counter="results", maxlen=self.settings.results_maxlen, fields={"m": message.pack()}, pipe=pipe)
                if self.settings.wait_replicas:
                    pipe.execute_command("WAIT", self.settings.wait_replicas, self.settings.wait_ms)
                replies = pipe.execute()
            written = [replies[i] for i in script_calls]  # 0: another worker finished it first
            self.report.results += sum(written)
            written_rows.update(i for i, w in zip(positions, written) if w)
        results_written([(frame.camera, bool(verdicts[i]), frame.captured_at, entry.picked_at, decode_ms / 1000)
                         for i, (entry, frame, _, decode_ms) in enumerate(items) if i in written_rows],
                        score_ms / 1000, (time.perf_counter() - started) / len(items), time.time())

    def readiness(self) -> tuple[bool, dict]:
        """Ready (/readyz): a bank loaded and the workers' group joined on at least one camera stream."""
        banks, streams = self.banks.loaded(), len(self._streams.names)
        return bool(banks) and streams > 0, {"banks": banks, "frame_streams": streams}

    @staticmethod
    def _patch_map(grid: np.ndarray) -> dict:
        top = float(grid.max())
        quantised = np.round(grid / top * 255).astype(np.uint8) if top > 0 else np.zeros(grid.shape, np.uint8)
        return {"patch_map": quantised.tobytes(), "patch_map_shape": tuple(grid.shape), "patch_map_max": top}

    def _deadletter(self, entry: _Entry, reason: str) -> None:
        if self._deadletters.add(entry.stream, FRAME_GROUP, entry.entry_id, entry.raw, reason, self.settings.name):
            with self._counting:  # the loop (unreadable frames) and the scoring thread (refused sizes) both count
                self.report.deadlettered += 1
        log.warning("frame dead-lettered", extra={"fields": {"stream": entry.stream, "reason": reason}})


def _host_fault(exc: BaseException) -> bool:
    """Exceptions that say this host cannot score now (memory, device, files, weights), not that a frame is bad."""
    if isinstance(exc, (MemoryError, OSError, BackboneError, torch.cuda.OutOfMemoryError)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(s in text for s in ("CUDA", "cuDNN", "out of memory"))
