"""End-to-end streaming: frames/s and latency percentiles for max batch 1, 8 and 32, and the Redis
overhead per frame beside the scorer's own time. Embedded redis-server, synthetic line, CPU.

    .venv/bin/python bench/pipeline.py [--frames 192]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from patchcore.up import UpSettings, run_up, warmup_bank
from scorer import save_bank


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=192)
    parser.add_argument("--source", default="synthetic:seed=1")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bank_path = Path(tmp) / "bank.bank"
        save_bank(warmup_bank(UpSettings(source=args.source), Path(tmp), progress=False), bank_path)
        print(f"{args.frames} frames from {args.source}. Throughput: camera unthrottled (a file source waits "
              f"for the workers). Latency (capture -> result written): camera at 70 % of that throughput.")
        for max_batch in (1, 8, 32):
            run = lambda fps: run_up(UpSettings(source=args.source, bank=bank_path, frames=args.frames,  # noqa: E731
                                                max_batch=max_batch, fps=fps), echo=lambda _: None, progress=False)
            full = run(0)  # unthrottled
            paced = run(0.7 * full["frames_per_second"])
            per_frame_ms = 1000.0 / full["frames_per_second"]
            other = per_frame_ms - full["score_ms_mean"] - full["decode_ms_mean"]
            print(f"  max batch {max_batch:2d}: {full['frames_per_second']:6.2f} frames/s; at "
                  f"{0.7 * full['frames_per_second']:.1f} fps latency p50 {paced['latency_ms_p50']:7.1f} ms, "
                  f"p99 {paced['latency_ms_p99']:7.1f} ms; per frame: scorer {full['score_ms_mean']:6.1f} ms, "
                  f"decode {full['decode_ms_mean']:4.1f} ms, rest (Redis, JPEG encode, batching) {other:5.1f} ms")


if __name__ == "__main__":
    main()
