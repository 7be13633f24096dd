"""The worker's settings (frozen, the one place each default is written) and its report."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

from contracts.framecodec import MAX_PIXELS
from runtime.deadletter import DeadLetterSettings
from scorer.index import SearchConfig


@dataclass(frozen=True)
class WorkerSettings:
    name: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    max_batch: int = 8
    max_wait_ms: int = 50
    claim_idle_ms: int = 30_000  # reclaim frames a dead worker left unacknowledged after this long
    results_maxlen: int = 10_000
    overlay_ttl_s: int = 3600
    result_maps: bool = False  # attach the patch-distance grid (uint8, e.g. 28x28) to every result
    max_frame_bytes: int = 16 << 20
    max_pixels: int = MAX_PIXELS  # a frame's height x width at most (8K UHD); checked in the header, before decoding
    max_deliveries: int = 5  # a frame delivered more often than this is dead-lettered as poison
    retry_initial_s: float = 0.5  # held frames (infrastructure faults) are retried after this, doubling ...
    retry_max_s: float = 10.0  # ... up to this
    deadletters: DeadLetterSettings = DeadLetterSettings()
    device: str = "auto"
    index: str = "auto"  # engine of the flat search
    search: SearchConfig = SearchConfig()  # nearest-neighbour search (scorer.index)
    weights: str | None = None
    # the backbone's arithmetic and memory layout; "auto"/None: the device's default (scorer.features.ComputeConfig)
    precision: str = "auto"
    channels_last: bool | None = None
    # pipelining: read and decode the next batch while the current one is scored, and write the previous one's
    # results meanwhile, once a batch has gone through cleanly (so a worker that cannot score takes one batch, not
    # two: tests/test_poison.py). A fault that starts mid-run finds up to three batches taken (read, scored, being
    # written), which it then holds too. On by default: on the 2-core CPU, max batch 8, 1.02-1.21x the frames/s
    # and about half the p50 latency at 70 % load (bench/pipeline.py --repeat 3; README "GPU worker", Pipelining)
    prefetch: bool = True
    refresh_s: float = 2.0  # how often to look for new cameras and reclaim pending frames
    # after writing a batch's results, wait until this many replicas have them (Redis WAIT), at most wait_ms:
    # a result acknowledged but not yet replicated when a primary dies is lost with the acknowledgement
    # (the frame is scored again after the failover); 0: do not wait
    wait_replicas: int = 0
    wait_ms: int = 100
    bank_key: bytes | None = field(default=None, repr=False)  # load only banks signed with this key (HMAC-SHA256)


@dataclass
class WorkerReport:
    batches: int = 0
    frames: int = 0
    results: int = 0
    deadlettered: int = 0
    reclaimed: int = 0
    held: int = 0  # frames kept pending through an infrastructure fault (each time)
    suspects: int = 0  # frames left pending because their scoring raised on their own
