"""The camera set as every process reads it: valid names only. A member that is no camera name (bytes that are
not UTF-8, braces, control characters, too long: a camera credential may add members) is skipped, reported once
per process in the log, shown by `patchcore status` and counted in patchcore_camera_names_refused."""
from __future__ import annotations

import logging
import threading

import redis

from contracts.keys import CameraNames, camera_names

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
