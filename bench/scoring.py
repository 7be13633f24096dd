"""Scoring speed and quality of every search option, beside the exact search and a straightforward baseline.

    .venv/bin/python bench/scoring.py [--data DIR] --bank BOTTLE_BANK --category mvtec_bottle \
        [--bank MACARONI_BANK --category visa_macaroni1]

(--category: a data set folder, or its name under the data sets: --data, $PATCHCORE_DATA, ../shared/datasets)

Per category, in one run: image AUROC, pixel AUROC, PRO and end-to-end images/s (batch 16, maps included) of
every option; the search alone (ms per image, fastest of 3 runs over the features of 16 test images), how often it picks the exact
search's neighbour, and the largest image-score change against exact. Options: exact flat search (FAISS),
subspace (full rank = exact ranking; fewer principal directions + shortlist), half (16-bit product +
shortlist), FAISS IVF-Flat and HNSW (+ shortlist), and a 10x smaller coreset of the bank (exact search).
Baseline: one image at a time, brute-force torch.cdist nearest neighbours, scipy Gaussian on the CPU (the
shape of the reference implementation's scoring loop). Also the feature pooling: one convolution per layer
against the official unfold + adaptive_avg_pool1d path, and the torch-free scorer (`patchcore export --format onnx`:
the extractor in ONNX Runtime, the exact search in FAISS) end to end.
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from scorer import PatchCoreScorer, SearchConfig, load_bank
from scorer.coreset import select_coreset
from scorer.evaluate import evaluate, test_samples
from scorer.features import unfolded_pooling
from scorer.model import iter_image_batches
from scorer.preprocess import preprocess

from datadir import add_data_argument, category as data_set  # bench/datadir.py
from results import write_result  # bench/results.py

OPTIONS = [  # (label, search settings, bank fraction kept)
    ("exact", SearchConfig("exact"), 1.0),
    ("subspace full rank", SearchConfig("subspace", dims=0, shortlist=1), 1.0),
    ("subspace 256, shortlist 8", SearchConfig("subspace", dims=256, shortlist=8), 1.0),
    ("subspace 128, shortlist 8", SearchConfig("subspace", dims=128, shortlist=8), 1.0),
    ("half (bf16 on CPU), shortlist 16", SearchConfig("half", shortlist=16), 1.0),
    ("ivf full rank, 16 probes, shortlist 16", SearchConfig("ivf", dims=0, shortlist=16), 1.0),
    ("ivf 256 dims, 32 probes, shortlist 8", SearchConfig("ivf", dims=256, ivf_probes=32, shortlist=8), 1.0),
    ("ivf 128 dims, 16 probes, shortlist 8", SearchConfig("ivf", dims=128, ivf_probes=16, shortlist=8), 1.0),
    ("ivf 128 dims, 8 probes, shortlist 8", SearchConfig("ivf", dims=128, ivf_probes=8, shortlist=8), 1.0),
    ("hnsw 128 dims, ef 64, shortlist 8", SearchConfig("hnsw", dims=128, hnsw_ef=64, shortlist=8), 1.0),
    ("coreset 1/10 of the bank, exact", SearchConfig("exact"), 0.1),
]


def baseline(scorer: PatchCoreScorer, images) -> float:
    bank = torch.from_numpy(scorer.bank.features)
    started = time.perf_counter()
    for image in images:
        batch = preprocess([image], scorer.view.resize, scorer.view.crop)  # the crop view
        features, grid = scorer.extractor(batch)
        distances = torch.cdist(features[0], bank).min(dim=1).values
        up = F.interpolate(distances.reshape(1, 1, *grid), size=(224, 224), mode="bilinear", align_corners=False)
        ndimage.gaussian_filter(up[0, 0].numpy(), sigma=4)
        float(distances.max())
    return len(images) / (time.perf_counter() - started)


def fastest(run, repeats: int = 3) -> tuple[float, object]:
    """(seconds of the fastest of `repeats` calls after a warm-up, the result)."""
    result = run()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - started)
    return best, result


def pooling(scorer: PatchCoreScorer, images) -> tuple[float, float, float]:
    """(ms per image of the pooling (gathers or convolution), of the official path, their largest relative difference)
    at batch 16, both in torch (the extractor's torch path, whatever engine the scorer runs)."""
    extractor = scorer.extractor
    batch = preprocess(images[:16], scorer.view.resize, scorer.view.crop)
    with torch.inference_mode():
        backbone, taps = fastest(lambda: extractor.body(batch))
        maps = [taps[layer] for layer in extractor.layers]
        whole, features = fastest(lambda: extractor.patch_features(batch)[0])  # backbone + pooling, in torch
        official, expected = fastest(lambda: unfolded_pooling(maps, extractor.patch_size, extractor.pretrain_dim,
                                                              extractor.target_dim))
    difference = float((features - expected).abs().max() / expected.abs().max())
    return (whole - backbone) * 1000 / len(batch), official * 1000 / len(batch), difference


def smaller_bank(bank, fraction: float):
    chosen = select_coreset(bank.features, replace(bank.coreset, fraction=fraction))
    return replace(bank, features=np.ascontiguousarray(bank.features[np.sort(chosen.indices)]))


def onnx_row(bank, samples, images) -> tuple[float, float, float, float]:
    """The exported extractor in ONNX Runtime + the export's exact FAISS search (torch-free scorer), end to end."""
    import tempfile

    from scorer.evaluate import load_masks
    from scorer.metrics import image_auroc, pixel_auroc, pro_score
    from scorer.onnx_export import export_onnx
    from scorer.onnx_runtime import OnnxScorer

    with tempfile.TemporaryDirectory() as folder:
        export_onnx(bank, folder)
        scorer = OnnxScorer(folder)
        scorer.score(images[:2])  # warm-up
        scores, maps = [], []
        started = time.perf_counter()
        for begin in range(0, len(images), 16):
            batch_scores, batch_maps = scorer.score(images[begin:begin + 16])
            scores.append(batch_scores)
            maps.extend(batch_maps)
        rate = len(images) / (time.perf_counter() - started)
    labels = np.array([s.is_anomalous for s in samples])
    masks = load_masks(samples, [image.shape[:2] for image in images], bank.view)
    return image_auroc(labels, np.concatenate(scores)), pixel_auroc(masks, maps), pro_score(masks, maps), rate


def run_category(bank_path: str, category: str) -> dict:
    """Every option on one bank and data set; prints the table and returns its figures (bench/results.py)."""
    bank = load_bank(bank_path)
    if bank.view.kind != "crop":
        raise SystemExit(f"bench/scoring.py compares the crop view's paths; this bank's view is {bank.view.describe()}")
    samples = test_samples(category)
    images = [img for b in iter_image_batches([s.path for s in samples], 16) for img in b]
    exact = PatchCoreScorer(bank, device="cpu", index="faiss-cpu", search=SearchConfig("exact"))
    with torch.inference_mode():
        probe = exact.extractor(preprocess(images[:16], bank.view.resize, bank.view.crop))[0].reshape(-1, bank.features.shape[1])
    _, exact_nearest = exact.index.search(probe)
    print(f"\n{category}: bank {len(bank.features)} x {bank.features.shape[1]} ({bank.feature_config.backbone}, "
          f"{bank.view.describe()}), {len(images)} test images")
    conv_ms, unfold_ms, difference = pooling(exact, images)
    print(f"  feature pooling, batch 16: gathers or one convolution per layer {conv_ms:.1f} ms/image, official unfold + "
          f"adaptive_avg_pool1d {unfold_ms:.1f} ms/image (x{unfold_ms / conv_ms:.1f}), largest relative difference {difference:.1e}")
    print(f"  {'option':46s} {'build s':>7s} {'search ms/img':>13s} {'x exact':>7s} {'same NN':>7s} {'img/s':>6s} "
          f"{'x exact':>7s} {'image AUROC':>11s} {'pixel AUROC':>11s} {'PRO':>6s}")
    reference, rows = None, []
    for label, search, fraction in OPTIONS:
        started = time.perf_counter()
        option_bank = bank if fraction == 1.0 else smaller_bank(bank, fraction)
        scorer = PatchCoreScorer(option_bank, device="cpu", index="auto", search=search, extractor=exact.extractor)
        build = time.perf_counter() - started
        seconds, (_, nearest) = fastest(lambda: scorer.index.search(probe))
        search_ms = seconds * 1000 * 784 / len(probe)
        same = float((nearest == exact_nearest).float().mean()) if fraction == 1.0 else float("nan")
        report = evaluate(scorer, category, 0.0, 16, progress=False, images=images)
        if reference is None:
            reference = (search_ms, report)
        row = (f"  {label:46s} {build:7.1f} {search_ms:13.1f} {reference[0] / search_ms:7.1f} {same:7.4f} "
               f"{report.images_per_second:6.2f} {report.images_per_second / reference[1].images_per_second:7.2f} "
               f"{report.image_auroc:11.4f} {report.pixel_auroc:11.4f} {report.pro:6.4f}")
        print(row, flush=True)
        rows.append({"option": label, "build_s": round(build, 1), "search_ms_per_image": round(search_ms, 1),
                     "x_exact_search": round(reference[0] / search_ms, 1),
                     "same_nn": None if fraction != 1.0 else round(same, 4),
                     "images_per_s": round(report.images_per_second, 2),
                     "x_exact_images_per_s": round(report.images_per_second / reference[1].images_per_second, 2),
                     "image_auroc": round(report.image_auroc, 4), "pixel_auroc": round(report.pixel_auroc, 4),
                     "pro": round(report.pro, 4)})
    onnx_auroc, onnx_pixel, onnx_pro, rate = onnx_row(bank, samples, images)
    print(f"  {'ONNX Runtime extractor + exact FAISS (no torch)':46s} {'':7s} {'':13s} {'':7s} {'':7s} "
          f"{rate:6.2f} {rate / reference[1].images_per_second:7.2f} "
          f"{onnx_auroc:11.4f} {onnx_pixel:11.4f} {onnx_pro:6.4f}", flush=True)
    rows.append({"option": "ONNX Runtime extractor + exact FAISS (no torch)", "images_per_s": round(rate, 2),
                 "x_exact_images_per_s": round(rate / reference[1].images_per_second, 2),
                 "image_auroc": round(onnx_auroc, 4), "pixel_auroc": round(onnx_pixel, 4), "pro": round(onnx_pro, 4)})
    base_rate = baseline(exact, images[:16])
    print(f"  {'baseline (per image, cdist, scipy; 16 images)':46s} {'':7s} {'':13s} {'':7s} {'':7s} "
          f"{base_rate:6.2f}", flush=True)
    rows.append({"option": "baseline: one image at a time, torch.cdist, scipy Gaussian (16 images)",
                 "images_per_s": round(base_rate, 2),
                 "x_exact_images_per_s": round(base_rate / reference[1].images_per_second, 2)})
    return {"category": Path(category).name, "bank": f"{len(bank.features)} x {bank.features.shape[1]}",
            "backbone": bank.feature_config.backbone, "view": bank.view.describe(), "test_images": len(images),
            "pooling_ms_per_image": {"convolution": round(conv_ms, 1), "official_unfold": round(unfold_ms, 1),
                                     "largest_relative_difference": difference},
            "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bank", action="append", required=True, help="a bank, paired with the --category at the same position")
    parser.add_argument("--category", action="append", required=True,
                        help="a data set folder, or its name under --data (mvtec_bottle, visa_macaroni1)")
    add_data_argument(parser)
    args = parser.parse_args()
    if len(args.bank) != len(args.category):
        parser.error("give one --category per --bank")
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.machine()) if os.path.exists("/proc/cpuinfo") else platform.machine()
    print(f"{model}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, torch {torch.__version__}")
    categories = [run_category(bank, str(data_set(category, args.data)))
                  for bank, category in zip(args.bank, args.category)]
    write_result("scoring", {"torch_threads": torch.get_num_threads(), "categories": categories})


if __name__ == "__main__":
    main()
