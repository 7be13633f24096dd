"""What the console shows, read from Redis through the contracts: cameras (status, latest result, a
window of recent scores), banks (versions, settings, calibration, users), dead letters by reason."""
from __future__ import annotations

import io
import math
import threading
import time
from collections import deque

import PIL.Image
import redis

from runtime.control import CameraControl
from runtime.deadletter import DeadLetters
from contracts.control import SettingsError
from contracts.keys import Keys, check_camera
from contracts.messages import MessageError, Result
from workers.banks.registry import BankRegistry
from runtime.status import collect_status
from runtime.cameras import camera_list

HISTOGRAM_BINS = 20


def _text(raw: dict) -> dict[str, str]:
    return {k.decode(): v.decode(errors="replace") for k, v in raw.items()}


def _number(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


def downsample(points: list[list], limit: int) -> list[list]:
    """At most `limit` points: per run of consecutive points, the one with the highest score (spikes survive)."""
    if len(points) <= limit:
        return points
    size = math.ceil(len(points) / limit)
    return [max(points[i:i + size], key=lambda p: p[1]) for i in range(0, len(points), size)]


def histogram(values: list[float], bins: int = HISTOGRAM_BINS, upper: float | None = None) -> dict:
    """Counts of `values` in equal bins from their minimum to max(values, upper) (so the threshold is on the axis)."""
    if not values:
        return {"edges": [], "counts": []}
    low, high = min(values), max(max(values), upper if upper is not None else -math.inf)
    width = (high - low) / bins or 1.0
    counts = [0] * bins
    for value in values:
        counts[min(int((value - low) / width), bins - 1)] += 1
    return {"edges": [low + i * width for i in range(bins + 1)], "counts": counts}


class ConsoleData:
    """Reads for the pages. `snapshot()` is shared by every open page (cached for `interval_s`)."""

    def __init__(self, client: redis.Redis, keys: Keys = Keys(), window_s: float = 300.0, max_points: int = 240,
                 interval_s: float = 1.0):
        self.client, self.keys = client, keys
        self.window_s, self.max_points, self.interval_s = window_s, max_points, interval_s
        self.registry = BankRegistry(client, keys)
        self.deadletters = DeadLetters(client, keys)
        self.control = CameraControl(client, keys)
        self._series: dict[str, deque] = {}  # camera -> [captured_at, score, threshold, anomalous, lag_s]
        self._after: dict[str, str] = {}  # camera -> last results entry id read
        self._lock = threading.Lock()
        self._cached: tuple[float, dict] = (0.0, {})

    # cameras
    def snapshot(self) -> dict:
        with self._lock:
            at, cached = self._cached
            if time.monotonic() - at < self.interval_s * 0.9:
                return cached
            snapshot = self._read_snapshot()
            self._cached = (time.monotonic(), snapshot)
            return snapshot

    def _read_snapshot(self) -> dict:
        status = collect_status(self.client, self.keys.prefix, reasons=False)  # dead letters: their own tab
        for camera in status["cameras"]:
            name = camera["camera"]
            latest = _text(self.client.hgetall(self.keys.latest(name)))
            series = self._recent_results(name)
            camera["latest"] = {
                "seq": int(latest["seq"]) if "seq" in latest else None, "score": _number(latest.get("score")),
                "threshold": _number(latest.get("threshold")), "anomalous": latest.get("anomalous") == "1",
                "bank": latest.get("bank"), "bank_version": int(latest["bank_version"]) if "bank_version" in latest else None,
                "scored_at": _number(latest.get("scored_at"))}
            camera["lag_s"] = series[-1][4] if series else None
            camera["series"] = downsample([point[:4] for point in series], self.max_points)
            camera["image"] = self.image_kind(name, camera["latest"])
        status["marks"] = int(self.client.hlen(self.keys.acknowledged)) + int(self.client.hlen(self.keys.dismissed))
        status["now"] = time.time()
        return status

    def _recent_results(self, camera: str) -> list[list]:
        """The camera's results of the last `window_s` seconds, read incrementally from its results stream."""
        stream, now = self.keys.results(camera), time.time()
        series = self._series.setdefault(camera, deque())
        if camera in self._after:
            entries = self.client.xrange(stream, min=f"({self._after[camera]}", count=5000)
        else:
            entries = self.client.xrevrange(stream, min=str(int((now - self.window_s) * 1000)), count=5000)[::-1]
        for entry_id, fields in entries:
            self._after[camera] = entry_id.decode()
            try:
                result = Result.unpack(fields.get(b"m", b""))
            except MessageError:
                continue
            series.append([result.captured_at, result.score, result.threshold, result.anomalous,
                           result.scored_at - result.captured_at])
        while series and series[0][0] < now - self.window_s:
            series.popleft()
        return list(series)

    def image_kind(self, camera: str, latest: dict) -> str | None:
        if latest["anomalous"] and latest["seq"] is not None and self.client.exists(self.keys.overlay(camera, latest["seq"])):
            return "overlay"
        return "frame" if self.client.exists(self.keys.preview(camera)) else None

    def camera_image(self, camera: str) -> bytes | None:
        """The heatmap overlay of the camera's latest result when it is anomalous, else its latest frame."""
        if not self.known_camera(camera):  # not a camera name (it may still be a member of the set: anyone's SADD)
            return None
        latest = _text(self.client.hgetall(self.keys.latest(camera)))
        if latest.get("anomalous") == "1" and "seq" in latest:
            overlay = self.client.get(self.keys.overlay(camera, int(latest["seq"])))
            if overlay:
                return overlay
        return self.client.get(self.keys.preview(camera))

    def known_camera(self, camera: str) -> bool:
        """A valid camera name in the camera set (its ingest registered it)."""
        try:
            check_camera(camera)
        except ValueError:
            return False
        return bool(self.client.sismember(self.keys.cameras, camera))

    def camera_frame(self, camera: str) -> bytes | None:
        """The camera's latest frame (its preview JPEG: what the ROI editor draws on), never the overlay."""
        return self.client.get(self.keys.preview(camera)) if self.known_camera(camera) else None

    def frame_size(self, camera: str) -> tuple[int, int] | None:
        """(width, height) of the camera's latest frame in pixels, the frame a polygon's vertices are in; None
        without a recent frame (the preview expires) or when it does not decode."""
        jpeg = self.camera_frame(camera)
        if not jpeg:
            return None
        try:  # the header only: the preview is the camera's bytes, and a public GET must not decode megapixels
            with PIL.Image.open(io.BytesIO(jpeg)) as image:
                width, height = image.size
        except (PIL.UnidentifiedImageError, OSError, ValueError):
            return None
        return int(width), int(height)

    def bank_threshold(self, bank: str | None, version: int | None) -> float | None:
        """The calibrated threshold of a bank version, from its registry record (None: unknown)."""
        if bank is None or version is None:
            return None
        record = next((v for v in self.registry.versions(bank) if v.version == version), None)
        if record is None:
            return None
        calibration = record.meta.get("calibration") or {}
        return _number(str(calibration.get("threshold", record.meta.get("threshold"))))

    def camera_settings(self, camera: str) -> dict:
        """What the console's settings panel shows: the stored settings (or why they are refused), the bank that
        scored the camera last with its calibrated threshold, the effective threshold, and the latest frame's size."""
        refused = None
        try:
            stored = self.control.get(camera)
        except SettingsError as exc:
            stored, refused = None, str(exc)
        latest = _text(self.client.hgetall(self.keys.latest(camera)))
        bank, version = latest.get("bank"), int(latest["bank_version"]) if latest.get("bank_version", "").isdigit() else None
        bank_threshold = self.bank_threshold(bank, version)
        effective = bank_threshold if stored is None else stored.effective_threshold(bank_threshold)
        size = self.frame_size(camera)
        return {"camera": camera, "settings": None if stored is None else stored.describe(), "refused": refused,
                "bank": bank, "bank_version": version, "bank_threshold": bank_threshold,
                "effective_threshold": effective,
                "frame": None if size is None else {"width": size[0], "height": size[1]},
                "latest": {"score": _number(latest.get("score")), "threshold": _number(latest.get("threshold"))}}

    # banks
    def banks(self) -> list[dict]:
        users: dict[str, list[dict]] = {}
        for camera in camera_list(self.client, self.keys.cameras):
            bank, version = self.client.hmget(self.keys.latest(camera), ["bank", "bank_version"])
            if bank is not None:
                users.setdefault(bank.decode(), []).append({"camera": camera, "version": int(version or 0)})
        out = []
        for name in self.registry.names():
            versions = []
            for v in reversed(self.registry.versions(name)):
                meta = dict(v.meta)
                calibration = meta.pop("calibration", None) or {}
                scores = [float(s) for s in calibration.pop("good_scores", [])]
                threshold = calibration.get("threshold", meta.get("threshold"))
                versions.append({
                    "version": v.version, "published_at": v.published_at, "size": v.size, "sha256": v.sha256,
                    "signed": v.signed, "settings": meta,
                    "calibration": {**calibration, "threshold": threshold, "good_images": len(scores),
                                    "histogram": histogram(scores, upper=threshold)}})
            out.append({"name": name, "active": self.registry.active(name),
                        "rollback_to": self.registry.rollback_target(name), "versions": versions,
                        "cameras": users.get(name, [])})
        return out

    # dead letters
    def deadletter_groups(self) -> list[dict]:
        groups: dict[str, dict] = {}
        for letter in self.deadletters.list():
            group = groups.setdefault(letter.reason, {"reason": letter.reason, "count": 0, "replayable": 0,
                                                      "cameras": set(), "oldest": letter.at, "newest": letter.at})
            group["count"] += 1
            group["replayable"] += letter.payload_id is not None
            group["cameras"].add(letter.camera)
            group["newest"] = max(group["newest"], letter.at)
        return sorted(({**g, "cameras": sorted(g["cameras"])} for g in groups.values()), key=lambda g: -g["newest"])

    def deadletters_with_reason(self, reason: str):
        return [letter for letter in self.deadletters.list() if letter.reason == reason]
