"""Alarm rule logic: k-of-n debounce by sequence number, cooldown, threshold override, reordering."""
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from store.alarms.rules import AlarmRule, AlarmWindow, Fired


def feed(window, overs, order=None, dt=1.0):
    """Feed frames (seq i over threshold if overs[i]) in `order`; returns the alarmed sequence numbers."""
    raised = []
    for seq in order if order is not None else range(len(overs)):
        raised += [fired.info for fired in window.add(seq, bool(overs[seq]), seq * dt, seq)]
    return raised


def test_k_of_n_debounce():
    window = AlarmWindow(AlarmRule(k=2, n=3, cooldown_s=0))
    assert feed(window, [1, 0, 0, 1, 0, 1, 1]) == [5]  # 3 and 5 in 3..5; the window starts afresh after it


def test_cooldown_silences_then_rearms():
    assert feed(AlarmWindow(AlarmRule(k=1, n=1, cooldown_s=2.5)), [1, 1, 1, 1, 1]) == [0, 3]


def test_a_missing_frame_counts_as_not_over_and_is_waited_for_only_reorder_frames():
    window = AlarmWindow(AlarmRule(k=2, n=2, cooldown_s=0), reorder=3)
    assert window.add(0, True, 0, 0) == []
    assert window.add(2, True, 2, 2) == []  # 1 may still come
    assert window.add(3, False, 3, 3) == [] and window.add(4, False, 4, 4) == []
    assert window.add(5, False, 5, 5) == []  # 2 is decided now (1 taken as missing: 1 of 2 over)
    # too late to change decided windows, but not lost: over the threshold, it raises its own late alarm
    late = window.add(1, True, 1, 1)
    assert [(f.info, f.late_by, f.window) for f in late] == [(1, 5, ((1, True, 1),))]
    assert window.late == {"alarm": 1, "covered": 0, "quiet": 0, "under": 0}


def test_a_late_result_raises_one_alarm_unless_an_alarm_already_covers_it():
    window = AlarmWindow(AlarmRule(k=2, n=3, cooldown_s=0), reorder=2)
    for seq in range(20):  # frames 10 and 11 missing at first, 15-16 over (an alarm at 16)
        if seq not in (10, 11):
            assert [f.info for f in window.add(seq, seq in (15, 16), seq, seq)] == ([16] if seq == 16 else [])
    assert window.decided == 19
    assert window.add(11, False, 11, 11) == []  # under the threshold: counted only
    assert [(f.info, f.late_by) for f in window.add(10, True, 10, 10)] == [(10, 10)]  # late by 19 - 10 + 1
    assert window.add(9, True, 9, 9) == [] == window.add(8, True, 8, 8)  # 10's late alarm covers its neighbours
    assert window.add(14, True, 14, 14) == []  # covered by the alarm at 16, whose window holds it
    assert window.late == {"alarm": 1, "covered": 3, "quiet": 0, "under": 1}
    restored = AlarmWindow.from_json(None, 2, window.to_json())  # kept with the window: counted exactly once
    assert restored.late == window.late and restored.add(11, True, 11, 11) == []


def test_a_late_result_in_the_cooldown_of_the_alarm_before_it_stays_quiet():
    window = AlarmWindow(AlarmRule(k=1, n=1, cooldown_s=5), reorder=1)
    assert [f.info for f in window.add(0, True, 100.0, 0)] == [0]
    for seq in range(2, 12):
        window.add(seq, False, 100.0 + seq, seq)
    assert window.add(1, True, 101.0, 1) == []  # captured 1 s after the alarm: in its 5 s cooldown
    assert window.late["quiet"] == 1


def test_flush_decides_the_frames_that_wait_for_a_gap():
    window = AlarmWindow(AlarmRule(k=2, n=3, cooldown_s=0), reorder=8)
    assert window.add(0, True, 0, 0) == [] and window.add(2, True, 2, 2) == [] and window.undecided
    assert [f.info for f in window.flush()] == [2] and not window.undecided and window.flush() == []


def test_a_fired_alarm_carries_its_window_missing_frames_and_all():
    window = AlarmWindow(AlarmRule(k=2, n=4, cooldown_s=0), reorder=1)
    assert window.add(0, True, 0, "a") == [] and window.add(2, False, 2, "c") == []  # 1 never comes
    fired = window.add(3, True, 3, "d")
    assert fired == [Fired("d", ((0, True, "a"), (1, False, None), (2, False, "c"), (3, True, "d")))]
    assert fired[0].over == 2  # the alarm frame's own verdict is one of them, not the reason
    assert window.add(4, True, 4, "e") == []  # a new window starts after the alarm: 4 alone is 1 of 2
    assert window.add(5, False, 5, "f") == [] and window.add(6, False, 6, "g") == []
    assert window.add(7, True, 7, "h") == [Fired("h", ((4, True, "e"), (5, False, "f"), (6, False, "g"), (7, True, "h")))]


@settings(max_examples=200, deadline=None)
@given(overs=st.lists(st.booleans(), min_size=1, max_size=60), k=st.integers(1, 4), extra=st.integers(0, 3),
       cooldown=st.sampled_from([0.0, 2.5, 7.0]), reorder=st.integers(1, 8), keys=st.data())
def test_out_of_order_within_reorder_raises_the_in_order_alarms(overs, k, extra, cooldown, reorder, keys):
    rule = AlarmRule(k=k, n=k + extra, cooldown_s=cooldown)
    # an arrival order where every frame arrives fewer than `reorder` positions late, frame 0 first
    jitter = keys.draw(st.lists(st.floats(0, reorder - 0.01), min_size=len(overs), max_size=len(overs)))
    order = [0] + sorted(range(1, len(overs)), key=lambda s: s + jitter[s])
    assert all(order.index(s) < s + reorder for s in range(len(overs)))
    assert feed(AlarmWindow(rule, reorder), overs, order) == feed(AlarmWindow(rule, reorder), overs)


def test_the_state_survives_json_and_a_new_rule_starts_afresh():
    rule = AlarmRule(k=2, n=3, cooldown_s=0)
    window = AlarmWindow(rule)
    assert window.add(0, True, 0.0, "info-0") == []
    restored = AlarmWindow.from_json(rule, 8, window.to_json())
    # the first over frame was remembered
    assert restored.add(1, True, 1.0, "info-1") == [Fired("info-1", ((0, True, "info-0"), (1, True, "info-1")))]
    changed = AlarmWindow.from_json(AlarmRule(k=2, n=4, cooldown_s=0), 8, window.to_json())
    assert changed.frames == {} and changed.decided is None


@pytest.mark.parametrize("text, reason", [
    ('{"k": "2"}', "integer"), ('{"k": true}', "integer"), ('{"k": 4, "n": 3}', "1 <= k <= n"),
    ('{"n": 100000}', "1 <= k <= n"), ('{"cooldown_s": NaN}', "cooldown_s"), ('{"cooldown_s": -1}', "cooldown_s"),
    ('{"threshold": "high"}', "threshold"), ('{"threshold": Infinity}', "threshold"), ('[1, 2]', "not a JSON object"),
    ('{"k": 1, "evil": 1}', "unknown fields"), ("not json", "not JSON"), ('{"k": 1, "pad": "' + "x" * 5000 + '"}', "bytes"),
])
def test_a_malformed_rule_is_refused_with_its_reason(text, reason):
    with pytest.raises(ValueError, match=reason):
        AlarmRule.from_json(text)


def test_a_rule_round_trips_through_json():
    rule = AlarmRule(k=1, n=4, cooldown_s=0.5, threshold=3.25)
    assert AlarmRule.from_json(rule.to_json()) == rule and json.loads(rule.to_json())["n"] == 4


def test_a_camera_whose_numbering_starts_again_gets_a_new_window_not_late_results():
    window = AlarmWindow(AlarmRule(k=2, n=3, cooldown_s=0), reorder=2)
    for seq in range(40):  # captured at 100 + seq
        window.add(seq, False, 100.0 + seq, seq)
    fired = []
    for seq in range(10):  # the camera restarted: 0, 1, ... captured after every frame seen
        fired += [f.info for f in window.add(seq, seq in (4, 5), 200.0 + seq, f"new-{seq}")]
    assert fired == ["new-5"] and window.restarts == 1  # the in-order k-of-n alarm, no late alarm
    assert window.late == {"alarm": 0, "covered": 0, "quiet": 0, "under": 0}
    assert window.add(1, True, 150.0, "a genuinely late one")[0].late_by > 0  # captured before: late, not a restart
    assert AlarmWindow.from_json(None, 2, window.to_json()).restarts == 1
