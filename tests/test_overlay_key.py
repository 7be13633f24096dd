"""A result's overlay_key must be the overlay its worker writes (Keys.overlay of its camera and seq): the store
copies that key's bytes into an alarm, so a forged key must never leak another key's bytes. Real redis-server."""
import threading
import time

from store.alarms.feed import read_alarms
from runtime.connection import connect
from contracts.keys import Keys
from contracts.messages import Result
from store.alarms.rules import AlarmRule
from store.service import ResultsStore, StoreSettings

from .test_pipeline import wait_for

KEYS = Keys()


def result(seq: int, overlay_key: str | None, camera: str = "cam-1") -> bytes:
    return Result(camera=camera, line="l", seq=seq, captured_at=time.time(), scored_at=time.time(), score=9.0,
                  threshold=1.0, anomalous=True, bank="default", bank_version=1, worker="w",
                  overlay_key=overlay_key).pack()


def test_the_store_copies_only_the_results_own_overlay_into_an_alarm(redis_server):
    client = connect(redis_server.url)
    client.set("secret:token", b"not for alarms")
    client.set(KEYS.bank_blob("default", 1), b"bank bytes")
    client.set(KEYS.overlay("cam-1", 2), b"overlay of cam-1 seq 2")
    client.set(KEYS.overlay("cam-2", 0), b"overlay of cam-2 seq 0")
    client.set(KEYS.overlay("cam-1", 3), b"JPEG of cam-1 seq 3")
    client.sadd(KEYS.cameras, "cam-1")
    forged = [(0, "secret:token"), (1, KEYS.bank_blob("default", 1)),
              (0, KEYS.overlay("cam-1", 2)),  # another frame's overlay
              (0, KEYS.overlay("cam-2", 0)),  # another camera's
              (0, KEYS.overlay("cam-1", 0) + ":x")]
    for seq, key in forged:
        client.xadd(KEYS.results("cam-1"), {"m": result(seq, key)})
    client.xadd(KEYS.results("cam-1"), {"m": result(3, KEYS.overlay("cam-1", 3))})  # its own overlay
    client.xadd(KEYS.results("cam-1"), {"m": result(4, None)})  # no overlay at all
    stop = threading.Event()
    store = ResultsStore(connect(redis_server.url), StoreSettings(default_rule=AlarmRule(k=1, n=1, cooldown_s=0),
                                                                  refresh_s=0.1), KEYS, stop)
    thread = threading.Thread(target=store.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: store.report.results + store.report.bad_results == 7, timeout=30)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert store.report.bad_results == len(forged) and store.report.results == 2
    alarms = read_alarms(client, KEYS)[0]
    assert [(a.seq, a.overlay_key, a.overlay_jpeg) for a in alarms] == [
        (3, KEYS.overlay("cam-1", 3), b"JPEG of cam-1 seq 3"), (4, None, None)]
    assert client.xpending(KEYS.results("cam-1"), "store")["pending"] == 0  # refused results are not retried forever
