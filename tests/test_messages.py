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
