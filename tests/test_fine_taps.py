"""`--layers fine` (issue 23 item 4): the backbone's stride-4 taps with a quarter of the coreset fraction, so the
bank is the size the default taps give at the same --coreset, on a grid 4x finer; stored in the bank as the taps
themselves; an ensemble gives each member its own; named taps stay refused for an ensemble."""
import cv2
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from patchcore.cli import app
from scorer import BuildConfig, PatchCoreScorer, build_bank, load_bank, save_bank
from scorer.config import CoresetConfig, FeatureConfig
from scorer.model import build_extractor, extract_patches
from scorer.preprocess import load_image
from scorer.views import ViewConfig

from .conftest import BOTTLE, synthetic_part

VIEW = ViewConfig(kind="crop", resize=64, crop=64)  # default taps: 8 x 8 patches (stride 8); fine: 16 x 16
TRAIN = 6
FRACTION = 0.5


def images(count: int) -> list[np.ndarray]:
    """Real bottle training images where the shared data is present, else synthetic parts."""
    if BOTTLE.is_dir():
        return [load_image(p) for p in sorted((BOTTLE / "train" / "good").glob("*.png"))[:count]]
    rng = np.random.default_rng(0)
    return [synthetic_part(rng, 96) for _ in range(count)]


def config(backbone: str, layers: tuple[str, ...] = ()) -> BuildConfig:
    return BuildConfig(features=FeatureConfig(backbone=backbone, layers=layers), view=VIEW,
                       coreset=CoresetConfig(fraction=FRACTION), reweight_neighbours=1)


@pytest.fixture(scope="module")
def banks(mobilenet):
    train = images(TRAIN)
    return train, {name: build_bank(train, config("mobilenet_v2", layers), device="cpu", progress=False)
                   for name, layers in (("default", ()), ("fine", ("fine",)))}


def test_fine_taps_the_stride4_stage_on_a_4x_grid_with_the_default_banks_size(banks):
    _, built = banks
    default, fine = built["default"], built["fine"]
    assert default.feature_config.layers == ("features.6", "features.13")
    # stored as the taps themselves (a scorer needs no preset to read it): mobilenet_v2's stride-4 stage ends at
    # features.3 (24 channels, 16 x 16 on a 64 px crop)
    assert fine.feature_config.layers == ("features.3", "features.6", "features.13")
    assert default.info["n_train_patches"] == TRAIN * 8 * 8
    assert fine.info["n_train_patches"] == TRAIN * 16 * 16
    # a quarter of the fraction over 4x the patches: the same number of bank vectors, and the fraction it used
    assert len(fine.features) == len(default.features) == int(TRAIN * 8 * 8 * FRACTION)
    assert fine.coreset.fraction == pytest.approx(FRACTION / 4)
    assert default.coreset.fraction == FRACTION


def test_a_fine_bank_scores_on_its_grid(banks, tmp_path):
    train, built = banks
    save_bank(built["fine"], tmp_path / "fine.bank")
    loaded = load_bank(tmp_path / "fine.bank")
    assert loaded.feature_config == built["fine"].feature_config
    test = images(TRAIN + 2)[TRAIN:]
    scores = PatchCoreScorer(loaded, device="cpu", search="exact").score(test).image_scores
    # independently: the stride-4 taps' patch features of the same crops (an extractor of the named taps), each
    # patch's distance to its nearest bank vector by brute force, the image's largest (Eq. 7 off)
    extractor, _ = build_extractor(FeatureConfig(backbone="mobilenet_v2",
                                                 layers=("features.3", "features.6", "features.13")))
    expected = []
    for patches in extract_patches(extractor, test, VIEW, None, 16, torch.device("cpu")):
        assert patches.shape[0] == 16 * 16
        bank = loaded.features.astype(np.float64)
        squared = (patches.astype(np.float64) ** 2).sum(1)[:, None] + (bank ** 2).sum(1)[None] - 2 * patches @ bank.T
        expected.append(np.sqrt(np.maximum(squared.min(axis=1), 0)).max())
    assert np.allclose(scores, expected, rtol=1e-3)


def test_cli_fine_for_one_backbone_and_for_each_member_of_an_ensemble(tmp_path, mobilenet):
    train = tmp_path / "train"
    train.mkdir()
    for i, image in enumerate(images(TRAIN)):
        cv2.imwrite(str(train / f"{i}.png"), image[:, :, ::-1])
    common = ["--train", str(train), "--resize", "64", "--crop", "64", "--coreset", "0.5", "--no-progress"]
    runner = CliRunner()
    done = runner.invoke(app, ["bank", "build", "--out", str(tmp_path / "e.bank"), "--layers", "fine",
                               "--backbone", "mobilenet_v2+efficientnet_lite0", *common])
    assert done.exit_code == 0, done.output
    members = load_bank(tmp_path / "e.bank").members
    assert [m.feature_config.layers for m in members] == [("features.3", "features.6", "features.13"),
                                                         ("features.3", "features.5", "features.11")]
    assert [m.coreset.fraction for m in members] == [0.125, 0.125]
    refused = runner.invoke(app, ["bank", "build", "--out", str(tmp_path / "x.bank"), "--layers", "features.3",
                                  "--backbone", "mobilenet_v2+efficientnet_lite0", *common])
    assert refused.exit_code != 0 and "tap names are for one backbone" in refused.output
    assert not (tmp_path / "x.bank").exists()
