"""Bad input to the offline commands gets one clear line and loses nothing: a bank path that cannot be written is
said before the build, not after it, and leaves no temporary file; --heatmaps that cannot be a folder is said
before any scoring; out-of-range counts are refused; `score` prints its lines in input order, unreadable images
included, and says how many failed; `eval` leaves defective images without a mask out of the pixel metrics."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from patchcore.cli import app
from scorer import BankError, bank_from_bytes, save_bank

from .conftest import bottle_category, needs_bottle, synthetic_part


def patchcore(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """The CLI as its own process (eval: its log lines on stderr as an operator sees them)."""
    return subprocess.run([sys.executable, "-m", "patchcore", *args], capture_output=True, text=True, timeout=timeout)


def invoke(*args: str) -> subprocess.CompletedProcess:
    """The CLI in this process (the refusals: no torch import per call); its result shaped as `patchcore`'s."""
    done = CliRunner().invoke(app, list(args))
    if done.exception is not None and not isinstance(done.exception, SystemExit):
        raise done.exception
    return subprocess.CompletedProcess(args, done.exit_code, done.stdout, done.stderr)


def error_lines(done: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return [line for line in done.stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def bank_file(tmp_path_factory, synthetic_bank_bytes) -> Path:
    path = tmp_path_factory.mktemp("bank") / "line.bank"
    path.write_bytes(synthetic_bank_bytes)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = {"good": folder / "good.png", "defect": folder / "defect.png", "broken": folder / "broken.png"}
    cv2.imwrite(str(paths["good"]), synthetic_part(rng))
    cv2.imwrite(str(paths["defect"]), synthetic_part(rng, defect=True))
    paths["broken"].write_bytes(paths["good"].read_bytes()[:200])  # a truncated PNG
    return paths


def test_save_bank_refuses_a_folder_and_leaves_no_temporary_file(tmp_path, synthetic_bank_bytes):
    bank = bank_from_bytes(synthetic_bank_bytes)
    with pytest.raises(BankError, match="is a folder"):
        save_bank(bank, tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(BankError, match="cannot write bank"):
        save_bank(bank, blocker / "x.bank")  # its parent is a file
    target = tmp_path / "out" / "line.bank"
    save_bank(bank, target)
    save_bank(bank, target)  # over an existing bank
    assert bank_from_bytes(target.read_bytes()).features.shape == bank.features.shape
    assert sorted(p.name for p in target.parent.iterdir()) == ["line.bank"]  # no temporary file left
    class Interrupted(BaseException):
        pass

    def interrupted(*_args):
        raise Interrupted()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "replace", interrupted)  # a Ctrl-C between the write and the rename
        with pytest.raises(Interrupted):
            save_bank(bank, target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["line.bank"]
    assert bank_from_bytes(target.read_bytes()).features.shape == bank.features.shape  # unchanged
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # readable as any file the user writes


def test_bank_build_into_a_folder_is_refused_before_the_build(tmp_path):
    out, empty = tmp_path / "banks", tmp_path / "no-images"
    out.mkdir()
    empty.mkdir()  # a build would stop at once on it ("no images"): the refusal must come before
    done = invoke("bank", "build", "--train", str(empty), "--out", str(out), "--backbone", "mobilenet_v2",
                  "--no-progress")
    assert done.returncode == 2 and error_lines(done) == [
        f"error: cannot write bank {out}: it is a folder (give a file name, e.g. {out / 'model.bank'})"]
    assert list(out.iterdir()) == []


def test_score_heatmaps_that_cannot_be_a_folder_is_refused_first(tmp_path, bank_file, images):
    blocker = tmp_path / "heatmaps"
    blocker.write_text("a file")
    done = invoke("score", str(bank_file), str(images["good"]), "--heatmaps", str(blocker))
    assert done.returncode == 2 and len(error_lines(done)) == 1 and "--heatmaps" in error_lines(done)[0]
    assert done.stdout == ""


@pytest.mark.parametrize("option", [("--batch-size", "0"), ("--batch-size", "-1")])
def test_score_refuses_a_batch_size_below_one(bank_file, images, option):
    done = invoke("score", str(bank_file), str(images["good"]), *option)
    assert done.returncode == 2 and "Traceback" not in done.stderr and "batch-size" in done.stderr
    assert done.stdout == ""


def test_bank_build_refuses_neighbours_below_one(tmp_path, images):
    done = invoke("bank", "build", "--train", str(images["good"].parent), "--out", str(tmp_path / "b.bank"),
                  "--backbone", "mobilenet_v2", "--neighbours", "0", "--no-progress")
    assert done.returncode == 2 and "neighbours" in done.stderr and not (tmp_path / "b.bank").exists()


def test_up_refuses_zero_frames():
    done = invoke("up", "--frames", "0")
    assert done.returncode == 2 and "frames" in done.stderr


def test_score_prints_lines_in_input_order_and_says_what_failed(bank_file, images):
    order = [images["good"], images["broken"], images["defect"], images["good"]]
    done = invoke("score", str(bank_file), *map(str, order), "--batch-size", "3")
    assert done.returncode == 1
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["image"] for line in lines] == [str(path) for path in order]
    assert "error" in lines[1] and "score" not in lines[1]
    assert all("score" in lines[i] and "error" not in lines[i] for i in (0, 2, 3))
    assert lines[0]["score"] == lines[3]["score"]  # the same image in another batch
    assert lines[2]["score"] > lines[0]["score"]  # the scratched part
    assert error_lines(done) == [f"error: 1 of 4 images could not be read: {images['broken']}"]


def test_eval_refuses_an_unreadable_test_image(tmp_path, bank_file):
    """A test image that cannot be decoded stops eval with one line naming it (exit 2), and no report is written:
    metrics over the readable images alone would describe another test set."""
    rng = np.random.default_rng(3)
    category = tmp_path / "parts"
    for kind, defect in (("good", False), ("scratch", True)):
        (category / "test" / kind).mkdir(parents=True)
        for i in range(3):
            cv2.imwrite(str(category / "test" / kind / f"{i:03d}.png"), synthetic_part(rng, defect=defect))
    broken = category / "test" / "scratch" / "003.png"
    broken.write_bytes(b"not an image")
    out = tmp_path / "report.json"
    done = invoke("eval", "--data", str(category), "--bank", str(bank_file), "--batch-size", "2", "--no-progress",
                  "--json", str(out))
    assert done.returncode == 2
    assert error_lines(done) == [f"error: a test image cannot be read, so nothing was evaluated: {broken}: "
                                 "not a decodable PNG/JPEG/BMP image"]
    assert not out.exists()
    broken.unlink()  # the same set without it evaluates: the refusal was that image's
    done = invoke("eval", "--data", str(category), "--bank", str(bank_file), "--batch-size", "2", "--no-progress",
                  "--json", str(out))
    assert done.returncode == 0 and json.loads(out.read_text())["n_test_images"] == 6


@needs_bottle
def test_eval_leaves_defects_without_a_mask_out_of_the_pixel_metrics(tmp_path):
    """A copy of a few bottle test images: with every mask, then with one defect's mask deleted. The pixel metrics
    of the second equal those of the first without that image (an independent run on a set that lacks it)."""
    def category(root: Path, defects: list[str]) -> Path:
        return bottle_category(root, ["000", "001", "002"], defects)

    warnings = {}

    def run(root: Path) -> dict:
        out = root / "report.json"
        done = patchcore("eval", "--data", str(root), "--backbone", "mobilenet_v2", "--no-progress",
                         "--json", str(out), timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        warnings[root.name] = [json.loads(line) for line in done.stderr.splitlines()
                               if line.startswith("{") and "without a ground-truth mask" in line]
        return json.loads(out.read_text())

    missing = category(tmp_path / "missing", ["000", "001", "002"])
    (missing / "ground_truth" / "broken_large" / "001_mask.png").unlink()
    without = category(tmp_path / "without", ["000", "002"])
    left_out, reference = run(missing), run(without)
    assert left_out["defects_without_mask"] == 1 and reference["defects_without_mask"] == 0
    assert left_out["pixel_auroc"] == pytest.approx(reference["pixel_auroc"], abs=1e-6)
    assert left_out["pro"] == pytest.approx(reference["pro"], abs=1e-6)
    assert left_out["n_test_images"] == 6 and reference["n_test_images"] == 5  # image metrics keep the image
    assert warnings["without"] == [] and len(warnings["missing"]) == 1  # said once, with the count and the path
    assert warnings["missing"][0]["count"] == 1
    assert warnings["missing"][0]["expected"] == str(missing / "ground_truth" / "broken_large" / "001_mask.png")
