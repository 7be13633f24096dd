"""The leave-one-out search's pieces against brute force in numpy (float64): the nearest cells with an image's
left-out centres masked, and an image's score (highest patch distance, Eq. 7) searched only where its patches'
upper bounds can still win. Synthetic clustered points, so that nearest rows are contested."""
import numpy as np
import pytest
import torch

import scorer.heldout as heldout
from scorer.heldout import HeldOutBank, bank_owners, exclusion_ranges, nearest_cells


def clustered(rng, n, dim, centres=12):
    means = rng.normal(0, 4, size=(centres, dim))
    return (means[rng.integers(0, centres, n)] + rng.normal(0, 1, size=(n, dim))).astype(np.float32)


@pytest.mark.parametrize("twin_window", [0, 2])
def test_nearest_cells_equal_brute_force_with_each_images_left_out_centres_masked(twin_window, monkeypatch):
    rng = np.random.default_rng(3)
    counts = rng.integers(20, 60, size=9)
    offsets = np.r_[0, np.cumsum(counts)]
    points = clustered(rng, int(offsets[-1]), 16)
    selected = rng.choice(len(points), size=70, replace=False)
    owners = bank_owners(selected, offsets)
    excluded = exclusion_ranges(len(counts), twin_window)
    images = np.repeat(np.arange(len(counts)), counts)
    for block in (heldout.BLOCK_ELEMENTS, 70 * 7):  # one block, and blocks that cut through images
        monkeypatch.setattr(heldout, "BLOCK_ELEMENTS", block)
        cell, held = nearest_cells(torch.from_numpy(points), torch.from_numpy(points[selected]), owners, images,
                                   excluded)
        d = ((points.astype(np.float64)[:, None] - points[selected].astype(np.float64)[None]) ** 2).sum(-1)
        np.testing.assert_array_equal(cell, d.argmin(1))
        left_out = (owners[None] >= excluded[images, :1]) & (owners[None] <= excluded[images, 1:])
        d[left_out] = np.inf
        expected = np.where(np.isinf(d.min(1)), -1, d.argmin(1))
        np.testing.assert_array_equal(held, expected)
        assert (held != cell).any() and (held >= 0).all()


def brute_score(patches, rows, neighbours):
    """Highest patch distance to its nearest row times Eq. 7's 1 - softmax(d)[0] (d: the patch's distances to
    the anchor's `neighbours` nearest rows), all in float64."""
    p, r = patches.astype(np.float64), rows.astype(np.float64)
    d = np.sqrt(((p[:, None] - r[None]) ** 2).sum(-1))
    where = d.min(1).argmax()
    anchor = d[where].argmin()
    top = d[where, anchor]
    if neighbours <= 1:
        return top
    support = np.argsort(np.sqrt(((r - r[anchor]) ** 2).sum(-1)))[:neighbours]
    e = np.exp(d[where, support] - d[where, support].max())
    return top * (1.0 - e[0] / e.sum())


@pytest.mark.parametrize("neighbours", [1, 3])
def test_an_image_score_searched_by_bounds_equals_brute_force_however_loose_the_bounds(neighbours):
    rng = np.random.default_rng(11)
    shipped, added, patches = clustered(rng, 400, 32), clustered(rng, 15, 32), clustered(rng, 150, 32)
    removed = np.zeros(len(shipped), dtype=bool)
    removed[rng.choice(len(shipped), 60, replace=False)] = True
    kept_rows = np.concatenate([shipped[~removed], added])
    expected = brute_score(patches, kept_rows, neighbours)
    s = torch.from_numpy(shipped)
    bank = HeldOutBank(s, (s * s).sum(1), torch.from_numpy(removed), torch.from_numpy(added))
    assert bank.size == len(kept_rows)
    exact = torch.from_numpy(np.sqrt(((patches[:, None].astype(np.float64) - kept_rows[None]) ** 2).sum(-1)).min(1))
    tight = exact.float()
    loose = tight + torch.from_numpy(rng.uniform(0, 3, len(patches))).float()  # any upper bounds will do
    infinite = torch.full((len(patches),), float("inf"))  # no bound at all: every patch searched
    for bounds in (tight, loose, infinite):
        assert bank.image_score(torch.from_numpy(patches), bounds, neighbours) == pytest.approx(expected, rel=1e-5)
    distances, nearest = bank.distances(torch.from_numpy(patches))
    np.testing.assert_allclose(distances.numpy(), exact.numpy(), rtol=1e-5)
    assert not removed[nearest[nearest < len(shipped)].numpy()].any()  # never a removed row


class FeatureStore:
    """A PatchSource in memory: full vectors, their projection and each image's span."""

    def __init__(self, features: np.ndarray, projected: np.ndarray, offsets: np.ndarray):
        self.features, self.projected, self.offsets = features, projected, offsets

    def gather(self, indices: np.ndarray) -> np.ndarray:
        return self.features[np.asarray(indices, dtype=np.int64)]

    def image(self, i: int) -> np.ndarray:
        return self.features[self.offsets[i]:self.offsets[i + 1]]


@pytest.mark.parametrize("twin_window,neighbours", [(0, 3), (1, 1)])
def test_leave_out_scores_and_patch_distances_equal_brute_force_on_each_images_held_out_rows(twin_window, neighbours):
    """LeaveOut end to end (its cells, bounds and pruned search): each image's score equals the highest patch
    distance (and Eq. 7) computed in float64 against all rows of its leave-one-out coreset, which holds none of
    the image's (or its near-twins') features; every patch distance likewise."""
    from scorer.config import CoresetConfig
    from scorer.coreset import select_coreset

    rng = np.random.default_rng(23)
    counts = np.full(10, 48)
    offsets = np.r_[0, np.cumsum(counts)].astype(np.int64)
    features = clustered(rng, int(offsets[-1]), 64, centres=6)
    projected = (features @ rng.normal(0, 1 / 4, size=(64, 16))).astype(np.float32)
    selection = select_coreset(None, CoresetConfig(fraction=0.15, projection_dim=16), projected=projected)
    store = FeatureStore(features, projected, offsets)
    leave = heldout.LeaveOut(store, selection.indices, selection.radius, exclusion_ranges(len(counts), twin_window))
    scores = leave.scores(neighbours)
    distances = leave.patch_distances()
    owner = np.repeat(np.arange(len(counts)), counts)
    for i in range(len(counts)):
        rows = leave.rows(i)
        assert np.all(np.abs(owner[rows] - i) > twin_window)
        assert scores[i] == pytest.approx(brute_score(store.image(i), features[rows], neighbours), rel=1e-5)
        full = np.sqrt(((store.image(i)[:, None].astype(np.float64) - features[rows][None]) ** 2).sum(-1))
        np.testing.assert_allclose(distances[i], full.min(1), rtol=1e-5)
