"""Prometheus metrics of every process, defined once (prometheus-client's default registry).

Processes record with the one-line helpers below; `runtime.health` serves the registry on
`--metrics-port` with /healthz and /readyz. Counters count what was written to Redis, exactly once:
a frame counts as ingested when its append ran, a result when the acknowledge-and-write script wrote
it (not when another worker had already finished that frame), a dead letter when it was recorded.

A labelled counter has no series until a child of those labels exists, and `rate()` over a series
that appears with its first increment misses that increment (an alert on the first dead letter never
fires). So the label values known in advance start at 0: every dead-letter reason kind at import;
both verdicts of a camera with its first results; a camera's ingest and alarm counters when its
process learns of the camera (`camera_ingesting`, `alarm_cameras`).
"""
from __future__ import annotations

import re
import sys
from typing import Iterable

import redis
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector
from contracts.keys import camera_names
from contracts.messages import DRIFT_KINDS

FRAMES_INGESTED = Counter("patchcore_frames_ingested", "Frames appended to their camera's stream.", ["camera"])
FRAMES_DROPPED = Counter("patchcore_frames_dropped", "Oldest frames trimmed from a full stream (live sources).",
                         ["camera"])
RESULTS = Counter("patchcore_results", "Results written by workers.", ["camera", "verdict"])
DEADLETTERED = Counter("patchcore_deadlettered", "Frames and results dead-lettered, by kind of reason.", ["reason"])
ALARMS = Counter("patchcore_alarms", "Alarms raised by the store.", ["camera"])
ALARMS_HELD = Counter("patchcore_alarms_held", "Defect alarms the store held (decided, not written) while their "
                      "camera's scene had drifted (drift policy hold).", ["camera"])
DRIFT = Gauge("patchcore_drift", "1 while a camera's scene has drifted (raised, neither cleared nor acknowledged), "
              "else 0, as the store last committed it.", ["camera"])
DRIFT_EVENTS = Counter("patchcore_drift_events", "Drift events written by the store, by kind (an acknowledgement "
                       "relayed by the store counts here; one written by `patchcore drift ack` counts in Redis).",
                       ["kind"])
CAMERA_NAMES_REFUSED = Gauge("patchcore_camera_names_refused", "Members of the camera set that are no camera name "
                             "(skipped by every reader; `patchcore status` lists them), at this process's last read.")
LATE_RESULTS = Counter("patchcore_late_results", "Results that arrived after their alarm windows were decided, by "
                       "outcome: alarm (a late alarm raised), covered (an alarm already held it), quiet (cooldown), "
                       "under (under the threshold); the store starts every series at 0.", ["outcome"])
CAMERA_SETTINGS_REFUSED = Counter("patchcore_camera_settings_refused", "Stored camera settings a worker refused to "
                                  "apply (they did not decode; the bank's threshold and ROI apply), at each load.")
BATCH_SIZE = Histogram("patchcore_batch_size", "Frames per worker batch.", buckets=(1, 2, 4, 8, 16, 32, 64, 128))
STAGE_SECONDS = Histogram("patchcore_stage_seconds", "Seconds per frame in each stage: queue (capture to picked by "
                          "a worker), decode, score (batch time / frames), write (batch write / frames).", ["stage"],
                          buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
END_TO_END = Histogram("patchcore_end_to_end_latency_seconds", "Capture to result written.",
                       buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120))
SINK_DELIVERED = Counter("patchcore_sink_delivered", "Messages a sink's destination confirmed (then acknowledged), "
                         "by kind (verdict, alarm).", ["sink", "kind"])
SINK_DEADLETTERED = Counter("patchcore_sink_deadlettered", "Messages a sink's destination refused for good (or that "
                            "could not be read), dead-lettered with their reason.", ["sink"])
SINK_FAILURES = Counter("patchcore_sink_failures", "Delivery attempts that failed for now (retried with backoff).",
                        ["sink"])
SINK_PENDING = Gauge("patchcore_sink_pending", "Messages a sink process holds: read, not yet confirmed.", ["sink"])
SINK_STATE = Gauge("patchcore_sink_state", "1 for the sink's current state (ok, retrying, down), 0 for the others.",
                   ["sink", "state"])
SINK_LATENCY = Histogram("patchcore_sink_latency_seconds", "Entry written to Redis to its destination's confirmation.",
                         ["sink"], buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
SINK_STATES = ("ok", "retrying", "down")  # the `state` label of SINK_STATE
BANK_VERSION = Gauge("patchcore_bank_version", "Version of each bank this worker scores with.", ["bank"])

# Dead-letter reasons are free text; the label is its kind (a bounded set), tried in this order.
REASON_KINDS = (
    ("poison", re.compile(r"^poison\b")),
    ("unscorable", re.compile(r"^frame cannot be scored")),
    ("too_large", re.compile(r"exceeds the \d+-byte limit|-pixel limit")),
    ("undecodable", re.compile(r"JPEG|PNG|BMP|IHDR|SOF|decod|header", re.IGNORECASE)),
    ("malformed", re.compile(r"msgpack|schema|missing fields|not a map|^bad |arrived on|overlay_key")),
)


OTHER_REASON = "other"  # a frame's dead-letter reason of no kind above
BAD_RESULT = "bad_result"  # the store's dead letters: results it refused
DEADLETTER_REASONS = (*(kind for kind, _ in REASON_KINDS), OTHER_REASON, BAD_RESULT)  # every `reason` label
VERDICTS = ("normal", "anomalous")  # the `verdict` label of RESULTS

for _kind in DEADLETTER_REASONS:  # series at 0 from the start (see the module's docstring)
    DEADLETTERED.labels(_kind)
for _kind in DRIFT_KINDS:
    DRIFT_EVENTS.labels(_kind)


def reason_kind(reason: str) -> str:
    """The bounded label of a dead-letter reason: poison, unscorable, too_large, undecodable, malformed, other."""
    for kind, pattern in REASON_KINDS:
        if pattern.search(reason):
            return kind
    return OTHER_REASON


def camera_ingesting(camera: str) -> None:
    """Ingest: its camera's ingested and dropped series exist (at 0) before the first frame."""
    FRAMES_INGESTED.labels(camera)
    FRAMES_DROPPED.labels(camera)


def alarm_cameras(cameras: Iterable[str]) -> None:
    """Store: the alarm, held-alarm and drift series of these cameras exist (at 0) before their first alarm."""
    for camera in cameras:
        ALARMS.labels(camera)
        ALARMS_HELD.labels(camera)
        DRIFT.labels(camera)


def frame_appended(camera: str, dropped: int) -> None:
    """Ingest: an append ran (dropped < 0: a retry found it already written, nothing counted)."""
    if dropped >= 0:
        FRAMES_INGESTED.labels(camera).inc()
        if dropped:
            FRAMES_DROPPED.labels(camera).inc(dropped)


def results_written(rows: Iterable[tuple[str, bool, float, float, float]], score_s: float, write_s: float,
                    now: float) -> None:
    """Worker: the results written, each (camera, anomalous, captured_at, picked_at, decode seconds);
    `score_s` and `write_s` are per frame. Both verdicts of each camera exist from its first result on."""
    rows = list(rows)
    for camera in {row[0] for row in rows}:
        for verdict in VERDICTS:
            RESULTS.labels(camera, verdict)
    for camera, anomalous, captured_at, picked_at, decode_s in rows:
        RESULTS.labels(camera, VERDICTS[bool(anomalous)]).inc()
        STAGE_SECONDS.labels("queue").observe(max(0.0, picked_at - captured_at))
        STAGE_SECONDS.labels("decode").observe(decode_s)
        STAGE_SECONDS.labels("score").observe(score_s)
        STAGE_SECONDS.labels("write").observe(write_s)
        END_TO_END.observe(max(0.0, now - captured_at))


def deadlettered(reason: str) -> None:
    """A frame was dead-lettered with this reason (counted under its kind)."""
    DEADLETTERED.labels(reason_kind(reason)).inc()


def result_refused() -> None:
    """The store dead-lettered a result it refused."""
    DEADLETTERED.labels(BAD_RESULT).inc()


def sink_started(sink: str) -> None:
    """Sink: its series exist (at 0) before the first delivery, so an alert on the first failure fires."""
    for kind in ("verdict", "alarm"):
        SINK_DELIVERED.labels(sink, kind)
    SINK_DEADLETTERED.labels(sink)
    SINK_FAILURES.labels(sink)


def sink_delivered(sink: str, kinds: Iterable[str], latencies: Iterable[float]) -> None:
    """Sink: messages of these kinds were confirmed, `latencies` seconds after their entries were written."""
    for kind in kinds:
        SINK_DELIVERED.labels(sink, kind).inc()
    for seconds in latencies:
        SINK_LATENCY.labels(sink).observe(max(0.0, seconds))


def sink_health(sink: str, state: str, pending: int) -> None:
    """Sink: its state (one of SINK_STATES) and the messages it holds."""
    SINK_PENDING.labels(sink).set(pending)
    for name in SINK_STATES:
        SINK_STATE.labels(sink, name).set(int(name == state))


def consumer_lag(client: redis.Redis, streams: dict[str, str], group: str) -> dict[str, int]:
    """Per name (e.g. camera) of `streams` {name: stream}: entries not yet delivered to `group` plus those
    pending (XINFO GROUPS lag + pending). Where Redis cannot tell the lag (NULL: entries deleted ahead of
    the group), XLEN stands in: every outcome deletes its frame, so the stream holds exactly the
    undelivered and the pending ones. Streams without the group are left out."""
    names = list(streams)
    with client.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.xinfo_groups(streams[name])
            pipe.xlen(streams[name])
        replies = pipe.execute(raise_on_error=False)
    lags = {}
    for i, name in enumerate(names):
        groups, length = replies[2 * i], replies[2 * i + 1]
        if isinstance(groups, Exception):
            continue
        for info in groups:
            if _text(info.get("name")) == group:
                lag = info.get("lag")
                lags[name] = int(lag) + int(info["pending"]) if lag is not None else int(length)
    return lags


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class LagCollector(Collector):
    """patchcore_consumer_lag{camera}, read from Redis at scrape time (one pipelined round trip)."""

    def __init__(self, client: redis.Redis, cameras_key: str, stream_of, group: str):
        self.client, self.cameras_key, self.stream_of, self.group = client, cameras_key, stream_of, group

    def collect(self):
        family = GaugeMetricFamily("patchcore_consumer_lag", "Frames not yet delivered to a worker plus those "
                                   "pending (delivered, not yet acknowledged), per camera.", labels=["camera"])
        try:
            cameras = camera_names(self.client.smembers(self.cameras_key)).names
            for camera, lag in consumer_lag(self.client, {c: self.stream_of(c) for c in cameras}, self.group).items():
                family.add_metric([camera], lag)
        except redis.RedisError:  # Redis unreachable: no samples (and /healthz says 503)
            pass
        yield family


class GpuMemoryCollector(Collector):
    """patchcore_gpu_memory_allocated_bytes / _reserved_bytes{device}, where this process runs CUDA
    (read from torch's caching allocator; nothing when torch is not loaded or CUDA not initialised)."""

    def collect(self):
        allocated = GaugeMetricFamily("patchcore_gpu_memory_allocated_bytes", "GPU memory held by tensors.",
                                      labels=["device"])
        reserved = GaugeMetricFamily("patchcore_gpu_memory_reserved_bytes", "GPU memory reserved by torch's "
                                     "caching allocator.", labels=["device"])
        torch = sys.modules.get("torch")  # contracts never imports torch; a worker already has
        if torch is not None and torch.cuda.is_initialized():
            for index in range(torch.cuda.device_count()):
                allocated.add_metric([f"cuda:{index}"], torch.cuda.memory_allocated(index))
                reserved.add_metric([f"cuda:{index}"], torch.cuda.memory_reserved(index))
        yield allocated
        yield reserved


_registered: dict[str, Collector] = {}


def register(name: str, collector: Collector) -> None:
    """Add a custom collector to the default registry under `name`, replacing the one added before under it
    (a second `patchcore up` in one process reads its own Redis, not the first one's)."""
    old = _registered.pop(name, None)
    if old is not None:
        REGISTRY.unregister(old)
    REGISTRY.register(collector)
    _registered[name] = collector
