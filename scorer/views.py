"""Views: which pixels of a frame the network sees, and how patch scores go back to frame coordinates.

- `crop`: the paper's view. Shorter side resized to `resize`, centre crop `crop` x `crop`. Maps are in
  crop coordinates. Reproduces the paper's protocol; the border outside the centre square is not inspected.
- `full`: the whole frame, aspect kept, long side resized to `size`, padded (bottom/right, with the
  normalised mean colour) to a multiple of PAD_MULTIPLE. Non-square feature grids; patches whose centre
  lies in the padding are ignored. Maps cover the whole frame at the working scale `size / long side`.
- `tiles`: the frame resized by `scale`, cut into overlapping `tile` x `tile` windows (stride
  `tile * (1 - overlap)`, the last window flush with the border). One bank from all tiles; a frame's
  image score is the highest patch over all its tiles; maps are stitched (per pixel the maximum of the
  tiles covering it), then smoothed once over the whole frame.

A region of interest (a mask in frame coordinates, any resolution) can restrict every view: patches
whose centre falls outside it are neither put into the bank nor scored.

Every view turns a group of equally sized frames into a batch of network inputs ("windows") and
knows where each window's patches lie in the working frame, so one code path serves all three.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from functools import lru_cache
from typing import Hashable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from .preprocess import upload

VIEW_KINDS = ("auto", "crop", "full", "tiles")
AUTO_VIEW = "auto"  # resolved from the training frames' size when a bank is built (ViewConfig.resolve); never stored
# auto: the crop view where its centre square covers at least this share of the resized frame (square frames 77 %,
# 4:3 57 %, 3:2 51 %), else the whole frame at the crop view's scale (16:9 frames: the crop would cover 43 %)
AUTO_CROP_COVERAGE = 0.5
PAD_MULTIPLE = 32  # input sides are padded to this (the deepest taps used are stride 16)
MAX_WINDOWS = 256  # a frame cut into more tiles than this is refused (a scale far too large for the frame)


class ViewError(ValueError):
    """A view that cannot be built as asked, or a frame it cannot take."""


@dataclass(frozen=True)
class ViewConfig:
    """Which pixels the network sees. Stored in the bank; a scorer refuses a bank of another view."""

    kind: str = field(default=AUTO_VIEW, metadata={
        "help": "auto (crop where its centre square covers at least half of the training frames, else full at the "
                "crop's scale), crop (paper: resize, centre crop), full (whole frame, aspect kept) or tiles "
                "(overlapping tiles)."})
    resize: int = field(default=256, metadata={"help": "crop view: shorter side after resizing, pixels."})
    crop: int = field(default=224, metadata={"help": "crop view: centre-crop side, pixels."})
    size: int = field(default=320, metadata={"help": "full view: long side of the resized frame, pixels."})
    scale: float = field(default=0.5, metadata={"help": "tiles view: frame resize factor before tiling."})
    tile: int = field(default=224, metadata={"help": "tiles view: tile side, pixels (after --scale)."})
    overlap: float = field(default=0.25, metadata={"help": "tiles view: share of a tile its neighbour overlaps."})

    def __post_init__(self) -> None:
        if self.kind not in VIEW_KINDS:
            raise ViewError(f"unknown view {self.kind!r}; choose from {', '.join(VIEW_KINDS)}")
        if self.kind in ("crop", AUTO_VIEW) and not 0 < self.crop <= self.resize:
            raise ViewError(f"crop view needs 0 < crop <= resize, got crop={self.crop}, resize={self.resize}")
        if self.kind == "full" and not 32 <= self.size <= 4096:
            raise ViewError(f"full view needs 32 <= size <= 4096, got {self.size}")
        if self.kind == "tiles":
            if not 0 < self.scale <= 4:
                raise ViewError(f"tiles view needs 0 < scale <= 4, got {self.scale}")
            if not 32 <= self.tile <= 2048:
                raise ViewError(f"tiles view needs 32 <= tile <= 2048, got {self.tile}")
            if not 0 <= self.overlap < 1:
                raise ViewError(f"tiles view needs 0 <= overlap < 1, got {self.overlap}")

    def resolve(self, height: int, width: int, roi: np.ndarray | None = None) -> tuple["ViewConfig", str]:
        """The concrete view for frames of `height` x `width` and why ("" unless auto): auto is the crop view
        where the centre crop covers at least AUTO_CROP_COVERAGE of the resized frame (with a region of interest,
        bool [h, w] stretched over the frame: of the region); otherwise the whole frame (full) at the crop view's
        scale, its long side the crop view's resized long side (at most 4096 px), so no part of an elongated frame
        goes uninspected and, up to that limit, nothing is seen smaller than the crop view would show it."""
        if self.kind != AUTO_VIEW:
            return self, ""
        crop = replace(self, kind="crop")
        lay = layout(crop, height, width)
        (top, left), (rh, rw) = lay.offset, lay.resized
        if roi is None:
            coverage, of = self.crop * self.crop / (rh * rw), f"these {width}x{height} frames"
        else:  # the crop's box in the mask's own resolution
            mh, mw = roi.shape
            inside = roi[round(top / rh * mh):round((top + self.crop) / rh * mh),
                         round(left / rw * mw):round((left + self.crop) / rw * mw)]
            coverage = float(inside.sum()) / max(1, int(roi.sum()))
            of = f"the region of interest of these {width}x{height} frames"
        if coverage >= AUTO_CROP_COVERAGE:
            return crop, f"auto: the centre crop covers {coverage:.0%} of {of}"
        return (replace(self, kind="full", size=min(4096, max(32, rh, rw))),
                f"auto: the centre crop would cover only {coverage:.0%} of {of}; the whole frame at the crop's "
                f"scale instead (--view crop: the centre only, faster)")

    def window_size(self) -> tuple[int, int] | None:
        """The backbone's input size (H, W) whatever the frame, or None where it follows the frame (full view)."""
        return {"crop": (self.crop, self.crop), "tiles": (self.tile, self.tile)}.get(self.kind)

    def relevant(self) -> dict:
        """The fields that matter for this kind (the others are ignored and not compared)."""
        names = {"auto": ("kind", "resize", "crop"), "crop": ("kind", "resize", "crop"), "full": ("kind", "size"),
                 "tiles": ("kind", "scale", "tile", "overlap")}[self.kind]
        return {name: getattr(self, name) for name in names}

    def differences(self, other: "ViewConfig") -> list[str]:
        mine, theirs = self.relevant(), other.relevant()
        if mine == theirs:
            return []
        return [f"view: bank has {mine}, scorer has {theirs}"]

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.relevant().items())

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ViewConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class Layout:
    """Where a frame of one size goes: the working frame, the windows cut from it, and back."""

    frame: tuple[int, int]  # (height, width) of the original frame
    resized: tuple[int, int]  # the whole frame after resizing (crop: before the centre crop)
    offset: tuple[int, int]  # crop: top-left of the centre crop in the resized frame; else (0, 0)
    work: tuple[int, int]  # the working frame the maps cover (crop: the crop)
    window: tuple[int, int]  # network input size of every window (padded)
    origins: tuple[tuple[int, int], ...]  # top-left of each window in working coordinates

    @property
    def canvas(self) -> tuple[int, int]:
        """The working frame extended to cover every window (padding included)."""
        return (max(self.work[0], max(y for y, _ in self.origins) + self.window[0]),
                max(self.work[1], max(x for _, x in self.origins) + self.window[1]))

    @property
    def scale(self) -> tuple[float, float]:
        """Working pixels per frame pixel, per axis."""
        return self.resized[0] / self.frame[0], self.resized[1] / self.frame[1]

    def to_frame(self, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Working coordinates -> frame coordinates (pixel centres)."""
        sy, sx = self.scale
        return (y + self.offset[0]) / sy, (x + self.offset[1]) / sx


def shape_groups(images: Sequence[np.ndarray]) -> dict[tuple[int, ...], list[int]]:
    """Positions of equally sized images: each group goes through the network together."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(image.shape, []).append(i)
    return groups


def _padded(n: int) -> int:
    return -(-n // PAD_MULTIPLE) * PAD_MULTIPLE


def _positions(length: int, tile: int, stride: int) -> list[int]:
    if length <= tile:
        return [0]
    positions = list(range(0, length - tile, stride))
    return positions + [length - tile]


@lru_cache(maxsize=64)
def layout(view: ViewConfig, height: int, width: int) -> Layout:
    """The layout of an `height` x `width` frame under `view`."""
    if height < 1 or width < 1:
        raise ViewError(f"empty frame {height}x{width}")
    if view.kind == AUTO_VIEW:
        raise ViewError("the view 'auto' is resolved from the training frames when a bank is built "
                        "(ViewConfig.resolve); a bank stores the view it chose")
    if view.kind == "crop":
        # torchvision's resize rule for a single size: shorter side -> resize, longer side truncated
        short, long = (height, width) if height <= width else (width, height)
        other = int(view.resize * long / short)
        resized = (view.resize, other) if height <= width else (other, view.resize)
        top, left = int(round((resized[0] - view.crop) / 2.0)), int(round((resized[1] - view.crop) / 2.0))
        return Layout((height, width), resized, (top, left), (view.crop, view.crop), (view.crop, view.crop), ((0, 0),))
    if view.kind == "full":
        s = view.size / max(height, width)
        resized = (max(1, round(height * s)), max(1, round(width * s)))
        return Layout((height, width), resized, (0, 0), resized, (_padded(resized[0]), _padded(resized[1])), ((0, 0),))
    resized = (max(1, round(height * view.scale)), max(1, round(width * view.scale)))
    stride = max(1, round(view.tile * (1.0 - view.overlap)))
    ys, xs = _positions(resized[0], view.tile, stride), _positions(resized[1], view.tile, stride)
    if len(ys) * len(xs) > MAX_WINDOWS:
        raise ViewError(f"a {height}x{width} frame at scale {view.scale} makes {len(ys) * len(xs)} tiles "
                        f"(limit {MAX_WINDOWS}): use a smaller --scale or a larger --tile")
    return Layout((height, width), resized, (0, 0), resized, (view.tile, view.tile),
                  tuple((y, x) for y in ys for x in xs))


def windows(batch: torch.Tensor, view: ViewConfig, lay: Layout, mean: tuple[float, ...],
            std: tuple[float, ...]) -> torch.Tensor:
    """uint8 frames [B, 3, H, W] of one size -> normalised windows [B * n_windows, 3, h, w] (frame-major)."""
    mean_t = torch.tensor(mean, device=batch.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=batch.device).view(1, 3, 1, 1)
    if view.kind == "crop":
        resized = TF.resize(batch, [view.resize], antialias=True)  # shorter side -> resize, as the paper
        return (TF.center_crop(resized, [view.crop, view.crop]).float() / 255.0 - mean_t) / std_t
    resized = TF.resize(batch, list(lay.resized), antialias=True)
    work = (resized.float() / 255.0 - mean_t) / std_t
    canvas = lay.canvas
    # padding is 0 after normalisation: the mean colour, the same for every frame of this size
    work = F.pad(work, (0, canvas[1] - work.shape[3], 0, canvas[0] - work.shape[2]))
    if view.kind == "full":
        return work
    h, w = lay.window
    tiles = [work[:, :, y:y + h, x:x + w] for y, x in lay.origins]
    return torch.stack(tiles, dim=1).reshape(-1, 3, h, w)


def frame_windows(images: Sequence[np.ndarray | torch.Tensor], view: ViewConfig, lay: Layout,
                  mean: tuple[float, ...], std: tuple[float, ...], device: torch.device | str = "cpu") -> torch.Tensor:
    """Equally sized RGB uint8 frames (HxWx3 arrays or tensors) -> their `windows` [B * n_windows, 3, h, w] on
    `device`. On the CPU, arrays are resized one by one from their own memory: stacking them first copies the
    full-resolution batch into fresh pages (72 MB for 16 of VisA's 1500 x 1000 frames), ~10 % of macaroni1's
    scoring time. The resize treats each frame on its own either way: the windows are the same to the bit."""
    device = torch.device(device)
    if device.type != "cpu" or not len(images) or any(isinstance(image, torch.Tensor) for image in images):
        return windows(upload(images, device), view, lay, mean, std)
    return torch.cat([windows(_as_tensor(image).permute(2, 0, 1)[None], view, lay, mean, std) for image in images])


def _as_tensor(image: np.ndarray) -> torch.Tensor:
    """An HxWx3 array as a tensor on its own memory; a copy only where torch cannot share it (negative strides) or
    may not (a read-only array, e.g. np.asarray of a PIL image: torch would warn that it is not writable)."""
    return torch.from_numpy(np.ascontiguousarray(image) if image.flags.writeable else np.array(image))


@dataclass(frozen=True)
class Region:
    """A region of interest given per image at scoring time (a camera's own), in place of the bank's ROI: `mask`
    bool [h, w], True = inspect, any resolution, stretched over the frame (as the bank's ROI). `key` names it
    (equal keys: the same mask) so its patch masks are computed once per layout and reused."""
    key: Hashable
    mask: np.ndarray = field(compare=False, repr=False)


def valid_patches(lay: Layout, grid: tuple[int, int], roi: np.ndarray | None) -> np.ndarray:
    """bool [n_windows, gh, gw]: patches whose centre lies in the working frame (not padding) and the ROI."""
    gh, gw = grid
    step_y, step_x = lay.window[0] / gh, lay.window[1] / gw
    cy = (np.arange(gh) + 0.5) * step_y
    cx = (np.arange(gw) + 0.5) * step_x
    out = np.zeros((len(lay.origins), gh, gw), dtype=bool)
    for i, (y0, x0) in enumerate(lay.origins):
        yy, xx = np.meshgrid(y0 + cy, x0 + cx, indexing="ij")
        inside = (yy < lay.work[0]) & (xx < lay.work[1])
        if roi is not None:
            fy, fx = lay.to_frame(yy, xx)
            ry = np.clip((fy / lay.frame[0] * roi.shape[0]).astype(np.int64), 0, roi.shape[0] - 1)
            rx = np.clip((fx / lay.frame[1] * roi.shape[1]).astype(np.int64), 0, roi.shape[1] - 1)
            inside &= roi[ry, rx]
        out[i] = inside
    return out


def stitch(patch_scores: torch.Tensor, lay: Layout) -> torch.Tensor:
    """Patch scores [B, n_windows, gh, gw] -> unsmoothed maps [B, work_h, work_w] in working coordinates.

    Each window's grid is bilinearly upsampled to its input size; overlapping windows take the maximum.
    """
    batch, n_windows, gh, gw = patch_scores.shape
    up = F.interpolate(patch_scores.reshape(batch * n_windows, 1, gh, gw), size=lay.window, mode="bilinear",
                       align_corners=False).reshape(batch, n_windows, *lay.window)
    if n_windows == 1 and lay.origins[0] == (0, 0):
        return up[:, 0, :lay.work[0], :lay.work[1]]
    canvas = up.new_full((batch, *lay.canvas), float("-inf"))
    h, w = lay.window
    for i, (y, x) in enumerate(lay.origins):
        canvas[:, y:y + h, x:x + w] = torch.maximum(canvas[:, y:y + h, x:x + w], up[:, i])
    return canvas[:, :lay.work[0], :lay.work[1]]


def patch_canvas(patch_scores: np.ndarray, lay: Layout) -> np.ndarray:
    """One image's patch scores [n_windows, gh, gw] -> one grid over the working frame at patch
    resolution (overlaps take the maximum): the small map a result message can carry."""
    n_windows, gh, gw = patch_scores.shape
    step_y, step_x = lay.window[0] / gh, lay.window[1] / gw
    height, width = -(-lay.work[0] // round(step_y)), -(-lay.work[1] // round(step_x))
    canvas = np.zeros((max(height, 1), max(width, 1)), dtype=np.float32)
    for grid, (y, x) in zip(patch_scores, lay.origins):
        top, left = int(round(y / step_y)), int(round(x / step_x))
        part = grid[:canvas.shape[0] - top, :canvas.shape[1] - left]
        region = canvas[top:top + part.shape[0], left:left + part.shape[1]]
        np.maximum(region, part, out=region)
    return canvas


def frame_mask(mask: np.ndarray, view: ViewConfig) -> np.ndarray:
    """A ground-truth mask at frame resolution -> bool mask aligned with the view's maps (nearest)."""
    lay = layout(view, *mask.shape[:2])
    tensor = torch.from_numpy((mask > 0).astype(np.uint8))[None]
    resized = TF.resize(tensor, list(lay.resized), interpolation=TF.InterpolationMode.NEAREST)
    top, left = lay.offset
    return resized[0, top:top + lay.work[0], left:left + lay.work[1]].numpy() > 0


def inspected_box(height: int, width: int, view: ViewConfig) -> tuple[int, int, int, int]:
    """(y0, x0, y1, x1): the part of a frame (at its own resolution) that the maps cover: the whole frame for
    full and tiles, the centre crop's footprint for crop. For overlays."""
    lay = layout(view, height, width)
    (top, left), (sy, sx) = lay.offset, lay.scale
    y0, x0 = int(round(top / sy)), int(round(left / sx))
    y1, x1 = int(round((top + lay.work[0]) / sy)), int(round((left + lay.work[1]) / sx))
    return y0, x0, max(y1, y0 + 1), max(x1, x0 + 1)

