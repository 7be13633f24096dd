"""Finer detail for small defects (issue 23 item 4): per-position normalisation (--position-norm) and a shallower
(stride-4) tap against the plain bank of the same backbone, measured with `patchcore eval` (its JSON).

    .venv/bin/python bench/detail.py [--data DIR] [--sets visa_macaroni1,mvtec_bottle] [--backbone efficientnet_lite0]
        [--configs baseline,position-norm,stride4] [--bank SET:CONFIG=PATH ...] [--banks FOLDER] [--train-images N]

Per set and configuration: `patchcore bank build --backbone B --seed 0` with the configuration's options (default
view and settings otherwise: crop 256/224, 10 % coreset, leave-out threshold at a 1 % target false-alarm rate),
then `patchcore eval --data SET --bank BANK --json FILE`, one command at a time (the machine is shared). A bank
built earlier with the same settings can be given with --bank (its build seconds are then its own, from its info,
taken under that run's load). Rows go to bench/results/detail-eval.json (rows of configurations not run now are
kept). --train-images N: the first N training images only (a subsample, for configurations too slow to build in
full on a shared machine; the test set unchanged; rows named "SET (N train)"). Timings swing with the load of other jobs (the rows record the load average); quality columns do not.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from backbones import patchcore, row_of, run_eval  # bench/backbones.py, beside this script
from datadir import category  # bench/datadir.py, beside this script
from results import RESULTS, write_result  # bench/results.py, beside this script

NAME = "detail-eval"
# each configuration's build options beyond --backbone and --seed; "stride4" is the preset `--layers fine` (the
# backbone's stride-4 taps, scorer/backbones.py BackboneSpec.fine_layers, with a quarter of the coreset fraction:
# the 4x finer grid's bank the default taps' size)
CONFIGS = {"baseline": [], "position-norm": ["--position-norm"], "stride4": ["--layers", "fine"],
           "stride4+position-norm": ["--layers", "fine", "--position-norm"]}


def build(data: Path, config: str, backbone: str, path: Path) -> Path:
    patchcore("bank", "build", "--train", str(data / "train" / "good"), "--out", str(path), "--backbone", backbone,
              "--seed", "0", "--no-progress", *CONFIGS[config])
    return path


def subsample(data: Path, count: int, folder: Path) -> Path:
    """An MVTec-layout folder of `data`'s first `count` training images (links) and its whole test set."""
    root = folder / f"train{count}"
    (root / "train" / "good").mkdir(parents=True, exist_ok=True)
    for name in ("test", "ground_truth"):
        if not (root / name).exists():
            (root / name).symlink_to(data / name)
    for image in sorted((data / "train" / "good").iterdir())[:count]:
        if not (root / "train" / "good" / image.name).exists():
            (root / "train" / "good" / image.name).symlink_to(image)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="folder of the data sets (default: bench/datadir.py)")
    parser.add_argument("--sets", default="visa_macaroni1,mvtec_bottle")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--configs", default="baseline,position-norm")
    parser.add_argument("--bank", action="append", default=[], help="SET:CONFIG=PATH: use this bank, do not build")
    parser.add_argument("--banks", default="/tmp/bench-detail", help="folder for the banks built")
    parser.add_argument("--train-images", type=int, default=None, help="the first N training images only")
    args = parser.parse_args()
    given = {tuple(key.split(":", 1)): Path(path) for key, path in (b.split("=", 1) for b in args.bank)}
    path = RESULTS / f"{NAME}.json"
    rows = json.loads(path.read_text())["figures"]["rows"] if path.is_file() else []
    for set_name in args.sets.split(","):
        data = category(set_name, args.data)
        folder = Path(args.banks) / set_name
        folder.mkdir(parents=True, exist_ok=True)
        label = set_name
        if args.train_images:
            data, label = subsample(data, args.train_images, folder), f"{set_name} ({args.train_images} train)"
            folder = data
        for config in args.configs.split(","):
            bank = given.get((set_name, config)) or build(data, config, args.backbone,
                                                           folder / f"{args.backbone}-{config}.bank")
            report = run_eval(data, bank, folder / f"{config}-eval.json")
            row = {**row_of(label, f"{args.backbone} {config}", report, round(os.getloadavg()[0], 2)),
                   "layers": ",".join(report["layers"]), "bank_size": report["bank_size"]}
            row.pop("combine")
            print(json.dumps(row), flush=True)
            rows = [r for r in rows if (r["data"], r["config"]) != (row["data"], row["config"])] + [row]
            rows.sort(key=lambda r: (r["data"], r["config"]))
            write_result(NAME, {"rows": rows}, command="bench/detail.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
