"""Score images with an exported PatchCore bank (`patchcore export BANK --format onnx --out DIR`) WITHOUT PyTorch.

Needs numpy, onnxruntime, safetensors and opencv (JPEG/PNG decoding); faiss-cpu is used for the exact search
when installed, else numpy. `patchcore export` copies this file into DIR as `patchcore_onnx.py`:

    python DIR/patchcore_onnx.py DIR IMAGE...                       # one JSON line per image
    import patchcore_onnx; scorer = patchcore_onnx.OnnxScorer(DIR); scorer.score([rgb_uint8, ...])

The ONNX graph is the feature extractor (uint8 crops -> normalisation -> backbone up to the taps -> 3x3
neighbourhoods -> pooling to 1024 per patch). The search stays outside the graph: an exact nearest-neighbour
search over the whole bank as one dense ONNX graph allocates [patches x bank] floats per batch (the known
failure: hundreds of GB), so it runs here, blocked (FAISS or numpy). Scores are the PyTorch scorer's (tested
within 1e-3): the crop view, true L2 distances, Eq. 7 reweighting, bilinear maps smoothed by a Gaussian of
sigma 4 (scipy's "mirror" border). Imports nothing of torch or of the rest of the project.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from safetensors.numpy import load_file

try:
    import faiss
except ImportError:  # optional: numpy searches exactly too, more slowly
    faiss = None

EXPORT_FORMAT = "patchcore-onnx"
EXPORT_VERSION = 1
SETTINGS_FILE = "export.json"
MAP_SIGMA = 4.0


class OnnxScorerError(ValueError):
    """An export folder that is incomplete, altered, or of another format."""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def resample_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, int]:
    """An antialiased bilinear resize along one axis as torch's uint8 CPU kernel (and PIL) computes it:
    (first input index [n_out], integer weights [n_out, taps], precision bits); out = (sum w x + half) >> bits."""
    scale = n_in / n_out
    support, invscale = (scale, 1.0 / scale) if scale >= 1.0 else (1.0, 1.0)
    centres = scale * (np.arange(n_out) + 0.5)
    starts = np.maximum((centres - support + 0.5).astype(np.int64), 0)
    stops = np.minimum((centres + support + 0.5).astype(np.int64), n_in)
    taps = np.arange(int((stops - starts).max()))
    weights = np.maximum(0.0, 1.0 - np.abs((starts[:, None] + taps - centres[:, None] + 0.5) * invscale))
    weights = np.where(starts[:, None] + taps < stops[:, None], weights, 0.0)
    weights /= weights.sum(1, keepdims=True)
    bits = 0  # as many as int16 weights allow
    while bits < 15 and int(0.5 + weights.max() * (1 << (bits + 1))) < (1 << 15):
        bits += 1
    return starts, np.floor(weights * (1 << bits) + 0.5).astype(np.int64), bits


def _resample(image: np.ndarray, axis: int, n_out: int, keep: slice) -> np.ndarray:
    """One uint8 pass along `axis` of an HxWx3 image, only the outputs in `keep`, rounded and clipped to uint8."""
    starts, weights, bits = resample_weights(image.shape[axis], n_out)
    starts, weights = starts[keep], weights[keep]
    index = np.minimum(starts[:, None] + np.arange(weights.shape[1]), image.shape[axis] - 1)
    taken = np.take(image.astype(np.int64), index, axis=axis)  # axis -> (outputs, taps)
    shape = [1] * taken.ndim
    shape[axis], shape[axis + 1] = weights.shape
    total = (taken * weights.reshape(shape)).sum(axis=axis + 1)
    return np.clip((total + (1 << (bits - 1))) >> bits, 0, 255).astype(np.uint8)


def bilinear_weights(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of torch's bilinear interpolation with align_corners=False (upsampling)."""
    source = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    low = np.minimum(np.floor(source).astype(np.int64), n_in - 1)
    high = np.minimum(low + 1, n_in - 1)
    frac = source - low
    weights = np.zeros((n_out, n_in), dtype=np.float64)
    np.add.at(weights, (np.arange(n_out), low), 1.0 - frac)
    np.add.at(weights, (np.arange(n_out), high), frac)
    return weights


def gaussian_weights(n: int, sigma: float = MAP_SIGMA) -> np.ndarray:
    """[n, n] Gaussian filter (truncate 4 sigma) with scipy's "mirror" border, as a matrix."""
    radius = int(4.0 * sigma + 0.5)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    source = np.arange(n)[:, None] + np.arange(-radius, radius + 1)[None, :]
    if n == 1:
        source = np.zeros_like(source)
    else:
        source = source % (2 * n - 2)
        source = np.where(source < n, source, 2 * n - 2 - source)
    weights = np.zeros((n, n), dtype=np.float64)
    np.add.at(weights, (np.repeat(np.arange(n), len(taps)), source.ravel()), np.tile(taps, n))
    return weights


class OnnxScorer:
    """The exported bank's scorer: `score(images)` -> (image scores [B], maps [B, crop, crop] or None)."""

    def __init__(self, folder: str | Path, threads: int = 0, max_block_bytes: int = 256 << 20):
        folder = Path(folder)
        try:
            self.settings = json.loads((folder / SETTINGS_FILE).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise OnnxScorerError(f"{folder}: not a readable export ({SETTINGS_FILE}: {exc})") from None
        if self.settings.get("format") != EXPORT_FORMAT or self.settings.get("version") != EXPORT_VERSION:
            raise OnnxScorerError(f"{folder}: not a {EXPORT_FORMAT} v{EXPORT_VERSION} export")
        model, bank = folder / self.settings["onnx"], folder / self.settings["bank"]
        for path, key in ((model, "onnx_sha256"), (bank, "bank_sha256")):
            if not path.is_file() or _sha256(path) != self.settings[key]:
                raise OnnxScorerError(f"{path} is missing or altered (sha256 differs from {SETTINGS_FILE})")
        self.features = np.ascontiguousarray(load_file(str(bank))["features"], dtype=np.float32)  # no pickle
        view = self.settings["view"]
        if view["kind"] != "crop":
            raise OnnxScorerError(f"view {view['kind']!r}: this runtime scores the crop view only")
        self.resize, self.crop = int(view["resize"]), int(view["crop"])
        self.grid = tuple(self.settings["grid"])
        self.neighbours = int(self.settings["reweight_neighbours"])
        self.threshold = self.settings.get("threshold")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # free the cores for the search
        self.session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        self._rows = max(1, max_block_bytes // (4 * len(self.features)))
        self._bank_sq = (self.features.astype(np.float64) ** 2).sum(1).astype(np.float32)
        if faiss is not None:
            self._faiss = faiss.IndexFlatL2(self.features.shape[1])
            self._faiss.add(self.features)
        up_y, up_x = (bilinear_weights(g, self.crop) for g in self.grid)
        smooth = gaussian_weights(self.crop)
        self._map_y, self._map_x = (smooth @ up_y).astype(np.float32), (smooth @ up_x).astype(np.float32)

    def crops(self, images: list[np.ndarray]) -> np.ndarray:
        """RGB uint8 HxWx3 images -> uint8 [B, 3, crop, crop]: shorter side to `resize` (antialiased bilinear,
        horizontal pass then vertical in integer arithmetic, each rounded to uint8, as torch's CPU kernel), centre crop."""
        out = np.empty((len(images), 3, self.crop, self.crop), dtype=np.uint8)
        for n, image in enumerate(images):  # per frame: frames may differ in size
            height, width = image.shape[:2]
            short, long = min(height, width), max(height, width)
            other = int(self.resize * long / short)
            size = (self.resize, other) if height <= width else (other, self.resize)
            top, left = (int(round((s - self.crop) / 2.0)) for s in size)
            across = _resample(image, 1, size[1], slice(left, left + self.crop))  # horizontal pass first, as torch
            out[n] = _resample(across, 0, size[0], slice(top, top + self.crop)).transpose(2, 0, 1)
        return out

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Exact k-NN: (true L2 distances [Q, k], indices [Q, k]), the distances recomputed as |q - b|."""
        k = min(k, len(self.features))
        if faiss is not None:
            _, nearest = self._faiss.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        else:
            nearest = np.concatenate([np.argsort(self._bank_sq[None] - 2.0 * block @ self.features.T, axis=1)[:, :k]
                                      for block in np.array_split(queries, max(1, -(-len(queries) // self._rows)))])
        distances = np.linalg.norm(queries[:, None, :] - self.features[nearest], axis=2)
        return distances.astype(np.float32), nearest

    def score(self, images: list[np.ndarray], maps: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        crops = self.crops(images)
        features = self.session.run(None, {self.settings["input"]: crops})[0]  # [B, L, D]
        batch, patches, dim = features.shape
        distances, nearest = self.search(features.reshape(-1, dim))
        distances, nearest = distances.reshape(batch, patches), nearest.reshape(batch, patches)
        where = distances.argmax(1)
        rows = np.arange(batch)
        scores = distances[rows, where]
        if self.neighbours > 1:  # Eq. 7: (1 - softmax of the distances to m*'s b nearest bank features) * s*
            _, support = self.search(self.features[nearest[rows, where]], k=self.neighbours)
            to_support = np.linalg.norm(self.features[support] - features[rows, where][:, None, :], axis=2)
            weights = np.exp(to_support - to_support.max(1, keepdims=True))
            scores = scores * (1.0 - weights[:, 0] / weights.sum(1))
        if not maps:
            return scores.astype(np.float32), None
        grids = distances.reshape(batch, *self.grid)
        return scores.astype(np.float32), np.einsum("yh,bhw,xw->byx", self._map_y, grids, self._map_x)


def main(argv: list[str]) -> int:
    import cv2

    if len(argv) < 2:
        print("usage: python patchcore_onnx.py EXPORT_DIR IMAGE...", file=sys.stderr)
        return 2
    scorer = OnnxScorer(argv[0])
    for path in argv[1:]:
        image = cv2.imread(path, cv2.IMREAD_COLOR)
        if image is None:
            print(json.dumps({"image": path, "error": "not a decodable image"}))
            continue
        score = float(scorer.score([np.ascontiguousarray(image[:, :, ::-1])], maps=False)[0][0])
        anomalous = None if scorer.threshold is None else score >= scorer.threshold
        print(json.dumps({"image": path, "score": round(score, 6), "threshold": scorer.threshold, "anomalous": anomalous}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
