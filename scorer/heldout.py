"""Scores of training images as the shipped bank scores an unseen good image: leave-one-out coresets.

A threshold must describe what the shipped bank does to good images it never saw. The k-fold scores
(each fold against a coreset of the other folds) come from banks of (k-1)/k of the images: sparser
coverage, so good scores that can run high, the more so the fewer the images. Simply dropping an image's
own points from the shipped coreset is worse: the greedy selection picked exactly the image's patches
that nothing else covered, and without them its outlying patches meet holes no unseen image would meet
(measured on bottle, 30 images: good scores 0.9 above the test images' mean, bench/threshold_sizes.py).

So each training image i is scored against the coreset the build would have made without it: the shipped
coreset less the points i (and, for video frames, its near-twin neighbours) contributed, repaired by
continuing the same greedy selection (`extend_coreset`, as a bank update does) over the other images'
patches those points covered (their nearest coreset point in the projected space), until every one of
them is back within the coverage radius or the removed points' budget is spent. That bank has the
shipped bank's size and coverage and never saw image i: a leave-one-out coreset for the price of a small
extension per image. Scoring: the scorer's exact search and Eq. 7 on that bank (equal to
`PatchCoreScorer(bank, search="exact").score_patches`, tests/test_calibration.py).
"""
from __future__ import annotations

from typing import Callable, Protocol

import numpy as np
import torch

from .coreset import extend_coreset

BLOCK_ELEMENTS = 1 << 25  # distance-matrix elements per block of queries: bounds a block's memory


class PatchSource(Protocol):
    """The training patches (scorer.model.PatchStore): projected [P, d] in memory, full vectors on demand."""

    projected: np.ndarray  # [P, d] float32
    offsets: np.ndarray  # [N + 1] int64: image i owns patches offsets[i]:offsets[i + 1]

    def gather(self, indices: np.ndarray) -> np.ndarray: ...  # [len, D] float32

    def image(self, i: int) -> np.ndarray: ...  # [P_i, D] float32


def bank_owners(selected: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """The training image each bank feature came from: global patch indices [M] -> image indices [M]."""
    return np.searchsorted(offsets, np.asarray(selected, dtype=np.int64), side="right").astype(np.int64) - 1


def exclusion_ranges(n_images: int, twin_window: int) -> np.ndarray:
    """Per image, the [first, last] image indices it must not be scored against: itself, and its
    `twin_window` neighbours on each side (consecutive video frames are near-twins). [N, 2] int64."""
    if twin_window < 0:
        raise ValueError(f"twin window must be >= 0, got {twin_window}")
    i = np.arange(n_images, dtype=np.int64)
    return np.stack([np.maximum(i - twin_window, 0), np.minimum(i + twin_window, n_images - 1)], axis=1)


def nearest_rows(queries: torch.Tensor, bank: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Indices [Q, k] of each query's k nearest bank rows (squared-distance expansion, in blocks)."""
    bank_sq = (bank * bank).sum(dim=1)
    step = max(1, BLOCK_ELEMENTS // max(len(bank), 1))
    out = []
    for begin in range(0, len(queries), step):
        block = queries[begin:begin + step]
        distances = (block * block).sum(dim=1, keepdim=True) + bank_sq[None, :] - 2.0 * block @ bank.T
        out.append(distances.topk(k, dim=1, largest=False).indices)
    return torch.cat(out) if out else torch.zeros((0, k), dtype=torch.int64)


def exact_image_score(patches: torch.Tensor, bank: torch.Tensor, neighbours: int) -> float:
    """An image's score against a bank [M, D]: its highest patch distance |q - m*| (true L2, not the
    expansion), times Eq. 7's 1 - softmax(d)[0] over the distances to m*'s `neighbours` nearest bank rows."""
    nearest = nearest_rows(patches, bank)[:, 0]
    distances = torch.linalg.vector_norm(patches - bank[nearest], dim=1)
    top, where = distances.max(dim=0)
    return float(top) * eq7_weight(patches[where], int(nearest[where]), bank, neighbours)


def eq7_weight(patch: torch.Tensor, anchor: int, bank: torch.Tensor, neighbours: int) -> float:
    """Eq. 7's 1 - softmax(d)[0] for an image's highest patch [D] whose nearest bank row is `anchor`: d its
    distances to m*'s `neighbours` nearest bank rows (1.0 for neighbours <= 1: the plain maximum)."""
    if neighbours <= 1:
        return 1.0
    support = nearest_rows(bank[anchor][None], bank, min(neighbours, len(bank)))[0]
    d = torch.linalg.vector_norm(bank[support] - patch[None], dim=1)
    return float(1.0 - torch.softmax(d, dim=0)[0])


class LeaveOut:
    """Leave-one-out coresets of a built coreset (see the module doc): `rows(i)` and `scores(neighbours)`."""

    def __init__(self, store: PatchSource, selected: np.ndarray, radius: float, excluded: np.ndarray):
        """selected: the shipped coreset's global patch indices [M]; radius: its coverage radius (projected);
        excluded: [N, 2] inclusive image ranges left out with each image (`exclusion_ranges`)."""
        self.store = store
        self.selected = np.asarray(selected, dtype=np.int64)
        self.radius = float(radius)
        self.excluded = np.asarray(excluded, dtype=np.int64)
        self.owners = bank_owners(self.selected, store.offsets)
        centres = torch.from_numpy(np.ascontiguousarray(store.projected[self.selected]))
        # each training patch's nearest coreset point (its cell), in the projected space the selection used
        self.cell = nearest_rows(torch.from_numpy(np.ascontiguousarray(store.projected)), centres)[:, 0].numpy()

    def rows(self, i: int) -> np.ndarray:
        """Global patch indices of image i's leave-one-out coreset: the kept points, then the repair's."""
        lo, hi = (int(v) for v in self.excluded[i])
        removed = (self.owners >= lo) & (self.owners <= hi)
        kept = self.selected[~removed]
        if not len(kept):
            raise ValueError(f"image {i}: every coreset point belongs to an excluded image; nothing to score against")
        if not removed.any():
            return kept
        first, last = self.store.offsets[lo], self.store.offsets[hi + 1]
        orphans = np.flatnonzero(removed[self.cell])
        orphans = orphans[(orphans < first) | (orphans >= last)]  # the excluded images' own patches stay out
        if not len(orphans):
            return kept
        projected = self.store.projected
        added = extend_coreset(projected[kept], projected[orphans], self.radius, max_new=int(removed.sum())).indices
        return np.concatenate([kept, orphans[added]])

    @torch.inference_mode()
    def scores(self, neighbours: int, progress: Callable[[int], None] | None = None) -> np.ndarray:
        """Every training image's score [N] float64 against its leave-one-out coreset (Eq. 7 with b =
        `neighbours`; <= 1: the plain highest patch distance); progress(1) after each image."""
        n_images = len(self.store.offsets) - 1
        out = np.zeros(n_images, dtype=np.float64)
        for i in range(n_images):
            bank = torch.from_numpy(self.store.gather(self.rows(i)))
            patches = torch.from_numpy(np.array(self.store.image(i), dtype=np.float32))  # memmap rows: a copy
            out[i] = exact_image_score(patches, bank, neighbours)
            if progress is not None:
                progress(1)
        return out

    @torch.inference_mode()
    def patch_distances(self, progress: Callable[[int], None] | None = None) -> np.ndarray:
        """Every training image's patch distances against its leave-one-out coreset (true L2 to the nearest
        row), for per-position statistics (scorer/position.py): [N, P] float32, all images having P patches."""
        n_images = len(self.store.offsets) - 1
        counts = np.diff(self.store.offsets)
        if len(set(counts.tolist())) != 1:
            raise ValueError(f"training images give {sorted(set(counts.tolist()))} patches: per-position statistics "
                             f"need one layout (images of one size)")
        out = np.zeros((n_images, int(counts[0])), dtype=np.float32)
        for i in range(n_images):
            bank = torch.from_numpy(self.store.gather(self.rows(i)))
            patches = torch.from_numpy(np.array(self.store.image(i), dtype=np.float32))
            nearest = nearest_rows(patches, bank)[:, 0]
            out[i] = torch.linalg.vector_norm(patches - bank[nearest], dim=1).numpy()
            if progress is not None:
                progress(1)
        return out

    @torch.inference_mode()
    def normalised_scores(self, z: np.ndarray, neighbours: int,
                          progress: Callable[[int], None] | None = None) -> np.ndarray:
        """Every training image's score [N] float64 from its normalised patch scores z [N, P]: the highest z
        times Eq. 7's weight of that patch against its leave-one-out coreset (as `scores` does with distances)."""
        out = np.zeros(len(z), dtype=np.float64)
        for i, row in enumerate(z):
            where = int(np.argmax(row))
            weight = 1.0
            if neighbours > 1:
                bank = torch.from_numpy(self.store.gather(self.rows(i)))
                patch = torch.from_numpy(np.array(self.store.image(i)[where], dtype=np.float32))
                weight = eq7_weight(patch, int(nearest_rows(patch[None], bank)[0, 0]), bank, neighbours)
            out[i] = float(row[where]) * weight
            if progress is not None:
                progress(1)
        return out
