"""Locally aware patch features (paper section 3.1), computed batched on the model's device."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor


class PatchFeatureExtractor(nn.Module):
    """Backbone taps -> one `target_dim` feature per position of the shallowest tapped grid.

    Per tapped layer: 3x3 neighbourhood (stride 1, zero padding) -> the deeper grids bilinearly
    resized to the first tap's grid -> the C*9 values adaptive-average-pooled to `pretrain_dim`;
    the layers' vectors are concatenated and pooled again to `target_dim` (as the official code).
    """

    def __init__(self, backbone: nn.Module, layers: tuple[str, ...], patch_size: int = 3,
                 pretrain_dim: int = 1024, target_dim: int = 1024):
        super().__init__()
        # FX truncation: only the nodes the taps need are kept, so the network stops at the deepest tap
        self.body = create_feature_extractor(backbone, return_nodes={layer: layer for layer in layers}).eval()
        self.layers = tuple(layers)
        self.patch_size = patch_size
        self.pretrain_dim = pretrain_dim
        self.target_dim = target_dim
        self.config = None  # the FeatureConfig it implements, set by scorer.model.build_extractor

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """images [B, 3, H, W] -> (features [B, h*w, target_dim], (h, w))."""
        maps = self.body(images)
        grid = maps[self.layers[0]].shape[-2:]
        pooled = [self._layer_patches(maps[layer], grid) for layer in self.layers]
        stacked = torch.cat(pooled, dim=2)  # [N, 1, n_layers * pretrain_dim]
        features = F.adaptive_avg_pool1d(stacked, self.target_dim)
        return features.reshape(images.shape[0], grid[0] * grid[1], self.target_dim), (int(grid[0]), int(grid[1]))

    def _layer_patches(self, fmap: torch.Tensor, grid: torch.Size) -> torch.Tensor:
        batch, channels, height, width = fmap.shape
        k = self.patch_size
        patches = F.unfold(fmap, kernel_size=k, padding=(k - 1) // 2).reshape(batch, channels * k * k, height, width)
        if (height, width) != tuple(grid):
            patches = F.interpolate(patches, size=tuple(grid), mode="bilinear", align_corners=False)
        flat = patches.permute(0, 2, 3, 1).reshape(-1, 1, channels * k * k)
        return F.adaptive_avg_pool1d(flat, self.pretrain_dim)
