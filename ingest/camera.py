"""One camera: read a source, rate-limit, encode, push versioned frames into the camera's Redis stream."""
from __future__ import annotations

import functools
import logging
import threading
import time
from dataclasses import dataclass, field

import cv2
import numpy as np
import redis

from runtime.connection import is_cluster, node_groups, refresh_topology
from contracts.keys import Keys
from contracts.framecodec import DEFAULT_ENCODING, DEFAULT_JPEG_QUALITY, encode_frame
from contracts.messages import Frame
from runtime.metrics import camera_ingesting, frame_appended
from runtime import scripts
from runtime.cameras import ensure_camera
from runtime.scripts import NOT_REGISTERED, REFUSED_SIZE
from runtime.streams import REDIS_ERRORS, redis_fault, require_redis_7

from .sources import Source, SourceError

log = logging.getLogger("patchcore.ingest")


@dataclass(frozen=True)
class IngestSettings:
    """A field's `metadata["help"]` is its option's help (`patchcore ingest --help`, patchcore/options.py)."""

    camera: str = field(metadata={"help": "Camera name (its stream is <prefix>:frames:{<camera>})."})
    line: str = field(default="line-1", metadata={"help": "Production line name."})
    bank: str = field(default="default", metadata={"help": "Registry bank that inspects this camera."})
    fps: float | None = field(default=None, metadata={  # None: as fast as the source gives
        "help": "Rate limit, frames per second."})
    max_side: int | None = field(default=None, metadata={"help": "Shrink frames to this longer side."})
    encoding: str = field(default=DEFAULT_ENCODING, metadata={"help": "jpeg or raw."})
    jpeg_quality: int = field(default=DEFAULT_JPEG_QUALITY, metadata={"help": "JPEG quality 1-100."})
    maxlen: int = field(default=256, metadata={  # files wait
        "help": "Stream bound (live sources drop the oldest beyond it)."})
    max_frames: int | None = field(default=None, metadata={"help": "Stop after this many frames."})
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    # a frame counts as sent once this many replicas have it (Redis WAIT, at most wait_ms; a reply lost with a
    # dying primary resends the frame, which the new primary writes unless it has it): 0 = do not wait, and a
    # frame the primary acknowledged but had not yet replicated when it died is lost
    wait_replicas: int = field(default=0, metadata={
        "help": "After each write, wait until this many replicas have it (Redis WAIT; narrows what a failover loses; "
                "0: do not wait)."})
    wait_ms: int = field(default=100, metadata={"help": "Wait for replicas at most this long (ms)."})
    register_s: float = 5.0  # how often the camera checks its registration (camera set, limits) again
    preview_interval_s: float = 1.0  # the latest frame as a JPEG for the console at most this often (0: never)
    preview_ttl_s: int = 300


@dataclass
class IngestReport:
    frames: int = 0
    dropped: int = 0
    source_errors: int = 0
    unconfirmed: int = 0  # frames sent whose WAIT timed out before wait_replicas replicas had them
    redis_waits: int = 0  # writes Redis refused or could not take (outage, out of memory, failover): the frame
    # waited and was sent again (back-pressure: a live camera reads no new frame meanwhile)
    ended: str = ""


class CameraIngest:
    def __init__(self, client: redis.Redis, source: Source, settings: IngestSettings, keys: Keys = Keys(),
                 stop: threading.Event | None = None):
        self.client = client
        self.source = source
        self.settings = settings
        self.keys = keys
        self.stop = stop or threading.Event()
        self.stream = keys.frames(settings.camera)
        self.stats = keys.camera_stats(settings.camera)
        self._add_frame = scripts.load(client, "add_frame")
        self.connected = threading.Event()  # set once registered with Redis (readiness)
        self.limits = keys.camera_limits(settings.camera)
        self._cluster = is_cluster(client)
        self._registered_at = float("-inf")
        self._preview_at = float("-inf")
        self._state = ""  # the state this process last wrote to the camera's stats

    def run(self) -> IngestReport:
        report = IngestReport()
        require_redis_7(self.client)
        seq = self._next_seq()
        ensure_camera(self.client, self.keys, self.settings.camera)  # an operator's registration, or refused
        self._registered_at = time.monotonic()
        camera_ingesting(self.settings.camera)
        self._set_state("running")
        self.connected.set()
        backoff = self.settings.backoff_initial_s
        interval = 1.0 / self.settings.fps if self.settings.fps else 0.0
        next_due = time.monotonic()
        while not self.stop.is_set():
            if self.settings.max_frames is not None and report.frames >= self.settings.max_frames:
                report.ended = "max_frames"
                break
            try:
                image = self.source.read()
            except SourceError as exc:
                report.source_errors += 1
                log.warning("source error", extra={"fields": {"camera": self.settings.camera, "error": str(exc),
                                                              "retry_in_s": backoff}})
                if not self.source.live:
                    self._set_state(f"source error: {exc}")
                    continue  # a bad file in a folder: reported, then the next one
                self._set_state(f"reconnecting: {exc}")
                backoff = self._reconnect(backoff, report)
                continue
            if image is None:
                report.ended = "source ended"
                break
            if self._state != "running":  # frames again after an error: the camera is running, and says so
                self._set_state("running")
            backoff = self.settings.backoff_initial_s
            if interval:
                now = time.monotonic()
                if now < next_due:
                    self.stop.wait(next_due - now)
                next_due = max(next_due, time.monotonic()) + interval  # a late frame never makes the next one early
            captured_at = time.time()  # the moment the paced camera takes the frame (encoding is part of the latency)
            data, shape = encode_frame(image, self.settings.encoding, self.settings.jpeg_quality, self.settings.max_side)
            frame = Frame(camera=self.settings.camera, line=self.settings.line, bank=self.settings.bank, seq=seq,
                          captured_at=captured_at, encoding=self.settings.encoding, shape=shape, data=data)
            pushed = self._push(frame, report)
            if pushed is None:  # stopped while Redis was refusing the frame: it is not counted as sent
                report.ended = f"stopped during a Redis outage (frame {seq} may not have been written)"
                break
            dropped, confirmed = pushed
            report.dropped += dropped
            report.unconfirmed += not confirmed
            report.frames += 1
            self._preview(frame)
            seq += 1
        self._set_state(f"stopped: {report.ended or 'stop requested'}")
        self.source.close()
        return report

    def _push(self, frame: Frame, report: IngestReport) -> tuple[int, bool] | None:
        """Append the frame (retrying through Redis outages, each retry counted in `report.redis_waits`); returns
        how many old frames were trimmed and whether the wanted replicas confirmed it, or None when `stop` came
        before Redis took the frame.

        The append is one script keyed by the camera's sequence number (runtime/lua/add_frame.lua): when a
        reply is lost and the call is sent again (by redis-py's retry or by this loop), the second
        send finds `last_seq` already at this frame and writes nothing.
        """
        backoff = self.settings.backoff_initial_s
        while True:
            try:
                if not self.source.live:  # files and folders wait for the workers instead of dropping
                    while self.client.xlen(self.stream) >= self.settings.maxlen and not self.stop.is_set():
                        time.sleep(0.01)
                if time.monotonic() - self._registered_at > self.settings.register_s:  # a data loss cannot hide it
                    ensure_camera(self.client, self.keys, self.settings.camera)
                    self._registered_at = time.monotonic()
                append = functools.partial(
                    scripts.add_frame, self._add_frame, stream=self.stream, stats=self.stats, limits=self.limits,
                    seq=frame.seq, maxlen=self.settings.maxlen, captured_at=frame.captured_at, frame=frame.pack())
                if not self.settings.wait_replicas:
                    dropped = append()
                    if self._refused(dropped):
                        continue
                    frame_appended(self.settings.camera, dropped)
                    return max(0, dropped), True  # -1: already written by an earlier send
                node = node_groups(self.client, [self.stream])[0][0]  # WAIT must follow the write on its connection
                with node.pipeline(transaction=False) as pipe:
                    append(pipe=pipe)
                    pipe.execute_command("WAIT", self.settings.wait_replicas, self.settings.wait_ms)
                    dropped, replicas = pipe.execute()
                if self._refused(dropped):
                    continue
                frame_appended(self.settings.camera, dropped)
                return max(0, dropped), int(replicas) >= self.settings.wait_replicas
            except REDIS_ERRORS as exc:  # outages, OOM, READONLY, LOADING, failovers: wait; anything else is a bug
                fault = redis_fault(exc)
                if fault is None:
                    raise
                refresh_topology(self.client)
                report.redis_waits += 1
                log.warning("redis unavailable", extra={"fields": {"camera": self.settings.camera, "fault": fault,
                                                                   "error": str(exc), "retry_in_s": backoff}})
                if self.stop.wait(backoff):
                    return None
                backoff = min(backoff * 2, self.settings.backoff_max_s)

    def _preview(self, frame: Frame) -> None:
        """Best effort: the latest frame as a JPEG under the camera's preview key, at most every preview_interval_s.
        The frame as sent (after --max-side), so the console's ROI editor works in the pixels workers see."""
        now = time.monotonic()
        if not self.settings.preview_interval_s or now - self._preview_at < self.settings.preview_interval_s:
            return
        self._preview_at = now
        data = frame.data
        if frame.encoding != "jpeg":  # raw pixels, shape (height, width, channels)
            image = np.frombuffer(frame.data, np.uint8).reshape(frame.shape)
            ok, buffer = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 80])
            data = buffer.tobytes() if ok else b""
        try:
            self.client.set(self.keys.preview(self.settings.camera), data, ex=self.settings.preview_ttl_s)
        except REDIS_ERRORS as exc:  # a preview is not worth a retry; anything but a fault is a bug
            if redis_fault(exc) is None:
                raise

    def _refused(self, reply: int) -> bool:
        """True to send the frame again: add_frame found no limits (-3: the camera's registration is gone, a data
        loss) and the camera was registered again (or CameraNotRegisteredError). A frame over the operator's size
        limit (-2) was refused and counted by Redis: logged, and not sent again."""
        if reply == REFUSED_SIZE:
            log.warning("frame refused", extra={"fields": {"camera": self.settings.camera, "reason": "over the "
                                                           "operator's max_entry_bytes"}})
        if reply == NOT_REGISTERED:
            ensure_camera(self.client, self.keys, self.settings.camera)
            return True
        return False

    def _next_seq(self) -> int:
        last = self.client.hget(self.stats, "last_seq")
        return int(last) + 1 if last is not None else 0

    def _reconnect(self, backoff: float, report: IngestReport) -> float:
        """Open a live source again, waiting `backoff` (doubling up to backoff_max_s) before each attempt: one
        connection attempt per wait; the state stays `reconnecting: <why>` until one succeeds. Returns the backoff."""
        while not self.stop.wait(backoff):
            backoff = min(backoff * 2, self.settings.backoff_max_s)
            try:
                self.source.open()
                return backoff
            except SourceError as exc:
                report.source_errors += 1
                self._set_state(f"reconnecting: {exc}")
                log.warning("source error", extra={"fields": {"camera": self.settings.camera, "error": str(exc),
                                                              "retry_in_s": backoff}})
        return backoff

    def _set_state(self, state: str) -> None:
        self._state = state
        try:
            self.client.hset(self.stats, "state", state)
        except REDIS_ERRORS:
            pass
