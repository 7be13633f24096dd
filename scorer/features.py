"""Locally aware patch features (paper section 3.1), computed batched on the model's device."""
from __future__ import annotations

import hashlib
import logging
import io
import math
import threading
import warnings
import weakref
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import MobileNetV2, ResNet

from .efficientnet_lite import EfficientNetLite
from .hardware import cpu_features, thread_plan
from .preprocess import IMAGENET_MEAN, IMAGENET_STD
from .stages import stage


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


# the autocast dtype of each precision; int8 is ONNX Runtime's static quantisation (scorer/onnx_quantise.py): no
# autocast, and where its graph cannot be made the size runs in float32
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": None}
log = logging.getLogger("patchcore.scorer")
ENGINES = ("torch", "onnxruntime")  # what runs the backbone and pooling (ComputeConfig.engine)
AUTO = "auto"  # a ComputeConfig field left to the device's default (ComputeConfig.resolve)

# The defaults, per device type: (precision, channels_last, engine). The CPU's: channels_last float32 computes the
# contiguous layout's features to float rounding (tests/test_precision.py) and runs the backbone faster
# (bench/profile_path.py); bf16 stays an option, not the default: its image/pixel AUROC and PRO were not shown to
# stay within 0.002 of fp32 on bottle and macaroni1 on a CPU with native BF16. The engine: ONNX Runtime runs the
# same float32 graph (backbone + pooling) to ~4e-6 relative of torch's features (tests/test_engine.py) in about a
# third of torch's CPU time on the 2-core AVX2 EPYC (13 vs 37 ms per 224 px image, one thread each, under load),
# with eval's image/pixel AUROC and PRO unchanged (bench/eval_speed.py, docs/scorer.md "CPU speed"); where
# onnxruntime is not installed the CPU falls back to torch and says so. CUDA's: as before (unmeasured here).
DEFAULTS = {"cpu": ("fp32", True, "onnxruntime"), "cuda": ("fp32", False, "torch")}
OTHER_DEVICE_DEFAULT = ("fp32", False, "torch")


class ComputeError(ValueError):
    """A compute setting this device cannot run (a precision without native arithmetic here, say)."""


@dataclass(frozen=True)
class ComputeConfig:
    """How the backbone runs, not what it computes: a scorer/worker setting. A bank records the settings it was
    built with (info["compute"]), but any bank is scored with any settings: they move scores only by rounding
    (fp32 layouts) or slightly (bf16/fp16; tests/test_precision.py). `precision` bf16/fp16 runs the backbone under
    autocast (its tapped maps come back as float32; neighbourhoods, pooling, search and maps stay float32);
    `channels_last` is the memory layout of the convolutions (NHWC: faster with oneDNN on CPUs). `engine`: torch, or
    onnxruntime (CPU: the extractor's float32 graph exported once per input size and run by ONNX Runtime; the same
    features to float rounding, faster on CPUs; channels_last does not apply to it). `precision` int8 runs in
    onnxruntime only: the float32 graph statically quantised (scorer/onnx_quantise.py) with activation ranges from
    the bank's calibration windows (good training windows stored in the bank: `Int8Calibration`), native where
    the CPU has VNNI (avx512_vnni / avx_vnni / amx_int8).

    Fields left "auto"/None take the device's default (DEFAULTS) in `resolve`, the one place defaults are decided;
    the extractor always runs a resolved config. `emulate` lets a precision run on a CPU without native
    arithmetic for it (reference kernels, some hundred times slower than fp32): for tests, never a default."""

    precision: str = AUTO
    channels_last: bool | None = None
    engine: str = AUTO
    emulate: bool = False
    reason: str = field(default="", compare=False)  # how `resolve` decided (e.g. a CPU without BF16 fell back)

    def __post_init__(self) -> None:
        if self.precision != AUTO and self.precision not in PRECISIONS:
            raise ComputeError(f"unknown precision {self.precision!r}; choose from {AUTO}, {', '.join(PRECISIONS)}")
        if self.channels_last not in (None, True, False):
            raise ComputeError(f"channels_last must be true, false or unset (auto), not {self.channels_last!r}")
        if self.engine != AUTO and self.engine not in ENGINES:
            raise ComputeError(f"unknown engine {self.engine!r}; choose from {AUTO}, {', '.join(ENGINES)}")

    @property
    def resolved(self) -> bool:
        return self.precision != AUTO and self.channels_last is not None and self.engine != AUTO

    def resolve(self, device: torch.device | str = "cpu") -> "ComputeConfig":
        """This config with every auto field set to `device`'s default; ComputeError when `device` cannot run it."""
        device = torch.device(device)
        default_precision, default_layout, default_engine = DEFAULTS.get(device.type, OTHER_DEVICE_DEFAULT)
        precision = default_precision if self.precision == AUTO else self.precision
        channels_last = default_layout if self.channels_last is None else self.channels_last
        notes = [f"precision {precision} ({'default' if self.precision == AUTO else 'asked'} on {device.type})",
                 f"{'channels_last' if channels_last else 'contiguous'} "
                 f"({'default' if self.channels_last is None else 'asked'})"]
        engine, why = self._engine(default_engine, precision, device)
        notes.append(f"engine {engine} ({why})")
        if precision != "fp32":
            native, why = native_precision(precision, device)
            if not native and not self.emulate:
                raise ComputeError(f"{precision} is not supported on this {device.type}: {why}; use fp32")
            if not native:
                notes.append(f"emulated: {why}")
        elif device.type == "cpu" and self.precision == AUTO:
            features = cpu_features()
            notes.append(f"this CPU has {'native' if features.bf16 else 'no native'} BF16 ({features.describe()})")
        if self.resolved and self.reason:  # resolved before (e.g. by the CLI): keep how it was decided
            return self
        return replace(self, precision=precision, channels_last=channels_last, engine=engine, reason="; ".join(notes))

    def _engine(self, default: str, precision: str, device: torch.device) -> tuple[str, str]:
        """(the engine that runs, how it was decided); ComputeError for an engine asked where it cannot run."""
        missing = onnxruntime_missing()
        if precision == "int8":  # ONNX Runtime's int8 kernels: no other engine runs it
            if self.engine == "torch":
                raise ComputeError("precision int8 runs in engine onnxruntime only, not torch")
            if device.type != "cpu":
                raise ComputeError(f"precision int8 runs on the CPU only, not on {device.type}; use fp32")
            if missing:
                raise ComputeError(f"precision int8 runs in onnxruntime, but {missing}")
            return "onnxruntime", "int8 runs in onnxruntime" if self.engine == AUTO else "asked"
        if self.engine == "onnxruntime":
            if device.type != "cpu":
                raise ComputeError(f"engine onnxruntime runs on the CPU only, not on {device.type}; use torch")
            if precision != "fp32":
                raise ComputeError(f"engine onnxruntime runs fp32 and int8 only, not {precision}; use torch")
            if missing:
                raise ComputeError(f"engine onnxruntime asked for, but {missing}")
            return "onnxruntime", "asked"
        if self.engine == "torch":
            return "torch", "asked"
        if default == "onnxruntime" and precision != "fp32":
            return "torch", f"default; onnxruntime runs fp32 only, not {precision}"
        if default == "onnxruntime" and missing:
            return "torch", f"default on {device.type} falls back: {missing}"
        return default, f"default on {device.type}"

    def to_dict(self) -> dict:
        return {"precision": self.precision, "channels_last": self.channels_last, "engine": self.engine,
                "reason": self.reason}


def onnxruntime_missing() -> str:
    """Why the onnxruntime engine cannot run here ("" when it can): the package, from the [onnx] extra."""
    try:
        import onnxruntime  # noqa: F401  (the [onnx] extra)
    except ImportError:
        return "onnxruntime is not installed (pip install 'patchcore-stream[onnx]')"
    return ""


def native_precision(precision: str, device: torch.device) -> tuple[bool, str]:
    """(whether `device` runs `precision` convolutions natively, why not)."""
    if device.type == "cpu":
        features = cpu_features()
        if precision == "int8":
            return features.int8, (f"{features.describe()} lacks avx512_vnni, avx_vnni or amx_int8 (without VNNI "
                                   "ONNX Runtime's int8 kernels take their slower AVX2 path; not a default anywhere)")
        native = features.bf16 if precision == "bf16" else features.fp16
        flags = "avx512_bf16 or amx_bf16" if precision == "bf16" else "avx512_fp16 or amx_fp16"
        return native, f"{features.describe()} lacks {flags} (torch would run reference kernels, far slower than fp32)"
    if device.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        return False, f"{torch.cuda.get_device_name(device)} has no bf16 arithmetic"
    return True, ""


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
        for name, module in zip(self.names, self.stages):
            x = module(x)
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

    Neighbourhood and both poolings are one fixed linear map per layer (`pooling_weights`), applied on the
    layer's own grid (before the resize, which commutes with it) as gathers of the few values each output mixes,
    or as one convolution where it mixes many (`LayerPooling`): the official unfold/resize/pool result (to ~1e-7
    relative).
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
        self._pooling: dict = {}  # (layer, channels, device) -> LayerPooling
        self.use(ComputeConfig("fp32", False, "torch"))  # the reference arithmetic until build_extractor sets the default

    def use(self, compute: ComputeConfig = ComputeConfig()) -> "PatchFeatureExtractor":
        """Run the backbone with these compute settings from now on (precision, memory layout), auto fields
        resolved for the device the extractor is on."""
        compute = compute.resolve(self.scale.device)
        self.compute = compute
        self.body.to(memory_format=torch.channels_last if compute.channels_last else torch.contiguous_format)
        # onnxruntime: ((H, W), int8 calibration digest or "") -> graph (held here, shared weakly)
        self._sessions: dict[tuple[tuple[int, int], str], _Graph] = {}
        return self

    @torch.inference_mode()
    def forward(self, images: torch.Tensor, calibration: Int8Calibration | None = None
                ) -> tuple[torch.Tensor, tuple[int, int]]:
        """images [B, 3, H, W] -> (features [B, h*w, target_dim], (h, w)). calibration: the bank's int8
        calibration windows (precision int8 needs them; the other precisions ignore them)."""
        if self.compute.engine == "onnxruntime":
            return self._onnx_features(images, calibration)
        return self.patch_features(images)

    def warm_up(self, size: tuple[int, int], calibration: Int8Calibration | None = None) -> None:
        """Do now what the first batch of inputs of `size` (H, W) would do first (onnxruntime: export its graph,
        ~2 s of CPU; int8: and quantise it), so that a worker pays it when it loads a bank, not on a frame."""
        if self.compute.engine == "onnxruntime":
            self._onnx_session(tuple(size), calibration)

    def _onnx_features(self, images: torch.Tensor, calibration: Int8Calibration | None
                       ) -> tuple[torch.Tensor, tuple[int, int]]:
        """forward through ONNX Runtime: patch_features' graph for this input size (exported the first time a size
        is seen; int8: quantised with `calibration`). Backbone and pooling are one graph here, timed as the stage
        "backbone". A size whose graph could not be made runs in torch (the same features to float rounding)."""
        prepared = self._onnx_session(tuple(images.shape[-2:]), calibration)
        if prepared is None:
            return self.patch_features(images)
        session, grid = prepared
        with stage("backbone"):
            features = session.run(None, {"images": images.float().contiguous().numpy()})[0]
        return torch.from_numpy(features), grid

    def _onnx_session(self, size: tuple[int, int], calibration: Int8Calibration | None = None
                      ) -> tuple[object, tuple[int, int]] | None:
        """The graph for inputs of `size` and its grid; None where it cannot be made here (torch runs that size).

        The extractor holds its graphs; the process-wide `_SESSIONS` only lends them (weakly) to other extractors
        of equal weights, so a graph goes with the last extractor that ran it (a dropped bank's scorer). An int8
        graph is one per (size, calibration windows): banks of one backbone share the extractor, not the graph."""
        int8 = self.compute.precision == "int8"
        if int8 and calibration is None:
            raise ComputeError("precision int8 needs the bank's calibration windows (banks built since int8 carry "
                               "them): rebuild the bank, or score it with --precision fp32")
        local = (size, calibration.digest) if int8 else (size, "")
        if local not in self._sessions:
            with _EXPORT_LOCK:  # one export at a time; extractors of equal weights share one graph per size
                key = (self.fingerprint(), *local)
                graph = _SESSIONS.get(key)
                if graph is None:
                    graph = self._make_graph(size, calibration if int8 else None)
                    _SESSIONS[key] = graph
                self._sessions[local] = graph
        graph = self._sessions[local]
        return None if graph.session is None else (graph.session, graph.grid)

    def _make_graph(self, size: tuple[int, int], calibration: Int8Calibration | None) -> _Graph:
        """The float32 graph for `size` (int8: quantised with `calibration`); a graph that cannot be made is said
        once and runs as the next best: an int8 failure in float32 ONNX Runtime, any other failure in torch."""
        try:
            graph, grid = onnx_graph(self, size)
            session = None if calibration is None else self._int8_session(graph, calibration, size)
            return _Graph(session if session is not None else ort_session(graph), grid)
        # the exporter and ONNX Runtime raise errors of their own kinds (RuntimeError, onnxruntime's Fail,
        # InvalidGraph...): whatever it is, this size is scored by torch instead, said once
        except Exception as exc:  # noqa: BLE001
            log.warning("onnxruntime cannot run this backbone at this input size; torch runs it",
                        extra={"fields": {"size": list(size), "error": f"{type(exc).__name__}: {exc}"}})
            return _Graph(None, None)

    @staticmethod
    def _int8_session(graph: bytes, calibration: Int8Calibration, size: tuple[int, int]) -> object | None:
        """An ONNX Runtime session of `graph` quantised with `calibration`; None (said once) where it cannot be made."""
        from .onnx_quantise import quantise_graph

        try:
            return ort_session(quantise_graph(graph, calibration.inputs(size), reduce_range=not cpu_features().int8))
        except Exception as exc:  # noqa: BLE001 - the quantiser's and ONNX Runtime's own error kinds
            log.warning("the int8 graph cannot be made at this input size; float32 onnxruntime runs it",
                        extra={"fields": {"size": list(size), "error": f"{type(exc).__name__}: {exc}"}})
            return None

    def fingerprint(self) -> str:
        """sha256 of everything the features depend on: the settings, the input normalisation and every weight
        of the truncated backbone (so two extractors share an ONNX graph only when they compute the same)."""
        digest = hashlib.sha256(repr((self.layers, self.patch_size, self.pretrain_dim, self.target_dim,
                                      self.renormalise, str(self.scale.device))).encode())
        for tensor in [self.scale, self.shift, *self.body.state_dict().values()]:
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def patch_features(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """forward without inference mode (what ONNX export traces: convolutions, gathers, resizes and sums)."""
        with stage("backbone"):
            if self.renormalise:
                images = images * self.scale + self.shift
            maps = self._backbone(images)
        with stage("pooling"):
            grid = tuple(maps[self.layers[0]].shape[-2:])
            parts = []  # (pooling, [B, last - first, *grid]) per layer
            for position, layer in enumerate(self.layers):
                pooling = self._layer_pooling(position, maps[layer])
                part = pooling.apply(maps[layer], self.patch_size)
                if tuple(part.shape[-2:]) != grid:
                    part = F.interpolate(part, size=grid, mode="bilinear", align_corners=False)
                parts.append((pooling, part))
            out = join_columns(parts, self.target_dim)
            features = out.permute(0, 2, 3, 1).reshape(images.shape[0], grid[0] * grid[1], self.target_dim)
        return features, (int(grid[0]), int(grid[1]))

    def _backbone(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        dtype = PRECISIONS[self.compute.precision]
        if self.compute.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if dtype is None:
            return self.body(images)
        with torch.autocast(images.device.type, dtype=dtype):
            maps = self.body(images)
        return {name: fmap.float().contiguous() for name, fmap in maps.items()}

    def _layer_pooling(self, position: int, fmap: torch.Tensor) -> "LayerPooling":
        """How this layer's share of the final vector is computed (built once per layer, channels and device)."""
        channels = int(fmap.shape[1])  # int(): a traced size (ONNX export) is a tensor
        key = (position, channels, fmap.device)
        if key not in self._pooling:
            weights = pooling_weights(channels * self.patch_size ** 2, len(self.layers), position, self.pretrain_dim,
                                      self.target_dim)
            self._pooling[key] = LayerPooling.of(weights, channels, self.patch_size, fmap.device)
        return self._pooling[key]


GATHER_TERMS = 4  # the most values one output column may mix for a layer's pooling to run as gathers


@dataclass(frozen=True, eq=False)  # holds tensors: compared by identity
class LayerPooling:
    """One tapped layer's share of the final vector, its output columns [first, last): a fixed linear map of each
    position's k x k neighbourhood (`pooling_weights`), computed one of two ways.

    Few terms per column (at most GATHER_TERMS: 2-4 for mobilenet_v2 and the EfficientNet-Lites, whose C*9 values
    are pooled up to 1024 and then in pairs): as gathers, column j = sum_s coefs[s, j] * the neighbourhood value
    rows[s, j] (rows, coefs [S, last - first]; a column with fewer terms repeats a row with coefficient 0). The
    convolution would multiply every column by all C*k*k values, nearly all of them by 0: on mobilenet_v2's graph
    in ONNX Runtime the pooling took half of the 6.1 ms per crop (docs/scorer.md, CPU speed).
    Many terms (wide_resnet50_2's and resnet50's 9 and 18, where the C*9 values are pooled down; resnet18's
    layer3, 5): as the convolution `conv` [last - first, C, k, k], which does not hold the C*k*k neighbourhood
    values of every position at once."""

    first: int
    last: int
    conv: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    coefs: torch.Tensor | None = None

    @classmethod
    def of(cls, weights: torch.Tensor, channels: int, k: int, device: torch.device) -> "LayerPooling":
        """weights [C*k*k, target_dim] (rows in unfold's (c, ky, kx) order) -> the layer's pooling on `device`."""
        fed = torch.nonzero(weights.abs().sum(0))[:, 0]
        first, last = int(fed[0]), int(fed[-1]) + 1
        used = weights[:, first:last]
        nonzero = used != 0
        terms = int(nonzero.sum(0).max())
        if terms > GATHER_TERMS:
            conv = used.T.reshape(last - first, channels, k, k)
            return cls(first, last, conv=conv.to(device=device, dtype=torch.float32).contiguous())
        # each column's nonzero rows first (a stable sort keeps their order), then rows of coefficient 0
        rows = torch.argsort((~nonzero).to(torch.int8), dim=0, stable=True)[:terms]
        coefs = used.gather(0, rows)
        return cls(first, last, rows=rows.to(device), coefs=coefs.to(device=device, dtype=torch.float32)[:, :, None, None])

    def apply(self, fmap: torch.Tensor, k: int) -> torch.Tensor:
        """fmap [B, C, H, W] -> [B, last - first, H', W'] (zero padding (k - 1) // 2: H' = H for odd k)."""
        if self.conv is not None:
            return F.conv2d(fmap, self.conv.to(fmap.dtype), padding=(k - 1) // 2)
        values = neighbourhoods(fmap, k)
        out = None
        for rows, coefs in zip(self.rows, self.coefs):
            term = values.index_select(1, rows) * coefs.to(fmap.dtype)
            out = term if out is None else out + term
        return out


def neighbourhoods(fmap: torch.Tensor, k: int) -> torch.Tensor:
    """fmap [B, C, H, W] -> each position's k x k neighbourhood values [B, C*k*k, H', W'] in unfold's (c, ky, kx)
    order, zero padding (k - 1) // 2 (H' = H + 2 * pad - k + 1, as the convolution's output)."""
    pad = (k - 1) // 2
    height, width = fmap.shape[-2] + 2 * pad - k + 1, fmap.shape[-1] + 2 * pad - k + 1
    padded = F.pad(fmap, (pad, pad, pad, pad))
    taps = [padded[:, :, dy:dy + height, dx:dx + width] for dy in range(k) for dx in range(k)]
    return torch.stack(taps, 2).reshape(fmap.shape[0], -1, height, width)


def join_columns(parts: list[tuple[LayerPooling, torch.Tensor]], target_dim: int) -> torch.Tensor:
    """The layers' parts [B, last - first, h, w] -> the final vectors [B, target_dim, h, w]: concatenated where they
    tile the columns in order (each layer its own), else each padded to its columns and summed (a column averaged
    across two layers' vectors)."""
    bounds = [0] + [pooling.last for pooling, _ in parts]
    if [pooling.first for pooling, _ in parts] == bounds[:-1] and bounds[-1] == target_dim:
        return torch.cat([part for _, part in parts], 1)
    out = None
    for pooling, part in parts:
        part = F.pad(part, (0, 0, 0, 0, pooling.first, target_dim - pooling.last))
        out = part if out is None else out + part
    return out


ONNX_OPSET = 17  # as scorer/onnx_export.py's export
_EXPORT_LOCK = threading.Lock()


class _Graph:
    """An ONNX Runtime session and its grid (both None: this input size runs in torch), held by the extractors that
    ran it: weakly referable, so that `_SESSIONS` can lend it without keeping it."""

    __slots__ = ("session", "grid", "__weakref__")

    def __init__(self, session: object | None, grid: tuple[int, int] | None):
        self.session, self.grid = session, grid


# (extractor fingerprint, input size, int8 calibration digest or "") -> the graph, while an extractor holds it (a
# worker's banks share them)
_SESSIONS: weakref.WeakValueDictionary[tuple[str, tuple[int, int], str], _Graph] = weakref.WeakValueDictionary()


class _Features(nn.Module):
    """The extractor's patch_features as a module returning the features only (what the ONNX graph computes)."""

    def __init__(self, extractor: PatchFeatureExtractor):
        super().__init__()
        self.extractor = extractor

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.extractor.patch_features(images)[0]


def onnx_graph(extractor: PatchFeatureExtractor, size: tuple[int, int]) -> tuple[bytes, tuple[int, int]]:
    """(the extractor's float32 patch_features as a serialised ONNX graph for [B, 3, *size] inputs, any B; its grid).

    Traced in memory by the TorchScript exporter (no onnxscript, no file)."""
    example = torch.zeros(2, 3, *size, device=extractor.scale.device)
    graph = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        grid = extractor.patch_features(example)[1]  # builds the pooling weights now: constants in the trace
        # .eval(): the exporter restores the wrapper's training flag afterwards, recursively (a fresh module is in
        # training mode: that would leave the backbone's batch norms training for the torch path)
        torch.onnx.export(_Features(extractor).eval(), (example,), graph, dynamo=False, opset_version=ONNX_OPSET,
                          input_names=["images"], output_names=["features"],
                          dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}})
    return graph.getvalue(), grid


ORT_SPINNING = "session.intra_op.allow_spinning"  # ONNX Runtime's session config key


def ort_session(graph: bytes, threads: int | None = None) -> object:
    """An ONNX Runtime CPU session of a serialised graph; by default it gets torch's thread count
    (scorer.hardware.thread_plan: the two run one after the other, never at once).

    Its threads do not spin once a run is done (ONNX Runtime's default keeps them spinning, waiting for the next
    run): here the search's OpenMP team runs right after the backbone, on the same cores, and a spinning thread
    holds one of them (an A/B on the 2-core AMD EPYC, mobilenet_v2 crop banks, 96 test images with maps, three
    interleaved rounds: 46.7 -> 53.3 images/s on bottle, 46.4 -> 52.0 on macaroni1; docs/scorer.md, CPU speed).

    No memory pattern: with it ONNX Runtime records a new batch shape's allocations on its first run and lays them
    out as one fresh block on the second, so the largest batch pays a second slow run (16 crops: ~175 against
    ~100 ms once warm; 8: ~10 against ~6 ms per crop). Without it the arena the first run grew serves the runs
    after, at the same speed (/tmp timing, mobilenet_v2's graph; docs/scorer.md, CPU speed)."""
    import onnxruntime  # the [onnx] extra (ComputeConfig.resolve refused the engine without it)

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or thread_plan().intra_op
    options.inter_op_num_threads = 1
    options.add_session_config_entry(ORT_SPINNING, "0")
    options.enable_mem_pattern = False
    options.log_severity_level = 3  # errors only: logs stay quiet
    return onnxruntime.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


class Int8Calibration:
    """A bank's int8 calibration windows: good training windows, ImageNet-normalised as every backbone takes them
    ([N, 3, h, w], stored float16 in the bank), and their digest (which int8 graph they make). The quantiser takes
    its activation ranges from them, so they must be the line's own good images."""

    def __init__(self, windows: np.ndarray):
        if windows.ndim != 4 or windows.shape[1] != 3 or not len(windows):
            raise ComputeError(f"int8 calibration windows must be [N >= 1, 3, h, w], not {windows.shape}")
        self.windows = windows
        self.digest = hashlib.sha256(np.ascontiguousarray(windows).tobytes()).hexdigest()

    def inputs(self, size: tuple[int, int]) -> np.ndarray:
        """The windows as float32 inputs of `size` (H, W): resized bilinearly where the view's size differs."""
        tensor = torch.from_numpy(np.ascontiguousarray(self.windows)).float()
        if tuple(tensor.shape[-2:]) != tuple(size):
            tensor = F.interpolate(tensor, size=tuple(size), mode="bilinear", align_corners=False)
        return tensor.numpy()


def adaptive_pool_matrix(length: int, out: int) -> torch.Tensor:
    """[length, out] float64: x @ M is adaptive_avg_pool1d(x, out) (windows [floor(i L / n), ceil((i+1) L / n)))."""
    matrix = torch.zeros(length, out, dtype=torch.float64)
    for i in range(out):
        begin, end = (i * length) // out, math.ceil((i + 1) * length / out)
        matrix[begin:end, i] = 1.0 / (end - begin)
    return matrix


def pooling_weights(length: int, n_layers: int, position: int, pretrain_dim: int, target_dim: int) -> torch.Tensor:
    """[length, target_dim] float64: layer `position`'s unfolded values -> its contribution to the final
    vector (its own pooling to pretrain_dim, then its rows of the pooling of the concatenation)."""
    final = adaptive_pool_matrix(n_layers * pretrain_dim, target_dim)
    return adaptive_pool_matrix(length, pretrain_dim) @ final[position * pretrain_dim:(position + 1) * pretrain_dim]


def unfolded_pooling(maps: list[torch.Tensor], patch_size: int, pretrain_dim: int, target_dim: int) -> torch.Tensor:
    """The official code's path, kept as the reference the convolution is tested and timed against: tapped
    maps -> unfold, resize the patches to the first map's grid, adaptive_avg_pool1d per layer and once more."""
    grid = maps[0].shape[-2:]
    pooled = []
    for fmap in maps:
        batch, channels, height, width = fmap.shape
        patches = F.unfold(fmap, patch_size, padding=(patch_size - 1) // 2).reshape(batch, -1, height, width)
        if (height, width) != tuple(grid):
            patches = F.interpolate(patches, size=tuple(grid), mode="bilinear", align_corners=False)
        pooled.append(F.adaptive_avg_pool1d(patches.permute(0, 2, 3, 1).reshape(-1, 1, patches.shape[1]), pretrain_dim))
    out = F.adaptive_avg_pool1d(torch.cat(pooled, dim=2), target_dim)
    return out.reshape(maps[0].shape[0], -1, target_dim)
