"""`evaluate` decodes the test set a batch at a time, just before that batch is scored: the report equals the one
from images decoded up front, and no more than the batch being scored is ever decoded (memory holds one batch of
frames, not the whole test set, and no decoding runs inside the timed scoring)."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import scorer.preprocess as preprocess
from scorer import BuildConfig, FeatureConfig, PatchCoreScorer, build_bank
from scorer import evaluate as evaluation
from scorer.preprocess import load_image

from .conftest import bottle_category, needs_bottle


@needs_bottle
def test_eval_decodes_one_batch_at_a_time(tmp_path, monkeypatch):
    # 5 good and 4 broken test images, 8 training images
    category = bottle_category(tmp_path / "bottle", ["000", "001", "002", "003", "004"], ["000", "001", "002", "003"])
    train = sorted((category / "train" / "good").iterdir())
    bank = build_bank(train, BuildConfig(features=FeatureConfig(backbone="mobilenet_v2")), device="cpu",
                      progress=False)
    scorer = PatchCoreScorer(bank, device="cpu")
    samples = evaluation.test_samples(category)
    decoded_up_front = [load_image(s.path) for s in samples]
    reference = evaluation.evaluate(scorer, category, 0.0, batch_size=4, progress=False,
                                    images=decoded_up_front).to_dict()

    decoded, lock = [], threading.Lock()
    real_decode = preprocess.decode_image

    def counting_decode(data: bytes) -> np.ndarray:
        image = real_decode(data)
        with lock:
            decoded.append(image.shape)
        return image

    seen = []  # per score call: (images asked for, images decoded when it began, images decoded when it ended)
    real_score = scorer.score

    def recording_score(images, *args, **kwargs):
        before = len(decoded)
        result = real_score(images, *args, **kwargs)
        seen.append((len(images), before, len(decoded)))
        return result

    monkeypatch.setattr(preprocess, "decode_image", counting_decode)
    monkeypatch.setattr(scorer, "score", recording_score)
    streamed = evaluation.evaluate(scorer, category, 0.0, batch_size=4, progress=False).to_dict()

    assert len(decoded) == len(samples) == 9  # each test image decoded once
    # the warm-up (one image of the first batch), then batches of 4, 4 and 1: at each call exactly the images of the
    # batches handed out so far are decoded, and none is decoded while a batch is scored
    assert seen == [(1, 4, 4), (4, 4, 4), (4, 8, 8), (1, 9, 9)]
    for key in ("image_auroc", "pixel_auroc", "pro", "n_test_images", "map_size", "images", "threshold",
                "false_alarm_rate", "recall"):
        assert streamed[key] == reference[key], key
    assert streamed["n_test_images"] == 9 and streamed["pixel_auroc"] is not None
    assert streamed["images_per_second"] > 0
    broken = [row["score"] for row in streamed["images"] if row["type"] == "broken_large"]
    good = [row["score"] for row in streamed["images"] if row["type"] == "good"]
    assert len(broken) == 4 and min(broken) > max(good)  # the broken bottles score above the good ones


@pytest.mark.parametrize("prefetch", [False, True])
def test_prefetch_decodes_the_next_batch_only_when_on(tmp_path, monkeypatch, prefetch):
    """iter_image_batches: with prefetch the next batch is decoded while the caller holds this one; without, a
    batch is decoded only when the caller asks for it (real PNG files)."""
    import cv2

    from scorer.model import iter_image_batches

    rng = np.random.default_rng(0)
    paths = []
    for i in range(5):
        paths.append(tmp_path / f"{i}.png")
        cv2.imwrite(str(paths[-1]), rng.integers(0, 256, (32, 48, 3), dtype=np.uint8))
    decoded, real_decode = [], preprocess.decode_image
    monkeypatch.setattr(preprocess, "decode_image", lambda data: decoded.append(1) or real_decode(data))
    batches = iter_image_batches(paths, 2, prefetch=prefetch)
    first = next(batches)
    assert [image.shape for image in first] == [(32, 48, 3)] * 2
    time.sleep(0.5)  # time for a prefetch, were one running, to finish
    assert len(decoded) == (4 if prefetch else 2)
    assert [len(batch) for batch in batches] == [2, 1] and len(decoded) == 5


@needs_bottle
def test_eval_of_a_set_without_masks_draws_no_maps_and_scores_the_same(tmp_path, monkeypatch):
    """Good / defective folders and no ground truth: no map is drawn (the scores need only each image's maximum,
    scorer/bounded.py), and the report's scores equal those of the same images evaluated with masks."""
    import shutil

    masked = bottle_category(tmp_path / "masked", ["000", "001", "002"], ["000", "001", "002"])
    bare = bottle_category(tmp_path / "bare", ["000", "001", "002"], ["000", "001", "002"])
    shutil.rmtree(bare / "ground_truth")
    train = sorted((masked / "train" / "good").iterdir())
    scorer = PatchCoreScorer(build_bank(train, BuildConfig(features=FeatureConfig(backbone="mobilenet_v2")),
                                        device="cpu", progress=False), device="cpu")
    reference = evaluation.evaluate(scorer, masked, 0.0, batch_size=4, progress=False).to_dict()
    asked = []
    real_score = scorer.score
    monkeypatch.setattr(scorer, "score", lambda images, **kwargs: asked.append(kwargs) or real_score(images, **kwargs))
    report = evaluation.evaluate(scorer, bare, 0.0, batch_size=4, progress=False).to_dict()
    assert asked and all(kwargs.get("maps") is False and "grids_over" in kwargs for kwargs in asked)
    assert reference["pixel_auroc"] is not None and report["pixel_auroc"] is None and report["pro"] is None
    assert report["defects_without_mask"] == 3 and report["map_size"] == reference["map_size"] == [224, 224]
    assert [row["score"] for row in report["images"]] == [row["score"] for row in reference["images"]]
    for key in ("image_auroc", "threshold", "false_alarm_rate", "recall", "f1_threshold"):
        assert report[key] == reference[key], key
