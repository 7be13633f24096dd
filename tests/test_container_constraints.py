"""The container's constraints reproduced on this machine: an unprivileged user with no home (HOME=/), site-packages
and the source tree it cannot write, no .pyc files written. `scorer` must import (numba's cache=True finds nowhere
to write there), `patchcore --help` must run, and a bank must build and score. Needs root (to run as nobody) and
the system's python3.11 (the interpreter the venv's compiled packages are built for)."""
import json
import os
import shutil
import site
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from .conftest import ROOT

SYSTEM_PYTHON = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")
NOBODY = 65534

pytestmark = pytest.mark.skipif(os.getuid() != 0 or not SYSTEM_PYTHON.is_file() or not shutil.which("runuser"),
                                reason="needs root, runuser and the system's python of the venv's version")

SCRIPT = r"""
import json, os, site, sys, tempfile
from pathlib import Path
import numpy as np
import scorer
from scorer import BuildConfig, CalibrationConfig, CoresetConfig, FeatureConfig, PatchCoreScorer, build_bank
rng = np.random.default_rng(0)
images = [Path(tempfile.gettempdir()) / f"{i}.png" for i in range(6)]
import cv2
for path in images:
    cv2.imwrite(str(path), rng.integers(0, 255, (96, 96, 3), dtype=np.uint8))
bank = build_bank(images, BuildConfig(features=FeatureConfig(backbone="mobilenet_v2"),
                                      coreset=CoresetConfig(fraction=0.1), calibration=CalibrationConfig(folds=0)),
                  device="cpu", progress=False)
score = PatchCoreScorer(bank, device="cpu").score([np.ascontiguousarray(cv2.imread(str(images[0]))[:, :, ::-1])], maps=False).image_scores
cache = Path(os.environ["NUMBA_CACHE_DIR"])
print(json.dumps({
    "uid": os.getuid(), "home": str(Path.home()),
    "writable": {p: os.access(p, os.W_OK) for p in [*sys.path[:2], str(Path(scorer.__file__).parent), str(Path.home())]},
    "numba_cache_dir": str(cache), "cached_files": len(list(cache.rglob("*.nbi"))),
    "bank_rows": len(bank.features), "score": float(score[0]),
}))
"""


@pytest.fixture
def shared_dir():
    """A folder the unprivileged user can reach (pytest's tmp_path is private to root)."""
    folder = Path(tempfile.mkdtemp(prefix="patchcore-container-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def private_folder(paths: list[Path]) -> Path | None:
    """The first folder on the way to `paths` that other users cannot enter (no o+x), or None: a checkout cloned
    below such a folder (mktemp -d makes them 0700) cannot be imported by nobody, whatever the code does."""
    for path in paths:
        for folder in [path.resolve(), *path.resolve().parents]:
            if folder.is_dir() and not folder.stat().st_mode & 0o001:
                return folder
    return None


def run_as_nobody(args, shared: Path, **env) -> subprocess.CompletedProcess:
    packages = [p for p in site.getsitepackages() if Path(p).is_dir()]
    private = private_folder([ROOT, *map(Path, packages)])
    if private is not None:
        pytest.skip(f"{private} is private (mode {private.stat().st_mode & 0o777:o}): user nobody cannot reach the "
                    "checkout or its packages; clone it where other users can read it to run this test")
    environment = {"HOME": "/", "PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1",
                   "PYTHONPATH": os.pathsep.join([str(ROOT), *packages]), "TMPDIR": str(shared / "tmp"),
                   "TORCH_HOME": str(shared / "torch"), **env}
    return subprocess.run(["runuser", "-u", "nobody", "--", "env", "-i", *[f"{k}={v}" for k, v in environment.items()],
                           str(SYSTEM_PYTHON), *args], capture_output=True, text=True, timeout=600, cwd=shared)


def test_scorer_imports_builds_and_scores_as_an_unprivileged_user_without_a_home(shared_dir, mobilenet):
    from scorer.backbones import hub_weights_path

    weights = shared_dir / "torch" / "hub" / "checkpoints" / hub_weights_path("mobilenet_v2").name
    weights.parent.mkdir(parents=True)
    shutil.copyfile(hub_weights_path("mobilenet_v2"), weights)
    for folder in [shared_dir / "torch", shared_dir / "torch" / "hub", weights.parent]:
        folder.chmod(0o755)
    weights.chmod(0o644)
    (shared_dir / "tmp").mkdir(mode=0o1777)
    (shared_dir / "tmp").chmod(0o1777)
    planted = shared_dir / "tmp" / f"patchcore-numba-{NOBODY}"  # another user's folder where ours would go
    planted.mkdir(mode=0o777)
    planted.chmod(0o777)

    done = run_as_nobody(["-c", SCRIPT], shared_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["uid"] == NOBODY and report["home"] == "/"
    assert not any(report["writable"].values()), report["writable"]  # the constraints were real
    cache = Path(report["numba_cache_dir"])
    assert cache.parent == shared_dir / "tmp" and cache != planted  # never a folder someone else can write
    assert report["cached_files"] > 0 and not list(planted.iterdir())  # numba did cache, in its private folder
    assert report["bank_rows"] > 0 and report["score"] > 0

    helped = run_as_nobody(["-m", "patchcore", "--help"], shared_dir)
    assert helped.returncode == 0 and "streaming service" in helped.stdout, helped.stderr[-2000:]
    configured = shared_dir / "tmp" / "numba-cache"  # as the image sets it: used as is
    imported = run_as_nobody(["-c", "import scorer.coreset, os; print(os.environ['NUMBA_CACHE_DIR'])"], shared_dir,
                             NUMBA_CACHE_DIR=str(configured))
    assert imported.returncode == 0 and imported.stdout.strip() == str(configured), imported.stderr[-2000:]
