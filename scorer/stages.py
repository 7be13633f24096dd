"""Named stages of the per-image path (decode, resize, backbone, pooling, search, Eq. 7, maps, overlays),
timed inside the real functions when a `StageTimer` is recording (bench/profile_path.py) and free otherwise.

Times are exclusive: a stage nested in another (pooling inside the extractor, say) is taken off its parent's
time, so the shares add up to the recorded wall time. CPU tensors compute synchronously, so a stage's
wall time is its work; on CUDA a stage only sees the launch (the profile is a CPU tool).
"""
from __future__ import annotations

import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator

_recording: "StageTimer | None" = None


class StageTimer:
    """Accumulates each stage's exclusive seconds and calls while active (one at a time, any thread)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()
        self._local = threading.local()

    def __enter__(self) -> "StageTimer":
        global _recording
        if _recording is not None:
            raise RuntimeError("a StageTimer is already recording")
        _recording = self
        return self

    def __exit__(self, *exc) -> None:
        global _recording
        _recording = None

    def _stack(self) -> list[list[float]]:
        if not hasattr(self._local, "stack"):
            self._local.stack = []
        return self._local.stack

    def reset(self) -> None:
        with self._lock:
            self.seconds.clear()
            self.calls.clear()


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Time the enclosed code as stage `name` when a StageTimer records; otherwise do nothing."""
    timer = _recording
    if timer is None:
        yield
        return
    stack = timer._stack()
    frame = [0.0]  # seconds spent in nested stages
    stack.append(frame)
    started = time.perf_counter()
    try:
        yield
    finally:
        elapsed = time.perf_counter() - started
        stack.pop()
        if stack:
            stack[-1][0] += elapsed
        with timer._lock:
            timer.seconds[name] += elapsed - frame[0]
            timer.calls[name] += 1
