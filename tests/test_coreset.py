"""Coreset selection against the plain greedy algorithm written out in numpy."""
import numpy as np
import pytest

from scorer import coreset
from scorer.config import CoresetConfig
from scorer.coreset import (coverage_radius, extend_coreset, greedy_coreset, random_projection, select_coreset,
                            start_distances)


def plain_greedy(features: np.ndarray, config: CoresetConfig) -> np.ndarray:
    """The plain loop: one matrix-vector product per step (distances as |x|^2 + |c|^2 - 2 x.c)."""
    projected = random_projection(features, config.projection_dim, config.seed)
    mind = start_distances(projected, config.start_points, config.seed)
    norms = (projected * projected).sum(1)
    chosen = []
    for _ in range(max(1, int(len(features) * config.fraction))):
        centre = int(np.argmax(mind))
        chosen.append(centre)
        mind = np.minimum(mind, np.sqrt(np.maximum(norms + norms[centre] - 2.0 * (projected @ projected[centre]), 0)))
    return np.array(chosen)


def assert_same_up_to_rounding(selection: np.ndarray, plain: np.ndarray, points: np.ndarray, config: CoresetConfig):
    """The pruned pass computes x - c directly, the plain loop via norms: near-ties may be broken the
    other way, so the order may differ; the set and the coverage may not (measured: same set)."""
    projected = random_projection(points, config.projection_dim, config.seed)
    assert overlap(selection, plain) >= 0.99
    assert coverage_radius(projected, selection) == pytest.approx(coverage_radius(projected, plain), rel=1e-4)


def exact_greedy(points: np.ndarray, n: int, first: int) -> np.ndarray:
    """Textbook k-center greedy with the full pairwise matrix (small data only)."""
    pairwise = np.sqrt(((points[:, None, :] - points[None, :, :]) ** 2).sum(-1))
    chosen = [first]
    mind = pairwise[first].copy()
    for _ in range(n - 1):
        chosen.append(int(np.argmax(mind)))
        mind = np.minimum(mind, pairwise[chosen[-1]])
    return np.array(chosen)


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    return len(set(a.tolist()) & set(b.tolist())) / len(b)


@pytest.fixture(scope="module")
def clustered():
    rng = np.random.default_rng(7)
    centres = rng.normal(0, 5, (20, 300))
    return (centres[rng.integers(0, 20, 4000)] + rng.normal(0, 1, (4000, 300))).astype(np.float32)


@pytest.fixture(scope="module")
def uniform():
    """Texture-like: no cluster structure, high intrinsic dimension (triangle-inequality pruning fails)."""
    return np.random.default_rng(8).uniform(-1, 1, (4000, 300)).astype(np.float32)


@pytest.fixture(params=["clustered", "uniform"])
def data(request):
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.25])
def test_same_selection_as_the_plain_algorithm(clustered, fraction):
    config = CoresetConfig(fraction=fraction, seed=3)
    fast = greedy_coreset(clustered, config)
    assert len(fast) == int(len(clustered) * fraction)
    assert len(set(fast.tolist())) == len(fast)
    assert_same_up_to_rounding(fast, plain_greedy(clustered, config), clustered, config)


@pytest.mark.parametrize("prune_worth, min_steps", [(0.0, 10**9), (0.0, 0), (10.0, 0)],
                         ids=["dense-only", "dense-with-probes", "pruned-after-blocks"])
def test_each_pass_gives_the_plain_selection_on_each_kind_of_data(data, prune_worth, min_steps, monkeypatch):
    monkeypatch.setattr(coreset, "PRUNE_WORTH", prune_worth)
    monkeypatch.setattr(coreset, "MIN_STEPS_FOR_BLOCKS", min_steps)
    config = CoresetConfig(fraction=0.1, seed=5)
    fast, plain = greedy_coreset(data, config), plain_greedy(data, config)
    if min_steps > len(data):  # the dense pass alone does the plain loop's arithmetic: same floats, same order
        np.testing.assert_array_equal(fast, plain)
    assert_same_up_to_rounding(fast, plain, data, config)


def test_torch_engine_gives_the_plain_selection(data):
    config = CoresetConfig(fraction=0.1, seed=5)
    selection = select_coreset(data, config, engine="torch", device="cpu")
    np.testing.assert_array_equal(selection.indices, plain_greedy(data, config))


def test_torch_half_precision_is_close(data):
    config = CoresetConfig(fraction=0.1, seed=5)
    full, half = select_coreset(data, config), select_coreset(data, config, engine="torch", half=True)
    projected = random_projection(data, config.projection_dim, config.seed)
    assert overlap(half.indices, full.indices) > 0.8  # rounding changes some picks ...
    assert coverage_radius(projected, half.indices) <= 1.02 * full.radius  # ... hardly the coverage


@pytest.mark.parametrize("engine", ["numba", "torch"])
def test_radius_is_the_coverage_radius_in_the_projected_space(data, engine):
    config = CoresetConfig(fraction=0.05, seed=2)
    selection = select_coreset(data, config, engine=engine)
    projected = random_projection(data, config.projection_dim, config.seed)
    assert selection.radius == pytest.approx(coverage_radius(projected, selection.indices), rel=1e-5)


def test_radius_counts_points_the_loop_never_updated():
    """With one centre, most points keep their start estimate; the radius must still be exact."""
    rng = np.random.default_rng(0)
    points = np.concatenate([rng.normal(0, 0.1, (500, 8)), [[50.0] * 8]]).astype(np.float32)
    selection = select_coreset(points, CoresetConfig(fraction=0.001, seed=0))
    assert selection.radius == pytest.approx(coverage_radius(points, selection.indices), rel=1e-5)


def test_projected_input_gives_the_same_selection(data):
    config = CoresetConfig(fraction=0.1, seed=4)
    projected = random_projection(data, config.projection_dim, config.seed)
    a = select_coreset(data, config)
    b = select_coreset(None, config, projected=projected)
    np.testing.assert_array_equal(a.indices, b.indices)
    assert a.radius == b.radius


def test_chunkwise_projection_equals_the_whole(clustered):
    whole = random_projection(clustered, 128, 9)
    cuts = [0, 1, 7, 520, 1500, 1501, 3999, 4000]
    chunks = np.concatenate([random_projection(clustered[a:b], 128, 9) for a, b in zip(cuts[:-1], cuts[1:])])
    np.testing.assert_array_equal(chunks, whole)


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


def extend(config: CoresetConfig, bank: np.ndarray, new: np.ndarray, radius: float, **engine):
    """A bank update as the bank does it: both projected, at most coreset_size(K, fraction) new points."""
    return extend_coreset(random_projection(bank, config.projection_dim, config.seed),
                          random_projection(new, config.projection_dim, config.seed), radius,
                          coreset.coreset_size(len(new), config.fraction), **engine)


@pytest.mark.parametrize("engine", ["numba", "torch"])
def test_extension_covers_the_union_about_as_well_as_a_rebuild(data, engine):
    config = CoresetConfig(fraction=0.1, seed=6)
    old, new = data[:3000], data[3000:]
    base = select_coreset(old, config)
    added = extend(config, old[base.indices], new, base.radius, engine=engine)
    assert 0 < len(added.indices) <= int(len(new) * config.fraction)
    projected = random_projection(data, config.projection_dim, config.seed)
    bank = np.concatenate([base.indices, 3000 + added.indices])
    incremental = coverage_radius(projected, bank)
    rebuild = select_coreset(data, config)
    # measured: 1.011 (clustered, 337 vs 400 points), 0.992 (uniform, 357 vs 400)
    assert incremental <= 1.05 * rebuild.radius
    # the returned radius is the new points' coverage by old + added centres
    assert added.radius == pytest.approx(float(coreset.nearest_distance(projected[3000:], projected[bank]).max()),
                                         rel=1e-5)
    assert incremental == pytest.approx(max(base.radius, added.radius), rel=1e-5)


def test_extension_adds_nothing_for_covered_points(clustered):
    config = CoresetConfig(fraction=0.1, seed=6)
    base = select_coreset(clustered, config)
    copies = clustered[::7].copy()
    assert len(extend(config, clustered[base.indices], copies, base.radius).indices) == 0
    assert len(extend(config, clustered[base.indices], copies, base.radius, engine="torch").indices) == 0


def test_extension_of_far_new_data_stops_at_its_budget(clustered):
    config = CoresetConfig(fraction=0.1, seed=6)
    base = select_coreset(clustered, config)
    far = clustered[:500] + 100.0  # nothing of it is near the bank
    added = extend(config, clustered[base.indices], far, base.radius)
    assert len(added.indices) == 50
    projected = random_projection(far, config.projection_dim, config.seed)
    # the added points are the plain greedy continuation from the bank's coreset (near-ties aside: same set)
    plain = _plain_continuation(random_projection(clustered[base.indices], config.projection_dim, config.seed),
                                projected, 50)
    assert set(added.indices.tolist()) == set(plain.tolist())


def _plain_continuation(core: np.ndarray, new: np.ndarray, n: int) -> np.ndarray:
    mind = np.sqrt(((new[:, None, :] - core[None, :, :]) ** 2).sum(-1)).min(1)
    chosen = []
    for _ in range(n):
        chosen.append(int(np.argmax(mind)))
        mind = np.minimum(mind, np.sqrt(((new - new[chosen[-1]]) ** 2).sum(1)))
    return np.array(chosen)


def test_bad_input_is_refused(clustered):
    config = CoresetConfig(fraction=0.1)
    with pytest.raises(ValueError, match="projected points"):
        select_coreset(None, config, projected=clustered)
    with pytest.raises(ValueError, match="engine"):
        select_coreset(clustered, config, engine="cuda")
    with pytest.raises(ValueError, match="half precision"):
        select_coreset(clustered, config, half=True)
    with pytest.raises(ValueError, match="no points"):
        select_coreset(clustered[:0], config)
    with pytest.raises(ValueError, match="must be"):
        extend_coreset(clustered[:10, :64], clustered[:10, :32], 1.0, 5)
