"""The Lua scripts that make each write of the pipeline happen once, and one typed call per script.

Each script is a file of its own, `runtime/lua/<name>.lua` (shipped as package data), whose comment
block documents its KEYS and ARGV and what it returns; `load` registers it with redis-py
(`register_script`: EVALSHA, and on NOSCRIPT a SCRIPT LOAD and EVALSHA again; on a RedisCluster the
call is routed by its first key). The functions below are the only code that knows a script's
KEYS/ARGV layout: callers name every value, and lists travel as mappings or dataclasses.

Every script starts with `#!lua` (Redis >= 7.0 script flags): a server out of memory, or a replica,
refuses the whole script before it runs, never half of it (a Lua error does not undo the writes made
before it). Only read_fair declares a flag: `allow-cross-slot-keys`.

A function given `pipe` (a redis-py pipeline) queues its call there and returns None: the reply comes
with `pipe.execute()`, at the call's position.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources
from typing import Mapping, Sequence

from redis.commands.core import Script

# the scripts in runtime/lua/, by name
NAMES = ("ack_and_write", "add_frame", "read_fair", "deadletter_write", "deadletter_replay", "commit_results",
         "sink_refuse",
         "commit_drift", "audit_append", "camera_settings_write")

Value = bytes | str | int | float  # what redis-py sends as a script argument


class UnknownScriptError(ValueError):
    """No script of that name in runtime/lua/."""


@functools.cache
def source(name: str) -> str:
    """The text of script `name` (runtime/lua/<name>.lua, read from the installed package)."""
    if name not in NAMES:
        raise UnknownScriptError(f"no Lua script {name!r}: known are {', '.join(NAMES)}")
    return resources.files("runtime").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


def load(client, name: str) -> Script:
    """Script `name` registered with `client` (a Redis or RedisCluster): call it through its function below."""
    return client.register_script(source(name))


def _pairs(fields: Mapping[str, Value], what: str) -> list[Value]:
    """field, value, field, value, ... of a non-empty mapping (XADD needs at least one pair)."""
    if not fields:
        raise ValueError(f"{what}: at least one field is needed")
    return [x for pair in fields.items() for x in pair]


def _call(script: Script, keys: list[str], args: list[Value], pipe=None):
    if pipe is None:
        return script(keys=keys, args=args)
    script(keys=keys, args=args, client=pipe)
    return None


def ack_and_write(script: Script, *, stream: str, group: str, entry_id: bytes | str, target: str, stats: str,
                  counter: str, maxlen: int, fields: Mapping[str, Value], pipe=None) -> int | None:
    """Acknowledge `entry_id` of `stream` for `group` and, if this call acknowledged it and it is still in its
    stream, append `fields` to `target` (MAXLEN ~ maxlen), delete the entry and add 1 to `counter` of `stats`.
    1: written; 0: not (another consumer finished it, or it was trimmed while pending)."""
    keys = [stream, target, stats]
    return _call(script, keys, [group, entry_id, maxlen, counter, *_pairs(fields, "ack_and_write")], pipe)


def add_frame(script: Script, *, stream: str, stats: str, cameras: str | None, camera: str, seq: int, maxlen: int,
              captured_at: float, frame: bytes, pipe=None) -> int | None:
    """Append the packed `frame` of `camera` to `stream` (MAXLEN ~ maxlen) unless `seq` is not above the stats'
    `last_seq`, and register the camera in `cameras` when given (None on a Redis Cluster: another slot).
    -1: a duplicate, nothing written; else the number of older frames trimmed."""
    keys = [stream, stats] + ([cameras] if cameras is not None else [])
    return _call(script, keys, [seq, maxlen, captured_at, frame, camera], pipe)


def sink_refuse(script: Script, *, stream: str, group: str, entry_id: bytes | str, deadletters: str, maxlen: int,
                fields: Mapping[str, Value], pipe=None) -> int | None:
    """Acknowledge `entry_id` of `stream` for the sink's `group` and, if this call acknowledged it, append `fields`
    to `deadletters` (MAXLEN ~ maxlen); the entry stays in its stream. 1: recorded; 0: not pending any more."""
    return _call(script, [stream, deadletters], [group, entry_id, maxlen, *_pairs(fields, "sink_refuse")], pipe)


Entries = list[tuple[bytes, dict | None]]  # (entry id, fields; None for an entry deleted meanwhile)


def read_fair(script: Script, *, group: str, consumer: str, cap: int, start_id: str, streams: Sequence[str]
              ) -> list[tuple[str, Entries]]:
    """At most `cap` entries in all from `streams` (read in that order, each with a share of what is left),
    new ones (`start_id` ">") or those pending to `consumer` ("0", one pass): [(stream, entries), ...], one item
    per read that gave entries (a stream read again is listed again). On a cluster `streams` must lie on one
    node (the first routes the call)."""
    if not streams:
        raise ValueError("read_fair: at least one stream is needed")
    reply = script(keys=[streams[0]], args=[group, consumer, cap, start_id, *streams])
    return [(stream.decode() if isinstance(stream, bytes) else stream,
             [(entry_id, dict(zip(fields[::2], fields[1::2])) if fields else None) for entry_id, fields in entries])
            for stream, entries in reply]


def deadletter_write(script: Script, *, stream: str, group: str, entry_id: bytes | str, deadletters: str, stats: str,
                     payloads: str, maxlen: int, payloads_kept: int, oldest_payload_id: str, payload: bytes,
                     fields: Mapping[str, Value]) -> int:
    """Acknowledge `entry_id` of `stream` for `group` and, if this call acknowledged it: keep `payload` (unless
    empty) in `payloads` (at most `payloads_kept`, none older than `oldest_payload_id`), append `fields` (with
    the payload's id as `payload`) to `deadletters` (MAXLEN ~ maxlen), delete the entry and count
    `deadlettered` in `stats`. 1: recorded; 0: it was not pending any more, nothing done."""
    keys = [stream, deadletters, stats, payloads]
    args = [group, entry_id, maxlen, payloads_kept, oldest_payload_id, payload, *_pairs(fields, "deadletter_write")]
    return _call(script, keys, args)


def deadletter_replay(script: Script, *, deadletters: str, payloads: str, stream: str, stats: str, letter_id: str,
                      payload_id: str) -> int:
    """Append the payload `payload_id` to `stream` and delete it and the dead letter `letter_id`, counting
    `replayed` in `stats`. 1: replayed; 0: no such dead letter; -1: its payload is gone."""
    return _call(script, [deadletters, payloads, stream, stats], [letter_id, payload_id])


@dataclass(frozen=True)
class NewAlarm:
    """An alarm committed with a batch of results: its sequence number and its packed Alarm message."""
    seq: int
    message: bytes


def commit_results(script: Script, *, results: str, state: str, latest: str, alarms: str, stats: str, group: str,
                   version: int, window: str, alarms_maxlen: int, channel: str, ids: Sequence[bytes | str],
                   latest_fields: Mapping[str, Value], new_alarms: Sequence[NewAlarm]) -> int:
    """Commit one camera's batch: if every id of `results` is still pending to `group` and `state` is still at
    `version`, acknowledge them, store `window` (version + 1), set `latest_fields` in `latest` unless its `seq`
    is newer (`latest_fields` must then hold `seq`; empty: left alone), and append to `alarms` (MAXLEN ~
    alarms_maxlen), publish on `channel` and count in `stats` each of `new_alarms`.
    1: committed; 0: some id no longer pending; -1: the state changed since it was read (nothing done)."""
    if latest_fields and "seq" not in latest_fields:
        raise ValueError("commit_results: latest_fields without `seq` (it decides whether they are newer)")
    ordered = {"seq": latest_fields["seq"], **latest_fields} if latest_fields else {}  # the script reads seq first
    pairs = [x for pair in ordered.items() for x in pair]
    args = [group, version, window, alarms_maxlen, channel, len(ids), *ids, len(pairs), *pairs,
            *(x for alarm in new_alarms for x in (alarm.seq, alarm.message))]
    return _call(script, [results, state, latest, alarms, stats], args)


@dataclass(frozen=True)
class NewEvent:
    """A drift event to write: its number (a camera's events count from 1) and its packed DriftEvent message."""
    n: int
    message: bytes


def commit_drift(script: Script, *, state: str, drift: str, stats: str, version: int, window: str | None,
                 maxlen: int, channel: str, events: Sequence[NewEvent]) -> int:
    """If `state` is still at `version`: set `window` (version + 1) when given, then append to `drift` (MAXLEN ~
    maxlen), publish on `channel` and count (`drift_events` of `stats`) each of `events` whose number follows the
    state's `drift_announced` (which follows), oldest first; those already written are skipped.
    The number written (>= 0); -1: the state changed since it was read (nothing done)."""
    args = [version, window or "", maxlen, channel, *(x for event in events for x in (event.n, event.message))]
    return _call(script, [state, drift, stats], args)


def audit_append(script: Script, *, stream: str, maxlen: int, fields: Mapping[str, Value]) -> bytes:
    """Append `fields` to the audit `stream` and trim it to about `maxlen` entries. The new entry's id."""
    if maxlen < 1:
        raise ValueError(f"audit_append: maxlen must be at least 1, got {maxlen}")
    return _call(script, [stream], [maxlen, *_pairs(fields, "audit_append")])


@dataclass(frozen=True)
class SettingsWrite:
    """What camera_settings_write did: `written`, and the camera's packed settings before it (None: none)."""
    written: bool
    previous: bytes | None


def camera_settings_write(script: Script, *, settings: str, version_key: str, read_version: int, camera: str,
                          packed: bytes | None) -> SettingsWrite:
    """Set `camera`'s `packed` settings (None: delete them) in `settings` and move `version_key` from `read_version`
    to `read_version` + 1, unless the counter is no longer at `read_version` (then nothing is written)."""
    reply = _call(script, [settings, version_key], [read_version, camera, b"" if packed is None else packed])
    return SettingsWrite(bool(reply[0]), reply[1] if len(reply) > 1 else None)
