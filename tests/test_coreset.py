"""Coreset selection against the plain greedy algorithm written out in numpy."""
import numpy as np
import pytest

from scorer.config import CoresetConfig
from scorer.coreset import coverage_radius, greedy_coreset, random_projection, start_distances


def plain_greedy(features: np.ndarray, config: CoresetConfig) -> np.ndarray:
    projected = random_projection(features, config.projection_dim, config.seed)
    mind = start_distances(projected, config.start_points, config.seed)
    chosen = []
    for _ in range(max(1, int(len(features) * config.fraction))):
        centre = int(np.argmax(mind))
        chosen.append(centre)
        mind = np.minimum(mind, np.sqrt(((projected - projected[centre]) ** 2).sum(1)))
    return np.array(chosen)


def exact_greedy(points: np.ndarray, n: int, first: int) -> np.ndarray:
    """Textbook k-center greedy with the full pairwise matrix (small data only)."""
    pairwise = np.sqrt(((points[:, None, :] - points[None, :, :]) ** 2).sum(-1))
    chosen = [first]
    mind = pairwise[first].copy()
    for _ in range(n - 1):
        chosen.append(int(np.argmax(mind)))
        mind = np.minimum(mind, pairwise[chosen[-1]])
    return np.array(chosen)


@pytest.fixture(scope="module")
def clustered():
    rng = np.random.default_rng(7)
    centres = rng.normal(0, 5, (20, 300))
    return (centres[rng.integers(0, 20, 4000)] + rng.normal(0, 1, (4000, 300))).astype(np.float32)


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.25])
def test_same_selection_as_the_plain_algorithm(clustered, fraction):
    config = CoresetConfig(fraction=fraction, seed=3)
    fast = greedy_coreset(clustered, config)
    assert len(fast) == int(len(clustered) * fraction)
    assert len(set(fast.tolist())) == len(fast)
    np.testing.assert_array_equal(fast, plain_greedy(clustered, config))


def test_coverage_close_to_exact_k_center_greedy(clustered):
    points = clustered[:1500, :64]  # <= 128 dims: no projection, coverage comparable directly
    fast = greedy_coreset(points, CoresetConfig(fraction=0.1, seed=1))
    exact = exact_greedy(points, len(fast), int(fast[0]))
    assert coverage_radius(points, fast) <= 1.05 * coverage_radius(points, exact)


def test_deterministic_under_seed_and_seed_matters(clustered):
    a = greedy_coreset(clustered, CoresetConfig(fraction=0.05, seed=11))
    b = greedy_coreset(clustered, CoresetConfig(fraction=0.05, seed=11))
    c = greedy_coreset(clustered, CoresetConfig(fraction=0.05, seed=12))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_coverage_beats_random_subsampling():
    rng = np.random.default_rng(0)  # a dense blob and a sparse background in 2-D
    points = np.concatenate([rng.normal(0, 0.05, (3000, 2)), rng.uniform(-1, 1, (1000, 2))]).astype(np.float32)
    chosen = greedy_coreset(points, CoresetConfig(fraction=0.05, seed=0))
    random = rng.choice(len(points), len(chosen), replace=False)
    assert coverage_radius(points, chosen) < 0.5 * coverage_radius(points, random)


def test_tiny_inputs():
    points = np.arange(6, dtype=np.float32).reshape(3, 2)
    assert len(greedy_coreset(points, CoresetConfig(fraction=0.01))) == 1
    assert sorted(greedy_coreset(points, CoresetConfig(fraction=1.0)).tolist()) == [0, 1, 2]
