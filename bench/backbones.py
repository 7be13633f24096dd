"""Each offline backbone alone and ensembles of them, measured with `patchcore eval` (its JSON) on real sets.

    .venv/bin/python bench/backbones.py [--data DIR] [--sets mvtec_bottle,visa_macaroni1]
        [--configs mobilenet_v2,efficientnet_lite0,...,mobilenet_v2+efficientnet_lite0] [--keep]
        [--bank-options="--view full --size 320" --label NAME]   # another view: its own result file

Per set: each backbone's bank once (`patchcore bank build --backbone NAME --seed 0`, default view and settings:
crop 256/224, 10 % coreset, leave-out threshold at a 1 % target false-alarm rate); each ensemble from its members'
banks (`patchcore bank combine`, mean and max: the bank `bank build --backbone a+b` makes); then `patchcore eval
--bank BANK --json FILE` of every configuration, one after the other (never two at once: the machine is shared),
so the images/s of a set's configurations come from one run. Rows go to bench/results/backbones-eval.json; rows
of configurations not run this time are kept from the file (`--no-keep` drops them), so a slow set can be
measured a few configurations per invocation. Build seconds: the bank's (features, coreset, calibration; an
ensemble's: its members' summed); images/s: eval's end-to-end scoring rate, maps included. Timings taken while other jobs share the CPU swing with their load
(the file records the load average); quality columns do not depend on it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from datadir import category  # bench/datadir.py, beside this script
from results import RESULTS, write_result  # bench/results.py, beside this script

NAME = "backbones-eval"
SINGLES = ("mobilenet_v2", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
ENSEMBLES = ("mobilenet_v2+efficientnet_lite0", "efficientnet_lite0+efficientnet_lite1",
             "mobilenet_v2+efficientnet_lite0+efficientnet_lite1")
ROOT = Path(__file__).resolve().parents[1]


def patchcore(*args: str) -> None:
    """One `patchcore` command in a child process (its JSON output not needed: files are)."""
    subprocess.run([sys.executable, "-m", "patchcore", *args], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def member_bank(data: Path, name: str, folder: Path, view: tuple[str, ...] = ()) -> Path:
    """`patchcore bank build` of one backbone (default settings but `view`'s options, seed 0), once per set and run."""
    path = folder / f"{name}.bank"
    if not path.is_file():
        patchcore("bank", "build", "--train", str(data / "train" / "good"), "--out", str(path), "--backbone", name,
                  "--seed", "0", "--no-progress", *view)
    return path


def bank_of(data: Path, config: str, combine: str, folder: Path, view: tuple[str, ...] = ()) -> Path:
    """The bank of a configuration: a member bank, or `patchcore bank combine` of its members' banks (the bank
    `bank build --backbone a+b` makes, without building each member again)."""
    members = config.split("+")
    if len(members) == 1:
        return member_bank(data, config, folder, view)
    paths = [str(member_bank(data, name, folder, view)) for name in members]
    path = folder / f"{config}-{combine}.bank"
    patchcore("bank", "combine", *paths, "--out", str(path), "--combine", combine)
    return path


def run_eval(data: Path, bank: Path, json_out: Path) -> dict:
    """`patchcore eval --bank`: its JSON report, with the bank's build seconds (members' summed for an ensemble)."""
    patchcore("eval", "--data", str(data), "--bank", str(bank), "--json", str(json_out), "--no-progress")
    report = json.loads(json_out.read_text())
    info = subprocess.run([sys.executable, "-m", "patchcore", "bank", "info", str(bank)], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout
    report["fit_seconds"] = json.loads(info)["info"]["build_seconds"]
    return report


def row_of(set_name: str, config: str, report: dict, load: float) -> dict:
    rate = report.get("best_recall_at_rate", {})
    return {"data": set_name, "config": config, "combine": report.get("combine") or "-", "view": report["view"],
            "image_auroc": report["image_auroc"], "pixel_auroc": report["pixel_auroc"], "pro": report["pro"],
            "threshold": report["threshold"], "false_alarm_rate": report["false_alarm_rate"], "recall": report["recall"],
            "best_recall_at_0_05": rate.get("0.05"), "build_s": report["fit_seconds"],
            "images_per_s": report["images_per_second"], "load_average_1min": load}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="folder of the data sets (default: bench/datadir.py)")
    parser.add_argument("--sets", default="mvtec_bottle,visa_macaroni1")
    parser.add_argument("--configs", default=",".join(SINGLES + ENSEMBLES))
    parser.add_argument("--combine", default="mean,max", help="ensembles: the combinations measured")
    parser.add_argument("--banks", default=None, help="keep the banks in this folder (default: a temporary one)")
    parser.add_argument("--no-keep", dest="keep", action="store_false",
                        help="drop the file's rows of configurations not run now")
    parser.add_argument("--bank-options", default="", help='more `bank build` options for every bank, e.g. '
                        '--bank-options="--view full --size 320" (default: none, the default view: auto, the crop on MVTec and VisA)')
    parser.add_argument("--label", default=NAME, help="the result file's name (bench/results/LABEL.json)")
    args = parser.parse_args()
    view = tuple(args.bank_options.split())
    path = RESULTS / f"{args.label}.json"
    rows = json.loads(path.read_text())["figures"]["rows"] if args.keep and path.is_file() else []
    temporary = tempfile.TemporaryDirectory(prefix="bench-backbones-")
    root = Path(args.banks or temporary.name)
    for set_name in args.sets.split(","):
        data = category(set_name, args.data)
        folder = root / args.label / set_name  # a view's banks apart from another's
        folder.mkdir(parents=True, exist_ok=True)
        runs = [(config, combine) for config in args.configs.split(",")
                for combine in (args.combine.split(",") if "+" in config else ["-"])]
        for config, combine in runs:
            report = run_eval(data, bank_of(data, config, combine, folder, view), folder / "eval.json")
            row = row_of(set_name, config, report, round(os.getloadavg()[0], 2))
            print(json.dumps(row), flush=True)
            key = (row["data"], row["config"], row["combine"], row["view"])
            rows = [r for r in rows if (r["data"], r["config"], r["combine"], r.get("view")) != key] + [row]
            rows.sort(key=lambda r: (r["data"], r["config"].count("+"), r["config"], r["combine"]))
            write_result(args.label, {"rows": rows},
                         command=f"bench/backbones.py --sets SET --configs CONFIGS{' --bank-options=' + repr(args.bank_options) if view else ''}"
                                 " (per backbone `patchcore bank build "
                                 f"--train SET/train/good --backbone NAME --seed 0{' ' + args.bank_options if view else ''}`, "
                                 "per ensemble `patchcore bank combine "
                                 "MEMBERS --combine C`, then `patchcore eval --data SET --bank BANK --json FILE`; "
                                 "one at a time)")


if __name__ == "__main__":
    main()
