"""GPU check: the scorer on a CUDA device (features, torch index) against the CPU/FAISS path.

    python bench/gpu_check.py [--data DIR] [--train DIR --test DIR] [--out report.json]

--train / --test default to mvtec_bottle's train/good and test under the data sets (bench/datadir.py).

Builds a mobilenet_v2 bank on the GPU from --train, then on --test images:
- torch-index-on-CUDA distances vs FAISS (CPU) on the same features: max relative difference;
- batch 1 vs batch 32 scores and maps on the GPU;
- images/s at batch 1, 8, 32 (mobilenet_v2 real weights; wide_resnet50_2 with random weights for speed only).
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from scorer import BuildConfig, CoresetConfig, FeatureConfig, MemoryBank, PatchCoreScorer, build_bank
from scorer.index import NearestNeighbourIndex
from scorer.model import build_extractor, iter_image_batches
from scorer.preprocess import list_images, preprocess

from datadir import add_data_argument, category  # bench/datadir.py
from results import write_result  # bench/results.py


def throughput(scorer: PatchCoreScorer, images, batch: int, repeats: int = 3) -> float:
    scorer.score(images[:batch])
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for begin in range(0, len(images), batch):
            scorer.score(images[begin:begin + batch])
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return len(images) / best


def main() -> None:
    parser = argparse.ArgumentParser()
    add_data_argument(parser)
    parser.add_argument("--train", help="good training images (default: mvtec_bottle/train/good)")
    parser.add_argument("--test", help="test images (default: mvtec_bottle/test)")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.train is None or args.test is None:
        bottle = category("mvtec_bottle", args.data)
        args.train = args.train or str(bottle / "train" / "good")
        args.test = args.test or str(bottle / "test")
    assert torch.cuda.is_available(), "no CUDA device"
    report: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    train = list_images(args.train)
    started = time.perf_counter()
    bank = build_bank(train, BuildConfig(features=FeatureConfig(backbone="mobilenet_v2"),
                                         coreset=CoresetConfig(fraction=0.1)), device="cuda", progress=False)
    report["bank_build_s"] = round(time.perf_counter() - started, 2)
    report["bank_size"] = len(bank.features)
    images = [img for b in iter_image_batches(list_images(args.test), 16) for img in b]
    images = (images * (64 // len(images) + 1))[:64]

    gpu = PatchCoreScorer(bank, device="cuda", index="auto", search="exact")  # exact on both: compared below
    report["index_kind_on_cuda"] = gpu.index.kind
    with torch.inference_mode():
        features, _ = gpu.extractor(preprocess(images[:16], 256, 224, "cuda"))
    queries = features.reshape(-1, features.shape[-1])
    d_gpu, i_gpu = gpu.index.search(queries, k=1)
    cpu_index = NearestNeighbourIndex(bank.features, "faiss-cpu", "cpu")
    d_cpu, i_cpu = cpu_index.search(queries.cpu(), k=1)
    report["torch_cuda_vs_faiss_cpu_max_rel_diff"] = float(((d_gpu.cpu() - d_cpu).abs() / d_cpu.clamp_min(1e-6)).max())
    report["torch_cuda_vs_faiss_cpu_same_neighbour"] = float((i_gpu.cpu() == i_cpu).float().mean())

    together = gpu.score(images[:32])
    alone = [gpu.score([img]) for img in images[:32]]
    report["batch1_vs_32_max_abs_score_diff"] = float(max(abs(a.image_scores[0] - together.image_scores[i])
                                                          for i, a in enumerate(alone)))
    report["batch1_vs_32_max_abs_map_diff"] = float(max(np.abs(a.maps[0] - together.maps[i]).max()
                                                        for i, a in enumerate(alone)))
    cpu = PatchCoreScorer(bank, device="cpu", index="faiss-cpu", search="exact")
    cpu_scores = cpu.score(images[:16], maps=False).image_scores
    report["gpu_vs_cpu_max_rel_score_diff"] = float(np.max(np.abs(cpu_scores - together.image_scores[:16]) / cpu_scores))

    for batch in (1, 8, 32):
        report[f"mobilenet_v2_images_per_s_batch{batch}"] = round(throughput(gpu, images, batch), 1)
    extractor, config = build_extractor(FeatureConfig(backbone="wide_resnet50_2"), "random", "cuda")
    wrn_bank = MemoryBank(np.random.default_rng(0).normal(size=(16385, 1024)).astype(np.float32), config,
                          CoresetConfig())
    wrn = PatchCoreScorer(wrn_bank, device="cuda", extractor=extractor)
    for batch in (1, 8, 32):
        report[f"wide_resnet50_2_images_per_s_batch{batch}"] = round(throughput(wrn, images, batch), 1)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        open(args.out, "w").write(text)
    rows = [{"backbone": "mobilenet_v2 (ImageNet weights)",
             **{f"batch_{b}": report[f"mobilenet_v2_images_per_s_batch{b}"] for b in (1, 8, 32)}},
            {"backbone": "wide_resnet50_2 (random weights, speed only, 16 385-entry bank)",
             **{f"batch_{b}": report[f"wide_resnet50_2_images_per_s_batch{b}"] for b in (1, 8, 32)}}]
    write_result("gpu_check", {**report, "rows": rows})


if __name__ == "__main__":
    main()
