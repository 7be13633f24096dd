"""Alarms, from rule to operator: the k-of-n rule and its window (rules), the alarm feed every consumer reads
(feed), the log the console lists and acknowledges (log), and dismissing a false alarm (dismiss)."""
