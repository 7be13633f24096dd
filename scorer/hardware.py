"""What this machine's CPU can do fast: the instruction-set flags that decide low-precision arithmetic, read
once from /proc/cpuinfo (torch's own oneDNN check where there is no /proc, e.g. macOS)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

# flags reported in the profile and the eval report: vector width, int8 dot products, native bf16/fp16, AMX tiles
REPORTED_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16",
                  "amx_tile", "amx_bf16", "amx_int8", "amx_fp16")


@dataclass(frozen=True)
class CpuFeatures:
    """The CPU as the scorer sees it. `bf16`/`fp16`: convolutions in that type run natively (AVX-512 BF16 or
    AMX; AVX-512 FP16 or AMX-FP16), not emulated through float32 (several times slower than float32)."""

    model: str
    flags: frozenset[str]
    capability: str  # torch.backends.cpu.get_cpu_capability(): the widest kernels torch dispatches to
    cores: int  # CPUs this process may run on (its affinity), not the machine's

    @property
    def bf16(self) -> bool:
        if self.flags:
            return bool({"avx512_bf16", "amx_bf16"} & self.flags)
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())

    @property
    def fp16(self) -> bool:
        if self.flags:
            return bool({"avx512_fp16", "amx_fp16"} & self.flags)
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())

    @property
    def int8(self) -> bool:
        """int8 dot products in hardware (VNNI, AMX): what ONNX Runtime's int8 convolutions run fast on."""
        if self.flags:
            return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & self.flags)
        return False  # no flags read (not Linux): int8 stays off

    def describe(self) -> str:
        wanted = [f for f in REPORTED_FLAGS if f in self.flags]
        return f"{self.model or 'unknown CPU'} ({self.capability}; {' '.join(wanted) or 'no listed flags'})"

    def to_dict(self) -> dict:
        return {"model": self.model, "capability": self.capability, "cores": self.cores,
                "flags": {f: f in self.flags for f in REPORTED_FLAGS}, "bf16": self.bf16, "fp16": self.fp16, "int8": self.int8}


@lru_cache(maxsize=1)
def cpu_features() -> CpuFeatures:
    """This machine's CPU (read once)."""
    flags: set[str] = set()
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "flags" and not flags:
                flags = set(value.split())
            elif key.strip() == "model name" and not model:
                model = value.strip()
    except OSError:
        pass
    return CpuFeatures(model, frozenset(flags), torch.backends.cpu.get_cpu_capability(), available_cores())


def available_cores() -> int:
    """CPUs this process may use: its affinity where the OS has one (containers, taskset), else all."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class ThreadPlan:
    """How the cores are shared, decided together (thread_plan) rather than by each library's default.

    `intra_op`: torch's threads (backbone, pooling, search re-rank, maps). FAISS (the ivf/hnsw coarse
    search) runs in the same OpenMP runtime as torch in these wheels (faiss.omp_set_num_threads changes
    torch.get_num_threads() of the calling thread), so it gets the same count: there is one setting, not two.
    `decode`: threads decoding the next batch's images while this one is scored (cv2 releases the GIL): a quarter
    of the cores, at least one. Below SHARE_FROM cores torch keeps every core (decoding is short and overlaps);
    from SHARE_FROM on, torch gets the cores the decoders leave. Measured on the 2-core AMD EPYC, scoring 48
    bottle images (mobilenet_v2, maps): quiet, torch at 2 threads 30.5-32.0 images/s, at 1 thread 18.7-21.1;
    under load from other processes (load average 6-7) the order reverses (1 thread 9.21, 2 threads 3.63: an
    OpenMP team waits at every barrier for a thread the OS has descheduled), so a host shared with other busy
    processes should pin fewer threads (OMP_NUM_THREADS is not read: pass a plan). `worker_stages`: the worker's
    pipelined score and write threads (workers/worker.py) beside its reading thread: one batch in each stage."""

    cores: int
    intra_op: int
    decode: int
    worker_stages: int = 2

    def to_dict(self) -> dict:
        return {"cores": self.cores, "intra_op": self.intra_op, "decode": self.decode,
                "worker_stages": self.worker_stages}


SHARE_FROM = 8  # from this many cores on, torch leaves the decoders theirs


def thread_plan(cores: int | None = None) -> ThreadPlan:
    """The thread counts for `cores` (default: the CPUs this process may use, its affinity)."""
    cores = max(1, cores or available_cores())
    decode = max(1, cores // 4)
    return ThreadPlan(cores=cores, intra_op=cores if cores < SHARE_FROM else cores - decode, decode=decode)


def apply_thread_plan(plan: ThreadPlan | None = None) -> ThreadPlan:
    """Set torch's (and so FAISS's) threads from `plan` (default thread_plan()); every scorer, bank build and
    worker calls this one function. Cheap to call again; torch keeps the count for threads started later."""
    plan = plan or thread_plan()
    if torch.get_num_threads() != plan.intra_op:
        torch.set_num_threads(plan.intra_op)
    return plan
