"""Per-camera control and the audit trail: what crosses a process boundary when an operator changes a camera.

`CameraSettings` is what workers apply to one camera's frames: a sensitivity (an explicit threshold, or a factor
and/or an offset on the bank's calibrated threshold) and a region of interest (a polygon in the frame's pixel
coordinates, or a mask image; without one the bank's own ROI applies). Settings are frozen, validated on
construction and versioned: `version` is the value of the settings' version counter when they were written
(runtime/control.py), and every Result records the version its worker applied. Stored packed (msgpack) in one
Redis hash; `unpack` decodes strictly, like contracts/messages.py, so a bad entry is refused (SettingsError),
never executed and never fatal to its reader.

`AuditEntry` is one change in the audit stream: who, when, action, target, the camera it concerns (if any), and
the state before and after it as JSON text.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, fields, replace

import cv2
import msgpack
import numpy as np

from .keys import check_camera

CAMERA_SETTINGS_SCHEMA = 1
AUDIT_SCHEMA = 1
MAX_POLYGON_POINTS = 256
MAX_MASK_BYTES = 1 << 20  # a PNG mask: binary masks compress to a few KiB even at 4K
MAX_MASK_SIDE = 8192
MAX_COORDINATE = 1 << 16  # pixels
MAX_FACTOR = 1000.0
MAX_AUDIT_STATE_BYTES = 16 << 10  # before/after JSON of one audit entry (masks are summarised, not copied)


class SettingsError(ValueError):
    """Camera settings (or an audit entry) that cannot be accepted; the text says which field is wrong."""


def _require(condition: bool, reason: str) -> None:
    if not condition:
        raise SettingsError(reason)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_polygon(text: str) -> tuple[tuple[float, float], ...]:
    """`"x,y;x,y;..."` (pixels of the camera's frame) -> ((x, y), ...); a malformed text is a SettingsError."""
    points = []
    for part in (p for p in str(text).split(";") if p.strip()):
        xy = part.split(",")
        _require(len(xy) == 2, f"bad polygon point {part.strip()[:40]!r}: 'x,y' expected")
        try:
            points.append((float(xy[0]), float(xy[1])))
        except ValueError:
            raise SettingsError(f"bad polygon point {part.strip()[:40]!r}: numbers expected") from None
    return tuple(points)


def decode_mask(data: bytes) -> np.ndarray:
    """A mask image file's bytes (PNG, BMP, JPEG...) -> bool [h, w], True (non-zero) = inspect."""
    _require(isinstance(data, bytes) and 0 < len(data) <= MAX_MASK_BYTES,
             f"bad roi_mask: an image file of 1 to {MAX_MASK_BYTES} bytes expected")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    _require(image is not None, "bad roi_mask: not a decodable image")
    _require(max(image.shape) <= MAX_MASK_SIDE, f"bad roi_mask: over {MAX_MASK_SIDE} pixels a side")
    mask = image > 0
    _require(bool(mask.any()), "bad roi_mask: nothing to inspect (the mask is all black)")
    return mask


@dataclass(frozen=True)
class CameraSettings:
    """One camera's sensitivity and region of interest. Absent fields (None) leave the bank's values.

    Sensitivity: `threshold` replaces the bank's calibrated threshold; otherwise the threshold is
    `bank threshold * threshold_factor + threshold_offset` (factor 1 and offset 0 when absent). Region of
    interest: `roi_polygon` (x, y pixel vertices in the camera's frame) or `roi_mask` (an image file's bytes,
    white = inspect, any resolution, stretched over the frame as the bank's ROI is); it replaces the bank's ROI."""

    camera: str
    threshold: float | None = field(default=None, metadata={
        "help": "This camera's threshold, in place of the bank's calibrated one."})
    threshold_factor: float | None = field(default=None, metadata={
        "help": "Multiply the bank's calibrated threshold by this (> 1: fewer anomalies)."})
    threshold_offset: float | None = field(default=None, metadata={
        "help": "Add this to the bank's calibrated threshold (after --threshold-factor)."})
    roi_polygon: tuple[tuple[float, float], ...] | None = None
    roi_mask: bytes | None = field(default=None, repr=False)
    version: int = 0  # the settings' version counter when written (0: not written yet)
    set_at: float = 0.0  # unix seconds
    set_by: str = ""  # the Redis user, or the console's operator
    schema: int = CAMERA_SETTINGS_SCHEMA

    def __post_init__(self) -> None:
        _require(self.schema == CAMERA_SETTINGS_SCHEMA,
                 f"unknown camera settings schema {self.schema!r} (this build reads {CAMERA_SETTINGS_SCHEMA})")
        try:
            check_camera(self.camera)
        except ValueError as exc:
            raise SettingsError(str(exc)) from None
        if self.threshold is not None:
            _require(_finite(self.threshold), f"bad threshold {self.threshold!r}: a finite number expected")
            _require(self.threshold_factor is None and self.threshold_offset is None,
                     "an explicit threshold excludes a threshold factor or offset")
        if self.threshold_factor is not None:
            _require(_finite(self.threshold_factor) and 0 < self.threshold_factor <= MAX_FACTOR,
                     f"bad threshold_factor {self.threshold_factor!r}: a number in (0, {MAX_FACTOR:g}] expected")
        if self.threshold_offset is not None:
            _require(_finite(self.threshold_offset), f"bad threshold_offset {self.threshold_offset!r}: a finite number")
        _require(self.roi_polygon is None or self.roi_mask is None, "a region of interest is a polygon or a mask, not both")
        if self.roi_polygon is not None:
            points = self.roi_polygon
            _require(isinstance(points, (list, tuple)) and 3 <= len(points) <= MAX_POLYGON_POINTS,
                     f"bad roi_polygon: 3 to {MAX_POLYGON_POINTS} points expected")
            for point in points:
                _require(isinstance(point, (list, tuple)) and len(point) == 2
                         and all(_finite(v) and 0 <= v <= MAX_COORDINATE for v in point),
                         f"bad roi_polygon point {str(point)[:40]}: x,y pixels in [0, {MAX_COORDINATE}] expected")
            object.__setattr__(self, "roi_polygon", tuple((float(x), float(y)) for x, y in points))
        if self.roi_mask is not None:
            decode_mask(self.roi_mask)
        _require(isinstance(self.version, int) and not isinstance(self.version, bool) and 0 <= self.version < 1 << 63,
                 f"bad version {self.version!r}")
        _require(_finite(self.set_at), f"bad set_at {self.set_at!r}")
        _require(isinstance(self.set_by, str) and len(self.set_by) <= 256, "bad set_by: at most 256 characters")

    # ---- what a worker applies --------------------------------------------------------------------------------
    def effective_threshold(self, bank_threshold: float | None) -> float | None:
        """The threshold that decides this camera's verdicts (None: no verdicts, a bank without one)."""
        if self.threshold is not None:
            return float(self.threshold)
        if bank_threshold is None:
            return None
        factor = 1.0 if self.threshold_factor is None else self.threshold_factor
        offset = 0.0 if self.threshold_offset is None else self.threshold_offset
        return float(bank_threshold) * factor + offset

    @property
    def has_roi(self) -> bool:
        return self.roi_polygon is not None or self.roi_mask is not None

    def roi(self, height: int, width: int) -> np.ndarray | None:
        """bool mask of the region to inspect for a height x width frame (None: the bank's ROI): the polygon filled at
        the frame's resolution, or the mask image at its own (mapped over the frame by relative position)."""
        if self.roi_mask is not None:
            return decode_mask(self.roi_mask)
        if self.roi_polygon is None:
            return None
        canvas = np.zeros((height, width), np.uint8)
        # vertices in 1/16 pixel (shift=4): fractional coordinates are kept
        points = np.round(np.asarray(self.roi_polygon, np.float64) * 16).astype(np.int32)
        cv2.fillPoly(canvas, [points], 1, lineType=cv2.LINE_8, shift=4)
        return canvas > 0

    def describe(self) -> dict:
        """The settings as JSON-ready values, the mask summarised (size and sha-free shape), for show and audit."""
        out = {k: v for k, v in asdict(self).items() if k not in ("roi_mask", "schema")}
        out["roi_polygon"] = None if self.roi_polygon is None else [list(p) for p in self.roi_polygon]
        if self.roi_mask is not None:
            mask = decode_mask(self.roi_mask)
            out["roi_mask"] = {"bytes": len(self.roi_mask), "shape": list(mask.shape),
                               "inspected": round(float(mask.mean()), 4)}
        else:
            out["roi_mask"] = None
        return out

    # ---- stored form --------------------------------------------------------------------------------------------
    def pack(self) -> bytes:
        values = asdict(self)
        values["roi_polygon"] = None if self.roi_polygon is None else [list(p) for p in self.roi_polygon]
        return msgpack.packb(values, use_bin_type=True)

    @classmethod
    def unpack(cls, data: bytes) -> "CameraSettings":
        """Decode and validate every field; anything else (malformed, unknown schema, wrong types) is a SettingsError."""
        _require(isinstance(data, bytes) and len(data) <= MAX_MASK_BYTES + (64 << 10),
                 "camera settings over the size limit")
        try:
            payload = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=MAX_MASK_BYTES,
                                      max_str_len=1 << 12, max_array_len=MAX_POLYGON_POINTS, max_map_len=32)
        except Exception as exc:  # noqa: BLE001 - msgpack raises several unrelated types
            raise SettingsError(f"malformed camera settings: {type(exc).__name__}") from None
        _require(isinstance(payload, dict), "camera settings are not a map")
        _require(payload.get("schema") == CAMERA_SETTINGS_SCHEMA,
                 f"unknown camera settings schema {payload.get('schema')!r} (this build reads {CAMERA_SETTINGS_SCHEMA})")
        values = {f.name: payload[f.name] for f in fields(cls) if f.name in payload}  # unknown fields ignored
        try:
            return cls(**values)
        except TypeError as exc:
            raise SettingsError(f"camera settings miss fields: {exc}") from None

    def written(self, version: int, by: str) -> "CameraSettings":
        """These settings as stored at `version` by `by`, now."""
        return replace(self, version=version, set_at=time.time(), set_by=by)


SENSITIVITY_FIELDS = ("threshold", "threshold_factor", "threshold_offset")


def changed_settings(camera: str, base: CameraSettings | None, sensitivity: dict | None = None,
                     roi_polygon=None, roi_mask: bytes | None = None, bank_threshold: bool = False,
                     bank_roi: bool = False) -> CameraSettings:
    """`base` (the camera's stored settings, or none) with the changes given on top: what `patchcore camera set` and
    the console's settings form both write. `sensitivity`: any of SENSITIVITY_FIELDS (None values are not given); a
    threshold replaces a factor and offset (and they it), a polygon replaces a mask (and it a polygon);
    `bank_threshold` / `bank_roi` drop the camera's own. Bad values are a SettingsError naming the field."""
    given = {name: value for name, value in (sensitivity or {}).items() if value is not None}
    _require(set(given) <= set(SENSITIVITY_FIELDS), f"unknown sensitivity fields {sorted(set(given) - set(SENSITIVITY_FIELDS))}")
    _require(roi_polygon is None or roi_mask is None, "a region of interest is a polygon or a mask, not both")
    values = {"threshold": None, "threshold_factor": None, "threshold_offset": None, "roi_polygon": None,
              "roi_mask": None}
    if base is not None:
        values.update(threshold=base.threshold, threshold_factor=base.threshold_factor,
                      threshold_offset=base.threshold_offset, roi_polygon=base.roi_polygon, roi_mask=base.roi_mask)
    if bank_threshold or "threshold" in given:
        values.update(threshold=None, threshold_factor=None, threshold_offset=None)
    elif given:  # a factor or an offset: the other one kept, an explicit threshold dropped
        values.update(threshold=None)
    values.update(given)
    if bank_roi:
        values.update(roi_polygon=None, roi_mask=None)
    if roi_polygon is not None:
        values.update(roi_polygon=roi_polygon, roi_mask=None)
    if roi_mask is not None:
        values.update(roi_mask=roi_mask, roi_polygon=None)
    return CameraSettings(camera, **values)


@dataclass(frozen=True)
class AuditEntry:
    """One change to what alarms or what is kept. `before`/`after` are JSON text (null: nothing there)."""
    id: str  # the stream entry id (its time is the append time)
    at: float  # unix seconds
    who: str
    action: str  # e.g. "camera.set", "rule.set", "bank.activate", "alarm.dismiss", "deadletter.purge"
    target: str  # what changed: a camera, "line:<name>", a bank name, an alarm "<camera>:<seq>"
    camera: str  # the camera it concerns, or "" (a bank, a line)
    before: str
    after: str

    FIELDS = ("at", "who", "action", "target", "camera", "before", "after", "schema")

    @staticmethod
    def fields_of(who: str, action: str, target: str, camera: str, before, after, at: float) -> dict[str, str]:
        """The stream fields of a new entry; `before`/`after` any JSON-serialisable value (bounded in size)."""
        _require(isinstance(who, str) and 0 < len(who) <= 256, "bad audit who: 1 to 256 characters")
        _require(isinstance(action, str) and 0 < len(action) <= 64, "bad audit action: 1 to 64 characters")
        _require(isinstance(target, str) and 0 < len(target) <= 512, "bad audit target: 1 to 512 characters")
        _require(isinstance(camera, str) and len(camera) <= 128, "bad audit camera")
        out = {"at": repr(float(at)), "who": who, "action": action, "target": target, "camera": camera,
               "schema": str(AUDIT_SCHEMA)}
        for name, value in (("before", before), ("after", after)):
            text = json.dumps(value, sort_keys=True, default=str)
            _require(len(text) <= MAX_AUDIT_STATE_BYTES, f"audit {name} of {len(text)} bytes over {MAX_AUDIT_STATE_BYTES}")
            out[name] = text
        return out

    @classmethod
    def from_fields(cls, entry_id: bytes | str, raw: dict) -> "AuditEntry":
        """Decode a stream entry strictly (SettingsError on anything missing, malformed or of another schema)."""
        try:
            values = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                      for k, v in raw.items()}
        except UnicodeDecodeError:
            raise SettingsError("audit entry is not UTF-8") from None
        _require(values.get("schema") == str(AUDIT_SCHEMA), f"unknown audit schema {values.get('schema')!r}")
        missing = [name for name in cls.FIELDS if name not in values]
        _require(not missing, f"audit entry misses {missing}")
        try:
            at = float(values["at"])
            json.loads(values["before"]), json.loads(values["after"])
        except ValueError:
            raise SettingsError("audit entry has a bad time or state") from None
        _require(math.isfinite(at), "audit entry has a bad time")
        entry_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        return cls(entry_id, at, values["who"], values["action"], values["target"], values["camera"],
                   values["before"], values["after"])

    def to_dict(self) -> dict:
        """JSON-ready, before/after parsed."""
        return {"id": self.id, "at": self.at, "who": self.who, "action": self.action, "target": self.target,
                "camera": self.camera, "before": json.loads(self.before), "after": json.loads(self.after)}
