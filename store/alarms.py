"""Alarm rules: threshold (the bank's unless overridden), k-of-n debounce, cooldown. Pure logic."""
from __future__ import annotations

import json
from collections import deque
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class AlarmRule:
    k: int = 2  # raise when k of the last n frames are over the threshold
    n: int = 3
    cooldown_s: float = 10.0  # then stay quiet this long
    threshold: float | None = None  # None: the bank's calibrated threshold

    def __post_init__(self) -> None:
        if not 1 <= self.k <= self.n:
            raise ValueError(f"alarm rule needs 1 <= k <= n, got k={self.k}, n={self.n}")

    def describe(self) -> str:
        source = "bank threshold" if self.threshold is None else f"threshold {self.threshold:g}"
        return f"{self.k}-of-{self.n}, cooldown {self.cooldown_s:g} s, {source}"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> "AlarmRule":
        return cls(**json.loads(text))


@dataclass
class AlarmState:
    """Per-camera debounce window and cooldown clock."""

    rule: AlarmRule
    window: deque = field(default_factory=deque)
    quiet_until: float = 0.0

    def update(self, score: float, bank_threshold: float | None, at: float) -> tuple[bool, float | None]:
        """Feed one frame's score; returns (raise an alarm now, threshold used)."""
        threshold = self.rule.threshold if self.rule.threshold is not None else bank_threshold
        if threshold is None:
            return False, None
        self.window.append(score >= threshold)
        while len(self.window) > self.rule.n:
            self.window.popleft()
        if at >= self.quiet_until and sum(self.window) >= self.rule.k:
            self.quiet_until = at + self.rule.cooldown_s
            self.window.clear()
            return True, threshold
        return False, threshold
