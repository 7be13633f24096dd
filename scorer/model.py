"""PatchCore fit (bank building) and predict (scoring), in scikit-learn's spirit."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .backbones import BACKBONES, load_backbone
from .bank import BankError, Calibration, MemoryBank
from .config import BuildConfig, FeatureConfig
from .coreset import coreset_size, greedy_coreset
from .features import PatchFeatureExtractor
from .index import NearestNeighbourIndex
from .preprocess import load_image, preprocess
from .scoring import anomaly_maps, image_scores


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def build_extractor(config: FeatureConfig, weights: str | Path | None = None,
                    device: torch.device | str = "cpu") -> tuple[PatchFeatureExtractor, FeatureConfig]:
    """The extractor a config describes, and the config completed with default taps and weights hash."""
    backbone, weights_sha = load_backbone(config.backbone, weights)
    spec = BACKBONES[config.backbone]
    layers = config.layers or spec.default_layers
    extractor = PatchFeatureExtractor(backbone, layers, config.patch_size, config.pretrain_dim, config.target_dim,
                                      spec.mean, spec.std)
    extractor.config = replace(config, layers=tuple(layers), weights_sha256=weights_sha)
    return extractor.to(device), extractor.config


def iter_image_batches(paths: Sequence[Path], batch_size: int) -> Iterator[list[np.ndarray]]:
    """Decoded RGB batches; the next batch is read in threads while the caller computes."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        pending = None
        for begin in range(0, len(paths), batch_size):
            current = pending or [pool.submit(load_image, p) for p in paths[begin:begin + batch_size]]
            nxt = begin + batch_size
            pending = [pool.submit(load_image, p) for p in paths[nxt:nxt + batch_size]] if nxt < len(paths) else None
            yield [f.result() for f in current]


@dataclass(frozen=True)
class ScoreResult:
    image_scores: np.ndarray  # [B] float32
    maps: np.ndarray | None  # [B, crop, crop] float32, or None when not asked for
    patch_scores: np.ndarray  # [B, h, w] float32


class PatchCoreScorer:
    """Scores images against a memory bank. The extractor must match the bank's settings exactly."""

    def __init__(self, bank: MemoryBank, device: str | torch.device = "auto", index: str = "auto",
                 weights: str | Path | None = None, extractor: PatchFeatureExtractor | None = None,
                 reweight_neighbours: int | None = None):
        self.bank = bank
        self.device = resolve_device(device)
        self.config = bank.feature_config
        if extractor is None:
            extractor, _ = build_extractor(replace(self.config, weights_sha256=""), weights, self.device)
        differences = self.config.differences(extractor.config)
        if differences:
            raise BankError("bank does not match this backbone/config: " + "; ".join(differences))
        if bank.features.ndim != 2 or bank.features.shape[1] != self.config.target_dim:
            raise BankError(f"bank features have shape {bank.features.shape}, expected [M, {self.config.target_dim}]")
        self.extractor = extractor.to(self.device)
        self.neighbours = bank.reweight_neighbours if reweight_neighbours is None else reweight_neighbours
        self.index = NearestNeighbourIndex(bank.features, index, self.device)
        self._bank = torch.from_numpy(np.ascontiguousarray(bank.features)).to(self.device)

    @property
    def threshold(self) -> float | None:
        return self.bank.calibration.threshold if self.bank.calibration else None

    def score(self, images: Sequence[np.ndarray], maps: bool = True) -> ScoreResult:
        """RGB uint8 images -> scores (and anomaly maps), one backbone pass and one search for the batch."""
        batch = preprocess(images, self.config.resize, self.config.crop, self.device)
        return self.score_tensor(batch, maps)

    @torch.inference_mode()
    def score_tensor(self, batch: torch.Tensor, maps: bool = True) -> ScoreResult:
        features, grid = self.extractor(batch)
        return self.score_features(features, grid, maps)

    @torch.inference_mode()
    def score_features(self, features: torch.Tensor, grid: tuple[int, int], maps: bool = True) -> ScoreResult:
        """Patch features [B, h*w, D] (from this scorer's extractor) -> scores, one search for the batch."""
        features = features.to(self.device)
        n_images, n_patches, dim = features.shape
        distances, nearest = self.index.search(features.reshape(-1, dim), k=1)
        patch = distances.reshape(n_images, n_patches)
        scores = image_scores(patch, nearest.reshape(n_images, n_patches), features, self._bank,
                              self.index, self.neighbours)
        heat = anomaly_maps(patch, grid, self.config.crop).cpu().numpy() if maps else None
        return ScoreResult(scores.cpu().numpy().astype(np.float32), heat,
                           patch.reshape(n_images, *grid).cpu().numpy())

    def score_paths(self, paths: Sequence[Path], batch_size: int = 16, maps: bool = True,
                    progress: bool = False, desc: str = "scoring") -> ScoreResult:
        results = []
        with tqdm(total=len(paths), desc=desc, unit="img", disable=not progress) as bar:
            for images in iter_image_batches(paths, batch_size):
                results.append(self.score(images, maps))
                bar.update(len(images))
        return ScoreResult(
            np.concatenate([r.image_scores for r in results]),
            np.concatenate([r.maps for r in results]) if maps else None,
            np.concatenate([r.patch_scores for r in results]),
        )


def split_calibration(n_images: int, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the images held back for calibration (a seeded random share, never all)."""
    n_hold = min(int(round(n_images * fraction)), n_images - 1) if fraction > 0 else 0
    held = np.zeros(n_images, dtype=bool)
    held[np.random.default_rng(seed).permutation(n_images)[:n_hold]] = True
    return held


def good_threshold(scores: np.ndarray, sigmas: float) -> float:
    """Threshold from good images only: mean + sigmas * std of their scores (population std)."""
    return float(np.mean(scores) + sigmas * np.std(scores))


def build_bank(paths: Sequence[Path], config: BuildConfig = BuildConfig(), weights: str | Path | None = None,
               device: str | torch.device = "auto", progress: bool = True) -> MemoryBank:
    """Fit: patch features of good images -> coreset memory bank with a calibrated threshold.

    Calibration uses good images only: a held-back share is scored against a bank built without it;
    their score distribution sets the threshold. The returned bank is then built from all images.
    """
    if not paths:
        raise ValueError("no training images given")
    started = time.perf_counter()
    device = resolve_device(device)
    extractor, feature_config = build_extractor(config.features, weights, device)
    chunks, grid = [], (0, 0)
    with tqdm(total=len(paths), desc="features", unit="img", disable=not progress) as bar:
        for images in iter_image_batches(paths, config.batch_size):
            features, grid = extractor(preprocess(images, feature_config.resize, feature_config.crop, device))
            chunks.append(features.cpu().numpy())
            bar.update(len(images))
    per_image = np.concatenate(chunks)  # [n_images, patches, dim]
    del chunks
    feature_seconds = time.perf_counter() - started

    def coreset_bank(features: np.ndarray, desc: str) -> MemoryBank:
        with tqdm(total=coreset_size(len(features), config.coreset.fraction), desc=desc, unit="pt",
                  disable=not progress) as bar:
            selected = greedy_coreset(features, config.coreset, progress=bar.update)
        return MemoryBank(np.ascontiguousarray(features[selected]), feature_config, config.coreset,
                          reweight_neighbours=config.reweight_neighbours)

    held = split_calibration(len(paths), config.calibration_fraction, config.coreset.seed)
    calibration = None
    if held.any():
        calibration_bank = coreset_bank(per_image[~held].reshape(-1, per_image.shape[-1]), "calibration coreset")
        scorer = PatchCoreScorer(calibration_bank, device=device, extractor=extractor)
        # the held-back images' features are already computed: score them without a second backbone pass
        held_features = torch.from_numpy(per_image[held])
        good = np.concatenate([scorer.score_features(held_features[b:b + config.batch_size], grid, maps=False).image_scores
                               for b in range(0, len(held_features), config.batch_size)])
        calibration = Calibration(threshold=good_threshold(good, config.calibration_sigmas), method="good-sigma",
                                  good_scores=tuple(float(s) for s in good), sigmas=config.calibration_sigmas)
    all_features = per_image.reshape(-1, per_image.shape[-1])
    bank = coreset_bank(all_features, "coreset")
    info = {"n_train_images": len(paths), "n_train_patches": int(len(all_features)),
            "n_calibration_images": int(held.sum()), "feature_seconds": round(feature_seconds, 2),
            "build_seconds": round(time.perf_counter() - started, 2)}
    return MemoryBank(bank.features, feature_config, config.coreset, calibration, config.reweight_neighbours, info)
