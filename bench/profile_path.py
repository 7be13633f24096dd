"""Where the per-image time goes: each stage's share of the scoring path, timed inside the real functions
(scorer.stages), on MVTec bottle, VisA macaroni1 and frames of a video, in one run, with the CPU's flags.

    .venv/bin/python bench/profile_path.py --data /work/shared/datasets --video /work/shared/media/bottle-detection.mp4
        [--banks DIR] [--images 48] [--batch-size 16] [--precision ...] [--channels-last/--no-channels-last]
        [--engine torch|onnxruntime]

Data come from --data (or $PATCHCORE_DATA: the folder holding mvtec_bottle and visa_macaroni1) and --video (or
$PATCHCORE_VIDEO). A bank per source is loaded from --banks (<name>.bank) or built there once (mobilenet_v2, the
defaults, --view auto unless given; the video's from its first --warmup-frames frames, as `patchcore up` does).

Per batch the path is the eval's and the worker's: decode (files: read + cv2; video: JPEG frames as ingest sends
them, decoded by the worker's decoder), resize/normalise, backbone, pooling, search, Eq. 7, the maps (upsampling
and smoothing) of every image, and an overlay for each image the bank flags. Stages are exclusive times; `other`
is the wall time no stage claims (Python glue, copies to numpy); with the onnxruntime engine the pooling runs in
the backbone's graph, so its time is in "backbone". The JSON goes to bench/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from contracts.framecodec import encode_frame
from scorer import BuildConfig, FeatureConfig, PatchCoreScorer, build_bank, load_bank, save_bank
from scorer.views import ViewConfig
from scorer.evaluate import test_samples, train_images
from scorer.features import ComputeConfig
from scorer.hardware import cpu_features
from scorer.preprocess import decode_images, load_image
from scorer.stages import StageTimer

from results import write_result  # bench/results.py

STAGES = ("decode", "resize_normalise", "backbone", "pooling", "search", "reweight", "upsample", "smooth", "overlay")
CATEGORIES = {"bottle": "mvtec_bottle", "macaroni1": "visa_macaroni1"}


def cpu_info() -> dict:
    """The machine: CPU model, the instruction-set flags that decide fast low precision, cores, torch's view."""
    return {**cpu_features().to_dict(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def video_frames(path: Path, first: int, count: int, step: int) -> list[np.ndarray]:
    """`count` BGR frames of a video from frame `first`, every `step`-th."""
    import cv2

    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise SystemExit(f"cannot open the video {path}")
    frames, index = [], 0
    while len(frames) < count:
        ok, frame = capture.read()
        if not ok:
            break
        if index >= first and (index - first) % step == 0:
            frames.append(frame)
        index += 1
    capture.release()
    return frames


def bank_for(name: str, banks: Path, train: list, backbone: str, contiguous: bool, view: str) -> object:
    path = banks / f"{name}.bank"
    if path.is_file():
        return load_bank(path)
    config = BuildConfig(features=FeatureConfig(backbone=backbone), view=ViewConfig(kind=view))
    if contiguous:
        from dataclasses import replace

        config = replace(config, calibration=replace(config.calibration, contiguous=True))
    started = time.perf_counter()
    bank = build_bank(train, config, device="cpu", progress=False)
    print(f"  built {path} in {time.perf_counter() - started:.0f} s (under load)", flush=True)
    banks.mkdir(parents=True, exist_ok=True)
    save_bank(bank, path)
    return bank


def profile(scorer: PatchCoreScorer, batches: list, decode) -> dict:
    """Time every stage over all batches (after one warm-up batch): decode -> score with maps -> overlays."""
    scorer.score(decode(batches[0])[:1])  # first-call allocations are not throughput
    n_images = sum(len(b) for b in batches)
    flagged = 0
    with StageTimer() as timer:
        started = time.perf_counter()
        for batch in batches:
            images = decode(batch)
            result = scorer.score(images, maps=True)
            for i in np.flatnonzero(scorer.verdict(result.image_scores)):  # the worker's overlays
                scorer.overlay(images[i], result.maps[i], float(result.image_scores[i]))
                flagged += 1
        wall = time.perf_counter() - started
    seconds = {name: timer.seconds.get(name, 0.0) for name in STAGES}
    seconds["other"] = max(0.0, wall - sum(seconds.values()))
    return {"images": n_images, "flagged": flagged, "wall_seconds": round(wall, 3),
            "images_per_second": round(n_images / wall, 2),
            "stages": {name: {"seconds": round(s, 4), "share": round(s / wall, 4),
                              "ms_per_image": round(1000 * s / n_images, 3), "calls": timer.calls.get(name, 0)}
                       for name, s in seconds.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=os.environ.get("PATCHCORE_DATA"),
                        help="folder with mvtec_bottle and visa_macaroni1 (default $PATCHCORE_DATA)")
    parser.add_argument("--video", type=Path, default=os.environ.get("PATCHCORE_VIDEO"),
                        help="a video file (default $PATCHCORE_VIDEO)")
    parser.add_argument("--banks", type=Path, default=Path(tempfile.gettempdir()) / "patchcore-profile-banks",
                        help="where banks are read from, or built into once")
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--images", type=int, default=48, help="test images (frames) per source")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--warmup-frames", type=int, default=60)
    parser.add_argument("--precision", default=None, help="fp32, bf16 or fp16 (default: the CPU's, ComputeConfig.resolve)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="default: the CPU's (ComputeConfig.resolve)")
    parser.add_argument("--engine", default=None, help="torch or onnxruntime (default: the CPU's, ComputeConfig.resolve)")
    parser.add_argument("--view", default=ViewConfig.kind, help="view of the banks built (default: auto, as bank build)")
    parser.add_argument("--sources", default="bottle,macaroni1,video", help="which of bottle, macaroni1, video")
    parser.add_argument("--label", default="after", help="bench/results/profile_path-<label>.json (e.g. before, after)")
    args = parser.parse_args()
    if args.data is None and args.video is None:
        parser.error("give --data and/or --video (or set PATCHCORE_DATA / PATCHCORE_VIDEO)")

    compute = ComputeConfig(args.precision or "auto", args.channels_last, args.engine or "auto").resolve("cpu")
    report = {"cpu": cpu_info(), "compute": compute.to_dict(), "backbone": args.backbone,
              "batch_size": args.batch_size, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "sources": {}}
    print(json.dumps(report["cpu"]), flush=True)
    sources = []
    if args.data is not None:
        for name, folder in CATEGORIES.items():
            if name not in args.sources.split(","):
                continue
            category = args.data / folder
            if not category.is_dir():
                raise SystemExit(f"{category} not found (--data must hold {', '.join(CATEGORIES.values())})")
            paths = [s.path for s in test_samples(category)]
            step = max(1, len(paths) // args.images)  # spread over the defect types
            chosen = paths[::step][:args.images]
            sources.append((name, lambda category=category: train_images(category), chosen, load_many, False))
    if args.video is not None and "video" in args.sources.split(","):
        warm = video_frames(args.video, 0, args.warmup_frames, 1)
        frames = video_frames(args.video, args.warmup_frames, args.images, 5)
        jpegs = [encode_frame(frame)[0] for frame in frames]  # as ingest sends them (JPEG, quality 90)
        warm_rgb = [np.ascontiguousarray(f[:, :, ::-1]) for f in warm]
        sources.append(("video", lambda: warm_rgb, jpegs, decode_many, True))

    for name, train, items, decode, contiguous in sources:
        print(f"{name}: {len(items)} images", flush=True)
        bank = bank_for(name, args.banks, train(), args.backbone, contiguous, args.view)
        scorer = PatchCoreScorer(bank, device="cpu", compute=compute)
        batches = [items[b:b + args.batch_size] for b in range(0, len(items), args.batch_size)]
        result = profile(scorer, batches, decode)
        report["sources"][name] = {**result, "view": bank.view.describe(), "bank_size": len(bank.features)}
        print(f"  {result['images_per_second']:.2f} images/s (under load); "
              + ", ".join(f"{stage} {v['share']:.0%}" for stage, v in
                          sorted(result["stages"].items(), key=lambda kv: -kv[1]["seconds"])), flush=True)
    print(f"wrote {write_result(f'profile_path-{args.label}', report)}")


def load_many(paths: list) -> list[np.ndarray]:
    return [load_image(p) for p in paths]


def decode_many(datas: list) -> list[np.ndarray]:
    return decode_images(datas, "cpu")  # the worker's decoder


if __name__ == "__main__":
    main()
