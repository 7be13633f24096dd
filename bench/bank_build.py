"""Bank build time on MVTec bottle (features + coreset), beside the plain numpy coreset loop.

    .venv/bin/python bench/bank_build.py [--category ../shared/datasets/mvtec_bottle] [--no-baseline]

Prints the build time split, and the plain algorithm's time and coverage on the same features.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from scorer.config import BuildConfig, CoresetConfig, FeatureConfig
from scorer.coreset import coverage_radius, greedy_coreset, random_projection, start_distances
from scorer.evaluate import train_images
from scorer.model import build_bank, build_extractor, iter_image_batches
from scorer.preprocess import preprocess


def plain_coreset(features: np.ndarray, config: CoresetConfig) -> np.ndarray:
    """The straightforward loop: one full distance pass (a matrix-vector product) per selected point."""
    projected = random_projection(features, config.projection_dim, config.seed)
    mind = start_distances(projected, config.start_points, config.seed)
    norms = np.einsum("ij,ij->i", projected, projected)
    chosen = []
    for _ in range(max(1, int(len(features) * config.fraction))):
        centre = int(np.argmax(mind))
        chosen.append(centre)
        sq = norms + norms[centre] - 2.0 * (projected @ projected[centre])
        np.minimum(mind, np.sqrt(np.maximum(sq, 0.0)), out=mind)
    return np.array(chosen)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--category", default=str(Path(__file__).resolve().parents[2] / "shared/datasets/mvtec_bottle"))
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--coreset", type=float, default=0.1)
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args()
    paths = train_images(args.category)
    config = BuildConfig(features=FeatureConfig(backbone=args.backbone), coreset=CoresetConfig(fraction=args.coreset))

    started = time.perf_counter()
    bank = build_bank(paths, config, device="cpu", progress=False)
    total = time.perf_counter() - started
    print(f"bank build, {len(paths)} images, {args.backbone}, coreset {args.coreset}: {total:.1f} s "
          f"(features {bank.info['feature_seconds']} s, bank {len(bank.features)} x {bank.features.shape[1]}, "
          f"incl. calibration coreset + scoring)")

    extractor, fc = build_extractor(config.features)
    features = np.concatenate([extractor(preprocess(b, fc.resize, fc.crop))[0].reshape(-1, fc.target_dim).numpy()
                               for b in iter_image_batches(paths, 16)])
    t = time.perf_counter()
    fast = greedy_coreset(features, config.coreset)
    fast_s = time.perf_counter() - t
    projected = random_projection(features, config.coreset.projection_dim, config.coreset.seed)
    print(f"coreset alone ({len(features)} patches -> {len(fast)}): {fast_s:.1f} s, "
          f"coverage radius (projected) {coverage_radius(projected, fast):.4f}")
    if not args.no_baseline:
        t = time.perf_counter()
        plain = plain_coreset(features, config.coreset)
        plain_s = time.perf_counter() - t
        print(f"baseline plain numpy loop: {plain_s:.1f} s, coverage radius {coverage_radius(projected, plain):.4f}, "
              f"same selection: {np.array_equal(fast, plain)} (overlap {len(set(fast) & set(plain)) / len(fast):.4f}), "
              f"speed-up x{plain_s / fast_s:.1f}")


if __name__ == "__main__":
    main()
