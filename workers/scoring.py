"""The scorer stage (the scoring thread): each bank's scorer (workers/banks/cache.py), one backbone pass and one
search per bank, the bisection of a batch whose scoring raises, and the results (overlays included) to write.

A host fault is recognised by its type where the scorer raises it (HOST_FAULTS); anything else a batch raises is
the batch's own: it is split in halves until the frames that raise alone are found (Suspect outcomes).
"""
from __future__ import annotations

import logging
import time

import cv2
import numpy as np
import redis
import torch

from contracts.keys import Keys
from contracts.messages import Result
from runtime.control import SettingsWatch
from runtime.streams import REDIS_ERRORS
from scorer import BackboneError
from scorer.features import ComputeConfig
from scorer.hardware import apply_thread_plan
from scorer.views import patch_canvas
from workers.banks.cache import ActiveScorer, BankCache
from workers.banks.registry import BankRegistry
from workers.camera import CameraRegions, thresholds
from workers.outcomes import Batch, DeadLetter, Decoded, Entry, Held, Outcome, Outcomes, Scored, Suspect, redis_held
from workers.settings import WorkerSettings

log = logging.getLogger("patchcore.worker")

# What says that this host cannot score now (memory, device, files, weights), not that a frame is bad: CUDA's own
# errors are torch.AcceleratorError (a sticky device fault) and torch.OutOfMemoryError
HOST_FAULTS = (MemoryError, OSError, BackboneError, torch.OutOfMemoryError, torch.AcceleratorError)


class FlaggedShare:
    """Each bank's recent share of frames found anomalous: an exponential average weighted per frame (about the
    last 50 frames). The bounded score (scorer/bounded.py) saves while few frames are flagged and costs more than
    it saves when most are (each flagged frame's patches are then all searched anyway; bench/bounded.py's sweep,
    docs/scorer.md: x1.08-1.11 at half flagged on bottle and macaroni1, x0.92-1.07 at three quarters, even between
    the two), so the worker bounds only while the share is under LIMIT. Used by the scoring thread alone."""

    FRAME_WEIGHT = 0.02
    LIMIT = 0.5

    def __init__(self) -> None:
        self.shares: dict[str, float] = {}

    def low(self, bank: str) -> bool:
        return self.shares.get(bank, 0.0) < self.LIMIT

    def add(self, bank: str, flagged: int, frames: int) -> None:
        share = self.shares.get(bank, 0.0)
        weight = 1.0 - (1.0 - self.FRAME_WEIGHT) ** frames
        self.shares[bank] = share + weight * (flagged / frames - share)


class ScoreStage:
    def __init__(self, client: redis.Redis, settings: WorkerSettings, keys: Keys):
        self.client, self.settings, self.keys = client, settings, keys
        apply_thread_plan()  # torch's threads sized with the rest of the process (scorer.hardware.thread_plan)
        self.banks = BankCache(BankRegistry(client, keys, signing_key=settings.bank_key), settings.device,
                               settings.index, settings.weights,
                               ComputeConfig(settings.precision, settings.channels_last, settings.engine),
                               search=settings.search)
        self.cameras = SettingsWatch(client, keys)  # per-camera threshold and ROI, reloaded when their version moves
        self.regions = CameraRegions()
        self.flagged = FlaggedShare()

    def preload(self) -> None:
        """Every active bank, before its first frame: readiness means "can score"."""
        self.banks.preload()

    def score(self, batch: Batch) -> Outcomes:
        """Every decoded frame's outcome, after the reader's (dead letters). Redis failing to name a bank's
        active version (a fault that passes) holds the batch's frames."""
        try:
            self.cameras.check()  # one GET: a settings change applies from the next batch on
            outcomes = [outcome for bank, items in batch.by_bank.items() for outcome in self._score_bank(bank, items)]
        except REDIS_ERRORS as exc:  # the registry could not be read
            outcomes = list(redis_held(self.client, [d.entry for items in batch.by_bank.values() for d in items], exc))
        return Outcomes(batch.entries, batch.outcomes + tuple(outcomes))

    def _score_bank(self, bank_name: str, items: tuple[Decoded, ...]) -> list[tuple[Entry, Outcome]]:
        active = self.banks.get(bank_name)
        if active is None:
            reason, host = self.banks.why(bank_name)
            return [(d.entry, Held(f"no loadable active bank {bank_name!r}: {reason}", host)) for d in items]
        outcomes: list[tuple[Entry, Outcome]] = []
        kept = []
        for d in items:
            reason = active.scorer.refusal(*d.image.shape[:2])
            if reason is None:
                kept.append(d)
            else:
                outcomes.append((d.entry, DeadLetter(f"frame cannot be scored in bank {bank_name!r}: {reason}")))
        if not kept:
            return outcomes
        try:
            parts, suspects = self._bisect(active, kept)
        except HOST_FAULTS as exc:
            return outcomes + [(d.entry, Held(f"scoring failed on this host: {type(exc).__name__}: {exc}", True))
                               for d in kept]
        for part, result, score_ms in parts:
            outcomes += self._results(active, part, result, score_ms)
        for d, error in suspects:  # left pending: reclaimed after claim_idle_ms, counted each time
            log.error("frame raises when scored alone; left pending",
                      extra={"fields": {"stream": d.entry.stream, "id": d.entry.entry_id.decode(),
                                        "deliveries": d.entry.deliveries, "error": error}})
            outcomes.append((d.entry, Suspect(error)))
        return outcomes

    def _bisect(self, active: ActiveScorer, items: list[Decoded]):
        """Score `items` in one pass; if that raises (not a host fault), halve until the frames that raise on
        their own are found. Returns ([(items, ScoreResult, ms per frame)], [(item, error)])."""
        started = time.perf_counter()
        try:
            settings = [self.cameras.of(d.frame.camera) for d in items]
            regions = [self.regions.region(s, *d.image.shape[:2]) for s, d in zip(settings, items)]
            # patch distances only for the frames found anomalous (their overlays), unless every result carries
            # them or most frames are anomalous lately (FlaggedShare)
            bounded = not self.settings.result_maps and self.flagged.low(active.name)
            grids_over = _limits(settings, active.scorer) if bounded else None
            result = active.scorer.score([d.image for d in items], maps=False, regions=regions, grids_over=grids_over)
        except HOST_FAULTS:
            raise
        except Exception as exc:  # noqa: BLE001 - a poison batch must not take good frames down with it
            if len(items) == 1:
                return [], [(items[0], f"{type(exc).__name__}: {exc}")]
            log.warning("batch scoring failed; splitting it", extra={"fields": {"frames": len(items), "error": str(exc)}})
            half = len(items) // 2
            first, second = self._bisect(active, items[:half]), self._bisect(active, items[half:])
            return first[0] + second[0], first[1] + second[1]
        return [(items, result, (time.perf_counter() - started) * 1000 / len(items))], []

    def _results(self, active: ActiveScorer, items: list[Decoded], result, score_ms: float) -> list[tuple[Entry, Scored]]:
        """Each frame's Result message, and the overlay JPEG of those found anomalous (their heatmaps only)."""
        scorer = active.scorer
        now = time.time()
        settings = [self.cameras.of(d.frame.camera) for d in items]
        limits = _limits(settings, scorer)
        verdicts = scorer.verdict(result.image_scores, limits)
        self.flagged.add(active.name, int(verdicts.sum()), len(items))
        rows = np.flatnonzero(verdicts).tolist()
        maps = dict(zip(rows, scorer.heatmaps(result, rows)))
        out = []
        for i, d in enumerate(items):
            entry, frame, image = d.entry, d.frame, d.image
            score = float(result.image_scores[i])
            anomalous = bool(verdicts[i])
            threshold = None if np.isnan(limits[i]) else float(limits[i])
            overlay_key = jpeg = None
            if anomalous:
                overlay_key = self.keys.overlay(frame.camera, frame.seq)
                if isinstance(image, torch.Tensor):  # decoded on the GPU
                    image = image.cpu().numpy()
                jpeg = cv2.imencode(".jpg", scorer.overlay(image, maps[i], score, threshold),
                                    [cv2.IMWRITE_JPEG_QUALITY, 85])[1].tobytes()
            message = Result(
                camera=frame.camera, line=frame.line, seq=frame.seq, captured_at=frame.captured_at, scored_at=now,
                score=score, threshold=threshold, anomalous=anomalous, bank=active.name,
                bank_version=active.version, worker=self.settings.name,
                settings_version=None if settings[i] is None else settings[i].version,
                timings_ms={"queue": round((entry.picked_at - frame.captured_at) * 1000, 2),
                            "decode": round(d.decode_ms, 2), "score": round(score_ms, 2)},
                overlay_key=overlay_key, **(_patch_map(patch_canvas(result.patch_scores[i], result.layouts[i]))
                                            if self.settings.result_maps else {}))
            out.append((entry, Scored(message, jpeg, d.decode_ms, score_ms)))
        return out


def _limits(settings: list, scorer) -> np.ndarray:
    """Each frame's threshold [B] (NaN: none) from its camera's settings (read at the batch's start), else the
    bank's. The verdicts and the scorer's `grids_over` both take these."""
    limits = thresholds(settings, scorer.threshold)
    if limits is None:
        limits = np.full(len(settings), np.nan if scorer.threshold is None else scorer.threshold, dtype=np.float64)
    return limits


def _patch_map(grid: np.ndarray) -> dict:
    top = float(grid.max())
    quantised = np.round(grid / top * 255).astype(np.uint8) if top > 0 else np.zeros(grid.shape, np.uint8)
    return {"patch_map": quantised.tobytes(), "patch_map_shape": tuple(grid.shape), "patch_map_max": top}
