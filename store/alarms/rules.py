"""Alarm rules: threshold (the bank's unless overridden), k-of-n debounce, cooldown. Pure logic.

The debounce window is defined by sequence numbers, not by arrival: the window of frame e is the
frames e-n+1 .. e of its camera (a frame that never got a result counts as not over). Windows are
decided in sequence order: frame e is decided when e-1 was, or once a result `reorder` sequence
numbers later has arrived (its predecessors are then taken as missing), or when the camera has
sent nothing for a while (`flush`: the store calls it). Results that arrive out of
order by fewer than `reorder` positions therefore raise exactly the alarms that in-order arrival
raises. A result later than that arrives after its windows were decided: late is not lost. Over the
threshold, it raises an alarm of its own marked late (`Fired.late_by`: how many sequence numbers up to it
had been decided), unless an alarm already covers it (one fired for a window that holds it, a late alarm
fewer than n frames away, or the cooldown of the alarm before it); its neighbours' windows are not
re-decided (they were judged without it, and a defect must not wait for a k-of-n that can no longer be
counted). Every late result is counted by outcome (`late`). A lower sequence number captured after every frame
the window has seen is no late result but a camera whose numbering started again: its window starts afresh
(`restarts` counts them), so the restarted frames raise exactly the alarms of in-order frames. The cooldown runs on the
frames' capture times, so it too does not depend on arrival order. The whole state is a small JSON
document the store keeps in Redis (`AlarmWindow.to_json`), so a restarted store carries on.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

MAX_WINDOW = 1000
MAX_RULE_BYTES = 4096
LATE_OUTCOMES = ("alarm", "covered", "quiet", "under")  # what became of a late result (AlarmWindow.late)
MAX_LATE_ALARMS = 16  # the most recent late alarms remembered, so that one defect raises one late alarm


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class AlarmRule:
    """Raise when k of the last n frames are over the threshold, then stay quiet cooldown_s (capture time).
    A field's `metadata["help"]` is its option's help (patchcore/options.py)."""

    k: int = field(default=2, metadata={"help": "Alarm when K of the last N frames are over the threshold."})
    n: int = field(default=3, metadata={"help": "Debounce window, frames."})
    cooldown_s: float = field(default=10.0, metadata={"help": "Seconds without a new alarm after one."})
    threshold: float | None = field(default=None, metadata={  # None: the bank's calibrated threshold
        "help": "Override the bank's calibrated threshold."})

    def __post_init__(self) -> None:
        for name in ("k", "n"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"alarm rule {name} must be an integer, got {value!r}")
        if not 1 <= self.k <= self.n <= MAX_WINDOW:
            raise ValueError(f"alarm rule needs 1 <= k <= n <= {MAX_WINDOW}, got k={self.k}, n={self.n}")
        if not _number(self.cooldown_s) or not 0 <= self.cooldown_s <= 86_400:
            raise ValueError(f"alarm rule cooldown_s must be a number of seconds in [0, 86400], got {self.cooldown_s!r}")
        if self.threshold is not None and not _number(self.threshold):
            raise ValueError(f"alarm rule threshold must be a finite number or null, got {self.threshold!r}")

    def describe(self) -> str:
        source = "bank threshold" if self.threshold is None else f"threshold {self.threshold:g}"
        return f"{self.k}-of-{self.n}, cooldown {self.cooldown_s:g} s, {source}"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> "AlarmRule":
        """A rule from its JSON; anything else (not an object, unknown fields, wrong types) is a ValueError."""
        return cls(**json_fields(text, cls, "alarm rule", MAX_RULE_BYTES))


def json_fields(text: str | bytes, settings: type, what: str, max_bytes: int) -> dict:
    """Stored JSON of some fields of the dataclass `settings` (an operator's rule or overrides, read from Redis)
    -> those fields; ValueError naming `what` for anything else (too long, not JSON, not an object, unknown
    fields). The values are checked by the dataclass itself."""
    if len(text) > max_bytes:
        raise ValueError(f"{what}: {len(text)} bytes, over the limit of {max_bytes}")
    try:
        values = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what}: not JSON ({exc})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{what}: not a JSON object")
    unknown = set(values) - {f.name for f in fields(settings)}
    if unknown:
        raise ValueError(f"{what}: unknown fields {sorted(unknown)}")
    return values


@dataclass(frozen=True)
class Fired:
    """An alarm decided for one frame: its `info`, and the window that fired it, oldest first, as
    (seq, over threshold, info) - info None for a frame that got no result (counted as not over). A late
    alarm (its result arrived after its windows were decided) has `late_by` > 0 and a window of itself."""
    info: Any
    window: tuple[tuple[int, bool, Any], ...]
    late_by: int = 0

    @property
    def over(self) -> int:
        return sum(over for _, over, _ in self.window)


class AlarmWindow:
    """One camera's debounce state. `add` feeds a result and returns the alarms it decides.

    `info` is whatever the caller needs to build an alarm for that frame (JSON-serialisable); an
    alarm for frame e is returned as a `Fired` with e's info and e's window, possibly when a later
    result completes that window.
    """

    def __init__(self, rule: AlarmRule, reorder: int = 8, state: dict | None = None):
        self.rule, self.reorder = rule, reorder
        counts = state or {}  # the counters survive a new rule ...
        state = state if state and state.get("rule") == asdict(rule) else {}  # ... the window starts afresh
        self.decided: int | None = state.get("decided")  # highest sequence number whose window is decided
        self.last_alarm: int | None = state.get("last_alarm")  # frames up to here no longer count
        self.quiet_until: float = state.get("quiet_until", float("-inf"))
        # seq -> [over threshold, capture time, info]: undecided frames and the window behind them
        self.frames: dict[int, list] = {int(seq): value for seq, value in state.get("frames", {}).items()}
        self.late_alarms: list[int] = state.get("late_alarms", [])  # the seqs of the last late alarms
        # late results so far, by outcome (cumulative, kept with the window: counted exactly once)
        self.late: dict[str, int] = {o: int(counts.get("late", {}).get(o, 0)) for o in LATE_OUTCOMES}
        self.restarts: int = int(counts.get("restarts", 0))  # times the camera's numbering started again
        self.newest: float | None = state.get("newest")  # the latest capture time of any frame added

    def to_json(self) -> str:
        return json.dumps({"rule": asdict(self.rule), "decided": self.decided, "last_alarm": self.last_alarm,
                           "quiet_until": self.quiet_until if math.isfinite(self.quiet_until) else None,
                           "frames": {str(seq): value for seq, value in self.frames.items()},
                           "late_alarms": self.late_alarms, "late": self.late, "restarts": self.restarts,
                           "newest": self.newest})

    @classmethod
    def from_json(cls, rule: AlarmRule | None, reorder: int, text: str | bytes) -> "AlarmWindow":
        """The window saved by to_json; with rule None, under the rule it was saved with."""
        state = json.loads(text) if text else None
        if state and state.get("quiet_until") is None:
            state["quiet_until"] = float("-inf")
        return cls(rule or AlarmRule(**state["rule"]), reorder, state)

    @property
    def undecided(self) -> bool:
        return any(self.decided is None or s > self.decided for s in self.frames)

    def add(self, seq: int, over: bool, captured_at: float, info) -> list[Fired]:
        if self.decided is not None and seq <= self.decided:
            if self.newest is None or captured_at <= self.newest:
                return self._late(seq, over, captured_at, info)
            self._restart()  # a lower number captured after every frame seen: the numbering started again
        self.newest = captured_at if self.newest is None else max(self.newest, captured_at)
        self.frames[seq] = [bool(over), captured_at, info]
        return self._decide(max(self.frames) - self.reorder)

    def _restart(self) -> None:
        """The camera's sequence numbers started again (its ingest restarted without its stats): a new window, the
        cooldown kept (it runs on capture times)."""
        self.decided, self.last_alarm, self.frames, self.late_alarms = None, None, {}, []
        self.restarts += 1

    def _late(self, seq: int, over: bool, captured_at: float, info) -> list[Fired]:
        """A result whose windows were decided without it: its own late alarm, unless one already covers it."""
        n = self.rule.n
        if not over:
            outcome = "under"
        elif (self.last_alarm is not None and seq <= self.last_alarm < seq + n) or any(
                abs(seq - s) < n for s in self.late_alarms):
            outcome = "covered"  # an alarm fired for a window that holds it, or a late alarm of its neighbours
        elif self.quiet_until - self.rule.cooldown_s <= captured_at < self.quiet_until:
            outcome = "quiet"  # in the cooldown of the alarm before it
        else:
            outcome = "alarm"
        self.late[outcome] += 1
        if outcome != "alarm":
            return []
        self.late_alarms = (self.late_alarms + [seq])[-MAX_LATE_ALARMS:]
        return [Fired(info, ((seq, True, info),), late_by=self.decided - seq + 1)]

    def flush(self) -> list[Fired]:
        """Decide every frame received so far (the camera went quiet: the missing ones are not coming)."""
        return self._decide(max(self.frames, default=-1))

    def _decide(self, up_to: int) -> list[Fired]:
        alarms = []
        for e in sorted(s for s in self.frames if self.decided is None or s > self.decided):
            if not (self.decided is None or e == self.decided + 1 or e <= up_to):
                break  # wait for the frames before e (or for `reorder` later ones)
            self.decided = e
            fired = Fired(self.frames[e][2], self._window(e))
            if fired.over >= self.rule.k and self.frames[e][1] >= self.quiet_until:
                alarms.append(fired)
                self.last_alarm, self.quiet_until = e, self.frames[e][1] + self.rule.cooldown_s
        for s in [s for s in self.frames if s <= self.decided - self.rule.n]:
            del self.frames[s]
        return alarms

    def _window(self, e: int) -> tuple[tuple[int, bool, Any], ...]:
        """The frames that count for frame e: the last n (none before 0), none up to the previous alarm."""
        first = max(0, e - self.rule.n + 1, -1 if self.last_alarm is None else self.last_alarm + 1)
        return tuple((s, self.frames[s][0], self.frames[s][2]) if s in self.frames else (s, False, None)
                     for s in range(first, e + 1))
