"""Benchmark figures as JSON under bench/results/: the machine, date, command and git commit beside the figures.

Every bench script that prints figures also hands them to `write_result`; bench/tables.py renders the measured
tables of docs/*.md from these files (tests/test_docs_tables.py checks that the docs equal what it renders), so
no figure is copied by hand. One file per bench (and per data set where a bench runs on one): a new run
replaces the file, git keeps the earlier ones.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = RESULTS.parents[1]
# the CPU flags that explain a figure (vector width, bf16/AMX matrix units); the full list is noise
FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile")


def cpu() -> dict:
    """CPU model, logical cores and the relevant flags, from /proc/cpuinfo where there is one."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    if found := re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE):
        model = found.group(1).strip()
    if found := re.search(r"^flags\s*:\s*(.+)$", text, re.MULTILINE):
        flags = set(found.group(1).split())
    return {"model": model, "cores": os.cpu_count(), "flags": [flag for flag in FLAGS if flag in flags]}


def machine() -> dict:
    """Where the figures were measured: CPU, OS, Python, and torch and its GPU when the bench loaded torch."""
    about = {"cpu": cpu(), "system": platform.platform(), "python": platform.python_version()}
    torch = sys.modules.get("torch")  # only when the bench imported it: never import torch here
    if torch is not None:
        about["torch"] = torch.__version__
        if torch.cuda.is_available():
            about["gpu"] = torch.cuda.get_device_name(0)
    try:
        about["load_average_1min"] = round(os.getloadavg()[0], 2)  # others' load skews timings: say how much
    except OSError:
        pass
    return about


def git_commit() -> str | None:
    """The checkout's commit, with `+dirty` when tracked files differ from it; None outside a git checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("+dirty" if dirty else "")) or None


def patchcore_json(checkout: Path, *args: str, timeout: float = 3600) -> dict:
    """`patchcore ARGS --json F` run by a checkout's own .venv, in that checkout: the JSON it wrote. A failed run
    stops the bench with the tail of its stderr."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        done = subprocess.run([str(checkout / ".venv" / "bin" / "patchcore"), *args, "--json", out.name],
                              capture_output=True, text=True, cwd=checkout, timeout=timeout)
        if done.returncode != 0:
            raise SystemExit(f"patchcore {args[0]} failed in {checkout}: {done.stderr[-2000:]}")
        return json.loads(Path(out.name).read_text())


def finite(value):
    """`value` with every NaN or infinity replaced by None (JSON has neither; a bench's 'not measured')."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    return value


def write_result(name: str, figures: dict, command: str | None = None, directory: Path | None = None) -> Path:
    """Write `figures` (plain JSON values) as bench/results/<name>.json with the machine, UTC date, command
    (default: this process's command line) and git commit; returns the path. NaN and infinities become null.
    Written atomically."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]*", name):
        raise ValueError(f"result name {name!r}: lower-case letters, digits, '_', '.', '-' only")
    record = {
        "name": name,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command or " ".join([Path(sys.executable).name, *sys.argv]),
        "git_commit": git_commit(),
        "machine": machine(),
        "figures": finite(figures),
    }
    directory = directory or RESULTS
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(record, indent=1, allow_nan=False) + "\n")
    partial.replace(path)
    print(f"figures written to {path}", flush=True)
    return path
