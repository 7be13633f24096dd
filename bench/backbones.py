"""Each offline backbone alone and ensembles of them, measured with `patchcore eval` (its JSON) on real sets.

    .venv/bin/python bench/backbones.py [--data DIR] [--sets mvtec_bottle,visa_macaroni1]
        [--configs mobilenet_v2,efficientnet_lite0,...,mobilenet_v2+efficientnet_lite0] [--keep]

One `patchcore eval --data SET --backbone CONFIG --seed 0 --json FILE` per (set, configuration), one after the
other (never two at once: the machine is shared), default view and settings (crop 256/224, 10 % coreset,
leave-out threshold at a 1 % target false-alarm rate). Rows go to bench/results/backbones-eval.json; rows of
configurations not run this time are kept from the file (`--keep`, the default), so a slow set can be measured one
configuration per invocation. Build seconds are eval's `fit_seconds` (features, coreset, calibration); images/s
its end-to-end scoring rate, maps included. Timings taken while other jobs share the CPU swing with their load
(the file records the load average); quality columns do not depend on it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from datadir import category  # bench/datadir.py, beside this script
from results import RESULTS, write_result  # bench/results.py, beside this script

NAME = "backbones-eval"
SINGLES = ("mobilenet_v2", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
ENSEMBLES = ("mobilenet_v2+efficientnet_lite0", "efficientnet_lite0+efficientnet_lite1",
             "mobilenet_v2+efficientnet_lite0+efficientnet_lite1")
ROOT = Path(__file__).resolve().parents[1]


def run_eval(data: Path, config: str, json_out: Path, extra: list[str]) -> dict:
    """One `patchcore eval` in a child process; its JSON report."""
    command = [sys.executable, "-m", "patchcore", "eval", "--data", str(data), "--backbone", config, "--seed", "0",
               "--json", str(json_out), "--no-progress", *extra]
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    report = json.loads(json_out.read_text())
    report["wall_s"] = round(time.perf_counter() - started, 1)
    return report


def row_of(set_name: str, config: str, report: dict, load: float) -> dict:
    rate = report.get("best_recall_at_rate", {})
    return {"data": set_name, "config": config, "combine": report.get("combine", "-"),
            "image_auroc": report["image_auroc"], "pixel_auroc": report["pixel_auroc"], "pro": report["pro"],
            "threshold": report["threshold"], "false_alarm_rate": report["false_alarm_rate"], "recall": report["recall"],
            "best_recall_at_0_05": rate.get("0.05"), "build_s": report["fit_seconds"],
            "images_per_s": report["images_per_second"], "load_average_1min": load}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="folder of the data sets (default: bench/datadir.py)")
    parser.add_argument("--sets", default="mvtec_bottle,visa_macaroni1")
    parser.add_argument("--configs", default=",".join(SINGLES + ENSEMBLES))
    parser.add_argument("--eval-args", default="", help="extra `patchcore eval` options, e.g. '--combine max'")
    parser.add_argument("--label", default="", help="suffix of the config's name in the table (e.g. ', max')")
    parser.add_argument("--no-keep", dest="keep", action="store_false",
                        help="drop the file's rows of configurations not run now")
    args = parser.parse_args()
    path = RESULTS / f"{NAME}.json"
    rows = json.loads(path.read_text())["figures"]["rows"] if args.keep and path.is_file() else []
    for set_name in args.sets.split(","):
        data = category(set_name, args.data)
        for config in args.configs.split(","):
            with tempfile.TemporaryDirectory(prefix="bench-backbones-") as folder:
                report = run_eval(data, config, Path(folder) / "eval.json", args.eval_args.split())
            row = row_of(set_name, config + args.label, report, round(os.getloadavg()[0], 2))
            print(json.dumps(row), flush=True)
            rows = [r for r in rows if (r["data"], r["config"]) != (row["data"], row["config"])] + [row]
            rows.sort(key=lambda r: (r["data"], r["config"].count("+"), r["config"]))
            write_result(NAME, {"rows": rows},
                         command="bench/backbones.py --sets SET --configs CONFIG (one `patchcore eval --data SET "
                                 "--backbone CONFIG --seed 0 --json FILE` per row, one at a time)")


if __name__ == "__main__":
    main()
