"""Scoring throughput (images/s) on the 83 bottle test images, beside a straightforward baseline.

    .venv/bin/python bench/scoring.py --bank BANK [--category ../shared/datasets/mvtec_bottle]

Baseline: one image at a time, brute-force torch.cdist nearest neighbours, scipy Gaussian on the CPU
(the shape of the reference implementation's scoring loop).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from scipy import ndimage

from scorer import PatchCoreScorer, load_bank
from scorer.evaluate import test_samples
from scorer.model import iter_image_batches
from scorer.preprocess import preprocess


def baseline(scorer: PatchCoreScorer, images) -> float:
    bank = torch.from_numpy(scorer.bank.features)
    started = time.perf_counter()
    for image in images:
        batch = preprocess([image], scorer.view.resize, scorer.view.crop)  # the crop view
        features, grid = scorer.extractor(batch)
        distances = torch.cdist(features[0], bank).min(dim=1).values
        up = F.interpolate(distances.reshape(1, 1, *grid), size=(224, 224), mode="bilinear", align_corners=False)
        ndimage.gaussian_filter(up[0, 0].numpy(), sigma=4)
        float(distances.max())
    return len(images) / (time.perf_counter() - started)


def throughput(scorer: PatchCoreScorer, images, batch: int) -> float:
    scorer.score(images[:batch])  # warm-up
    started = time.perf_counter()
    for begin in range(0, len(images), batch):
        scorer.score(images[begin:begin + batch])
    return len(images) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bank", required=True)
    parser.add_argument("--category", default=str(Path(__file__).resolve().parents[2] / "shared/datasets/mvtec_bottle"))
    args = parser.parse_args()
    bank = load_bank(args.bank)
    images = [img for b in iter_image_batches([s.path for s in test_samples(args.category)], 16) for img in b]
    print(f"bank {len(bank.features)} x {bank.features.shape[1]} ({bank.feature_config.backbone}), "
          f"{len(images)} images, torch threads {torch.get_num_threads()}")
    for kind in ("faiss-cpu", "torch"):
        scorer = PatchCoreScorer(bank, device="cpu", index=kind)
        for batch in (1, 2, 16):
            print(f"  {kind:9s} batch {batch:2d}: {throughput(scorer, images, batch):6.2f} images/s (with maps)")
    print(f"  baseline (per image, cdist, scipy map): {baseline(PatchCoreScorer(bank, device='cpu'), images):6.2f} images/s")


if __name__ == "__main__":
    main()
