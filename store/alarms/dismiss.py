"""Dismissing a false alarm: its frame joins the update queue of the bank that scored it (read by
`patchcore bank update`, workers/banks/updates.py)."""
from __future__ import annotations

import json
import time

import redis

from contracts.keys import Keys
from contracts.messages import Frame, MessageError


class DismissError(RuntimeError):
    pass


def dismiss_alarm(client: redis.Redis, keys: Keys, camera: str, seq: int, by: str = "operator") -> str:
    """Mark the alarm of (camera, seq) as a false alarm and queue its frame as good; returns the bank name."""
    raw = client.get(keys.frame_copy(camera, seq))
    if raw is None:
        raise DismissError(f"no stored frame for {camera} seq {seq}: only anomalous frames are kept, and only "
                          f"for the workers' --overlay-ttl-s")
    try:
        frame = Frame.unpack(raw)
    except MessageError as exc:
        raise DismissError(f"the stored frame of {camera} seq {seq} is unreadable: {exc}") from None
    record = json.dumps({"at": time.time(), "bank": frame.bank, "by": by})
    with client.pipeline(transaction=True) as pipe:
        pipe.hset(keys.dismissed, f"{camera}:{seq}", record)
        pipe.xadd(keys.bank_updates(frame.bank), {"camera": camera, "seq": seq, "m": raw})
        pipe.execute()
    return frame.bank
