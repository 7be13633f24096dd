"""deploy/grafana/patchcore.json: valid JSON, and every PromQL expression names only metrics the code exports."""
from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client.registry import REGISTRY

import runtime.metrics as metrics
from runtime.connection import connect
from contracts.keys import FRAME_GROUP, Keys

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "patchcore.json"


def exported_sample_names(client) -> set[str]:
    """Sample names (with _total, _bucket, _sum, _count) of runtime.metrics' metrics and collectors."""
    keys = Keys()
    ours = [m for m in vars(metrics).values() if hasattr(m, "_name") and hasattr(m, "collect")]
    collectors = ours + [metrics.LagCollector(client, keys.cameras, keys.frames, FRAME_GROUP),
                         metrics.GpuMemoryCollector()]
    names = set()
    for collector in collectors:
        for family in collector.collect():
            names.add(family.name)
            names |= {s.name for s in family.samples}
            if family.type == "histogram":
                names |= {f"{family.name}_{suffix}" for suffix in ("bucket", "sum", "count")}
            if family.type == "counter":
                names.add(f"{family.name}_total")
    return names


def test_every_dashboard_query_uses_only_exported_metrics(redis_server):
    client = connect(redis_server.url)
    client.sadd(Keys().cameras, "cam-1")
    client.xgroup_create(Keys().frames("cam-1"), FRAME_GROUP, mkstream=True)
    exported = exported_sample_names(client)
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(exprs) >= 10
    used = set()
    for expr in exprs:
        assert expr.count("(") == expr.count(")") and expr.count("[") == expr.count("]"), expr
        names = set(re.findall(r"\bpatchcore_[a-z0-9_]+", expr))
        assert names, expr
        used |= names
    assert used <= exported, used - exported
    # the metrics the issue asks for are all on the dashboard
    for name in ("patchcore_frames_ingested_total", "patchcore_frames_dropped_total", "patchcore_results_total",
                 "patchcore_deadlettered_total", "patchcore_alarms_total", "patchcore_batch_size_bucket",
                 "patchcore_stage_seconds_bucket", "patchcore_end_to_end_latency_seconds_bucket",
                 "patchcore_consumer_lag", "patchcore_bank_version", "patchcore_gpu_memory_allocated_bytes"):
        assert name in used, name
    assert {p["id"] for p in dashboard["panels"]} == set(range(1, len(dashboard["panels"]) + 1))


def test_the_metrics_are_registered_under_the_names_the_issue_gives():
    described = {m.name: m for collector in (metrics.FRAMES_INGESTED, metrics.FRAMES_DROPPED, metrics.RESULTS,
                                             metrics.DEADLETTERED, metrics.ALARMS, metrics.BATCH_SIZE,
                                             metrics.STAGE_SECONDS, metrics.END_TO_END, metrics.BANK_VERSION)
                 for m in collector.describe()}
    assert {name: m.type for name, m in described.items()} == {
        "patchcore_frames_ingested": "counter", "patchcore_frames_dropped": "counter", "patchcore_results": "counter",
        "patchcore_deadlettered": "counter", "patchcore_alarms": "counter", "patchcore_batch_size": "histogram",
        "patchcore_stage_seconds": "histogram", "patchcore_end_to_end_latency_seconds": "histogram",
        "patchcore_bank_version": "gauge"}
    assert metrics.RESULTS._labelnames == ("camera", "verdict")
    assert metrics.STAGE_SECONDS._labelnames == ("stage",)
    assert metrics.DEADLETTERED._labelnames == ("reason",)
    metrics.ALARMS.labels("cam-registry-check").inc()  # counted in the registry /metrics serves
    assert REGISTRY.get_sample_value("patchcore_alarms_total", {"camera": "cam-registry-check"}) == 1
