"""Image scores (max and Eq. 7), anomaly maps, and batch independence."""
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from scorer.index import NearestNeighbourIndex
from scorer.scoring import anomaly_maps, smooth, image_scores

from .conftest import synthetic_part


def test_eq7_reweighting_by_hand():
    bank = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [10.0, 10.0]], dtype=np.float32)
    index = NearestNeighbourIndex(bank, "torch")
    features = torch.tensor([[[0.1, 0.0], [0.0, 3.0]]])  # two patches; the second is the farthest
    distances, nearest = index.search(features.reshape(-1, 2), k=1)
    patch = distances.reshape(1, 2)
    plain = image_scores(patch, nearest.reshape(1, 2), features, torch.from_numpy(bank), index, neighbours=1)
    assert np.isclose(plain.item(), 1.0)  # (0, 3) -> nearest (0, 2) at distance 1
    weighted = image_scores(patch, nearest.reshape(1, 2), features, torch.from_numpy(bank), index, neighbours=3)
    # m* = (0, 2); its 3 nearest bank features: itself, (0, 0) at 2, (1, 0) at sqrt(5)
    d = np.array([1.0, 3.0, np.sqrt(1 + 9)])  # test patch (0, 3) to those three
    expected = (1 - np.exp(d[0]) / np.exp(d).sum()) * 1.0
    assert np.isclose(weighted.item(), expected, rtol=1e-5)


def test_map_is_bilinear_upsampling_then_gaussian_sigma_4():
    rng = np.random.default_rng(0)
    patch = rng.random((2, 28 * 28)).astype(np.float32)
    maps = anomaly_maps(torch.from_numpy(patch), (28, 28), 224).numpy()
    for i in range(2):
        up = F.interpolate(torch.from_numpy(patch[i]).reshape(1, 1, 28, 28), size=(224, 224), mode="bilinear",
                           align_corners=False)[0, 0].numpy()
        expected = ndimage.gaussian_filter(up.astype(np.float64), sigma=4, mode="mirror", truncate=4.0)
        np.testing.assert_allclose(maps[i], expected, atol=1e-5)


def test_gaussian_equals_scipys_for_both_borders_any_size():
    """Non-square frames and maps smaller than the kernel radius (16 px) too, where padding must wrap."""
    rng = np.random.default_rng(1)
    for shape in [(224, 300), (17, 5), (3, 1), (1, 1)]:
        maps = rng.random((2, *shape)).astype(np.float32)
        for border in ("mirror", "reflect"):
            out = smooth(torch.from_numpy(maps), 4.0, border).numpy()
            for i in range(2):
                expected = ndimage.gaussian_filter(maps[i].astype(np.float64), sigma=4, mode=border, truncate=4.0)
                np.testing.assert_allclose(out[i], expected, atol=1e-5)
    rectangular = anomaly_maps(torch.from_numpy(rng.random((1, 7 * 9)).astype(np.float32)), (7, 9), (56, 72))
    assert rectangular.shape == (1, 56, 72)


def test_score_does_not_depend_on_batch_companions(mobilenet):
    from scorer import MemoryBank, PatchCoreScorer
    from scorer.config import CoresetConfig, FeatureConfig
    from scorer.model import build_extractor

    model, _ = mobilenet
    extractor, config = build_extractor(FeatureConfig(backbone="mobilenet_v2"))
    rng = np.random.default_rng(1)
    good = [synthetic_part(rng) for _ in range(3)]
    features, _ = extractor(__import__("scorer.preprocess", fromlist=["x"]).preprocess(good, 256, 224))
    bank = MemoryBank(features.reshape(-1, features.shape[-1]).numpy()[::4].copy(), config, CoresetConfig())
    scorer = PatchCoreScorer(bank, device="cpu", extractor=extractor)
    images = [synthetic_part(rng, size=int(s), defect=bool(i % 3 == 0)) for i, s in enumerate(rng.integers(230, 260, 32))]
    together = scorer.score(images)
    for i in (0, 5, 31):
        alone = scorer.score([images[i]])
        np.testing.assert_allclose(alone.image_scores[0], together.image_scores[i], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(alone.maps[0], together.maps[i], rtol=1e-4, atol=1e-4)
    defect = np.array([i % 3 == 0 for i in range(32)])
    assert together.image_scores[defect].min() > together.image_scores[~defect].max()


def test_single_window_maps_as_matrix_products_equal_upsampling_then_scipys_gaussian():
    """window_maps (two matrix products) against F.interpolate + the work-area crop + scipy's gaussian_filter
    ("mirror", truncate 4), for a square crop view and non-square full-view frames, batched."""
    from scorer.scoring import window_maps

    rng = np.random.default_rng(3)
    for grid, window, work in (((28, 28), (224, 224), (224, 224)), ((24, 40), (192, 320), (180, 320)),
                               ((7, 5), (56, 40), (50, 33))):
        patches = rng.random((3, *grid)).astype(np.float32) * 10
        up = F.interpolate(torch.from_numpy(patches)[:, None], size=window, mode="bilinear",
                           align_corners=False)[:, 0, :work[0], :work[1]].numpy()
        expected = np.stack([ndimage.gaussian_filter(m.astype(np.float64), sigma=4.0, mode="mirror") for m in up])
        got = window_maps(torch.from_numpy(patches), window, work).numpy()
        assert got.shape == (3, *work)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * expected.max())
