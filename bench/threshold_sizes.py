"""The good-only threshold at any training-set size: leave-out vs k-fold calibration (issue 23, item 0).

    .venv/bin/python bench/threshold_sizes.py [--data DIR ...] [--sizes 30 50 100 0] [--backbone mobilenet_v2]
        [--confidences plug-in 0.5 0.75 0.9] [--label NAME]
    .venv/bin/python bench/threshold_sizes.py --combine A.json B.json [--out ...]   # one file, one table

For each category (MVTec layout) and each training-set size (0: all of train/good; else a seeded random
subset), builds the bank exactly as `build_bank` does (crop view, 10 % coreset, Eq. 7 b = 9, seed 0) from
patch features extracted once per image, then sets the threshold at the target false-alarm rate from the
good scores of both methods - "leave-out" (the default: the shipped coreset less each image's own features)
and "kfold" (5 folds against coresets of the other folds) - and scores the test images with the bank's
default search, as `patchcore eval` does. Per row: the threshold (at each `--confidences`, scorer.calibration
.TailFits; "plug-in": the fit's own quantile, as banks from before confidences) with the interval of the false-alarm rate the bank reports, the observed
false-alarm rate on the good test images (and on the training images left out of a subset: more unseen good
images), the recall, and `best_recall_at_rate` (the best recall any threshold reaches at the same false-alarm
budget on the test scores); and the mean good score of each kind (calibration, unused training, test), which
tells a calibration that is off from test images that differ from the training ones. Both methods share the
bank and the test scores; only the threshold differs.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from scipy import stats

from scorer import BuildConfig, CalibrationConfig, CoresetConfig, FeatureConfig, PatchCoreScorer
from scorer.calibration import TailFits, fit_tail
from scorer.evaluate import test_samples, train_images
from scorer.metrics import best_recall_at_rate, image_auroc
from scorer.model import BankFit, PatchStore, build_extractor, extract_patches
from scorer.views import ViewConfig

from datadir import category as data_set  # bench/datadir.py
from results import write_result  # bench/results.py
from tables import render  # bench/tables.py: the one place the table is written



PLUG_IN = "plug-in"  # --confidences' name for None: TailFits' plug-in quantile


def confidence_arg(text: str) -> float | None:
    return None if text == PLUG_IN else float(text)


def patches_of(extractor, paths, config: BuildConfig) -> list[np.ndarray]:
    return list(extract_patches(extractor, paths, config.view, None, config.batch_size, "cpu"))


def fit_row(train: list[np.ndarray], test: list[np.ndarray], labels: np.ndarray, unused: list[np.ndarray],
            config: BuildConfig, feature_config, extractor, methods: tuple[str, ...] = ("leave-out", "kfold"),
            confidences: tuple[float | None, ...] = (None,)) -> dict:
    rate = config.calibration.false_alarm_rate
    with tempfile.TemporaryDirectory(prefix="threshold-sizes-") as folder:
        store = PatchStore(Path(folder), feature_config.target_dim, config.coreset)
        for patches in train:
            store.add(patches)
        store.close()
        fit = BankFit(store, config, feature_config, None, extractor, "cpu")
        started = time.perf_counter()
        selected = fit.coreset(None, "coreset")
        bank = fit.bank_of(selected)
        good = {}
        seconds = {}
        for method in methods:
            begin = time.perf_counter()
            good[method] = fit.leave_out_scores(selected) if method == "leave-out" else fit.kfold_scores()
            seconds[method] = round(time.perf_counter() - begin, 1)
        scorer = PatchCoreScorer(bank, device="cpu", extractor=extractor)  # the default search, as eval
        scores = scorer.score_patches(test).astype(np.float64)
        unused_scores = scorer.score_patches(unused).astype(np.float64) if unused else np.zeros(0)
    test_good = scores[~labels]
    row = {"n_train": len(train), "bank_size": int(len(bank.features)), "coreset_seconds_under_load":
           round(time.perf_counter() - started, 1), "image_auroc": round(image_auroc(labels, scores), 4),
           "best_recall_at_rate": best_recall_at_rate(labels, scores, rate),
           "test_good_mean": round(float(test_good.mean()), 4), "test_good_max": round(float(test_good.max()), 4),
           "n_test_good": int((~labels).sum()), "n_test_defective": int(labels.sum()), "n_unused_train": len(unused)}
    if len(unused):
        row["unused_train_mean"] = round(float(unused_scores.mean()), 4)
    row["thresholds"] = []
    for method, values in good.items():
        tail, fits = fit_tail(values), TailFits(values)
        ks = stats.kstest(values, "gumbel_r", args=(tail.location, tail.scale))
        for confidence in confidences:
            threshold = fits.threshold(rate, confidence)
            one = {
                "method": method, "confidence": PLUG_IN if confidence is None else confidence,
                "threshold": round(threshold, 4),
                "rate_interval": [round(r, 4) for r in fits.rate_interval(threshold)],
                "false_alarm_rate": float((test_good >= threshold).mean()),
                "recall": float((scores[labels] >= threshold).mean()),
                "false_alarm_rate_unused_train": float((unused_scores >= threshold).mean()) if len(unused) else None,
                "good_scores_mean": round(float(values.mean()), 4),
                "tail_ks_statistic": round(float(ks.statistic), 4), "tail_ks_pvalue": round(float(ks.pvalue), 4),
                "seconds_under_load": seconds[method],
            }
            one["recall_gap"] = round(row["best_recall_at_rate"] - one["recall"], 4)
            row["thresholds"].append(one)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", default=None,
                        help="category folders (default: mvtec_bottle and visa_macaroni1 of $PATCHCORE_DATA or ../shared/datasets)")
    parser.add_argument("--sizes", nargs="+", type=int, default=[30, 50, 100, 0])
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--rate", type=float, default=0.01)
    parser.add_argument("--subset-seed", type=int, default=0)
    parser.add_argument("--out", default="/tmp/threshold_sizes.partial.json",
                        help="rows so far, rewritten after each (the finished run goes to bench/results/)")
    parser.add_argument("--methods", nargs="+", default=["leave-out", "kfold"], choices=["leave-out", "kfold"])
    parser.add_argument("--confidences", nargs="+", type=confidence_arg, default=[None, 0.5, 0.75, 0.9],
                        help="threshold confidences (CalibrationConfig.confidence; plug-in: the fit's own quantile), "
                             "each a row from the same scores")
    parser.add_argument("--combine", nargs="+", help="merge these result files (runs of one set each) into --out")
    parser.add_argument("--label", default="", help="written as bench/results/threshold_sizes-LABEL.json")
    args = parser.parse_args()
    args.data = args.data or [str(data_set(name)) for name in ("mvtec_bottle", "visa_macaroni1")]
    if args.combine:
        parts = [json.loads(Path(f).read_text()) for f in args.combine]
        parts = [part.get("figures", part) for part in parts]  # finished results or partial files
        merged = {**parts[0], "rows": [row for part in parts for row in part["rows"]]}
        write_result("threshold_sizes", merged)
        print(render("threshold_sizes"))
        return
    config = BuildConfig(features=FeatureConfig(backbone=args.backbone), view=ViewConfig(kind="crop"),
                         coreset=CoresetConfig(fraction=0.1, seed=0),
                         calibration=CalibrationConfig(folds=5, false_alarm_rate=args.rate))
    extractor, feature_config = build_extractor(config.features, device="cpu")
    rows = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for category in args.data:
        paths = train_images(category)
        samples = test_samples(category)
        labels = np.array([s.is_anomalous for s in samples])
        started = time.perf_counter()
        train = patches_of(extractor, paths, config)
        test = patches_of(extractor, [s.path for s in samples], config)
        print(f"{Path(category).name}: features of {len(train)} train + {len(test)} test images in "
              f"{time.perf_counter() - started:.0f} s", flush=True)
        for size in args.sizes:
            n = len(paths) if size <= 0 or size >= len(paths) else size
            chosen = np.sort(np.random.default_rng(args.subset_seed).permutation(len(paths))[:n])
            rest = np.setdiff1d(np.arange(len(paths)), chosen)
            row = fit_row([train[i] for i in chosen], test, labels, [train[i] for i in rest],
                          replace(config), feature_config, extractor, tuple(args.methods), tuple(args.confidences))
            row = {"set": Path(category).name, "size": "full" if n == len(paths) else n, **row}
            rows.append(row)
            print(json.dumps(row), flush=True)
            out.write_text(json.dumps({"backbone": args.backbone, "view": config.view.describe(), "coreset": 0.1,
                                       "reweight_neighbours": config.reweight_neighbours, "target_rate": args.rate,
                                       "subset_seed": args.subset_seed, "search": "default (auto)",
                                       "rows": rows}, indent=2) + "\n")
    write_result("threshold_sizes" + (f"-{args.label}" if args.label else ""), json.loads(out.read_text()))
    print(render("threshold_sizes"))


if __name__ == "__main__":
    main()
