"""Ensemble banks (PatchCore, Roth et al. 2022, Sec. 4.4 / Table 4): one member bank per backbone, their scores
normalised and combined.

Each member is an ordinary bank of the same view and training images, with its own features, coreset and
held-out calibration (scorer/heldout.py). Members' distances live on different scales, so each member's image
scores and patch distances are normalised by its own good-image statistics: (s - loc) / scale with loc, scale
the mean and standard deviation of its held-out good scores (what the member gives unseen good images), then
combined across members by mean (default) or max. The combined threshold is fitted (Gumbel tail, the members'
target false-alarm rate) to the combined held-out good scores: the same per-image combination of the members'
held-out scores. Maps are the view's maps of the combined normalised patch distances (for the mean, the mean of
the members' normalised maps: upsampling and smoothing are linear and keep constants).

The scorer runs every member on one batch: one upload and one resize/normalisation per group of equally sized
frames (every backbone takes the view's ImageNet-normalised windows and maps them onto its own normalisation),
then each member's backbone and search.
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .backbones import BackboneError, ensemble_members
from .bank import AnyBank, BankError, EnsembleBank, MemoryBank
from .config import FINE_TAPS, BuildConfig, FeatureConfig
from .features import ComputeConfig, PatchFeatureExtractor
from .index import SearchConfig
from .model import Image, PatchCoreScorer, ScoreResult, Verdicts, build_bank, resolve_device, update_member
from .views import Layout, Region


def normalisation_of(good_scores: Sequence[float]) -> tuple[float, float]:
    """(loc, scale) of a member: mean and standard deviation (ddof 1) of its held-out good image scores."""
    good = np.asarray(good_scores, dtype=np.float64)
    if len(good) < 2:
        raise ValueError(f"an ensemble member needs at least 2 held-out good scores, got {len(good)}")
    loc, scale = float(good.mean()), float(good.std(ddof=1))
    if not scale > 0:
        raise ValueError("an ensemble member's held-out good scores are all equal: no scale to normalise by")
    return loc, scale


def combine(values: Sequence[np.ndarray | torch.Tensor], normalisation: Sequence[tuple[float, float]], how: str):
    """Members' raw values (scores [B] or patch distances [B, ...], numpy or torch, one per member) -> their
    normalised combination, of the same shape."""
    torch_values = isinstance(values[0], torch.Tensor)
    normalised = [(v - loc) / scale for v, (loc, scale) in zip(values, normalisation)]
    stacked = torch.stack(normalised) if torch_values else np.stack(normalised)
    if how == "mean":
        return stacked.mean(0)
    if how == "max":
        return stacked.amax(0) if torch_values else stacked.max(0)
    raise ValueError(f"unknown combination {how!r}")


def ensemble_of(members: Sequence[MemoryBank], how: str, info: dict | None = None) -> EnsembleBank:
    """Member banks built from the same training images (in the same order) -> the ensemble, its threshold
    fitted to the combined held-out good scores at the members' target false-alarm rate."""
    calibrations = [m.calibration for m in members]
    if any(c is None or not c.good_scores or c.false_alarm_rate is None for c in calibrations):
        raise ValueError("an ensemble normalises each member by its held-out good scores: build with calibration "
                         "(--folds >= 2)")
    if len({len(c.good_scores) for c in calibrations}) != 1 or len({c.false_alarm_rate for c in calibrations}) != 1:
        raise ValueError("ensemble members must be calibrated on the same training images at the same rate")
    if len({c.confidence for c in calibrations}) != 1:
        raise ValueError("ensemble members must be calibrated at the same threshold confidence (`patchcore bank "
                         "threshold MEMBER --confidence C` refits one without a rebuild)")
    normalisation = tuple(normalisation_of(c.good_scores) for c in calibrations)
    good = combine([np.asarray(c.good_scores, dtype=np.float64) for c in calibrations], normalisation, how)
    calibration = calibrations[0].refit(good)  # the members' rate, method, folds and confidence
    return EnsembleBank(tuple(members), how, normalisation, calibration, info or {})


def build_ensemble(images: Sequence[Image], config: BuildConfig, weights: str | Path | None = None,
                   device: str | torch.device = "auto", progress: bool = True, roi: np.ndarray | None = None,
                   index: str = "auto", compute: ComputeConfig = ComputeConfig()) -> EnsembleBank:
    """One member bank per backbone of `config.features.backbone` ("a+b"), each with the build's other settings,
    combined by `config.combine`."""
    names = ensemble_members(config.features.backbone)
    if weights is not None:
        raise ValueError("an ensemble loads each member's ImageNet weights: --weights is for one backbone")
    if config.features.layers and config.features.layers != (FINE_TAPS,):
        raise ValueError("an ensemble taps each member's default layers, or each one's finer taps (--layers "
                         f"{FINE_TAPS}): tap names are for one backbone")
    started = time.perf_counter()
    members = [build_bank(images, replace(config, features=replace(config.features, backbone=name)), None, device,
                          progress, roi, index, compute) for name in names]
    patches = {m.info.get("n_train_patches") for m in members}
    if len(patches) != 1:
        raise ValueError(f"ensemble members' patch grids differ in this view ({sorted(patches)} training patches): "
                         "choose backbones of the same stride")
    return ensemble_of(members, config.combine, {"n_train_images": len(images),
                                                 "build_seconds": round(time.perf_counter() - started, 2)})


def update_ensemble(bank: EnsembleBank, images: Sequence[Image], device: str | torch.device = "auto",
                    progress: bool = False, index: str = "auto", batch_size: int = 16,
                    compute: ComputeConfig = ComputeConfig()) -> EnsembleBank:
    """update_bank of an ensemble: every member extended as a single bank is (its coreset continued, its own
    threshold refitted), and the ensemble's threshold refitted at its rate to its combined good scores plus the
    new images' members' scores (against the members before the update) combined. The members' normalisation
    stays as it was: the stored combined good scores were computed with it, and stay comparable."""
    updated = [update_member(member, images, None, device, progress, index, batch_size, compute)
               for member in bank.members]
    members = tuple(member for member, _ in updated)
    calibration = bank.calibration
    if calibration is not None and calibration.false_alarm_rate is not None:
        new = combine([scores for _, scores in updated], bank.normalisation, bank.combine)
        calibration = calibration.refit(np.concatenate([np.asarray(calibration.good_scores, dtype=np.float64), new]))
    info = {**bank.info, "n_train_images": int(bank.info.get("n_train_images", 0)) + len(images),
            "updates": int(bank.info.get("updates", 0)) + 1, "last_update_images": len(images)}
    return replace(bank, members=members, calibration=calibration, info=info)


class EnsembleScorer(Verdicts):
    """Scores images against an ensemble bank: every member's backbone and search on one prepared batch, the
    members' normalised image scores and patch distances combined (the bank's `combine`)."""

    def __init__(self, bank: EnsembleBank, device: str | torch.device = "auto", index: str = "auto",
                 extractors: Sequence[PatchFeatureExtractor] | None = None, search: SearchConfig | str = SearchConfig(),
                 compute: ComputeConfig | None = None):
        """extractors: one per member, in order (None: each member's backbone is loaded; a member whose weights
        this host lacks is refused with a BackboneError that says how to get them)."""
        self.bank = bank
        self.device = resolve_device(device)
        self.view = bank.view
        self.members: list[PatchCoreScorer] = []
        for i, member in enumerate(bank.members):
            try:
                self.members.append(PatchCoreScorer(member, self.device, index,
                                                    extractor=extractors[i] if extractors else None,
                                                    search=search, compute=None if extractors else compute))
            except BackboneError as exc:
                raise BackboneError(f"ensemble member {member.feature_config.backbone} cannot run here: {exc}") from None

    @property
    def index(self):
        """The first member's search (every member searches with the same settings)."""
        return self.members[0].index

    @property
    def extractor(self) -> PatchFeatureExtractor:
        """The first member's extractor (every member computes with the same settings)."""
        return self.members[0].extractor

    @property
    def neighbours(self) -> int:
        return self.members[0].neighbours

    def warm_up(self) -> None:
        for member in self.members:
            member.warm_up()

    def _score_group(self, images: list[np.ndarray], lay: Layout, regions: list[Region | None] | None = None,
                     grids_over: np.ndarray | None = None) -> tuple[np.ndarray, torch.Tensor, None]:
        """Equally sized images -> combined scores [B] and patch distances [B, n_windows, gh, gw] (every row: the
        verdict is on the combined score, so `grids_over` does not bound the members' searches): one upload and
        resize/normalisation for all members, then each member's backbone and search (a camera's region applied
        by every member, PatchCoreScorer.score_windows)."""
        inputs = self.members[0].prepare_windows(images, lay)
        results = [member.score_windows(inputs, lay, len(images), regions) for member in self.members]
        grids = {tuple(grid.shape) for _, grid in results}
        if len(grids) != 1:
            raise BankError(f"ensemble members' patch grids differ for a {lay.frame[0]}x{lay.frame[1]} frame: "
                            f"{sorted(grids)}")
        return (combine([s for s, _ in results], self.bank.normalisation, self.bank.combine),
                combine([g for _, g in results], self.bank.normalisation, self.bank.combine), None)

    def _maps(self, patch_scores: torch.Tensor, lay: Layout) -> torch.Tensor:
        return self.members[0]._maps(patch_scores, lay)

    def heatmaps(self, result: ScoreResult, rows: Sequence[int]) -> list[np.ndarray]:
        """Maps of some images of a result scored with maps=False (from its combined patch distances)."""
        return self.members[0].heatmaps(result, rows)


def scorer_for(bank: AnyBank, device: str | torch.device = "auto", index: str = "auto",
               weights: str | Path | None = None, search: SearchConfig | str = SearchConfig(),
               compute: ComputeConfig | None = None,
               extractor_for: Callable[[FeatureConfig], PatchFeatureExtractor] | None = None):
    """The scorer of any bank: PatchCoreScorer for a single bank, EnsembleScorer for an ensemble.
    extractor_for: a member's FeatureConfig -> an extractor for it (a worker's cache), else each is loaded."""
    if isinstance(bank, EnsembleBank):
        if weights is not None:
            raise BankError("an ensemble bank loads each member's ImageNet weights: --weights is for one backbone")
        extractors = [extractor_for(m.feature_config) for m in bank.members] if extractor_for else None
        return EnsembleScorer(bank, device, index, extractors, search, compute)
    extractor = extractor_for(bank.feature_config) if extractor_for else None
    return PatchCoreScorer(bank, device, index, weights, extractor, search=search,
                           compute=None if extractor else compute)
