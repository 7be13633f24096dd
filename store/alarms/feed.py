"""Every camera's durable alarms, for a subscriber. The store appends each camera's alarms to that camera's
stream (`Keys.alarms(camera)`, in the camera's hash slot: raising an alarm is part of the store's atomic
commit, also on a Redis Cluster); `read_alarms` reads them all, one pipeline per server, merged in the
order they were raised. Pub/Sub (`Keys.alarms_channel`) is the live, best-effort way."""
from __future__ import annotations

import redis

from contracts.keys import Keys
from contracts.messages import Alarm, MessageError
from runtime.cameras import camera_list


def read_alarms(client: redis.Redis, keys: Keys = Keys(), after: dict[str, str] | None = None,
                count: int = 1000) -> tuple[list[Alarm], dict[str, str]]:
    """Alarms newer than the cursor `after` (alarm stream -> last entry id read; None: from the start), at most
    `count` per camera, oldest first by `raised_at`, and the cursor for the next call. Unreadable entries are
    skipped (and passed by the cursor)."""
    after = dict(after or {})
    streams = [keys.alarms(c) for c in camera_list(client, keys.cameras)]
    with client.pipeline(transaction=False) as pipe:  # on a cluster: one round trip per node
        for stream in streams:
            pipe.xrange(stream, min=f"({after[stream]}" if stream in after else "-", count=count)
        pages = pipe.execute() if streams else []
    alarms = []
    for stream, page in zip(streams, pages):
        for entry_id, fields in page:
            after[stream] = entry_id.decode()
            try:
                alarms.append(Alarm.unpack(fields.get(b"m", b"")))
            except MessageError:
                continue
    return sorted(alarms, key=lambda alarm: alarm.raised_at), after
