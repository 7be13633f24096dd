"""bench/gpu_pipeline.py cannot rot: it runs on the CPU with tiny settings, and its features are the scorer's."""
import importlib.util
import json
import subprocess
import sys

import numpy as np
import torch

from patchcore.embedded_redis import find_redis_server
from scorer import FeatureConfig
from scorer.model import build_extractor

from .conftest import ROOT

SCRIPT = ROOT / "bench" / "gpu_pipeline.py"


def _bench():
    spec = importlib.util.spec_from_file_location("gpu_pipeline", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_features_are_the_scorers():
    bench = _bench()
    x = torch.randn(2, 3, 224, 224)
    extractor, _ = build_extractor(FeatureConfig(backbone="mobilenet_v2"), "random")  # seeded as the bench's
    expected, _ = extractor(x)
    with torch.inference_mode():
        got = bench.Features("mobilenet_v2")(x)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)


def test_bench_runs_end_to_end_on_the_cpu(tmp_path):
    out = tmp_path / "report.json"
    # the bench needs nothing of the project: run it from outside the checkout, without PYTHONPATH
    run = subprocess.run([sys.executable, str(SCRIPT), "--redis-server", find_redis_server(), "--device", "cpu",
                          "--seconds", "1", "--batches", "8", "--backbones", "mobilenet_v2", "--bank-images", "4",
                          "--cameras", "4", "--precision", "fp32", "--no-channels-last", "--json", str(out)],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    (row,) = report["runs"]
    assert row["backbone"] == "mobilenet_v2" and row["max_batch"] == 8
    assert row["frames_per_s"] > 0 and row["paced_frames_per_s"] > 0
    assert 0 < row["latency_ms_p50"] <= row["latency_ms_p99"]
    assert min(row["backbone_only_images_per_s"], row["search_only_images_per_s"], row["decode_only_images_per_s"]) > 0
    assert "| mobilenet_v2 | 8 |" in run.stdout
