"""A consumer-group worker: dynamic batches across cameras, one backbone pass and one search per bank.

A frame is acknowledged (and deleted from its stream) in the same transaction that writes its
result, so a crash loses nothing: unacknowledged frames of a dead worker are reclaimed after
`claim_idle_ms`. Undecodable frames go to the dead-letter stream with their reason and bytes.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field

import cv2
import numpy as np
import redis

from contracts.keys import FRAME_GROUP, Keys
from contracts.messages import Frame, MessageError, Result
from contracts.registry import BankRegistry
from contracts.streams import ACK_AND_WRITE, CameraStreams, reclaim, serve, stream_name
from scorer import ImageDecodeError, decode_image, to_rgb
from scorer.views import patch_canvas

from .banks import BankCache

log = logging.getLogger("patchcore.worker")


@dataclass(frozen=True)
class WorkerSettings:
    name: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    max_batch: int = 8
    max_wait_ms: int = 50
    claim_idle_ms: int = 30_000  # reclaim frames a dead worker left unacknowledged after this long
    results_maxlen: int = 10_000
    overlay_ttl_s: int = 3600
    result_maps: bool = False  # attach the patch-distance grid (uint8, e.g. 28x28) to every result
    max_frame_bytes: int = 16 << 20
    device: str = "auto"
    index: str = "auto"
    weights: str | None = None
    refresh_s: float = 2.0  # how often to look for new cameras and reclaim pending frames
    bank_key: bytes | None = field(default=None, repr=False)  # load only banks signed with this key (HMAC-SHA256)


@dataclass
class WorkerReport:
    batches: int = 0
    frames: int = 0
    results: int = 0
    deadlettered: int = 0
    reclaimed: int = 0


@dataclass
class _Entry:
    stream: str
    entry_id: bytes
    raw: bytes
    picked_at: float


def decode_frame(frame: Frame) -> np.ndarray:
    """A frame message's pixels as RGB uint8, checked against its declared shape."""
    if frame.encoding == "jpeg":
        image = decode_image(frame.data)
        height, width, _ = frame.shape
        if image.shape[:2] != (height, width):
            raise ImageDecodeError(f"decoded {image.shape[:2]}, message says {(height, width)}")
        return image
    array = np.frombuffer(frame.data, dtype=np.uint8).reshape(frame.shape)
    return to_rgb(array, "bgr")


class Worker:
    def __init__(self, client: redis.Redis, settings: WorkerSettings = WorkerSettings(), keys: Keys = Keys(),
                 stop: threading.Event | None = None):
        self.client = client
        self.settings = settings
        self.keys = keys
        self.stop = stop or threading.Event()
        self.banks = BankCache(BankRegistry(client, keys, signing_key=settings.bank_key), settings.device,
                               settings.index, settings.weights)
        self.report = WorkerReport()
        self._ack_and_write = client.register_script(ACK_AND_WRITE)
        self._streams = CameraStreams(client, keys.cameras, keys.frames, FRAME_GROUP, settings.refresh_s)
        self._reclaimed: list[_Entry] = []

    # ---- the loop -------------------------------------------------------------------------------
    def run(self) -> WorkerReport:
        serve(self._step, self.stop, log, self.settings.name)
        return self.report

    def _step(self) -> None:
        self._maybe_refresh()
        batch = self._collect()
        if batch:
            self.process(batch)

    def _maybe_refresh(self) -> None:
        if not self._streams.due():
            return
        self._streams.refresh()
        self.client.hset(self.keys.workers, self.settings.name, time.time())
        self._reclaim()

    def _reclaim(self) -> None:
        """Take over frames another consumer left unacknowledged for longer than claim_idle_ms."""
        for stream in self._streams.names:
            for entry_id, fields in reclaim(self.client, stream, FRAME_GROUP, self.settings.name,
                                            self.settings.claim_idle_ms):
                self._reclaimed.append(_Entry(stream, entry_id, fields.get(b"m", b""), time.time()))
                self.report.reclaimed += 1

    def _collect(self) -> list[_Entry]:
        """At most max_batch frames over all cameras, waiting at most max_wait_ms after the first arrives.

        Reads go through CameraStreams.read_fair (a hard cap, and a backlogged camera cannot starve
        the others). When nothing is waiting, one blocking read (COUNT 1 per stream) wakes on the
        first arrival; any frames it returns beyond the cap are already ours and go first next batch.
        """
        cap = self.settings.max_batch
        batch, self._reclaimed = self._reclaimed[:cap], self._reclaimed[cap:]
        if not self._streams.names:
            self.stop.wait(0.1)
            return batch
        deadline = None
        while len(batch) < cap and not self.stop.is_set():
            reply = self._streams.read_fair(self.settings.name, cap - len(batch))
            if not reply:
                if deadline is None:
                    block_ms = 200 if not batch else self.settings.max_wait_ms  # idle: wake to check `stop`
                else:
                    block_ms = int((deadline - time.monotonic()) * 1000)
                    if block_ms <= 0:
                        break
                reply = self.client.xreadgroup(FRAME_GROUP, self.settings.name, {s: ">" for s in self._streams.names},
                                               count=1, block=max(1, block_ms))
            now = time.time()
            entries = [_Entry(stream_name(stream), entry_id, (fields or {}).get(b"m", b""), now)
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
        self.report.batches += 1
        self.report.frames += len(batch)
        decoded: dict[str, list[tuple[_Entry, Frame, np.ndarray, float]]] = {}
        for entry in batch:
            started = time.perf_counter()
            try:
                frame = Frame.unpack(entry.raw, self.settings.max_frame_bytes)
                if self.keys.frames(frame.camera) != entry.stream:
                    raise MessageError(f"frame of camera {frame.camera!r} arrived on {entry.stream}")
                image = self._decode(frame)
            except (MessageError, ImageDecodeError) as exc:
                self._deadletter(entry, str(exc))
                continue
            decoded.setdefault(frame.bank, []).append((entry, frame, image, (time.perf_counter() - started) * 1000))
        for bank_name, items in decoded.items():
            active = self.banks.get(bank_name)
            if active is None:
                for entry, *_ in items:
                    self._deadletter(entry, f"no loadable active bank {bank_name!r} in the registry")
                continue
            refused = [(item, active.scorer.refusal(*item[2].shape[:2])) for item in items]
            for (entry, *_), reason in refused:
                if reason is not None:
                    self._deadletter(entry, f"frame cannot be scored in bank {bank_name!r}: {reason}")
            items = [item for item, reason in refused if reason is None]
            if not items:
                continue
            started = time.perf_counter()
            try:
                result = active.scorer.score([image for _, _, image, _ in items], maps=False)
            except Exception as exc:  # noqa: BLE001 - a poison batch must not crash-loop the worker
                log.exception("scoring failed", extra={"fields": {"bank": bank_name, "frames": len(items)}})
                for entry, *_ in items:
                    self._deadletter(entry, f"scoring failed: {type(exc).__name__}: {exc}")
                continue
            score_ms = (time.perf_counter() - started) * 1000 / len(items)
            self._write_results(active, items, result, score_ms)

    def _decode(self, frame: Frame) -> np.ndarray:
        return decode_frame(frame)

    def _write_results(self, active, items, result, score_ms: float) -> None:
        scorer = active.scorer
        threshold = scorer.threshold
        now = time.time()
        verdicts = scorer.verdict(result.image_scores)
        rows = np.flatnonzero(verdicts).tolist()
        maps = dict(zip(rows, scorer.heatmaps(result, rows)))  # heatmaps only for the frames that get an overlay
        script_calls = []  # positions of the script replies among the pipeline's replies
        with self.client.pipeline(transaction=True) as pipe:
            for i, (entry, frame, image, decode_ms) in enumerate(items):
                score = float(result.image_scores[i])
                anomalous = bool(verdicts[i])
                overlay_key = None
                if anomalous:
                    overlay_key = self.keys.overlay(frame.camera, frame.seq)
                    jpeg = cv2.imencode(".jpg", scorer.overlay(image, maps[i], score),
                                        [cv2.IMWRITE_JPEG_QUALITY, 85])[1].tobytes()
                    pipe.set(overlay_key, jpeg, ex=self.settings.overlay_ttl_s)
                    # the frame itself, so an operator can dismiss a false alarm into the next bank update
                    pipe.set(self.keys.frame_copy(frame.camera, frame.seq), entry.raw, ex=self.settings.overlay_ttl_s)
                message = Result(
                    camera=frame.camera, line=frame.line, seq=frame.seq, captured_at=frame.captured_at, scored_at=now,
                    score=score, threshold=threshold, anomalous=anomalous, bank=active.name,
                    bank_version=active.version, worker=self.settings.name,
                    timings_ms={"queue": round((entry.picked_at - frame.captured_at) * 1000, 2),
                                "decode": round(decode_ms, 2), "score": round(score_ms, 2)},
                    overlay_key=overlay_key, **(self._patch_map(patch_canvas(result.patch_scores[i], result.layouts[i]))
                       if self.settings.result_maps else {}))
                script_calls.append(len(pipe.command_stack))
                self._ack_and_write(
                    keys=[entry.stream, self.keys.results(frame.camera), self.keys.camera_stats(frame.camera)],
                    args=[FRAME_GROUP, entry.entry_id, self.settings.results_maxlen, "results", "m", message.pack()],
                    client=pipe)
            replies = pipe.execute()
        self.report.results += sum(replies[i] for i in script_calls)  # 0: another worker finished it first

    @staticmethod
    def _patch_map(grid: np.ndarray) -> dict:
        top = float(grid.max())
        quantised = np.round(grid / top * 255).astype(np.uint8) if top > 0 else np.zeros(grid.shape, np.uint8)
        return {"patch_map": quantised.tobytes(), "patch_map_shape": tuple(grid.shape), "patch_map_max": top}

    def _deadletter(self, entry: _Entry, reason: str) -> None:
        camera = entry.stream.removeprefix(self.keys.frames(""))
        self._ack_and_write(
            keys=[entry.stream, self.keys.deadletter, self.keys.camera_stats(camera)],
            args=[FRAME_GROUP, entry.entry_id, 100_000, "deadlettered", "reason", reason, "stream", entry.stream,
                  "id", entry.entry_id, "worker", self.settings.name, "at", time.time(), "m", entry.raw])
        self.report.deadlettered += 1
        log.warning("frame dead-lettered", extra={"fields": {"stream": entry.stream, "reason": reason}})
