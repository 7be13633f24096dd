"""Plain max vs the paper's Eq. 7 reweighting (b = 9) as the image score, on one bank.

    .venv/bin/python bench/reweighting.py --bank BANK [--data DIR] [--category mvtec_bottle]

Prints image AUROC, the class margin (lowest defect score minus highest good score, over the
spread of good scores), the recall at the F1-optimal threshold and the best recall any threshold
reaches at false-alarm rates of 1 % and 5 % (the oracle bound for a good-only threshold) for each;
the default (`--neighbours`) was chosen from this.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from scorer import PatchCoreScorer, load_bank
from scorer.evaluate import test_samples
from scorer.metrics import best_recall_at_rate, f1_optimal_threshold, image_auroc
from scorer.model import iter_image_batches
from scorer.preprocess import preprocess

from datadir import add_data_argument, category  # bench/datadir.py
from results import write_result  # bench/results.py


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bank", required=True)
    add_data_argument(parser)
    parser.add_argument("--category", default="mvtec_bottle", help="a data set folder, or its name under --data")
    args = parser.parse_args()
    args.category = str(category(args.category, args.data))
    samples = test_samples(args.category)
    labels = np.array([s.is_anomalous for s in samples])
    scorer = PatchCoreScorer(load_bank(args.bank), device="cpu")
    if scorer.view.kind != "crop":
        raise SystemExit(f"bench/reweighting.py scores the crop view; this bank's view is {scorer.view.describe()}")
    # one backbone pass per image; each setting of b then re-scores the same features
    # the crop view (the paper's); patch features of each image, extracted once
    patches = [features for images in iter_image_batches([s.path for s in samples], 16)
               for features in scorer.extractor(preprocess(images, scorer.view.resize, scorer.view.crop))[0].numpy()]
    rows = []
    for neighbours in (1, 3, 9, 27):
        scorer.neighbours = neighbours
        scores = scorer.score_patches(patches)
        good, bad = scores[~labels], scores[labels]
        margin = (bad.min() - good.max()) / good.std()
        f1_threshold, f1 = f1_optimal_threshold(labels, scores)
        print(f"neighbours {neighbours:2d}: image AUROC {image_auroc(labels, scores):.4f}, "
              f"margin (min defect - max good) / std(good) = {margin:+.2f}, "
              f"defects above max good: {(bad > good.max()).mean():.3f}, F1 {f1:.3f} with recall "
              f"{(bad >= f1_threshold).mean():.3f} at false-alarm rate {(good >= f1_threshold).mean():.3f}; "
              f"best recall at false-alarm rate <= 0.01: {best_recall_at_rate(labels, scores, 0.01):.3f}, "
              f"<= 0.05: {best_recall_at_rate(labels, scores, 0.05):.3f}")
        rows.append({"neighbours": neighbours, "image_auroc": round(float(image_auroc(labels, scores)), 4),
                     "margin": round(float(margin), 2), "f1": round(float(f1), 3),
                     "recall_at_f1": round(float((bad >= f1_threshold).mean()), 3),
                     "false_alarm_rate_at_f1": round(float((good >= f1_threshold).mean()), 3),
                     "best_recall_far_0_01": round(float(best_recall_at_rate(labels, scores, 0.01)), 3),
                     "best_recall_far_0_05": round(float(best_recall_at_rate(labels, scores, 0.05)), 3)})
    write_result(f"reweighting-{Path(args.category).name}", {"category": Path(args.category).name, "rows": rows})


if __name__ == "__main__":
    main()
