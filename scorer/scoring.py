"""Patch scores -> image scores (max, or the paper's Eq. 7 reweighting) and anomaly maps."""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from .index import NearestNeighbourIndex, ShortlistIndex

MAP_SIGMA = 4.0


def image_scores(patch_scores: torch.Tensor, nearest: torch.Tensor, features: torch.Tensor,
                 bank: torch.Tensor, index: NearestNeighbourIndex | ShortlistIndex, neighbours: int) -> torch.Tensor:
    """Per-image score [B] from patch scores [B, L], their nearest bank indices [B, L] and features [B, L, D].

    neighbours <= 1: the largest patch score. Otherwise Eq. 7: s = (1 - softmax(d)[0]) * s*, where s* is
    the largest patch score, m* its nearest bank feature, and d the distances from that test patch to
    the `neighbours` nearest bank features of m* (m* itself first), as anomalib implements it.
    """
    best, where = patch_scores.max(dim=1)
    rows = torch.arange(len(best), device=patch_scores.device)
    return reweight(best, nearest[rows, where], features[rows, where], bank, index, neighbours)


def reweight(best: torch.Tensor, anchor: torch.Tensor, test_patch: torch.Tensor, bank: torch.Tensor,
             index: NearestNeighbourIndex | ShortlistIndex, neighbours: int) -> torch.Tensor:
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


# Border handling of the Gaussian, named as scipy.ndimage names them (torch's "reflect" is scipy's "mirror").
BORDERS = ("mirror", "reflect")  # mirror: d c b | a b c d | c b a; reflect: c b a | a b c d | d c b


def _border_indices(n: int, radius: int, border: str, device: torch.device) -> torch.Tensor:
    """Source index of each of the n + 2 * radius padded positions (any n >= 1, any radius)."""
    i = torch.arange(-radius, n + radius, device=device)
    if border == "reflect":
        i = i % (2 * n)
        return torch.where(i < n, i, 2 * n - 1 - i)
    if border == "mirror":
        if n == 1:
            return torch.zeros_like(i)
        i = i % (2 * n - 2)
        return torch.where(i < n, i, 2 * n - 2 - i)
    raise ValueError(f"unknown border {border!r}; choose from {', '.join(BORDERS)}")


def smooth(maps: torch.Tensor, sigma: float = MAP_SIGMA, border: str = "mirror") -> torch.Tensor:
    """Gaussian smoothing of maps [B, H, W], batched and separable: scipy.ndimage.gaussian_filter's result
    (kernel +-4 sigma, same border names) for any map size, tiny maps and thin strips included."""
    if sigma <= 0:
        return maps
    radius = gaussian_kernel_size(sigma) // 2
    x = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    out = maps.unsqueeze(1)  # [B, 1, H, W]
    for dim in (2, 3):
        out = out.index_select(dim, _border_indices(out.shape[dim], radius, border, maps.device))
        shape = (1, 1, -1, 1) if dim == 2 else (1, 1, 1, -1)
        out = F.conv2d(out, kernel.view(shape))
    return out[:, 0]


def anomaly_maps(patch_scores: torch.Tensor, grid: tuple[int, int], size: int | tuple[int, int],
                 sigma: float = MAP_SIGMA, border: str = "mirror") -> torch.Tensor:
    """Patch scores [B, h*w] -> maps [B, H, W] (size: H = W, or (H, W)): bilinear upsampling, then a Gaussian.

    Distances are smoothed as they are, with scipy's "mirror" border: measured against the official code's
    squared distances and "reflect" border (bench/maps.py), that localises as well or better.
    """
    height, width = (size, size) if isinstance(size, int) else size
    maps = patch_scores.reshape(-1, 1, grid[0], grid[1])
    maps = F.interpolate(maps, size=(height, width), mode="bilinear", align_corners=False)[:, 0]
    return smooth(maps, sigma, border)


@lru_cache(maxsize=64)
def axis_operator(grid: int, window: int, work: int, sigma: float = MAP_SIGMA, border: str = "mirror") -> torch.Tensor:
    """[work, grid] float32: one axis of a single window's map as one matrix: bilinear upsampling of `grid`
    patches to the `window` pixels (align_corners=False), the first `work` kept, then the Gaussian along that axis.

    Built by running the real functions (F.interpolate, `smooth`) on the unit vectors in float64, so it is that
    linear map, not a re-derivation: bilinear upsampling and the Gaussian are both separable, and for a map M
    of one window, smooth(upsample(M)) = A_h M A_w^T with A = axis_operator(...) of each axis."""
    units = torch.eye(grid, dtype=torch.float64).reshape(grid, 1, grid, 1)
    up = F.interpolate(units, size=(window, 1), mode="bilinear", align_corners=False)[:, 0, :work, :]  # [grid, work, 1]
    return smooth(up, sigma, border)[:, :, 0].T.contiguous().float()  # a width-1 mirror border leaves that axis alone


def window_maps(patch_scores: torch.Tensor, window: tuple[int, int], work: tuple[int, int],
                sigma: float = MAP_SIGMA, border: str = "mirror") -> torch.Tensor:
    """Patch scores [B, gh, gw] of single-window frames -> smoothed maps [B, work_h, work_w]: the upsampling
    and the Gaussian as two batched matrix products (A_h M A_w^T), not per-pixel convolutions over the map."""
    _, gh, gw = patch_scores.shape
    rows = axis_operator(gh, window[0], work[0], sigma, border).to(patch_scores.device)
    cols = axis_operator(gw, window[1], work[1], sigma, border).to(patch_scores.device)
    return rows @ patch_scores.float() @ cols.T
