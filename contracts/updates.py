"""Good frames for the next bank update: an operator dismisses a false alarm, its frame joins the queue
of the bank that scored it, and `patchcore bank update` consumes the queue."""
from __future__ import annotations

import json
import time

import redis

from .keys import Keys
from .messages import Frame, MessageError


class UpdateError(RuntimeError):
    pass


def dismiss_alarm(client: redis.Redis, keys: Keys, camera: str, seq: int, by: str = "operator") -> str:
    """Mark the alarm of (camera, seq) as a false alarm and queue its frame as good; returns the bank name."""
    raw = client.get(keys.frame_copy(camera, seq))
    if raw is None:
        raise UpdateError(f"no stored frame for {camera} seq {seq}: only anomalous frames are kept, and only "
                          f"for the workers' --overlay-ttl-s")
    try:
        frame = Frame.unpack(raw)
    except MessageError as exc:
        raise UpdateError(f"the stored frame of {camera} seq {seq} is unreadable: {exc}") from None
    record = json.dumps({"at": time.time(), "bank": frame.bank, "by": by})
    with client.pipeline(transaction=True) as pipe:
        pipe.hset(keys.dismissed, f"{camera}:{seq}", record)
        pipe.xadd(keys.bank_updates(frame.bank), {"camera": camera, "seq": seq, "m": raw})
        pipe.execute()
    return frame.bank


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
