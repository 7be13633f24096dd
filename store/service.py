"""The store process: reads every camera's results (consumer group), keeps the latest state per
camera, and turns results into alarms by each camera's rule. A batch of one camera's results is
committed by one script (runtime/lua/commit_results.lua) that acknowledges them, stores the camera's
debounce window, updates its latest state and appends and publishes its alarms - or, if any of those
results is no longer pending (a retried send whose first reply was lost, or another store took them),
does nothing. State changes only in that commit, so a failed commit leaves the results pending with
the old state, to be handled again.

Drift (store.alarms.drift): the camera's drift tracker is part of that state (committed with the results that
changed it), so whether an alarm was held or written is decided exactly once. The tracker's events wait in the
state's outbox until runtime/lua/commit_drift.lua writes them to the camera's drift stream, once each, right after
the commit; one left there (a crash between the two, another store's commit in between) is written by the next
commit of that camera, or by any store within `refresh_s` of its start."""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import redis

from contracts.keys import STORE_GROUP, Keys, camera_of
from contracts.messages import MAX_WINDOW_SCORES, Alarm, DriftEvent, MessageError, Result, check_overlay_key
from runtime import scripts
from runtime.deadletter import DeadLetterSettings
from runtime.metrics import ALARMS, ALARMS_HELD, DRIFT, DRIFT_EVENTS, LATE_RESULTS, alarm_cameras, result_refused
from runtime.streams import CameraStreams, reclaim, serve

from store.alarms.drift import (DRIFT_MAXLEN, DRIFTED, DriftSettings, DriftTracker, overrides_from_json, state_json,
                                with_overrides)
from store.alarms.rules import LATE_OUTCOMES, AlarmRule, AlarmWindow, Fired

log = logging.getLogger("patchcore.store")


@dataclass(frozen=True)
class StoreSettings:
    """A field's `metadata["help"]` is its option's help (`patchcore store --help`, patchcore/options.py)."""

    name: str = field(default="store-1", metadata={"help": "Consumer name."})
    default_rule: AlarmRule = AlarmRule()
    alarms_maxlen: int = 100_000  # per camera
    batch: int = 256
    refresh_s: float = 2.0
    rules_refresh_s: float = 0.5  # alarm rules (`patchcore rule`) and cameras' drift settings (`patchcore drift set`)
    # are read again this often: a change applies within 1 s
    claim_idle_ms: int = 30_000
    reorder: int = field(default=8, metadata={"help": "Results up to this many frames out of order raise the in-order "
                                                      "alarms (a missing frame delays alarms this many frames)."})
    quiet_s: float = 2.0  # a camera without new results this long: frames still waiting for a gap are decided
    drift: DriftSettings = DriftSettings()  # telling a drifted scene from defects (store.alarms.drift)


@dataclass
class StoreReport:
    results: int = 0
    alarms: int = 0
    bad_results: int = 0
    conflicts: int = 0  # commits retried because the camera's state changed meanwhile
    recovered_reads: int = 0  # results found pending to this store, unseen (a lost read reply), and read again
    late: dict = field(default_factory=dict)  # late results (arrived after their windows were decided), by outcome
    held: int = 0  # alarms held while their camera's scene had drifted
    drift_events: dict = field(default_factory=dict)  # drift events this store wrote, by kind


class ResultsStore:
    def __init__(self, client: redis.Redis, settings: StoreSettings = StoreSettings(), keys: Keys = Keys(),
                 stop: threading.Event | None = None):
        self.client = client
        self.settings = settings
        self.keys = keys
        self.stop = stop or threading.Event()
        self.report = StoreReport()
        self._rules: dict[str, AlarmRule] = {}
        self._rules_due = 0.0  # time.monotonic() of the next read of the alarm rules
        self._refused_rules: set[tuple[bytes, bytes]] = set()  # logged once each, not at every read
        self._drift: dict[str, DriftSettings] = {}  # camera -> its drift settings, where it has overrides
        self._refused_drift: set[tuple[bytes, bytes]] = set()  # logged once each
        for outcome in LATE_OUTCOMES:  # every series exists from the start, so a rate() alert sees the first one
            LATE_RESULTS.labels(outcome)
        self._last_result: dict[str, float] = {}  # camera -> when its last result was handled (monotonic)
        self._commit = scripts.load(client, "commit_results")
        self._commit_drift = scripts.load(client, "commit_drift")
        self._unwritten: set[str] | None = None  # cameras whose drift outbox may hold unwritten events (None: all)
        self._ack_and_write = scripts.load(client, "ack_and_write")
        self._streams = CameraStreams(client, keys.cameras, keys.results, STORE_GROUP, settings.refresh_s)

    def run(self) -> StoreReport:
        serve(self._step, self.stop, log, self.settings.name, on_lost_group=self._streams.forget)
        return self.report

    def _step(self) -> None:
        try:
            self._read_and_handle()
        except BaseException:
            self._streams.reread()  # what this step took may be pending to this store, unfinished: it goes first
            raise

    def _read_and_handle(self) -> None:
        self._maybe_refresh()
        if not self._streams.names:
            self.stop.wait(0.1)
            return
        # the results pending to this store go first (at start, after a new connection or a failed step:
        # CameraStreams.read_own): handled after newer ones, they would find their windows decided
        if self._streams.recovery_due():
            before = self._streams.recovered
            reply = self._streams.read_own(self.settings.name)
            self.report.recovered_reads += self._streams.recovered - before
        else:
            reply = self._streams.read_each(self.settings.name, self.settings.batch, ">", 200)
        for stream, entries in reply:
            for begin in range(0, len(entries), self.settings.batch):
                self.handle(stream, entries[begin:begin + self.settings.batch])

    def _maybe_reload_rules(self) -> None:
        """Read the alarm rules and the cameras' drift settings again every rules_refresh_s (an HGETALL of each
        small hash)."""
        if time.monotonic() < self._rules_due:
            return
        self._rules_due = time.monotonic() + self.settings.rules_refresh_s
        with self.client.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.keys.alarm_rules)
            pipe.hgetall(self.keys.drift_settings)
            stored_rules, stored_drift = pipe.execute()
        self._load_drift_settings(stored_drift)
        rules, refused = {}, set()
        for target, text in stored_rules.items():
            try:
                rules[target.decode()] = AlarmRule.from_json(text)
            except (ValueError, UnicodeDecodeError) as exc:  # a bad rule is refused, the default applies
                refused.add((target, text))
                if (target, text) not in self._refused_rules:
                    log.error("alarm rule refused", extra={"fields": {"target": target.decode(errors="replace"),
                                                                      "error": str(exc)}})
        self._rules, self._refused_rules = rules, refused

    def _load_drift_settings(self, stored: dict) -> None:
        """Each camera's drift settings: the store's with its overrides; overrides that do not decode or do not
        fit the store's settings are refused (logged once), and the store's own settings apply to that camera."""
        drift, refused = {}, set()
        for camera, text in stored.items():
            try:
                drift[camera.decode()] = with_overrides(self.settings.drift, overrides_from_json(text))
            except (ValueError, TypeError, UnicodeDecodeError) as exc:
                refused.add((camera, text))
                if (camera, text) not in self._refused_drift:
                    log.error("drift settings refused", extra={"fields": {"camera": camera.decode(errors="replace"),
                                                                          "error": str(exc)}})
        self._drift, self._refused_drift = drift, refused

    def drift_for(self, camera: str) -> DriftSettings:
        """The drift settings the camera's results are tracked with: its overrides over the store's."""
        return self._drift.get(camera, self.settings.drift)

    def _maybe_refresh(self) -> None:
        self._maybe_reload_rules()
        if not self._streams.due():
            return
        alarm_cameras(camera_of(stream) for stream in self._streams.refresh())
        for camera in [camera_of(s) for s in self._streams.names] if self._unwritten is None else list(self._unwritten):
            self._write_drift_events(camera)
        for stream in self._streams.names:  # a store that died left results unacknowledged: take them over
            claimed = list(reclaim(self.client, stream, STORE_GROUP, self.settings.name, self.settings.claim_idle_ms))
            if claimed:
                self.handle(stream, claimed)
            camera = camera_of(stream)
            if time.monotonic() - self._last_result.setdefault(camera, time.monotonic()) > self.settings.quiet_s:
                while self._commit_results(stream, camera, [], flush=True) is None:  # decide what waits for a gap
                    self.report.conflicts += 1

    def readiness(self) -> tuple[bool, dict]:
        """Ready (/readyz): the store's group joined on at least one results stream."""
        return bool(self._streams.names), {"result_streams": len(self._streams.names)}

    def rule_for(self, camera: str, line: str) -> AlarmRule:
        return self._rules.get(camera) or self._rules.get(f"line:{line}") or self.settings.default_rule

    def handle(self, stream: str, entries) -> None:
        """One camera's results: invalid ones dead-lettered with their reason, the rest committed at once."""
        camera = camera_of(stream)
        valid = []
        for entry_id, fields in entries:
            if not fields:  # trimmed while pending to this store (XREADGROUP 0 gives no fields): nothing to handle
                self.client.xack(stream, STORE_GROUP, entry_id)
                continue
            raw = fields.get(b"m", b"")
            try:
                result = Result.unpack(raw)
                if result.camera != camera:
                    raise MessageError(f"result of camera {result.camera!r} arrived on {stream}")
                check_overlay_key(result, self.keys)
            except MessageError as exc:
                self._refuse(stream, camera, entry_id, raw, str(exc))
                continue
            valid.append((entry_id, result))
        while valid:
            committed = self._commit_results(stream, camera, valid)
            if committed is not None:
                return
            self.report.conflicts += 1  # another store changed this camera's state: decide again

    def _commit_results(self, stream: str, camera: str, items: list[tuple[bytes, Result]],
                        flush: bool = False) -> bool | None:
        """True: committed; False: not pending any more, or nothing to do; None: state changed, retry.

        With `flush`, decides the frames that wait for missing predecessors (no results are added).
        """
        state_key = self.keys.alarm_state(camera)
        version, text, announced = self.client.hmget(state_key, ["version", "window", "drift_announced"])
        items = sorted(items, key=lambda item: item[1].seq)
        if items:
            self._last_result[camera] = time.monotonic()
            rule = self.rule_for(camera, items[-1][1].line)
        elif flush and text:
            rule = None  # the rule the waiting frames were judged with
        else:
            return False
        window = AlarmWindow.from_json(rule, self.settings.reorder, text)
        rule = window.rule
        if not items and not window.undecided:
            return False
        drift = DriftTracker.from_state(self.drift_for(camera), text)
        drift.forget_written(int(announced or 0))
        alarm_infos: list[tuple[Fired, bool]] = []  # (fired, marked as raised while drifted)
        held = 0

        def decided(fired: list[Fired]) -> None:  # held while the scene has drifted (policy hold), else written
            nonlocal held
            for one in fired:
                if drift.holding:
                    drift.hold()
                    held += 1
                else:
                    alarm_infos.append((one, drift.marking))

        if flush:
            decided(window.flush())
        late_before = dict(window.late)
        for _, result in items:
            threshold = rule.threshold if rule.threshold is not None else result.threshold
            over = threshold is not None and result.score >= threshold
            info = {"seq": result.seq, "line": result.line, "score": result.score, "threshold": threshold,
                    "bank": result.bank, "bank_version": result.bank_version, "overlay_key": result.overlay_key,
                    "captured_at": result.captured_at}
            drift.add(result.seq, result.score, threshold, result.line, result.captured_at)
            decided(window.add(result.seq, over, result.captured_at, info))
        latest = {}
        if items:
            newest = items[-1][1]
            threshold = rule.threshold if rule.threshold is not None else newest.threshold
            latest = {"seq": newest.seq, "score": newest.score, "anomalous": int(newest.anomalous), "bank": newest.bank,
                      "bank_version": newest.bank_version, "scored_at": newest.scored_at,
                      "threshold": "" if threshold is None else threshold}
        alarms = [scripts.NewAlarm(alarm.seq, alarm.pack())
                  for alarm in (self._alarm(camera, rule, fired, marked) for fired, marked in alarm_infos)]
        reply = scripts.commit_results(
            self._commit, results=stream, state=state_key, latest=self.keys.latest(camera),
            alarms=self.keys.alarms(camera), stats=self.keys.camera_stats(camera), group=STORE_GROUP,
            version=int(version or 0), window=state_json(window.to_json(), drift),
            alarms_maxlen=self.settings.alarms_maxlen,
            channel=self.keys.alarms_channel, ids=[entry_id for entry_id, _ in items], latest_fields=latest,
            new_alarms=alarms)
        if reply == -1:
            return None
        if reply == 1:
            self.report.results += len(items)
            self.report.alarms += len(alarm_infos)
            ALARMS.labels(camera).inc(len(alarm_infos))
            self.report.held += held
            ALARMS_HELD.labels(camera).inc(held)
            DRIFT.labels(camera).set(int(drift.status == DRIFTED))
            if drift.outbox:
                self._write_drift_events(camera, int(version or 0) + 1, drift)
            for outcome, count in window.late.items():
                if count > late_before[outcome]:
                    self.report.late[outcome] = self.report.late.get(outcome, 0) + count - late_before[outcome]
                    LATE_RESULTS.labels(outcome).inc(count - late_before[outcome])
                    log.warning("late result", extra={"fields": {"camera": camera, "outcome": outcome,
                                                                 "count": count - late_before[outcome]}})
        return reply == 1

    def _write_drift_events(self, camera: str, version: int | None = None, drift: DriftTracker | None = None) -> None:
        """Write the drift events waiting in `camera`'s state (its tracker `drift` at `version`, as just committed;
        None: read them), once each; when the state moved on meanwhile, the camera is tried again at the next refresh
        (a later commit carries the same outbox and writes it too)."""
        state_key = self.keys.alarm_state(camera)
        if drift is None:
            stored, text, announced = self.client.hmget(state_key, ["version", "window", "drift_announced"])
            version, drift = int(stored or 0), DriftTracker.from_state(self.settings.drift, text)
            drift.forget_written(int(announced or 0))
        self._unwritten = self._unwritten or set()
        if not drift.outbox:
            self._unwritten.discard(camera)
            return
        events = [DriftEvent(camera=camera, **event) for event in drift.outbox]
        written = scripts.commit_drift(
            self._commit_drift, state=state_key, drift=self.keys.drift(camera), stats=self.keys.camera_stats(camera),
            version=version, window=None, maxlen=DRIFT_MAXLEN, channel=self.keys.drift_channel,
            events=[scripts.NewEvent(event.n, event.pack()) for event in events])
        if written < 0:
            self._unwritten.add(camera)
            return
        self._unwritten.discard(camera)
        for event in events[len(events) - written:]:
            self.report.drift_events[event.kind] = self.report.drift_events.get(event.kind, 0) + 1
            DRIFT_EVENTS.labels(event.kind).inc()
            log.warning("drift event", extra={"fields": {"camera": camera, "kind": event.kind, "n": event.n,
                                                         "seq": event.seq, "held": event.held}})

    def _alarm(self, camera: str, rule: AlarmRule, fired: Fired, marked: bool = False) -> Alarm:
        """The alarm of a fired window: the alarm frame's own score, the window's scores and its highest, and
        the overlay of the highest-scoring frame that has one (the alarm frame itself may be under the threshold)."""
        scored = [info for _, _, info in fired.window if info is not None]
        peak = max(scored, key=lambda info: info["score"])
        pictured = max((info for info in scored if info["overlay_key"]), key=lambda info: info["score"], default=None)
        shown = fired.window[-MAX_WINDOW_SCORES:]
        info = {**fired.info, "overlay_key": pictured["overlay_key"] if pictured else None}
        info.pop("captured_at", None)
        now = time.time()
        if fired.late_by:
            captured_at = fired.info.get("captured_at")
            info["late_by"], info["late_s"] = fired.late_by, None if captured_at is None else max(0.0, now - captured_at)
        return Alarm(camera=camera, raised_at=now, rule=rule.describe(), k=rule.k, n=rule.n, over=fired.over,
                     drift=True if marked else None,
                     window_first=shown[0][0], window_scores=tuple(None if i is None else i["score"] for _, _, i in shown),
                     peak_seq=peak["seq"], peak_score=peak["score"], overlay_seq=pictured["seq"] if pictured else None,
                     overlay_jpeg=self.client.get(pictured["overlay_key"]) if pictured else None, **info)

    def _refuse(self, stream: str, camera: str, entry_id: bytes, raw: bytes, reason: str) -> None:
        """Dead-letter an invalid result with its reason (acknowledged, removed and counted at once)."""
        self.report.bad_results += 1
        log.error("invalid result dead-lettered", extra={"fields": {"stream": stream, "error": reason}})
        if scripts.ack_and_write(self._ack_and_write, stream=stream, group=STORE_GROUP, entry_id=entry_id,
                                 target=self.keys.deadletter(camera), stats=self.keys.camera_stats(camera),
                                 counter="bad_results", maxlen=DeadLetterSettings.maxlen,
                                 fields={"reason": reason, "stream": stream, "id": entry_id,
                                         "worker": self.settings.name, "at": time.time(), "m": raw}):
            result_refused()
