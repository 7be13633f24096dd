"""The backbone's engine (scorer.features.ComputeConfig.engine) on real images and real mobilenet_v2 weights:
ONNX Runtime runs the extractor's float32 graph and gives torch's fp32 features, scores and maps to float rounding;
a bank built with one engine keeps its threshold under the other; the CPU default is onnxruntime where it is
installed (a host without it falls back to torch and says so); the engine is refused clearly where it cannot run."""
import sys

import numpy as np
import pytest
import torch

from scorer import BuildConfig, CalibrationConfig, CoresetConfig, FeatureConfig, PatchCoreScorer, build_bank
from scorer.features import ORT_SPINNING, ComputeConfig, ComputeError
from scorer.model import build_extractor
from scorer.preprocess import list_images, load_image, preprocess

from .conftest import BOTTLE, SHARED, needs_bottle

pytest.importorskip("onnxruntime")  # the [onnx] extra (CI installs it)

MACARONI = SHARED / "datasets" / "visa_macaroni1"
needs_macaroni = pytest.mark.skipif(not MACARONI.is_dir(), reason="../shared/datasets/visa_macaroni1 is absent")

# onnxruntime vs torch, both float32: the same graph, other kernels (sums in another order). Measured on bottle and
# macaroni1 test images: features within 3.6e-6 of the largest feature value; scores and maps within 1e-6 relative.
ENGINE_RTOL = 1e-5
TORCH = ComputeConfig("fp32", False, "torch")  # the reference: torch's contiguous float32 arithmetic
ORT = ComputeConfig("fp32", None, "onnxruntime")


def _images(category, count: int) -> list[np.ndarray]:
    folders = sorted(p for p in (category / "test").iterdir() if p.is_dir())
    paths = [p for folder in folders for p in list_images(folder)[:max(1, count // len(folders))]]
    return [load_image(p) for p in paths[:count]]


def _features(images: list[np.ndarray], compute: ComputeConfig, size: int = 224) -> np.ndarray:
    extractor, _ = build_extractor(FeatureConfig(backbone="mobilenet_v2"), compute=compute)
    return extractor(preprocess(images, size + 32, size))[0].numpy()


@needs_bottle
@needs_macaroni
def test_onnxruntime_features_match_torch_fp32_on_real_images(mobilenet):
    for category in (BOTTLE, MACARONI):
        images = _images(category, 4)
        reference = _features(images, TORCH)
        got = _features(images, ORT)
        assert reference.shape == got.shape == (4, 28 * 28, 1024)
        assert np.abs(got - reference).max() <= ENGINE_RTOL * np.abs(reference).max(), category.name


@needs_bottle
def test_onnxruntime_at_another_input_size_and_batch(mobilenet):
    """A graph per input size, any batch size: 256 px windows (a 32 x 32 grid), batches of 1 and 3."""
    images = _images(BOTTLE, 3)
    reference = _features(images, TORCH, size=256)
    extractor, _ = build_extractor(FeatureConfig(backbone="mobilenet_v2"), compute=ORT)
    inputs = preprocess(images, 288, 256)
    single, grid = extractor(inputs[:1])
    batch, _ = extractor(inputs)
    assert grid == (32, 32) and batch.shape == (3, 32 * 32, 1024)
    scale = np.abs(reference).max()
    assert np.abs(batch.numpy() - reference).max() <= ENGINE_RTOL * scale
    assert np.abs(single.numpy() - reference[:1]).max() <= ENGINE_RTOL * scale
    # a smaller batch after the larger one runs in the arena that one grew (no memory pattern): the same features
    middle, _ = extractor(inputs[1:2])
    assert np.abs(middle.numpy() - reference[1:2]).max() <= ENGINE_RTOL * scale
    # its threads stop spinning after a run: the search that follows gets both cores; no memory pattern: the
    # largest batch pays one slow run, not two (docs/scorer.md, CPU speed)
    session, _ = extractor._onnx_session((256, 256))
    options = session.get_session_options()
    assert options.get_session_config_entry(ORT_SPINNING) == "0" and not options.enable_mem_pattern


def _small_bank(compute: ComputeConfig):
    paths = list_images(BOTTLE / "train" / "good")[::20]  # 11 images
    config = BuildConfig(features=FeatureConfig(backbone="mobilenet_v2"), coreset=CoresetConfig(fraction=0.1),
                         calibration=CalibrationConfig(folds=3))
    return build_bank(paths, config, device="cpu", progress=False, compute=compute)


@needs_bottle
def test_onnxruntime_scores_maps_and_threshold_match_torch_fp32(mobilenet):
    reference_bank, bank = _small_bank(TORCH), _small_bank(ORT)
    assert bank.info["compute"]["engine"] == "onnxruntime" and reference_bank.info["compute"]["engine"] == "torch"
    threshold = reference_bank.calibration.threshold
    assert abs(bank.calibration.threshold - threshold) <= ENGINE_RTOL * threshold
    images = _images(BOTTLE, 6)
    reference = PatchCoreScorer(reference_bank, device="cpu", compute=TORCH).score(images)
    got = PatchCoreScorer(reference_bank, device="cpu", compute=ORT).score(images)
    np.testing.assert_allclose(got.image_scores, reference.image_scores, rtol=ENGINE_RTOL)
    for a, b in zip(got.maps, reference.maps):
        np.testing.assert_allclose(a, b, rtol=ENGINE_RTOL, atol=ENGINE_RTOL * float(b.max()))


def test_extractors_of_equal_weights_share_a_graph_and_others_do_not():
    first, _ = build_extractor(FeatureConfig(backbone="mobilenet_v2"), weights="random", compute=ORT)
    second, _ = build_extractor(FeatureConfig(backbone="mobilenet_v2"), weights="random", compute=ORT)
    third, _ = build_extractor(FeatureConfig(backbone="mobilenet_v2"), weights="random", compute=ORT)
    with torch.no_grad():
        next(third.body.parameters()).add_(1e-3)  # other weights than the first two (seeded alike)
    x = torch.rand(2, 3, 64, 64)
    assert all(torch.equal(a, b) for a, b in zip(first.body.state_dict().values(), second.body.state_dict().values()))
    assert first.fingerprint() == second.fingerprint() != third.fingerprint()
    for extractor in (first, second, third):  # each its own weights' features, whether the graph is shared or not
        with torch.no_grad():
            torch_features = extractor.patch_features(x)[0]
        got = extractor(x)[0]
        assert torch.allclose(got, torch_features, rtol=0, atol=ENGINE_RTOL * float(torch_features.abs().max()))
    assert first._onnx_session((64, 64))[0] is second._onnx_session((64, 64))[0]
    assert third._onnx_session((64, 64))[0] is not first._onnx_session((64, 64))[0]


def test_a_graph_goes_with_the_last_extractor_that_ran_it(monkeypatch):
    """The process-wide cache only lends graphs: an extractor of equal weights reuses one (no second export) while
    another holds it, and once every extractor that ran it is dropped (a bank's scorer gone), the graph is freed."""
    import gc
    import weakref

    import scorer.features as features

    first, _ = build_extractor(FeatureConfig(backbone="mobilenet_v2"), weights="random", compute=ORT)
    second, _ = build_extractor(FeatureConfig(backbone="mobilenet_v2"), weights="random", compute=ORT)
    first.warm_up((64, 64))
    key = (first.fingerprint(), (64, 64), "")
    session = weakref.ref(first._onnx_session((64, 64))[0])  # the ONNX Runtime session itself
    exports = []
    real = features.onnx_graph
    monkeypatch.setattr(features, "onnx_graph", lambda *args: exports.append(args) or real(*args))
    assert second._onnx_session((64, 64))[0] is session() and exports == []  # lent, not exported again
    del first
    gc.collect()
    assert key in features._SESSIONS and session() is not None  # the second extractor still runs it
    del second
    gc.collect()
    assert key not in features._SESSIONS and session() is None  # gone with the last extractor that ran it


def test_a_size_onnxruntime_cannot_prepare_runs_in_torch(monkeypatch):
    """An export or session failure (the exporter's and ONNX Runtime's own error kinds) never fails a batch or a
    bank load: that input size runs in torch, with torch's features."""
    import scorer.features as features

    def broken(extractor, size):
        raise RuntimeError("exporter failure")

    monkeypatch.setattr(features, "onnx_graph", broken)
    extractor, _ = build_extractor(FeatureConfig(backbone="mobilenet_v2"), weights="random", compute=ORT)
    x = torch.rand(2, 3, 72, 72)
    extractor.warm_up((72, 72))  # does not raise
    with torch.no_grad():
        expected = extractor.patch_features(x)[0]
    assert torch.equal(extractor(x)[0], expected)


def test_engine_resolved_and_refused_clearly(monkeypatch):
    cpu = ComputeConfig().resolve("cpu")
    assert cpu.engine == "onnxruntime" and "engine onnxruntime (default on cpu)" in cpu.reason
    assert ComputeConfig(engine="torch").resolve("cpu").engine == "torch"
    assert ComputeConfig().resolve("meta").engine == "torch"  # other devices: torch
    with pytest.raises(ComputeError, match="unknown engine"):
        ComputeConfig(engine="tensorrt")
    with pytest.raises(ComputeError, match="CPU only"):
        ComputeConfig(engine="onnxruntime").resolve("meta")
    with pytest.raises(ComputeError, match="fp32 and int8 only"):
        ComputeConfig("bf16", engine="onnxruntime", emulate=True).resolve("cpu")
    assert ComputeConfig("bf16", emulate=True).resolve("cpu").engine == "torch"  # the default follows the precision
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as on a host without the [onnx] extra: import fails
    fallback = ComputeConfig().resolve("cpu")
    assert fallback.engine == "torch" and "falls back: onnxruntime is not installed" in fallback.reason
    with pytest.raises(ComputeError, match="not installed"):
        ComputeConfig(engine="onnxruntime").resolve("cpu")


def test_the_export_leaves_the_backbone_as_it_was():
    """The exporter restores a module's training flag recursively: the backbone's batch norms must stay in eval
    mode after an export, so the torch path of the same extractor still computes the same features."""
    extractor, _ = build_extractor(FeatureConfig(backbone="resnet18"), weights="random", compute=ORT)
    x = torch.rand(2, 3, 96, 128)
    got = extractor(x)[0]  # exports the graph for 96 x 128
    assert not any(module.training for module in extractor.modules())
    with torch.no_grad():
        reference = extractor.patch_features(x)[0]
    assert float((got - reference).abs().max()) <= ENGINE_RTOL * float(reference.abs().max())


def test_a_worker_readies_the_graph_when_it_loads_a_bank_not_on_its_first_frame(redis_server, synthetic_bank_bytes):
    """The ONNX export of the backbone (~2 s of CPU) happens when the worker's cache loads a crop-view bank: its
    first frame finds the graph for the crop's size ready, and scoring it exports nothing more."""
    from contracts.keys import Keys
    from runtime.connection import connect
    from workers.banks.cache import BankCache
    from workers.banks.registry import BankRegistry

    registry = BankRegistry(connect(redis_server.url), Keys())
    registry.publish("default", synthetic_bank_bytes, activate=True)
    active = BankCache(registry, "cpu").get("default")
    extractor, view = active.scorer.extractor, active.scorer.bank.view
    assert extractor.compute.engine == "onnxruntime" and view.kind == "crop"
    assert list(extractor._sessions) == [((view.crop, view.crop), "")]  # (size, no int8 calibration)
    active.scorer.score([np.full((240, 320, 3), 128, np.uint8)], maps=False)
    assert list(extractor._sessions) == [((view.crop, view.crop), "")]  # (size, no int8 calibration)


def test_a_worker_forgets_the_backbone_and_graph_of_a_bank_it_switched_away_from(redis_server, synthetic_bank_bytes):
    """A bank's new version with other feature settings (here the first pooling's size) gets an extractor of its
    own; the one of the version it replaced, which no bank serves any more, is dropped with its ONNX graph."""
    import dataclasses
    import gc
    import weakref

    import scorer.features as features
    from contracts.keys import Keys
    from runtime.connection import connect
    from scorer import bank_from_bytes, bank_to_bytes
    from workers.banks.cache import BankCache
    from workers.banks.registry import BankRegistry

    registry = BankRegistry(connect(redis_server.url), Keys())
    registry.publish("default", synthetic_bank_bytes, activate=True)
    cache = BankCache(registry, "cpu")
    old = cache.get("default").scorer.extractor
    old_ref, key = weakref.ref(old), (old.fingerprint(), *next(iter(old._sessions)))
    assert key in features._SESSIONS
    bank = bank_from_bytes(synthetic_bank_bytes)
    other = dataclasses.replace(bank, feature_config=dataclasses.replace(bank.feature_config, pretrain_dim=512))
    registry.publish("default", bank_to_bytes(other), activate=True)
    new = cache.get("default").scorer.extractor
    assert new is not old and new.pretrain_dim == 512
    assert len(cache._extractors) == 1 and next(iter(cache._extractors.values())) is new  # the old one forgotten
    del old
    gc.collect()
    assert old_ref() is None and key not in features._SESSIONS
