"""The durable alarm stream as operators see it: recent alarms, one alarm by its entry id, and the
acknowledgements and dismissals recorded against them (by camera and sequence number)."""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass

import redis

from .keys import Keys
from .messages import Alarm, MessageError

ENTRY_ID = re.compile(r"^\d{1,20}-\d{1,20}$")


class AlarmLogError(RuntimeError):
    pass


@dataclass(frozen=True)
class LoggedAlarm:
    id: str  # entry id in the alarm stream
    alarm: Alarm
    acknowledged: dict | None = None  # {at, by}
    dismissed: dict | None = None  # {at, bank, by}

    @property
    def mark(self) -> str:
        return f"{self.alarm.camera}:{self.alarm.seq}"


def _marks(client: redis.Redis, keys: Keys, alarms: list[tuple[str, Alarm]]) -> list[LoggedAlarm]:
    if not alarms:
        return []
    names = [f"{alarm.camera}:{alarm.seq}" for _, alarm in alarms]
    with client.pipeline(transaction=False) as pipe:
        pipe.hmget(keys.acknowledged, names)
        pipe.hmget(keys.dismissed, names)
        acks, dismissals = pipe.execute()
    load = lambda raw: json.loads(raw) if raw else None  # noqa: E731
    return [LoggedAlarm(entry_id, alarm, load(ack), load(dismissal))
            for (entry_id, alarm), ack, dismissal in zip(alarms, acks, dismissals)]


def _decode(entries) -> list[tuple[str, Alarm]]:
    out = []
    for entry_id, fields in entries:
        try:
            out.append((entry_id.decode(), Alarm.unpack(fields.get(b"m", b""))))
        except MessageError:  # a malformed entry (not the store's): skipped, as `patchcore alarms` does
            continue
    return out


def recent_alarms(client: redis.Redis, keys: Keys, count: int = 50, after: str | None = None) -> list[LoggedAlarm]:
    """The newest `count` alarms, newest first; with `after` (an entry id), only those added after it."""
    if after is not None:
        check_id(after)
        entries = client.xrange(keys.alarms, min=f"({after}", count=count)[::-1]
    else:
        entries = client.xrevrange(keys.alarms, count=count)
    return _marks(client, keys, _decode(entries))


def alarm_by_id(client: redis.Redis, keys: Keys, entry_id: str) -> LoggedAlarm:
    check_id(entry_id)
    found = _marks(client, keys, _decode(client.xrange(keys.alarms, entry_id, entry_id)))
    if not found:
        raise AlarmLogError(f"no alarm {entry_id}")
    return found[0]


def acknowledge_alarm(client: redis.Redis, keys: Keys, entry_id: str, by: str = "operator") -> LoggedAlarm:
    """Record that an operator has seen the alarm (the first acknowledgement is kept)."""
    logged = alarm_by_id(client, keys, entry_id)
    client.hsetnx(keys.acknowledged, logged.mark, json.dumps({"at": time.time(), "by": by}))
    return alarm_by_id(client, keys, entry_id)


def check_id(entry_id: str) -> None:
    if not ENTRY_ID.match(entry_id):
        raise AlarmLogError(f"bad alarm id {entry_id[:40]!r}: <milliseconds>-<sequence> expected")
