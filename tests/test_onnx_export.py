"""`patchcore export --format onnx`: ONNX Runtime scores and maps equal PyTorch's, and the runtime needs no torch."""
import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF
from typer.testing import CliRunner

pytest.importorskip("onnxruntime")

from patchcore.cli import app  # noqa: E402
from scorer import (BuildConfig, CalibrationConfig, CoresetConfig, FeatureConfig, PatchCoreScorer, ViewConfig,  # noqa: E402
                    build_bank, save_bank)
from scorer.backbones import hub_weights_path  # noqa: E402
from scorer.onnx_export import ExportError, export_onnx  # noqa: E402
from scorer.onnx_runtime import OnnxScorer, OnnxScorerError  # noqa: E402
from scorer.preprocess import list_images, load_image  # noqa: E402

from .conftest import BOTTLE, needs_bottle, synthetic_part  # noqa: E402

# relative: scores to each score (floored at the set's highest score: a near-zero distance between
# two almost equal vectors has no relative precision), maps to the map's maximum
TOLERANCE = 1e-3


def _bank(images, weights, folds=2, view=ViewConfig()):
    config = BuildConfig(features=FeatureConfig(backbone="mobilenet_v2"), coreset=CoresetConfig(fraction=0.1),
                         calibration=CalibrationConfig(folds=folds), view=view)
    return build_bank(images, config, weights=weights, device="cpu", progress=False)


# the export searches exactly (FAISS flat): it is compared with the exact PyTorch search
def _assert_same(onnx_scorer, torch_scorer, images, map_tolerance=TOLERANCE):
    scores, maps = onnx_scorer.score(images)
    expected = torch_scorer.score(images)
    np.testing.assert_allclose(scores, expected.image_scores, rtol=TOLERANCE, atol=TOLERANCE * expected.image_scores.max())
    for got, want in zip(maps, expected.maps):
        assert np.abs(got - want).max() <= map_tolerance * np.abs(want).max()
    return scores


def test_synthetic_export_scores_like_pytorch_and_runs_without_torch(tmp_path, mobilenet):
    rng = np.random.default_rng(0)
    bank = _bank([synthetic_part(rng, 240) for _ in range(10)], None)
    save_bank(bank, tmp_path / "b.bank")
    result = CliRunner().invoke(app, ["export", str(tmp_path / "b.bank"), "--format", "onnx", "--out",
                                      str(tmp_path / "x")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["max_relative_feature_difference"] < 1e-4
    # frames of several sizes and aspect ratios, grey and with defects
    images = [synthetic_part(rng, 240, defect=True), synthetic_part(rng, 240),
              cv2.resize(synthetic_part(rng, 300, defect=True), (480, 300)), np.repeat(synthetic_part(rng, 200)[:, :, :1], 3, 2)]
    scores = _assert_same(OnnxScorer(tmp_path / "x"), PatchCoreScorer(bank, device="cpu", search="exact"), images)

    for i, image in enumerate(images):
        cv2.imwrite(str(tmp_path / f"{i}.png"), image[:, :, ::-1])
    script = ("import sys, json; sys.modules['torch'] = None; sys.path.insert(0, sys.argv[1]); import patchcore_onnx, cv2;"
              "s = patchcore_onnx.OnnxScorer(sys.argv[1]);"
              "imgs = [cv2.imread(p)[:, :, ::-1].copy() for p in sys.argv[2:]];"
              "print(json.dumps(s.score(imgs, maps=False)[0].tolist()))")
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "x"), *[str(tmp_path / f"{i}.png") for i in range(4)]],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    np.testing.assert_allclose(json.loads(run.stdout), scores, rtol=1e-6)
    blocked = subprocess.run([sys.executable, "-c", "import sys; sys.modules['torch'] = None; import torch"],
                             capture_output=True, text=True)
    assert blocked.returncode != 0  # the block is real: importing torch fails in such a process
    cli = subprocess.run([sys.executable, str(tmp_path / "x" / "patchcore_onnx.py"), str(tmp_path / "x"), str(tmp_path / "0.png")],
                         capture_output=True, text=True, timeout=300)
    line = json.loads(cli.stdout)
    assert line["score"] == pytest.approx(scores[0], rel=1e-5) and line["threshold"] == bank.calibration.threshold


def test_crops_match_torchvisions_antialiased_resize():
    rng = np.random.default_rng(3)
    scorer = OnnxScorer.__new__(OnnxScorer)
    scorer.resize, scorer.crop = 256, 224
    for shape in [(900, 900), (300, 480), (1000, 1500), (200, 200), (240, 250)]:
        image = cv2.resize(synthetic_part(rng, 240, defect=True), shape[::-1])
        expected = TF.center_crop(TF.resize(torch.from_numpy(image).permute(2, 0, 1)[None], [256], antialias=True),
                                  [224, 224])[0].numpy()
        # the same integer arithmetic: equal up to 2 frames of 5, else 1 grey level on < 0.5 % of the pixels
        # (large downscales: torch's vectorised kernel rounds a few taps otherwise)
        difference = np.abs(scorer.crops([image])[0].astype(int) - expected)
        assert difference.max() <= 1 and (difference > 0).mean() < 0.005, shape


def test_exports_that_cannot_work_are_refused(tmp_path):
    rng = np.random.default_rng(1)
    full = _bank([synthetic_part(rng, 240) for _ in range(4)], "random", folds=0, view=ViewConfig(kind="full", size=160))
    with pytest.raises(ExportError, match="crop view"):
        export_onnx(full, tmp_path / "full", "random")
    bank = _bank([synthetic_part(rng, 240) for _ in range(4)], "random", folds=0)
    export_onnx(bank, tmp_path / "x", "random")
    onnx_file = tmp_path / "x" / "features.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[:-1] + b"\x00")
    with pytest.raises(OnnxScorerError, match="altered"):
        OnnxScorer(tmp_path / "x")


@needs_bottle
def test_bottle_onnx_scores_and_maps_equal_pytorch(tmp_path):
    if not hub_weights_path("mobilenet_v2").is_file():
        pytest.skip("mobilenet_v2 ImageNet weights absent")
    bank = _bank(list_images(BOTTLE / "train" / "good")[::10], None, folds=0)
    export_onnx(bank, tmp_path / "x")
    paths = [p for folder in sorted((BOTTLE / "test").iterdir()) for p in list_images(folder)[::6]]
    images = [load_image(p) for p in paths]
    # maps within 2e-3: 900 px frames resized to 256 differ from torch's kernel by 1 grey level on ~0.3 % of
    # the pixels (test above), which moves the worst map pixel by 1.0e-3 of the map's maximum (measured);
    # from the same crops, features agree to 3e-6 and maps to 1e-6
    _assert_same(OnnxScorer(tmp_path / "x"), PatchCoreScorer(bank, device="cpu", search="exact"), images, map_tolerance=2e-3)
