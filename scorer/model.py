"""PatchCore fit (bank building) and predict (scoring), in scikit-learn's spirit.

`build_bank(images)` fits: patch features of good images (paths or RGB arrays) under a view, a coreset,
and a threshold from k-fold scores of every training image. `PatchCoreScorer(bank).score(images)`
predicts image scores and anomaly maps; `verdict`, `heatmaps` and `overlay` are what a frame consumer needs.
"""
from __future__ import annotations

import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Sequence, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from . import bounded
from .backbones import BACKBONES, ensemble_members, load_backbone, resolve_backbone
from .bank import AnyBank, BankError, Calibration, EnsembleBank, MemoryBank
from .calibration import fold_ids
from .config import FINE_CORESET_SCALE, FINE_TAPS, BuildConfig, CoresetConfig, FeatureConfig
from .coreset import coreset_size, extend_coreset, random_projection, select_coreset
from .features import ComputeConfig, Int8Calibration, PatchFeatureExtractor
from .hardware import apply_thread_plan, thread_plan
from .heldout import LeaveOut, exclusion_ranges
from .index import SearchConfig, make_index
from .overlay import heatmap_overlay
from .position import PositionNorm, leave_one_out_z, position_norm
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, load_image, to_rgb
from .scoring import reweight, smooth, window_maps
from .stages import stage
from .views import (Layout, Region, ViewConfig, ViewError, frame_windows, inspected_box, layout, shape_groups,
                    stitch, valid_patches)

Image = Union[np.ndarray, str, Path]  # an RGB uint8 array, or an image file
CALIBRATION_WINDOW_COUNT = 16  # good training windows a bank keeps for int8 scoring (scorer.features.Int8Calibration)
CALIBRATION_BYTES = 16 << 20  # at most this much of them (float16): fewer windows where the view's are large


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def build_extractor(config: FeatureConfig, weights: str | Path | None = None, device: torch.device | str = "cpu",
                    compute: ComputeConfig = ComputeConfig()) -> tuple[PatchFeatureExtractor, FeatureConfig]:
    """The extractor a config describes (run with `compute`), and the config completed with the resolved
    backbone ("auto": scorer.backbones.resolve_backbone), default taps and weights hash."""
    config = replace(config, backbone=resolve_backbone(config.backbone, weights).name)
    backbone, weights_sha = load_backbone(config.backbone, weights)
    spec = BACKBONES[config.backbone]
    layers = spec.fine_layers if config.layers == (FINE_TAPS,) else config.layers or spec.default_layers
    extractor = PatchFeatureExtractor(backbone, layers, config.patch_size, config.pretrain_dim, config.target_dim,
                                      spec.mean, spec.std)
    extractor.config = replace(config, layers=tuple(layers), weights_sha256=weights_sha)
    return extractor.to(device).use(compute), extractor.config


def iter_image_batches(sources: Sequence[Image], batch_size: int, prefetch: bool = True
                       ) -> Iterator[list[np.ndarray]]:
    """Decoded RGB batches of image files or arrays, decoded in threads; with `prefetch` the next batch is decoded
    while the caller works on this one, without it only when asked for (nothing decodes while the caller is timed)."""
    def load(source: Image) -> np.ndarray:
        return to_rgb(source) if isinstance(source, np.ndarray) else load_image(source)

    with ThreadPoolExecutor(max_workers=thread_plan().decode) as pool:
        pending = None
        for begin in range(0, len(sources), batch_size):
            current = pending or [pool.submit(load, p) for p in sources[begin:begin + batch_size]]
            nxt = begin + batch_size
            pending = ([pool.submit(load, p) for p in sources[nxt:nxt + batch_size]]
                       if prefetch and nxt < len(sources) else None)
            yield [f.result() for f in current]


@dataclass(frozen=True)
class ScoreResult:
    image_scores: np.ndarray  # [B] float32
    maps: list[np.ndarray] | None  # per image [h, w] float32 in the view's working coordinates, or None
    patch_scores: list[np.ndarray | None]  # per image [n_windows, gh, gw] float32 (0 outside the frame / ROI);
    #                                        None for an image under its `grids_over` (PatchCoreScorer.score)
    layouts: list[Layout]  # per image: where its windows lie


class Verdicts:
    """What a frame consumer needs beside the scores, shared by PatchCoreScorer and the ensemble's scorer:
    the threshold and verdict from `self.bank.calibration`, refusals and overlays in `self.view`, file batches
    through `self.score`."""

    @property
    def threshold(self) -> float | None:
        return self.bank.calibration.threshold if self.bank.calibration else None

    def verdict(self, scores: np.ndarray | float, thresholds: np.ndarray | None = None) -> np.ndarray | bool:
        """Anomalous: score at or over the bank's threshold (never, for a bank without one). `thresholds` [B]:
        each score's own threshold instead (a camera's sensitivity; NaN: no threshold, never anomalous)."""
        if thresholds is not None:
            return np.asarray(scores) >= np.asarray(thresholds, dtype=np.float64)  # NaN compares False
        if self.threshold is None:
            return np.zeros(np.shape(scores), dtype=bool) if np.ndim(scores) else False
        result = np.asarray(scores) >= self.threshold
        return result if np.ndim(scores) else bool(result)

    def refusal(self, height: int, width: int) -> str | None:
        """Why a frame of this size cannot be scored in this bank's view (None: it can)."""
        try:
            layout(self.view, height, width)
        except ViewError as exc:
            return str(exc)
        return None

    def overlay(self, image: np.ndarray, anomaly_map: np.ndarray, score: float, threshold: float | None = None
                ) -> np.ndarray:
        """The image with its anomaly map, score and threshold drawn on it: BGR uint8 (for cv2.imwrite / JPEG).
        threshold: the one that decided this image (a camera's own); default the bank's."""
        threshold = self.threshold if threshold is None else threshold
        with stage("overlay"):
            return heatmap_overlay(image, anomaly_map, threshold, score,
                                   bool(score >= threshold) if threshold is not None else None,
                                   region=inspected_box(*image.shape[:2], self.view))

    @torch.inference_mode()
    def score(self, images: Sequence[np.ndarray], maps: bool = True,
              regions: Sequence[Region | None] | None = None, grids_over: np.ndarray | None = None) -> ScoreResult:
        """RGB uint8 images (any sizes) -> scores (and anomaly maps); per group of equally sized images one
        `_score_group` (one backbone pass and one search per backbone) and one `_maps`. An image's result does not
        depend on its batch companions.

        regions: per image, a region of interest that replaces the bank's (None: the bank's): patches outside it
        are left out of the image score and are 0 in the maps.
        grids_over (with maps=False): per image, the score at or over which its patch distances are wanted (the
        threshold its verdict uses; NaN: never); the others' patch_scores are None and their patches need not
        all be searched in full (scorer/bounded.py; the scores are the same). None: every image's."""
        if regions is not None and len(regions) != len(images):
            raise ValueError(f"{len(regions)} regions for {len(images)} images")
        if grids_over is not None and (maps or len(grids_over) != len(images)):
            raise ValueError("grids_over takes one threshold per image, and only with maps=False")
        scores = np.zeros(len(images), dtype=np.float32)
        heat: list = [None] * len(images)
        patches: list = [None] * len(images)
        layouts: list = [None] * len(images)
        for (height, width, *_), rows in shape_groups(images).items():
            lay = layout(self.view, height, width)
            group_regions = None if regions is None else [regions[i] for i in rows]
            group_over = None if grids_over is None else np.asarray(grids_over, dtype=np.float64)[rows]
            group_scores, group_patches, has_grid = self._score_group([images[i] for i in rows], lay, group_regions,
                                                                      group_over)
            group_maps = self._maps(group_patches, lay).cpu().numpy() if maps else None
            group_patches = group_patches.cpu().numpy()
            for j, i in enumerate(rows):
                scores[i], layouts[i] = group_scores[j], lay
                patches[i] = group_patches[j] if has_grid is None or has_grid[j] else None
                if maps:
                    heat[i] = group_maps[j]
        return ScoreResult(scores, heat if maps else None, patches, layouts)

    def score_paths(self, paths: Sequence[Image], batch_size: int = 16, maps: bool = True,
                    progress: bool = False, desc: str = "scoring") -> ScoreResult:
        results = []
        with tqdm(total=len(paths), desc=desc, unit="img", disable=not progress) as bar:
            for images in iter_image_batches(paths, batch_size):
                results.append(self.score(images, maps))
                bar.update(len(images))
        return ScoreResult(
            np.concatenate([r.image_scores for r in results]),
            [m for r in results for m in r.maps] if maps else None,
            [p for r in results for p in r.patch_scores],
            [lay for r in results for lay in r.layouts],
        )


class PatchCoreScorer(Verdicts):
    """Scores images against a memory bank. The extractor and view must match the bank's settings exactly."""

    max_windows_per_pass = 64  # bounds the memory of one backbone pass and search (tiles: many per frame)
    max_cached_masks = 256  # patch masks of (region, layout, grid) kept: cameras x frame sizes x settings versions

    def __init__(self, bank: MemoryBank, device: str | torch.device = "auto", index: str = "auto",
                 weights: str | Path | None = None, extractor: PatchFeatureExtractor | None = None,
                 reweight_neighbours: int | None = None, view: ViewConfig | None = None,
                 search: SearchConfig | str = SearchConfig(), compute: ComputeConfig | None = None):
        """compute: the backbone's precision and layout (default: the device's, ComputeConfig.resolve); with
        `extractor`, that extractor's own."""
        if not isinstance(bank, MemoryBank):
            raise BankError("an ensemble bank is scored by scorer.ensemble.EnsembleScorer (scorer.ensemble.scorer_for)")
        self.bank = bank
        self.device = resolve_device(device)
        apply_thread_plan()  # torch's and FAISS's threads sized together for the cores present
        self.config = bank.feature_config
        if view is not None and bank.view.differences(view):
            raise BankError("bank does not match this view: " + "; ".join(bank.view.differences(view)))
        self.view = bank.view
        if extractor is None:
            extractor, _ = build_extractor(replace(self.config, weights_sha256=""), weights, self.device,
                                           compute or ComputeConfig())
        elif compute is not None and compute.resolve(self.device) != extractor.compute:
            raise ValueError(f"extractor runs with {extractor.compute}, not {compute}")
        differences = self.config.differences(extractor.config)
        if differences:
            raise BankError("bank does not match this backbone/config: " + "; ".join(differences))
        if bank.features.ndim != 2 or bank.features.shape[1] != self.config.target_dim:
            raise BankError(f"bank features have shape {bank.features.shape}, expected [M, {self.config.target_dim}]")
        self.extractor = extractor.to(self.device)
        self.int8 = None if bank.calibration_windows is None else Int8Calibration(bank.calibration_windows)
        if self.extractor.compute.precision == "int8" and self.int8 is None:
            raise BankError("precision int8 quantises with the bank's calibration windows, and this bank has none "
                            "(built before int8): rebuild it, or score it with --precision fp32")
        self.neighbours = bank.reweight_neighbours if reweight_neighbours is None else reweight_neighbours
        self.index = make_index(bank.features, search, index, self.device)  # `index`: the flat engine
        self._bank = torch.from_numpy(np.ascontiguousarray(bank.features)).to(self.device)
        self._valid: dict[tuple, torch.Tensor] = {}
        self._position = None  # (mean, scale) [T, gh * gw] on the device, for a bank with per-position statistics
        if bank.position is not None:
            self._position = tuple(torch.from_numpy(a.reshape(len(a), -1)).to(self.device)
                                   for a in (bank.position.mean, bank.position.scale))

    def refusal(self, height: int, width: int) -> str | None:
        """Why a frame of this size cannot be scored (None: it can): the view's reasons, and for a bank with
        per-position statistics a frame of another window layout."""
        reason = super().refusal(height, width)
        if reason is None and self.bank.position is not None:
            lay = layout(self.view, height, width)
            reason = self.bank.position.mismatch(len(lay.origins), lay.window)
        return reason

    def _normalise(self, distances: torch.Tensor, first: int, n_windows: int, grid: tuple[int, int]) -> torch.Tensor:
        """Patch distances [c, L] of the windows first, first + 1, ... (frame-major: window (first + r) % T) ->
        per-position z scores (d - mean) / scale (scorer/position.py)."""
        mean, scale = self._position
        expected = self.bank.position.grid
        if (n_windows, *grid) != expected:
            raise ViewError(f"frames give {n_windows} window(s) of {grid[0]}x{grid[1]} patches; the bank's "
                            f"per-position statistics are for {expected[0]} of {expected[1]}x{expected[2]}")
        which = torch.arange(first, first + len(distances), device=distances.device) % n_windows
        return (distances - mean[which]) / scale[which]


    def warm_up(self) -> None:
        """Ready the backbone for this bank's input size (PatchFeatureExtractor.warm_up): the view's where it fixes
        it (crop, tiles), else (full) the padded size of the training frames' (info.frame_size; banks built before
        it was stored are readied by their first frame)."""
        size = self.bank.view.window_size()
        frame = self.bank.info.get("frame_size")
        if size is None and frame:
            size = layout(self.bank.view, *frame).window
        if size is not None:
            self.extractor.warm_up(size, self.int8)

    def _score_group(self, images: list[np.ndarray], lay: Layout, regions: list[Region | None] | None = None,
                     grids_over: np.ndarray | None = None) -> tuple[np.ndarray, torch.Tensor, np.ndarray | None]:
        """Equally sized images -> scores [B], patch distances [B, n_windows, gh, gw] and which rows hold them
        (bool [B]; None: all). With `grids_over`, one window per frame, no per-position statistics and the ivf
        search: the bounded path (scorer/bounded.py); otherwise every patch is searched in full."""
        inputs = self.prepare_windows(images, lay)
        if grids_over is not None and len(lay.origins) == 1 and self._position is None and bounded.supports(self.index):
            return self.score_bounded(inputs, lay, regions, grids_over)
        return (*self.score_windows(inputs, lay, len(images), regions), None)

    def prepare_windows(self, images: list[np.ndarray], lay: Layout) -> torch.Tensor:
        """Equally sized RGB images -> their view's ImageNet-normalised windows [B * T, 3, h, w], frame-major, on
        the device (what every backbone takes: an extractor maps them onto its own normalisation)."""
        with stage("resize_normalise"):
            return frame_windows(images, self.view, lay, IMAGENET_MEAN, IMAGENET_STD, self.device)

    def score_windows(self, inputs: torch.Tensor, lay: Layout, n_images: int,
                      regions: list[Region | None] | None = None) -> tuple[np.ndarray, torch.Tensor]:
        """The windows of `n_images` images of one layout -> image scores [B] and patch distances
        [B, n_windows, gh, gw] (0 outside the frame / region of interest). regions: per image, one that replaces
        the bank's ROI (None: the bank's)."""
        n_windows = len(lay.origins)
        grids, best, anchor, best_feature, grid = [], [], [], [], (0, 0)
        masks = None  # [B * T, L]: each window's valid patches, its image's region applied
        for begin in range(0, len(inputs), self.max_windows_per_pass):
            features, grid = self.extractor(inputs[begin:begin + self.max_windows_per_pass], self.int8)
            with stage("search"):
                count, n_patches, dim = features.shape
                if masks is None:
                    masks = self._batch_masks(lay, grid, regions, n_images)
                valid = masks[begin:begin + count]  # [c, L]
                distances, nearest = self.index.search(features.reshape(-1, dim), k=1)
                distances, nearest = distances.reshape(count, n_patches), nearest.reshape(count, n_patches)
                if self._position is not None:
                    distances = self._normalise(distances, begin, n_windows, grid)
                top, where = torch.where(valid, distances, float("-inf")).max(dim=1)
                rows = torch.arange(count, device=features.device)
                best.append(top)
                anchor.append(nearest[rows, where])
                best_feature.append(features[rows, where])
                grids.append(torch.where(valid, distances, 0.0))
        with stage("reweight"):
            best_t = torch.cat(best).reshape(n_images, n_windows)
            top, window = best_t.max(dim=1)  # each image's highest patch over all its windows
            pick = torch.arange(n_images, device=top.device) * n_windows + window
            scores = self._image_scores(top, torch.cat(anchor)[pick], torch.cat(best_feature)[pick])
        return scores, torch.cat(grids).reshape(n_images, n_windows, *grid)

    def _image_scores(self, top: torch.Tensor, anchor: torch.Tensor, feature: torch.Tensor) -> np.ndarray:
        """Eq. 7 of each image's highest patch distance `top` [B], its nearest bank feature `anchor` [B] and its
        feature [B, D] -> float32 scores [B]; 0 where nothing is inspected (an empty region of interest)."""
        scores = reweight(top, anchor, feature, self._bank, self.index, self.neighbours)
        return torch.where(torch.isfinite(top), scores, 0.0).cpu().numpy().astype(np.float32)

    def score_bounded(self, inputs: torch.Tensor, lay: Layout, regions: list[Region | None] | None,
                      grids_over: np.ndarray) -> tuple[np.ndarray, torch.Tensor, np.ndarray]:
        """score_windows for one window per frame when only the images at or over `grids_over` [B] need their patch
        distances: each pass's windows get their maxima from bounded.bounded_distances, their Eq. 7 scores, and
        the patch distances of those at or over their `grids_over` (bounded.complete). Returns the scores [B], the
        patch distances [B, 1, gh, gw] (0 in the rows not wanted) and which rows hold them (bool [B])."""
        n_images = len(inputs)
        scores, grids, wanted, masks = [], [], [], None
        for begin in range(0, n_images, self.max_windows_per_pass):
            features, grid = self.extractor(inputs[begin:begin + self.max_windows_per_pass], self.int8)
            with stage("search"):
                count = len(features)
                if masks is None:
                    masks = self._batch_masks(lay, grid, regions, n_images)
                valid = masks[begin:begin + count]  # [c, L]
                found = bounded.bounded_distances(self.index, features, valid)
                top, where = torch.where(valid, found.distances, float("-inf")).max(dim=1)
            with stage("reweight"):
                rows = torch.arange(count, device=features.device)
                part = self._image_scores(top, found.nearest[rows, where], features[rows, where])
            with stage("search"):
                want = np.asarray(self.verdict(part, grids_over[begin:begin + count]), dtype=bool)
                if want.any():
                    bounded.complete(self.index, features, found, valid, torch.from_numpy(want))
                kept = torch.from_numpy(want).to(valid.device)[:, None] & valid
                grids.append(torch.where(kept, found.distances, 0.0))
            scores.append(part)
            wanted.append(want)
        return (np.concatenate(scores), torch.cat(grids).reshape(n_images, 1, *grid), np.concatenate(wanted))

    def _valid_mask(self, lay: Layout, grid: tuple[int, int], region: Region | None = None) -> torch.Tensor:
        """bool [n_windows, L]: the patches inspected in each window, under `region` (None: the bank's ROI)."""
        key = (lay, grid, None if region is None else region.key)
        if key not in self._valid:
            if len(self._valid) >= self.max_cached_masks:
                self._valid.pop(next(iter(self._valid)))  # the oldest: settings versions come and go
            mask = valid_patches(lay, grid, self.bank.roi if region is None else region.mask)
            self._valid[key] = torch.from_numpy(mask.reshape(len(mask), -1)).to(self.device)
        return self._valid[key]

    def _batch_masks(self, lay: Layout, grid: tuple[int, int], regions: list[Region | None] | None,
                     n_images: int) -> torch.Tensor:
        """bool [B * T, L], frame-major: each image's window masks. The distinct masks of the batch are stacked once
        and gathered by each image's index: one tensor op for the batch, whatever its regions."""
        default = self._valid_mask(lay, grid)  # [T, L]
        if regions is None or all(r is None for r in regions):
            return default.repeat(n_images, 1)
        table, position = [default], {None: 0}
        for region in regions:
            key = None if region is None else region.key
            if key not in position:
                position[key] = len(table)
                table.append(self._valid_mask(lay, grid, region))
        index = torch.tensor([position[None if r is None else r.key] for r in regions], device=default.device)
        return torch.stack(table)[index].reshape(n_images * default.shape[0], default.shape[1])

    @staticmethod
    def _maps(patch_scores: torch.Tensor, lay: Layout) -> torch.Tensor:
        """Patch scores [B, n_windows, gh, gw] of one layout -> smoothed maps [B, work_h, work_w]. One window
        (crop, full): upsampling and Gaussian as two matrix products (scoring.window_maps); tiles: stitched
        (overlaps take the maximum), then smoothed."""
        if len(lay.origins) == 1 and lay.origins[0] == (0, 0):
            with stage("upsample"):  # upsampling and smoothing in one: timed as one stage
                return window_maps(patch_scores[:, 0], lay.window, lay.work)
        with stage("upsample"):
            unsmoothed = stitch(patch_scores, lay)
        with stage("smooth"):
            return smooth(unsmoothed)

    def heatmaps(self, result: ScoreResult, rows: Sequence[int]) -> list[np.ndarray]:
        """Smoothed maps of some images of a result scored with maps=False (e.g. only the anomalous ones):
        computed together for the images of each layout."""
        rows = list(rows)
        out: list = [None] * len(rows)
        groups: dict[Layout, list[int]] = {}
        for position, i in enumerate(rows):
            groups.setdefault(result.layouts[i], []).append(position)
        for lay, positions in groups.items():
            patches = torch.from_numpy(np.stack([result.patch_scores[rows[p]] for p in positions]))
            for p, heat in zip(positions, self._maps(patches, lay).numpy()):
                out[p] = heat
        return out

    @torch.inference_mode()
    def score_patches(self, patch_sets: Sequence[np.ndarray]) -> np.ndarray:
        """Image scores from already extracted patch features, one [P_i, D] array per image (P_i >= 1)."""
        if self.bank.position is not None:
            raise BankError("patch sets carry no positions: a bank with per-position statistics scores images")
        scores = np.zeros(len(patch_sets), dtype=np.float32)
        for i, patches in enumerate(patch_sets):
            features = torch.from_numpy(np.array(patches, dtype=np.float32)).to(self.device)
            distances, nearest = self.index.search(features, k=1)
            top, where = distances[:, 0].max(dim=0)
            scores[i] = float(reweight(top[None], nearest[where, 0][None], features[where][None], self._bank,
                                       self.index, self.neighbours)[0])
        return scores

class PatchStore:
    """Training patch features in bounded memory: the full vectors in a temporary file, their random
    projection (what the coreset works on) in memory, and which image each patch came from."""

    def __init__(self, folder: Path, dim: int, coreset: CoresetConfig):
        self.path = Path(folder) / "patches.f32"
        self.dim, self.coreset = dim, coreset
        self._file = open(self.path, "wb")
        self._projected: list[np.ndarray] = []
        self.counts: list[int] = []
        self._features: np.ndarray | None = None

    def add(self, patches: np.ndarray) -> None:
        patches = np.ascontiguousarray(patches, dtype=np.float32)
        self._file.write(patches.tobytes())
        self._projected.append(random_projection(patches, self.coreset.projection_dim, self.coreset.seed))
        self.counts.append(len(patches))

    def close(self) -> None:
        self._file.close()
        total = sum(self.counts)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self.projected = np.concatenate(self._projected) if self._projected else np.zeros((0, 1), np.float32)
        self._projected = []
        self._features = np.memmap(self.path, dtype=np.float32, mode="r", shape=(total, self.dim)) if total else None

    def image(self, i: int) -> np.ndarray:
        return np.asarray(self._features[self.offsets[i]:self.offsets[i + 1]])

    def gather(self, indices: np.ndarray) -> np.ndarray:
        order = np.argsort(indices)  # sequential reads, then back to the selection order
        rows = np.empty((len(indices), self.dim), dtype=np.float32)
        rows[order] = self._features[indices[order]]
        return rows

    def points_of(self, images: np.ndarray) -> np.ndarray:
        """Indices of the patches of the given images (bool mask over images)."""
        return np.concatenate([np.arange(self.offsets[i], self.offsets[i + 1]) for i in np.flatnonzero(images)])


def extract_patches(extractor: PatchFeatureExtractor, sources: Sequence[Image], view: ViewConfig,
                    roi: np.ndarray | None, batch_size: int, device: torch.device,
                    progress: bool = False, layouts: list | None = None,
                    int8: Int8Calibration | None = None) -> Iterator[np.ndarray]:
    """The valid patch features [P_i, D] of each image, in order (the view's windows, padding and ROI applied).
    layouts: when given, each image's (layout, grid, valid mask [T * gh * gw]) is appended to it. int8: the
    calibration windows an int8 extractor quantises with."""
    masks: dict = {}
    with torch.inference_mode(), tqdm(total=len(sources), desc="features", unit="img", disable=not progress) as bar:
        for images in iter_image_batches(sources, batch_size):
            out: list = [None] * len(images)
            where: list = [None] * len(images)  # each image's (layout, grid, valid mask)
            for (height, width, *_), rows in shape_groups(images).items():
                lay = layout(view, height, width)
                inputs = frame_windows([images[i] for i in rows], view, lay, IMAGENET_MEAN, IMAGENET_STD, device)
                chunks = [extractor(inputs[b:b + PatchCoreScorer.max_windows_per_pass], int8)
                          for b in range(0, len(inputs), PatchCoreScorer.max_windows_per_pass)]
                grid = chunks[0][1]
                features = torch.cat([c[0] for c in chunks]).cpu().numpy()
                features = features.reshape(len(rows), -1, features.shape[-1])  # [b, T * L, D]
                key = (lay, grid)
                if key not in masks:
                    masks[key] = valid_patches(lay, grid, roi).reshape(-1)
                if not masks[key].any():
                    raise ValueError(f"no patch of a {height}x{width} image lies in the region of interest")
                for j, i in enumerate(rows):
                    out[i] = features[j][masks[key]]
                    where[i] = (lay, grid, masks[key])
            if layouts is not None:
                layouts.extend(where)
            yield from out
            bar.update(len(images))


def calibration_windows(sources: Sequence[Image], view: ViewConfig, device: torch.device,
                        count: int = CALIBRATION_WINDOW_COUNT) -> np.ndarray:
    """Up to `count` good windows [N, 3, h, w] float16, ImageNet-normalised as every backbone takes them, spread
    over the training images (theirs and the view's windows alike; those of the first image's window size): what
    int8 scoring takes its activation ranges from (scorer.features.Int8Calibration)."""
    picks = np.unique(np.linspace(0, len(sources) - 1, min(count, len(sources))).astype(int))
    found: list[torch.Tensor] = []
    for i in picks:
        image = to_rgb(sources[i]) if isinstance(sources[i], np.ndarray) else load_image(sources[i])
        lay = layout(view, image.shape[0], image.shape[1])
        found.append(frame_windows([image], view, lay, IMAGENET_MEAN, IMAGENET_STD, device).cpu())
    size = found[0].shape[-2:]
    every = torch.cat([w for w in found if w.shape[-2:] == size])
    count = max(1, min(count, CALIBRATION_BYTES // (2 * every[0].numel())))
    chosen = np.unique(np.linspace(0, len(every) - 1, min(count, len(every))).astype(int))
    return every[torch.from_numpy(chosen)].to(torch.float16).numpy()


class BankFit:
    """Coreset, bank and good scores from training patches already in a PatchStore (the fit after the features)."""

    def __init__(self, store: PatchStore, config: BuildConfig, feature_config: FeatureConfig, roi: np.ndarray | None,
                 extractor: PatchFeatureExtractor, device: torch.device, index: str = "auto", progress: bool = False,
                 windows: np.ndarray | None = None):
        self.store, self.config, self.feature_config, self.roi = store, config, feature_config, roi
        self.extractor, self.device, self.index, self.progress = extractor, device, index, progress
        self.windows = windows  # the banks' int8 calibration windows (calibration_windows)
        self.radius: dict[str, float] = {}

    def coreset(self, points: np.ndarray | None, desc: str) -> np.ndarray:
        """Coreset of the given patches (all when None), as global indices in selection order."""
        projected = self.store.projected if points is None else self.store.projected[points]
        with tqdm(total=coreset_size(len(projected), self.config.coreset.fraction), desc=desc, unit="pt",
                  disable=not self.progress) as bar:
            chosen = select_coreset(None, self.config.coreset, progress=bar.update, projected=projected)
        self.radius[desc] = chosen.radius
        return chosen.indices if points is None else points[chosen.indices]

    def bank_of(self, selected: np.ndarray, calibration: Calibration | None = None,
                info: dict | None = None, position: PositionNorm | None = None) -> MemoryBank:
        return MemoryBank(self.store.gather(selected), self.feature_config, self.config.coreset, calibration,
                          self.config.reweight_neighbours, info or {}, self.config.view, self.roi, position,
                          self.windows)

    def position_norm(self, selected: np.ndarray, layouts: list) -> tuple[PositionNorm, np.ndarray | None]:
        """Per-position statistics of the training images' leave-one-out patch distances (scorer/position.py),
        and the images' good scores under them (each image normalised without its own distances; None without
        calibration). layouts: each training image's (layout, grid, valid mask), from extract_patches."""
        # what positions mean: the windows, their grid and the patches inspected (frames of other sizes may share it)
        keys = {(len(lay.origins), lay.window, grid, mask.tobytes()) for lay, grid, mask in layouts}
        if len(keys) != 1:
            raise ValueError(f"--position-norm needs training images of one window layout (one frame size under "
                             f"the full and tiles views); these give {len(keys)}")
        lay, grid, mask = layouts[0]
        leave = self.leave_out(selected)
        with tqdm(total=len(layouts), desc="position statistics", unit="img", disable=not self.progress) as bar:
            distances = leave.patch_distances(bar.update)
        position = position_norm(distances, np.flatnonzero(mask), (len(lay.origins), *grid), lay.window)
        if not self.config.calibration.folds:
            return position, None
        with tqdm(total=len(layouts), desc="calibration (leave-one-out)", unit="img",
                  disable=not self.progress) as bar:
            good = leave.normalised_scores(leave_one_out_z(distances, position.floor), self.config.reweight_neighbours,
                                           bar.update)
        return position, good

    def leave_out(self, selected: np.ndarray) -> LeaveOut:
        """Leave-one-out coresets of the coreset `selected` (made by `coreset(None, "coreset")`)."""
        n_images = len(self.store.counts)
        excluded = exclusion_ranges(n_images, self.config.calibration.twin_window(n_images))
        return LeaveOut(self.store, selected, self.radius["coreset"], excluded)

    def leave_out_scores(self, selected: np.ndarray) -> np.ndarray:
        """Each training image against the coreset built without it (and its near-twins) [N]."""
        with tqdm(total=len(self.store.counts), desc="calibration (leave-one-out)", unit="img",
                  disable=not self.progress) as bar:
            return self.leave_out(selected).scores(self.config.reweight_neighbours, bar.update)

    def kfold_scores(self) -> np.ndarray:
        """Each fold's images against a coreset of the other folds [N] (the older method)."""
        settings, n_images = self.config.calibration, len(self.store.counts)
        ids = fold_ids(n_images, settings.folds, settings.contiguous, self.config.coreset.seed)
        good = np.zeros(n_images, dtype=np.float64)
        for k in range(settings.folds):
            held = ids == k
            fold_bank = self.bank_of(self.coreset(self.store.points_of(~held),
                                                  f"calibration fold {k + 1}/{settings.folds}"))
            # the exact search: the threshold does not depend on the device the bank was built on
            scorer = PatchCoreScorer(fold_bank, device=self.device, index=self.index, extractor=self.extractor,
                                     search="exact")
            good[held] = scorer.score_patches([self.store.image(i) for i in np.flatnonzero(held)])
        return good

    def calibration(self, good: np.ndarray, method: str) -> Calibration:
        """The threshold at the configured false-alarm rate from good scores computed by `method`."""
        settings = self.config.calibration
        return Calibration.fitted(good, settings.false_alarm_rate, f"{method}-gumbel", settings.folds,
                                  settings.confidence)


def frame_size(images: Sequence[Image]) -> tuple[int, int]:
    """(height, width) of the first of `images` (a file is decoded: EXIF orientation as scoring sees it)."""
    first = images[0]
    return tuple((first if isinstance(first, np.ndarray) else load_image(first)).shape[:2])


def build_bank(images: Sequence[Image], config: BuildConfig = BuildConfig(), weights: str | Path | None = None,
               device: str | torch.device = "auto", progress: bool = True, roi: np.ndarray | None = None,
               index: str = "auto", compute: ComputeConfig = ComputeConfig()) -> MemoryBank:
    """Fit: patch features of good images (files or RGB arrays) -> coreset memory bank with a threshold.
    An ensemble's backbone ("a+b") gives an EnsembleBank instead (scorer.ensemble.build_ensemble).

    The threshold comes from good images only: each training image is scored against the coreset the build
    would have made without it (and its near-twins, for contiguous frames; scorer/heldout.py) - what the
    returned bank gives an unseen good image - and a Gumbel fitted to those scores gives the threshold at the
    target false-alarm rate (scorer/calibration.py; method "kfold": folds against coresets of the other
    folds). Features live in a temporary file, so memory is bounded by the projected points (projection_dim floats per patch).
    """
    if not len(images):
        raise ValueError("no training images given")
    roi = None if roi is None else np.asarray(roi).astype(bool)
    frame = frame_size(images)  # "auto" resolves from it; a worker readies the backbone for it (warm_up)
    view, view_choice = config.view.resolve(*frame, roi)
    config = replace(config, view=view)
    chosen = {"frame_size": list(frame), **({"view_choice": view_choice} if view_choice else {})}
    if ensemble_members(config.features.backbone):  # "a+b": one member bank per backbone
        if config.position_norm:
            raise ValueError("--position-norm is for single-backbone banks, not ensembles")
        from .ensemble import build_ensemble  # scorer.ensemble builds on this module

        bank = build_ensemble(images, config, weights, device, progress, roi, index, compute)
        return replace(bank, info={**bank.info, **chosen})
    started = time.perf_counter()
    device = resolve_device(device)
    apply_thread_plan()
    extractor, feature_config = build_extractor(config.features, weights, device, compute)
    if config.features.layers == (FINE_TAPS,):  # 4x the patches: the bank's size as the default taps' (FINE_CORESET_SCALE)
        config = replace(config, coreset=replace(config.coreset, fraction=config.coreset.fraction * FINE_CORESET_SCALE))
    layouts = [] if config.position_norm else None
    windows = calibration_windows(images, config.view, device)  # stored: any bank can be scored in int8
    with tempfile.TemporaryDirectory(prefix="patchcore-build-") as folder:
        store = PatchStore(Path(folder), feature_config.target_dim, config.coreset)
        for patches in extract_patches(extractor, images, config.view, roi, config.batch_size, device, progress,
                                       layouts, Int8Calibration(windows)):
            store.add(patches)
        store.close()
        feature_seconds = time.perf_counter() - started
        fit = BankFit(store, config, feature_config, roi, extractor, device, index, progress, windows)
        selected = fit.coreset(None, "coreset")
        calibration, settings, position = None, config.calibration, None
        if config.position_norm:  # leave-out only (BuildConfig): good scores in z units
            position, good = fit.position_norm(selected, layouts)
            calibration = None if good is None else fit.calibration(good, settings.method)
        elif settings.folds:
            good = fit.kfold_scores() if settings.method == "kfold" else fit.leave_out_scores(selected)
            calibration = fit.calibration(good, settings.method)
        info = {"n_train_images": len(images), "n_train_patches": int(len(store.projected)),
                # every training patch lies within this distance (projected space) of the bank: bank updates
                # add new patches until they do too
                "coverage_radius": round(float(fit.radius["coreset"]), 6),
                "feature_seconds": round(feature_seconds, 2), "build_seconds": round(time.perf_counter() - started, 2),
                "compute": extractor.compute.to_dict(),  # how the features were computed (any bank scores with any)
                **chosen}  # the training frames' size; for "auto", why this view
        return fit.bank_of(selected, calibration, info, position)


def update_bank(bank: AnyBank, images: Sequence[Image], weights: str | Path | None = None,
                device: str | torch.device = "auto", progress: bool = False, index: str = "auto",
                batch_size: int = 16, compute: ComputeConfig = ComputeConfig()) -> AnyBank:
    """A bank that also knows new good images (e.g. dismissed false alarms), without a full rebuild.

    The greedy selection continues from the bank's coreset over the new images' patches until every new
    patch lies within the bank's recorded coverage radius (at most `coreset fraction` of the new patches
    are added). Each new image is scored against the bank before the update (a bank that did not see it),
    its score joins the stored good scores, and the threshold is refitted at the bank's false-alarm rate.
    An ensemble updates each member so, and its own threshold from the members' new scores combined
    (scorer/ensemble.py update_ensemble).
    """
    if not len(images):
        raise ValueError("no new images given")
    if isinstance(bank, EnsembleBank):
        from .ensemble import update_ensemble  # scorer.ensemble builds on this module

        if weights is not None:
            raise BankError("an ensemble loads each member's ImageNet weights: --weights is for one backbone")
        return update_ensemble(bank, images, device, progress, index, batch_size, compute)
    return update_member(bank, images, weights, device, progress, index, batch_size, compute)[0]


def update_member(bank: MemoryBank, images: Sequence[Image], weights: str | Path | None = None,
                  device: str | torch.device = "auto", progress: bool = False, index: str = "auto",
                  batch_size: int = 16, compute: ComputeConfig = ComputeConfig()) -> tuple[MemoryBank, np.ndarray]:
    """update_bank of a single-backbone bank -> (the updated bank, the new images' scores [N] against the bank
    before the update, by the exact search)."""
    if bank.position is not None:
        raise BankError("a bank with per-position statistics cannot be updated in place yet: rebuild it with the "
                        "new images")
    device = resolve_device(device)
    extractor, _ = build_extractor(replace(bank.feature_config, weights_sha256=""), weights, device, compute)
    # refuses a mismatch; the exact search, as the stored good scores were computed (build_bank)
    scorer = PatchCoreScorer(bank, device=device, index=index, extractor=extractor, search="exact")
    patches = list(extract_patches(extractor, images, bank.view, bank.roi, batch_size, device, progress,
                                   int8=scorer.int8))
    new_scores = scorer.score_patches(patches)
    new = np.concatenate(patches)
    config = bank.coreset
    radius = bank.info.get("coverage_radius")
    if radius is None:
        raise BankError("this bank records no coverage radius (built before bank updates existed): rebuild it")
    extension = extend_coreset(random_projection(bank.features, config.projection_dim, config.seed),
                               random_projection(new, config.projection_dim, config.seed), float(radius),
                               max_new=coreset_size(len(new), config.fraction))
    added = extension.indices
    calibration = bank.calibration
    if calibration is not None and calibration.false_alarm_rate is not None:
        calibration = calibration.refit(np.concatenate([np.asarray(calibration.good_scores), new_scores]))
    info = {**bank.info, "n_train_images": int(bank.info.get("n_train_images", 0)) + len(images),
            "updates": int(bank.info.get("updates", 0)) + 1, "last_update_images": len(images),
            "last_update_added": int(len(added)),
            "coverage_radius": round(max(float(radius), float(extension.radius)), 6)}
    features = np.concatenate([bank.features, new[added]]) if len(added) else bank.features
    return (replace(bank, features=np.ascontiguousarray(features, dtype=np.float32), calibration=calibration,
                    info=info), np.asarray(new_scores, dtype=np.float64))
