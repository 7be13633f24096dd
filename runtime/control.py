"""Per-camera settings in Redis (contracts/control.py) and the audit trail every change appends to.

Writers (the CLI, the console) set, update (read-modify-write: some fields changed, the rest kept) or reset a
camera's settings through `CameraControl`: one compare-and-set script writes the settings and bumps their version
counter (runtime/lua/camera_settings_write.lua), retried on another writer's settings when one came first, then the
change is appended to the audit stream. Workers follow the settings with `SettingsWatch`: one GET of the version
counter per check, the whole hash read only when it moved, so a change reaches every worker at its next batch
without a restart. A stored entry that does not decode is refused, counted and logged, never fatal: the camera
then runs on the bank's values.

The audit stream (`Keys.audit`) is appended to only through `record` (runtime/lua/audit_append.lua: the entry and
the trim in one step, MAXLEN ~ AuditSettings.maxlen); nothing here deletes from it. Who: the caller's name when
given (the console's operator), else the Redis user of the connection (ACL WHOAMI).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import redis

from contracts.control import AuditEntry, CameraSettings, SettingsError
from contracts.keys import Keys

from . import scripts
from .metrics import CAMERA_SETTINGS_REFUSED

log = logging.getLogger("patchcore.control")

AUDIT_LIST_COUNT = 100  # entries `patchcore audit` and the console list by default (the newest)


@dataclass(frozen=True)
class AuditSettings:
    maxlen: int = field(default=100_000, metadata={"help": "Keep about this many audit entries (MAXLEN ~)."})


class SettingsConflictError(RuntimeError):
    """The settings kept changing under a writer (another writer each time it retried)."""


def whoami(client) -> str:
    """The Redis user of this connection (ACL WHOAMI); "unknown" where the server refuses to say."""
    try:
        user = client.acl_whoami()
    except redis.ResponseError:  # NOPERM or an old server: the change is still recorded
        return "unknown"
    return user.decode() if isinstance(user, bytes) else str(user)


def record(client, keys: Keys, action: str, target: str, before, after, *, camera: str = "", who: str | None = None,
           settings: AuditSettings = AuditSettings()) -> str:
    """Append one change to the audit stream; its entry id. `before`/`after`: JSON-serialisable states."""
    fields = AuditEntry.fields_of(who or whoami(client), action, target, camera, before, after, time.time())
    entry_id = scripts.audit_append(scripts.load(client, "audit_append"), stream=keys.audit, maxlen=settings.maxlen,
                                    fields=fields)
    return entry_id.decode() if isinstance(entry_id, bytes) else entry_id


@dataclass(frozen=True)
class AuditLog:
    entries: tuple[AuditEntry, ...]  # oldest first
    refused: int  # entries that did not decode (skipped)


def read_audit(client, keys: Keys, camera: str | None = None, since: float | None = None,
               count: int = AUDIT_LIST_COUNT) -> AuditLog:
    """The newest `count` audit entries (of `camera`, from `since` unix seconds on), oldest first."""
    start = "-" if since is None else f"{max(0, int(since * 1000))}-0"
    entries, refused, cursor = [], 0, "+"
    while len(entries) < count:
        batch = client.xrevrange(keys.audit, max=cursor, min=start, count=max(count, 100))
        if not batch:
            break
        for entry_id, raw in batch:
            try:
                entry = AuditEntry.from_fields(entry_id, raw)
            except SettingsError:
                refused += 1
                continue
            if camera is None or entry.camera == camera:
                entries.append(entry)
                if len(entries) == count:
                    break
        last = batch[-1][0].decode() if isinstance(batch[-1][0], bytes) else batch[-1][0]
        cursor = "(" + last
    return AuditLog(tuple(reversed(entries)), refused)


@dataclass(frozen=True)
class StoredSettings:
    """Every camera's decoded settings, the members refused (camera field -> reason) and the version read."""
    cameras: dict[str, CameraSettings]
    refused: dict[str, str]
    version: int


def _text(value) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def read_settings(client, keys: Keys) -> StoredSettings:
    """All stored camera settings (one MULTI: the version and the hash of the same moment)."""
    pipe = client.pipeline(transaction=True)
    pipe.get(keys.camera_settings_version)
    pipe.hgetall(keys.camera_settings)
    version, raw = pipe.execute()
    cameras, refused = {}, {}
    for name, packed in raw.items():
        name = _text(name)
        try:
            settings = CameraSettings.unpack(packed)
            if settings.camera != name:
                raise SettingsError(f"settings of camera {settings.camera!r} stored under {name!r}")
            cameras[name] = settings
        except SettingsError as exc:
            refused[name] = str(exc)
    return StoredSettings(cameras, refused, int(version or 0))


class CameraControl:
    """Set, reset and read cameras' settings; every change goes to the audit trail."""

    attempts = 10  # compare-and-set tries before giving up (each lost only to another writer)

    def __init__(self, client, keys: Keys = Keys(), audit: AuditSettings = AuditSettings()):
        self.client, self.keys, self.audit = client, keys, audit

    def get(self, camera: str) -> CameraSettings | None:
        """The camera's stored settings (None: none set). A stored entry that does not decode is a SettingsError."""
        packed = self.client.hget(self.keys.camera_settings, camera)
        return None if packed is None else CameraSettings.unpack(packed)

    def set(self, settings: CameraSettings, who: str | None = None) -> CameraSettings:
        """Store `settings` as the next version; returns them as stored."""
        return self._write(settings.camera, lambda _: settings, who)[0]

    def update(self, camera: str, change: Callable[[CameraSettings | None], CameraSettings],
               who: str | None = None) -> CameraSettings:
        """Read-modify-write: `change` gets the camera's stored settings (None: none, or refused ones) and returns the
        new ones, stored as the next version; when another writer came in between it is called again on theirs, so
        no writer's change is lost (`patchcore camera set` and the console change some fields and keep the rest).
        Whatever `change` raises (a SettingsError) leaves everything as it was."""
        return self._write(camera, lambda packed: change(_decoded(packed)), who)[0]

    def reset(self, camera: str, who: str | None = None) -> bool:
        """Remove the camera's settings (the bank's threshold and ROI apply again); False if it had none."""
        return self._write(camera, lambda _: None, who)[1] is not None

    def _write(self, camera: str, make: Callable[[bytes | None], CameraSettings | None], who: str | None
               ) -> tuple[CameraSettings | None, bytes | None]:
        """Write what `make` makes of the camera's packed settings (None: delete them) and audit; (the settings as
        stored, the packed settings they replaced)."""
        who = who or whoami(self.client)
        script = scripts.load(self.client, "camera_settings_write")
        for _ in range(self.attempts):
            pipe = self.client.pipeline(transaction=True)  # the version and the settings of the same moment
            pipe.get(self.keys.camera_settings_version)
            pipe.hget(self.keys.camera_settings, camera)
            read, current = pipe.execute()
            read = int(read or 0)
            settings = make(current)
            stored = None if settings is None else settings.written(read + 1, who)
            outcome = scripts.camera_settings_write(
                script, settings=self.keys.camera_settings, version_key=self.keys.camera_settings_version,
                read_version=read, camera=camera, packed=None if stored is None else stored.pack())
            if outcome.written:
                break
        else:
            raise SettingsConflictError(f"camera settings kept changing: {self.attempts} attempts to write {camera!r}")
        if settings is not None or outcome.previous is not None:  # a reset of nothing changed nothing
            record(self.client, self.keys, "camera.set" if settings is not None else "camera.reset", camera,
                   _described(outcome.previous), None if stored is None else stored.describe(), camera=camera, who=who,
                   settings=self.audit)
        return stored, outcome.previous


def _decoded(packed: bytes | None) -> CameraSettings | None:
    """Stored settings decoded; None for none and for ones that do not decode (a change replaces them)."""
    try:
        return None if packed is None else CameraSettings.unpack(packed)
    except SettingsError:
        return None


def _described(packed: bytes | None):
    """A stored entry as the audit's `before`: its description, or what was refused about it."""
    if packed is None:
        return None
    try:
        return CameraSettings.unpack(packed).describe()
    except SettingsError as exc:
        return {"refused": str(exc)}


class SettingsWatch:
    """A worker's view of the camera settings: `check()` (one GET) reloads them when their version moved.

    `refused` counts stored entries that did not decode, each time a version is loaded (logged too)."""

    def __init__(self, client, keys: Keys = Keys()):
        self.client, self.keys = client, keys
        self.version = 0
        self.cameras: dict[str, CameraSettings] = {}
        self.refused = 0

    def check(self) -> bool:
        """Reload if the settings' version moved since the last load; True when it did."""
        version = int(self.client.get(self.keys.camera_settings_version) or 0)
        if version == self.version:
            return False
        stored = read_settings(self.client, self.keys)
        for camera, reason in stored.refused.items():
            log.warning("camera settings refused; the bank's values apply",
                        extra={"fields": {"camera": camera, "reason": reason}})
        self.refused += len(stored.refused)
        CAMERA_SETTINGS_REFUSED.inc(len(stored.refused))
        self.cameras, self.version = stored.cameras, stored.version
        return True

    def of(self, camera: str) -> CameraSettings | None:
        return self.cameras.get(camera)
