"""`patchcore bank build` of two checkouts back to back on the same training images: a baseline (e.g. the commit
before a change, checked out with its own .venv) against this one, interleaved over --rounds, with the bank's
own feature and build seconds and the check that must hold: the same coreset and the same good scores (hence
the same threshold). Prints a row per build and writes bench/results/build_time.json.

    .venv/bin/python bench/build_time.py --baseline /path/to/old/checkout [--data ROOT] [--rounds 1]
        [--backbone mobilenet_v2] [--sets mvtec_bottle,visa_macaroni1]

build s: `info.build_seconds` (features, coreset selection and the good-only calibration; process start-up and
loading the backbone excluded); after features s: build s less `info.feature_seconds` (the coreset selection and
the calibration, what the leave-one-out speed-up changed; the features are the same code in both).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from scorer.bank import load_bank

from datadir import category as data_set  # bench/datadir.py
from results import write_result  # bench/results.py

ROOT = Path(__file__).resolve().parents[1]


def build(checkout: Path, train: Path, out: Path, backbone: str) -> dict:
    """One `patchcore bank build` by a checkout's own .venv: its summary, with the wall seconds of the process."""
    started = time.perf_counter()
    done = subprocess.run([str(checkout / ".venv" / "bin" / "patchcore"), "bank", "build", "--train", str(train),
                           "--out", str(out), "--backbone", backbone, "--coreset", "0.1", "--seed", "0",
                           "--no-progress"], capture_output=True, text=True, cwd=checkout, timeout=7200)
    if done.returncode != 0:
        raise SystemExit(f"bank build failed in {checkout}: {done.stderr[-2000:]}")
    summary = json.loads(done.stdout)
    summary["wall_seconds"] = time.perf_counter() - started
    return summary


def same_bank(a: Path, b: Path) -> dict:
    """How far two banks' coresets and good scores differ (0 / True: the same)."""
    first, second = load_bank(a), load_bank(b)
    good = [np.asarray(bank.calibration.good_scores, dtype=np.float64) for bank in (first, second)]
    return {"same_coreset": bool(np.array_equal(first.features, second.features)),
            "good_scores_max_relative_difference": float(np.max(np.abs(good[0] - good[1]) / np.abs(good[0]))),
            "threshold_difference": abs(first.calibration.threshold - second.calibration.threshold)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", type=Path, required=True, help="checkout of the baseline, with its .venv")
    parser.add_argument("--data", default=None, help="data root (default $PATCHCORE_DATA or ../shared/datasets)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--sets", default="mvtec_bottle,visa_macaroni1")
    parser.add_argument("--label", default=None, help="writes build_time-LABEL.json")
    args = parser.parse_args()
    sets = args.sets.split(",")
    runs: dict = {(name, which): [] for name in sets for which in ("baseline", "this")}
    rows = []
    with tempfile.TemporaryDirectory(prefix="build-time-") as folder:
        for _ in range(args.rounds):
            for name in sets:
                for which, checkout in (("baseline", args.baseline), ("this", ROOT)):
                    summary = build(checkout, data_set(name, args.data) / "train" / "good",
                                    Path(folder) / f"{name}-{which}.bank", args.backbone)
                    runs[name, which].append(summary)
                    info = summary["info"]
                    print(json.dumps({"data": name, "checkout": which, "build_seconds": info["build_seconds"],
                                      "feature_seconds": info["feature_seconds"],
                                      "wall_seconds": round(summary["wall_seconds"], 1)}), flush=True)
        for name in sets:
            seconds = {which: statistics.median(s["info"]["build_seconds"] for s in runs[name, which])
                       for which in ("baseline", "this")}
            features = {which: statistics.median(s["info"]["feature_seconds"] for s in runs[name, which])
                        for which in ("baseline", "this")}
            last = runs[name, "this"][-1]
            rows.append({"data": name, "backbone": args.backbone, "images": last["info"]["n_train_images"],
                         "bank": last["bank_size"],
                         "baseline_build_seconds": round(seconds["baseline"], 1),
                         "this_build_seconds": round(seconds["this"], 1),
                         "ratio": round(seconds["baseline"] / seconds["this"], 2),
                         "baseline_after_features_seconds": round(seconds["baseline"] - features["baseline"], 1),
                         "this_after_features_seconds": round(seconds["this"] - features["this"], 1),
                         **same_bank(Path(folder) / f"{name}-baseline.bank", Path(folder) / f"{name}-this.bank")})
            print(json.dumps(rows[-1]), flush=True)
    write_result("build_time" + (f"-{args.label}" if args.label else ""),
                 {"rows": rows, "baseline": str(args.baseline), "rounds": args.rounds})


if __name__ == "__main__":
    main()
