"""Patch-feature throughput (images/s) of each backbone, measured side by side in one run.

    .venv/bin/python bench/backbones.py [--backbones mobilenet_v2,efficientnet_lite0] [--images 32]

Same images (synthetic parts at 256 x 256 -> crop 224), same batch size, rounds interleaved so
that load from other processes hits every backbone alike; prints the median of the rounds and
the ratio to the first backbone.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import torch

from scorer.config import FeatureConfig
from scorer.model import build_extractor
from scorer.preprocess import preprocess

from results import write_result  # bench/results.py, beside this script


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backbones", default="mobilenet_v2,efficientnet_lite0")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (256, 256, 3), dtype=np.uint8) for _ in range(args.images)]
    batch = preprocess(images, 256, 224)
    names = args.backbones.split(",")
    extractors = {name: build_extractor(FeatureConfig(backbone=name))[0] for name in names}
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for name, extractor in extractors.items():  # warm-up
        extractor(batch[:2])
    for _ in range(args.rounds):
        for name, extractor in extractors.items():
            started = time.perf_counter()
            for begin in range(0, len(batch), args.batch_size):
                extractor(batch[begin:begin + args.batch_size])
            seconds[name].append(time.perf_counter() - started)
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"{args.images} images of 224 x 224, batch {args.batch_size}, median of {args.rounds} rounds")
    base = args.images / statistics.median(seconds[names[0]])
    rows = []
    for name in names:
        rate = args.images / statistics.median(seconds[name])
        print(f"{name:20s} {rate:7.2f} images/s  ({rate / base:.2f}x {names[0]})")
        rows.append({"backbone": name, "images_per_s": round(rate, 2), "x_first": round(rate / base, 3)})
    write_result("backbones", {"images": args.images, "batch_size": args.batch_size, "rounds": args.rounds,
                               "torch_threads": torch.get_num_threads(), "rows": rows})


if __name__ == "__main__":
    main()
