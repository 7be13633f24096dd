"""Per-position normalisation (--position-norm, scorer/position.py): statistics against a brute-force numpy
leave-one-out, scores against numpy's normalisation of the plain scorer's distances, the bank round trip and the
refusals (an older build, another layout, ensembles, updates), and `patchcore eval`'s JSON."""
import json
from dataclasses import replace

import cv2
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import scorer.bank
from scorer import BankError, BuildConfig, PatchCoreScorer, bank_from_bytes, bank_to_bytes, build_bank, load_bank, save_bank
from scorer.bank import POSITION_FORMAT_VERSION, EnsembleBank
from scorer.calibration import CalibrationConfig
from scorer.config import CoresetConfig, FeatureConfig
from scorer.model import build_extractor, extract_patches, update_bank
from scorer.position import SCALE_FLOOR, PositionError
from scorer.preprocess import load_image
from scorer.views import ViewConfig, ViewError

from .conftest import BOTTLE, synthetic_part

VIEW = ViewConfig(kind="crop", resize=64, crop=64)  # 8 x 8 patches: a brute force over every patch stays small


def images(count: int, seed: int = 0) -> list[np.ndarray]:
    """Real bottle training images where the shared data is present, else synthetic parts."""
    if BOTTLE.is_dir():
        paths = sorted((BOTTLE / "train" / "good").glob("*.png"))[seed * count:(seed + 1) * count]
        return [load_image(p) for p in paths]
    rng = np.random.default_rng(seed)
    return [synthetic_part(rng, 96) for _ in range(count)]


def config(**build) -> BuildConfig:
    """Mobilenet_v2, every patch in the bank (coreset fraction 1: a leave-one-out coreset is exactly the other
    images' patches), plain max (Eq. 7 off), per-position statistics on."""
    return BuildConfig(features=FeatureConfig(backbone="mobilenet_v2"), view=VIEW, coreset=CoresetConfig(fraction=1.0),
                       reweight_neighbours=1, position_norm=True, **build)


@pytest.fixture(scope="module")
def trained(mobilenet):
    train = images(6)
    return train, build_bank(train, config(), device="cpu", progress=False)


def held_out_distances(train: list[np.ndarray]) -> np.ndarray:
    """[N, L]: each image's patches' distance to the nearest patch of any other image, by brute force in numpy."""
    extractor, _ = build_extractor(FeatureConfig(backbone="mobilenet_v2"))
    patches = [p.astype(np.float64) for p in extract_patches(extractor, train, VIEW, None, 16, torch.device("cpu"))]
    out = []
    for i, mine in enumerate(patches):
        others = np.concatenate([p for j, p in enumerate(patches) if j != i])
        squared = (mine ** 2).sum(1)[:, None] + (others ** 2).sum(1)[None] - 2 * mine @ others.T
        out.append(np.sqrt(np.maximum(squared.min(axis=1), 0)))
    return np.array(out)


def test_statistics_and_good_scores_equal_a_numpy_leave_one_out(trained):
    train, bank = trained
    d = held_out_distances(train)  # [6, 64]
    std = d.std(axis=0)
    least = SCALE_FLOOR * np.median(std)
    np.testing.assert_allclose(bank.position.mean.reshape(-1), d.mean(axis=0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(bank.position.scale.reshape(-1), np.maximum(std, least), rtol=1e-4, atol=1e-4)
    assert bank.position.grid == (1, 8, 8) and bank.position.window == (64, 64) and bank.position.images == 6
    # good scores: each image normalised by the other five images' statistics, its highest z
    expected = []
    for i in range(len(d)):
        rest = np.delete(d, i, axis=0)
        expected.append(((d[i] - rest.mean(axis=0)) / np.maximum(rest.std(axis=0), least)).max())
    np.testing.assert_allclose(bank.calibration.good_scores, expected, rtol=1e-4, atol=1e-4)
    assert bank.calibration.method == "leave-out-gumbel"


def test_scores_equal_numpy_normalisation_of_the_plain_distances(trained):
    _, bank = trained
    test = images(3, seed=1)
    plain = PatchCoreScorer(replace(bank, position=None, calibration=None), device="cpu", search="exact").score(test)
    normed = PatchCoreScorer(bank, device="cpu", search="exact").score(test)
    mean, scale = bank.position.mean.astype(np.float64), bank.position.scale.astype(np.float64)
    for raw, z, score in zip(plain.patch_scores, normed.patch_scores, normed.image_scores):
        expected = (raw.astype(np.float64) - mean) / scale  # [1, 8, 8]
        np.testing.assert_allclose(z, expected, rtol=1e-4, atol=1e-4)
        assert np.isclose(score, expected.max(), rtol=1e-4, atol=1e-4)
    assert not np.allclose(normed.image_scores, plain.image_scores)  # the option changes the scores
    # the maps are the z maps: the same smoothing of the normalised patch scores
    assert np.isclose(normed.maps[0].max(), PatchCoreScorer._maps(
        torch.from_numpy(normed.patch_scores[0][None]), normed.layouts[0])[0].max().item(), rtol=1e-5)


def test_round_trip_and_an_older_build_refuses(trained, tmp_path, monkeypatch):
    _, bank = trained
    save_bank(bank, tmp_path / "p.bank")
    loaded = load_bank(tmp_path / "p.bank")
    np.testing.assert_array_equal(loaded.position.mean, bank.position.mean)
    np.testing.assert_array_equal(loaded.position.scale, bank.position.scale)
    assert loaded.position.settings() == bank.position.settings()
    assert loaded.calibration == bank.calibration
    data = bank_to_bytes(bank)
    settings = json.loads(json.loads(data[8:8 + int.from_bytes(data[:8], "little")])["__metadata__"]["settings"])
    assert settings["format_version"] == POSITION_FORMAT_VERSION and settings["position_norm"]["grid"] == [1, 8, 8]
    # a bank without the option stays the version every earlier build reads
    plain = bank_to_bytes(replace(bank, position=None))
    assert json.loads(json.loads(plain[8:8 + int.from_bytes(plain[:8], "little")])["__metadata__"]["settings"]
                      )["format_version"] == 2
    # a build that does not know the option reads versions 1-3 only: it refuses the bank instead of scoring raw
    # distances against a threshold in z units
    monkeypatch.setattr(scorer.bank, "READABLE_VERSIONS", (1, 2, 3))
    with pytest.raises(BankError):
        bank_from_bytes(data)


def forged(bank, edit) -> bytes:
    """The bank's bytes with its settings edited by `edit(settings)` and the checksum recomputed (a build that
    writes something else), tensors as given by the returned dict."""
    from safetensors.numpy import save as st_save

    settings = bank.metadata()
    tensors = {"features": bank.features, "position.mean": bank.position.mean, "position.scale": bank.position.scale}
    tensors = edit(settings, tensors)
    text = json.dumps(settings, sort_keys=True)
    return st_save(tensors, metadata={"settings": text, "sha256": scorer.bank._checksum(tensors, text)})


def test_inconsistent_position_banks_are_refused(trained):
    _, bank = trained

    def drop_tensors(settings, tensors):
        return {"features": tensors["features"]}

    def as_version_2(settings, tensors):
        settings["format_version"] = 2
        return tensors

    def other_grid(settings, tensors):
        settings["position_norm"]["grid"] = [1, 4, 16]
        return tensors

    def unknown_key(settings, tensors):
        settings["position_norm"]["quantile"] = 0.99
        return tensors

    def zero_scale(settings, tensors):
        return {**tensors, "position.scale": np.zeros_like(tensors["position.scale"])}

    assert load_ok(forged(bank, lambda s, t: t))
    for edit in (drop_tensors, as_version_2, other_grid, unknown_key, zero_scale):
        with pytest.raises(BankError):
            bank_from_bytes(forged(bank, edit))


def load_ok(data: bytes) -> bool:
    return bank_from_bytes(data).position is not None


def test_frames_of_another_layout_and_unsupported_uses_are_refused(mobilenet):
    full = build_bank(images(5), replace(config(), view=ViewConfig(kind="full", size=64)), device="cpu", progress=False)
    scorer_ = PatchCoreScorer(full, device="cpu")
    height, width = images(1)[0].shape[:2]
    assert scorer_.refusal(height, width) is None
    assert scorer_.refusal(height, 2 * width) is not None  # another aspect: other windows
    with pytest.raises(ViewError):
        scorer_.score([np.zeros((height, 2 * width, 3), np.uint8)])
    with pytest.raises(BankError):
        scorer_.score_patches([np.zeros((4, full.features.shape[1]), np.float32)])
    with pytest.raises(BankError):
        update_bank(full, images(2, seed=2), device="cpu")
    with pytest.raises(BankError):  # an ensemble's members normalise by image-score statistics only
        EnsembleBank((full, replace(full, feature_config=replace(full.feature_config, backbone="efficientnet_lite0"))),
                     "mean", ((0.0, 1.0), (0.0, 1.0)))
    with pytest.raises(ValueError):
        build_bank(images(3), replace(config(), features=FeatureConfig(backbone="mobilenet_v2+efficientnet_lite0")),
                   device="cpu", progress=False)
    with pytest.raises(ValueError):
        replace(config(), calibration=CalibrationConfig(method="kfold"))
    with pytest.raises(PositionError):  # statistics of fewer than 3 images mean nothing
        build_bank(images(2), config(), device="cpu", progress=False)


def test_eval_json_records_the_option(mobilenet, tmp_path):
    from patchcore.cli import app

    rng = np.random.default_rng(3)
    for folder, count, defect in (("train/good", 5, False), ("test/good", 2, False), ("test/bad", 2, True)):
        (tmp_path / folder).mkdir(parents=True)
        for i in range(count):
            cv2.imwrite(str(tmp_path / folder / f"{i:03d}.png"), synthetic_part(rng, 96, defect)[:, :, ::-1])
    (tmp_path / "ground_truth/bad").mkdir(parents=True)
    for i in range(2):
        mask = np.zeros((96, 96), np.uint8)
        mask[40:56, 40:70] = 255
        cv2.imwrite(str(tmp_path / "ground_truth/bad" / f"{i:03d}_mask.png"), mask)
    report = tmp_path / "report.json"
    args = ["eval", "--data", str(tmp_path), "--backbone", "mobilenet_v2", "--resize", "64", "--crop", "64",
            "--coreset", "0.5", "--json", str(report), "--no-progress"]
    result = CliRunner().invoke(app, args + ["--position-norm"])
    assert result.exit_code == 0, result.output
    recorded = json.loads(report.read_text())
    assert recorded["position_norm"]["grid"] == [1, 8, 8] and recorded["position_norm"]["images"] == 5
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["position_norm"] is None
