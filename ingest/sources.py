"""Frame sources: video file, RTSP/HTTP stream, USB device, image folder, synthetic production line.

Each source yields BGR uint8 frames (OpenCV's order); `None` from `read()` means the source ended.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
REPLAY_FPS = 10.0  # recorded and synthetic sources are replayed at this camera rate unless told otherwise


class SourceError(RuntimeError):
    """The source cannot deliver frames now (disconnected, unreadable); live sources reconnect."""


class Source(Protocol):
    live: bool  # live sources drop the oldest frames under back-pressure and reconnect on failure

    def open(self) -> None: ...
    def read(self) -> np.ndarray | None: ...
    def close(self) -> None: ...


class CaptureSource:
    """cv2.VideoCapture over a file, a stream URL or a USB device index.

    A live stream that stalls (a frozen server, a dead link) is declared failed within `timeout_s` (SourceError;
    the camera reconnects). OpenCV's FFmpeg backend alone does not do that: after a stall its read waits out its
    read timeout and then hands back a frame it had buffered - stamped, by the camera loop, with a fresh capture
    time - again and again (three reads, ~30 s at a 10 s timeout). So the read timeout is half of `timeout_s`
    and a read that waited it out is a stall: its frame is old, not a new one. A stream whose own clock
    (CAP_PROP_POS_MSEC: the frames' timestamps) stops while reads go on returning frames for `timeout_s` is
    stalled too (streams without timestamps, whose position never moves, are judged by their reads alone).
    """

    def __init__(self, target: str | int, live: bool, loop: bool = False, timeout_s: float = 10.0):
        self.target = target
        self.live = live
        self.loop = loop
        self.timeout_s = timeout_s
        self.read_timeout_s = timeout_s / 2
        self._capture: cv2.VideoCapture | None = None
        self._position = 0.0  # the stream's own time of its newest frame (ms), and when it last moved (monotonic)
        self._moved_at = 0.0

    def open(self) -> None:
        self.close()
        # a stalled stream must fail the read (and reconnect), not hang the camera process
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(self.timeout_s * 1000),
                  cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(self.read_timeout_s * 1000)]
        capture = cv2.VideoCapture(self.target, cv2.CAP_ANY, params) if self.live else cv2.VideoCapture(self.target)
        if not capture.isOpened():
            raise SourceError(f"cannot open {self.target!r}")
        self._capture = capture
        self._position, self._moved_at = 0.0, time.monotonic()

    def read(self) -> np.ndarray | None:
        if self._capture is None:
            self.open()
        started = time.monotonic()
        ok, frame = self._capture.read()
        waited_s = time.monotonic() - started
        if ok and frame is not None:
            if self.live:
                self._check_stall(waited_s)
            return frame
        if self.live:  # a read that waited out the read timeout for nothing (MJPEG over HTTP does) is a stall too
            raise SourceError(self._stalled(waited_s) if waited_s >= 0.9 * self.read_timeout_s
                              else f"{self.target!r} returned no frame")
        if self.loop:
            self.open()
            ok, frame = self._capture.read()
            return frame if ok else None
        return None

    def _check_stall(self, waited_s: float) -> None:
        """SourceError if the frame just read shows the stream stalled: its read waited out the read timeout, or
        the stream's own clock has not moved for timeout_s."""
        if waited_s >= 0.9 * self.read_timeout_s:
            raise SourceError(self._stalled(waited_s))
        now, position = time.monotonic(), float(self._capture.get(cv2.CAP_PROP_POS_MSEC))
        if position > self._position:
            self._position, self._moved_at = position, now
        elif self._position > 0 and now - self._moved_at >= self.timeout_s:
            raise SourceError(f"{self.target!r} stalled: stream time stuck at {self._position / 1000:.1f} s "
                              f"for {now - self._moved_at:.1f} s")

    def _stalled(self, waited_s: float) -> str:
        return f"{self.target!r} stalled: no new data for {waited_s:.1f} s"

    @property
    def fps(self) -> float:
        return float(self._capture.get(cv2.CAP_PROP_FPS)) if self._capture is not None else 0.0

    def close(self) -> None:
        if self._capture is not None:
            self._capture.release()
            self._capture = None


class FolderSource:
    """Images of a folder in name order; unreadable files raise SourceError (reported, then skipped)."""

    live = False

    def __init__(self, folder: str | Path, loop: bool = False):
        self.folder = Path(folder)
        self.loop = loop
        self._paths: list[Path] = []
        self._next = 0

    def open(self) -> None:
        self._paths = sorted(p for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self._paths:
            raise SourceError(f"no images in {self.folder}")
        self._next = 0

    def read(self) -> np.ndarray | None:
        if not self._paths:
            self.open()
        if self._next >= len(self._paths):
            if not self.loop:
                return None
            self._next = 0
        path = self._paths[self._next]
        self._next += 1
        frame = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if frame is None:
            raise SourceError(f"cannot decode {path}")
        return frame

    def close(self) -> None:
        pass


def scene_change(frame: np.ndarray, gain: float = 1.0, shift: int = 0) -> np.ndarray:
    """The frame as a changed scene shows it: brightness times `gain` (a lamp replaced), the view moved `shift`
    pixels right and down (a camera knocked; black where the view left the scene). (H, W, 3) uint8 -> same."""
    if gain != 1.0:
        frame = cv2.convertScaleAbs(frame, alpha=gain)
    if shift:
        move = np.float32([[1, 0, shift], [0, 1, shift]])
        frame = cv2.warpAffine(frame, move, (frame.shape[1], frame.shape[0]), borderMode=cv2.BORDER_CONSTANT,
                               borderValue=(0, 0, 0))
    return frame


@dataclass
class SyntheticLine:
    """Procedurally drawn parts on a moving belt; a seeded share of them carries a defect.

    Every `period` frames a new part enters; it is centred at the middle frame of its period, where
    the ground truth is known: `defect_at(seq)` says whether the part in frame `seq` is defective.
    A scene change (`gain`, `shift`: see scene_change) applies to frames `change_at` .. `change_at +
    change_frames - 1` (all from `change_at` when change_frames is None): `changed(seq)` says which.
    """

    seed: int = 0
    defect_rate: float = 0.15
    width: int = 320
    height: int = 240
    period: int = 4  # frames per part: a part crosses the view in `period` frames
    max_frames: int | None = None
    live: bool = False
    gain: float = 1.0
    shift: int = 0
    change_at: int = 0
    change_frames: int | None = None

    def __post_init__(self) -> None:
        self._seq = 0

    def open(self) -> None:
        self._seq = 0

    def close(self) -> None:
        pass

    def defect_at(self, seq: int) -> bool:
        part = seq // self.period
        return bool(np.random.default_rng([self.seed, part, 1]).random() < self.defect_rate)

    def changed(self, seq: int) -> bool:
        """Whether frame `seq` shows the changed scene."""
        if (self.gain == 1.0 and not self.shift) or seq < self.change_at:
            return False
        return self.change_frames is None or seq < self.change_at + self.change_frames

    def read(self) -> np.ndarray | None:
        if self.max_frames is not None and self._seq >= self.max_frames:
            return None
        frame = self.render(self._seq)
        if self.changed(self._seq):
            frame = scene_change(frame, self.gain, self.shift)
        self._seq += 1
        return frame

    def render(self, seq: int, defect: bool | None = None) -> np.ndarray:
        part = seq // self.period
        rng = np.random.default_rng([self.seed, part, 0])
        frame = np.empty((self.height, self.width, 3), np.uint8)
        # belt: dark grey with moving stripes
        frame[:] = (58, 60, 62)
        offset = (seq % self.period) * 40 // self.period  # the belt moves with the part
        for x in range(-40 + offset, self.width, 40):
            cv2.line(frame, (x, 0), (x, self.height), (50, 52, 54), 3)
        phase = (seq % self.period + 0.5) / self.period - 0.5
        cx = int(self.width / 2 + phase * self.width * 0.25)  # stays inside a centre crop
        cy = self.height // 2
        radius = int(min(self.width, self.height) * 0.33 + rng.integers(-3, 4))
        cv2.circle(frame, (cx, cy), radius, (170, 172, 168), -1, cv2.LINE_AA)
        cv2.circle(frame, (cx, cy), int(radius * 0.45), (120, 122, 125), -1, cv2.LINE_AA)
        for k in range(6):  # bolt holes
            angle = 2 * math.pi * k / 6 + rng.uniform(-0.02, 0.02)
            hx, hy = int(cx + 0.72 * radius * math.cos(angle)), int(cy + 0.72 * radius * math.sin(angle))
            cv2.circle(frame, (hx, hy), max(2, radius // 12), (40, 40, 42), -1, cv2.LINE_AA)
        if self.defect_at(seq) if defect is None else defect:
            angle = rng.uniform(0, 2 * math.pi)
            r0 = rng.uniform(0.3, 0.6) * radius
            x0, y0 = int(cx + r0 * math.cos(angle)), int(cy + r0 * math.sin(angle))
            length = rng.uniform(0.35, 0.5) * radius
            x1, y1 = int(x0 + length * math.cos(angle + 1.7)), int(y0 + length * math.sin(angle + 1.7))
            cv2.line(frame, (x0, y0), (x1, y1), (30, 30, 200), max(3, radius // 14), cv2.LINE_AA)  # red scratch
        noise = rng.normal(0, 3, frame.shape).astype(np.int16)
        return np.clip(frame.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def replay_fps(source: Source, fps: float | None) -> float | None:
    """The rate the camera loop paces `source` at (None: unpaced). `fps` when given, 0 meaning as fast as the
    service takes the frames (a throughput run); else a camera's rate for recorded and synthetic sources
    (REPLAY_FPS), and none for live ones, whose camera sets the pace."""
    if fps is not None:
        if not math.isfinite(fps) or fps < 0:
            raise ValueError(f"fps must be a non-negative number, got {fps!r}")
        return float(fps) or None
    return None if source.live else REPLAY_FPS


def parse_source(spec: str, loop: bool = False) -> Source:
    """'synthetic[:seed=N,defect_rate=R,period=N,frames=N,gain=G,shift=P,change_at=N,change_frames=N]' (gain and
    shift: the scene changed from frame change_at, for change_frames frames), a video file, an image folder,
    rtsp/http URL, 'usb:N'."""
    if spec.startswith("synthetic"):
        options = dict(part.split("=", 1) for part in spec.partition(":")[2].split(",") if "=" in part)
        try:
            return SyntheticLine(seed=int(options.get("seed", 0)), defect_rate=float(options.get("defect_rate", 0.15)),
                                 period=int(options.get("period", 4)),
                                 max_frames=int(options["frames"]) if "frames" in options else None,
                                 gain=float(options.get("gain", 1.0)), shift=int(options.get("shift", 0)),
                                 change_at=int(options.get("change_at", 0)),
                                 change_frames=int(options["change_frames"]) if "change_frames" in options else None)
        except ValueError as exc:
            raise SourceError(f"bad synthetic source options in {spec!r}: {exc}") from None
    if spec.startswith(("rtsp://", "rtsps://", "http://", "https://")):
        return CaptureSource(spec, live=True)
    if spec.startswith("usb:") or spec.isdigit():
        return CaptureSource(int(spec.removeprefix("usb:")), live=True)
    path = Path(spec)
    if path.is_dir():
        return FolderSource(path, loop=loop)
    if path.is_file():
        return CaptureSource(str(path), live=False, loop=loop)
    raise SourceError(f"source {spec!r} is not synthetic, a URL, usb:N, a folder or a video file")
