"""Alarm rule logic: k-of-n debounce, cooldown, threshold override."""
from store.alarms import AlarmRule, AlarmState


def feed(state, scores, threshold=1.0, dt=1.0):
    return [state.update(s, threshold, i * dt)[0] for i, s in enumerate(scores)]


def test_k_of_n_debounce():
    state = AlarmState(AlarmRule(k=2, n=3, cooldown_s=0))
    assert feed(state, [2, 0, 0, 2, 0, 2, 2]) == [False, False, False, False, False, True, False]


def test_cooldown_silences_then_rearms():
    state = AlarmState(AlarmRule(k=1, n=1, cooldown_s=2.5))
    assert feed(state, [2, 2, 2, 2, 2]) == [True, False, False, True, False]


def test_threshold_override_and_missing_threshold():
    state = AlarmState(AlarmRule(k=1, n=1, cooldown_s=0, threshold=5.0))
    assert state.update(4.0, 1.0, 0.0) == (False, 5.0)
    assert state.update(5.0, 1.0, 1.0) == (True, 5.0)
    assert AlarmState(AlarmRule(k=1, n=1)).update(100.0, None, 0.0) == (False, None)
