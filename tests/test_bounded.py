"""The bounded image score (scorer/bounded.py): each window's highest patch distance from a cheap shortlist plus
the full search where it can matter, against the full search of every patch and the exact search, on real
images: the synthetic line's frames (good and defective) and, where ../shared has it, real bottles."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from scorer import BuildConfig, CoresetConfig, FeatureConfig, bank_from_bytes, bounded, build_bank
from scorer.index import IndexError_, NearestNeighbourIndex, make_index
from scorer.model import PatchCoreScorer
from scorer.preprocess import load_image
from scorer.views import layout

from .conftest import BOTTLE, needs_bottle


def line_frames(count: int = 16) -> list[np.ndarray]:
    """RGB frames of the synthetic line, every third one with a defect."""
    import cv2

    from ingest.sources import SyntheticLine

    line = SyntheticLine(seed=3)
    return [cv2.cvtColor(line.render(1000 + i, defect=i % 3 == 0), cv2.COLOR_BGR2RGB) for i in range(count)]


@pytest.fixture(scope="module")
def line_scorer(synthetic_bank_bytes):
    return PatchCoreScorer(bank_from_bytes(synthetic_bank_bytes), device="cpu")


def features_of(scorer: PatchCoreScorer, images: list[np.ndarray]) -> torch.Tensor:
    lay = layout(scorer.view, *images[0].shape[:2])
    with torch.inference_mode():
        features, _ = scorer.extractor(scorer.prepare_windows(images, lay), scorer.int8)
    return features  # [B, L, D]


@pytest.mark.parametrize("probes, seeds", [(bounded.BOUND_PROBES, bounded.SEED_PATCHES), (1, 1)])
def test_each_windows_maximum_is_the_full_searchs_and_most_patches_skip_it(line_scorer, monkeypatch, probes, seeds):
    """At the shipped settings, and at 1 cell and 1 seed, where the seed is rarely the maximum and the floor's
    second round of full searches must find it."""
    monkeypatch.setattr(bounded, "BOUND_PROBES", probes)
    monkeypatch.setattr(bounded, "SEED_PATCHES", seeds)
    index = line_scorer.index
    assert bounded.supports(index)  # the CPU default: ivf
    features = features_of(line_scorer, line_frames())
    count, patches, dim = features.shape
    valid = torch.ones(count, patches, dtype=torch.bool)
    valid[::2, : patches // 2] = False  # half the windows inspect only their lower half (a region of interest)
    with torch.inference_mode():
        found = bounded.bounded_distances(index, features, valid)
        full, full_nearest = index.search(features.reshape(-1, dim), k=1)
        exact, _ = NearestNeighbourIndex(line_scorer.bank.features).search(features.reshape(-1, dim), k=1)
    full, exact = full[:, 0].reshape(count, patches), exact[:, 0].reshape(count, patches)
    top, where = torch.where(valid, found.distances, -np.inf).max(dim=1)
    full_top, full_where = torch.where(valid, full, -np.inf).max(dim=1)
    assert torch.equal(top, full_top) and torch.equal(where, full_where)
    rows = torch.arange(count)
    assert torch.equal(found.nearest[rows, where], full_nearest[:, 0].reshape(count, patches)[rows, full_where])
    # every value is a true distance to a bank feature: never under the exact search's; searched in full, never
    # over the full search's
    assert bool((found.distances >= exact - 1e-4).all())
    assert bool((found.distances[found.full] <= full[found.full] + 1e-5).all())
    assert not bool(found.full[~valid].any())
    # and it is the distance to the bank feature it names (the cheap shortlist's or the full search's)
    named = torch.linalg.vector_norm(features - torch.as_tensor(line_scorer.bank.features)[found.nearest], dim=2)
    assert torch.allclose(found.distances[valid], named[valid], rtol=1e-4)
    assert found.full.float().mean() < 0.2  # the point of it: most patches never get the full search
    if seeds == 1:
        assert int(found.full.sum()) > int(valid.any(1).sum())  # more than the seeds were needed


def test_completed_windows_hold_the_full_searchs_distances(line_scorer):
    features = features_of(line_scorer, line_frames(8))
    count, patches, dim = features.shape
    valid = torch.ones(count, patches, dtype=torch.bool)
    rows = torch.tensor([True, False] * 4)
    with torch.inference_mode():
        found = bounded.bounded_distances(line_scorer.index, features, valid)
        bounded.complete(line_scorer.index, features, found, valid, rows)
        full, _ = line_scorer.index.search(features.reshape(-1, dim), k=1)
    full = full[:, 0].reshape(count, patches)
    assert bool(found.full[rows].all()) and not bool(found.full[~rows].all())
    completed, reference = found.distances[rows], full[rows]
    assert bool((completed <= reference + 1e-5).all())  # the nearer of two shortlists' best
    assert (completed < reference - 1e-5).float().mean() < 0.001  # and nearly always the full search's own


def test_score_with_grids_over_gives_the_same_scores_and_only_the_wanted_grids(line_scorer):
    images = line_frames(12)
    full = line_scorer.score(images, maps=False)
    over = np.full(len(images), np.median(full.image_scores))  # about half the frames over it
    over[0] = np.nan  # no threshold: never a grid
    result = line_scorer.score(images, maps=False, grids_over=over)
    np.testing.assert_array_equal(result.image_scores, full.image_scores)
    wanted = full.image_scores >= over  # NaN compares False
    assert 0 < wanted.sum() < len(images)
    for i in range(len(images)):
        if wanted[i]:
            assert result.patch_scores[i].shape == full.patch_scores[i].shape
            assert (np.abs(result.patch_scores[i] - full.patch_scores[i]) > 1e-5).mean() < 0.001
        else:
            assert result.patch_scores[i] is None
    assert line_scorer.heatmaps(result, np.flatnonzero(wanted))[0].shape == line_scorer.heatmaps(full, [0])[0].shape
    with pytest.raises(ValueError, match="grids_over"):
        line_scorer.score(images, maps=True, grids_over=over)
    with pytest.raises(ValueError, match="grids_over"):
        line_scorer.score(images, maps=False, grids_over=over[:3])


def test_searches_without_a_cheap_shortlist_score_every_patch(synthetic_bank_bytes):
    """exact (and hnsw, half) have no cheap shortlist: with grids_over every patch is searched and every grid kept."""
    bank = bank_from_bytes(synthetic_bank_bytes)
    images = line_frames(4)
    exact = PatchCoreScorer(bank, device="cpu", search="exact")
    assert not bounded.supports(exact.index)
    result = exact.score(images, maps=False, grids_over=np.full(len(images), np.inf))
    np.testing.assert_array_equal(result.image_scores, exact.score(images, maps=False).image_scores)
    assert all(grid is not None for grid in result.patch_scores)
    with pytest.raises(IndexError_, match="cheap shortlist"):
        make_index(bank.features[:300], "hnsw").upper_bounds(torch.zeros(1, bank.features.shape[1]), 2, 4)


@needs_bottle
def test_real_bottles_score_the_same_bounded(tmp_path):
    train = sorted((BOTTLE / "train" / "good").glob("*.png"))[:10]
    tests = sorted((BOTTLE / "test" / "broken_large").glob("*.png"))[:4] + sorted((BOTTLE / "test" / "good").glob("*.png"))[:4]
    config = BuildConfig(features=FeatureConfig(backbone="mobilenet_v2"), coreset=CoresetConfig(fraction=0.1))
    scorer = PatchCoreScorer(build_bank(train, config, device="cpu", progress=False), device="cpu")
    images = [load_image(path) for path in tests]
    full = scorer.score(images, maps=False)
    result = scorer.score(images, maps=False, grids_over=np.full(len(images), np.inf))  # no grid wanted
    np.testing.assert_array_equal(result.image_scores, full.image_scores)
    assert all(grid is None for grid in result.patch_scores)
    assert full.image_scores[:4].min() > full.image_scores[4:].max()  # broken bottles over the good ones


def test_the_worker_bounds_only_while_few_frames_are_flagged():
    from workers.scoring import FlaggedShare

    flagged = FlaggedShare()
    assert flagged.low("a") and flagged.low("b")  # a bank with no history: bounded
    for _ in range(5):  # 40 frames, all anomalous: the share after n frames is 1 - 0.98^n
        flagged.add("a", 8, 8)
    assert flagged.shares["a"] == pytest.approx(1 - 0.98 ** 40) and not flagged.low("a")
    assert flagged.low("b")  # per bank
    for _ in range(10):  # 80 good frames: 0.554 * 0.98^80 = 0.11
        flagged.add("a", 0, 8)
    assert flagged.shares["a"] == pytest.approx((1 - 0.98 ** 40) * 0.98 ** 80) and flagged.low("a")
    for _ in range(100):  # a steady 25 % flagged stays bounded
        flagged.add("b", 2, 8)
    assert flagged.shares["b"] == pytest.approx(0.25, abs=1e-3) and flagged.low("b")
