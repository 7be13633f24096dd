"""End-to-end streaming: frames/s and latency percentiles for max batch 1, 8 and 32, the worker pipelined
(--prefetch: read/decode, score and write overlap) and not, in the same run, and the Redis overhead per frame
beside the scorer's own time. Embedded redis-server, synthetic line, CPU (or the GPU `patchcore up` finds).

    .venv/bin/python bench/pipeline.py [--frames 192] [--prefetch both|on|off] [--batches 1,8,32] [--repeat 3]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from patchcore.up import UpSettings, run_up, warmup_bank
from scorer import save_bank

from results import write_result  # bench/results.py, beside this script


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=192)
    parser.add_argument("--source", default="synthetic:seed=1")
    parser.add_argument("--prefetch", choices=("both", "on", "off"), default="both")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each setting, interleaved; medians printed")
    args = parser.parse_args()
    modes = {"both": (False, True), "on": (True,), "off": (False,)}[args.prefetch]
    rows = []  # one per max batch and mode: docs/operations.md's pipeline table
    with tempfile.TemporaryDirectory() as tmp:
        bank_path = Path(tmp) / "bank.bank"
        save_bank(warmup_bank(UpSettings(source=args.source), Path(tmp), progress=False), bank_path)
        print(f"{args.frames} frames from {args.source}, medians of {args.repeat} interleaved run(s). Throughput: "
              f"camera unthrottled (a file source waits for the workers). Latency (capture -> result written): "
              f"camera at 70 % of the first mode's throughput, the same pace for every mode.")
        for max_batch in map(int, args.batches.split(",")):
            def run(prefetch, fps):
                return run_up(UpSettings(source=args.source, bank=bank_path, frames=args.frames, max_batch=max_batch,
                                         fps=fps, prefetch=prefetch), echo=lambda _: None, progress=False)

            full = {mode: [] for mode in modes}
            for _ in range(args.repeat):
                for mode in modes:
                    full[mode].append(run(mode, 0))  # unthrottled
            median = lambda runs, key: float(np.median([r[key] for r in runs]))  # noqa: E731
            base = median(full[modes[0]], "frames_per_second")
            pace = 0.7 * base
            paced = {mode: [] for mode in modes}
            for _ in range(args.repeat):
                for mode in modes:
                    paced[mode].append(run(mode, pace))
            for mode in modes:
                fps = median(full[mode], "frames_per_second")
                score_ms, decode_ms = median(full[mode], "score_ms_mean"), median(full[mode], "decode_ms_mean")
                print(f"  max batch {max_batch:2d}, {'pipelined' if full[mode][0]['pipelined'] else 'serial   '}: "
                      f"{fps:6.2f} frames/s (x{fps / base:.2f}); at {pace:.1f} fps latency p50 "
                      f"{median(paced[mode], 'latency_ms_p50'):7.1f} ms, p99 {median(paced[mode], 'latency_ms_p99'):7.1f} ms; "
                      f"per frame: scorer {score_ms:6.1f} ms, decode {decode_ms:4.1f} ms, rest (Redis, JPEG encode, "
                      f"batching; < 0 where pipelining overlaps them) {1000.0 / fps - score_ms - decode_ms:5.1f} ms",
                      flush=True)
                pipelined = full[mode][0]["pipelined"]
                rows.append({"max_batch": max_batch, "worker": "pipelined (default)" if pipelined else "unpipelined",
                             "frames_per_s": round(fps, 1), **({"x_unpipelined": round(fps / base, 2)} if pipelined else {}),
                             "paced_fps": round(pace, 1),
                             "latency_p50_ms": round(median(paced[mode], "latency_ms_p50"), 1),
                             "latency_p99_ms": round(median(paced[mode], "latency_ms_p99"), 1),
                             "scorer_ms_per_frame": round(score_ms, 1), "decode_ms": round(decode_ms, 1)})
    write_result("pipeline", {"frames": args.frames, "source": args.source, "repeat": args.repeat, "rows": rows})


if __name__ == "__main__":
    main()
