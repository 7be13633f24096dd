"""Anomaly-map variants on one bank: which smoothing localises best (pixel AUROC, PRO).

    .venv/bin/python bench/maps.py --bank BANK [--data DIR] [--category mvtec_bottle]

The test images are scored once; each variant then turns the same patch scores into maps
(image scores do not change). Variants: distances or squared distances (the official
implementation smooths faiss's squared L2), and the Gaussian's border, scipy's "mirror"
(torchvision's reflect padding) or "reflect" (scipy.ndimage.gaussian_filter's default, the
official one). squared + reflect is the official behaviour, checked against scipy itself.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from scorer import PatchCoreScorer, load_bank
from scorer.evaluate import load_masks, test_samples
from scorer.metrics import pixel_auroc, pro_score
from scorer.scoring import anomaly_maps

from datadir import add_data_argument, category  # bench/datadir.py
from results import write_result  # bench/results.py


def official_maps(patch: np.ndarray, size: int, sigma: float) -> np.ndarray:
    """The official code's RescaleSegmentor: squared scores, torch bilinear upsampling, scipy gaussian_filter."""
    up = F.interpolate(torch.from_numpy(patch[:, None] ** 2), size=(size, size), mode="bilinear", align_corners=False)
    return np.stack([ndimage.gaussian_filter(m, sigma=sigma) for m in up[:, 0].numpy()])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bank", required=True)
    add_data_argument(parser)
    parser.add_argument("--category", default="mvtec_bottle", help="a data set folder, or its name under --data")
    args = parser.parse_args()
    args.category = str(category(args.category, args.data))
    samples = test_samples(args.category)
    scorer = PatchCoreScorer(load_bank(args.bank), device="cpu")
    if scorer.view.kind != "crop":
        raise SystemExit(f"bench/maps.py compares the crop view's maps; this bank's view is {scorer.view.describe()}")
    patch = np.stack(scorer.score_paths([s.path for s in samples], maps=False).patch_scores)[:, 0]  # [N, h, w]
    shapes = [cv2.imread(str(s.path), cv2.IMREAD_UNCHANGED).shape[:2] for s in samples]
    masks = load_masks(samples, shapes, scorer.view)
    size = scorer.view.crop
    grid = patch.shape[1:]
    print(f"{Path(args.category).name}: {len(samples)} test images, grid {grid}, backbone {scorer.config.backbone}")
    official = official_maps(patch, size, 4.0)
    flat = torch.from_numpy(patch.reshape(len(patch), -1))
    row = {"data": Path(args.category).name}  # one row of docs/scorer.md's maps table
    for squared, border in ((False, "mirror"), (False, "reflect"), (True, "mirror"), (True, "reflect")):
        started = time.perf_counter()
        maps = anomaly_maps(flat.square() if squared else flat, grid, size, border=border).numpy()
        seconds = time.perf_counter() - started
        check = (f"; max |map - official| / max official {np.abs(maps - official).max() / official.max():.1e}"
                 if squared else "")
        print(f"squared={squared!s:5} border={border:7}: pixel AUROC {pixel_auroc(masks, maps):.5f}, "
              f"PRO {pro_score(masks, maps):.5f}  ({seconds:.2f} s for the maps{check})")
        variant = f"{'squared' if squared else 'distances'}_{border}"
        row[f"{variant}_pixel_auroc"] = round(float(pixel_auroc(masks, maps)), 5)
        row[f"{variant}_pro"] = round(float(pro_score(masks, maps)), 5)
    write_result(f"maps-{row['data']}", {"backbone": scorer.config.backbone, "test_images": len(samples),
                                          "rows": [row]})


if __name__ == "__main__":
    main()
