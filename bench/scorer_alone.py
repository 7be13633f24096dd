"""The worker's ceiling: a checkout's scorer alone on the frames `patchcore up` streams, with nothing else running.

    PYTHONPATH=CHECKOUT CHECKOUT/.venv/bin/python bench/scorer_alone.py [--frames 400] [--backbone mobilenet_v2]
        [--precision int8]   # as `up --precision` (checkouts that have it)

Run by bench/worker_speed.py with each checkout's own interpreter and code (the functions it uses are the same in
685cfcb and later). The bank is built as `up` builds it (the synthetic line's first 60 frames, `up`'s build
settings, untimed); the frames are the line's own, JPEG-encoded once as its camera sends them (quality 90). Timed:
decoding (cv2, as the worker's reader) and scoring in batches of the worker's `max_batch` without maps (what the
worker does for every frame; maps are drawn only for flagged ones), after one untimed pass. Where the checkout's
scorer takes `grids_over`, it gets the bank's threshold per frame, as the worker passes it (the patch distances of
the anomalous frames only: scorer/bounded.py). Also timed: the camera's
own per-frame work (rendering a frame and encoding it), which `up` runs on the same cores. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import inspect
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np

from ingest.sources import SyntheticLine
from patchcore.up import UpSettings, warmup_bank
from scorer import PatchCoreScorer
from workers.worker import WorkerSettings

JPEG_QUALITY = 90  # contracts.framecodec.DEFAULT_JPEG_QUALITY (not importable from the baseline's tree)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=400)
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--precision", default=None, help="as `up --precision` (default: the checkout's default)")
    parser.add_argument("--passes", type=int, default=3, help="timed passes over the frames (the median is reported)")
    args = parser.parse_args()
    settings = UpSettings()
    settings = replace(settings, build=replace(settings.build, features=replace(settings.build.features,
                                                                                 backbone=args.backbone)))
    compute = {}
    if args.precision:  # the bank built and scored with it, as `up` does
        from scorer.features import ComputeConfig

        settings = replace(settings, precision=args.precision)
        compute = {"compute": ComputeConfig(args.precision)}
    with tempfile.TemporaryDirectory() as folder:
        bank = warmup_bank(settings, Path(folder), False)
    scorer = PatchCoreScorer(bank, **compute)
    line = SyntheticLine()
    started = time.perf_counter()
    jpegs = [cv2.imencode(".jpg", line.render(seq), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])[1]
             for seq in range(args.frames)]
    camera_ms = (time.perf_counter() - started) * 1000 / args.frames
    batch = WorkerSettings.max_batch
    bounded = "grids_over" in inspect.signature(scorer.score).parameters  # absent before scorer/bounded.py

    def grids_over(count: int) -> dict:  # as the worker: each frame's threshold (no camera settings in `up`)
        return {"grids_over": np.full(count, np.nan if scorer.threshold is None else scorer.threshold)} if bounded else {}

    def one_pass() -> float:
        begin = time.perf_counter()
        for first in range(0, len(jpegs), batch):
            images = [cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
                      for data in jpegs[first:first + batch]]
            scorer.score(images, maps=False, **grids_over(len(images)))
        return len(jpegs) / (time.perf_counter() - begin)

    one_pass()  # graphs made, memory touched
    passes = sorted(one_pass() for _ in range(args.passes))
    print(json.dumps({"scorer_frames_per_second": round(passes[len(passes) // 2], 2),
                      "passes": [round(p, 2) for p in passes], "batch": batch, "bank": len(bank.features),
                      "bounded": bounded,
                      "camera_ms_per_frame": round(camera_ms, 2)}))


if __name__ == "__main__":
    main()
