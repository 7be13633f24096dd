"""The bounded image score (scorer/bounded.py) against the full search of every patch, on real test sets: the
scorer's own time for what the worker asks of it (scores of a batch, patch distances of the frames at or over the
bank's threshold), both ways, alternated over --rounds; whether the scores are equal; how many patches got the
full search; how far the completed frames' patch distances are from the full search's. Then the same timing with
the threshold moved so that a given share of the images is flagged (--shares): the completions cost more than the
bounded search saves when most frames are flagged. Decoding is done before the timing. Prints a row per set and
share and writes bench/results/bounded.json.

    .venv/bin/python bench/bounded.py --bank BANK --category DIR [--bank BANK --category DIR ...]
        [--rounds 3] [--batch 8] [--every 1]   # --every N: every Nth test image
        [--shares 0 0.25 0.5 0.75 1]   # flagged shares of the sweep

The banks are any crop banks whose search is the CPU's default (ivf), e.g. those of bench/eval_speed.py.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from results import write_result  # bench/results.py
from scorer import bounded, load_bank
from scorer.index import BOUND_DIMS
from scorer.model import PatchCoreScorer
from scorer.preprocess import load_image
from scorer.views import layout

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}


def test_images(category: Path, every: int) -> list[Path]:
    """The category's test images (MVTec / VisA layout: test/<kind>/*), sorted, every `every`th."""
    paths = sorted(p for p in (category / "test").glob("*/*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise SystemExit(f"no test images under {category / 'test'}")
    return paths[::every]


def timed(fn) -> tuple[float, object]:
    started = time.perf_counter()
    out = fn()
    return time.perf_counter() - started, out


def measure(bank_path: Path, category: Path, rounds: int, batch: int, every: int, shares: list[float]) -> dict:
    scorer = PatchCoreScorer(load_bank(bank_path))
    if not bounded.supports(scorer.index):
        raise SystemExit(f"{bank_path}: its search here is {scorer.index.search_config.method}, not ivf")
    images = [load_image(path) for path in test_images(category, every)]
    batches = [images[i:i + batch] for i in range(0, len(images), batch)]

    def full():
        return [scorer.score(b, maps=False) for b in batches]

    def bounded_pass(threshold: float):
        return [scorer.score(b, maps=False, grids_over=np.full(len(b), threshold)) for b in batches]

    full(), bounded_pass(scorer.threshold)  # graphs made, memory touched
    full_s, bounded_s = [], []
    for _ in range(rounds):
        seconds, reference = timed(full)
        full_s.append(seconds)
        seconds, found = timed(lambda: bounded_pass(scorer.threshold))
        bounded_s.append(seconds)
    ref_scores = np.concatenate([r.image_scores for r in reference])
    scores = np.concatenate([r.image_scores for r in found])
    ref_grids = [g for r in reference for g in r.patch_scores]
    grids = [g for r in found for g in r.patch_scores]
    completed = [i for i, g in enumerate(grids) if g is not None]
    differing = sum(int((np.abs(grids[i] - ref_grids[i]) > 1e-5).sum()) for i in completed)
    patches = sum(ref_grids[i].size for i in completed)
    searched = full_share(scorer, batches)
    full_fps, bounded_fps = len(images) / statistics.median(full_s), len(images) / statistics.median(bounded_s)
    sweep = []
    for share in shares:  # the threshold at the (1 - share) quantile of the scores: that share flagged
        threshold = float(np.quantile(ref_scores, 1 - share, method="higher")) if share > 0 else np.inf
        times = []
        for _ in range(rounds):
            times.append(timed(full)[0])
            times.append(timed(lambda: bounded_pass(threshold))[0])
        sweep.append({"share": share, "flagged": int((ref_scores >= threshold).sum()),
                      "ratio": round(statistics.median(times[0::2]) / statistics.median(times[1::2]), 2)})
    return {"data": category.name, "bank": len(scorer.bank.features), "images": len(images), "batch": batch,
            "full_images_per_second": round(full_fps, 2), "bounded_images_per_second": round(bounded_fps, 2),
            "ratio": round(bounded_fps / full_fps, 2), "rounds": rounds,
            "full_seconds": [round(s, 3) for s in full_s], "bounded_seconds": [round(s, 3) for s in bounded_s],
            "scores_equal": bool(np.array_equal(scores, ref_scores)),
            "max_score_difference": float(np.abs(scores - ref_scores).max()),
            "completed_images": len(completed), "completed_patches_differing": differing,
            "completed_patches": patches, "searched_in_full_share": round(searched, 4),
            "flagged_share": round(len(completed) / len(images), 3), "sweep": sweep,
            "sweep_ratios": " / ".join(f"{row['ratio']:.2f}" for row in sweep)}


def full_share(scorer: PatchCoreScorer, batches: list[list[np.ndarray]]) -> float:
    """The share of patches the bounded search gave the full search, before any completion."""
    full = total = 0
    with torch.inference_mode():
        for images in batches:
            lay = layout(scorer.view, *images[0].shape[:2])
            features, grid = scorer.extractor(scorer.prepare_windows(images, lay), scorer.int8)
            valid = scorer._batch_masks(lay, grid, None, len(images))
            found = bounded.bounded_distances(scorer.index, features, valid)
            full += int(found.full.sum())
            total += int(valid.sum())
    return full / max(total, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bank", type=Path, action="append", required=True)
    parser.add_argument("--category", type=Path, action="append", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8, help="the worker's max_batch")
    parser.add_argument("--every", type=int, default=1, help="every Nth test image")
    parser.add_argument("--shares", type=float, nargs="*", default=[0, 0.25, 0.5, 0.75, 1.0],
                        help="flagged shares of the sweep (the threshold moved to flag them)")
    args = parser.parse_args()
    if len(args.bank) != len(args.category):
        raise SystemExit("give one --category per --bank")
    rows = []
    for bank_path, category in zip(args.bank, args.category):
        rows.append(measure(bank_path, category, args.rounds, args.batch, args.every, args.shares))
        print(rows[-1], flush=True)
    write_result("bounded", {"rows": rows, "shares": args.shares, "bound_probes": bounded.BOUND_PROBES,
                             "bound_candidates": bounded.BOUND_CANDIDATES, "bound_dims": BOUND_DIMS,
                             "seed_patches": bounded.SEED_PATCHES})


if __name__ == "__main__":
    main()
