"""precision int8: ONNX Runtime's static int8 graph of the extractor, calibrated on the bank's own good windows,
against float32 on real images and real mobilenet_v2 weights; the calibration windows a bank stores; where int8 is
refused (no VNNI, engine torch, a bank without windows).

Tolerances (measured with this test's own data on an AMD EPYC with AVX-512 VNNI, mobilenet_v2, crop view): image
scores moved by 0.6 % of the highest fp32 score, maps by 6 % of the map's maximum, the threshold of a bank built in
int8 by 4 % of the fp32-built one's. The test allows 5 %, 15 % and 8 % (margin for other CPUs' kernels), and the
image AUROC must not move."""
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from scorer import BuildConfig, FeatureConfig, PatchCoreScorer, build_bank, load_bank, save_bank
from scorer.bank import BankError, bank_from_bytes, bank_to_bytes
from scorer.ensemble import ensemble_of
from scorer.features import ComputeConfig, ComputeError, Int8Calibration
from scorer.hardware import CpuFeatures
from scorer.preprocess import list_images, load_image

from .conftest import BOTTLE, SHARED, cpu_flags, needs_bottle

MACARONI = SHARED / "datasets" / "visa_macaroni1"
SCORE_RTOL = 0.05  # |int8 - fp32| image score, relative to the highest fp32 score
THRESHOLD_RTOL = 0.08  # a bank built in int8 against one built in fp32, same images
MAP_RTOL = 0.15  # |int8 - fp32| anomaly map, relative to the fp32 map's maximum


VNNI = bool({"avx512_vnni", "avx_vnni", "amx_int8"} & cpu_flags())
needs_vnni = pytest.mark.skipif(not VNNI, reason="int8 runs natively only on CPUs with VNNI")
INT8 = ComputeConfig("int8", emulate=not VNNI)  # emulate: the refusal tests' CPUs without VNNI still build


def _set(category: Path, train_every: int, tests: int) -> tuple[list[Path], list[np.ndarray], np.ndarray]:
    train = sorted(list_images(category / "train" / "good"))[::train_every]
    paths = sorted(p for sub in (category / "test").iterdir() if sub.is_dir() for p in list_images(sub))
    paths = [paths[i] for i in np.linspace(0, len(paths) - 1, tests).astype(int)]
    labels = np.array([p.parent.name != "good" for p in paths])
    return train, [load_image(p) for p in paths], labels


@needs_bottle
@needs_vnni
def test_int8_scores_maps_and_threshold_against_fp32_on_bottle(mobilenet, tmp_path):
    train, images, labels = _set(BOTTLE, 10, 24)
    config = BuildConfig(features=FeatureConfig(backbone="mobilenet_v2"))
    bank = build_bank(train, config, progress=False, compute=ComputeConfig("fp32"))
    assert bank.calibration_windows.dtype == np.float16 and bank.calibration_windows.shape == (16, 3, 224, 224)
    save_bank(bank, tmp_path / "b.bank")
    bank = load_bank(tmp_path / "b.bank")  # the windows travel with the bank
    fp32 = PatchCoreScorer(bank, device="cpu", compute=ComputeConfig("fp32")).score(images)
    scorer = PatchCoreScorer(bank, device="cpu", compute=INT8)
    assert scorer.extractor.compute.engine == "onnxruntime"
    int8 = scorer.score(images)
    top = fp32.image_scores.max()
    assert np.abs(int8.image_scores - fp32.image_scores).max() < SCORE_RTOL * top
    assert not np.array_equal(int8.image_scores, fp32.image_scores)  # int8 did run: not the fp32 graph
    assert roc_auc_score(labels, int8.image_scores) == roc_auc_score(labels, fp32.image_scores)
    for a, b in zip(int8.maps, fp32.maps):
        assert np.abs(a - b).max() < MAP_RTOL * b.max()
    # a bank built in int8 (its features by the int8 graph) keeps the fp32 build's threshold within tolerance
    built8 = build_bank(train, config, progress=False, compute=INT8)
    assert abs(built8.calibration.threshold - bank.calibration.threshold) < THRESHOLD_RTOL * bank.calibration.threshold
    assert built8.info["compute"]["precision"] == "int8"


@pytest.mark.skipif(not MACARONI.is_dir(), reason="../shared/datasets/visa_macaroni1 is absent")
@needs_vnni
def test_int8_scores_against_fp32_on_macaroni1(mobilenet):
    train, images, _ = _set(MACARONI, 20, 16)
    bank = build_bank(train, BuildConfig(features=FeatureConfig(backbone="mobilenet_v2")), progress=False,
                      compute=ComputeConfig("fp32"))
    fp32 = PatchCoreScorer(bank, device="cpu", compute=ComputeConfig("fp32")).score(images, maps=False)
    int8 = PatchCoreScorer(bank, device="cpu", compute=INT8).score(images, maps=False)
    assert np.abs(int8.image_scores - fp32.image_scores).max() < SCORE_RTOL * fp32.image_scores.max()
    assert np.corrcoef(int8.image_scores, fp32.image_scores)[0, 1] > 0.99


def test_banks_keep_their_windows_and_int8_graphs_follow_them(mobilenet):
    """Windows round-trip exactly (single and ensemble banks); a bank without them scores in fp32 but is refused in
    int8; two banks with other windows get their own int8 graphs from one shared extractor, equal windows share."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (96, 96, 3), dtype=np.uint8) for _ in range(6)]
    config = BuildConfig(features=FeatureConfig(backbone="mobilenet_v2"))
    bank = build_bank(images, config, progress=False, compute=ComputeConfig("fp32"))
    again = bank_from_bytes(bank_to_bytes(bank))
    assert np.array_equal(again.calibration_windows, bank.calibration_windows) and len(bank.calibration_windows) == 6
    other = build_bank(images[::-1], config, progress=False, compute=ComputeConfig("fp32"))
    ensemble = ensemble_of([bank, replace(other, feature_config=replace(other.feature_config, backbone="resnet18"))],
                           "mean")
    members = bank_from_bytes(bank_to_bytes(ensemble)).members
    assert all(np.array_equal(m.calibration_windows, e.calibration_windows) for m, e in zip(members, ensemble.members))

    old = replace(bank, calibration_windows=None)  # as banks built before int8
    assert bank_from_bytes(bank_to_bytes(old)).calibration_windows is None
    PatchCoreScorer(old, device="cpu", compute=ComputeConfig("fp32"))
    with pytest.raises(BankError, match="calibration windows"):
        PatchCoreScorer(old, device="cpu", compute=INT8)

    first = PatchCoreScorer(bank, device="cpu", compute=INT8)
    second = PatchCoreScorer(other, device="cpu", extractor=first.extractor)
    third = PatchCoreScorer(replace(bank), device="cpu", extractor=first.extractor)
    first.warm_up(), second.warm_up(), third.warm_up()
    graphs = {key: graph.session for key, graph in first.extractor._sessions.items()}
    assert len(graphs) == 2 and first.int8.digest != second.int8.digest and first.int8.digest == third.int8.digest


def test_corrupt_windows_are_refused_on_load(mobilenet):
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, (96, 96, 3), dtype=np.uint8) for _ in range(6)]
    bank = build_bank(images, BuildConfig(features=FeatureConfig(backbone="mobilenet_v2")), progress=False)
    for windows in (np.full((2, 3, 8, 8), np.inf, np.float16), np.zeros((2, 4, 8, 8), np.float16),
                    np.zeros((3, 8, 8), np.float16)):
        with pytest.raises(BankError, match="calibration windows"):
            bank_from_bytes(bank_to_bytes(replace(bank, calibration_windows=windows)))
    with pytest.raises(ComputeError):
        Int8Calibration(np.zeros((0, 3, 8, 8), np.float16))


def test_int8_refused_where_it_cannot_run(monkeypatch):
    import scorer.features as features

    with pytest.raises(ComputeError, match="onnxruntime only"):
        ComputeConfig("int8", engine="torch").resolve("cpu")
    no_vnni = CpuFeatures("test CPU", frozenset({"avx2", "fma", "avx512f"}), "AVX512", 2)
    monkeypatch.setattr(features, "cpu_features", lambda: no_vnni)
    with pytest.raises(ComputeError, match="VNNI|vnni"):
        ComputeConfig("int8").resolve("cpu")
    assert ComputeConfig("int8", emulate=True).resolve("cpu").engine == "onnxruntime"
    vnni = CpuFeatures("test CPU", frozenset({"avx2", "avx512_vnni"}), "AVX512", 2)
    monkeypatch.setattr(features, "cpu_features", lambda: vnni)
    resolved = ComputeConfig("int8").resolve("cpu")
    assert resolved.precision == "int8" and resolved.engine == "onnxruntime"
    assert ComputeConfig().resolve("cpu").precision == "fp32"  # int8 is an option, never the default


def test_an_int8_graph_that_cannot_be_made_runs_in_float32_onnxruntime(mobilenet, monkeypatch):
    """A quantiser failure never fails a batch or a bank load: that size runs the float32 ONNX graph."""
    import torch

    import scorer.onnx_quantise as onnx_quantise
    from scorer.model import build_extractor

    def broken(*args, **kwargs):
        raise RuntimeError("quantiser failure")

    monkeypatch.setattr(onnx_quantise, "quantise_graph", broken)
    windows = Int8Calibration(np.random.default_rng(2).standard_normal((4, 3, 64, 64)).astype(np.float16))
    int8, _ = build_extractor(FeatureConfig(backbone="mobilenet_v2"), compute=INT8)
    fp32, _ = build_extractor(FeatureConfig(backbone="mobilenet_v2"), compute=ComputeConfig("fp32", engine="onnxruntime"))
    x = torch.rand(2, 3, 64, 64)
    int8.warm_up((64, 64), windows)  # does not raise
    assert torch.equal(int8(x, windows)[0], fp32(x)[0])
