"""The default view, auto (scorer/views.py ViewConfig.resolve): the paper's centre crop where it covers at least
half of the training frames, else the whole frame at the crop's scale; resolved when a bank is built, stored as
the concrete view, said on stderr. On real images: strips of three bottles side by side, a defect in the left
bottle, which the centre crop never sees."""
import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from patchcore.cli import app
from scorer import PatchCoreScorer, load_bank
from scorer.preprocess import load_image
from scorer.views import ViewConfig, ViewError, layout

from .conftest import BOTTLE, needs_bottle

SLOT = 256  # each bottle's side in a strip: a strip is 256 x 768, the crop view's scale already


@pytest.mark.parametrize("height, width, kind, size", [
    (900, 900, "crop", None),  # MVTec: the crop covers 224^2 / 256^2 = 77 %
    (1000, 1500, "crop", None),  # VisA 3:2: 224^2 / (256 x 384) = 51 %
    (240, 320, "crop", None),  # 4:3 (the synthetic line): 224^2 / (256 x 341) = 57 %
    (360, 640, "full", 455),  # 16:9: 224^2 / (256 x 455) = 43 %; the long side at the crop's scale, 640 x 256 / 360
    (1240, 500, "full", 634),  # a tall strip: 31 %; 1240 x 256 / 500 = 634.9, truncated as the crop view's resize
])
def test_auto_keeps_the_crop_where_it_covers_half_the_frame(height, width, kind, size):
    view, reason = ViewConfig().resolve(height, width)
    assert view.kind == kind and reason.startswith("auto: ")
    if size is not None:
        assert view.size == size
        assert "would cover only" in reason


def test_with_a_region_of_interest_auto_asks_how_much_of_the_region_the_crop_holds():
    # 4:3 frames (the crop alone would do: 57 %), the region a band down the left side: the crop (columns 58-282
    # of the 341 px wide resized frame, rows 16-240 of 256) holds 5 of its 12 mask columns and 26 of 30 rows
    left = np.zeros((30, 40), bool)
    left[:, :12] = True
    view, reason = ViewConfig().resolve(240, 320, left)
    assert view.kind == "full" and view.size == 341 and "only 36% of the region of interest" in reason
    centre = np.zeros((30, 40), bool)
    centre[10:20, 15:25] = True
    assert ViewConfig().resolve(240, 320, centre)[0].kind == "crop"


def test_explicit_views_are_kept_and_auto_never_lays_out_a_frame():
    for view in (ViewConfig(kind="crop"), ViewConfig(kind="full", size=512), ViewConfig(kind="tiles")):
        assert view.resolve(360, 640) == (view, "")
    with pytest.raises(ViewError, match="resolved from the training frames"):
        layout(ViewConfig(), 360, 640)


def strip(paths) -> np.ndarray:
    """Three bottle images side by side, each resized to SLOT x SLOT: RGB [256, 768, 3]."""
    return np.concatenate([cv2.resize(load_image(p), (SLOT, SLOT), interpolation=cv2.INTER_AREA) for p in paths], axis=1)


@pytest.fixture(scope="module")
def strips(tmp_path_factory, mobilenet):
    train = sorted((BOTTLE / "train" / "good").glob("*.png"))[:18]
    folder = tmp_path_factory.mktemp("strips")
    (folder / "train").mkdir()
    for i in range(0, len(train), 3):
        cv2.imwrite(str(folder / "train" / f"{i // 3}.png"), strip(train[i:i + 3])[:, :, ::-1])
    good = sorted((BOTTLE / "test" / "good").glob("*.png"))
    broken = sorted((BOTTLE / "test" / "broken_large").glob("*.png"))[0]
    tests = {"good": [strip(good[i:i + 3]) for i in range(0, 9, 3)], "defect left": strip([broken, *good[9:11]])}
    return folder, tests


@needs_bottle
def test_elongated_frames_get_the_whole_frame_and_a_defect_outside_the_centre_is_found(strips):
    folder, tests = strips
    banks, said = {}, {}
    for view in ("auto", "crop"):
        done = CliRunner().invoke(app, ["bank", "build", "--train", str(folder / "train"), "--out",
                                        str(folder / f"{view}.bank"), "--backbone", "mobilenet_v2", "--view", view,
                                        "--no-progress"])
        assert done.exit_code == 0, done.output
        banks[view], said[view] = load_bank(folder / f"{view}.bank"), done.stderr
    # 768 x 256 strips: the crop (224 x 224 of 768 x 256) would cover 26 %; auto takes the whole strip at its size
    assert banks["auto"].view.kind == "full" and banks["auto"].view.size == 3 * SLOT
    assert "view: kind=full, size=768 (auto: the centre crop would cover only 26% of these 768x256 frames" in said["auto"]
    assert banks["crop"].view.kind == "crop" and "view_choice" not in banks["crop"].info and "view:" not in said["crop"]
    assert banks["auto"].info["view_choice"].startswith("auto: the centre crop would cover only 26%")

    assert banks["auto"].info["frame_size"] == [SLOT, 3 * SLOT]
    scored = {}
    for view, bank in banks.items():
        scorer = PatchCoreScorer(bank, device="cpu")
        scorer.warm_up()  # a worker's bank load: the backbone readied for the training frames' input size
        # the crop's 224 x 224; the whole strip's 256 x 768 (already multiples of 32), known from info.frame_size
        assert {size for size, _ in scorer.extractor._sessions} == {(224, 224) if view == "crop" else (SLOT, 3 * SLOT)}
        scored[view] = scorer.score([*tests["good"], tests["defect left"]])
    auto = scored["auto"]
    # the whole strip: the broken bottle on the left scores above every good strip, its map peaks in the left third
    assert auto.image_scores[-1] > 1.2 * auto.image_scores[:-1].max()
    peak = np.unravel_index(np.argmax(auto.maps[-1]), auto.maps[-1].shape)
    assert auto.maps[-1].shape == (SLOT, 3 * SLOT) and peak[1] < SLOT
    # the centre crop sees only the middle bottle (good): the defect strip scores among the good strips
    crop = scored["crop"]
    assert crop.maps[-1].shape == (224, 224)
    assert crop.image_scores[-1] < 1.2 * crop.image_scores[:-1].max()
