"""Drift, not a flood: one camera's rolling view of its scores against the bank's calibrated threshold. Pure logic
(the store feeds it; `acknowledge` is the operator's write).

A defect makes a few frames score over the threshold; a knocked camera, a replaced lamp or a dirty lens makes
nearly every frame do so, and a k-of-n rule would answer with an alarm per cooldown for as long as it lasts. The
tracker keeps, per camera, the last `window` frames' score / threshold (the threshold the alarm rule uses: the
bank's calibrated one unless the rule overrides it; the calibration puts the bank's good images below 1 at its
false-alarm rate, e.g. 99 % of them). With a full window it:

- raises drift when at least `raise_share` of the window is at or over the threshold AND the window's
  `quantile` (its low end, 0.25 by default) of score / threshold is at least `level` (1.0: even the window's
  lower quartile scores above the calibration's good range, which isolated defects never cause);
- clears it when at most `clear_share` (half) of the window is over the threshold again (the scene returned);
- while drifted (policy `hold`), the camera's defect alarms are held: decided, not written, and counted (`held`);
  policy `mark` writes them with `drift` set; `off` tracks nothing.

An operator's acknowledgement (`patchcore drift ack CAM`) ends the hold at once and records who; the episode stays
open (no new drift is raised) until the window is back to normal, which then clears it. Every transition is an
event (`drift`, `drift-cleared`, `drift-acknowledged`), numbered per camera from 1, kept in an outbox of the state
until written (runtime/lua/commit_drift.lua writes each number once). Detection delay: from the first shifted
frame, at most ceil(raise_share * window) frames when every shifted frame scores over the threshold (26 frames
with the defaults: 32 frames, 0.8); clearing takes at most ceil((1 - clear_share) * window) normal frames (16;
the line's own defects among them add a few: clearing at half the window lets a line at its usual defect rate clear).

The state is a small JSON document kept with the camera's alarm window (key "drift"), so it is committed with
the results that changed it, by the same script.

Per camera: `patchcore drift set CAM --window 64 ...` stores overrides of some of these settings (a JSON object
in the hash Keys.drift_settings); the store reads them again every `rules_refresh_s` with the alarm rules and
applies them over its own (`with_overrides`) from the camera's next results on. A longer window fills from the
frames that follow; a shorter one keeps the newest frames of the window it had.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field

import numpy as np

from contracts.messages import DRIFT_KINDS, DriftEvent
from runtime import scripts

from .rules import json_fields

DRIFT_POLICIES = ("hold", "mark", "off")
NORMAL, DRIFTED, ACKNOWLEDGED = "normal", "drift", "acknowledged"  # the tracker's status
RAISED, CLEARED, ACKED = DRIFT_KINDS  # the kinds of events: drift, drift-cleared, drift-acknowledged
MAX_OUTBOX = 16  # events kept in the state until written (one store's worth of transitions, and more)
MAX_WINDOW = 1000
DRIFT_MAXLEN = 10_000  # drift events kept per camera (approximate trimming)
EVENTS_LISTED = 20  # `patchcore drift events` lists this many per camera unless told
MAX_OVERRIDE_BYTES = 1024  # a camera's stored drift overrides (JSON)


class DriftError(RuntimeError):
    """An acknowledgement that cannot be made: the camera is not drifted, or its state kept changing."""


@dataclass(frozen=True)
class DriftSettings:
    """A field's `metadata["help"]` is its option's help (`patchcore store --help`, as --drift-<field>)."""

    window: int = field(default=32, metadata={"help": "Drift: frames in the rolling window of score / threshold."})
    quantile: float = field(default=0.25, metadata={
        "help": "Drift: the window's quantile of score / threshold that must reach --drift-level (its low end)."})
    level: float = field(default=1.0, metadata={
        "help": "Drift: raised when the window's --drift-quantile of score / threshold is at least this (1.0: over "
                "the calibrated threshold) and --drift-raise-share of it is over the threshold."})
    raise_share: float = field(default=0.8, metadata={
        "help": "Drift: share of the window at or over the threshold that (with --drift-level) raises drift."})
    clear_share: float = field(default=0.5, metadata={
        "help": "Drift: cleared when at most this share of the window is over the threshold."})
    policy: str = field(default="hold", metadata={
        "help": "Drift: hold (the camera's alarms are held and counted until ack or the scene returns), mark "
                "(written with drift set) or off."})

    def __post_init__(self) -> None:
        if not isinstance(self.window, int) or isinstance(self.window, bool) or not 2 <= self.window <= MAX_WINDOW:
            raise ValueError(f"drift window must be an integer in [2, {MAX_WINDOW}], got {self.window!r}")
        for name in ("quantile", "raise_share", "clear_share"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"drift {name} must be in [0, 1], got {value!r}")
        if not isinstance(self.level, (int, float)) or not math.isfinite(self.level) or self.level <= 0:
            raise ValueError(f"drift level must be a positive number, got {self.level!r}")
        if not self.clear_share < self.raise_share:
            raise ValueError(f"drift clear_share ({self.clear_share}) must be below raise_share ({self.raise_share})")
        if self.policy not in DRIFT_POLICIES:
            raise ValueError(f"drift policy must be one of {', '.join(DRIFT_POLICIES)}, got {self.policy!r}")

    @property
    def raise_delay(self) -> int:
        """The most frames from the first shifted one to the drift event (every shifted frame over the threshold)."""
        return math.ceil(self.raise_share * self.window - 1e-9)

    @property
    def clear_delay(self) -> int:
        """The most normal frames (none over the threshold) from the scene's return to the drift-cleared event."""
        return math.ceil((1 - self.clear_share) * self.window - 1e-9)


def overrides_from_json(text: str | bytes) -> dict:
    """A camera's stored drift overrides: a JSON object of some DriftSettings fields; ValueError for anything else
    (not JSON, not an object, unknown fields, too long). The values are checked by `with_overrides`."""
    return json_fields(text, DriftSettings, "drift settings", MAX_OVERRIDE_BYTES)


def with_overrides(base: DriftSettings, overrides: dict) -> DriftSettings:
    """`base` with a camera's overrides applied; ValueError (DriftSettings' own checks) when the result is invalid,
    e.g. a clear_share that is not below the raise_share it meets."""
    return dataclasses.replace(base, **overrides)


class DriftTracker:
    """One camera's drift state. `add` feeds a scored frame and returns the events it decides (dicts of the
    DriftEvent fields but the camera); `holding`/`marking` say what becomes of an alarm decided now."""

    def __init__(self, settings: DriftSettings = DriftSettings(), state: dict | None = None):
        state = state or {}
        self.settings = settings
        self.status: str = state.get("status", NORMAL)
        # kept whole: an acknowledgement (default settings) must not cut a store's longer window; `add` trims
        self.ratios: list[float] = [float(r) for r in state.get("ratios", [])][-MAX_WINDOW:]
        self.events: int = int(state.get("events", 0))  # events decided so far (the last one's number)
        self.outbox: list[dict] = list(state.get("outbox", []))  # decided events, until known to be written
        self.held: int = int(state.get("held", 0))  # alarms held, all episodes
        self.episode: dict | None = state.get("episode")  # the open episode: raised_seq, raised_at, held, ack

    def to_dict(self) -> dict:
        return {"status": self.status, "ratios": [round(r, 5) for r in self.ratios], "events": self.events,
                "outbox": self.outbox, "held": self.held, "episode": self.episode}

    @classmethod
    def from_state(cls, settings: DriftSettings, text: str | bytes | None) -> "DriftTracker":
        """The tracker kept in a camera's alarm state (the window JSON's "drift"); a fresh one where there is none."""
        state = json.loads(text) if text else {}
        return cls(settings, state.get("drift") if isinstance(state, dict) else None)

    @property
    def holding(self) -> bool:
        return self.status == DRIFTED and self.settings.policy == "hold"

    @property
    def marking(self) -> bool:
        return self.status == DRIFTED and self.settings.policy == "mark"

    def hold(self) -> None:
        """An alarm decided while holding: counted, not written."""
        self.held += 1
        if self.episode is not None:
            self.episode["held"] = self.episode.get("held", 0) + 1

    def forget_written(self, announced: int) -> None:
        """Drop the events up to number `announced` from the outbox (they are in the drift stream)."""
        self.outbox = [event for event in self.outbox if event["n"] > announced][-MAX_OUTBOX:]

    def stats(self) -> dict:
        """The window's share at or over the threshold, its quantile and median of score / threshold."""
        if not self.ratios:
            return {"share_over": None, "quantile_ratio": None, "median_ratio": None}
        ratios = np.asarray(self.ratios)
        return {"share_over": float((ratios >= 1.0).mean()),
                "quantile_ratio": float(np.quantile(ratios, self.settings.quantile)),
                "median_ratio": float(np.median(ratios))}

    def add(self, seq: int, score: float, threshold: float | None, line: str, at: float) -> list[dict]:
        """Feed one scored frame (its threshold: the one its alarm is judged by; None or <= 0: not counted)."""
        if self.settings.policy == "off" and self.status != NORMAL:  # turned off while drifted: the drift ends
            self.status, self.ratios = NORMAL, []
            event = self._event(CLEARED, seq, line, at, threshold, self.stats())
            self.episode = None
            return [event]
        if self.settings.policy == "off" or threshold is None or not threshold > 0:
            return []
        self.ratios = (self.ratios + [score / threshold])[-self.settings.window:]
        if len(self.ratios) < self.settings.window:
            return []
        stats = self.stats()
        if self.status == NORMAL and stats["share_over"] >= self.settings.raise_share \
                and stats["quantile_ratio"] >= self.settings.level:
            self.status = DRIFTED
            self.episode = {"raised_seq": seq, "raised_at": at, "line": line, "held": 0, "acknowledged_by": None,
                            "acknowledged_at": None}
            return [self._event(RAISED, seq, line, at, threshold, stats)]
        if self.status != NORMAL and stats["share_over"] <= self.settings.clear_share:
            self.status = NORMAL
            event = self._event(CLEARED, seq, line, at, threshold, stats)
            self.episode = None
            return [event]
        return []

    def acknowledge(self, by: str, at: float) -> dict:
        """The operator's acknowledgement of the open drift: alarms flow again; the episode stays open until the
        scene returns (no new drift before that). DriftError unless drifted."""
        if self.status != DRIFTED:
            raise DriftError(f"not drifted (status {self.status})")
        self.status = ACKNOWLEDGED
        self.episode = {**self.episode, "acknowledged_by": by, "acknowledged_at": at}
        # the raising frame's line (a sink's MQTT topic of the camera's drift events stays one); "" in older states
        return self._event(ACKED, self.episode["raised_seq"], self.episode.get("line", ""), at, None, self.stats(),
                           by=by)

    def _event(self, kind: str, seq: int, line: str, at: float, threshold: float | None, stats: dict,
               by: str | None = None) -> dict:
        self.events += 1
        event = {"kind": kind, "n": self.events, "seq": seq, "line": line, "at": at, "window": len(self.ratios),
                 "threshold": threshold, "held": (self.episode or {}).get("held", 0), "by": by, **stats}
        self.outbox = (self.outbox + [event])[-MAX_OUTBOX:]
        return event


def state_json(window_json: str, tracker: DriftTracker) -> str:
    """A camera's alarm state: its debounce window's JSON (store.alarms.rules) with the tracker under "drift"."""
    return json.dumps({**json.loads(window_json), "drift": tracker.to_dict()})


def acknowledge(client, keys, camera: str, by: str, settings: DriftSettings = DriftSettings(),
                attempts: int = 20) -> dict:
    """Acknowledge `camera`'s drift as `by`: the state and the `drift-acknowledged` event (with any event still in
    its outbox) written together (runtime/lua/commit_drift.lua), against the state version read (retried when a
    store committed meanwhile). Returns the event. DriftError: not drifted, or the state kept changing."""
    script = scripts.load(client, "commit_drift")
    state_key = keys.alarm_state(camera)
    for _ in range(attempts):
        version, text, announced = client.hmget(state_key, ["version", "window", "drift_announced"])
        if not text:
            raise DriftError(f"camera {camera!r} has no alarm state yet (no results handled)")
        state = json.loads(text)
        tracker = DriftTracker(settings, state.get("drift"))
        tracker.forget_written(int(announced or 0))
        event = tracker.acknowledge(by, time.time())
        reply = scripts.commit_drift(
            script, state=state_key, drift=keys.drift(camera), stats=keys.camera_stats(camera),
            version=int(version or 0), window=json.dumps({**state, "drift": tracker.to_dict()}),
            maxlen=DRIFT_MAXLEN, channel=keys.drift_channel,
            events=[scripts.NewEvent(e["n"], DriftEvent(camera=camera, **e).pack()) for e in tracker.outbox])
        if reply >= 0:
            return event
    raise DriftError(f"the alarm state of {camera!r} kept changing; try again")

