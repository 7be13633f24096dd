"""`patchcore eval` images/s of two checkouts back to back on the same banks: a baseline (e.g. the commit before a
change, checked out with its own .venv) against this one, interleaved over --rounds, with the quality figures
(image AUROC, pixel AUROC, PRO) that must not move. Prints a row per run and writes bench/results/eval_speed.json.

    .venv/bin/python bench/eval_speed.py --baseline /path/to/old/checkout --banks DIR [--data ROOT] [--rounds 2]
        [--precision int8]   # this checkout with an option (the baseline with its default): eval_speed-int8.json
        [--label NAME]       # e.g. the baseline's commit: eval_speed[-P]-NAME.json (beside another baseline's)

DIR holds <category>.bank for each category (built once, e.g. by the baseline: both score the same bank).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from datadir import category as data_set  # bench/datadir.py
from results import patchcore_json, write_result  # bench/results.py

ROOT = Path(__file__).resolve().parents[1]
CATEGORIES = ("mvtec_bottle", "visa_macaroni1")


def run_eval(checkout: Path, data: Path, bank: Path, extra: tuple[str, ...] = ()) -> dict:
    """One `patchcore eval --bank` of a checkout (its own .venv), its report."""
    return patchcore_json(checkout, "eval", "--data", str(data), "--bank", str(bank), "--device", "cpu",
                          "--no-progress", *extra)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", type=Path, required=True, help="checkout of the baseline, with its .venv")
    parser.add_argument("--banks", type=Path, required=True, help="folder of <category>.bank files")
    parser.add_argument("--data", default=None, help="data root (default $PATCHCORE_DATA or ../shared/datasets)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--precision", default=None,
                        help="run this checkout with --precision P (e.g. int8; the baseline keeps its default); "
                             "writes eval_speed-P.json")
    parser.add_argument("--label", default=None,
                        help="suffix of the results file (e.g. the baseline's commit): eval_speed[-P]-LABEL.json")
    args = parser.parse_args()
    extra = {"this": ("--precision", args.precision) if args.precision else (), "baseline": ()}
    runs = {(name, which): [] for name in CATEGORIES for which in ("baseline", "this")}
    for _ in range(args.rounds):
        for name in CATEGORIES:
            for which, checkout in (("baseline", args.baseline), ("this", ROOT)):
                report = run_eval(checkout, data_set(name, args.data), args.banks / f"{name}.bank", extra[which])
                runs[name, which].append(report)
                print(json.dumps({"data": name, "checkout": which, "images_per_second": report["images_per_second"],
                                  "image_auroc": report["image_auroc"], "pixel_auroc": report["pixel_auroc"],
                                  "pro": report["pro"]}), flush=True)
    rows = []
    for name in CATEGORIES:
        base, this = runs[name, "baseline"], runs[name, "this"]
        speed = {which: statistics.median(r["images_per_second"] for r in runs[name, which])
                 for which in ("baseline", "this")}
        rows.append({"data": name, "baseline_images_per_second": round(speed["baseline"], 2),
                     "this_images_per_second": round(speed["this"], 2),
                     "ratio": round(speed["this"] / speed["baseline"], 2),
                     **{f"{which}_{metric}": round(runs[name, which][-1][metric], 4)
                        for which in ("baseline", "this") for metric in ("image_auroc", "pixel_auroc", "pro")},
                     "compute": this[-1].get("compute"), "rounds": args.rounds,
                     "baseline_runs": [round(r["images_per_second"], 2) for r in base],
                     "this_runs": [round(r["images_per_second"], 2) for r in this]})
        print(json.dumps(rows[-1]), flush=True)
    baseline_commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=args.baseline, capture_output=True,
                                     text=True).stdout.strip()
    name = "-".join(["eval_speed", *(part for part in (args.precision, args.label) if part)])
    write_result(name, {"baseline_commit": baseline_commit, "precision": args.precision, "rows": rows},
                 command=" ".join(["bench/eval_speed.py", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
