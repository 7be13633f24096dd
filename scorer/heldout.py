"""Scores of training images as the shipped bank scores an unseen good image: its own patches left out.

A threshold must describe what the bank that ships does to good images it never saw. Scoring fold k
against a coreset of the other folds (k-fold) uses a bank built from (k-1)/k of the images: fewer images,
sparser coverage, higher good scores, the more so the fewer the images (54 images: the threshold sat above
every test score). Here each training image is scored against the shipped coreset itself with every bank
feature that came from it (and, for video frames, from its near-twin neighbours) left out: the bank an
unseen image meets, less only the points the image itself contributed.

The scoring is the scorer's exact search and Eq. 7 with the excluded features masked out: for image i,
patch distances to every bank feature not owned by an excluded image, the highest patch's nearest
remaining feature m*, and m*'s `neighbours` nearest remaining features for the reweighting. It equals
`PatchCoreScorer(bank without those rows, search="exact").score_patches` (tests/test_calibration.py).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

# distance-matrix elements per block ([images x patches, bank] float32): bounds the memory of a block
BLOCK_ELEMENTS = 1 << 25


def bank_owners(selected: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """The training image each bank feature came from: selected global patch indices [M] and the images'
    patch offsets [N + 1] -> image indices [M] (int64)."""
    return np.searchsorted(offsets, np.asarray(selected, dtype=np.int64), side="right").astype(np.int64) - 1


def exclusion_ranges(n_images: int, twin_window: int) -> np.ndarray:
    """Per image, the [first, last] image indices whose bank features it must not be scored against:
    itself, and its `twin_window` neighbours on each side (consecutive video frames are near-twins). [N, 2]."""
    if twin_window < 0:
        raise ValueError(f"twin window must be >= 0, got {twin_window}")
    i = np.arange(n_images, dtype=np.int64)
    return np.stack([np.maximum(i - twin_window, 0), np.minimum(i + twin_window, n_images - 1)], axis=1)


def _nearest_allowed(queries: torch.Tensor, bank: torch.Tensor, bank_sq: torch.Tensor, blocked: torch.Tensor,
                     k: int) -> torch.Tensor:
    """Indices [Q, k] of the k nearest bank features of each query among those not `blocked` [Q, M] (bool)."""
    sq = (queries * queries).sum(dim=1, keepdim=True)
    distances = (sq + bank_sq[None, :] - 2.0 * queries @ bank.T).masked_fill_(blocked, float("inf"))
    return distances.topk(k, dim=1, largest=False).indices


@torch.inference_mode()
def leave_out_scores(bank: np.ndarray, owners: np.ndarray, patch_sets: Sequence[np.ndarray], excluded: np.ndarray,
                     neighbours: int) -> np.ndarray:
    """Image scores [N] float64 of training images against a bank, each without its excluded images' features.

    bank: [M, D] float32 features; owners: [M] image index of each feature; patch_sets: N arrays [P_i, D]
    (the images' valid patch features); excluded: [N, 2] inclusive image-index ranges (`exclusion_ranges`);
    neighbours: b of Eq. 7 (<= 1: the plain highest patch distance). At least one feature must remain.
    """
    features = torch.from_numpy(np.ascontiguousarray(bank, dtype=np.float32))
    owner = torch.from_numpy(np.asarray(owners, dtype=np.int64))
    ranges = torch.from_numpy(np.asarray(excluded, dtype=np.int64))
    if len(patch_sets) != len(ranges):
        raise ValueError(f"{len(patch_sets)} images but {len(ranges)} exclusion ranges")
    bank_sq = (features * features).sum(dim=1)
    scores = np.zeros(len(patch_sets), dtype=np.float64)
    for i, patches in enumerate(patch_sets):
        lo, hi = int(ranges[i, 0]), int(ranges[i, 1])
        blocked_row = (owner >= lo) & (owner <= hi)  # [M]
        if bool(blocked_row.all()):
            raise ValueError(f"image {i}: every bank feature belongs to an excluded image; nothing to score against")
        query = torch.from_numpy(np.array(patches, dtype=np.float32))  # a copy: memmap rows are read-only
        nearest = torch.empty(len(query), dtype=torch.int64)
        step = max(1, BLOCK_ELEMENTS // max(len(features), 1))
        for begin in range(0, len(query), step):
            block = query[begin:begin + step]
            nearest[begin:begin + step] = _nearest_allowed(block, features, bank_sq,
                                                           blocked_row.expand(len(block), -1), 1)[:, 0]
        # the true |q - b| of each patch's neighbour (the expansion loses digits to cancellation)
        distances = torch.linalg.vector_norm(query - features[nearest], dim=1)
        top, where = distances.max(dim=0)
        score = float(top)
        if neighbours > 1:
            anchor = features[nearest[where]][None]
            support = _nearest_allowed(anchor, features, bank_sq, blocked_row[None],
                                       min(neighbours, int((~blocked_row).sum())))[0]
            d = torch.linalg.vector_norm(features[support] - query[where][None], dim=1)
            score *= float(1.0 - torch.softmax(d, dim=0)[0])
        scores[i] = score
    return scores
