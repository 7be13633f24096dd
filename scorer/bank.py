"""Memory bank files: safetensors (tensors) + JSON settings in its header, with a sha256 checksum.

Loading parses a JSON header and raw little-endian arrays; nothing in a bank file can execute code.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from .config import CoresetConfig, FeatureConfig
from .views import ViewConfig

BANK_FORMAT = "patchcore-bank"
BANK_FORMAT_VERSION = 2  # 2: view and region of interest; version 1 files read as the crop view
READABLE_VERSIONS = (1, 2)
DEFAULT_MAX_BANK_BYTES = 2 << 30  # refuse larger files: a hostile bank must not exhaust memory


class BankError(ValueError):
    """A bank file that is corrupt, of another format, or does not fit the scorer."""


@dataclass(frozen=True)
class Calibration:
    """Decision threshold on image scores and how it was chosen."""

    threshold: float
    # "kfold-gumbel" (good images only, at a target false-alarm rate), "f1" (labelled validation images),
    # "good-sigma" (banks of format 1: mean + 3 std of 10 % held-back images)
    method: str
    good_scores: tuple[float, ...] = ()  # every training image's score against a bank without it
    false_alarm_rate: float | None = None  # the target rate the threshold was set for
    folds: int | None = None
    f1: float | None = None
    tail_pvalue: float | None = None  # KS p-value of the good scores against the fitted Gumbel (low: misfit)

    def to_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "method": self.method, "good_scores": list(self.good_scores),
                "false_alarm_rate": self.false_alarm_rate, "folds": self.folds, "f1": self.f1,
                "tail_pvalue": self.tail_pvalue}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Calibration":
        rate, folds = data.get("false_alarm_rate"), data.get("folds")
        return cls(threshold=float(data["threshold"]), method=str(data["method"]),
                   good_scores=tuple(float(s) for s in data.get("good_scores", ())),
                   false_alarm_rate=None if rate is None else float(rate),
                   folds=None if folds is None else int(folds), f1=data.get("f1"),
                   tail_pvalue=None if data.get("tail_pvalue") is None else float(data["tail_pvalue"]))


@dataclass(frozen=True)
class MemoryBank:
    features: np.ndarray  # [M, D] float32 coreset vectors
    feature_config: FeatureConfig
    coreset: CoresetConfig
    calibration: Calibration | None = None
    reweight_neighbours: int = 9
    info: dict[str, Any] = field(default_factory=dict)  # n_train_images, n_train_patches, build_seconds, ...
    view: ViewConfig = field(default_factory=ViewConfig)
    roi: np.ndarray | None = None  # bool [H, W] region of interest in frame coordinates (any resolution)

    def metadata(self) -> dict[str, Any]:
        return {
            "format": BANK_FORMAT,
            "format_version": BANK_FORMAT_VERSION,
            "features": self.feature_config.to_dict(),
            "view": self.view.to_dict(),
            "coreset": vars(self.coreset).copy(),
            "calibration": self.calibration.to_dict() if self.calibration else None,
            "reweight_neighbours": self.reweight_neighbours,
            "info": self.info,
        }

    def with_calibration(self, calibration: Calibration) -> "MemoryBank":
        return replace(self, calibration=calibration)


def _checksum(tensors: dict[str, np.ndarray], settings: str) -> str:
    digest = hashlib.sha256(settings.encode())
    for name in sorted(tensors):
        digest.update(np.ascontiguousarray(tensors[name]).tobytes())
    return digest.hexdigest()


def bank_to_bytes(bank: MemoryBank) -> bytes:
    settings = json.dumps(bank.metadata(), sort_keys=True)
    tensors = {"features": np.ascontiguousarray(bank.features, dtype="<f4")}
    if bank.roi is not None:
        tensors["roi"] = np.ascontiguousarray(bank.roi, dtype=np.uint8)
    return st_save(tensors, metadata={"settings": settings, "sha256": _checksum(tensors, settings)})


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
    if _checksum(tensors, settings_text) != meta.get("sha256"):
        raise BankError("bank checksum mismatch: the file is corrupt or was altered")
    try:
        settings = json.loads(settings_text)
    except json.JSONDecodeError as exc:
        raise BankError(f"bank settings are not JSON: {exc}") from None
    if settings.get("format") != BANK_FORMAT:
        raise BankError(f"not a patchcore bank file (format {settings.get('format')!r})")
    version = settings.get("format_version")
    if version not in READABLE_VERSIONS:
        raise BankError(f"bank format version {version} is not supported "
                        f"(this build reads versions {', '.join(map(str, READABLE_VERSIONS))})")
    calibration = settings.get("calibration")
    features = settings["features"]
    try:
        if version == 1:  # crop view, its sizes kept in the feature settings; threshold mean + 3 std
            view = ViewConfig(kind="crop", resize=int(features.get("resize", 256)), crop=int(features.get("crop", 224)))
            if calibration:
                calibration = {**calibration, "method": calibration.get("method", "good-sigma")}
        else:
            view = ViewConfig.from_dict(settings["view"])
        roi = tensors.get("roi")
        return MemoryBank(
            features=tensors["features"].astype(np.float32, copy=False),
            feature_config=FeatureConfig.from_dict(features),
            coreset=CoresetConfig(**settings["coreset"]),
            calibration=Calibration.from_dict(calibration) if calibration else None,
            reweight_neighbours=int(settings.get("reweight_neighbours", 9)),
            info=settings.get("info", {}),
            view=view,
            roi=None if roi is None else roi.astype(bool),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise BankError(f"bank settings are invalid: {type(exc).__name__}: {exc}") from None


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
