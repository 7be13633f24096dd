"""The queue of good frames for a bank's next update: dismissed false alarms (store/alarms/dismiss.py) join
it, `patchcore bank update` consumes it."""
from __future__ import annotations

import redis

from contracts.keys import Keys
from contracts.messages import Frame, MessageError


class UpdateError(RuntimeError):
    """A bank update that cannot be made (nothing to add, no active version, a frame not found)."""


def queued_frames(client: redis.Redis, keys: Keys, bank: str) -> list[tuple[bytes, Frame]]:
    """(entry id, frame) of every frame queued for `bank`'s next update; unreadable entries are skipped."""
    out = []
    for entry_id, fields in client.xrange(keys.bank_updates(bank)):
        try:
            out.append((entry_id, Frame.unpack(fields.get(b"m", b""))))
        except MessageError:
            continue
    return out


def consume(client: redis.Redis, keys: Keys, bank: str, entry_ids: list[bytes]) -> None:
    """Remove the entries an update has taken in."""
    if entry_ids:
        client.xdel(keys.bank_updates(bank), *entry_ids)
