"""Coreset selection time beside the plain numpy loop, on real and texture-like features, in one run.

    .venv/bin/python bench/bank_build.py [--data DIR] [--sets bottle,macaroni1,texture,large] [--max-steps 3000]

Sets (mobilenet_v2 features, today's crop view, projected batch by batch as a bounded-memory build does):
- bottle: MVTec bottle train/good (209 images, 163,856 patches);
- macaroni1: VisA macaroni1 train/good (`--macaroni-images`, default all 300);
- texture: 209 synthetic noise textures (multi-scale, anisotropic filtered noise, greyscale) through the
  same backbone: stationary texture without object structure, where triangle-inequality pruning stops
  paying (the pruned pass has to compute ~98 % of the points at every step, as on real texture sets);
- large: `--large-points` (default 1M) projected points drawn from the texture set plus small jitter,
  the size a full-frame build of 300 images reaches.
Each set times the greedy loop alone (start distances to the last step) on the same projected points:
the plain loop (one matrix-vector product per step) against `select_coreset` (and with --torch the
torch engine, on CUDA when present), and reports the coverage radius and the selection overlap with the plain loop.
`--max-steps` caps the steps per set (the first k picks of greedy are the same whatever the total);
0 runs the full int(N * fraction). Timings are wall-clock; the machine is named by `lscpu`.
"""
from __future__ import annotations

import argparse
import subprocess
import time
from dataclasses import replace

import numpy as np

from scorer.config import CoresetConfig, FeatureConfig
from scorer.coreset import coverage_radius, random_projection, select_coreset, start_distances
from scorer.evaluate import train_images
from scorer.model import build_extractor, iter_image_batches
from scorer.preprocess import preprocess

from datadir import add_data_argument, category  # bench/datadir.py
from results import write_result  # bench/results.py


def plain_coreset(projected: np.ndarray, n_select: int, config: CoresetConfig) -> np.ndarray:
    """The straightforward loop: one full distance pass (a matrix-vector product) per selected point."""
    mind = start_distances(projected, config.start_points, config.seed)
    norms = np.einsum("ij,ij->i", projected, projected)
    chosen = []
    for _ in range(n_select):
        centre = int(np.argmax(mind))
        chosen.append(centre)
        sq = norms + norms[centre] - 2.0 * (projected @ projected[centre])
        np.minimum(mind, np.sqrt(np.maximum(sq, 0.0)), out=mind)
    return np.array(chosen)


def noise_textures(n_images: int, seed: int = 0, size: int = 256):
    """Batches of greyscale textures: a random mix of Gaussian-filtered noise at three anisotropic scales."""
    import cv2

    rng = np.random.default_rng(seed)
    for begin in range(0, n_images, 16):
        batch = []
        for _ in range(begin, min(n_images, begin + 16)):
            image = np.zeros((size, size), np.float32)
            for sigma in (1.0, 3.0, 8.0):
                noise = rng.standard_normal((size, size)).astype(np.float32)
                image += rng.uniform(0.3, 1) * cv2.GaussianBlur(noise, (0, 0), sigmaX=sigma * rng.uniform(0.5, 2),
                                                                sigmaY=sigma * rng.uniform(0.5, 2))
            grey = np.clip(128 + 40 * (image - image.mean()) / image.std(), 0, 255).astype(np.uint8)
            batch.append(np.repeat(grey[:, :, None], 3, axis=2))
        yield batch


def projected_features(batches, config: CoresetConfig) -> tuple[np.ndarray, float]:
    """Backbone features of image batches, projected batch by batch (the full [N, 1024] is never held)."""
    import torch

    extractor, fc = build_extractor(FeatureConfig(backbone="mobilenet_v2"))
    started, chunks = time.perf_counter(), []
    with torch.no_grad():
        for images in batches:
            features = extractor(preprocess(images, 256, 224))[0].reshape(-1, fc.target_dim).numpy()  # the crop view
            chunks.append(random_projection(features, config.projection_dim, config.seed))
    return np.concatenate(chunks), time.perf_counter() - started


def compare(name: str, projected: np.ndarray, config: CoresetConfig, max_steps: int, engines: dict) -> list[dict]:
    """Time the plain loop and each engine on the same points; print them and return one row per engine."""
    n_select = max(1, int(len(projected) * config.fraction))
    if max_steps:
        n_select = min(n_select, max_steps)
    run = replace(config, fraction=(n_select + 0.5) / len(projected))  # int(N * fraction) == n_select
    started = time.perf_counter()
    plain = plain_coreset(projected, n_select, config)
    plain_s = time.perf_counter() - started
    plain_radius = coverage_radius(projected, plain)
    radius_s = time.perf_counter() - started - plain_s
    print(f"{name}: {len(projected):,} points, {n_select:,} steps; plain numpy loop {plain_s:.1f} s, "
          f"coverage radius {plain_radius:.4f} (computing it: {radius_s:.1f} s more)", flush=True)
    rows = []
    for label, options in engines.items():
        marks = []  # the time of each progress report: the last one is the loop's end, before the radius
        started = time.perf_counter()
        selection = select_coreset(None, run, lambda n: marks.append(time.perf_counter()), projected=projected,
                                   **options)
        seconds = time.perf_counter() - started
        loop_s = marks[-1] - started
        assert len(selection.indices) == n_select
        same = np.array_equal(selection.indices, plain)
        shared = len(set(selection.indices.tolist()) & set(plain.tolist())) / n_select
        print(f"  {label:12s} loop {loop_s:5.1f} s x{plain_s / loop_s:4.2f} vs the plain loop; with its radius "
              f"{seconds:5.1f} s x{(plain_s + radius_s) / seconds:4.2f} vs plain + its radius;  radius "
              f"{selection.radius:.4f}  same order {same}, set overlap {shared:.4f}", flush=True)
        rows.append({"set": name, "engine": label, "points": len(projected), "steps": n_select,
                     "plain_loop_s": round(plain_s, 1), "plain_radius_s": round(radius_s, 1), "loop_s": round(loop_s, 1),
                     "x_plain": round(plain_s / loop_s, 2), "with_radius_s": round(seconds, 1),
                     "x_plain_with_radius": round((plain_s + radius_s) / seconds, 2),
                     "same_set": ("yes" if shared == 1.0 else f"overlap {shared:.4f}") + (", same order" if same else "")
                     + f" (radius {selection.radius:.4f} / plain {plain_radius:.4f})"})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    add_data_argument(parser)
    parser.add_argument("--sets", default="bottle,macaroni1,texture,large")
    parser.add_argument("--coreset", type=float, default=0.1, help="coreset fraction")
    parser.add_argument("--max-steps", type=int, default=3000, help="steps per set (0: all)")
    parser.add_argument("--macaroni-images", type=int, default=300)
    parser.add_argument("--large-points", type=int, default=1_000_000)
    parser.add_argument("--large-steps", type=int, default=300)
    parser.add_argument("--torch", action="store_true", help="also time the torch engine (CUDA when present)")
    args = parser.parse_args()
    engines = {"numba": {}}
    if args.torch:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        engines[f"torch {device}"] = {"engine": "torch", "device": device}
        if device == "cuda":
            engines["torch fp16"] = {"engine": "torch", "device": device, "half": True}
    config = CoresetConfig(fraction=args.coreset)
    model = [line for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
             if line.startswith(("Model name", "CPU(s):"))]
    print("machine:", "; ".join(" ".join(line.split()) for line in model))
    sets = args.sets.split(",")
    texture, rows = None, []
    for name in sets:
        if name in ("bottle", "macaroni1"):
            folder = category("mvtec_bottle" if name == "bottle" else "visa_macaroni1", args.data)
            paths = train_images(folder)[:args.macaroni_images if name == "macaroni1" else None]
            projected, seconds = projected_features(iter_image_batches(paths, 16), config)
            print(f"{name}: {len(paths)} images, features + projection {seconds:.1f} s")
            rows += compare(name, projected, config, args.max_steps, engines)
        elif name in ("texture", "large"):
            if texture is None:
                texture, seconds = projected_features(noise_textures(209), config)
                print(f"texture: 209 synthetic images, features + projection {seconds:.1f} s")
            if name == "texture":
                rows += compare(name, texture, config, args.max_steps, engines)
            else:
                rng = np.random.default_rng(1)
                picks = rng.integers(0, len(texture), args.large_points)
                scale = np.float32(0.05 * texture.std())
                large = texture[picks] + scale * rng.standard_normal((args.large_points, texture.shape[1]),
                                                                    dtype=np.float32)
                rows += compare(f"large ({args.large_points:,} texture-like points)", large, config, args.large_steps,
                                engines)
        else:
            parser.error(f"unknown set {name!r}")
    write_result("bank_build", {"fraction": args.coreset, "rows": rows})


if __name__ == "__main__":
    main()
