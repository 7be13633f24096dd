"""Locally aware patch features (paper section 3.1), computed batched on the model's device."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import MobileNetV2, ResNet

from .efficientnet_lite import EfficientNetLite
from .preprocess import IMAGENET_MEAN, IMAGENET_STD


def backbone_stages(backbone: nn.Module) -> list[tuple[str, nn.Module]]:
    """The backbone's forward pass as an ordered list of named stages (torchvision's own modules).

    Explicit rather than FX-traced: tracing patches nn.Module.__call__ process-wide, which breaks
    forward passes running in other threads (several workers in one process).
    """
    if isinstance(backbone, ResNet):
        names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
        return [(name, getattr(backbone, name)) for name in names]
    if isinstance(backbone, (MobileNetV2, EfficientNetLite)):
        return [(f"features.{i}", stage) for i, stage in enumerate(backbone.features)]
    raise TypeError(f"no stage list for {type(backbone).__name__}")


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class ComputeConfig:
    """How the backbone runs, not what it computes: a scorer/worker setting, never stored in a bank (banks
    are built in fp32). `precision` bf16/fp16 runs the backbone under autocast (its tapped maps come back as
    float32; neighbourhoods, pooling, search and maps stay float32); `channels_last` is the memory layout
    convolutions run fastest in on GPUs. Default: fp32, contiguous - exactly the bank's own arithmetic."""

    precision: str = "fp32"
    channels_last: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose from {', '.join(PRECISIONS)}")


@lru_cache(maxsize=16)
def _pool_tables(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """adaptive_avg_pool1d's bins as gather indices [n_out, k] and weights [n_out, k] (1/bin size, 0 = unused).
    Built in numpy: constants, not traced operations, when an export traces the pooling."""
    starts = np.arange(n_out) * n_in // n_out
    ends = -(-(np.arange(n_out) + 1) * n_in // n_out)
    offsets = np.arange(int((ends - starts).max()))
    used = offsets[None, :] < (ends - starts)[:, None]
    index = np.where(used, starts[:, None] + offsets[None, :], 0)
    weight = np.where(used, 1.0 / (ends - starts)[:, None], 0.0).astype(np.float32)
    return torch.from_numpy(index.astype(np.int64)), torch.from_numpy(weight)


def adaptive_pool(x: torch.Tensor, n_out: int, exportable: bool = False) -> torch.Tensor:
    """F.adaptive_avg_pool1d over the last dimension; `exportable`: the same bins as a gather and a weighted sum,
    which ONNX can express at any sizes (equal to 3e-7)."""
    if not exportable:
        return F.adaptive_avg_pool1d(x, n_out)
    index, weight = _pool_tables(int(x.shape[-1]), n_out)  # int(): constants in a traced graph
    gathered = torch.index_select(x, x.dim() - 1, index.to(x.device).reshape(-1))
    return (gathered.reshape(*x.shape[:-1], *index.shape) * weight.to(x.device, x.dtype)).sum(-1)


class TruncatedBackbone(nn.Module):
    """Runs the stages up to the deepest tap only, returning the tapped outputs by name."""

    def __init__(self, backbone: nn.Module, taps: tuple[str, ...]):
        super().__init__()
        stages = backbone_stages(backbone)
        names = [name for name, _ in stages]
        missing = [t for t in taps if t not in names]
        if missing:
            raise ValueError(f"unknown taps {missing}; this backbone has {names}")
        last = max(names.index(t) for t in taps)
        self.names = names[: last + 1]
        self.stages = nn.ModuleList(module for _, module in stages[: last + 1])
        self.taps = set(taps)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for name, stage in zip(self.names, self.stages):
            x = stage(x)
            if name in self.taps:
                out[name] = x
        return out


class PatchFeatureExtractor(nn.Module):
    """Backbone taps -> one `target_dim` feature per position of the shallowest tapped grid.

    Input: batches normalised with ImageNet's mean/std (scorer.preprocess); a backbone trained with
    another normalisation (`mean`, `std` on [0, 1] pixels, from its BackboneSpec) gets its own,
    by one per-channel affine map of the input.

    Per tapped layer: 3x3 neighbourhood (stride 1, zero padding) -> the deeper grids bilinearly
    resized to the first tap's grid -> the C*9 values adaptive-average-pooled to `pretrain_dim`;
    the layers' vectors are concatenated and pooled again to `target_dim` (as the official code).
    """

    def __init__(self, backbone: nn.Module, layers: tuple[str, ...], patch_size: int = 3,
                 pretrain_dim: int = 1024, target_dim: int = 1024,
                 mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD):
        super().__init__()
        self.renormalise = (tuple(mean), tuple(std)) != (IMAGENET_MEAN, IMAGENET_STD)
        # x_backbone = (x_imagenet * std_in + mean_in - mean) / std = x_imagenet * scale + shift
        scale = torch.tensor(IMAGENET_STD) / torch.tensor(std)
        shift = (torch.tensor(IMAGENET_MEAN) - torch.tensor(mean)) / torch.tensor(std)
        self.register_buffer("scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", shift.view(1, 3, 1, 1), persistent=False)
        self.body = TruncatedBackbone(backbone, tuple(layers)).eval()  # stops at the deepest tap
        self.layers = tuple(layers)
        self.patch_size = patch_size
        self.pretrain_dim = pretrain_dim
        self.target_dim = target_dim
        self.config = None  # the FeatureConfig it implements, set by scorer.model.build_extractor
        self.compute = ComputeConfig()
        self.exportable = False  # ONNX export: pooling as gather + sum (scorer.onnx_export)

    def use(self, compute: ComputeConfig) -> "PatchFeatureExtractor":
        """Run the backbone with these compute settings from now on (precision, memory layout)."""
        self.compute = compute
        self.body.to(memory_format=torch.channels_last if compute.channels_last else torch.contiguous_format)
        return self

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """images [B, 3, H, W] -> (features [B, h*w, target_dim], (h, w))."""
        return self.patch_features(images)

    def patch_features(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """forward without inference mode (what ONNX export traces)."""
        if self.renormalise:
            images = images * self.scale + self.shift
        maps = self._backbone(images)
        grid = maps[self.layers[0]].shape[-2:]
        pooled = [self._layer_patches(maps[layer], grid) for layer in self.layers]
        stacked = torch.cat(pooled, dim=2)  # [N, 1, n_layers * pretrain_dim]
        features = adaptive_pool(stacked, self.target_dim, self.exportable)
        return features.reshape(images.shape[0], grid[0] * grid[1], self.target_dim), (int(grid[0]), int(grid[1]))

    def _backbone(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        dtype = PRECISIONS[self.compute.precision]
        if self.compute.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if dtype is None:
            return self.body(images)
        with torch.autocast(images.device.type, dtype=dtype):
            maps = self.body(images)
        return {name: fmap.float().contiguous() for name, fmap in maps.items()}

    def _layer_patches(self, fmap: torch.Tensor, grid: torch.Size) -> torch.Tensor:
        batch, channels, height, width = fmap.shape
        k = self.patch_size
        patches = F.unfold(fmap, kernel_size=k, padding=(k - 1) // 2).reshape(batch, channels * k * k, height, width)
        if (height, width) != tuple(grid):
            patches = F.interpolate(patches, size=tuple(grid), mode="bilinear", align_corners=False)
        flat = patches.permute(0, 2, 3, 1).reshape(-1, 1, channels * k * k)
        return adaptive_pool(flat, self.pretrain_dim, self.exportable)
