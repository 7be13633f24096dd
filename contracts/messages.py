"""Versioned msgpack messages. Decoding validates every field; nothing here can execute code."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import msgpack

from .keys import Keys

FRAME_SCHEMA = 1
RESULT_SCHEMA = 1
ALARM_SCHEMA = 1
DRIFT_SCHEMA = 1
DRIFT_KINDS = ("drift", "drift-cleared", "drift-acknowledged")  # DriftEvent.kind
ENCODINGS = ("jpeg", "raw")
DEFAULT_MAX_FRAME_BYTES = 16 << 20
MAX_WINDOW_SCORES = 64  # an alarm carries the scores of at most this many frames of its window (the newest)


class MessageError(ValueError):
    """A message that cannot be accepted; the text is the dead-letter reason."""


def _pack(obj: Any) -> bytes:
    return msgpack.packb(asdict(obj), use_bin_type=True)


def _unpack(data: bytes, max_bytes: int) -> dict:
    if len(data) > max_bytes:
        raise MessageError(f"message of {len(data)} bytes exceeds the {max_bytes}-byte limit")
    try:
        # strict limits: a hostile message cannot make the decoder allocate more than it carries
        payload = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=max_bytes,
                                  max_str_len=1 << 16, max_array_len=64, max_map_len=64)
    except Exception as exc:  # noqa: BLE001 - msgpack raises several unrelated types
        raise MessageError(f"malformed msgpack: {type(exc).__name__}: {exc}") from None
    if not isinstance(payload, dict):
        raise MessageError("message is not a map")
    return payload


def _build(cls, payload: dict, schema: int):
    version = payload.get("schema")
    if version != schema:
        raise MessageError(f"unknown schema version {version!r} (this build reads {schema})")
    values = {f.name: payload[f.name] for f in fields(cls) if f.name in payload}  # unknown fields ignored
    try:
        return cls(**values)
    except TypeError as exc:
        raise MessageError(f"missing fields: {exc}") from None


def _require(condition: bool, reason: str) -> None:
    if not condition:
        raise MessageError(reason)


def _text(value, name: str, max_len: int = 128, empty: bool = False) -> None:
    _require(isinstance(value, str) and (empty or value) and len(value) <= max_len,
             f"bad {name}: a {'' if empty else 'non-empty '}string of at most {max_len} characters expected")


def _integer(value, name: str) -> None:
    _require(isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 63,
             f"bad {name}: a non-negative integer expected, got {type(value).__name__}")


def _finite(value, name: str, optional: bool = False) -> None:
    if optional and value is None:
        return
    _require(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
             f"bad {name}: a finite number expected, got {value!r}"[:200])


def _optional_integer(value, name: str) -> None:
    if value is not None:
        _integer(value, name)


def _optional_text(value, name: str, max_len: int) -> None:
    if value is not None:
        _text(value, name, max_len)


@dataclass(frozen=True)
class Frame:
    camera: str
    line: str
    bank: str  # name of the bank (in the registry) that inspects this camera
    seq: int
    captured_at: float  # unix seconds
    encoding: str  # "jpeg" or "raw" (uint8, BGR or grey, row-major)
    shape: tuple[int, ...]  # (height, width, channels)
    data: bytes
    schema: int = FRAME_SCHEMA

    def pack(self) -> bytes:
        return _pack(self)

    @classmethod
    def unpack(cls, data: bytes, max_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> "Frame":
        frame = _build(cls, _unpack(data, max_bytes), FRAME_SCHEMA)
        _require(isinstance(frame.camera, str) and 0 < len(frame.camera) <= 128
                 and "{" not in frame.camera and "}" not in frame.camera, "bad camera name")  # braces: hash tags
        _require(isinstance(frame.line, str) and isinstance(frame.bank, str) and frame.bank, "bad line or bank")
        _require(isinstance(frame.seq, int) and frame.seq >= 0, "bad sequence number")
        _require(isinstance(frame.captured_at, (int, float)), "bad capture time")
        _require(frame.encoding in ENCODINGS, f"unknown encoding {frame.encoding!r}")
        _require(isinstance(frame.data, bytes), "frame data is not bytes")
        shape = frame.shape
        _require(isinstance(shape, (list, tuple)) and len(shape) == 3 and all(isinstance(s, int) for s in shape),
                 f"bad shape {shape!r}")
        height, width, channels = shape
        _require(0 < height <= 8192 and 0 < width <= 8192 and channels in (1, 3), f"bad shape {shape!r}")
        # resizing the shorter side to 256 would blow a 1 x 8192 strip up to 256 x 2M pixels
        _require(max(height, width) <= 16 * min(height, width), f"aspect ratio of shape {tuple(shape)} over 16:1")
        if frame.encoding == "raw":
            _require(len(frame.data) == height * width * channels,
                     f"raw frame has {len(frame.data)} bytes, shape {tuple(shape)} needs {height * width * channels}")
        return Frame(**{**asdict(frame), "shape": tuple(shape)})


@dataclass(frozen=True)
class Result:
    camera: str
    line: str
    seq: int
    captured_at: float
    scored_at: float
    score: float
    threshold: float | None
    anomalous: bool
    bank: str
    bank_version: int
    worker: str
    timings_ms: dict[str, float] = field(default_factory=dict)  # queue, decode, score
    overlay_key: str | None = None  # Redis key of a heatmap overlay JPEG (anomalous frames)
    # optional small anomaly map: the patch-distance grid as uint8 rows, 255 = patch_map_max
    patch_map: bytes | None = None
    patch_map_shape: tuple[int, int] | None = None
    patch_map_max: float | None = None
    # the camera settings (contracts/control.py) its worker applied: their version (None: none were set, the
    # bank's threshold and ROI decided); `threshold` is then the camera's threshold
    settings_version: int | None = None
    schema: int = RESULT_SCHEMA

    def pack(self) -> bytes:
        return _pack(self)

    @classmethod
    def unpack(cls, data: bytes) -> "Result":
        """Decode and validate every field (types, finite numbers, sizes); MessageError says which is wrong."""
        result = _build(cls, _unpack(data, 1 << 20), RESULT_SCHEMA)
        for name in ("camera", "bank"):
            _text(getattr(result, name), name)
        _text(result.line, "line", empty=True)
        _text(result.worker, "worker", 256, empty=True)
        for name in ("seq", "bank_version"):
            _integer(getattr(result, name), name)
        for name in ("captured_at", "scored_at", "score"):
            _finite(getattr(result, name), name)
        _finite(result.threshold, "threshold", optional=True)
        _require(isinstance(result.anomalous, bool), "bad anomalous: true or false expected")
        _optional_integer(result.settings_version, "settings_version")
        _optional_text(result.overlay_key, "overlay_key", 512)
        timings = result.timings_ms
        _require(isinstance(timings, dict) and len(timings) <= 16, "bad timings_ms: a map of at most 16 entries expected")
        for key, value in timings.items():
            _text(key, "timings_ms key", 32)
            _finite(value, f"timings_ms[{key!r}]")
        maps = (result.patch_map, result.patch_map_shape, result.patch_map_max)
        _require(all(m is None for m in maps) or all(m is not None for m in maps),
                 "patch_map, patch_map_shape and patch_map_max come together")
        if result.patch_map is not None:
            shape = result.patch_map_shape
            _require(isinstance(shape, (list, tuple)) and len(shape) == 2
                     and all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 8192 for v in shape),
                     f"bad patch_map_shape {shape!r}"[:200])
            _require(isinstance(result.patch_map, bytes) and len(result.patch_map) == shape[0] * shape[1],
                     "patch_map size does not match patch_map_shape")
            _finite(result.patch_map_max, "patch_map_max")
            result = Result(**{**asdict(result), "patch_map_shape": tuple(shape)})  # msgpack has no tuples
        return result


@dataclass(frozen=True)
class Alarm:
    camera: str
    line: str
    seq: int
    score: float
    threshold: float
    bank: str
    bank_version: int
    raised_at: float
    rule: str  # e.g. "2-of-3, cooldown 10 s"
    overlay_key: str | None = None
    overlay_jpeg: bytes | None = None
    # Why it fired (absent from alarms of older stores): k of the window's n frames at or over the threshold
    # were needed and `over` were; the window's scores by sequence number from `window_first` up to `seq`
    # (None: the frame got no result; the newest MAX_WINDOW_SCORES of a longer window); its highest score and
    # that frame; the frame whose overlay the alarm carries (the highest-scoring one that has an overlay).
    # `score` stays the alarm frame's own score, which may be under the threshold.
    k: int | None = None
    n: int | None = None
    over: int | None = None
    window_first: int | None = None
    window_scores: tuple[float | None, ...] | None = None
    peak_seq: int | None = None
    peak_score: float | None = None
    overlay_seq: int | None = None
    # A late alarm: its result arrived after its windows were decided (a lost reply, a failover, a worker that
    # died holding the frame); `late_by` sequence numbers up to it had been decided, `late_s` seconds passed
    # from its capture to the alarm. Absent (None) on an alarm raised in order.
    late_by: int | None = None
    late_s: float | None = None
    # Raised while its camera's scene had drifted, under the store's drift policy `mark` (store.alarms.drift);
    # None elsewhere (under policy `hold` such alarms are held, not written).
    drift: bool | None = None
    schema: int = ALARM_SCHEMA

    def pack(self) -> bytes:
        return _pack(self)

    @classmethod
    def unpack(cls, data: bytes) -> "Alarm":
        """Decode and validate every field, as Result.unpack."""
        alarm = _build(cls, _unpack(data, 4 << 20), ALARM_SCHEMA)
        for name in ("camera", "bank"):
            _text(getattr(alarm, name), name)
        _text(alarm.line, "line", empty=True)
        _text(alarm.rule, "rule", 256)
        for name in ("seq", "bank_version"):
            _integer(getattr(alarm, name), name)
        for name in ("score", "threshold", "raised_at"):
            _finite(getattr(alarm, name), name)
        _optional_text(alarm.overlay_key, "overlay_key", 512)
        _require(alarm.overlay_jpeg is None or isinstance(alarm.overlay_jpeg, bytes), "bad overlay_jpeg: bytes expected")
        for name in ("k", "n", "over", "window_first", "peak_seq", "overlay_seq"):
            _optional_integer(getattr(alarm, name), name)
        _finite(alarm.peak_score, "peak_score", optional=True)
        _optional_integer(alarm.late_by, "late_by")
        _require(alarm.late_by is None or alarm.late_by >= 1, "late_by must be at least 1")
        _finite(alarm.late_s, "late_s", optional=True)
        _require(alarm.drift is None or isinstance(alarm.drift, bool), "bad drift: true, false or null expected")
        _require((alarm.peak_seq is None) == (alarm.peak_score is None), "peak_seq and peak_score come together")
        scores = alarm.window_scores
        if scores is not None:
            _require(isinstance(scores, (list, tuple)) and 0 < len(scores) <= MAX_WINDOW_SCORES,
                     f"bad window_scores: a list of 1 to {MAX_WINDOW_SCORES} entries expected")
            for score in scores:
                _finite(score, "window_scores entry", optional=True)
            _require(alarm.window_first is not None and alarm.window_first + len(scores) - 1 == alarm.seq,
                     "window_scores must run from window_first to seq")
            alarm = Alarm(**{**asdict(alarm), "window_scores": tuple(scores)})  # msgpack has no tuples
        return alarm

    def describe(self) -> str:
        """One line saying what fired: the rule, the window's scores and its highest, the frame's own score."""
        head = f"{'DRIFT-MARKED ' if self.drift else ''}ALARM camera={self.camera} line={self.line} seq={self.seq} bank={self.bank}@v{self.bank_version}"
        if self.late_by is not None:
            late_s = "" if self.late_s is None else f", {self.late_s:.1f} s after capture"
            head = (f"LATE {head} (its result arrived after {self.late_by} frames up to it were decided{late_s}; "
                    f"raised on its own score)")
        if self.window_scores is None or self.peak_score is None:  # an older store's alarm: no window details
            return f"{head} score={self.score:.3f} threshold={self.threshold:.3f} ({self.rule})"
        scores = " ".join(f"{self.window_first + i}:" + ("-" if v is None else f"{v:.3f}")
                          for i, v in enumerate(self.window_scores))
        return (f"{head} ({self.rule}): {self.over} frames at or over threshold {self.threshold:.3f} in "
                f"seq {self.window_first}..{self.seq} [{scores}]; highest {self.peak_score:.3f} at seq {self.peak_seq}; "
                f"this frame {self.score:.3f}, {'over' if self.score >= self.threshold else 'under'} the threshold")


@dataclass(frozen=True)
class DriftEvent:
    """A camera's whole scene moved away from its bank's calibration (`drift`), came back (`drift-cleared`), or an
    operator acknowledged the drift (`drift-acknowledged`, `by`). `n` numbers a camera's events from 1 (each is
    written once); `seq` is the frame that decided it (acknowledged: the frame that raised the drift); the window's
    statistics of score / threshold at that frame; `held`: the camera's alarms held in the episode so far."""
    camera: str
    kind: str
    n: int
    seq: int
    at: float  # unix seconds: the deciding frame's capture time, or the acknowledgement's time
    line: str = ""
    window: int = 0  # frames in the window
    share_over: float | None = None  # share of the window at or over the threshold
    quantile_ratio: float | None = None  # the window's low quantile of score / threshold
    median_ratio: float | None = None
    threshold: float | None = None
    held: int = 0
    by: str | None = None  # who acknowledged
    schema: int = DRIFT_SCHEMA

    def pack(self) -> bytes:
        return _pack(self)

    @classmethod
    def unpack(cls, data: bytes) -> "DriftEvent":
        """Decode and validate every field, as Result.unpack."""
        event = _build(cls, _unpack(data, 1 << 16), DRIFT_SCHEMA)
        _text(event.camera, "camera")
        _require(event.kind in DRIFT_KINDS, f"bad kind: one of {', '.join(DRIFT_KINDS)} expected")
        _text(event.line, "line", empty=True)
        for name in ("n", "seq", "window", "held"):
            _integer(getattr(event, name), name)
        _require(event.n >= 1, "bad n: events are numbered from 1")
        _finite(event.at, "at")
        for name in ("share_over", "quantile_ratio", "median_ratio", "threshold"):
            _finite(getattr(event, name), name, optional=True)
        _require(event.share_over is None or 0 <= event.share_over <= 1, "bad share_over: in [0, 1] expected")
        _optional_text(event.by, "by", 256)
        _require((event.by is not None) == (event.kind == "drift-acknowledged"), "by comes with an acknowledgement only")
        return event

    def describe(self) -> str:
        """One line: what happened to the camera's scene, and the window that says so."""
        stats = "" if self.share_over is None else (
            f": {self.share_over:.0%} of the last {self.window} frames over the threshold, low quantile "
            f"{self.quantile_ratio:.2f} x, median {self.median_ratio:.2f} x the threshold")
        who = f" by {self.by}" if self.by else ""
        return f"{self.kind.upper()} camera={self.camera} seq={self.seq} #{self.n}{who}{stats}; alarms held {self.held}"


def check_overlay_key(result: Result, keys: Keys) -> None:
    """A result may name only the overlay its worker writes for it (`Keys.overlay` of its camera and seq):
    the store copies that key's bytes into an alarm, so any other key is refused."""
    expected = keys.overlay(result.camera, result.seq)
    if result.overlay_key is not None and result.overlay_key != expected:
        raise MessageError(f"overlay_key {result.overlay_key[:100]!r} is not this result's overlay {expected!r}")
