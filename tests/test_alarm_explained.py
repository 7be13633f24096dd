"""An alarm says why it fired: the rule, the window's scores by sequence number, the highest, and the alarm
frame's own score honestly - also when a k-of-n window fires on a frame that is itself under the threshold
(here: the first frame after a cooldown). A real store on a real redis-server."""
import threading
import time

from runtime.connection import connect
from contracts.keys import Keys
from contracts.messages import Alarm, Result
from store.alarms.rules import AlarmRule
from store.service import ResultsStore, StoreSettings

from .test_pipeline import wait_for

KEYS = Keys()
THRESHOLD = 11.7


def test_an_alarm_on_a_frame_under_the_threshold_names_the_window_that_fired_it(redis_server):
    client = connect(redis_server.url)
    client.sadd(KEYS.cameras, "cam-1")
    start = time.time() - 60
    # seq: (score, capture time offset); 0+1 fire (2-of-3), 2 and 3 fall in the 10 s cooldown,
    # 4 is under the threshold but its window 2..4 holds two frames over it, and the cooldown is over
    frames = {0: (12.5, 0), 1: (13.0, 1), 2: (14.1, 2), 3: (12.2, 3), 4: (9.2, 20)}
    for seq, (score, offset) in frames.items():
        over = score >= THRESHOLD
        overlay = KEYS.overlay("cam-1", seq) if over else None  # the worker writes overlays of anomalous frames
        if over:
            client.set(overlay, f"JPEG of seq {seq}".encode())
        client.xadd(KEYS.results("cam-1"), {"m": Result(
            camera="cam-1", line="l", seq=seq, captured_at=start + offset, scored_at=start + offset + 0.1, score=score,
            threshold=THRESHOLD, anomalous=over, bank="default", bank_version=1, worker="w", overlay_key=overlay).pack()})
    stop = threading.Event()
    store = ResultsStore(connect(redis_server.url), StoreSettings(
        default_rule=AlarmRule(k=2, n=3, cooldown_s=10.0), refresh_s=0.1, quiet_s=0.2), KEYS, stop)
    thread = threading.Thread(target=store.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: client.xlen(KEYS.alarms("cam-1")) == 2, timeout=30)
    finally:
        stop.set()
        thread.join(timeout=30)
    first, second = [Alarm.unpack(f[b"m"]) for _, f in client.xrange(KEYS.alarms("cam-1"))]
    assert (first.seq, first.window_first, first.window_scores, first.over) == (1, 0, (12.5, 13.0), 2)
    assert (first.peak_seq, first.peak_score, first.overlay_seq, first.overlay_jpeg) == (1, 13.0, 1, b"JPEG of seq 1")

    assert second.seq == 4 and second.score == 9.2 and second.threshold == THRESHOLD  # its own score, under
    assert (second.k, second.n, second.over) == (2, 3, 2)
    assert (second.window_first, second.window_scores) == (2, (14.1, 12.2, 9.2))  # the window after the last alarm
    assert (second.peak_seq, second.peak_score) == (2, 14.1)
    # the picture is the window's highest frame, not the alarm frame (which has no overlay: it is not anomalous)
    assert (second.overlay_seq, second.overlay_key, second.overlay_jpeg) == (2, KEYS.overlay("cam-1", 2),
                                                                              b"JPEG of seq 2")
    text = second.describe()
    assert text.startswith("ALARM camera=cam-1 line=l seq=4 bank=default@v1 (2-of-3, cooldown 10 s, bank threshold)")
    assert "2 frames at or over threshold 11.700 in seq 2..4 [2:14.100 3:12.200 4:9.200]" in text
    assert "highest 14.100 at seq 2" in text and text.endswith("this frame 9.200, under the threshold")
