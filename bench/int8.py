"""precision int8 against fp32 (both in ONNX Runtime, the CPU's default engine): what int8 does to the features of
each offline backbone and to `patchcore eval` end to end on real sets, with the CPU's flags.

Features: per backbone, the extractor run by both precisions on --images test crops of the first set (int8
calibrated on that set's bank-style calibration windows: 16 good training crops), interleaved over --rounds:
images/s of the backbone + pooling graph alone, and the features' difference relative to fp32 (Frobenius, and the
mean patch vector's |difference| against the mean |feature|).

End to end: `patchcore eval --bank DIR/<set>.bank --precision P --json FILE` for P in fp32, int8, interleaved over
--rounds (the banks are built once by this version, so they carry their calibration windows; fp32-built, scored
in both). Quality must be compared against the fp32 row of the same run. Writes bench/results/int8.json.

    .venv/bin/python bench/int8.py --banks DIR [--data ROOT] [--rounds 2] [--images 32] [--backbones a,b]
        [--label NAME]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from datadir import category as data_set  # bench/datadir.py
from results import cpu, patchcore_json, write_result  # bench/results.py

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from scorer.config import FeatureConfig  # noqa: E402
from scorer.features import ComputeConfig, Int8Calibration  # noqa: E402
from scorer.hardware import apply_thread_plan  # noqa: E402
from scorer.model import build_extractor, calibration_windows  # noqa: E402
from scorer.preprocess import list_images, load_image, preprocess  # noqa: E402
from scorer.views import ViewConfig  # noqa: E402

CATEGORIES = ("mvtec_bottle", "visa_macaroni1")
BACKBONES = ("mobilenet_v2", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
PRECISIONS = ("fp32", "int8")


def spread(paths: list[Path], count: int) -> list[Path]:
    paths = sorted(paths)
    return [paths[i] for i in np.unique(np.linspace(0, len(paths) - 1, min(count, len(paths))).astype(int))]


def feature_rows(folder: Path, backbones: list[str], images: int, rounds: int) -> list[dict]:
    view = ViewConfig(kind="crop")  # the crop view, as the banks
    train = spread(list_images(folder / "train" / "good"), 64)
    windows = Int8Calibration(calibration_windows(train, view, torch.device("cpu")))
    tests = spread([p for sub in sorted((folder / "test").iterdir()) if sub.is_dir() for p in list_images(sub)],
                   images)
    batch = preprocess([load_image(p) for p in tests], view.resize, view.crop)
    rows = []
    for backbone in backbones:
        extractors = {p: build_extractor(FeatureConfig(backbone=backbone), compute=ComputeConfig(p))[0]
                      for p in PRECISIONS}
        out = {p: e(batch, windows)[0].numpy() for p, e in extractors.items()}  # the first call makes the graphs
        rates: dict[str, list[float]] = {p: [] for p in PRECISIONS}
        for _ in range(rounds):
            for p, e in extractors.items():
                begin = time.perf_counter()
                e(batch, windows)
                rates[p].append(len(batch) / (time.perf_counter() - begin))
        reference, got = out["fp32"], out["int8"]
        row = {"backbone": backbone, "data": folder.name, "images": len(batch),
               "fp32_images_per_s": statistics.median(rates["fp32"]),
               "int8_images_per_s": statistics.median(rates["int8"]),
               "feature_fro_rel": float(np.linalg.norm(got - reference) / np.linalg.norm(reference)),
               "patch_difference_rel": float(np.linalg.norm(got - reference, axis=-1).mean()
                                             / np.linalg.norm(reference, axis=-1).mean())}
        row["speedup"] = row["int8_images_per_s"] / row["fp32_images_per_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def run_eval(data: Path, bank: Path, precision: str) -> dict:
    return patchcore_json(ROOT, "eval", "--data", str(data), "--bank", str(bank), "--device", "cpu", "--precision",
                          precision, "--no-progress")


def eval_rows(banks: Path, data_root: Path | None, rounds: int) -> list[dict]:
    rows = []
    for name in CATEGORIES:
        runs: dict[str, list[dict]] = {p: [] for p in PRECISIONS}
        for _ in range(rounds):
            for p in PRECISIONS:
                runs[p].append(run_eval(data_set(name, data_root), banks / f"{name}.bank", p))
        for p in PRECISIONS:
            last = runs[p][-1]  # quality: the last round (the same bank and precision each round)
            row = {"data": name, "precision": p,
                   "images_per_s": statistics.median(r["images_per_second"] for r in runs[p]),
                   "rounds_images_per_s": [r["images_per_second"] for r in runs[p]],
                   "best_recall_at_0_05": last["best_recall_at_rate"].get("0.05"),
                   **{key: last[key] for key in ("image_auroc", "pixel_auroc", "pro", "false_alarm_rate", "recall",
                                                 "threshold")}}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--banks", type=Path, required=True, help="folder of <category>.bank (mobilenet_v2)")
    parser.add_argument("--data", type=Path, default=None, help="datasets root (default: bench/datadir.py's)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--images", type=int, default=32, help="test crops of the feature comparison")
    parser.add_argument("--backbones", default=",".join(BACKBONES), help="of the feature rows ('': none)")
    parser.add_argument("--label", default="", help="written as bench/results/int8-LABEL.json (e.g. the banks' backbone)")
    args = parser.parse_args()
    apply_thread_plan()
    print(f"CPU {cpu()}", flush=True)
    backbones = [name for name in args.backbones.split(",") if name]
    features = feature_rows(data_set(CATEGORIES[0], args.data), backbones, args.images, max(3, args.rounds * 2))
    evals = eval_rows(args.banks, args.data, args.rounds)
    write_result("int8" + (f"-{args.label}" if args.label else ""), {"features": features, "eval": evals},
                 command=" ".join(["bench/int8.py", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
