"""`patchcore bank update`: new good images (files, dismissed false alarms, frames named by camera and
sequence number) added to a published bank without a full rebuild, published as a new version."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import redis

from contracts.keys import Keys
from contracts.messages import Frame, MessageError
from runtime.control import record as audit
from workers.banks.registry import BankRegistry
from workers.banks.updates import UpdateError, consume, queued_frames
from workers.settings import WorkerSettings
from scorer import bank_from_bytes, bank_to_bytes, load_image, update_bank
from scorer.bank import bank_size
from scorer.evaluate import bank_summary
from contracts.framecodec import decode_frame


@dataclass(frozen=True)
class UpdateReport:
    bank: str
    from_version: int
    version: int
    active: bool
    images: int
    added_features: int
    bank_size: int
    threshold_before: float | None
    threshold: float | None
    seconds: float


def frames_named(client: redis.Redis, keys: Keys, names: list[str]) -> list[np.ndarray]:
    """Frames given as CAMERA:SEQ, from the copies workers keep of anomalous frames."""
    images = []
    for name in names:
        camera, _, seq = name.rpartition(":")
        if not camera or not seq.isdigit():
            raise UpdateError(f"frame {name!r}: expected CAMERA:SEQ")
        raw = client.get(keys.frame_copy(camera, int(seq)))
        if raw is None:
            raise UpdateError(f"no stored frame for {name} (only anomalous frames are kept, for a limited time)")
        images.append(decode_frame(Frame.unpack(raw)))
    return images


def update_published_bank(client: redis.Redis, keys: Keys, name: str, files: list[Path], frames: list[str],
                          use_queue: bool = True, activate: bool = True, weights: str | None = None,
                          device: str = WorkerSettings.device, progress: bool = False) -> UpdateReport:
    started = time.perf_counter()
    registry = BankRegistry(client, keys)
    version = registry.active(name)
    if version is None:
        raise UpdateError(f"bank {name!r} has no active version to update")
    bank = bank_from_bytes(registry.fetch(name, version))
    images = [load_image(p) for p in files] + frames_named(client, keys, frames)
    queued = queued_frames(client, keys, name) if use_queue else []
    for _, frame in queued:
        try:
            images.append(decode_frame(frame))
        except (MessageError, ValueError):
            continue
    if not images:
        raise UpdateError(f"nothing to add to bank {name!r}: no files, frames or queued dismissed alarms")
    updated = update_bank(bank, images, weights=weights, device=device, progress=progress)
    new_version = registry.publish(name, bank_to_bytes(updated), {"source": "patchcore bank update",
                                                                  "from_version": version,
                                                                  "added_images": len(images),
                                                                  **bank_summary(updated)}, activate)
    consume(client, keys, name, [entry_id for entry_id, _ in queued])
    threshold = lambda b: b.calibration.threshold if b.calibration else None  # noqa: E731
    audit(client, keys, "bank.update", name, {"version": version, "threshold": threshold(bank),
                                              "bank_size": bank_size(bank)},
          {"version": new_version, "activated": activate, "threshold": threshold(updated),
           "bank_size": bank_size(updated), "added_images": len(images), "queued_frames_used": len(queued)})
    return UpdateReport(name, version, new_version, activate, len(images), bank_size(updated) - bank_size(bank),
                        bank_size(updated), threshold(bank), threshold(updated),
                        round(time.perf_counter() - started, 2))
