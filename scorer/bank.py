"""Memory bank files: safetensors (tensors) + JSON settings in its header, with a sha256 checksum.

Loading parses a JSON header and raw little-endian arrays; nothing in a bank file can execute code.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from .config import CoresetConfig, FeatureConfig

BANK_FORMAT = "patchcore-bank"
BANK_FORMAT_VERSION = 1
DEFAULT_MAX_BANK_BYTES = 2 << 30  # refuse larger files: a hostile bank must not exhaust memory


class BankError(ValueError):
    """A bank file that is corrupt, of another format, or does not fit the scorer."""


@dataclass(frozen=True)
class Calibration:
    """Decision threshold on image scores and how it was chosen."""

    threshold: float
    method: str  # "good-sigma" (good images only) or "f1" (labelled validation images)
    good_scores: tuple[float, ...] = ()  # held-back good images' scores, to recompute thresholds later
    sigmas: float = 3.0
    f1: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "method": self.method, "good_scores": list(self.good_scores),
                "sigmas": self.sigmas, "f1": self.f1}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Calibration":
        return cls(threshold=float(data["threshold"]), method=str(data["method"]),
                   good_scores=tuple(float(s) for s in data.get("good_scores", ())),
                   sigmas=float(data.get("sigmas", 3.0)), f1=data.get("f1"))


@dataclass(frozen=True)
class MemoryBank:
    features: np.ndarray  # [M, D] float32 coreset vectors
    feature_config: FeatureConfig
    coreset: CoresetConfig
    calibration: Calibration | None = None
    reweight_neighbours: int = 9
    info: dict[str, Any] = field(default_factory=dict)  # n_train_images, n_train_patches, build_seconds, ...

    def metadata(self) -> dict[str, Any]:
        return {
            "format": BANK_FORMAT,
            "format_version": BANK_FORMAT_VERSION,
            "features": self.feature_config.to_dict(),
            "coreset": vars(self.coreset).copy(),
            "calibration": self.calibration.to_dict() if self.calibration else None,
            "reweight_neighbours": self.reweight_neighbours,
            "info": self.info,
        }

    def with_calibration(self, calibration: Calibration) -> "MemoryBank":
        return MemoryBank(self.features, self.feature_config, self.coreset, calibration, self.reweight_neighbours, self.info)


def _checksum(features: np.ndarray, settings: str) -> str:
    digest = hashlib.sha256(settings.encode())
    digest.update(np.ascontiguousarray(features, dtype="<f4").tobytes())
    return digest.hexdigest()


def bank_to_bytes(bank: MemoryBank) -> bytes:
    settings = json.dumps(bank.metadata(), sort_keys=True)
    features = np.ascontiguousarray(bank.features, dtype="<f4")
    return st_save({"features": features}, metadata={"settings": settings, "sha256": _checksum(features, settings)})


def bank_from_bytes(data: bytes, max_bytes: int = DEFAULT_MAX_BANK_BYTES) -> MemoryBank:
    if len(data) > max_bytes:
        raise BankError(f"bank is {len(data)} bytes, over the {max_bytes}-byte limit")
    try:
        tensors = st_load(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + header_len])
    except (SafetensorError, ValueError, json.JSONDecodeError) as exc:
        raise BankError(f"not a readable bank file (truncated or corrupt): {exc}") from None
    meta = header.get("__metadata__") or {}
    settings_text = meta.get("settings")
    if settings_text is None or "features" not in tensors:
        raise BankError("not a patchcore bank file: settings or features missing")
    if _checksum(tensors["features"], settings_text) != meta.get("sha256"):
        raise BankError("bank checksum mismatch: the file is corrupt or was altered")
    settings = json.loads(settings_text)
    if settings.get("format") != BANK_FORMAT:
        raise BankError(f"not a patchcore bank file (format {settings.get('format')!r})")
    if settings.get("format_version") != BANK_FORMAT_VERSION:
        raise BankError(f"bank format version {settings.get('format_version')} is not supported "
                        f"(this build reads version {BANK_FORMAT_VERSION})")
    calibration = settings.get("calibration")
    return MemoryBank(
        features=tensors["features"].astype(np.float32, copy=False),
        feature_config=FeatureConfig.from_dict(settings["features"]),
        coreset=CoresetConfig(**settings["coreset"]),
        calibration=Calibration.from_dict(calibration) if calibration else None,
        reweight_neighbours=int(settings.get("reweight_neighbours", 9)),
        info=settings.get("info", {}),
    )


def bank_checksum(data: bytes) -> str:
    """sha256 of a bank file's bytes, as the registry stores it."""
    return hashlib.sha256(data).hexdigest()


def save_bank(bank: MemoryBank, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(bank_to_bytes(bank))
    tmp.replace(path)  # atomic: a crash never leaves a half-written bank


def load_bank(path: str | Path, max_bytes: int = DEFAULT_MAX_BANK_BYTES) -> MemoryBank:
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise BankError(f"cannot read bank {path}: {exc}") from None
    if size > max_bytes:
        raise BankError(f"bank {path} is {size} bytes, over the {max_bytes}-byte limit")
    try:
        return bank_from_bytes(path.read_bytes(), max_bytes)
    except BankError as exc:
        raise BankError(f"{path}: {exc}") from None
