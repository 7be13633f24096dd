"""Offline weights, explicit errors, and pre-processing of grey and colour files."""
import cv2
import numpy as np
import pytest
import torch

from scorer.backbones import BackboneError, hub_weights_path, load_backbone
from scorer.preprocess import ImageDecodeError, decode_image, load_image, preprocess


def test_missing_weights_name_the_expected_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(BackboneError, match=r"wide_resnet50_2-95faca4d\.pth.*hub.*--weights"):
        load_backbone("wide_resnet50_2")
    with pytest.raises(BackboneError, match="does not exist"):
        load_backbone("resnet18", tmp_path / "nope.pth")
    with pytest.raises(BackboneError, match="unknown backbone"):
        load_backbone("vgg16")


def test_real_mobilenet_weights_load_offline_and_classify(mobilenet):
    model, sha = mobilenet
    assert sha.startswith("b0353104")  # torchvision's published hash prefix for IMAGENET1K_V1
    from torchvision.models import MobileNet_V2_Weights

    # the hub file and the same file passed as --weights give the same network
    logits = model(torch.zeros(1, 3, 224, 224))
    assert logits.shape == (1, 1000)
    local, local_sha = load_backbone("mobilenet_v2", hub_weights_path("mobilenet_v2"))
    assert local_sha == sha
    assert torch.allclose(local(torch.zeros(1, 3, 224, 224)), logits)
    assert len(MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"]) == 1000


def test_weights_file_of_another_architecture_is_refused(tmp_path):
    from torchvision.models import resnet18

    path = tmp_path / "resnet18.pth"
    torch.save(resnet18().state_dict(), path)
    with pytest.raises(BackboneError, match="cannot load mobilenet_v2"):
        load_backbone("mobilenet_v2", path)


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".bmp"])
def test_grey_and_colour_files_decode_to_rgb(tmp_path, suffix):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 255, (40, 50), dtype=np.uint8)
    colour_bgr = np.zeros((40, 50, 3), np.uint8)
    colour_bgr[..., 2] = 200  # red in OpenCV's BGR order
    cv2.imwrite(str(tmp_path / f"g{suffix}"), grey)
    cv2.imwrite(str(tmp_path / f"c{suffix}"), colour_bgr)
    g = load_image(tmp_path / f"g{suffix}")
    c = load_image(tmp_path / f"c{suffix}")
    assert g.shape == (40, 50, 3) and np.array_equal(g[..., 0], g[..., 2])
    assert c.shape == (40, 50, 3) and c[..., 0].mean() > 190 and c[..., 2].mean() < 10  # RGB order
    assert preprocess([g, c], 64, 56).shape == (2, 3, 56, 56)


def test_corrupt_bytes_are_a_clear_error(tmp_path):
    with pytest.raises(ImageDecodeError):
        decode_image(b"\xff\xd8\xff not really a jpeg")
    (tmp_path / "x.png").write_bytes(b"garbage")
    with pytest.raises(ImageDecodeError, match="x.png"):
        load_image(tmp_path / "x.png")


def test_preprocess_resizes_the_shorter_side_then_centre_crops():
    image = np.zeros((100, 300, 3), np.uint8)
    image[:, 140:160] = 255  # a bright bar in the centre column range
    out = preprocess([image], 50, 50)  # 100x300 -> 50x150 -> centre 50x50 keeps the bar in the middle
    column_means = out[0, 0].mean(0)
    assert column_means[25] > column_means[2] + 1.0
