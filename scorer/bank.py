"""Memory bank files: safetensors (tensors) + JSON settings in its header, with a sha256 checksum.

Loading parses a JSON header and raw little-endian arrays; nothing in a bank file can execute code.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from .calibration import (RATE_INTERVAL_LEVEL, RATE_SPREAD_ADVICE, TAIL_MISFIT_P, TailFits,
                          tail_fit_pvalue)
from .config import COMBINES, CoresetConfig, FeatureConfig
from .position import PositionNorm
from .views import AUTO_VIEW, ViewConfig

BANK_FORMAT = "patchcore-bank"
BANK_FORMAT_VERSION = 2  # 2: view and region of interest; version 1 files read as the crop view
ENSEMBLE_FORMAT_VERSION = 3  # an ensemble bank: one member bank per backbone (single banks stay version 2)
# a single bank with per-position statistics (scorer/position.py): a build that does not know them must refuse
# the bank (its scores would be raw distances against a threshold in z units), so it is a version of its own
POSITION_FORMAT_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)
POSITION_TENSORS = ("position.mean", "position.scale")  # [T, gh, gw] float32 each
CALIBRATION_WINDOWS = "calibration_windows"  # [N, 3, h, w] float16: a bank's int8 calibration windows (optional)
ENSEMBLE_KEYS = {"combine", "normalisation", "members"}  # an ensemble's settings: exactly these
DEFAULT_MAX_BANK_BYTES = 2 << 30  # refuse larger files: a hostile bank must not exhaust memory


class BankError(ValueError):
    """A bank file that is corrupt, of another format, or does not fit the scorer."""


@dataclass(frozen=True)
class Calibration:
    """Decision threshold on image scores and how it was chosen."""

    threshold: float
    # "leave-out-gumbel" / "kfold-gumbel" (good images only, at a target false-alarm rate), "good-only-gumbel"
    # (`bank threshold` of an F1 bank: the stored good scores' method is not recorded), "f1" (labelled
    # validation images), "good-sigma" (banks of format 1: mean + 3 std of 10 % held-back images)
    method: str
    good_scores: tuple[float, ...] = ()  # every training image's score against a bank without it
    false_alarm_rate: float | None = None  # the target rate the threshold was set for
    folds: int | None = None
    f1: float | None = None
    tail_pvalue: float | None = None  # KS p-value of the good scores against the fitted Gumbel (low: misfit)
    # how sure the threshold is to hold the rate (TailFits; None: banks from before it, the fitted tail's own quantile)
    confidence: float | None = None
    # the central RATE_INTERVAL_LEVEL share of the true false-alarm rates a threshold placed as this one has across
    # training sets of this size (it depends on their number, the rate and the confidence only: TailFits)
    rate_interval: tuple[float, float] | None = None

    @classmethod
    def fitted(cls, good: np.ndarray, false_alarm_rate: float, method: str, folds: int | None,
               confidence: float | None) -> "Calibration":
        """The threshold at `false_alarm_rate` (with `confidence`; None: the plug-in quantile) fitted to good
        scores [N]."""
        good = np.asarray(good, dtype=np.float64)
        fits = TailFits(good)
        threshold = fits.threshold(false_alarm_rate, confidence)
        return cls(threshold=threshold, method=method, good_scores=tuple(float(g) for g in good),
                   false_alarm_rate=false_alarm_rate, folds=folds, tail_pvalue=tail_fit_pvalue(good),
                   confidence=confidence, rate_interval=fits.rate_interval(threshold))

    def refit(self, good: np.ndarray) -> "Calibration":
        """The same calibration fitted to other good scores (a bank update's, an ensemble's): its rate and
        confidence kept. Only for calibrations at a target rate."""
        if self.false_alarm_rate is None:
            raise ValueError(f"a {self.method} threshold has no target false-alarm rate to refit")
        return Calibration.fitted(good, self.false_alarm_rate, self.method, self.folds, self.confidence)

    def advice(self) -> list[str]:
        """What an operator should know about this threshold, in sentences (empty when nothing): a tail the good
        scores do not follow, or too few good images for the rate it states."""
        out = []
        if self.tail_pvalue is not None and self.tail_pvalue < TAIL_MISFIT_P:
            out.append(f"the good scores do not follow a Gumbel tail (KS p = {self.tail_pvalue:.3f}): the false-alarm "
                       f"rate the threshold states is not to be trusted; look for outliers or other parts among the "
                       f"training images")
        interval = self.rate_interval
        if interval is None and self.false_alarm_rate is not None and len(self.good_scores) >= 5:
            # banks from before intervals were stored: the same interval from their good scores
            interval = TailFits(np.asarray(self.good_scores, dtype=np.float64)).rate_interval(self.threshold)
        if (interval is not None and self.false_alarm_rate is not None
                and interval[1] >= RATE_SPREAD_ADVICE * self.false_alarm_rate):
            low, high = interval
            out.append(f"from {len(self.good_scores)} good images the threshold's false-alarm rate lies anywhere in "
                       f"{100 * low:.1f}-{100 * high:.1f} % ({100 * RATE_INTERVAL_LEVEL:.0f} % of training sets; target "
                       f"{100 * self.false_alarm_rate:g} %): more good images narrow it, a higher --confidence "
                       f"lowers its upper end")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "method": self.method, "good_scores": list(self.good_scores),
                "false_alarm_rate": self.false_alarm_rate, "folds": self.folds, "f1": self.f1,
                "tail_pvalue": self.tail_pvalue, "confidence": self.confidence,
                "rate_interval": None if self.rate_interval is None else list(self.rate_interval)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Calibration":
        rate, folds, interval = data.get("false_alarm_rate"), data.get("folds"), data.get("rate_interval")
        return cls(threshold=float(data["threshold"]), method=str(data["method"]),
                   good_scores=tuple(float(s) for s in data.get("good_scores", ())),
                   false_alarm_rate=None if rate is None else float(rate),
                   folds=None if folds is None else int(folds), f1=data.get("f1"),
                   tail_pvalue=None if data.get("tail_pvalue") is None else float(data["tail_pvalue"]),
                   confidence=None if data.get("confidence") is None else float(data["confidence"]),
                   rate_interval=None if interval is None else (float(interval[0]), float(interval[1])))


@dataclass(frozen=True)
class MemoryBank:
    features: np.ndarray  # [M, D] float32 coreset vectors
    feature_config: FeatureConfig
    coreset: CoresetConfig
    calibration: Calibration | None = None
    reweight_neighbours: int = 9
    info: dict[str, Any] = field(default_factory=dict)  # n_train_images, n_train_patches, build_seconds, ...
    view: ViewConfig = field(default_factory=lambda: ViewConfig(kind="crop"))  # concrete: never "auto"
    roi: np.ndarray | None = None  # bool [H, W] region of interest in frame coordinates (any resolution)
    position: PositionNorm | None = None  # per-position statistics of good patch scores (--position-norm)
    # float16 [N, 3, h, w]: good training windows, ImageNet-normalised, that int8 scoring quantises with
    # (scorer.features.Int8Calibration); None in banks built before int8 (they score in fp32 only)
    calibration_windows: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.view.kind == AUTO_VIEW:
            raise BankError("a bank's view is the one its build chose: 'auto' is resolved from the training frames "
                            "(scorer.model.build_bank)")

    def metadata(self) -> dict[str, Any]:
        extra = {} if self.position is None else {"position_norm": self.position.settings()}
        return {
            "format": BANK_FORMAT,
            "format_version": BANK_FORMAT_VERSION if self.position is None else POSITION_FORMAT_VERSION,
            **extra,
            "features": self.feature_config.to_dict(),
            "view": self.view.to_dict(),
            "coreset": vars(self.coreset).copy(),
            "calibration": self.calibration.to_dict() if self.calibration else None,
            "reweight_neighbours": self.reweight_neighbours,
            "info": self.info,
        }

    def with_calibration(self, calibration: Calibration) -> "MemoryBank":
        return replace(self, calibration=calibration)


@dataclass(frozen=True)
class EnsembleBank:
    """Member banks of one view, one per backbone, each with its own coreset and calibration (scorer/ensemble.py).

    A member's image scores and patch distances are normalised by its own held-out good scores, (s - loc) / scale
    (`normalisation[i]`, their mean and standard deviation), and the members' normalised values combined by
    `combine` (mean or max); `calibration` is the threshold on the combined held-out good scores."""

    members: tuple[MemoryBank, ...]
    combine: str
    normalisation: tuple[tuple[float, float], ...]  # (loc, scale) per member
    calibration: Calibration | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.members) < 2:
            raise BankError(f"an ensemble needs at least 2 members, got {len(self.members)}")
        if self.combine not in COMBINES:
            raise BankError(f"unknown ensemble combination {self.combine!r} (known: {', '.join(COMBINES)})")
        if len(self.normalisation) != len(self.members):
            raise BankError(f"{len(self.normalisation)} normalisations for {len(self.members)} members")
        if not all(np.isfinite(loc) and np.isfinite(scale) and scale > 0 for loc, scale in self.normalisation):
            raise BankError(f"member normalisations must be finite with a positive scale: {self.normalisation}")
        if any(m.position is not None for m in self.members):
            raise BankError("an ensemble's members cannot have per-position statistics (--position-norm is for "
                            "single-backbone banks)")
        names = [m.feature_config.backbone for m in self.members]
        if len(set(names)) != len(names):
            raise BankError(f"an ensemble's members have distinct backbones, got {names}")
        first = self.members[0]
        for member in self.members[1:]:
            if member.view.differences(first.view) or (member.roi is None) != (first.roi is None) or (
                    member.roi is not None and not np.array_equal(member.roi, first.roi)):
                raise BankError("an ensemble's members must share one view and region of interest")

    @property
    def backbone(self) -> str:
        return "+".join(m.feature_config.backbone for m in self.members)

    @property
    def view(self) -> ViewConfig:
        return self.members[0].view

    @property
    def roi(self) -> np.ndarray | None:
        return self.members[0].roi

    @property
    def size(self) -> int:
        """Feature vectors over all members."""
        return sum(len(m.features) for m in self.members)

    def metadata(self) -> dict[str, Any]:
        members = []
        for member in self.members:
            meta = member.metadata()
            members.append({key: meta[key] for key in ("features", "coreset", "calibration", "reweight_neighbours",
                                                       "info")})
        return {"format": BANK_FORMAT, "format_version": ENSEMBLE_FORMAT_VERSION, "view": self.view.to_dict(),
                "ensemble": {"combine": self.combine, "normalisation": [list(n) for n in self.normalisation],
                             "members": members},
                "calibration": self.calibration.to_dict() if self.calibration else None, "info": self.info}

    def with_calibration(self, calibration: Calibration) -> "EnsembleBank":
        return replace(self, calibration=calibration)


AnyBank = MemoryBank | EnsembleBank


def view_notice(bank: AnyBank) -> str | None:
    """What to tell the operator when the build's "auto" chose another view than the paper's crop (the bank's
    info.view_choice says why), e.g. "view: kind=full, size=455 (auto: ...)"; None otherwise."""
    if bank.info.get("view_choice") and bank.view.kind != "crop":
        return f"view: {bank.view.describe()} ({bank.info['view_choice']})"
    return None


def bank_size(bank: AnyBank) -> int:
    """Feature vectors a bank holds (over all members of an ensemble)."""
    return bank.size if isinstance(bank, EnsembleBank) else len(bank.features)


def _checksum(tensors: dict[str, np.ndarray], settings: str) -> str:
    digest = hashlib.sha256(settings.encode())
    for name in sorted(tensors):
        digest.update(np.ascontiguousarray(tensors[name]).tobytes())
    return digest.hexdigest()


def bank_to_bytes(bank: AnyBank) -> bytes:
    settings = json.dumps(bank.metadata(), sort_keys=True)
    if isinstance(bank, EnsembleBank):
        tensors = {f"members.{i}.features": np.ascontiguousarray(m.features, dtype="<f4")
                   for i, m in enumerate(bank.members)}
        tensors.update({f"members.{i}.{CALIBRATION_WINDOWS}": np.ascontiguousarray(m.calibration_windows, dtype="<f2")
                        for i, m in enumerate(bank.members) if m.calibration_windows is not None})
    else:
        tensors = {"features": np.ascontiguousarray(bank.features, dtype="<f4")}
        if bank.calibration_windows is not None:
            tensors[CALIBRATION_WINDOWS] = np.ascontiguousarray(bank.calibration_windows, dtype="<f2")
        if bank.position is not None:
            tensors[POSITION_TENSORS[0]] = np.ascontiguousarray(bank.position.mean, dtype="<f4")
            tensors[POSITION_TENSORS[1]] = np.ascontiguousarray(bank.position.scale, dtype="<f4")
    if bank.roi is not None:
        tensors["roi"] = np.ascontiguousarray(bank.roi, dtype=np.uint8)
    return st_save(tensors, metadata={"settings": settings, "sha256": _checksum(tensors, settings)})


def bank_from_bytes(data: bytes, max_bytes: int = DEFAULT_MAX_BANK_BYTES) -> AnyBank:
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
    if settings_text is None or not any(name == "features" or name.endswith(".features") for name in tensors):
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
    if version == ENSEMBLE_FORMAT_VERSION:
        return _ensemble_from(settings, tensors)
    if "features" not in tensors:
        raise BankError("not a patchcore bank file: features missing")
    calibration = settings.get("calibration")
    features = settings["features"]
    has_position = "position_norm" in settings or any(name in tensors for name in POSITION_TENSORS)
    if has_position and version != POSITION_FORMAT_VERSION:
        raise BankError(f"bank format version {version} carries per-position statistics: only version "
                        f"{POSITION_FORMAT_VERSION} may (the file was altered or written by a faulty build)")
    if version == POSITION_FORMAT_VERSION and not (
            "position_norm" in settings and all(name in tensors for name in POSITION_TENSORS)):
        raise BankError(f"bank format version {POSITION_FORMAT_VERSION} needs its per-position settings and "
                        f"tensors {', '.join(POSITION_TENSORS)}")
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
            position=None if not has_position else PositionNorm.from_parts(
                settings["position_norm"], tensors[POSITION_TENSORS[0]], tensors[POSITION_TENSORS[1]]),
            calibration_windows=_windows(tensors.get(CALIBRATION_WINDOWS)),
        )
    except (KeyError, TypeError, ValueError) as exc:  # scorer.position.PositionError is a ValueError
        raise BankError(f"bank settings are invalid: {type(exc).__name__}: {exc}") from None


def _ensemble_from(settings: dict[str, Any], tensors: dict[str, np.ndarray]) -> EnsembleBank:
    """An ensemble bank's settings and tensors, read strictly: exactly the keys and tensors its members need."""
    ensemble = settings.get("ensemble")
    if not isinstance(ensemble, dict) or set(ensemble) != ENSEMBLE_KEYS:
        raise BankError(f"ensemble settings must have exactly {sorted(ENSEMBLE_KEYS)}")
    members = ensemble["members"]
    expected = {f"members.{i}.features" for i in range(len(members))} | ({"roi"} if "roi" in tensors else set())
    expected |= {f"members.{i}.{CALIBRATION_WINDOWS}" for i in range(len(members))
                 if f"members.{i}.{CALIBRATION_WINDOWS}" in tensors}  # optional (banks built before int8)
    if not isinstance(members, list) or set(tensors) != expected:
        raise BankError(f"ensemble tensors {sorted(tensors)} do not match its {len(members)} members")
    roi = tensors.get("roi")
    try:
        view = ViewConfig.from_dict(settings["view"])
        calibration = settings.get("calibration")
        built = tuple(MemoryBank(
            features=tensors[f"members.{i}.features"].astype(np.float32, copy=False),
            feature_config=FeatureConfig.from_dict(member["features"]), coreset=CoresetConfig(**member["coreset"]),
            calibration=Calibration.from_dict(member["calibration"]) if member["calibration"] else None,
            reweight_neighbours=int(member["reweight_neighbours"]), info=member["info"], view=view,
            roi=None if roi is None else roi.astype(bool),
            calibration_windows=_windows(tensors.get(f"members.{i}.{CALIBRATION_WINDOWS}")))
            for i, member in enumerate(members))
        return EnsembleBank(built, str(ensemble["combine"]),
                            tuple((float(loc), float(scale)) for loc, scale in ensemble["normalisation"]),
                            Calibration.from_dict(calibration) if calibration else None, settings.get("info", {}))
    except (KeyError, TypeError, ValueError) as exc:
        raise BankError(f"ensemble bank settings are invalid: {type(exc).__name__}: {exc}") from None


def _windows(tensor: np.ndarray | None) -> np.ndarray | None:
    """A bank's calibration windows, checked: float16 [N >= 1, 3, h, w], finite."""
    if tensor is None:
        return None
    if tensor.dtype != np.float16 or tensor.ndim != 4 or tensor.shape[1] != 3 or not len(tensor) \
            or not np.isfinite(tensor).all():
        raise ValueError(f"calibration windows must be finite float16 [N, 3, h, w], not {tensor.dtype} {tensor.shape}")
    return tensor


def bank_checksum(data: bytes) -> str:
    """sha256 of a bank file's bytes, as the registry stores it."""
    return hashlib.sha256(data).hexdigest()


def check_bank_path(path: str | Path) -> None:
    """BankError unless a bank can be written at `path` (its folder is made): checked before a long build, so a
    folder, an unwritable place or a missing parent is said at once, not after the work."""
    path = Path(path)
    if path.is_dir():
        raise BankError(f"cannot write bank {path}: it is a folder (give a file name, e.g. {path / 'model.bank'})")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BankError(f"cannot write bank {path}: {exc.strerror or exc}") from None
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise BankError(f"cannot write bank {path}: its folder {path.parent} is not writable")


def save_bank(bank: AnyBank, path: str | Path) -> None:
    """Write `bank` at `path` atomically: a temporary file beside it (its own name, the umask's mode), renamed
    over it; a failure (BankError) leaves neither a half-written bank nor the temporary file, and an existing bank
    at `path` unchanged."""
    path = Path(path)
    check_bank_path(path)
    data = bank_to_bytes(bank)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    except BaseException as exc:  # Ctrl-C included: never a temporary file left behind
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise BankError(f"cannot write bank {path}: {exc.strerror or exc}") from None
        raise


def load_bank(path: str | Path, max_bytes: int = DEFAULT_MAX_BANK_BYTES) -> AnyBank:
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
