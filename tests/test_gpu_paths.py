"""The GPU paths of the scorer, run on the CPU: batched JPEG decoding, uint8 upload, tensors as frames,
channels_last and bf16 autocast. The same code runs on CUDA (not runnable on this machine)."""
import cv2
import numpy as np
import pytest
import torch

from scorer import BuildConfig, CalibrationConfig, CoresetConfig, FeatureConfig, MemoryBank, PatchCoreScorer, build_bank
from scorer.features import ComputeConfig
from scorer.model import build_extractor
from scorer.preprocess import ImageDecodeError, decode_image, decode_images, list_images, upload

from .conftest import BOTTLE, needs_bottle, synthetic_part

# |bf16 - fp32| over the set's highest fp32 score. Measured: bottle 0.039 (per image relative, 42 test
# images); synthetic parts below 0.03. bf16 keeps 8 mantissa bits: low (good) scores move the most, relatively.
BF16_SCORE_TOLERANCE = 0.06


def _jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    return cv2.imencode(".jpg", image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()


def test_batched_jpeg_decoding_equals_cv2_and_a_bad_frame_fails_alone():
    rng = np.random.default_rng(0)
    images = [synthetic_part(rng, 240), synthetic_part(rng, 160, defect=True)]
    grey = cv2.imencode(".jpg", images[0][:, :, 0])[1].tobytes()
    png = cv2.imencode(".png", images[1][:, :, ::-1])[1].tobytes()
    datas = [_jpeg(images[0]), _jpeg(images[1]), grey, png, b"\xff\xd8\xff\xe0 not really a jpeg"]
    reference = [decode_image(d) for d in datas[:4]]
    batched = decode_images(datas, "cpu", batched_jpeg=True)  # torchvision.io.decode_jpeg: what CUDA uses
    plain = decode_images(datas, "cpu")  # CPU default: cv2
    assert isinstance(batched[0], torch.Tensor) and isinstance(plain[0], np.ndarray)
    assert isinstance(batched[3], np.ndarray)  # PNG: always cv2
    for out in (batched, plain):
        assert isinstance(out[4], ImageDecodeError)
        for got, want in zip(out[:4], reference):
            got = got.numpy() if isinstance(got, torch.Tensor) else got
            assert got.shape == want.shape and got.dtype == np.uint8
            assert np.abs(got.astype(int) - want).max() <= 2  # two JPEG decoders' IDCTs
    assert all(np.array_equal(p, r) for p, r in zip(plain[:4], reference))


def test_upload_keeps_uint8_and_tensor_frames_score_as_arrays(mobilenet):
    rng = np.random.default_rng(1)
    images = [synthetic_part(rng, 240, defect=i == 2) for i in range(4)]
    batch = upload(images, "cpu")
    assert batch.dtype == torch.uint8 and batch.shape == (4, 3, 240, 240)
    assert torch.equal(batch, upload([torch.from_numpy(i) for i in images], "cpu"))
    extractor, config = build_extractor(FeatureConfig(backbone="mobilenet_v2"))
    bank = MemoryBank(np.ascontiguousarray(extractor(upload(images[:2], "cpu").float().div(255))[0][0].numpy()),
                      config, CoresetConfig())
    scorer = PatchCoreScorer(bank, device="cpu", extractor=extractor)
    arrays = scorer.score(images)
    tensors = scorer.score([torch.from_numpy(i) for i in images])
    np.testing.assert_array_equal(arrays.image_scores, tensors.image_scores)
    np.testing.assert_array_equal(arrays.maps[2], tensors.maps[2])


def _synthetic_bank(n: int = 12) -> tuple[MemoryBank, list[np.ndarray]]:
    rng = np.random.default_rng(2)
    config = BuildConfig(features=FeatureConfig(backbone="mobilenet_v2"), coreset=CoresetConfig(fraction=0.1),
                         calibration=CalibrationConfig(folds=0))
    bank = build_bank([synthetic_part(rng) for _ in range(n)], config, device="cpu", progress=False)
    return bank, [synthetic_part(rng, defect=i % 2 == 1) for i in range(8)]


def test_channels_last_and_bf16_autocast_against_fp32(mobilenet):
    bank, images = _synthetic_bank()
    fp32 = PatchCoreScorer(bank, device="cpu", compute=ComputeConfig("fp32", channels_last=False)).score(images)
    last = PatchCoreScorer(bank, device="cpu", compute=ComputeConfig(channels_last=True)).score(images)
    np.testing.assert_allclose(last.image_scores, fp32.image_scores, rtol=1e-4)
    # emulate: a CPU without native BF16 refuses bf16 unless asked to run it through reference kernels
    bf16 = PatchCoreScorer(bank, device="cpu", compute=ComputeConfig("bf16", emulate=True)).score(images)
    difference = np.abs(bf16.image_scores - fp32.image_scores).max() / fp32.image_scores.max()
    assert 0 < difference < BF16_SCORE_TOLERANCE  # it really ran in bf16, and stayed close
    with pytest.raises(ValueError, match="unknown precision"):
        ComputeConfig("int4")


@needs_bottle
def test_bf16_keeps_image_auroc_on_bottle(mobilenet):
    from sklearn.metrics import roc_auc_score

    bank = build_bank(list_images(BOTTLE / "train" / "good")[::10],
                      BuildConfig(features=FeatureConfig(backbone="mobilenet_v2"), coreset=CoresetConfig(fraction=0.1),
                                  calibration=CalibrationConfig(folds=0)), device="cpu", progress=False)
    folders = sorted((BOTTLE / "test").iterdir())
    paths = [p for folder in folders for p in list_images(folder)[::3]]
    labels = [p.parent.name != "good" for p in paths]
    fp32 = PatchCoreScorer(bank, device="cpu", compute=ComputeConfig("fp32")).score_paths(paths, maps=False).image_scores
    bf16 = PatchCoreScorer(bank, device="cpu", compute=ComputeConfig("bf16", emulate=True)).score_paths(
        paths, maps=False).image_scores
    assert np.abs(bf16 - fp32).max() / fp32.max() < BF16_SCORE_TOLERANCE
    assert roc_auc_score(labels, bf16) == roc_auc_score(labels, fp32)
