"""Message contracts: round trips and refusals with reasons."""
import msgpack
import pytest

from contracts.messages import Alarm, Frame, MessageError, Result


def frame(**changes) -> Frame:
    values = dict(camera="cam", line="l1", bank="default", seq=3, captured_at=1.5, encoding="raw", shape=(2, 2, 3),
                  data=bytes(12))
    values.update(changes)
    return Frame(**values)


def test_round_trips():
    f = frame()
    assert Frame.unpack(f.pack()) == f
    r = Result(camera="cam", line="l1", seq=1, captured_at=1.0, scored_at=2.0, score=3.5, threshold=3.0,
               anomalous=True, bank="b", bank_version=2, worker="w", timings_ms={"score": 1.0})
    assert Result.unpack(r.pack()) == r
    a = Alarm(camera="cam", line="l1", seq=1, score=3.5, threshold=3.0, bank="b", bank_version=2, raised_at=2.0,
              rule="2-of-3", overlay_jpeg=b"\xff\xd8")
    assert Alarm.unpack(a.pack()) == a


@pytest.mark.parametrize("payload, reason", [
    (b"\xc1", "malformed msgpack"),
    (msgpack.packb([1, 2]), "not a map"),
    (msgpack.packb({**frame().__dict__, "schema": 99}), "unknown schema version 99"),
    (frame(encoding="png").pack(), "unknown encoding"),
    (frame(shape=(2, 2)).pack(), "bad shape"),
    (frame(data=bytes(11)).pack(), "raw frame has 11 bytes"),
    (frame(seq=-1).pack(), "bad sequence"),
    (msgpack.packb({"schema": 1, "camera": "x"}), "missing fields"),
])
def test_bad_frames_are_refused_with_a_reason(payload, reason):
    with pytest.raises(MessageError, match=reason):
        Frame.unpack(payload)


def test_oversize_frames_are_refused_before_decoding():
    with pytest.raises(MessageError, match="exceeds"):
        Frame.unpack(frame(data=bytes(12)).pack(), max_bytes=50)


def alarm(**changes) -> Alarm:
    values = dict(camera="cam", line="l1", seq=104, score=9.2, threshold=11.7, bank="b", bank_version=2, raised_at=2.0,
                  rule="3-of-4, cooldown 2 s, bank threshold", k=3, n=4, over=3, window_first=101,
                  window_scores=(13.2, None, 12.9, 9.2), peak_seq=101, peak_score=13.2, overlay_seq=101)
    values.update(changes)
    return Alarm(**values)


def test_an_alarm_says_why_it_fired_and_keeps_the_frames_own_score():
    a = alarm()
    assert Alarm.unpack(a.pack()) == a
    text = a.describe()
    assert "(3-of-4, cooldown 2 s, bank threshold)" in text and "3 frames at or over threshold 11.700" in text
    assert "[101:13.200 102:- 103:12.900 104:9.200]" in text and "highest 13.200 at seq 101" in text
    assert text.endswith("this frame 9.200, under the threshold")


def test_alarms_without_the_window_fields_still_read_and_print():
    old = {k: v for k, v in alarm().__dict__.items()
           if k not in ("k", "n", "over", "window_first", "window_scores", "peak_seq", "peak_score", "overlay_seq")}
    a = Alarm.unpack(msgpack.packb(old, use_bin_type=True))  # what a store of the previous version publishes
    assert a.window_scores is None and a.peak_score is None
    assert a.describe().endswith("score=9.200 threshold=11.700 (3-of-4, cooldown 2 s, bank threshold)")


@pytest.mark.parametrize("changes, reason", [
    (dict(window_first=100), "from window_first to seq"),
    (dict(window_scores=(1.0,) * 65, window_first=40), "max_array_len"),  # the decoder's own limit
    (dict(window_scores=(float("nan"), 1.0, 1.0, 1.0)), "window_scores entry"),
    (dict(window_scores="1234"), "bad window_scores"),
    (dict(peak_score=None), "come together"),
    (dict(over=-1), "bad over"),
    (dict(k=True), "bad k"),
    (dict(drift=1), "bad drift"),
])
def test_bad_alarm_explanations_are_refused(changes, reason):
    with pytest.raises(MessageError, match=reason):
        Alarm.unpack(alarm(**changes).pack())
