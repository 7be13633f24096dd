"""Sinks against real destinations on loopback (tests/sinkservers.py): an HTTP receiver that checks signatures and
fails or refuses on purpose, Debian's mosquitto, an asyncua server; a real Redis (conftest). Delivery is at
least once: each message arrives, in order per camera, and nothing is lost when the destination is down or the
sink is killed; a permanent refusal lands in the sink's dead letters with its reason."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
from contextlib import contextmanager

import pytest
from prometheus_client import REGISTRY
from typer.testing import CliRunner

from contracts.keys import Keys, sink_group
from patchcore.cli import app
from runtime.connection import connect
from runtime.status import collect_status, prune_dead
from sinks.modbus import Modbus, ModbusSettings, register_map
from sinks.mqtt import Mqtt, MqttSettings
from sinks.opcua import OpcUa, OpcUaSettings
from sinks.messages import alarm_key, drift_key, verdict_key
from sinks.service import Sink, SinkSettings
from sinks.webhook import Webhook, WebhookSettings

from .sinkservers import (MOSQUITTO, ModbusPlc, Mosquitto, PlcServer, Receiver, Subscriber, drift_events, free_port, self_signed,
                          wait_for, write_alarms, write_drift, write_results)

KEYS = Keys()
SECRET = b"test-secret-of-the-webhook"
FAST = dict(backoff_s=0.05, max_backoff_s=0.2, refresh_s=0.2, health_s=0.1, down_after_s=0.5)


@pytest.fixture
def client(redis_server):
    return connect(redis_server.url)


@pytest.fixture
def secret_file(tmp_path):
    path = tmp_path / "webhook.secret"
    path.write_bytes(SECRET + b"\n")
    return path


@contextmanager
def running(sink: Sink):
    thread = threading.Thread(target=sink.run, daemon=True)
    thread.start()
    try:
        yield sink
    finally:
        sink.stop.set()
        thread.join(20)
        assert not thread.is_alive()


def webhook_sink(client, url, secret_file, **settings) -> Sink:
    return Sink(client, Webhook(WebhookSettings(url=url, secret_file=secret_file, timeout_s=2.0)),
                SinkSettings(**{"sink": "hook", **FAST, **settings}), KEYS)


def expected_verdicts(camera, seqs):
    return [verdict_key(camera, seq, "bottle") for seq in seqs]


def sink_pending(client, camera, sink="hook") -> int:
    return sum(int(client.xpending(stream, sink_group(sink))["pending"])
               for stream in (KEYS.results(camera), KEYS.alarms(camera), KEYS.drift(camera)))


# ---- webhook -----------------------------------------------------------------------------------------------------
def test_webhook_delivers_each_verdict_and_alarm_once_in_order_signed(client, secret_file):
    receiver = Receiver(SECRET).start()
    try:
        write_results(client, KEYS, "cam-a", range(30))
        write_results(client, KEYS, "cam-b", range(20))
        write_alarms(client, KEYS, "cam-a", [7, 19])
        expected = 30 + 20 + 2
        counted = {kind: REGISTRY.get_sample_value("patchcore_sink_delivered_total", {"sink": "hook", "kind": kind}) or 0
                   for kind in ("verdict", "alarm")}
        with running(webhook_sink(client, receiver.url, secret_file)) as sink:
            assert wait_for(lambda: len(receiver.received) >= expected)
            assert wait_for(lambda: sink_pending(client, "cam-a") + sink_pending(client, "cam-b") == 0)
            assert wait_for(lambda: REGISTRY.get_sample_value("patchcore_sink_state", {"sink": "hook", "state": "ok"})
                            == 1 and REGISTRY.get_sample_value("patchcore_sink_pending", {"sink": "hook"}) == 0)
        keys = receiver.keys()
        assert len(keys) == expected == len(set(keys))  # a destination that never failed: exactly once
        for camera, count in (("cam-a", 30), ("cam-b", 20)):
            assert [k for k in keys if k.startswith(f"verdict:{camera}:")] == expected_verdicts(camera, range(count))
        assert [k for k in keys if k.startswith("alarm:")] == [alarm_key("cam-a", 7), alarm_key("cam-a", 19)]
        assert receiver.bad_signatures == 0
        body = next(r["body"] for r in receiver.received if r["key"] == verdict_key("cam-b", 3, "bottle"))
        assert body["type"] == "verdict" and body["camera"] == "cam-b" and body["seq"] == 3 and body["line"] == "line-1"
        assert sink.report.delivered == expected and sink.report.deadlettered == 0
        for kind, count in (("verdict", 50), ("alarm", 2)):  # metrics: what the destination confirmed
            assert REGISTRY.get_sample_value("patchcore_sink_delivered_total", {"sink": "hook", "kind": kind}) \
                == counted[kind] + count
        assert client.xlen(KEYS.results("cam-a")) == 30  # the store and other sinks still read them
    finally:
        receiver.stop()


def test_drift_events_reach_the_webhook_as_type_drift_in_order_with_their_keys(client, secret_file):
    """A camera's drift episode (raised, acknowledged, returned: the store's tracker decides them) is delivered
    with the verdicts, each event once with the key drift:<camera>:<n>; a sink told --no-drift leaves them."""
    receiver = Receiver(SECRET).start()
    try:
        events = drift_events("cam-a")
        assert [e.kind for e in events] == ["drift", "drift-acknowledged", "drift-cleared"]
        write_results(client, KEYS, "cam-a", range(5))
        write_drift(client, KEYS, "cam-a", events)
        with running(webhook_sink(client, receiver.url, secret_file)) as sink:
            assert wait_for(lambda: len(receiver.received) >= 8)
            assert wait_for(lambda: sink_pending(client, "cam-a") == 0)
        keys = receiver.keys()
        assert [k for k in keys if k.startswith("drift:")] == [drift_key("cam-a", n) for n in (1, 2, 3)]
        assert len(keys) == len(set(keys)) == 8 and sink.report.delivered == 8
        bodies = [r["body"] for r in receiver.received if r["body"]["type"] == "drift"]
        for body, event in zip(bodies, events):
            assert body["event"] == event.kind and body["n"] == event.n and body["seq"] == event.seq
            assert body["camera"] == "cam-a" and body["line"] == "line-1"  # the acknowledgement too: one topic
            assert body["share_over"] == event.share_over and body["held"] == event.held and body["by"] == event.by
        assert [b["drifted"] for b in bodies] == [True, True, False]
        assert bodies[1]["by"] == "alice" and bodies[1]["seq"] == bodies[0]["seq"]  # the frame that raised it
        assert REGISTRY.get_sample_value("patchcore_sink_delivered_total", {"sink": "hook", "kind": "drift"}) >= 3
        # another sink that does not deliver drift leaves the drift streams alone (no group there)
        other = webhook_sink(client, receiver.url, secret_file, sink="nodrift", drift=False)
        with running(other):
            assert wait_for(lambda: other.report.delivered == 5)
        groups = {g["name"] for g in client.xinfo_groups(KEYS.drift("cam-a"))}
        assert sink_group("hook").encode() in groups and sink_group("nodrift").encode() not in groups
    finally:
        receiver.stop()


def test_an_unreadable_drift_event_is_dead_lettered(client, secret_file):
    receiver = Receiver(SECRET).start()
    try:
        events = drift_events("cam-a")
        write_drift(client, KEYS, "cam-a", events[:1])
        client.xadd(KEYS.drift("cam-a"), {"n": 2, "m": events[1].pack()[:-3]})  # cut short
        write_drift(client, KEYS, "cam-b", events[2:])  # cam-a's event on cam-b's stream
        with running(webhook_sink(client, receiver.url, secret_file)) as sink:
            assert wait_for(lambda: len(receiver.received) >= 1 and sink.report.deadlettered == 2)
        assert receiver.keys() == [drift_key("cam-a", 1)]
        (_, letter), = client.xrange(KEYS.sink_deadletter("hook", "cam-b"))
        assert letter[b"reason"].decode() == f"drift of camera 'cam-a' arrived on {KEYS.drift('cam-b')}"
        assert client.xlen(KEYS.sink_deadletter("hook", "cam-a")) == 1
    finally:
        receiver.stop()


def test_a_lost_read_reply_is_read_again_at_once_and_the_sink_keeps_reading(redis_server, client, secret_file):
    """The reply to the sink's XREADGROUP is lost and its connection closed: what that read delivered is pending to
    the sink, which reads it again on its new connection (CameraStreams.read_own) long before claim_idle_ms, and
    then goes on reading new entries."""
    from .faultproxy import FaultProxy

    receiver = Receiver(SECRET).start()
    try:
        marker = b"\r\n$1\r\n>\r\n"  # XREADGROUP ... ">" (the library's text names XREADGROUP too)
        with FaultProxy(redis_server.port, marker=marker, drops=1, only_nonempty=True) as proxy:
            sink = webhook_sink(connect(proxy.url), receiver.url, secret_file, claim_idle_ms=120_000)
            with running(sink):
                write_results(client, KEYS, "cam-a", range(10))
                assert wait_for(lambda: len(receiver.received) >= 10, 20)
                assert proxy.dropped == 1
                write_results(client, KEYS, "cam-a", range(10, 15))  # new entries after the recovery
                assert wait_for(lambda: len(receiver.received) >= 15, 20)
                assert wait_for(lambda: sink_pending(client, "cam-a") == 0)
        assert receiver.keys() == expected_verdicts("cam-a", range(15))  # each once, in order
        assert sink.report.recovered >= 1
    finally:
        receiver.stop()


def test_a_wrong_secret_is_refused_by_the_receiver_and_dead_lettered(client, tmp_path):
    wrong = tmp_path / "wrong.secret"
    wrong.write_bytes(b"another secret")
    receiver = Receiver(SECRET).start()
    try:
        write_results(client, KEYS, "cam-a", range(3))
        with running(webhook_sink(client, receiver.url, wrong)) as sink:
            assert wait_for(lambda: sink.report.deadlettered == 3)
        assert receiver.received == [] and receiver.bad_signatures == 3
        letters = client.xrange(KEYS.sink_deadletter("hook", "cam-a"))
        assert [letter[b"reason"].decode() for _, letter in letters] == ["HTTP 401: "] * 3
    finally:
        receiver.stop()


def test_webhook_failing_first_then_down_then_up_loses_nothing(redis_server, client, secret_file):
    port = free_port()
    receiver = Receiver(SECRET, port=port, fail_first=5).start()
    try:
        write_results(client, KEYS, "cam-a", range(10))
        with running(webhook_sink(client, receiver.url, secret_file)) as sink:
            assert wait_for(lambda: len(receiver.received) >= 10)  # after 5 refusals (503), retried
            assert sink.report.failures >= 1
            receiver.stop()  # destination down: connection refused
            write_results(client, KEYS, "cam-a", range(10, 40))

            def row():
                return next(r for r in collect_status(client, KEYS.prefix, reasons=False)["sinks"] if r["sink"] == "hook")

            assert wait_for(lambda: row()["state"] == "down" and row()["pending"] == 30, 10), row()
            assert row()["consumer"] == "sink-1" and row()["delivered"] == 10 and "ConnectError" in row()["last_error"]
            assert row()["destination"] == f"webhook http://127.0.0.1:{port}/hook"
            shown = CliRunner().invoke(app, ["status", "--redis-url", redis_server.url], env={"COLUMNS": "200"})
            assert shown.exit_code == 0, shown.output
            assert f"sink hook/sink-1: DOWN  webhook http://127.0.0.1:{port}/hook  pending 30" in shown.output
            assert sink_pending(client, "cam-a") == 30  # held, not acknowledged
            receiver = Receiver(SECRET, port=port).start()  # up again
            assert wait_for(lambda: len(receiver.received) >= 30)
            assert wait_for(lambda: sink.state == "ok" and sink_pending(client, "cam-a") == 0)
        assert receiver.keys() == expected_verdicts("cam-a", range(10, 40))
    finally:
        receiver.stop()


def test_down_destination_backlog_is_bounded_by_max_pending(client, secret_file):
    port = free_port()  # nothing listens
    write_results(client, KEYS, "cam-a", range(50))
    with running(webhook_sink(client, f"http://127.0.0.1:{port}/hook", secret_file, max_pending=8, batch=4)) as sink:
        assert wait_for(lambda: sink.report.failures >= 3)
        assert sink_pending(client, "cam-a") == 8  # read no further: the rest waits in Redis, undelivered
        info = {g["name"]: g for g in client.xinfo_groups(KEYS.results("cam-a"))}[sink_group("hook").encode()]
        assert info["lag"] == 42


def test_webhook_4xx_goes_to_dead_letters_with_reason_and_the_rest_is_delivered(redis_server, client, secret_file):
    receiver = Receiver(SECRET, refuse_seqs=frozenset({3, 8})).start()
    try:
        write_results(client, KEYS, "cam-a", range(12))
        with running(webhook_sink(client, receiver.url, secret_file)) as sink:
            assert wait_for(lambda: len(receiver.received) >= 10 and sink.report.deadlettered == 2)
            assert wait_for(lambda: sink_pending(client, "cam-a") == 0)
        assert receiver.keys() == expected_verdicts("cam-a", [s for s in range(12) if s not in (3, 8)])
        letters = client.xrange(KEYS.sink_deadletter("hook", "cam-a"))
        assert [json.loads(letter[b"body"])["seq"] for _, letter in letters] == [3, 8]
        assert all(letter[b"reason"] == b"HTTP 400: seq refused by the test" for _, letter in letters)
        assert [letter[b"key"].decode() for _, letter in letters] == expected_verdicts("cam-a", [3, 8])
        listed = CliRunner().invoke(app, ["sink", "deadletters", "--sink", "hook", "--redis-url", redis_server.url])
        assert listed.exit_code == 0, listed.output
        rows = [json.loads(line) for line in listed.output.splitlines()]
        assert [(r["camera"], r["key"], r["reason"]) for r in rows] == [
            ("cam-a", key, "HTTP 400: seq refused by the test") for key in expected_verdicts("cam-a", [3, 8])]
    finally:
        receiver.stop()


def test_an_unreadable_entry_is_dead_lettered_not_delivered(client, secret_file):
    receiver = Receiver(SECRET).start()
    try:
        write_results(client, KEYS, "cam-a", range(2))
        client.xadd(KEYS.results("cam-a"), {"m": b"\x93not a result"})
        write_results(client, KEYS, "cam-a", range(2, 4))
        with running(webhook_sink(client, receiver.url, secret_file)) as sink:
            assert wait_for(lambda: len(receiver.received) >= 4 and sink.report.deadlettered == 1)
        assert receiver.keys() == expected_verdicts("cam-a", range(4))
        (_, letter), = client.xrange(KEYS.sink_deadletter("hook", "cam-a"))
        assert letter[b"reason"].startswith(b"message is not a map") or b"msgpack" in letter[b"reason"]
    finally:
        receiver.stop()


def sink_process(url, receiver_url, secret_file, name, *args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "patchcore", "sink", "webhook", "--redis-url", url,
                             "--url", receiver_url, "--secret-file", str(secret_file), "--sink", "hook",
                             "--name", name, "--batch", "4", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.parametrize("restart_as", ["same-name", "other-name"])
def test_a_sink_killed_mid_delivery_loses_nothing(redis_server, client, secret_file, restart_as):
    receiver = Receiver(SECRET, delay_s=0.02).start()  # slow enough to kill it halfway
    total = 150
    write_results(client, KEYS, "cam-a", range(total))
    first = sink_process(redis_server.url, receiver.url, secret_file, "s-1")
    try:
        assert wait_for(lambda: len(receiver.received) >= 30, 60)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        delivered_before = len(set(receiver.keys()))
        assert delivered_before < total
        assert sink_pending(client, "cam-a") > 0  # it held entries unacknowledged when it died
        name, extra = ("s-1", []) if restart_as == "same-name" else ("s-2", ["--claim-idle-ms", "500"])
        second = sink_process(redis_server.url, receiver.url, secret_file, name, *extra)
        try:
            assert wait_for(lambda: set(receiver.keys()) >= set(expected_verdicts("cam-a", range(total))), 60)
            assert wait_for(lambda: sink_pending(client, "cam-a") == 0, 10)
        finally:
            second.send_signal(signal.SIGTERM)
            out, err = second.communicate(timeout=20)
        assert second.returncode == 0, err[-2000:]
        report = json.loads(out.decode().strip().splitlines()[-1])
        if restart_as == "same-name":
            assert report["recovered"] >= 1
        else:
            assert report["claimed"] >= 1
        keys = receiver.keys()
        # at least once: an entry the killed sink had sent but not acknowledged may arrive twice, never more
        assert max(keys.count(k) for k in set(keys)) <= 2
        first_seen = list(dict.fromkeys(keys))
        assert sorted(first_seen, key=lambda k: int(k.split(":")[2])) == expected_verdicts("cam-a", range(total))
    finally:
        if first.poll() is None:
            first.kill()
        receiver.stop()


def test_two_processes_of_one_sink_share_the_work(client, secret_file):
    receiver = Receiver(SECRET).start()
    try:
        for camera in ("cam-a", "cam-b", "cam-c"):
            write_results(client, KEYS, camera, range(40))
        one = webhook_sink(client, receiver.url, secret_file, name="s-1", batch=8)
        two = webhook_sink(client, receiver.url, secret_file, name="s-2", batch=8)
        with running(one), running(two):
            assert wait_for(lambda: len(receiver.received) >= 120)
        keys = receiver.keys()
        assert len(keys) == len(set(keys)) == 120
        for camera in ("cam-a", "cam-b", "cam-c"):
            assert sorted((k for k in keys if f":{camera}:" in k), key=lambda k: int(k.split(":")[2])) == \
                expected_verdicts(camera, range(40))
    finally:
        receiver.stop()


# ---- MQTT --------------------------------------------------------------------------------------------------------
needs_mosquitto = pytest.mark.skipif(MOSQUITTO is None, reason="Debian's mosquitto is not installed (.ci/run installs it)")


def mqtt_sink(client, port, **settings) -> Sink:
    return Sink(client, Mqtt(MqttSettings(host="127.0.0.1", port=port, publish_timeout_s=2.0), "patchcore-test"),
                SinkSettings(**{"sink": "mq", **FAST, **settings}), KEYS)


@needs_mosquitto
def test_mqtt_topics_payloads_order_and_retained_verdict(client, tmp_path):
    broker = Mosquitto(tmp_path).start()
    subscriber = Subscriber(broker.port, "plant/#")
    try:
        write_results(client, KEYS, "cam-a", range(25))
        write_results(client, KEYS, "cam/b", range(15), line="")
        write_alarms(client, KEYS, "cam-a", [4])
        destination = Mqtt(MqttSettings(host="127.0.0.1", port=broker.port, topic_prefix="plant"), "pc-test")
        with running(Sink(client, destination, SinkSettings(sink="mq", **FAST), KEYS)) as sink:
            assert wait_for(lambda: len(subscriber.messages) >= 41)
            assert wait_for(lambda: sink_pending(client, "cam-a", "mq") + sink_pending(client, "cam/b", "mq") == 0)
        keys = subscriber.keys()
        assert len(keys) == len(set(keys)) == 41
        assert [k for k in keys if k.startswith("verdict:cam-a:")] == expected_verdicts("cam-a", range(25))
        assert [k for k in keys if k.startswith("verdict:cam/b:")] == expected_verdicts("cam/b", range(15))
        topics = {m[0] for m in subscriber.messages}
        assert topics == {"plant/line-1/cam-a/verdict", "plant/_/cam%2Fb/verdict", "plant/line-1/cam-a/alarm"}
        (alarm_topic, body, _, _), = [m for m in subscriber.messages if m[0].endswith("/alarm")]
        assert body["id"] == alarm_key("cam-a", 4) and body["alarm_id"] == "cam-a:4" and body["type"] == "alarm"
        # a subscriber that connects later gets each camera's last verdict at once (retained), and no alarm
        late = Subscriber(broker.port, "plant/#")
        try:
            assert wait_for(lambda: len(late.messages) >= 2, 10)
            assert sorted(late.keys(retained=True)) == [verdict_key("cam-a", 24, "bottle"),
                                                        verdict_key("cam/b", 14, "bottle")]
            assert len(late.messages) == 2
        finally:
            late.stop()
    finally:
        subscriber.stop()
        broker.stop()


@needs_mosquitto
def test_mqtt_drift_events_go_to_the_drift_topic_and_the_last_is_retained(client, tmp_path):
    broker = Mosquitto(tmp_path).start()
    subscriber = Subscriber(broker.port, "plant/#")
    try:
        events = drift_events("cam-a")
        write_drift(client, KEYS, "cam-a", events[:2])  # drifted, acknowledged: still drifted
        write_results(client, KEYS, "cam-a", range(3))
        destination = Mqtt(MqttSettings(host="127.0.0.1", port=broker.port, topic_prefix="plant"), "pc-drift")
        with running(Sink(client, destination, SinkSettings(sink="mq", **FAST), KEYS)):
            assert wait_for(lambda: len(subscriber.messages) >= 5)
            assert wait_for(lambda: sink_pending(client, "cam-a", "mq") == 0)
        drift = [m for m in subscriber.messages if m[0] == "plant/line-1/cam-a/drift"]
        assert [m[1]["id"] for m in drift] == [drift_key("cam-a", 1), drift_key("cam-a", 2)]
        assert [m[1]["event"] for m in drift] == ["drift", "drift-acknowledged"] and drift[0][1]["type"] == "drift"
        late = Subscriber(broker.port, "plant/+/+/drift")  # connects later: the camera's current drift state
        try:
            assert wait_for(lambda: len(late.messages) >= 1, 10)
            (topic_name, body, retained, _), = late.messages
            assert retained and body["id"] == drift_key("cam-a", 2) and body["drifted"] is True
        finally:
            late.stop()
    finally:
        subscriber.stop()
        broker.stop()


@needs_mosquitto
def test_mqtt_broker_down_then_up_loses_nothing(client, tmp_path):
    port = free_port()
    write_results(client, KEYS, "cam-a", range(10))
    with running(mqtt_sink(client, port)) as sink:  # no broker yet
        assert wait_for(lambda: sink.report.failures >= 2)
        assert sink_pending(client, "cam-a", "mq") == 10
        assert wait_for(lambda: sink.state == "down", 10)
        broker = Mosquitto(tmp_path, port=port).start()
        try:
            subscriber = Subscriber(port, "patchcore/#")
            try:
                write_results(client, KEYS, "cam-a", range(10, 20))
                assert wait_for(lambda: len(subscriber.messages) >= 20)
                assert wait_for(lambda: sink.state == "ok" and sink_pending(client, "cam-a", "mq") == 0)
                broker.stop()  # down again mid-stream, then back: nothing lost
                write_results(client, KEYS, "cam-a", range(20, 30))
                assert wait_for(lambda: sink.report.failures >= 4 and sink_pending(client, "cam-a", "mq") == 10)
                subscriber.stop()
                broker = Mosquitto(tmp_path, port=port).start()
                subscriber = Subscriber(port, "patchcore/#")
                assert wait_for(lambda: set(expected_verdicts("cam-a", range(20, 30))) <= set(subscriber.keys()))
                assert wait_for(lambda: sink_pending(client, "cam-a", "mq") == 0)
            finally:
                subscriber.stop()
        finally:
            broker.stop()


@needs_mosquitto
def test_mqtt_credentials(client, tmp_path):
    broker = Mosquitto(tmp_path, users={"line": "s3cret"}).start()
    password = tmp_path / "mqtt.password"
    password.write_text("s3cret\n")
    try:
        write_results(client, KEYS, "cam-a", range(3))
        right = Mqtt(MqttSettings(host="127.0.0.1", port=broker.port, username="line", password_file=password), "x")
        assert right.deliver([]).error is None  # connects with the right password
        right.close()
        bad = tmp_path / "bad.password"
        bad.write_text("wrong")
        refused = Mqtt(MqttSettings(host="127.0.0.1", port=broker.port, username="line", password_file=bad), "y")
        attempt = refused.deliver([])
        assert attempt.error is not None and "refused" in attempt.error
        refused.close()
    finally:
        broker.stop()


# ---- OPC UA ------------------------------------------------------------------------------------------------------
def opcua_sink(client, url, **settings) -> Sink:
    return Sink(client, OpcUa(OpcUaSettings(url=url, timeout_s=2.0)), SinkSettings(**{"sink": "plc", **FAST,
                                                                                        **settings}), KEYS)


def test_opcua_writes_each_verdict_and_alarm_to_the_cameras_nodes_in_order(client):
    plc = PlcServer(["cam-a", "cam-b"]).start()
    try:
        write_results(client, KEYS, "cam-a", range(20), score=1.5, threshold=1.0)
        write_results(client, KEYS, "cam-b", range(10), threshold=None)
        write_alarms(client, KEYS, "cam-a", [12])
        with running(opcua_sink(client, plc.url)) as sink:
            assert wait_for(lambda: len(plc.seqs("cam-a")) >= 20 and len(plc.seqs("cam-b")) >= 10
                            and plc.seqs("cam-a", "AlarmSeq") == [12])
            assert wait_for(lambda: sink_pending(client, "cam-a", "plc") + sink_pending(client, "cam-b", "plc") == 0)
        assert plc.seqs("cam-a") == list(range(20)) and plc.seqs("cam-b") == list(range(10))
        camera, written = next(w for w in plc.writes if w[0] == "cam-a" and "Seq" in w[1])
        assert list(written) == ["Score", "Threshold", "Verdict", "Timestamp", "Seq"]  # Seq last, one request
        assert written["Verdict"] is True and written["Score"] == 1.5 and written["Threshold"] == 1.0
        _, unjudged = next(w for w in plc.writes if w[0] == "cam-b" and "Seq" in w[1])
        assert unjudged["Verdict"] is False and unjudged["Threshold"] != unjudged["Threshold"]  # NaN: no threshold
        assert sink.report.delivered == 31 and sink.report.deadlettered == 0
    finally:
        plc.stop()


def test_opcua_missing_camera_node_and_wrong_type_go_to_dead_letters(client):
    plc = PlcServer(["cam-a", "cam-t"], types={"Seq": "String"}).start()  # Seq of the wrong type everywhere
    try:
        write_results(client, KEYS, "cam-x", range(2))  # no folder for cam-x on the server
        write_results(client, KEYS, "cam-a", range(2))
        with running(opcua_sink(client, plc.url)) as sink:
            assert wait_for(lambda: sink.report.deadlettered == 4)
        reasons = {camera: [letter[b"reason"].decode() for _, letter in client.xrange(KEYS.sink_deadletter("plc", camera))]
                   for camera in ("cam-x", "cam-a")}
        assert all(r.startswith("BadNoMatch") for r in reasons["cam-x"]) and len(reasons["cam-x"]) == 2
        assert all(r.startswith("BadTypeMismatch") for r in reasons["cam-a"]) and len(reasons["cam-a"]) == 2
        assert sink_pending(client, "cam-x", "plc") == sink_pending(client, "cam-a", "plc") == 0
    finally:
        plc.stop()


def test_opcua_drift_events_write_drift_then_drift_seq_and_a_server_without_them_still_takes_verdicts(client):
    plc = PlcServer(["cam-a", "cam-b"], omit={"cam-b": ("Drift", "DriftSeq")}).start()
    try:
        events = drift_events("cam-a")
        write_drift(client, KEYS, "cam-a", events)
        write_drift(client, KEYS, "cam-b", drift_events("cam-b")[:1])
        write_results(client, KEYS, "cam-b", range(4))
        with running(opcua_sink(client, plc.url)) as sink:
            assert wait_for(lambda: len(plc.seqs("cam-a", "DriftSeq")) >= 3 and len(plc.seqs("cam-b")) >= 4
                            and sink.report.deadlettered == 1)
            assert wait_for(lambda: sink_pending(client, "cam-a", "plc") + sink_pending(client, "cam-b", "plc") == 0)
        drift = [written for camera, written in plc.writes if camera == "cam-a"]
        assert [list(w) for w in drift] == [["Drift", "DriftSeq"]] * 3  # one request each, DriftSeq last
        assert [(w["Drift"], w["DriftSeq"]) for w in drift] == [(True, 1), (True, 2), (False, 3)]
        assert plc.seqs("cam-b") == list(range(4))  # no Drift nodes there: its verdicts still land
        (_, letter), = client.xrange(KEYS.sink_deadletter("plc", "cam-b"))
        assert letter[b"reason"].startswith(b"BadNoMatch") and letter[b"key"] == drift_key("cam-b", 1).encode()
    finally:
        plc.stop()


def test_opcua_server_down_then_up_loses_nothing(client):
    port = free_port()
    write_results(client, KEYS, "cam-a", range(15))
    with running(opcua_sink(client, f"opc.tcp://127.0.0.1:{port}")) as sink:
        assert wait_for(lambda: sink.report.failures >= 2 and sink.state == "down", 20)
        assert sink_pending(client, "cam-a", "plc") == 15
        plc = PlcServer(["cam-a"], port=port).start()
        try:
            assert wait_for(lambda: len(plc.seqs("cam-a")) >= 15, 30)
            assert wait_for(lambda: sink_pending(client, "cam-a", "plc") == 0)
        finally:
            plc.stop()
    assert plc.seqs("cam-a") == list(range(15))


# ---- Redis Cluster -----------------------------------------------------------------------------------------------
@pytest.mark.cluster
def test_a_sink_delivers_every_camera_of_a_cluster_in_order(redis_cluster, secret_file):
    from .cluster import spread_cameras

    redis_cluster.wait_ok()
    redis_cluster.flush()
    client = connect(redis_cluster.url)
    cameras = spread_cameras(redis_cluster, KEYS)  # two per master: the streams lie on three nodes
    receiver = Receiver(SECRET).start()
    try:
        for camera in cameras:
            write_results(client, KEYS, camera, range(15))
            write_alarms(client, KEYS, camera, [9])
        with running(webhook_sink(client, receiver.url, secret_file)) as sink:
            assert wait_for(lambda: len(receiver.received) >= 16 * len(cameras), 60)
            assert wait_for(lambda: sum(sink_pending(client, camera) for camera in cameras) == 0)
        keys = receiver.keys()
        assert len(keys) == len(set(keys)) == 16 * len(cameras)
        for camera in cameras:
            assert [k for k in keys if k.startswith(f"verdict:{camera}:")] == expected_verdicts(camera, range(15))
            assert alarm_key(camera, 9) in keys
    finally:
        receiver.stop()


# ---- status and the command line ---------------------------------------------------------------------------------
def test_status_reads_whatever_a_sink_wrote_without_failing(client):
    import time

    client.hset(KEYS.sink_health, mapping={
        "hook/s-1": json.dumps({"destination": "webhook http://x/", "state": "down", "pending": 7, "delivered": "many",
                                "at": time.time()}),
        "hook/s-2": b"\xff not json",
        "mq/old": json.dumps({"state": "ok", "pending": 1, "at": time.time() - 1000}),
        "mq/odd": json.dumps(["a list"]),
    })
    rows = {f"{r['sink']}/{r['consumer']}": r for r in collect_status(client, KEYS.prefix, reasons=False)["sinks"]}
    assert rows["hook/s-1"]["state"] == "down" and rows["hook/s-1"]["pending"] == 7
    assert rows["hook/s-1"]["delivered"] == 0  # not a count: read as 0
    assert rows["hook/s-2"]["state"] == "gone" and rows["mq/odd"]["state"] == "gone"  # nothing readable, no time
    assert rows["mq/old"]["state"] == "gone"  # not written for longer than dead_after_s
    pruned = prune_dead(client, KEYS.prefix, after_s=500)  # `patchcore status --prune`: rows gone that long
    assert sorted(pruned) == ["sink hook/s-2", "sink mq/odd", "sink mq/old"]
    assert list(client.hgetall(KEYS.sink_health)) == [b"hook/s-1"]


def test_bad_sink_options_are_clear_errors_and_the_secret_is_never_shown(redis_server, tmp_path):
    runner = CliRunner()
    base = ["sink", "webhook", "--redis-url", redis_server.url]
    refused = runner.invoke(app, [*base, "--url", "ftp://host/x"])
    assert refused.exit_code == 2 and "bad webhook URL" in refused.output
    missing = runner.invoke(app, [*base, "--url", "http://127.0.0.1:9/x", "--secret-file", str(tmp_path / "none")])
    assert missing.exit_code == 2 and "cannot read the webhook secret file" in missing.output
    nothing = runner.invoke(app, [*base, "--url", "http://127.0.0.1:9/x", "--no-verdicts", "--no-alarms", "--no-drift"])
    assert nothing.exit_code == 2 and "verdicts, alarms or drift events (one at least)" in nothing.output
    name = runner.invoke(app, [*base, "--url", "http://127.0.0.1:9/x", "--sink", "a b"])
    assert name.exit_code == 2 and "bad sink name" in name.output
    mqtt = runner.invoke(app, ["sink", "mqtt", "--redis-url", redis_server.url, "--topic-prefix", "a/#"])
    assert mqtt.exit_code == 2 and "bad MQTT topic prefix" in mqtt.output
    opcua = runner.invoke(app, ["sink", "opcua", "--redis-url", redis_server.url, "--url", "http://plc"])
    assert opcua.exit_code == 2 and "bad OPC UA URL" in opcua.output


def test_the_webhook_signature_is_hmac_sha256_over_timestamp_dot_body(secret_file):
    import hashlib
    import hmac

    from sinks.messages import verdict_message
    from sinks.webhook import SIGNATURE_HEADER, TIMESTAMP_HEADER

    from .sinkservers import result

    hook = Webhook(WebhookSettings(url="http://127.0.0.1:9/x", secret_file=secret_file))
    message = verdict_message(KEYS.results("cam-a"), b"1-0", result("cam-a", 5))
    headers = hook.headers(message, message.json)
    expected = hmac.new(SECRET, f"{headers[TIMESTAMP_HEADER]}.".encode() + message.json, hashlib.sha256).hexdigest()
    assert headers[SIGNATURE_HEADER] == f"sha256={expected}"
    assert headers["Idempotency-Key"] == "verdict:cam-a:5:bottle" == json.loads(message.json)["id"]
    assert SECRET.decode() not in repr(hook.__dict__.get("description")) + hook.description
    hook.close()


@needs_mosquitto
@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl makes the test's certificate")
def test_mqtt_over_tls_checks_the_broker_certificate(client, tmp_path):
    cert, key = self_signed(tmp_path)
    broker = Mosquitto(tmp_path, tls=(cert, key)).start()
    subscriber = Subscriber(broker.port, "patchcore/#", ca_file=cert)
    try:
        write_results(client, KEYS, "cam-a", range(5))
        trusted = Mqtt(MqttSettings(host="127.0.0.1", port=broker.port, tls=True, ca_file=cert), "pc-tls")
        with running(Sink(client, trusted, SinkSettings(sink="mq", **FAST), KEYS)):
            assert wait_for(lambda: len(subscriber.messages) >= 5)
        assert subscriber.keys() == expected_verdicts("cam-a", range(5))
        untrusted = Mqtt(MqttSettings(host="127.0.0.1", port=broker.port, tls=True), "pc-tls-2")  # system CAs only
        attempt = untrusted.deliver([])
        assert attempt.error is not None and "CERTIFICATE_VERIFY_FAILED" in attempt.error
        untrusted.close()
        plain = Mqtt(MqttSettings(host="127.0.0.1", port=broker.port, publish_timeout_s=1.0), "pc-plain")
        assert plain.deliver([]).error is not None  # a TLS listener refuses plain MQTT
        plain.close()
    finally:
        subscriber.stop()
        broker.stop()


# ---- Modbus TCP --------------------------------------------------------------------------------------------------
def modbus_sink(client, port, blocks, unit=1, word_order="big", **settings) -> Sink:
    destination = Modbus(ModbusSettings(host="127.0.0.1", port=port, unit=unit, blocks=tuple(blocks),
                                        word_order=word_order, timeout_s=1.0))
    return Sink(client, destination, SinkSettings(**{"sink": "plc-mb", **FAST, **settings}), KEYS)


def u32(words):
    """A uint32 from two registers, high word first (docs/sinks.md's register map)."""
    return words[0] << 16 | words[1]


def f32(words):
    return struct.unpack(">f", struct.pack(">HH", *words))[0]


def block(plc, base):
    """(coils Verdict, Alarm, Drift), {name: value} of a camera's block, read as the PLC reads it."""
    bits, words = plc.read(base, 3, base, 11)
    return bits, {"seq": u32(words[0:2]), "score": f32(words[2:4]), "threshold": f32(words[4:6]),
                  "alarm_seq": u32(words[6:8]), "drift_seq": u32(words[8:10]), "heartbeat": words[10]}


def recorded_seqs(plc, base):
    """The frame seqs written to a block (its FC16 writes at base), in order."""
    return [u32(values[0:2]) for code, address, values in plc.recorded() if code == 16 and address == base]


def test_modbus_writes_each_message_into_its_cameras_block_heartbeat_last(client):
    plc = ModbusPlc(unit=3).start()
    try:
        write_results(client, KEYS, "cam-a", range(20), score=1.5, threshold=1.0)
        write_results(client, KEYS, "cam-b", range(10), score=0.25, threshold=None)
        write_alarms(client, KEYS, "cam-a", [12])
        write_drift(client, KEYS, "cam-b", drift_events("cam-b")[:1])
        with running(modbus_sink(client, plc.port, ["cam-a=0", "cam-b=16"], unit=3)) as sink:
            assert wait_for(lambda: block(plc, 0)[1]["heartbeat"] == 21 and block(plc, 16)[1]["heartbeat"] == 11)
            assert wait_for(lambda: sink_pending(client, "cam-a", "plc-mb") + sink_pending(client, "cam-b", "plc-mb")
                            == 0)
        assert sink.report.delivered == 32 and sink.report.deadlettered == 0
        bits, a = block(plc, 0)
        assert bits == [True, True, False]  # anomalous, an alarm came, no drift
        assert (a["seq"], a["score"], a["threshold"], a["alarm_seq"], a["drift_seq"]) == (19, 1.5, 1.0, 12, 0)
        bits, b = block(plc, 16)
        assert bits == [False, False, True]  # a good frame, no alarm, the scene drifted
        assert b["seq"] == 9 and b["score"] == 0.25 and math.isnan(b["threshold"]) and b["drift_seq"] == 1
        assert recorded_seqs(plc, 0) == list(range(20)) and recorded_seqs(plc, 16) == list(range(10))
        # each message: its coil (FC5), its registers (FC16), then the heartbeat (FC6) one higher than before
        a_writes = [(code, address) for code, address, _ in plc.recorded() if address < 16]
        assert a_writes[:3] == [(5, 0), (16, 0), (6, 10)] and len(a_writes) == 3 * 21
        beats = [values[0] for code, address, values in plc.recorded() if code == 6 and address == 10]
        assert beats == list(range(1, 22))
    finally:
        plc.stop()


def test_modbus_little_word_order_swaps_the_words_of_32_bit_values(client):
    plc = ModbusPlc().start()
    try:
        write_results(client, KEYS, "cam-a", [70_000], score=0.75, threshold=2.5)
        with running(modbus_sink(client, plc.port, ["cam-a=8"], word_order="little")):
            assert wait_for(lambda: block(plc, 8)[1]["heartbeat"] == 1)
        _, words = plc.read(8, 1, 8, 6)
        assert u32(words[1::-1]) == 70_000 and f32(words[3:1:-1]) == 0.75 and f32(words[5:3:-1]) == 2.5
    finally:
        plc.stop()


def test_modbus_server_killed_and_restarted_loses_nothing(client):
    plc = ModbusPlc().start()
    port = plc.port
    write_results(client, KEYS, "cam-a", range(10))
    try:
        with running(modbus_sink(client, port, ["cam-a=0"])) as sink:
            assert wait_for(lambda: block(plc, 0)[1]["seq"] == 9 and sink_pending(client, "cam-a", "plc-mb") == 0)
            plc.stop()  # the PLC goes away mid-stream
            write_results(client, KEYS, "cam-a", range(10, 30))
            assert wait_for(lambda: sink.state == "down" and sink_pending(client, "cam-a", "plc-mb") == 20, 20)
            before = plc.recorded()
            plc = ModbusPlc(port=port)
            plc.writes = before  # one record across the restart
            plc.start()
            assert wait_for(lambda: block(plc, 0)[1]["seq"] == 29, 30)
            assert wait_for(lambda: sink.state == "ok" and sink_pending(client, "cam-a", "plc-mb") == 0)
        seqs = recorded_seqs(plc, 0)
        assert sorted(set(seqs)) == list(range(30))  # each at least once
        assert seqs == sorted(seqs)  # in order (a message retried after the restart may come twice in a row)
        assert sink.report.failures >= 1 and sink.report.deadlettered == 0
    finally:
        plc.stop()


def test_modbus_bad_address_and_unmapped_camera_go_to_dead_letters(client):
    plc = ModbusPlc(coils=32, registers=32).start()
    try:
        write_results(client, KEYS, "cam-a", range(3))
        write_results(client, KEYS, "cam-far", range(2))  # its block lies beyond the PLC's 32 registers
        write_results(client, KEYS, "cam-x", range(2))  # no block at all
        with running(modbus_sink(client, plc.port, ["cam-a=0", "cam-far=40"])) as sink:
            assert wait_for(lambda: sink.report.deadlettered == 4 and sink.report.delivered == 3)
            assert wait_for(lambda: sum(sink_pending(client, c, "plc-mb") for c in ("cam-a", "cam-far", "cam-x")) == 0)
        assert block(plc, 0)[1]["seq"] == 2
        reasons = {camera: [letter[b"reason"].decode() for _, letter in
                            client.xrange(KEYS.sink_deadletter("plc-mb", camera))] for camera in ("cam-far", "cam-x")}
        assert reasons["cam-far"] == ["Modbus exception 2 (ILLEGAL_ADDRESS) on coil 40"] * 2
        assert reasons["cam-x"] == ["camera 'cam-x' has no Modbus block (--map cam-x=BASE)"] * 2
    finally:
        plc.stop()


def test_modbus_maps_from_a_file_and_bad_maps_are_clear_errors(redis_server, tmp_path):
    mapping = tmp_path / "blocks.map"
    mapping.write_text("# camera=base\ncam-1=0\n\n cam=2 = 32\n")
    assert register_map(ModbusSettings(map_file=mapping, blocks=("cam-3=11",))) == {"cam-1": 0, "cam=2": 32,
                                                                                    "cam-3": 11}
    runner = CliRunner()
    base = ["sink", "modbus", "--redis-url", redis_server.url, "--port", "1502"]
    for args, message in (([], "no camera has a Modbus block"),
                          (["--map", "cam-1=0", "--map", "cam-2=10"], "overlap"),
                          (["--map", "cam-1=0", "--map", "cam-1=20"], "two Modbus blocks"),
                          (["--map", "cam-1"], "is no CAMERA=BASE"),
                          (["--map", "cam-1=x"], "the base of 'cam-1' is no address"),
                          (["--map", "{cam}=0"], "braces are not allowed"),
                          (["--map", "cam-1=65530"], "out of range"),
                          (["--map", "cam-1=0", "--word-order", "middle"], "bad word order"),
                          (["--map-file", str(tmp_path / "none")], "cannot read the Modbus map file")):
        refused = runner.invoke(app, [*base, *args])
        assert refused.exit_code == 2 and message in refused.output, (args, refused.output)


def test_modbus_heartbeat_counts_on_from_the_plcs_value_and_wraps(client):
    """A new sink (or a new connection) reads the block's heartbeat and writes the next value: the PLC sees it
    move whatever the sink wrote before; 65535 is followed by 0."""
    from pymodbus.client import ModbusTcpClient

    plc = ModbusPlc().start()
    try:
        other = ModbusTcpClient("127.0.0.1", port=plc.port, timeout=2)
        assert other.connect()
        other.write_register(16 + 10, 65_534)  # cam-a's heartbeat, as an earlier sink process left it
        other.close()
        write_results(client, KEYS, "cam-a", range(3))
        with running(modbus_sink(client, plc.port, ["cam-a=16"])):
            assert wait_for(lambda: block(plc, 16)[1]["heartbeat"] == 1)
        assert block(plc, 16)[1]["seq"] == 2
        beats = [values[0] for code, address, values in plc.recorded() if code == 6 and address == 26]
        assert beats == [65_534, 65_535, 0, 1]  # the test's own write first
    finally:
        plc.stop()
