"""What the worker's stages hand each other (frozen): frames taken, batches to score, each frame's outcome, and the
events the scorer and writer threads report back to the loop.

reader --Batch--> scorer --Outcomes--> writer; scorer and writer --Handed | Written | Failed--> loop (events).
Each frame of a batch ends with exactly one outcome: Scored (its result, written with its acknowledgement),
DeadLetter (it can never be accepted), Held (an infrastructure fault: kept pending, retried) or Suspect (it raises
when scored alone: left pending, reclaimed after claim_idle_ms, a counted delivery).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Union

import numpy as np
import redis
import torch

from contracts.messages import Frame, Result
from runtime.connection import refresh_topology
from runtime.streams import redis_fault


@dataclass(frozen=True)
class Entry:
    """A frame entry this worker took from a camera stream (pending under its name until its outcome is written)."""
    stream: str
    entry_id: bytes
    raw: bytes  # the packed Frame message
    picked_at: float  # time.time() when read
    deliveries: int = 1  # XPENDING's count when this worker got it


@dataclass(frozen=True)
class Decoded:
    """A frame ready to score."""
    entry: Entry
    frame: Frame
    image: np.ndarray | torch.Tensor  # HxWx3 uint8 RGB (a tensor on the GPU when decoded there)
    decode_ms: float  # unpacking and its share of decoding the batch


# ---- a frame's outcome ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scored:
    result: Result
    overlay: bytes | None  # the heatmap overlay JPEG of an anomalous frame (result.overlay_key names it)
    decode_ms: float
    score_ms: float  # per frame, of the pass that scored it


@dataclass(frozen=True)
class DeadLetter:
    reason: str


@dataclass(frozen=True)
class Held:
    reason: str
    host_fault: bool  # this host cannot score (weights, memory, device): it stops taking frames


@dataclass(frozen=True)
class Suspect:
    error: str


Outcome = Union[Scored, DeadLetter, Held, Suspect]


# ---- between the stages ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Batch:
    """Reader -> scorer: the frames taken, those decoded (by bank name, in batch order), and the outcomes the
    reader already gave (dead letters: poison, malformed, undecodable)."""
    entries: tuple[Entry, ...]
    by_bank: Mapping[str, tuple[Decoded, ...]]
    outcomes: tuple[tuple[Entry, Outcome], ...]


@dataclass(frozen=True)
class Outcomes:
    """Scorer -> writer: every frame's outcome (dead letters first, results in batch order per bank)."""
    entries: tuple[Entry, ...]  # the whole batch: held together when Redis refuses its writes
    outcomes: tuple[tuple[Entry, Outcome], ...]


@dataclass(frozen=True)
class Preload:
    """Loop -> scorer: load every active bank (at a refresh, with nothing in flight)."""


# ---- events back to the loop -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Handed:
    """The scorer is free: its batch went on to the writer (or its Preload is done)."""


@dataclass(frozen=True)
class Written:
    """A batch's outcomes are written; `held` are to be kept pending and retried."""
    results: int  # results this worker wrote (0 for a frame another worker finished first)
    deadlettered: int
    suspects: int
    held: tuple[tuple[Entry, Held], ...]


@dataclass(frozen=True)
class Failed:
    """A stage raised (e.g. NOGROUP, or a bug); the loop raises it. `stage`: "preload", "score" or "write"."""
    stage: str
    error: BaseException


Event = Union[Handed, Written, Failed]


def redis_held(client: redis.Redis, entries, exc: BaseException) -> tuple[tuple[Entry, Held], ...]:
    """`entries` held through a Redis fault that passes with time (OOM, READONLY, an outage, ...); any other
    Redis error (and NOGROUP, which the serve loop handles) is raised again."""
    fault = redis_fault(exc)
    if fault in (None, "nogroup"):
        raise exc
    refresh_topology(client)  # a cluster's node met directly (results are written per node) moved or died
    return tuple((entry, Held(f"redis {fault}: {exc}", False)) for entry in entries)
