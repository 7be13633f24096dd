"""Image decoding (batched on the GPU for JPEG), uint8 upload, and the paper's pre-processing as a batch
(resize 256, centre crop 224, ImageNet normalisation)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from .stages import stage

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


class ImageDecodeError(ValueError):
    """Bytes or a file that are not a decodable image."""


def to_rgb(image: np.ndarray, channel_order: str = "rgb") -> np.ndarray:
    """Any uint8 grey (HxW, HxWx1), RGB/BGR (HxWx3) or RGBA/BGRA image -> HxWx3 RGB uint8."""
    if image.dtype != np.uint8:
        raise ImageDecodeError(f"expected uint8 pixels, got {image.dtype}")
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        return np.ascontiguousarray(np.repeat(image.reshape(image.shape[0], image.shape[1], 1), 3, axis=2))
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ImageDecodeError(f"expected HxW, HxWx1, HxWx3 or HxWx4 pixels, got shape {image.shape}")
    image = image[:, :, :3]
    if channel_order == "bgr":
        image = image[:, :, ::-1]
    return np.ascontiguousarray(image)


def decode_image(data: bytes) -> np.ndarray:
    """PNG/JPEG/BMP bytes -> HxWx3 RGB uint8."""
    with stage("decode"):
        decoded = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
        if decoded is None:
            raise ImageDecodeError("not a decodable PNG/JPEG/BMP image")
        return to_rgb(decoded, "bgr")


JPEG_MAGIC = b"\xff\xd8\xff"


def decode_images(datas: Sequence[bytes], device: torch.device | str = "cpu",
                  batched_jpeg: bool | None = None) -> list[np.ndarray | torch.Tensor | ImageDecodeError]:
    """Encoded images -> RGB HxWx3 uint8 each, the one decoding function for batches.

    `batched_jpeg` (default: when `device` is CUDA): JPEGs are decoded together by torchvision.io.decode_jpeg
    on `device` (nvJPEG on CUDA) and stay there as tensors; everything else, and JPEGs when off, by cv2 on the
    CPU as numpy arrays. A batch the batched decoder refuses is decoded image by image with cv2 instead. An
    undecodable image gives its ImageDecodeError in its place: one bad frame never fails the others.
    """
    device = torch.device(device)
    batched = device.type == "cuda" if batched_jpeg is None else batched_jpeg
    out: list = [None] * len(datas)
    jpegs = [i for i, data in enumerate(datas) if data[:3] == JPEG_MAGIC] if batched else []
    if jpegs:
        encoded = [torch.from_numpy(np.frombuffer(datas[i], np.uint8).copy()) for i in jpegs]
        try:
            decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # a corrupt or unsupported JPEG in the batch: one by one (cv2 takes the refused)
            decoded = [_decode_jpeg_or_none(data, device) for data in encoded]
        for i, image in zip(jpegs, decoded):
            out[i] = None if image is None else image.permute(1, 2, 0)  # HxWx3, as the cv2 path
    for i, data in enumerate(datas):
        if out[i] is None:
            try:
                out[i] = decode_image(data)
            except ImageDecodeError as exc:
                out[i] = exc
    return out


def _decode_jpeg_or_none(data: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        return None


def upload(images: Sequence[np.ndarray | torch.Tensor], device: torch.device | str) -> torch.Tensor:
    """Equally sized RGB uint8 images (HxWx3 arrays or tensors) -> a uint8 batch [B, 3, H, W] on `device`.

    uint8 travels (a quarter of float32's bytes); resizing and normalisation happen on the device. To CUDA,
    host frames go through pinned memory with a non-blocking copy; frames already there stay there.
    """
    device = torch.device(device)
    if any(isinstance(image, torch.Tensor) for image in images):
        batch = torch.stack([torch.as_tensor(image).to(device, non_blocking=True) for image in images])
    else:
        batch = torch.from_numpy(np.stack(images))
        if device.type == "cuda":
            batch = batch.pin_memory().to(device, non_blocking=True)
    return batch.permute(0, 3, 1, 2)


def load_image(path: str | Path) -> np.ndarray:
    """Image file -> HxWx3 RGB uint8; grey files are replicated to three channels."""
    try:
        with stage("decode"):  # reading the file is part of decoding it
            data = Path(path).read_bytes()
    except OSError as exc:
        raise ImageDecodeError(f"cannot read {path}: {exc}") from exc
    try:
        return decode_image(data)
    except ImageDecodeError as exc:
        raise ImageDecodeError(f"{path}: {exc}") from None


def list_images(folder: str | Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def preprocess(images: Sequence[np.ndarray], resize: int, crop: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """RGB uint8 images of any sizes -> the paper's crop view: normalised float batch [B, 3, crop, crop].

    Grouped by size (scorer.views.frame_windows: on the CPU each image resized from its own memory, on a GPU a batch
    per size); each image's result does not depend on the others.
    """
    from .views import ViewConfig, frame_windows, layout, shape_groups

    view = ViewConfig(kind="crop", resize=resize, crop=crop)
    out = torch.empty((len(images), 3, crop, crop), dtype=torch.float32, device=device)
    for (height, width, *_), indices in shape_groups(images).items():
        out[indices] = frame_windows([images[i] for i in indices], view, layout(view, height, width), IMAGENET_MEAN,
                                     IMAGENET_STD, device)
    return out
