"""Each Lua script of runtime/lua/ alone, through its typed function in runtime.scripts, on a real server:
what it writes, acknowledges, deletes and counts, and what it refuses, read back with plain Redis commands.
Run against every supported server with PATCHCORE_TEST_REDIS=all."""
from __future__ import annotations

import hashlib
import re
import shutil
import time
from importlib import resources

import pytest
import redis

from runtime import scripts
from runtime.connection import connect

GROUP, CONSUMER = "g", "c"


@pytest.fixture
def client(redis_server):
    return connect(redis_server.url)


def snapshot(client) -> dict:
    """Every key's content (streams with their groups' pending counts and last delivered ids), by plain commands."""
    state = {}
    for key in sorted(client.keys("*")):
        kind = client.type(key)
        if kind == b"stream":
            groups = [(g["name"], g["pending"], g["last-delivered-id"]) for g in client.xinfo_groups(key)]
            state[key] = (client.xrange(key), groups)
        elif kind == b"hash":
            state[key] = client.hgetall(key)
        elif kind == b"set":
            state[key] = client.smembers(key)
        else:
            state[key] = (kind, client.dump(key))
    return state


def delivered(client, stream: str, count: int, fields: dict | None = None) -> list[bytes]:
    """`count` new entries of `stream`, delivered to CONSUMER of GROUP (pending to it): their ids."""
    client.xgroup_create(stream, GROUP, id="0", mkstream=True)
    ids = [client.xadd(stream, fields or {"m": f"frame-{i}"}) for i in range(count)]
    client.xreadgroup(GROUP, CONSUMER, {stream: ">"}, count=count)
    return ids


def pending_ids(client, stream: str) -> list[bytes]:
    return [row["message_id"] for row in client.xpending_range(stream, GROUP, min="-", max="+", count=1000)]


def exact_trimming(client) -> None:
    """One entry per stream node: MAXLEN ~ n then trims to exactly n (approximate trimming drops whole nodes)."""
    client.config_set("stream-node-max-entries", 1)


# ---- the files -----------------------------------------------------------------------------------------

def test_every_script_is_a_documented_file_with_its_flags():
    folder = resources.files("runtime").joinpath("lua")
    assert sorted(p.name for p in folder.iterdir() if p.name.endswith(".lua")) == sorted(f"{n}.lua" for n in scripts.names())
    assert {"ack_and_write", "add_frame", "read_fair", "deadletter_write", "deadletter_replay",
            "commit_results"} <= set(scripts.names())
    for name in scripts.names():
        text = scripts.source(name)
        lines = text.splitlines()
        assert re.fullmatch(r"#!lua( flags=[a-z0-9,-]+)?", lines[0]), name  # refused whole when out of memory
        header = lines[1:lines.index(next(line for line in lines[1:] if not line.startswith("--")))]
        assert header and all(line.startswith("--") for line in header)
        documented = "\n".join(header)
        assert "KEYS[1]" in documented and "ARGV[1]" in documented and "Returns" in documented, name
    assert scripts.flags("read_fair") == ("allow-cross-slot-keys",) and scripts.flags("add_frame") == ()


def listed(client) -> dict:
    """FUNCTION LIST as {library: {function: flags}}, read with a plain command."""
    out = {}
    for library in client.execute_command("FUNCTION", "LIST"):
        fields = library if isinstance(library, dict) else dict(zip(library[::2], library[1::2]))
        functions = {}
        for function in fields[b"functions"]:
            f = function if isinstance(function, dict) else dict(zip(function[::2], function[1::2]))
            functions[f[b"name"].decode()] = sorted(flag.decode() for flag in f[b"flags"])
        out[fields[b"library_name"].decode()] = functions
    return out


def test_the_library_has_one_function_per_file_with_its_flags_and_a_version(client):
    library = scripts.library()
    assert library.version == hashlib.sha256(library.code.replace(library.version, "@VERSION@").encode()).hexdigest()[:12]
    assert library.code.startswith(f"#!lua name=patchcore_{library.version}\n")
    assert scripts.load_library(client) == {"": "loaded"}
    assert scripts.load_library(client) == {"": "present"}  # loading again changes nothing
    assert listed(client) == {library.name: {f"{name}_{library.version}": sorted(scripts.flags(name))
                                             for name in scripts.names()}}
    assert scripts.loaded_libraries(client) == [library.name]


def test_a_new_file_joins_the_library_and_two_versions_run_side_by_side(client, tmp_path, monkeypatch):
    old = scripts.library()
    scripts.load_library(client)
    folder = tmp_path / "lua"
    shutil.copytree(resources.files("runtime").joinpath("lua"), folder)
    (folder / "echo_keys.lua").write_text("#!lua flags=no-writes\n-- echo_keys: its keys.\n--\n-- KEYS[1]  any key\n"
                                          "-- ARGV[1]  unused\n--\n-- Returns KEYS.\nreturn KEYS\n")
    for cached in (scripts.names, scripts.source, scripts.library):
        cached.cache_clear()
    monkeypatch.setattr(scripts, "_folder", lambda: folder)
    try:
        new = scripts.library()
        assert new.version != old.version and "echo_keys" in scripts.names()
        assert scripts.load_library(client) == {"": "loaded"}  # beside the old version: no name collides
        assert scripts.loaded_libraries(client) == sorted([old.name, new.name])
        assert listed(client)[new.name][f"echo_keys_{new.version}"] == ["no-writes"]
        assert scripts.load(client, "echo_keys")(["k1"], ["x"]) == [b"k1"]
        client.hset("lim", mapping=LIMITS)
        assert client.fcall(f"add_frame_{old.version}", 3, "s", "st", "lim", 1, 10, 1.0, b"f") == 0  # an old worker
        assert client.fcall(f"add_frame_{new.version}", 3, "s", "st", "lim", 2, 10, 1.0, b"f") == 0  # a new one
        assert client.xlen("s") == 2
        assert scripts.load_library(client, prune=True) == {"": f"present, pruned {old.name}"}
        assert scripts.loaded_libraries(client) == [new.name]
    finally:
        monkeypatch.undo()
        for cached in (scripts.names, scripts.source, scripts.library):
            cached.cache_clear()


def test_a_file_that_cannot_be_a_function_is_refused(tmp_path, monkeypatch):
    folder = tmp_path / "lua"
    folder.mkdir()
    (folder / "bad-name.lua").write_text("#!lua\nreturn 1\n")
    monkeypatch.setattr(scripts, "_folder", lambda: folder)
    scripts.names.cache_clear()
    try:
        with pytest.raises(scripts.LibraryError, match="bad-name"):
            scripts.names()
        (folder / "bad-name.lua").unlink()
        (folder / "no_flags_line.lua").write_text("-- no_flags_line: its first line is no #!lua line\nreturn 1\n")
        scripts.names.cache_clear()
        with pytest.raises(scripts.LibraryError, match="first line"):
            scripts.flags("no_flags_line")
    finally:
        monkeypatch.undo()
        for cached in (scripts.names, scripts.source, scripts.library):
            cached.cache_clear()


def test_an_unknown_script_name_is_refused(client):
    with pytest.raises(scripts.UnknownScriptError, match="no Lua script 'ack_and_writ'"):
        scripts.load(client, "ack_and_writ")


# ---- ack_and_write -------------------------------------------------------------------------------------

def ack(script, entry_id, **overrides):
    call = dict(stream="src", group=GROUP, entry_id=entry_id, target="out", stats="stats", counter="results",
                maxlen=1000, fields={"m": b"outcome", "n": 7})
    return scripts.ack_and_write(script, **{**call, **overrides})


def test_ack_and_write_writes_one_outcome_acknowledges_deletes_and_counts(client):
    script = scripts.load(client, "ack_and_write")
    first, second = delivered(client, "src", 2)
    assert ack(script, first) == 1
    assert [fields for _, fields in client.xrange("out")] == [{b"m": b"outcome", b"n": b"7"}]
    assert [entry_id for entry_id, _ in client.xrange("src")] == [second]  # the entry is deleted, the other stays
    assert pending_ids(client, "src") == [second]
    assert client.hgetall("stats") == {b"results": b"1"}
    before = snapshot(client)
    assert ack(script, first) == 0  # a retry (or another consumer that finished it first) changes nothing
    assert snapshot(client) == before


def test_ack_and_write_leaves_an_entry_never_delivered_alone(client):
    script = scripts.load(client, "ack_and_write")
    client.xgroup_create("src", GROUP, id="0", mkstream=True)
    waiting = client.xadd("src", {"m": "frame"})
    before = snapshot(client)
    assert ack(script, waiting) == 0
    assert snapshot(client) == before


def test_ack_and_write_only_acknowledges_an_entry_trimmed_while_pending(client):
    script = scripts.load(client, "ack_and_write")
    (trimmed,) = delivered(client, "src", 1)
    client.xtrim("src", maxlen=0)  # a writer's MAXLEN made room: its drop was counted there
    assert ack(script, trimmed) == 0
    assert pending_ids(client, "src") == []
    assert not client.exists("out") and not client.exists("stats")


def test_ack_and_write_bounds_its_target_and_queues_in_a_pipeline(client):
    exact_trimming(client)
    script = scripts.load(client, "ack_and_write")
    ids = delivered(client, "src", 5)
    with client.pipeline(transaction=True) as pipe:
        for entry_id in ids:
            assert ack(script, entry_id, maxlen=2, fields={"m": entry_id}, pipe=pipe) is None  # queued
        assert pipe.execute() == [1] * 5
    assert [fields[b"m"] for _, fields in client.xrange("out")] == ids[-2:]
    assert client.xlen("src") == 0 and client.hget("stats", "results") == b"5"


def test_ack_and_write_needs_an_outcome(client):
    script = scripts.load(client, "ack_and_write")
    (entry_id,) = delivered(client, "src", 1)
    with pytest.raises(ValueError, match="at least one field"):
        ack(script, entry_id, fields={})
    assert pending_ids(client, "src") == [entry_id]


# ---- add_frame -----------------------------------------------------------------------------------------

LIMITS = {b"max_entry_bytes": b"100", b"max_stream_len": b"50"}


def add(script, seq, **overrides):
    call = dict(stream="frames", stats="stats", limits="limits", seq=seq, maxlen=10,
                captured_at=1700000000.25, frame=b"frame-%d" % seq)
    if not script.client.exists("limits"):
        script.client.hset("limits", mapping=LIMITS)  # an operator registered the camera
    return scripts.add_frame(script, **{**call, **overrides})


def test_add_frame_appends_and_counts_once_per_sequence_number(client):
    script = scripts.load(client, "add_frame")
    assert add(script, 0) == 0 and add(script, 1) == 0
    assert [fields for _, fields in client.xrange("frames")] == [{b"m": b"frame-0"}, {b"m": b"frame-1"}]
    assert client.hgetall("stats") == {b"last_seq": b"1", b"last_ingest_at": b"1700000000.25", b"ingested": b"2"}
    before = snapshot(client)
    assert add(script, 1) == -1 and add(script, 0, frame=b"other") == -1  # a resend, or an older frame
    assert snapshot(client) == before


def test_add_frame_counts_what_its_bound_trimmed(client):
    exact_trimming(client)
    script = scripts.load(client, "add_frame")
    trimmed = [add(script, seq, maxlen=3) for seq in range(7)]
    assert [fields[b"m"] for _, fields in client.xrange("frames")] == [b"frame-4", b"frame-5", b"frame-6"]
    assert trimmed == [0, 0, 0, 1, 1, 1, 1]
    assert int(client.hget("stats", "dropped")) == 7 - client.xlen("frames") == 4
    assert int(client.hget("stats", "ingested")) == 7


def test_add_frame_refuses_a_frame_over_the_operators_size_limit_and_counts_it(client):
    script = scripts.load(client, "add_frame")
    assert add(script, 0, frame=b"x" * 100) == 0  # at the limit (100 bytes): written
    before = client.xrange("frames")
    assert add(script, 1, frame=b"x" * 101) == -2 and add(script, 2, frame=b"x" * 10_000) == -2
    assert client.xrange("frames") == before and client.hget("stats", "last_seq") == b"0"
    assert client.hget("stats", "refused_size") == b"2"
    assert add(script, 3, frame=b"small") == 0  # the next frame that fits goes through


def test_add_frame_bounds_the_stream_by_the_operators_cap_whatever_the_caller_asks(client):
    script = scripts.load(client, "add_frame")
    for seq in range(80):
        add(script, seq, maxlen=1_000_000)  # the caller asks far more than max_stream_len (50)
    assert client.xlen("frames") == 50  # exactly the cap: not the caller's bound, not approximate
    assert client.hget("stats", "capped") == b"80" and int(client.hget("stats", "dropped")) == 30
    assert [f[b"m"] for _, f in client.xrange("frames")][0] == b"frame-30"


def test_add_frame_refuses_a_camera_without_limits_and_queues_in_a_pipeline(client):
    script = scripts.load(client, "add_frame")
    assert scripts.add_frame(script, stream="frames", stats="stats", limits="none", seq=0, maxlen=10, captured_at=1.0,
                             frame=b"f") == -3  # not registered by an operator: nothing written
    assert not client.exists("frames") and not client.exists("stats")
    client.hset("limits", mapping=LIMITS)
    with client.pipeline(transaction=False) as pipe:
        assert add(script, 5, pipe=pipe) is None
        assert pipe.execute() == [0]
    assert client.hget("stats", "last_seq") == b"5" and client.xlen("frames") == 1


# ---- read_fair -----------------------------------------------------------------------------------------

def backlog(client, sizes: dict[str, int]) -> dict[str, list[bytes]]:
    ids = {}
    for stream, size in sizes.items():
        client.xgroup_create(stream, GROUP, id="0", mkstream=True)
        ids[stream] = [client.xadd(stream, {"m": f"{stream}-{i}"}) for i in range(size)]
    return ids


def read(script, streams, cap, start_id=">"):
    return scripts.read_fair(script, group=GROUP, consumer=CONSUMER, cap=cap, start_id=start_id, streams=streams)


def test_read_fair_caps_the_total_and_serves_every_backlogged_stream(client):
    script = scripts.load(client, "read_fair")
    ids = backlog(client, {"a": 10, "b": 1, "c": 3, "d": 0})
    reply = read(script, ["a", "b", "c", "d"], cap=6)
    got: dict[str, list[bytes]] = {}
    for stream, entries in reply:  # one item per read that gave entries: a stream read again comes again
        got.setdefault(stream, []).extend(entry_id for entry_id, _ in entries)
    assert sum(map(len, got.values())) == 6 and "d" not in got  # the cap, and no empty stream listed
    for stream, taken in got.items():
        assert taken == ids[stream][:len(taken)]  # each stream's oldest, in order
        assert pending_ids(client, stream) == taken  # delivered to the consumer
        assert len(taken) >= min(len(ids[stream]), 6 // 4)  # none starved
    assert got["b"] == ids["b"]  # the short stream's one entry comes with the first call
    written = {(stream, entry_id): {b"m": f"{stream}-{i}".encode()} for stream, entry_ids in ids.items()
               for i, entry_id in enumerate(entry_ids)}
    assert all(fields == written[stream, entry_id] for stream, entries in reply for entry_id, fields in entries)


def test_read_fair_gives_everything_when_the_cap_allows_and_rereads_pending_ones_once(client):
    script = scripts.load(client, "read_fair")
    ids = backlog(client, {"a": 4, "b": 2})
    got: dict[str, list[bytes]] = {}
    for stream, entries in read(script, ["a", "b"], cap=100):
        got.setdefault(stream, []).extend(entry_id for entry_id, _ in entries)
    assert got == ids
    assert read(script, ["a", "b"], cap=100) == []  # nothing new
    client.xdel("a", ids["a"][0])  # deleted while pending: listed without fields
    again = read(script, ["b", "a"], cap=4, start_id="0")  # one pass: each stream its share of 2
    assert again == [("b", [(ids["b"][0], {b"m": b"b-0"}), (ids["b"][1], {b"m": b"b-1"})]),
                     ("a", [(ids["a"][0], None), (ids["a"][1], {b"m": b"a-1"})])]


def test_read_fair_needs_a_stream(client):
    with pytest.raises(ValueError, match="at least one stream"):
        read(scripts.load(client, "read_fair"), [], cap=1)


# ---- deadletter_write ----------------------------------------------------------------------------------

def dead(script, entry_id, **overrides):
    call = dict(stream="frames", group=GROUP, entry_id=entry_id, deadletters="dl", stats="stats", payloads="payloads",
                maxlen=1000, payloads_kept=10, oldest_payload_id="0-1", payload=b"raw bytes",
                fields={"reason": "poison", "id": entry_id})
    return scripts.deadletter_write(script, **{**call, **overrides})


def test_deadletter_write_records_the_letter_and_its_payload_once(client):
    script = scripts.load(client, "deadletter_write")
    first, second = delivered(client, "frames", 2)
    assert dead(script, first) == 1
    ((payload_id, payload),) = client.xrange("payloads")
    assert payload == {b"m": b"raw bytes"}
    assert [fields for _, fields in client.xrange("dl")] == [{b"reason": b"poison", b"id": first, b"payload": payload_id}]
    assert [entry_id for entry_id, _ in client.xrange("frames")] == [second] and pending_ids(client, "frames") == [second]
    assert client.hgetall("stats") == {b"deadlettered": b"1"}
    before = snapshot(client)
    assert dead(script, first) == 0  # a retry, or a frame another consumer finished: nothing
    assert snapshot(client) == before


def test_deadletter_write_without_a_payload_and_for_a_frame_not_pending(client):
    script = scripts.load(client, "deadletter_write")
    (entry_id,) = delivered(client, "frames", 1)
    waiting = client.xadd("frames", {"m": "never delivered"})
    before = snapshot(client)
    assert dead(script, waiting) == 0
    assert snapshot(client) == before
    assert dead(script, entry_id, payload=b"") == 1
    assert [fields for _, fields in client.xrange("dl")] == [{b"reason": b"poison", b"id": entry_id}]
    assert not client.exists("payloads")


def test_deadletter_write_keeps_only_the_newest_and_young_payloads(client):
    script = scripts.load(client, "deadletter_write")
    ids = delivered(client, "frames", 4)
    for entry_id in ids[:3]:
        assert dead(script, entry_id, payloads_kept=2, payload=entry_id) == 1
    kept = client.xrange("payloads")
    assert [fields[b"m"] for _, fields in kept] == ids[1:3]  # at most 2, the newest
    ms, seq = kept[-1][0].decode().split("-")
    assert dead(script, ids[3], payload=ids[3], oldest_payload_id=f"{ms}-{int(seq) + 1}") == 1  # older ones expired
    assert [fields[b"m"] for _, fields in client.xrange("payloads")] == [ids[3]]
    assert client.xlen("dl") == 4 and client.hget("stats", "deadlettered") == b"4"


# ---- deadletter_replay ---------------------------------------------------------------------------------

def replay(script, letter_id, payload_id):
    return scripts.deadletter_replay(script, deadletters="dl", payloads="payloads", stream="frames", stats="stats",
                                     letter_id=letter_id, payload_id=payload_id)


def test_deadletter_replay_puts_the_payload_back_once(client):
    script = scripts.load(client, "deadletter_replay")
    payload_id = client.xadd("payloads", {"m": b"original"}).decode()
    letter_id = client.xadd("dl", {"reason": "poison", "payload": payload_id}).decode()
    other = client.xadd("dl", {"reason": "other"})
    assert replay(script, letter_id, payload_id) == 1
    assert [fields for _, fields in client.xrange("frames")] == [{b"m": b"original"}]
    assert [entry_id for entry_id, _ in client.xrange("dl")] == [other] and client.xlen("payloads") == 0
    assert client.hgetall("stats") == {b"replayed": b"1"}
    before = snapshot(client)
    assert replay(script, letter_id, payload_id) == 0  # a second operator, or a retry: nothing
    assert snapshot(client) == before


def test_deadletter_replay_refuses_a_letter_whose_payload_is_gone(client):
    script = scripts.load(client, "deadletter_replay")
    letter_id = client.xadd("dl", {"reason": "poison", "payload": "1-1"}).decode()
    before = snapshot(client)
    assert replay(script, letter_id, "1-1") == -1
    assert snapshot(client) == before


# ---- commit_results ------------------------------------------------------------------------------------

def commit(script, ids, **overrides):
    call = dict(results="results", state="state", latest="latest", alarms="alarms", stats="stats", group=GROUP,
                version=0, window='{"w": 1}', alarms_maxlen=1000, channel="alarms-live", ids=ids,
                latest_fields={"score": 2.5, "seq": 7}, new_alarms=[])
    return scripts.commit_results(script, **{**call, **overrides})


def test_commit_results_acknowledges_stores_publishes_and_counts_once(client):
    script = scripts.load(client, "commit_results")
    subscriber = client.pubsub(ignore_subscribe_messages=True)
    subscriber.subscribe("alarms-live")
    ids = delivered(client, "results", 3)
    alarms = [scripts.NewAlarm(5, b"alarm 5"), scripts.NewAlarm(7, b"alarm 7")]
    assert commit(script, ids, new_alarms=alarms) == 1
    assert pending_ids(client, "results") == [] and client.xlen("results") == 3  # acknowledged, kept
    assert client.hgetall("state") == {b"version": b"1", b"window": b'{"w": 1}'}
    assert client.hgetall("latest") == {b"seq": b"7", b"score": b"2.5", b"last_alarm_seq": b"7"}
    assert [fields for _, fields in client.xrange("alarms")] == [{b"m": b"alarm 5"}, {b"m": b"alarm 7"}]
    assert client.hgetall("stats") == {b"alarms": b"2"}
    published, deadline = [], time.time() + 2
    while len(published) < 2 and time.time() < deadline:
        if (message := subscriber.get_message(timeout=0.2)) is not None:
            published.append(message["data"])
    assert published == [b"alarm 5", b"alarm 7"]
    before = snapshot(client)
    assert commit(script, ids, version=1, new_alarms=alarms) == 0  # a retry: no longer pending, nothing done
    assert snapshot(client) == before
    subscriber.close()


def test_commit_results_refuses_a_state_changed_since_it_was_read(client):
    script = scripts.load(client, "commit_results")
    ids = delivered(client, "results", 2)
    client.hset("state", mapping={"version": 3, "window": "theirs"})  # another store committed meanwhile
    before = snapshot(client)
    assert commit(script, ids, version=2, new_alarms=[scripts.NewAlarm(1, b"a")]) == -1
    assert snapshot(client) == before
    assert commit(script, ids, version=3) == 1 and client.hget("state", "version") == b"4"


def test_commit_results_keeps_a_newer_latest_state_and_commits_a_flush_without_results(client):
    script = scripts.load(client, "commit_results")
    ids = delivered(client, "results", 1)
    client.hset("latest", mapping={"seq": 10, "score": "9"})
    assert commit(script, ids, latest_fields={"seq": 7, "score": 1.0}) == 1
    assert client.hgetall("latest") == {b"seq": b"10", b"score": b"9"}  # seq 7 is older: left alone
    assert commit(script, [], version=1, window="flushed", latest_fields={}, new_alarms=[scripts.NewAlarm(11, b"x")]) == 1
    assert client.hgetall("state") == {b"version": b"2", b"window": b"flushed"}
    assert client.hgetall("latest") == {b"seq": b"10", b"score": b"9", b"last_alarm_seq": b"11"}


def test_commit_results_needs_the_latest_seq(client):
    script = scripts.load(client, "commit_results")
    with pytest.raises(ValueError, match="without `seq`"):
        commit(script, [], latest_fields={"score": 1.0})


# ---- every writing script is refused whole when the server is out of memory ------------------------------

def _ack_and_write(client):
    (entry_id,) = delivered(client, "src", 1)
    return lambda: ack(scripts.load(client, "ack_and_write"), entry_id)


def _add_frame(client):
    client.hset("stats", "last_seq", 0)
    client.hset("limits", mapping=LIMITS)
    return lambda: add(scripts.load(client, "add_frame"), 1)


def _read_fair(client):
    backlog(client, {"a": 2, "b": 1})
    return lambda: read(scripts.load(client, "read_fair"), ["a", "b"], cap=3)


def _deadletter_write(client):
    (entry_id,) = delivered(client, "frames", 1)
    return lambda: dead(scripts.load(client, "deadletter_write"), entry_id)


def _deadletter_replay(client):
    payload_id = client.xadd("payloads", {"m": b"original"}).decode()
    letter_id = client.xadd("dl", {"payload": payload_id}).decode()
    return lambda: replay(scripts.load(client, "deadletter_replay"), letter_id, payload_id)


def _commit_results(client):
    ids = delivered(client, "results", 2)
    return lambda: commit(scripts.load(client, "commit_results"), ids, new_alarms=[scripts.NewAlarm(1, b"a")])


@pytest.mark.parametrize("prepare", [_ack_and_write, _add_frame, _read_fair, _deadletter_write, _deadletter_replay,
                                     _commit_results], ids=lambda f: f.__name__.strip("_"))
def test_a_server_out_of_memory_refuses_the_whole_script(client, prepare):
    call = prepare(client)
    before = snapshot(client)
    client.config_set("maxmemory", 1)  # every write is now refused (OOM)
    try:
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            call()
    finally:
        client.config_set("maxmemory", 0)
    assert snapshot(client) == before  # nothing half done: no acknowledgement without its write
    call()  # the same call goes through once memory is back
    assert snapshot(client) != before


# ---- a camera may write its stats hash: a forged counter restarts at 0, never fails a call ------------------

@pytest.mark.parametrize("forged", [b"abc", b"", b"nan", b"1e3", b"9" * 19, b"-"])
def test_a_forged_counter_in_the_stats_restarts_at_zero_instead_of_failing_the_call(client, forged):
    (entry_id,) = delivered(client, "src", 1)
    client.hset("stats", mapping={"results": forged, "deadlettered": forged, "alarms": forged})
    assert ack(scripts.load(client, "ack_and_write"), entry_id) == 1  # HINCRBY on a forged value would fail it
    assert client.hget("stats", "results") == b"1" and client.xlen("out") == 1
    (second,) = [i for i in delivered(client, "frames", 1)]
    assert dead(scripts.load(client, "deadletter_write"), second) == 1
    assert client.hget("stats", "deadlettered") == b"1"
    client.hset("stats", "ingested", forged)
    client.hset("limits", mapping=LIMITS)
    assert add(scripts.load(client, "add_frame"), 1, stream="frames-2") == 0
    assert client.hget("stats", "ingested") == b"1"
    assert client.hget("stats", "alarms") == forged  # untouched until a function counts it


def test_hash_field_swap_writes_only_over_what_the_caller_read(client):
    swap = scripts.load(client, "hash_field_swap")
    assert scripts.hash_field_swap(swap, key="h", field="cam-1", read=None, value='{"window": 8}')  # absent: set
    assert client.hget("h", "cam-1") == b'{"window": 8}'
    # a writer that read "absent" (before the first write) is refused: nothing written
    assert not scripts.hash_field_swap(swap, key="h", field="cam-1", read=None, value='{"level": 2}')
    # one that read another value is refused too
    assert not scripts.hash_field_swap(swap, key="h", field="cam-1", read=b'{"window": 9}', value='{"x": 1}')
    assert client.hget("h", "cam-1") == b'{"window": 8}'
    # over what it read: written; then deleted
    assert scripts.hash_field_swap(swap, key="h", field="cam-1", read=b'{"window": 8}', value='{"window": 8, "level": 2}')
    assert client.hget("h", "cam-1") == b'{"window": 8, "level": 2}'
    assert scripts.hash_field_swap(swap, key="h", field="cam-1", read=b'{"window": 8, "level": 2}', value=None)
    assert not client.hexists("h", "cam-1")
