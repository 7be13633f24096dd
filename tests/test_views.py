"""Views (crop, full, tiles), the region of interest, and view checks - against independent computations."""
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from scorer import BankError, BuildConfig, CoresetConfig, FeatureConfig, PatchCoreScorer, build_bank
from scorer.calibration import CalibrationConfig
from scorer.preprocess import IMAGENET_MEAN, IMAGENET_STD, load_image, upload
from scorer.views import (ViewConfig, ViewError, frame_mask, frame_windows, inspected_box, layout, patch_canvas, stitch,
                          windows)

from .conftest import BOTTLE, needs_bottle


def textured(rng, height, width):
    """A smooth grey texture with noise: every patch looks like every other."""
    base = np.full((height, width, 3), 120, np.float64)
    base += 20 * np.sin(np.arange(width) / 7.0)[None, :, None]
    return np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)


def config(view, folds=0):
    return BuildConfig(features=FeatureConfig(backbone="mobilenet_v2"), view=view,
                       coreset=CoresetConfig(fraction=0.25), calibration=CalibrationConfig(folds=folds))


@pytest.fixture(scope="module")
def good_images():
    rng = np.random.default_rng(0)
    return [textured(rng, 192, 320) for _ in range(6)]


def test_layouts_cover_the_frame():
    crop = layout(ViewConfig("crop"), 900, 900)
    assert crop.work == (224, 224) and crop.resized == (256, 256) and crop.offset == (16, 16)
    full = layout(ViewConfig("full", size=320), 1000, 1500)
    assert full.work == (213, 320) and full.window == (224, 320) and full.origins == ((0, 0),)
    tiles = layout(ViewConfig("tiles", scale=0.5, tile=224, overlap=0.25), 1000, 1500)
    assert tiles.work == (500, 750)
    ys = sorted({y for y, _ in tiles.origins})
    xs = sorted({x for _, x in tiles.origins})
    assert ys[0] == 0 and ys[-1] == 500 - 224 and xs[0] == 0 and xs[-1] == 750 - 224
    assert all(b - a <= 168 for a, b in zip(xs, xs[1:]))  # stride tile * (1 - overlap): no gap
    with pytest.raises(ViewError, match="tiles"):
        layout(ViewConfig("tiles", scale=2.0, tile=64), 8192, 8192)
    with pytest.raises(ViewError):
        ViewConfig("fisheye")


def test_frame_mask_and_region_follow_the_view():
    mask = np.zeros((1000, 1500), np.uint8)
    mask[900:1000, 0:100] = 255  # a corner the centre crop never sees
    assert frame_mask(mask, ViewConfig("crop")).sum() == 0
    full = frame_mask(mask, ViewConfig("full", size=300))
    assert full.shape == (200, 300) and full[180:, :20].all() and full.sum() == 20 * 20
    assert inspected_box(1000, 1500, ViewConfig("full")) == (0, 0, 1000, 1500)
    y0, x0, y1, x1 = inspected_box(1000, 1500, ViewConfig("crop"))
    assert abs((y1 - y0) - 875) <= 1 and abs((x1 - x0) - 875) <= 1  # 224/256 of the short side, rounded
    assert abs((y0 + y1) / 2 - 500) <= 1 and abs((x0 + x1) / 2 - 750) <= 1  # centred


def test_full_and_tiles_find_a_defect_the_centre_crop_cannot_see(mobilenet, good_images):
    defect = good_images[0].copy()
    defect[150:180, 270:310] = (250, 30, 30)  # bottom-right corner, outside the centre square
    scores = {}
    for view in (ViewConfig("crop"), ViewConfig("full", size=320), ViewConfig("tiles", scale=1.0, tile=128)):
        bank = build_bank(good_images[1:], config(view), device="cpu", progress=False)
        scorer = PatchCoreScorer(bank, device="cpu")
        result = scorer.score([good_images[0], defect])
        scores[view.kind] = result.image_scores
        if view.kind != "crop":
            heat = result.maps[1]
            assert heat.shape == (192, 320)  # frame coordinates (scale 1 here)
            y, x = np.unravel_index(np.argmax(heat), heat.shape)
            assert 140 <= y <= 192 and 255 <= x <= 320, (view.kind, y, x)
    assert scores["crop"][1] < 1.2 * scores["crop"][0]  # out of sight
    for kind in ("full", "tiles"):
        assert scores[kind][1] > 2 * scores[kind][0], (kind, scores[kind])


def test_stitched_tiles_equal_each_tile_scored_on_its_own(mobilenet, good_images):
    """Independent computation: each tile cut out and scored as a whole image (full view at its own size)."""
    tiles_view = ViewConfig("tiles", scale=1.0, tile=128, overlap=0.25)
    bank = build_bank(good_images[1:], config(tiles_view), device="cpu", progress=False)
    frame = good_images[0].copy()
    frame[20:40, 20:60] = 255
    tiled = PatchCoreScorer(bank, device="cpu", reweight_neighbours=1).score([frame])
    lay = tiled.layouts[0]
    full_bank = type(bank)(bank.features, bank.feature_config, bank.coreset, None, 1, {}, ViewConfig("full", size=128))
    alone = PatchCoreScorer(full_bank, device="cpu")
    cut = [frame[y:y + 128, x:x + 128] for y, x in lay.origins]
    each = alone.score(cut, maps=False)
    # image score: the highest tile
    assert tiled.image_scores[0] == pytest.approx(each.image_scores.max(), rel=1e-5)
    # map: per pixel the maximum over the tiles covering it, each tile's grid upsampled on its own
    expected = np.full(lay.work, -np.inf, np.float32)
    for (y, x), grid in zip(lay.origins, each.patch_scores):
        up = F.interpolate(torch.from_numpy(grid[None]), size=(128, 128), mode="bilinear", align_corners=False)[0, 0]
        expected[y:y + 128, x:x + 128] = np.maximum(expected[y:y + 128, x:x + 128], up.numpy())
    got = stitch(torch.from_numpy(tiled.patch_scores[0][None]), lay)[0].numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    small = patch_canvas(tiled.patch_scores[0], lay)
    assert small.shape == (192 // 8, 320 // 8) and small.max() == pytest.approx(tiled.patch_scores[0].max())


def test_region_of_interest_ignores_what_lies_outside(mobilenet, good_images):
    roi = np.ones((192, 320), bool)
    roi[:, 200:] = False  # e.g. the conveyor on the right
    view = ViewConfig("full", size=320)
    bank = build_bank(good_images[1:], config(view), device="cpu", progress=False, roi=roi)
    scorer = PatchCoreScorer(bank, device="cpu")
    outside, inside = good_images[0].copy(), good_images[0].copy()
    outside[80:110, 250:290] = (250, 30, 30)
    inside[80:110, 100:140] = (250, 30, 30)
    result = scorer.score([good_images[0], outside, inside])
    assert result.image_scores[1] == pytest.approx(result.image_scores[0], rel=0.15)
    assert result.image_scores[2] > 2 * result.image_scores[0]
    assert np.all(result.patch_scores[1][0][:, 26:] == 0)  # patches right of x=208 are not inspected


def test_a_scorer_refuses_a_bank_of_another_view(mobilenet, good_images):
    bank = build_bank(good_images[:3], config(ViewConfig("full", size=256)), device="cpu", progress=False)
    PatchCoreScorer(bank, device="cpu", view=ViewConfig("full", size=256))  # the same view: fine
    with pytest.raises(BankError, match="view"):
        PatchCoreScorer(bank, device="cpu", view=ViewConfig("crop"))
    with pytest.raises(BankError, match="view"):
        PatchCoreScorer(bank, device="cpu", view=ViewConfig("full", size=320))


@pytest.mark.parametrize("view", [ViewConfig("crop"), ViewConfig("full", size=256),
                                  ViewConfig("tiles", scale=0.5, tile=128)])
def test_frames_of_any_size_and_aspect_score_in_every_view(mobilenet, good_images, view):
    bank = build_bank(good_images[:3], config(view), device="cpu", progress=False)
    scorer = PatchCoreScorer(bank, device="cpu")
    rng = np.random.default_rng(1)
    frames = [textured(rng, h, w) for h, w in [(1, 1), (7, 100), (100, 7), (16, 256), (480, 640), (64, 1024)]]
    result = scorer.score(frames)
    assert np.all(np.isfinite(result.image_scores)) and np.all(result.image_scores >= 0)
    for frame, heat in zip(frames, result.maps):
        assert heat.shape == layout(view, *frame.shape[:2]).work
    # batch companions do not change a frame's score
    alone = [scorer.score([f]).image_scores[0] for f in frames[:3]]
    np.testing.assert_allclose(alone, result.image_scores[:3], rtol=1e-4)


@needs_bottle
@pytest.mark.parametrize("view", [ViewConfig("crop"), ViewConfig("full", size=320),
                                  ViewConfig("tiles", scale=0.4, tile=224, overlap=0.25)], ids=lambda v: v.kind)
def test_frame_by_frame_windows_equal_the_stacked_batch(view):
    """On the CPU frame_windows resizes each array from its own memory (no stacked copy of the full-resolution
    batch): the windows must equal those of the stacked batch to the bit, for arrays of any memory layout."""
    images = [load_image(p) for p in sorted((BOTTLE / "test" / "broken_large").glob("*.png"))[:4]]
    flipped = np.ascontiguousarray(images[1][:, :, ::-1])[:, :, ::-1]  # RGB again, through negative strides
    framed = np.zeros((images[2].shape[0] + 10, images[2].shape[1] + 14, 3), np.uint8)
    framed[5:-5, 7:-7] = images[2]
    read_only = images[3].copy()
    read_only.flags.writeable = False  # as np.asarray of a PIL image
    # contiguous, negative strides, a view into a larger frame, read-only
    inputs = [images[0], flipped, framed[5:-5, 7:-7], read_only]
    assert not flipped.flags.c_contiguous and not inputs[2].flags.c_contiguous
    lay = layout(view, *images[0].shape[:2])
    stacked = windows(upload(images, "cpu"), view, lay, IMAGENET_MEAN, IMAGENET_STD)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "not writable" warning would fail the test
        framewise = frame_windows(inputs, view, lay, IMAGENET_MEAN, IMAGENET_STD, "cpu")
    assert framewise.shape == stacked.shape and framewise.shape[0] == 4 * len(lay.origins)
    assert torch.equal(framewise, stacked)
