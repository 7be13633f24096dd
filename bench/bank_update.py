"""Bank update (new good images added to a bank, no rebuild) vs a full rebuild, on MVTec bottle.

    .venv/bin/python bench/bank_update.py [--data DIR] [--category mvtec_bottle] [--new 10]

Builds a bank from all but the last --new training images, updates it with those, and rebuilds from all;
prints both times, bank sizes, thresholds, and the test set's image AUROC / recall for each bank.
"""
from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np

from scorer import BuildConfig, CoresetConfig, FeatureConfig, PatchCoreScorer, build_bank, update_bank
from scorer.evaluate import test_samples, train_images
from scorer.metrics import image_auroc

from datadir import add_data_argument, category  # bench/datadir.py
from results import write_result  # bench/results.py


def main() -> None:
    parser = argparse.ArgumentParser()
    add_data_argument(parser)
    parser.add_argument("--category", default="mvtec_bottle", help="a data set folder, or its name under --data")
    parser.add_argument("--new", type=int, default=10)
    args = parser.parse_args()
    args.category = str(category(args.category, args.data))
    print(f"machine: {platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores")
    paths = train_images(args.category)
    config = BuildConfig(features=FeatureConfig(backbone="mobilenet_v2"), coreset=CoresetConfig(fraction=0.1))
    base = build_bank(paths[:-args.new], config, device="cpu", progress=False)
    started = time.perf_counter()
    updated = update_bank(base, paths[-args.new:], device="cpu")
    update_s = time.perf_counter() - started
    started = time.perf_counter()
    rebuilt = build_bank(paths, config, device="cpu", progress=False)
    rebuild_s = time.perf_counter() - started
    samples = test_samples(args.category)
    labels = np.array([s.is_anomalous for s in samples])
    rows = []
    for name, bank, seconds in (("base", base, base.info["build_seconds"]), ("updated", updated, update_s),
                                ("rebuilt", rebuilt, rebuild_s)):
        scorer = PatchCoreScorer(bank, device="cpu")
        scores = scorer.score_paths([s.path for s in samples], maps=False).image_scores
        flagged = scorer.verdict(scores)
        print(f"{name:8s} {seconds:7.1f} s  bank {len(bank.features):6d}  threshold {scorer.threshold:.3f}  "
              f"image AUROC {image_auroc(labels, scores):.4f}  recall {flagged[labels].mean():.3f}  "
              f"false alarms {flagged[~labels].mean():.3f}")
        rows.append({"bank": name, "seconds": round(seconds, 1), "features": len(bank.features),
                     "threshold": round(float(scorer.threshold), 3), "image_auroc": round(image_auroc(labels, scores), 4),
                     "recall": round(float(flagged[labels].mean()), 3),
                     "false_alarm_rate": round(float(flagged[~labels].mean()), 3)})
    print(f"update of {args.new} images: {update_s:.1f} s vs full rebuild {rebuild_s:.1f} s "
          f"(x{rebuild_s / update_s:.1f})")
    write_result(f"bank_update-{Path(args.category).name}", {"category": Path(args.category).name, "new": args.new,
                                                              "rows": rows})


if __name__ == "__main__":
    main()
