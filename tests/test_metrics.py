"""Metrics on hand-made inputs with known answers."""
import numpy as np
import pytest

from scorer.metrics import f1_optimal_threshold, image_auroc, pixel_auroc, pro_score


def test_pro_perfect_and_inverted_maps():
    masks = np.zeros((2, 10, 10), bool)
    masks[0, 2:4, 2:4] = True
    masks[1, 5:9, 1:3] = True
    assert pro_score(masks, masks.astype(float)) == pytest.approx(1.0)
    assert pro_score(masks, (~masks).astype(float)) == pytest.approx(0.0)


def test_pro_averages_regions_not_pixels():
    masks = np.zeros((1, 20, 20), bool)
    masks[0, 0:2, 0:2] = True  # small region (4 px), found at zero false positives
    masks[0, 10:20, 10:20] = True  # large region (100 px), never above any normal pixel
    maps = np.full((1, 20, 20), 0.5)
    maps[0, 0:2, 0:2] = 1.0
    maps[0, 10:20, 10:20] = 0.0
    # up to FPR 0.3 the curve stays at PRO = 0.5 (one of two regions fully covered)
    assert pro_score(masks, maps) == pytest.approx(0.5)


def test_pro_with_a_linear_false_positive_ramp():
    masks = np.zeros((1, 1, 110), bool)
    masks[0, 0, :10] = True  # one region of 10 pixels
    maps = np.zeros((1, 1, 110))
    maps[0, 0, 10:] = np.linspace(1.0, 0.01, 100)  # normal pixels, distinct scores
    maps[0, 0, :10] = 0.905  # the region passes once 10 normal pixels (FPR 0.1) are above it
    # PRO = 0 up to FPR 0.1, where it jumps to 1 and stays: area 0.2 of the 0.3 range
    assert pro_score(masks, maps) == pytest.approx(0.2 / 0.3)


def test_aurocs_and_f1():
    labels = np.array([0, 0, 1, 1])
    assert image_auroc(labels, np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    masks = np.array([[[0, 1], [1, 0]]])
    assert pixel_auroc(masks, np.array([[[0.1, 0.9], [0.8, 0.2]]])) == pytest.approx(1.0)
    threshold, f1 = f1_optimal_threshold(np.array([0, 0, 1, 1, 1]), np.array([0.1, 0.3, 0.2, 0.7, 0.9]))
    # >= 0.2 flags 4 images, 3 of them defects: precision 3/4, recall 1 -> F1 6/7 (>= 0.7 gives only 0.8)
    assert threshold == pytest.approx(0.2) and f1 == pytest.approx(6 / 7)
