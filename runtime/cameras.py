"""The camera set as every process reads it: valid names only. A member that is no camera name (bytes that are
not UTF-8, braces, control characters, too long: a camera credential may add members) is skipped, reported once
per process in the log, shown by `patchcore status` and counted in patchcore_camera_names_refused."""
from __future__ import annotations

import logging
import threading
from dataclasses import asdict, dataclass, field

import redis

from contracts.keys import CameraNames, Keys, camera_names

from .metrics import CAMERA_NAMES_REFUSED

log = logging.getLogger("patchcore.cameras")
_reported: set[bytes] = set()
_lock = threading.Lock()
MAX_REPORTED = 1000  # names remembered as already logged (the log says each bad name once, up to this many)


def read_cameras(client: redis.Redis, cameras_key: str) -> CameraNames:
    """SMEMBERS of the camera set, split into valid names and refused members (each logged once)."""
    found = camera_names(client.smembers(cameras_key))
    CAMERA_NAMES_REFUSED.set(len(found.refused))
    with _lock:
        new = [m for m in found.refused if m not in _reported]
        if len(_reported) < MAX_REPORTED:
            _reported.update(new[:MAX_REPORTED - len(_reported)])
    for member in new[:10]:
        log.error("camera name refused", extra={"fields": {"member": repr(member[:200]), "key": cameras_key}})
    return found


def camera_list(client: redis.Redis, cameras_key: str) -> list[str]:
    """The valid camera names, sorted."""
    return list(read_cameras(client, cameras_key).names)


REGISTER_COMMAND = "patchcore redis cameras"  # what an operator runs to register cameras (and their limits)


class CameraNotRegisteredError(RuntimeError):
    """The camera is not in the camera set or has no limits, and this client may not register it."""


@dataclass(frozen=True)
class CameraLimits:
    """What the add_frame function allows a camera, read from its limits hash (written by an operator, never by
    the camera): an entry over max_entry_bytes is refused, the stream never holds more than max_stream_len."""
    max_entry_bytes: int = field(default=32 << 20, metadata={
        "help": "Largest frame entry a camera may add, in bytes (larger ones are refused and counted)."})
    max_stream_len: int = field(default=10_000, metadata={
        "help": "Most entries a camera's frame stream holds, whatever the camera asks."})


def register_camera(client: redis.Redis, keys: Keys, camera: str, limits: CameraLimits = CameraLimits()) -> None:
    """Write `camera`'s limits and add it to the camera set (an operator's step: the camera role may do neither).
    On a cluster the two keys lie in different slots: two commands, the limits first."""
    client.hset(keys.camera_limits(camera), mapping=asdict(limits))
    client.sadd(keys.cameras, camera)


def ensure_camera(client: redis.Redis, keys: Keys, camera: str) -> bool:
    """True when `camera` is in the camera set and has limits; if not, registers it with the default limits where
    this client may (a server without the ACL) and says False. Raises CameraNotRegisteredError when it may not
    (a camera credential under the shipped ACL): the message names the command an operator runs."""
    limits = client.hmget(keys.camera_limits(camera), list(CameraLimits.__dataclass_fields__))
    if client.sismember(keys.cameras, camera) and all(limits):
        return True
    try:
        register_camera(client, keys, camera)
    except redis.exceptions.NoPermissionError:
        raise CameraNotRegisteredError(
            f"camera {camera!r} is not registered (camera set and limits) and this Redis user may not register it: "
            f"an operator runs `{REGISTER_COMMAND} {camera}`") from None
    return False
