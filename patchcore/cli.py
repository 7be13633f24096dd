"""`patchcore`: the operator CLI (Typer)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from .logs import setup_logging

app = typer.Typer(help="PatchCore visual inspection: banks, evaluation, and the streaming service.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
bank_app = typer.Typer(help="Build, inspect, publish, activate and roll back memory banks.", no_args_is_help=True)
app.add_typer(bank_app, name="bank")

# Options shared by the commands that build a bank.
Backbone = Annotated[str, typer.Option(help="wide_resnet50_2 (paper), resnet18, resnet50 or mobilenet_v2.")]
Layers = Annotated[Optional[str], typer.Option(help="Comma-separated taps; default: the backbone's (layer2,layer3 / features.6,features.13).")]
Weights = Annotated[Optional[str], typer.Option(help="Local state-dict file; default: torchvision's ImageNet file in the torch hub cache. 'random' only for tests.")]
Coreset = Annotated[float, typer.Option(help="Coreset fraction of all training patches (0.01-0.25 typical).")]
Seed = Annotated[int, typer.Option(help="Seed of the coreset and the calibration split.")]
Resize = Annotated[int, typer.Option(help="Shorter side after resizing, pixels.")]
Crop = Annotated[int, typer.Option(help="Centre-crop size, pixels.")]
CalibrationFraction = Annotated[float, typer.Option(help="Share of good images held back to calibrate the threshold (0: no threshold).")]
Sigmas = Annotated[float, typer.Option(help="Threshold = mean + SIGMAS x std of held-back good scores.")]
Neighbours = Annotated[int, typer.Option(help="b of the paper's Eq. 7 reweighting; 1 = plain max patch score.")]
BatchSize = Annotated[int, typer.Option(help="Images per backbone pass.")]
Device = Annotated[str, typer.Option(help="auto (CUDA when present), cpu, cuda, cuda:N.")]
Index = Annotated[str, typer.Option(help="auto, faiss-cpu, faiss-gpu or torch.")]
Progress = Annotated[bool, typer.Option(help="Show progress bars.")]
LogLevel = Annotated[str, typer.Option(help="debug, info, warning, error.")]


@app.callback()
def main(log_level: LogLevel = "warning") -> None:
    setup_logging(log_level)


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _build_config(backbone: str, layers: Optional[str], coreset: float, seed: int, resize: int, crop: int,
                  calibration_fraction: float, sigmas: float, neighbours: int, batch_size: int):
    from scorer import BuildConfig, CoresetConfig, FeatureConfig

    if not 0 < coreset <= 1:
        _fail("--coreset must be in (0, 1]")
    if crop > resize:
        _fail("--crop must not exceed --resize")
    taps = tuple(t.strip() for t in layers.split(",") if t.strip()) if layers else ()
    return BuildConfig(
        features=FeatureConfig(backbone=backbone, layers=taps, resize=resize, crop=crop),
        coreset=CoresetConfig(fraction=coreset, seed=seed),
        calibration_fraction=calibration_fraction, calibration_sigmas=sigmas,
        reweight_neighbours=neighbours, batch_size=batch_size,
    )


def _build(train: Path, config, weights: Optional[str], device: str, progress: bool):
    from scorer import BackboneError, build_bank
    from scorer.preprocess import list_images

    if not train.is_dir():
        _fail(f"training folder {train} does not exist")
    paths = list_images(train)
    if not paths:
        _fail(f"no PNG/JPEG/BMP images in {train}")
    try:
        return build_bank(paths, config, weights, device, progress)
    except BackboneError as exc:
        _fail(str(exc))


@bank_app.command("build")
def bank_build(
    train: Annotated[Path, typer.Option(help="Folder of good images (e.g. MVTec train/good).")],
    out: Annotated[Path, typer.Option(help="Bank file to write (.bank, safetensors).")],
    backbone: Backbone = "wide_resnet50_2", layers: Layers = None, weights: Weights = None,
    coreset: Coreset = 0.1, seed: Seed = 0, resize: Resize = 256, crop: Crop = 224,
    calibration_fraction: CalibrationFraction = 0.1, sigmas: Sigmas = 3.0, neighbours: Neighbours = 9,
    batch_size: BatchSize = 16, device: Device = "auto", progress: Progress = True,
) -> None:
    """Build a memory bank from good images (features, coreset, threshold calibration)."""
    from scorer import save_bank
    from scorer.evaluate import bank_summary

    config = _build_config(backbone, layers, coreset, seed, resize, crop, calibration_fraction, sigmas,
                           neighbours, batch_size)
    bank = _build(train, config, weights, device, progress)
    save_bank(bank, out)
    typer.echo(json.dumps({"bank": str(out), **bank_summary(bank)}, indent=2))


@bank_app.command("info")
def bank_info(bank: Annotated[Path, typer.Argument(help="Bank file.")]) -> None:
    """Print a bank's settings, size and calibration."""
    from scorer import BankError, load_bank
    from scorer.evaluate import bank_summary

    try:
        typer.echo(json.dumps(bank_summary(load_bank(bank)), indent=2))
    except BankError as exc:
        _fail(str(exc))


@bank_app.command("calibrate")
def bank_calibrate(
    bank: Annotated[Path, typer.Argument(help="Bank file to calibrate.")],
    data: Annotated[Path, typer.Option(help="Labelled images in the MVTec layout (test/good, test/<defect>).")],
    out: Annotated[Optional[Path], typer.Option(help="Write here instead of overwriting BANK.")] = None,
    weights: Weights = None, device: Device = "auto", index: Index = "auto", progress: Progress = True,
) -> None:
    """Set the F1-optimal threshold from labelled validation images (keeps the good-only statistics)."""
    from scorer import BankError, Calibration, PatchCoreScorer, load_bank, save_bank
    from scorer.evaluate import labelled_scores
    from scorer.metrics import f1_optimal_threshold

    try:
        loaded = load_bank(bank)
        scorer = PatchCoreScorer(loaded, device=device, index=index, weights=weights)
    except BankError as exc:
        _fail(str(exc))
    labels, scores = labelled_scores(scorer, data, progress=progress)
    if labels.all() or not labels.any():
        _fail("F1 calibration needs both good and defective images")
    threshold, f1 = f1_optimal_threshold(labels, scores)
    previous = loaded.calibration
    calibration = Calibration(threshold=threshold, method="f1", f1=f1,
                              good_scores=previous.good_scores if previous else (),
                              sigmas=previous.sigmas if previous else 3.0)
    save_bank(loaded.with_calibration(calibration), out or bank)
    typer.echo(json.dumps({"bank": str(out or bank), "threshold": threshold, "f1": f1,
                           "previous_threshold": previous.threshold if previous else None}, indent=2))


@app.command("eval")
def evaluate_command(
    data: Annotated[Path, typer.Option(help="Category folder in the MVTec AD layout.")],
    bank: Annotated[Optional[Path], typer.Option(help="Evaluate this bank instead of building one from DATA/train/good.")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the report here.")] = None,
    backbone: Backbone = "wide_resnet50_2", layers: Layers = None, weights: Weights = None,
    coreset: Coreset = 0.1, seed: Seed = 0, resize: Resize = 256, crop: Crop = 224,
    calibration_fraction: CalibrationFraction = 0.1, sigmas: Sigmas = 3.0, neighbours: Neighbours = 9,
    batch_size: BatchSize = 16, device: Device = "auto", index: Index = "auto", progress: Progress = True,
) -> None:
    """Image AUROC, pixel AUROC and PRO on a category's test set (builds the bank unless --bank)."""
    from scorer import BankError, PatchCoreScorer, load_bank
    from scorer.evaluate import evaluate

    try:
        if bank is not None:
            loaded, fit_seconds = load_bank(bank), 0.0
        else:
            config = _build_config(backbone, layers, coreset, seed, resize, crop, calibration_fraction, sigmas,
                                   neighbours, batch_size)
            started = time.perf_counter()
            loaded = _build(data / "train" / "good", config, weights, device, progress)
            fit_seconds = time.perf_counter() - started
        scorer = PatchCoreScorer(loaded, device=device, index=index, weights=weights)
    except BankError as exc:
        _fail(str(exc))
    report = evaluate(scorer, data, fit_seconds, batch_size, progress).to_dict()
    report.update(backbone=loaded.feature_config.backbone, layers=list(loaded.feature_config.layers),
                  coreset=loaded.coreset.fraction, seed=loaded.coreset.seed, bank_size=int(len(loaded.features)),
                  reweight_neighbours=scorer.neighbours, index=scorer.index.kind, device=str(scorer.device))
    text = json.dumps(report, indent=2)
    typer.echo(text)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(text + "\n")


@app.command("score")
def score_command(
    bank: Annotated[Path, typer.Argument(help="Bank file.")],
    images: Annotated[list[Path], typer.Argument(help="Image files (PNG/JPEG/BMP).")],
    heatmaps: Annotated[Optional[Path], typer.Option(help="Write a heatmap overlay PNG per image into this folder.")] = None,
    weights: Weights = None, device: Device = "auto", index: Index = "auto", batch_size: BatchSize = 16,
) -> None:
    """Score images: one JSON line per image with score, threshold and verdict."""
    from scorer import BankError, ImageDecodeError, PatchCoreScorer, load_bank, load_image
    from scorer.overlay import heatmap_overlay
    from scorer.preprocess import display_image

    try:
        scorer = PatchCoreScorer(load_bank(bank), device=device, index=index, weights=weights)
    except BankError as exc:
        _fail(str(exc))
    threshold = scorer.threshold
    failed = 0
    for begin in range(0, len(images), batch_size):
        paths, decoded = [], []
        for path in images[begin:begin + batch_size]:
            try:
                decoded.append(load_image(path))
                paths.append(path)
            except ImageDecodeError as exc:
                failed += 1
                typer.echo(json.dumps({"image": str(path), "error": str(exc)}))
        if not decoded:
            continue
        result = scorer.score(decoded, maps=heatmaps is not None)
        for i, path in enumerate(paths):
            score = float(result.image_scores[i])
            line = {"image": str(path), "score": round(score, 4), "threshold": threshold,
                    "anomalous": None if threshold is None else score >= threshold}
            if heatmaps is not None:
                import cv2

                heatmaps.mkdir(parents=True, exist_ok=True)
                crop = display_image(decoded[i], scorer.config.resize, scorer.config.crop)
                target = heatmaps / f"{begin + i:05d}_{path.stem}_heatmap.png"  # unique even for equal names
                cv2.imwrite(str(target), heatmap_overlay(crop, result.maps[i], threshold))
                line["heatmap"] = str(target)
            typer.echo(json.dumps(line))
    if failed:
        raise typer.Exit(1)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
