"""Dead letters: frames that get no result, with their reason; list, replay and purge for operators.

Each camera has its dead-letter stream (`pc:deadletter:{<camera>}`, in the camera's hash slot, so that
acknowledging a frame and dead-lettering it is one atomic step on a Redis Cluster too; at most
`maxlen`, approximate). An entry says why and where from: `reason`, `stream`, `id`, `worker`, `at`,
`size`, `head` (the first 64 bytes). The original bytes go to a second stream of the camera
(`pc:deadletter:payloads:{<camera>}`), only for frames of at most `payload_bytes`, and only for the
newest `payloads` dead letters younger than `payload_ttl_s`: so a camera's dead letters take at most
about `payloads x payload_bytes` plus `maxlen` small entries of memory.
A dead letter whose payload was kept can be replayed onto its camera's stream, once.
"""
from __future__ import annotations

import functools

import time
from dataclasses import dataclass

import redis

from contracts.keys import Keys, camera_of
from runtime import scripts
from runtime.metrics import deadlettered
from .cameras import camera_list
from .control import record as audit

HEAD_BYTES = 64

LIST_COUNT = 20  # `patchcore deadletter list` shows the newest this many


class DeadLetterError(ValueError):
    """A selection of dead letters that cannot be made as asked."""


@dataclass(frozen=True)
class DeadLetterSettings:
    maxlen: int = 10_000  # dead-letter entries per camera (reason and origin, without the frame), approximate
    payloads: int = 256  # original frames kept for replay per camera, newest first
    payload_bytes: int = 4 << 20  # larger frames keep only their reason and first bytes
    payload_ttl_s: int = 7 * 86_400  # payloads older than this are dropped


@dataclass(frozen=True)
class DeadLetter:
    id: str  # entry id in the dead-letter stream
    reason: str
    stream: str  # the frame stream it came from
    entry_id: str  # its id there
    worker: str
    at: float
    size: int
    head: bytes
    payload_id: str | None  # id in the payload stream, when the bytes were kept

    @property
    def camera(self) -> str:
        return camera_of(self.stream)


class DeadLetters:
    def __init__(self, client: redis.Redis, keys: Keys = Keys(), settings: DeadLetterSettings = DeadLetterSettings()):
        self.client, self.keys, self.settings = client, keys, settings

    # loaded when first written: a reader (`patchcore status`, a viewer's console) needs no function
    @functools.cached_property
    def _write(self) -> scripts.Function:
        return scripts.load(self.client, "deadletter_write")

    @functools.cached_property
    def _replay(self) -> scripts.Function:
        return scripts.load(self.client, "deadletter_replay")

    def add(self, stream: str, group: str, entry_id: bytes | str, raw: bytes, reason: str, worker: str) -> bool:
        """Dead-letter a pending frame; False when it was no longer pending (another consumer finished it)."""
        camera = camera_of(stream)
        keep = raw if 0 < len(raw) <= self.settings.payload_bytes and self.settings.payloads > 0 else b""
        oldest = f"{int((time.time() - self.settings.payload_ttl_s) * 1000)}-0"
        written = bool(scripts.deadletter_write(
            self._write, stream=stream, group=group, entry_id=entry_id, deadletters=self.keys.deadletter(camera),
            stats=self.keys.camera_stats(camera), payloads=self.keys.deadletter_payloads(camera),
            maxlen=self.settings.maxlen, payloads_kept=self.settings.payloads, oldest_payload_id=oldest, payload=keep,
            fields={"reason": reason, "stream": stream, "id": entry_id, "worker": worker, "at": time.time(),
                    "size": len(raw), "head": raw[:HEAD_BYTES]}))
        if written:
            deadlettered(reason)
        return written

    def cameras(self) -> list[str]:
        return camera_list(self.client, self.keys.cameras)

    def list(self, camera: str | None = None, count: int | None = None) -> list[DeadLetter]:
        """Dead letters, oldest first (of `camera` only, when given, else of every camera; at most `count`, the newest)."""
        letters = []
        for name in [camera] if camera is not None else self.cameras():
            start = "-"
            while True:
                page = self.client.xrange(self.keys.deadletter(name), min=start, count=1000)
                letters += map(_letter, page)
                if len(page) < 1000:
                    break
                start = "(" + page[-1][0].decode()
        letters.sort(key=lambda letter: (letter.at, letter.id))
        return letters[-count:] if count else letters

    def select(self, ids: list[str], camera: str | None = None) -> list[DeadLetter]:
        """The dead letters with these ids (all of `camera`'s, or all, when `ids` is empty)."""
        letters, wanted = self.list(camera), set(ids)
        if not ids:
            return letters
        found = [letter for letter in letters if letter.id in wanted]
        # ids are entry ids of each camera's own stream: two cameras can hold the same one
        clashes = sorted({letter.id for letter in found if sum(other.id == letter.id for other in found) > 1})
        if clashes:
            raise DeadLetterError(f"dead letters {', '.join(clashes[:5])} exist on several cameras: name the camera")
        return found

    def payload(self, letter: DeadLetter) -> bytes | None:
        if letter.payload_id is None:
            return None
        found = self.client.xrange(self.keys.deadletter_payloads(letter.camera), letter.payload_id, letter.payload_id)
        return found[0][1][b"m"] if found else None

    def replay(self, letters: list[DeadLetter], who: str | None = None) -> dict[str, list[str]]:
        """Put each letter's original bytes back on its camera's stream (workers score it again). Audited per camera
        (`who`, default the Redis user)."""
        outcome: dict[str, list[str]] = {"replayed": [], "gone": [], "no_payload": []}
        for camera, mine in _by_camera(letters).items():
            done = self._replay_camera(mine)
            audit(self.client, self.keys, "deadletter.replay", camera, _summary(mine),
                  {k: v for k, v in done.items() if v}, camera=camera, who=who)
            for kind, ids in done.items():
                outcome[kind] += ids
        return outcome

    def _replay_camera(self, letters: list[DeadLetter]) -> dict[str, list[str]]:
        outcome: dict[str, list[str]] = {"replayed": [], "gone": [], "no_payload": []}
        for letter in letters:
            if letter.payload_id is None or letter.stream != self.keys.frames(letter.camera):
                outcome["no_payload"].append(letter.id)
                continue
            self.client.sadd(self.keys.cameras, letter.camera)  # a data loss cannot hide the camera from the workers
            done = scripts.deadletter_replay(
                self._replay, deadletters=self.keys.deadletter(letter.camera),
                payloads=self.keys.deadletter_payloads(letter.camera), stream=letter.stream,
                stats=self.keys.camera_stats(letter.camera), letter_id=letter.id, payload_id=letter.payload_id)
            outcome[{1: "replayed", 0: "gone", -1: "no_payload"}[done]].append(letter.id)
        return outcome

    def purge(self, letters: list[DeadLetter], who: str | None = None) -> int:
        """Delete dead letters and their payloads; returns how many entries were deleted. Audited per camera."""
        deleted = 0
        for camera, mine in _by_camera(letters).items():  # one transaction per camera: its two streams share its slot
            with self.client.pipeline(transaction=True) as pipe:
                pipe.xdel(self.keys.deadletter(camera), *[letter.id for letter in mine])
                payloads = [letter.payload_id for letter in mine if letter.payload_id]
                if payloads:
                    pipe.xdel(self.keys.deadletter_payloads(camera), *payloads)
                gone = pipe.execute()[0]
            deleted += gone
            audit(self.client, self.keys, "deadletter.purge", camera, _summary(mine), {"purged": gone}, camera=camera,
                  who=who)
        return deleted


def _by_camera(letters: list[DeadLetter]) -> dict[str, list[DeadLetter]]:
    by_camera: dict[str, list[DeadLetter]] = {}
    for letter in letters:
        by_camera.setdefault(letter.camera, []).append(letter)
    return by_camera


MAX_AUDITED_IDS = 100  # dead-letter ids named in one audit entry (the count is always there)


def _summary(letters: list[DeadLetter]) -> dict:
    """The dead letters an action took, for the audit: how many, their reasons and (the first) ids."""
    reasons: dict[str, int] = {}
    for letter in letters:
        reasons[letter.reason[:200]] = reasons.get(letter.reason[:200], 0) + 1
    return {"count": len(letters), "ids": [letter.id for letter in letters[:MAX_AUDITED_IDS]],
            "reasons": dict(list(reasons.items())[:20])}


def _letter(entry) -> DeadLetter:
    entry_id, fields = entry
    text = {k.decode(): v for k, v in fields.items()}

    def get(name: str, default: str = "") -> str:
        value = text.get(name)
        return value.decode(errors="replace") if value is not None else default

    return DeadLetter(id=entry_id.decode(), reason=get("reason"), stream=get("stream"), entry_id=get("id"),
                      worker=get("worker"), at=float(get("at", "0") or 0), size=int(get("size", "0") or 0),
                      head=text.get("head", b""), payload_id=get("payload") or None)
