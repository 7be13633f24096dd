"""Bank updates from the line: dismiss a false alarm, update the bank without a rebuild, it stops alarming."""
import json

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from runtime.connection import connect
from contracts.keys import Keys
from workers.banks.registry import BankRegistry
from ingest.camera import CameraIngest, IngestSettings
from ingest.sources import FolderSource, SyntheticLine
from patchcore.cli import app
from scorer import BuildConfig, CalibrationConfig, CoresetConfig, FeatureConfig, PatchCoreScorer, ViewConfig
from scorer import build_bank, update_bank
from scorer.coreset import coverage_radius, random_projection

from .test_pipeline import Running, results, wait_for

KEYS = Keys()


def labelled(line: SyntheticLine, seq: int) -> np.ndarray:
    """A good part carrying a new, harmless blue label: a false alarm until the bank has seen it (BGR)."""
    frame = line.render(seq, defect=False)
    cv2.rectangle(frame, (150, 100), (185, 122), (200, 120, 30), -1)
    return frame


def send(url, camera, images, folder):
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        cv2.imwrite(str(folder / f"{i:03d}.png"), image)
    CameraIngest(connect(url), FolderSource(folder), IngestSettings(camera=camera, maxlen=1000), KEYS).run()


def test_a_dismissed_false_alarm_no_longer_alarms_after_the_update(redis_server, synthetic_bank_bytes, tmp_path):
    client = connect(redis_server.url)
    BankRegistry(client, KEYS).publish("default", synthetic_bank_bytes, activate=True)
    line = SyntheticLine(seed=5)
    runner = CliRunner()
    url = ["--redis-url", redis_server.url]
    with Running(redis_server.url) as running:
        send(redis_server.url, "cam-1", [labelled(line, 1)], tmp_path / "first")
        wait_for(lambda: running.store.report.results == 1)
        first = results(client, "cam-1")[0]
        assert first.anomalous and first.bank_version == 1  # the label is new to the bank: a false alarm
        out = runner.invoke(app, ["alarm", "dismiss", "cam-1", str(first.seq), *url])
        assert out.exit_code == 0, out.output
        assert json.loads(out.output)["queued_for_bank"] == "default"
        out = runner.invoke(app, ["bank", "update", "default", *url])
        assert out.exit_code == 0, out.output
        report = json.loads(out.output)
        assert report["version"] == 2 and report["active"] and report["images"] == 1 and report["added_features"] > 0
        assert client.xlen(KEYS.bank_updates("default")) == 0  # the queue was consumed
        audited = [json.loads(line) for line in runner.invoke(app, ["audit", "--json", *url]).output.splitlines()]
        assert [e["action"] for e in audited] == ["bank.publish", "bank.activate", "alarm.dismiss", "bank.publish",
                                                  "bank.activate", "bank.update"]
        update = audited[-1]  # what changed, with the thresholds before and after
        assert update["before"]["version"] == 1 and update["after"]["version"] == 2
        assert update["after"]["added_images"] == 1 and update["after"]["threshold"] == pytest.approx(report["threshold"])
        # the same label on another part of the line, and a real defect, after the update
        send(redis_server.url, "cam-2", [labelled(line, 9), line.render(13, defect=True)], tmp_path / "second")
        wait_for(lambda: running.store.report.results == 3)
    after = {r.seq: r for r in results(client, "cam-2")}
    assert all(r.bank_version == 2 for r in after.values())
    assert not after[0].anomalous, (after[0].score, after[0].threshold)
    assert after[1].anomalous, (after[1].score, after[1].threshold)
    # a frame that is not kept (it was never anomalous) cannot be dismissed: a clear error, nothing queued
    out = runner.invoke(app, ["alarm", "dismiss", "cam-2", "0", *url])
    assert out.exit_code == 2 and "no stored frame" in out.output


def test_an_update_covers_the_new_patches_like_a_rebuild_at_a_fraction_of_the_cost(mobilenet):
    from .conftest import synthetic_part

    rng = np.random.default_rng(2)
    old = [synthetic_part(rng, 128) for _ in range(8)]
    new = [cv2.rectangle(synthetic_part(rng, 128), (50, 50), (80, 70), (40, 120, 220), -1) for _ in range(2)]
    config = BuildConfig(features=FeatureConfig(backbone="mobilenet_v2"), view=ViewConfig("full", size=128),
                         coreset=CoresetConfig(fraction=0.1), calibration=CalibrationConfig(folds=4))
    bank = build_bank(old, config, device="cpu", progress=False)
    updated = update_bank(bank, new, device="cpu")
    rebuilt = build_bank(old + new, config, device="cpu", progress=False)
    assert len(bank.features) < len(updated.features) <= len(bank.features) + int(len(new) * 256 * 0.1)
    np.testing.assert_array_equal(updated.features[:len(bank.features)], bank.features)  # old bank kept as is
    # coverage radius over all patches (old + new), in the coreset's projected space
    scorer = PatchCoreScorer(bank, device="cpu")
    from scorer.model import extract_patches

    patches = np.concatenate(list(extract_patches(scorer.extractor, old + new, bank.view, None, 8, scorer.device)))
    seed, dim = config.coreset.seed, config.coreset.projection_dim
    points = random_projection(patches, dim, seed)

    def radius(b):
        return coverage_radius(np.concatenate([points, random_projection(b.features, dim, seed)]),
                               np.arange(len(points), len(points) + len(b.features)))

    assert radius(updated) <= 1.05 * max(radius(rebuilt), bank.info["coverage_radius"])
    assert radius(updated) < 0.8 * radius(bank)  # the new label's patches were far from the old bank
    # the new images now score like good ones; the threshold was refitted with their scores
    assert PatchCoreScorer(updated, device="cpu").score(new, maps=False).image_scores.max() < updated.calibration.threshold
    assert len(updated.calibration.good_scores) == len(old) + len(new)
    # nothing new: nothing added
    same = update_bank(bank, old[:2], device="cpu")
    assert len(same.features) == len(bank.features)
