"""Patch scores -> image scores (max, or the paper's Eq. 7 reweighting) and anomaly maps."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from .index import NearestNeighbourIndex

MAP_SIGMA = 4.0


def image_scores(patch_scores: torch.Tensor, nearest: torch.Tensor, features: torch.Tensor,
                 bank: torch.Tensor, index: NearestNeighbourIndex, neighbours: int) -> torch.Tensor:
    """Per-image score [B] from patch scores [B, L], their nearest bank indices [B, L] and features [B, L, D].

    neighbours <= 1: the largest patch score. Otherwise Eq. 7: s = (1 - softmax(d)[0]) * s*, where s* is
    the largest patch score, m* its nearest bank feature, and d the distances from that test patch to
    the `neighbours` nearest bank features of m* (m* itself first), as anomalib implements it.
    """
    best, where = patch_scores.max(dim=1)
    if neighbours <= 1:
        return best
    rows = torch.arange(len(best), device=patch_scores.device)
    anchor = nearest[rows, where]  # m*
    test_patch = features[rows, where]  # m_test,*
    _, support = index.search(bank[anchor.to(bank.device)], k=neighbours)
    support_features = bank[support.to(bank.device)].to(test_patch.device)  # [B, b, D]
    distances = torch.linalg.vector_norm(support_features - test_patch[:, None, :], dim=2)
    weight = 1.0 - torch.softmax(distances, dim=1)[:, 0]
    return weight * best


def gaussian_kernel_size(sigma: float) -> int:
    """Odd kernel size covering +-4 sigma, as scipy.ndimage.gaussian_filter's default truncate=4."""
    return 2 * int(4.0 * sigma + 0.5) + 1


def anomaly_maps(patch_scores: torch.Tensor, grid: tuple[int, int], size: int, sigma: float = MAP_SIGMA) -> torch.Tensor:
    """Patch scores [B, h*w] -> maps [B, size, size]: bilinear upsampling then Gaussian smoothing, batched."""
    maps = patch_scores.reshape(-1, 1, grid[0], grid[1])
    maps = F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False)
    if sigma > 0:
        maps = TF.gaussian_blur(maps, kernel_size=[gaussian_kernel_size(sigma)] * 2, sigma=[sigma, sigma])
    return maps[:, 0]
