"""The streaming worker's capacity and latency of two checkouts, back to back: `patchcore up --fps 0` (frames/s of
the whole service on this machine, unthrottled) and `patchcore up` at its paced default (latency p50 / p99), for
a baseline (e.g. the commit before a change, checked out with its own .venv) and this checkout, alternated over
--rounds. Prints a row per run and writes bench/results/worker_speed.json.

    .venv/bin/python bench/worker_speed.py --baseline /path/to/old/checkout [--rounds 2] [--frames 400]
        [--label NAME]   # e.g. the baseline's commit: worker_speed-NAME.json (beside another baseline's)
        [--precision int8]   # this checkout's `up` with an option (the baseline with its default)
        [--scorer-frames 400]   # each round also times each checkout's scorer alone (bench/scorer_alone.py); 0: not

The scorer alone is the worker's ceiling: the same frames and bank, decoded and scored in the worker's batches
with nothing else on the cores (no camera, Redis or store); its row says how much of the scorer's own gain `up`
shows.

Both run the same source and backbone (`--backbone`, default mobilenet_v2, so the ratio compares the code, not the
backbone `auto` resolves to in each checkout); each run builds its bank from the source's first frames, untimed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from results import patchcore_json, write_result  # bench/results.py

ROOT = Path(__file__).resolve().parents[1]


def run_up(checkout: Path, args: list[str]) -> dict:
    """One `patchcore up ARGS --json F` of a checkout (its own .venv), its summary."""
    return patchcore_json(checkout, "up", *args, timeout=1800)


def run_scorer_alone(checkout: Path, frames: int, backbone: str, precision: str | None) -> dict:
    """bench/scorer_alone.py run by a checkout's own .venv on that checkout's code: its JSON line."""
    command = [str(checkout / ".venv" / "bin" / "python"), str(ROOT / "bench" / "scorer_alone.py"),
               "--frames", str(frames), "--backbone", backbone, *(["--precision", precision] if precision else [])]
    done = subprocess.run(command, capture_output=True, text=True, cwd=checkout, timeout=1800,
                          env={**os.environ, "PYTHONPATH": str(checkout)})
    if done.returncode != 0:
        raise SystemExit(f"scorer_alone.py failed in {checkout}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", type=Path, required=True, help="checkout of the baseline, with its .venv")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--frames", type=int, default=400, help="frames of each unthrottled run")
    parser.add_argument("--paced-frames", type=int, default=200, help="frames of each paced run (0: none)")
    parser.add_argument("--source", default="synthetic")
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--precision", default=None,
                        help="run this checkout's `up` with --precision P (e.g. int8; the baseline keeps its default); "
                             "the results file is then worker_speed-P[-LABEL].json")
    parser.add_argument("--scorer-frames", type=int, default=400,
                        help="frames of each checkout's scorer-alone run per round (0: none)")
    parser.add_argument("--label", default=None,
                        help="suffix of the results file (e.g. the baseline's commit): worker_speed-LABEL.json")
    args = parser.parse_args()
    common = ["--source", args.source, "--backbone", args.backbone]
    modes = {"unthrottled": [*common, "--frames", str(args.frames), "--fps", "0"]}
    if args.paced_frames:
        modes["paced"] = [*common, "--frames", str(args.paced_frames)]
    extra = {"this": ["--precision", args.precision] if args.precision else [], "baseline": []}
    runs = {(mode, which): [] for mode in modes for which in ("baseline", "this")}
    alone = {"baseline": [], "this": []}
    for _ in range(args.rounds):
        for mode, up_args in modes.items():
            for which, checkout in (("baseline", args.baseline), ("this", ROOT)):
                summary = run_up(checkout, [*up_args, *extra[which]])
                runs[mode, which].append(summary)
                print(json.dumps({"mode": mode, "checkout": which, **{key: summary.get(key) for key in (
                    "frames_in", "results_out", "frames_per_second", "latency_ms_p50", "latency_ms_p99",
                    "kept_up")}}), flush=True)
        for which, checkout in (("baseline", args.baseline), ("this", ROOT)) if args.scorer_frames else ():
            alone[which].append(run_scorer_alone(checkout, args.scorer_frames, args.backbone,
                                                 args.precision if which == "this" else None))
            print(json.dumps({"mode": "scorer alone", "checkout": which, **alone[which][-1]}), flush=True)
    rows = []
    for mode in modes:
        median = {(which, key): statistics.median(s[key] for s in runs[mode, which])
                  for which in ("baseline", "this")
                  for key in ("frames_per_second", "latency_ms_p50", "latency_ms_p99")}
        rows.append({"mode": mode, "command": "patchcore up " + " ".join(modes[mode]),
                     **{f"{which}_{key}": round(value, 2) for (which, key), value in median.items()},
                     "ratio": round(median["this", "frames_per_second"] / median["baseline", "frames_per_second"], 2),
                     "complete": all(s["results_out"] == s["frames_in"] for mode_runs in
                                     (runs[mode, "baseline"], runs[mode, "this"]) for s in mode_runs),
                     "rounds": args.rounds,
                     "baseline_runs": [s["frames_per_second"] for s in runs[mode, "baseline"]],
                     "this_runs": [s["frames_per_second"] for s in runs[mode, "this"]]})
        print(json.dumps(rows[-1]), flush=True)
    if args.scorer_frames:
        median = {which: statistics.median(r["scorer_frames_per_second"] for r in alone[which]) for which in alone}
        rows.append({"mode": "scorer alone", "command": f"bench/scorer_alone.py --frames {args.scorer_frames}",
                     "baseline_frames_per_second": median["baseline"], "this_frames_per_second": median["this"],
                     "ratio": round(median["this"] / median["baseline"], 2), "rounds": args.rounds,
                     "baseline_runs": [r["scorer_frames_per_second"] for r in alone["baseline"]],
                     "this_runs": [r["scorer_frames_per_second"] for r in alone["this"]],
                     "bank": alone["this"][0]["bank"], "batch": alone["this"][0]["batch"],
                     "camera_ms_per_frame": statistics.median(r["camera_ms_per_frame"] for which in alone
                                                              for r in alone[which])})
        print(json.dumps(rows[-1]), flush=True)
    baseline_commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=args.baseline, capture_output=True,
                                     text=True).stdout.strip()
    name = "-".join(["worker_speed", *(part for part in (args.precision, args.label) if part)])
    write_result(name, {"baseline_commit": baseline_commit, "precision": args.precision, "rows": rows},
                 command=" ".join(["bench/worker_speed.py", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
