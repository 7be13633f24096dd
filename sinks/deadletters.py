"""A sink's dead letters: what its destination refused for good (or what did not decode), with the reason.
One stream per camera and sink (Keys.sink_deadletter), written by runtime/lua/sink_refuse.lua."""
from __future__ import annotations

from dataclasses import dataclass

import redis

from contracts.keys import Keys, check_sink
from runtime.cameras import camera_list

LIST_COUNT = 20  # `patchcore sink deadletters` shows the newest this many per camera


@dataclass(frozen=True)
class SinkDeadLetter:
    id: str  # entry id in the dead-letter stream
    camera: str
    reason: str
    key: str  # the message's idempotency key ("" for an entry that did not decode)
    stream: str  # where the entry came from (results or alarms) and its id there
    entry_id: str
    consumer: str
    at: float


def sink_dead_letters(client: redis.Redis, keys: Keys, sink: str, camera: str | None = None,
                      count: int = LIST_COUNT) -> list[SinkDeadLetter]:
    """The newest `count` dead letters of `sink` per camera (of `camera` only, when given), oldest first."""
    check_sink(sink)
    letters = []
    for name in [camera] if camera is not None else camera_list(client, keys.cameras):
        for entry_id, fields in reversed(client.xrevrange(keys.sink_deadletter(sink, name), count=count)):
            text = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in fields.items()
                    if k not in (b"body", b"head")}
            try:
                at = float(text.get("at", "0"))
            except ValueError:
                at = 0.0
            letters.append(SinkDeadLetter(id=entry_id.decode(), camera=name, reason=text.get("reason", ""),
                                          key=text.get("key", ""), stream=text.get("stream", ""),
                                          entry_id=text.get("id", ""), consumer=text.get("consumer", ""), at=at))
    return sorted(letters, key=lambda letter: (letter.at, letter.id))
