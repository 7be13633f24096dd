"""The store process: reads every camera's results (consumer group), keeps the latest state per
camera, and turns results into alarms by each camera's rule. An alarm goes to the durable alarms
stream and the live Pub/Sub channel in the same transaction that acknowledges its result."""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import redis

from contracts.keys import STORE_GROUP, Keys
from contracts.messages import Alarm, MessageError, Result
from contracts.streams import CameraStreams, reclaim, serve, stream_name

from .alarms import AlarmRule, AlarmState

log = logging.getLogger("patchcore.store")


@dataclass(frozen=True)
class StoreSettings:
    name: str = "store-1"
    default_rule: AlarmRule = AlarmRule()
    alarms_maxlen: int = 100_000
    batch: int = 256
    refresh_s: float = 2.0
    claim_idle_ms: int = 30_000


@dataclass
class StoreReport:
    results: int = 0
    alarms: int = 0
    bad_results: int = 0


class ResultsStore:
    def __init__(self, client: redis.Redis, settings: StoreSettings = StoreSettings(), keys: Keys = Keys(),
                 stop: threading.Event | None = None):
        self.client = client
        self.settings = settings
        self.keys = keys
        self.stop = stop or threading.Event()
        self.report = StoreReport()
        self._states: dict[str, AlarmState] = {}
        self._rules: dict[str, AlarmRule] = {}
        self._streams = CameraStreams(client, keys.cameras, keys.results, STORE_GROUP, settings.refresh_s)

    def run(self) -> StoreReport:
        serve(self._step, self.stop, log, self.settings.name, on_lost_group=self._streams.forget)
        return self.report

    def _step(self) -> None:
        self._maybe_refresh()
        if not self._streams.names:
            self.stop.wait(0.1)
            return
        reply = self.client.xreadgroup(STORE_GROUP, self.settings.name, {s: ">" for s in self._streams.names},
                                       count=self.settings.batch, block=200)
        for stream, entries in reply or []:
            self.handle(stream_name(stream), entries)

    def _maybe_refresh(self) -> None:
        if not self._streams.due():
            return
        self._streams.refresh()
        self._rules = {k.decode(): AlarmRule.from_json(v) for k, v in self.client.hgetall(self.keys.alarm_rules).items()}
        for stream in self._streams.names:  # a store that died left results unacknowledged: take them over
            claimed = list(reclaim(self.client, stream, STORE_GROUP, self.settings.name, self.settings.claim_idle_ms))
            if claimed:
                self.handle(stream, claimed)

    def rule_for(self, camera: str, line: str) -> AlarmRule:
        return self._rules.get(camera) or self._rules.get(f"line:{line}") or self.settings.default_rule

    def handle(self, stream: str, entries) -> None:
        with self.client.pipeline(transaction=True) as pipe:
            for entry_id, fields in entries:
                try:
                    result = Result.unpack((fields or {}).get(b"m", b""))
                except MessageError as exc:
                    self.report.bad_results += 1
                    log.error("unreadable result", extra={"fields": {"stream": stream, "error": str(exc)}})
                    pipe.xack(stream, STORE_GROUP, entry_id)
                    continue
                rule = self.rule_for(result.camera, result.line)
                state = self._states.get(result.camera)
                if state is None or state.rule != rule:
                    state = self._states[result.camera] = AlarmState(rule)
                raise_alarm, threshold = state.update(result.score, result.threshold, result.scored_at)
                latest = {"seq": result.seq, "score": result.score, "anomalous": int(result.anomalous),
                          "bank": result.bank, "bank_version": result.bank_version, "scored_at": result.scored_at,
                          "threshold": "" if threshold is None else threshold}
                if raise_alarm:
                    alarm = Alarm(camera=result.camera, line=result.line, seq=result.seq, score=result.score,
                                  threshold=threshold, bank=result.bank, bank_version=result.bank_version,
                                  raised_at=time.time(), rule=rule.describe(), overlay_key=result.overlay_key,
                                  overlay_jpeg=self.client.get(result.overlay_key) if result.overlay_key else None)
                    packed = alarm.pack()
                    pipe.xadd(self.keys.alarms, {"m": packed}, maxlen=self.settings.alarms_maxlen, approximate=True)
                    pipe.publish(self.keys.alarms_channel, packed)
                    pipe.hincrby(self.keys.camera_stats(result.camera), "alarms", 1)
                    latest["last_alarm_seq"] = result.seq
                    self.report.alarms += 1
                pipe.hset(self.keys.latest(result.camera), mapping=latest)
                pipe.xack(stream, STORE_GROUP, entry_id)
                self.report.results += 1
            pipe.execute()
