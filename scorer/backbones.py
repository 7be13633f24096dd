"""ImageNet backbones through torchvision's own model and weights API, loaded offline.

Weights come from torchvision's weights enum (resolved in the torch hub cache, never
downloaded at run time here), from a local file, or - only when asked for explicitly -
random initialisation for tests.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torchvision.models as tvm
from torch import nn
from torchvision.models import WeightsEnum

RANDOM_WEIGHTS = "random"


class BackboneError(RuntimeError):
    """A backbone cannot be built as asked (unknown name, missing or bad weights)."""


@dataclass(frozen=True)
class BackboneSpec:
    builder: Callable[..., nn.Module]
    weights: WeightsEnum
    default_layers: tuple[str, ...]


# IMAGENET1K_V1 throughout: the original torchvision recipes the paper and the official code used.
BACKBONES: dict[str, BackboneSpec] = {
    "wide_resnet50_2": BackboneSpec(tvm.wide_resnet50_2, tvm.Wide_ResNet50_2_Weights.IMAGENET1K_V1, ("layer2", "layer3")),
    "resnet18": BackboneSpec(tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1, ("layer2", "layer3")),
    "resnet50": BackboneSpec(tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V1, ("layer2", "layer3")),
    # ends of the stride-8 (features.6, 32 ch) and stride-16 (features.13, 96 ch) stages
    "mobilenet_v2": BackboneSpec(tvm.mobilenet_v2, tvm.MobileNet_V2_Weights.IMAGENET1K_V1, ("features.6", "features.13")),
}


def hub_weights_path(name: str) -> Path:
    """Where torchvision's loader looks for the backbone's ImageNet weights file."""
    spec = _spec(name)
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(spec.weights.url).name


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_backbone(name: str, weights: str | Path | None = None) -> tuple[nn.Module, str]:
    """Build backbone `name` in eval mode and return it with the sha256 of its weights.

    weights: None -> torchvision's ImageNet weights from the torch hub cache;
    a path -> that state-dict file; "random" -> random initialisation (tests only).
    """
    spec = _spec(name)
    if weights == RANDOM_WEIGHTS:
        torch.manual_seed(0)  # the same "random" network every time, so random banks stay usable
        return spec.builder(weights=None).eval(), RANDOM_WEIGHTS
    if weights is None:
        path = hub_weights_path(name)
        if not path.is_file():
            raise BackboneError(
                f"ImageNet weights for {name} not found: expected {path.name} in {path.parent} "
                f"(torch hub cache). Copy the file there, or pass --weights PATH to a local "
                f"state-dict file. No weights are downloaded at run time."
            )
        # torchvision's own loader: finds the cached file, checks its hash prefix, no download
        load_state = lambda: spec.weights.get_state_dict(progress=False, check_hash=True)  # noqa: E731
    else:
        path = Path(weights)
        if not path.is_file():
            raise BackboneError(f"weights file {path} does not exist")
        load_state = lambda: torch.load(path, map_location="cpu", weights_only=True)  # noqa: E731
    model = spec.builder(weights=None)
    try:
        model.load_state_dict(load_state())
    except Exception as exc:  # noqa: BLE001 - any failure here means unusable weights
        raise BackboneError(f"cannot load {name} weights from {path}: {exc}") from exc
    return model.eval(), file_sha256(path)


def _spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise BackboneError(f"unknown backbone {name!r}; choose from {', '.join(sorted(BACKBONES))}") from None
