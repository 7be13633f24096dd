"""The backbone's compute settings (scorer.features.ComputeConfig) on real images and real mobilenet_v2 weights:
channels_last float32 gives the contiguous layout's features and scores to float rounding; the defaults are
resolved per device and CPU; precisions a CPU cannot run natively are refused by type; a bank records how it was
built and keeps its threshold when built with another layout (or, on a BF16 CPU, another precision)."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from scorer import BuildConfig, CalibrationConfig, CoresetConfig, FeatureConfig, PatchCoreScorer, build_bank, load_bank, save_bank
from scorer.features import DEFAULTS, ComputeConfig, ComputeError
from scorer.hardware import cpu_features
from scorer.model import build_extractor
from scorer.preprocess import list_images, load_image, preprocess

from .conftest import BOTTLE, SHARED, cpu_flags, needs_bottle

MACARONI = SHARED / "datasets" / "visa_macaroni1"
needs_macaroni = pytest.mark.skipif(not MACARONI.is_dir(), reason="../shared/datasets/visa_macaroni1 is absent")

# channels_last vs contiguous, float32: the same sums in another order. Measured on bottle and macaroni1 test images:
# features 1.4e-6 of the largest feature value, image scores and maps within 1e-6 relative.
LAYOUT_RTOL = 1e-5
# bf16 vs fp32 (native BF16 CPUs only): scores move by up to a few percent (tests/test_gpu_paths.py measures 0.039)
BF16_RTOL = 0.06


NATIVE_BF16 = bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def _images(category: Path, count: int) -> list[np.ndarray]:
    folders = sorted(p for p in (category / "test").iterdir() if p.is_dir())
    paths = [p for folder in folders for p in list_images(folder)[:max(1, count // len(folders))]]
    return [load_image(p) for p in paths[:count]]


def _features(images: list[np.ndarray], compute: ComputeConfig) -> np.ndarray:
    extractor, _ = build_extractor(FeatureConfig(backbone="mobilenet_v2"), compute=compute)
    return extractor(preprocess(images, 256, 224))[0].numpy()


@needs_bottle
@needs_macaroni
def test_channels_last_features_match_contiguous_on_real_images(mobilenet):
    for category in (BOTTLE, MACARONI):
        images = _images(category, 4)
        contiguous = _features(images, ComputeConfig("fp32", channels_last=False, engine="torch"))
        last = _features(images, ComputeConfig("fp32", channels_last=True, engine="torch"))
        assert contiguous.shape == last.shape == (4, 28 * 28, 1024)
        scale = np.abs(contiguous).max()
        assert np.abs(last - contiguous).max() <= LAYOUT_RTOL * scale, category.name


def _small_bank(compute: ComputeConfig, folds: int = 3):
    paths = list_images(BOTTLE / "train" / "good")[::20]  # 11 images
    config = BuildConfig(features=FeatureConfig(backbone="mobilenet_v2"), coreset=CoresetConfig(fraction=0.1),
                         calibration=CalibrationConfig(folds=folds))
    return build_bank(paths, config, device="cpu", progress=False, compute=compute)


@needs_bottle
def test_channels_last_scores_and_maps_match_contiguous(mobilenet):
    bank = _small_bank(ComputeConfig("fp32", channels_last=False, engine="torch"), folds=0)
    images = _images(BOTTLE, 6)
    contiguous = PatchCoreScorer(bank, device="cpu", compute=ComputeConfig("fp32", False, "torch")).score(images)
    last = PatchCoreScorer(bank, device="cpu", compute=ComputeConfig("fp32", True, "torch")).score(images)
    np.testing.assert_allclose(last.image_scores, contiguous.image_scores, rtol=LAYOUT_RTOL)
    for a, b in zip(last.maps, contiguous.maps):
        np.testing.assert_allclose(a, b, rtol=LAYOUT_RTOL, atol=LAYOUT_RTOL * float(b.max()))


def test_defaults_resolved_per_device_and_cpu():
    cpu = ComputeConfig().resolve("cpu")
    assert DEFAULTS["cpu"] == ("fp32", True, "onnxruntime")
    assert (cpu.precision, cpu.channels_last) == ("fp32", True)
    assert cpu.engine == ("onnxruntime" if importlib.util.find_spec("onnxruntime") else "torch")  # else falls back
    assert cpu.resolved and not ComputeConfig().resolved
    # the reason says whether this CPU could have run bf16 natively (checked against /proc/cpuinfo here)
    assert ("has native BF16" if NATIVE_BF16 else "has no native BF16") in cpu.reason
    assert cpu_features().bf16 == NATIVE_BF16
    asked = ComputeConfig("fp32", channels_last=False, engine="torch").resolve("cpu")
    assert (asked.precision, asked.channels_last, asked.engine) == ("fp32", False, "torch")
    # resolving twice changes nothing; the reason does not take part in equality
    assert cpu.resolve("cpu") == cpu
    assert ComputeConfig("fp32", True, cpu.engine) == cpu


def test_bad_settings_refused_by_type():
    with pytest.raises(ComputeError):
        ComputeConfig("int4")
    with pytest.raises(ComputeError):
        ComputeConfig("fp32", channels_last="yes")
    assert issubclass(ComputeError, ValueError)


@pytest.mark.skipif(NATIVE_BF16, reason="this CPU has native BF16")
def test_bf16_refused_on_a_cpu_without_native_bf16():
    with pytest.raises(ComputeError):
        ComputeConfig("bf16").resolve("cpu")
    if not {"avx512_fp16", "amx_fp16"} & cpu_flags():
        with pytest.raises(ComputeError):
            ComputeConfig("fp16").resolve("cpu")
    emulated = ComputeConfig("bf16", emulate=True).resolve("cpu")  # tests only: reference kernels
    assert emulated.precision == "bf16" and "emulated" in emulated.reason


@needs_bottle
def test_bank_records_its_compute_and_keeps_its_threshold_across_layouts(mobilenet, tmp_path):
    contiguous = _small_bank(ComputeConfig("fp32", channels_last=False, engine="torch"))
    last = _small_bank(ComputeConfig(engine="torch"))  # the CPU default layout: channels_last
    assert contiguous.info["compute"]["channels_last"] is False
    assert last.info["compute"]["channels_last"] is True and last.info["compute"]["precision"] == "fp32"
    save_bank(last, tmp_path / "b.bank")
    assert load_bank(tmp_path / "b.bank").info["compute"] == last.info["compute"]
    threshold = contiguous.calibration.threshold
    assert abs(last.calibration.threshold - threshold) <= LAYOUT_RTOL * threshold
    np.testing.assert_allclose(last.calibration.good_scores, contiguous.calibration.good_scores, rtol=LAYOUT_RTOL)


@needs_bottle
@pytest.mark.skipif(not NATIVE_BF16, reason="bf16 needs a CPU with native BF16 (avx512_bf16/amx_bf16)")
def test_bf16_bank_threshold_close_to_fp32(mobilenet):
    fp32 = _small_bank(ComputeConfig("fp32"))
    bf16 = _small_bank(ComputeConfig("bf16"))
    assert bf16.info["compute"]["precision"] == "bf16"
    assert abs(bf16.calibration.threshold - fp32.calibration.threshold) <= BF16_RTOL * fp32.calibration.threshold
    images = _images(BOTTLE, 8)
    scores = PatchCoreScorer(fp32, device="cpu", compute=ComputeConfig("bf16")).score(images, maps=False).image_scores
    reference = PatchCoreScorer(fp32, device="cpu", compute=ComputeConfig("fp32")).score(images, maps=False).image_scores
    assert np.abs(scores - reference).max() <= BF16_RTOL * reference.max()


def test_thread_plan_sizes_torch_faiss_and_decoding_together():
    import os

    import faiss
    import torch

    from scorer.hardware import apply_thread_plan, available_cores, thread_plan

    for cores, intra_op, decode in ((1, 1, 1), (2, 2, 1), (4, 4, 1), (8, 6, 2), (16, 12, 4)):
        plan = thread_plan(cores)
        assert (plan.intra_op, plan.decode) == (intra_op, decode)
    assert thread_plan().cores == available_cores() == len(os.sched_getaffinity(0))
    try:
        apply_thread_plan(thread_plan(1))
        assert torch.get_num_threads() == 1 and faiss.omp_get_max_threads() == 1  # one OpenMP runtime for both
    finally:
        apply_thread_plan()
    assert torch.get_num_threads() == faiss.omp_get_max_threads() == thread_plan().intra_op
