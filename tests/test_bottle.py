"""Integration on the real MVTec bottle category through the CLI (skipped without ../shared)."""
import json

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from patchcore.cli import app
from scorer.calibration import CalibrationConfig

from .conftest import BOTTLE, needs_bottle

pytestmark = [needs_bottle, pytest.mark.slow]


@pytest.fixture(scope="module")
def bottle_bank(tmp_path_factory):
    out = tmp_path_factory.mktemp("bank") / "bottle.bank"
    result = CliRunner().invoke(app, ["bank", "build", "--train", str(BOTTLE / "train" / "good"), "--out", str(out),
                                      "--backbone", "mobilenet_v2", "--coreset", "0.1", "--no-progress"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["bank_size"] == int(209 * 784 * 0.1)
    assert summary["calibration"]["method"] == "leave-out-gumbel" and len(summary["calibration"]["good_scores"]) == 209
    assert "threshold:" not in result.stderr  # 209 images, a fitting tail: nothing to advise
    return out, summary


def test_eval_reaches_the_official_numbers(bottle_bank, tmp_path):
    bank, summary = bottle_bank
    report_path = tmp_path / "report.json"
    result = CliRunner().invoke(app, ["eval", "--data", str(BOTTLE), "--bank", str(bank), "--json", str(report_path),
                                      "--no-progress"])
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert report["n_test_images"] == 83
    assert report["image_auroc"] >= 0.995
    assert report["pixel_auroc"] >= 0.975
    assert report["pro"] >= 0.93
    # the good-images-only threshold (1 % target false-alarm rate) catches the defects the scores rank
    assert report["view"] == "kind=crop, resize=256, crop=224"
    # the default view, auto, chose the crop: 224^2 of the 256 x 256 its 900 x 900 frames resize to
    assert report["view_choice"] == "auto: the centre crop covers 77% of these 900x900 frames"
    # the CPU default, as it ran: 2 sqrt(16 385) cells
    assert report["search"] == "ivf, dims=128, ivf_lists=256, ivf_probes=16, shortlist=8"
    assert report["false_alarm_rate"] <= 0.05
    assert report["recall"] >= report["recall_at_f1"] - 0.10
    # how the threshold was set, with the interval of its false-alarm rate from 209 good images around the target
    calibration = report["threshold_calibration"]
    assert (calibration["method"], calibration["target_rate"]) == ("leave-out-gumbel", 0.01)
    assert calibration["confidence"] == CalibrationConfig().confidence
    assert calibration["rate_interval"][0] < 0.01 < calibration["rate_interval"][1] < 0.03
    assert report["images_per_second"] > 0
    # per-image scores in the JSON file (not on the terminal): the rates re-derived from them agree
    scores = {row["image"]: (row["type"] != "good", row["score"]) for row in report["images"]}
    assert len(scores) == 83 and "images" not in json.loads(result.output)
    good = np.array([s for bad, s in scores.values() if not bad])
    bad = np.array([s for is_bad, s in scores.values() if is_bad])
    assert report["false_alarm_rate"] == pytest.approx((good >= report["threshold"]).mean())
    assert report["recall"] == pytest.approx((bad >= report["threshold"]).mean())
    assert report["false_alarm_rate_at_f1"] == pytest.approx((good >= report["f1_threshold"]).mean())
    assert set(report["best_recall_at_rate"]) == {"0.01", "0.05"}
    assert report["best_recall_at_rate"]["0.05"] >= report["recall"] or report["false_alarm_rate"] > 0.05


def test_score_command_writes_heatmaps_that_point_at_the_defect(bottle_bank, tmp_path):
    bank, summary = bottle_bank
    defect = BOTTLE / "test" / "broken_large" / "000.png"
    good = BOTTLE / "test" / "good" / "000.png"
    result = CliRunner().invoke(app, ["score", str(bank), str(defect), str(good), "--heatmaps", str(tmp_path)])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.splitlines()]
    assert lines[0]["anomalous"] is True and lines[1]["anomalous"] is False
    picture = cv2.imread(lines[0]["heatmap"])
    # the whole 900 px frame beside its heatmap (over the crop's footprint; outside it dimmed), a header above
    from scorer.overlay import HEADER

    side = (picture.shape[1] - 4) // 2
    assert side >= 512
    heat = picture[HEADER:HEADER + side, side + 4:]
    # red (at or above the threshold) covers most of the ground-truth defect and little else
    mask = cv2.imread(str(BOTTLE / "ground_truth" / "broken_large" / "000_mask.png"), 0)
    mask = cv2.resize(mask, (side, side), interpolation=cv2.INTER_NEAREST) > 0
    red = (heat[..., 2].astype(int) - heat[..., 0].astype(int)) > 100
    assert red[mask].mean() > 0.5
    assert red[~mask].mean() < 0.2
    assert lines[0]["heatmap"] != lines[1]["heatmap"]
