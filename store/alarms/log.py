"""The durable alarm streams as operators see them: recent alarms over every camera, one alarm by its id,
and the acknowledgements and dismissals recorded against them (by camera and sequence number).

Each camera's alarms are a stream of their own (`Keys.alarms(camera)`, in the camera's hash slot); an
alarm's id here is `<entry id>-<camera name in hex>`: opaque, URL-safe, and ordered by its entry id
(the server's clock in ms) first."""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass

import redis

from contracts.keys import Keys
from contracts.messages import Alarm, MessageError
from runtime.cameras import camera_list
from runtime.control import record as audit, whoami

LOOKBACK_MS = 5000  # `after` on other cameras' streams: their ids come from independent counters (and clocks)
ENTRY_ID = re.compile(r"^(\d{1,20})-(\d{1,20})-((?:[0-9a-f]{2}){1,128})$")


class AlarmLogError(RuntimeError):
    pass


@dataclass(frozen=True)
class LoggedAlarm:
    id: str  # <entry id in the camera's alarm stream>-<camera in hex>
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


def alarm_id(camera: str, entry_id: str) -> str:
    return f"{entry_id}-{camera.encode().hex()}"


def parse_id(alarm: str) -> tuple[str, str]:
    """(camera, entry id) of an alarm id; AlarmLogError when it is not one."""
    match = ENTRY_ID.match(alarm)
    if not match:
        raise AlarmLogError(f"bad alarm id {alarm[:40]!r}: <milliseconds>-<sequence>-<camera in hex> expected")
    try:
        camera = bytes.fromhex(match[3]).decode()
    except UnicodeDecodeError:
        raise AlarmLogError(f"bad alarm id {alarm[:40]!r}: the camera part is not UTF-8") from None
    return camera, f"{match[1]}-{match[2]}"


def check_id(alarm: str) -> None:
    parse_id(alarm)


def _order(alarm: str) -> tuple[int, int]:
    milliseconds, sequence, _ = alarm.split("-", 2)
    return int(milliseconds), int(sequence)


def _decode(camera: str, entries) -> list[tuple[str, Alarm]]:
    out = []
    for entry_id, fields in entries:
        try:
            out.append((alarm_id(camera, entry_id.decode()), Alarm.unpack(fields.get(b"m", b""))))
        except MessageError:  # a malformed entry (not the store's): skipped, as `patchcore alarms` does
            continue
    return out


def recent_alarms(client: redis.Redis, keys: Keys, count: int = 50, after: str | None = None) -> list[LoggedAlarm]:
    """The newest `count` alarms of all cameras, newest first. With `after` (an alarm id): on its camera's stream
    those after it; on the other cameras' streams those from LOOKBACK_MS before it on (entry ids of different
    streams come from independent counters, and on a cluster from different clocks: an alarm written in the
    same millisecond, or by a node whose clock is behind, is not skipped). A caller that polls with `after`
    drops the alarms it has already seen (the console's event stream does)."""
    cameras = camera_list(client, keys.cameras)
    if after is not None:
        after_camera, after_entry = parse_id(after)
        since = f"{max(0, _order(after)[0] - LOOKBACK_MS)}-0"
    with client.pipeline(transaction=False) as pipe:  # on a cluster: one round trip per node
        for camera in cameras:
            if after is not None:
                pipe.xrange(keys.alarms(camera), min=f"({after_entry}" if camera == after_camera else since,
                            count=count)
            else:
                pipe.xrevrange(keys.alarms(camera), count=count)
        pages = pipe.execute() if cameras else []
    found = [item for camera, page in zip(cameras, pages) for item in _decode(camera, page)]
    found.sort(key=lambda item: _order(item[0]), reverse=True)
    if after is not None:
        found = found[-count:]  # the oldest `count` after the cursor: the next call continues from the newest of them
    return _marks(client, keys, found[:count])


def alarm_by_id(client: redis.Redis, keys: Keys, alarm: str) -> LoggedAlarm:
    camera, entry_id = parse_id(alarm)
    found = _marks(client, keys, _decode(camera, client.xrange(keys.alarms(camera), entry_id, entry_id)))
    if not found:
        raise AlarmLogError(f"no alarm {alarm[:60]}")
    return found[0]


def acknowledge_alarm(client: redis.Redis, keys: Keys, alarm: str, by: str | None = None) -> LoggedAlarm:
    """Record that an operator has seen the alarm (the first acknowledgement is kept, and audited; `by` default: the
    Redis user)."""
    logged = alarm_by_id(client, keys, alarm)
    by = by or whoami(client)
    if client.hsetnx(keys.acknowledged, logged.mark, json.dumps({"at": time.time(), "by": by})):
        audit(client, keys, "alarm.acknowledge", logged.mark, {"acknowledged": False}, {"acknowledged": True,
              "alarm": logged.id}, camera=logged.alarm.camera, who=by)
    return alarm_by_id(client, keys, alarm)
