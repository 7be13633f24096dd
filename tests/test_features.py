"""Patch features against a straightforward per-position computation."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from scorer.backbones import load_backbone
from scorer import features as features_module
from scorer.features import PatchFeatureExtractor, unfolded_pooling


def adaptive_pool_1d(vector: np.ndarray, out: int) -> np.ndarray:
    """torch's adaptive average pooling windows, written out: [floor(i L / n), ceil((i+1) L / n))."""
    length = len(vector)
    return np.array([vector[(i * length) // out: math.ceil((i + 1) * length / out)].mean() for i in range(out)])


def neighbourhood(fmap: np.ndarray, y: int, x: int) -> np.ndarray:
    """C*9 values of the 3x3 neighbourhood at (y, x), zero outside, channel-major like unfold."""
    channels, height, width = fmap.shape
    values = np.zeros((channels, 3, 3), dtype=np.float64)
    for dy in range(3):
        for dx in range(3):
            yy, xx = y + dy - 1, x + dx - 1
            if 0 <= yy < height and 0 <= xx < width:
                values[:, dy, dx] = fmap[:, yy, xx]
    return values.reshape(-1)


def test_patch_features_match_a_per_position_computation():
    backbone, _ = load_backbone("resnet18", "random")
    extractor = PatchFeatureExtractor(backbone, ("layer2", "layer3"), pretrain_dim=96, target_dim=64)
    image = torch.randn(1, 3, 64, 64)
    features, grid = extractor(image)
    assert grid == (8, 8) and features.shape == (1, 64, 64)

    with torch.no_grad():  # independent forward through the torchvision modules themselves
        x = backbone.maxpool(backbone.relu(backbone.bn1(backbone.conv1(image))))
        layer2 = backbone.layer2(backbone.layer1(x))
        layer3 = backbone.layer3(layer2)
    l2 = layer2[0].numpy().astype(np.float64)
    # the deeper layer's unfolded patches, bilinearly resized to layer2's grid
    l3_patches = np.stack([neighbourhood(layer3[0].numpy(), y, x) for y in range(4) for x in range(4)], axis=1)
    l3_resized = F.interpolate(torch.from_numpy(l3_patches.reshape(1, -1, 4, 4)), size=(8, 8), mode="bilinear",
                               align_corners=False)[0].numpy()
    for y, x in [(0, 0), (3, 5), (7, 7), (4, 0)]:
        first = adaptive_pool_1d(neighbourhood(l2, y, x), 96)
        second = adaptive_pool_1d(l3_resized[:, y, x], 96)
        expected = adaptive_pool_1d(np.concatenate([first, second]), 64)
        np.testing.assert_allclose(features[0, y * 8 + x].numpy(), expected, rtol=1e-4, atol=1e-5)


def test_network_stops_at_the_deepest_tap():
    backbone, _ = load_backbone("resnet18", "random")
    extractor = PatchFeatureExtractor(backbone, ("layer2", "layer3"))
    assert extractor.body.names[-1] == "layer3"
    assert not any(module is backbone.layer4 or module is backbone.fc for module in extractor.modules())
    mobile, _ = load_backbone("mobilenet_v2", "random")
    taps = PatchFeatureExtractor(mobile, ("features.6", "features.13")).body
    assert taps.names[-1] == "features.13" and len(taps.stages) == 14


# every layer one way, then the other, then as shipped (resnet18: layer2 by gathers, layer3 by the convolution)
@pytest.mark.parametrize("gather_terms", [0, 64, None], ids=["convolution", "gathers", "default"])
@pytest.mark.parametrize("backbone_name, layers, pretrain_dim, target_dim, patch_size", [
    ("mobilenet_v2", ("features.6", "features.13"), 1024, 1024, 3),  # 288 and 864 values: pooled up and down
    ("mobilenet_v2", ("features.6", "features.13"), 1024, 1024, 5),  # 5 x 5 neighbourhoods
    ("resnet18", ("layer2", "layer3"), 1024, 1024, 3),
    ("resnet18", ("layer1", "layer2", "layer3"), 700, 333, 3),  # windows that straddle the layers' boundaries
])
def test_pooling_equals_adaptive_average_pooling(monkeypatch, gather_terms, backbone_name, layers, pretrain_dim,
                                                 target_dim, patch_size):
    if gather_terms is not None:
        monkeypatch.setattr(features_module, "GATHER_TERMS", gather_terms)
    backbone, _ = load_backbone(backbone_name, "random")
    extractor = PatchFeatureExtractor(backbone, layers, patch_size=patch_size, pretrain_dim=pretrain_dim,
                                      target_dim=target_dim)
    images = torch.randn(2, 3, 96, 128)
    features, grid = extractor(images)
    used = [pooling.conv is None for pooling in extractor._pooling.values()]
    assert len(used) == len(layers)
    if gather_terms is not None:
        assert all(used) == (gather_terms > 0) and any(used) == (gather_terms > 0)
    elif backbone_name == "resnet18" and layers == ("layer2", "layer3"):
        assert used == [True, False]
    with torch.no_grad():
        taps = extractor.body(images)
    # the official unfold / adaptive_avg_pool1d path, independent of the convolution and the gathers
    expected = unfolded_pooling([taps[layer] for layer in layers], patch_size, pretrain_dim, target_dim)
    assert features.shape == expected.shape == (2, grid[0] * grid[1], target_dim)
    scale = float(expected.abs().max())
    assert float((features - expected).abs().max()) <= 1e-6 * scale
