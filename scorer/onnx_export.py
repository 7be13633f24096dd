"""Export a bank for scoring without PyTorch: the feature extractor as ONNX, the bank, and the runtime module.

DIR/features.onnx     uint8 crops [B, 3, crop, crop] (dynamic batch) -> patch features [B, h*w, 1024]
DIR/bank.safetensors  the bank file itself (vectors, settings, calibration; no pickle)
DIR/export.json       what the runtime needs (view, grid, Eq. 7's b, threshold) and both files' sha256
DIR/patchcore_onnx.py scorer/onnx_runtime.py: onnxruntime + numpy/FAISS, no torch

The export is checked before it is written out: ONNX Runtime's features of a random batch must equal
PyTorch's within `tolerance` (relative to the largest feature), else it fails.
"""
from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import onnx_runtime
from .backbones import file_sha256
from .bank import BankError, MemoryBank, save_bank
from .model import build_extractor
from .preprocess import IMAGENET_MEAN, IMAGENET_STD

ONNX_FILE, BANK_FILE, RUNTIME_FILE = "features.onnx", "bank.safetensors", "patchcore_onnx.py"
DEFAULT_OPSET = 17


class ExportError(ValueError):
    """A bank this export cannot express, or an export whose check failed."""


class UInt8Features(nn.Module):
    """uint8 crops -> ImageNet normalisation -> patch features [B, h*w, D] (neighbourhood and pooling as
    convolutions, resizes, pads and sums: all plain ONNX operators)."""

    def __init__(self, extractor):
        super().__init__()
        self.extractor = extractor
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.extractor.patch_features((images.float() / 255.0 - self.mean) / self.std)[0]


def export_onnx(bank: MemoryBank, out: str | Path, weights: str | Path | None = None, opset: int = DEFAULT_OPSET,
                tolerance: float = 1e-4) -> dict:
    """Write the export folder for `bank`; returns its settings (export.json)."""
    if not isinstance(bank, MemoryBank):
        raise ExportError("the ONNX export takes a single-backbone bank; this is an ensemble")
    if bank.position is not None:
        raise ExportError("the ONNX export does not apply per-position statistics (--position-norm) yet")
    if bank.view.kind != "crop" or bank.roi is not None:
        raise ExportError(f"the ONNX export supports the crop view without a region of interest; this bank has "
                          f"view {bank.view.kind!r}{' and a region of interest' if bank.roi is not None else ''}")
    import onnxruntime  # the [onnx] extra; imported here so the rest of the scorer does not need it

    extractor, config = build_extractor(replace(bank.feature_config, weights_sha256=""), weights, "cpu")
    differences = bank.feature_config.differences(config)
    if differences:
        raise BankError("bank does not match this backbone/config: " + "; ".join(differences))
    model = UInt8Features(extractor).eval()
    crop = bank.view.crop
    example = torch.randint(0, 256, (2, 3, crop, crop), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        model(example)  # builds the pooling convolutions' weights now, so the trace sees them as constants
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        # dynamo=False: the TorchScript-based exporter, which needs no onnxscript
        torch.onnx.export(model, (example,), str(out / ONNX_FILE), dynamo=False, opset_version=opset,
                          input_names=["images"], output_names=["features"],
                          dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}})
        expected = model(example[:1].repeat(3, 1, 1, 1)).numpy()
    session = onnxruntime.InferenceSession(str(out / ONNX_FILE), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": example[:1].repeat(3, 1, 1, 1).numpy()})[0]  # another batch size
    difference = float(np.abs(got - expected).max() / np.abs(expected).max())
    if difference > tolerance:
        raise ExportError(f"ONNX Runtime's features differ from PyTorch's by {difference:.2e} (limit {tolerance:.0e})")
    save_bank(bank, out / BANK_FILE)
    shutil.copyfile(onnx_runtime.__file__, out / RUNTIME_FILE)
    grid = extractor.patch_features(example[:1].float())[1]
    settings = {
        "format": onnx_runtime.EXPORT_FORMAT, "version": onnx_runtime.EXPORT_VERSION,
        "onnx": ONNX_FILE, "onnx_sha256": file_sha256(out / ONNX_FILE), "bank": BANK_FILE,
        "bank_sha256": file_sha256(out / BANK_FILE), "input": "images", "output": "features", "opset": opset,
        "grid": list(grid), "view": bank.view.to_dict(), "features": config.to_dict(),
        "reweight_neighbours": bank.reweight_neighbours,
        "threshold": bank.calibration.threshold if bank.calibration else None,
        "bank_size": int(len(bank.features)), "torch": torch.__version__,
        "check_max_relative_feature_difference": difference,
    }
    (out / onnx_runtime.SETTINGS_FILE).write_text(json.dumps(settings, indent=2))
    return settings
