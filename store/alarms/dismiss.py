"""Dismissing a false alarm: its frame joins the update queue of the bank that scored it (read by
`patchcore bank update`, workers/banks/updates.py)."""
from __future__ import annotations

import json
import time

import redis

from contracts.keys import Keys
from contracts.messages import Frame, MessageError
from runtime.control import record as audit, whoami


class DismissError(RuntimeError):
    pass


def dismiss_alarm(client: redis.Redis, keys: Keys, camera: str, seq: int, by: str | None = None) -> str:
    """Mark the alarm of (camera, seq) as a false alarm and queue its frame as good; returns the bank name.
    Audited as `by` (default: the Redis user)."""
    raw = client.get(keys.frame_copy(camera, seq))
    if raw is None:
        raise DismissError(f"no stored frame for {camera} seq {seq}: only anomalous frames are kept, and only "
                          f"for `patchcore worker --overlay-ttl-s`")
    try:
        frame = Frame.unpack(raw)
    except MessageError as exc:
        raise DismissError(f"the stored frame of {camera} seq {seq} is unreadable: {exc}") from None
    by = by or whoami(client)
    mark = f"{camera}:{seq}"
    record = json.dumps({"at": time.time(), "bank": frame.bank, "by": by})
    with client.pipeline(transaction=True) as pipe:
        pipe.hget(keys.dismissed, mark)
        pipe.hset(keys.dismissed, mark, record)
        pipe.xadd(keys.bank_updates(frame.bank), {"camera": camera, "seq": seq, "m": raw})
        before = pipe.execute()[0]
    audit(client, keys, "alarm.dismiss", mark, None if before is None else json.loads(before),
          {"dismissed": True, "queued_for_bank": frame.bank}, camera=camera, who=by)
    return frame.bank
