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
    rows = torch.arange(len(best), device=patch_scores.device)
    return reweight(best, nearest[rows, where], features[rows, where], bank, index, neighbours)


def reweight(best: torch.Tensor, anchor: torch.Tensor, test_patch: torch.Tensor, bank: torch.Tensor,
             index: NearestNeighbourIndex, neighbours: int) -> torch.Tensor:
    """Eq. 7 for each image's highest patch: its score `best` [B], nearest bank index m* `anchor` [B] and
    feature `test_patch` [B, D]. neighbours <= 1: the plain maximum."""
    if neighbours <= 1 or len(best) == 0:
        return best
    _, support = index.search(bank[anchor.to(bank.device)], k=neighbours)
    support_features = bank[support.to(bank.device)].to(test_patch.device)  # [B, b, D]
    distances = torch.linalg.vector_norm(support_features - test_patch[:, None, :], dim=2)
    weight = 1.0 - torch.softmax(distances, dim=1)[:, 0]
    return weight * best


def gaussian_kernel_size(sigma: float) -> int:
    """Odd kernel size covering +-4 sigma, as scipy.ndimage.gaussian_filter's default truncate=4."""
    return 2 * int(4.0 * sigma + 0.5) + 1


def smooth(maps: torch.Tensor, sigma: float = MAP_SIGMA) -> torch.Tensor:
    """Gaussian smoothing of maps [B, H, W] (kernel +-4 sigma, mirrored borders), batched."""
    if sigma <= 0:
        return maps
    size = gaussian_kernel_size(sigma)
    height, width = maps.shape[-2:]
    # mirroring needs a side longer than half the kernel: tiny maps (thin strips) are edge-extended first
    grow_y, grow_x = max(0, size // 2 + 1 - height), max(0, size // 2 + 1 - width)
    padded = F.pad(maps[:, None], (0, grow_x, 0, grow_y), mode="replicate") if grow_y or grow_x else maps[:, None]
    blurred = TF.gaussian_blur(padded, kernel_size=[size, size], sigma=[sigma, sigma])
    return blurred[:, 0, :height, :width]


def anomaly_maps(patch_scores: torch.Tensor, grid: tuple[int, int], size: int | tuple[int, int],
                 sigma: float = MAP_SIGMA) -> torch.Tensor:
    """Patch scores [B, h*w] -> maps [B, H, W] (size: an int for square maps): bilinear upsampling then
    Gaussian smoothing, batched."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    maps = patch_scores.reshape(-1, 1, grid[0], grid[1])
    maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    return smooth(maps[:, 0], sigma)
