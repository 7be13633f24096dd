"""`patchcore eval | score | export`: a bank's accuracy on a labelled set, scores of image files, a torch-free
export (scorer.evaluate, scorer.model, scorer.onnx_export). Loads torch (the options are the scorer's settings), so
everything is imported at the top."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import cv2
import numpy as np
import typer

from scorer import BackboneError, BankError, BuildConfig, ImageDecodeError, load_bank, load_image
from scorer.bank import EnsembleBank, bank_size
from scorer.ensemble import scorer_for
from scorer.evaluate import evaluate, test_samples
from scorer.index import IndexError_
from workers.camera import CameraRegions, thresholds
from workers.settings import WorkerSettings

from ..helptext import Typer
from ..options import field_option
from .bank import (ChannelsLast, Device, Engine, Index, Layers, Precision, Roi, Weights, build_config, build_from_folder,
                   build_options, compute_config, echo_advice, roi_mask)
from .common import Connection, Progress, Search, connection, fail, search_config
from .control import RoiMask, RoiPolygon, camera_settings, sensitivity_options, stored_settings

try:
    from scorer.onnx_export import DEFAULT_OPSET, ExportError, export_onnx
    MISSING_ONNX = None
except ImportError as exc:  # without the [onnx] extra; `export` then says how to install it
    DEFAULT_OPSET, MISSING_ONNX = None, exc

app = Typer()
BatchSize = field_option(BuildConfig, "batch_size")


@app.command("eval")
@build_options
def evaluate_command(
    data: Annotated[Path, typer.Option(help="Category folder in the MVTec AD layout.")],
    bank: Annotated[Optional[Path], typer.Option(help="Evaluate this bank instead of building one from DATA/train/good.")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the report here.")] = None,
    features: dict = None, layers: Layers = None, weights: Weights = WorkerSettings.weights, coreset: dict = None,
    view: dict = None, roi: Roi = None, calibration: dict = None, build: dict = None,
    device: Device = WorkerSettings.device, index: Index = WorkerSettings.index, search: Search = None,
    progress: Progress = True,
    precision: Precision = WorkerSettings.precision, channels_last: ChannelsLast = WorkerSettings.channels_last,
    engine: Engine = WorkerSettings.engine,
) -> None:
    """Image AUROC, pixel AUROC and PRO on a category's test set (builds the bank unless --bank)."""
    compute = compute_config(precision, channels_last, device, engine)
    try:
        test_samples(data)  # the test set's layout, checked before a bank is built for it
    except FileNotFoundError as exc:
        fail(str(exc))
    try:
        if bank is not None:
            loaded, fit_seconds = load_bank(bank), 0.0
        else:
            config = build_config(features, layers, coreset, view, calibration, build)
            started = time.perf_counter()
            loaded = build_from_folder(data / "train" / "good", config, weights, device, progress, roi_mask(roi),
                                       compute)
            fit_seconds = time.perf_counter() - started
        scorer = scorer_for(loaded, device=device, index=index, weights=weights,
                            search=search_config(search, index), compute=compute)
    except (BankError, BackboneError, IndexError_) as exc:
        fail(str(exc))
    echo_advice(loaded)
    try:
        report = evaluate(scorer, data, fit_seconds, build["batch_size"], progress).to_dict()
    except ImageDecodeError as exc:  # metrics over the readable images alone would silently describe another set
        fail(f"a test image cannot be read, so nothing was evaluated: {exc}")
    members = loaded.members if isinstance(loaded, EnsembleBank) else (loaded,)
    report.update(backbone=loaded.backbone if isinstance(loaded, EnsembleBank) else loaded.feature_config.backbone,
                  layers=[list(m.feature_config.layers) for m in members] if len(members) > 1
                  else list(loaded.feature_config.layers),
                  combine=loaded.combine if isinstance(loaded, EnsembleBank) else None,
                  position_norm=None if isinstance(loaded, EnsembleBank) or loaded.position is None
                  else loaded.position.settings(),
                  coreset=members[0].coreset.fraction, seed=members[0].coreset.seed, bank_size=bank_size(loaded),
                  reweight_neighbours=scorer.neighbours, index=scorer.index.kind,
                  device=str(scorer.device), view_choice=loaded.info.get("view_choice"))
    images = report.pop("images")  # per-image scores: in the JSON file, not on the terminal
    typer.echo(json.dumps(report, indent=2))
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps({**report, "images": images}, indent=2) + "\n")


@app.command("score")
@sensitivity_options
@connection
def score_command(
    bank: Annotated[Path, typer.Argument(help="Bank file.")],
    images: Annotated[list[Path], typer.Argument(help="Image files (PNG/JPEG/BMP).")],
    heatmaps: Annotated[Optional[Path], typer.Option(help="Write a heatmap overlay PNG per image into this folder.")] = None,
    weights: Weights = WorkerSettings.weights, device: Device = WorkerSettings.device,
    index: Index = WorkerSettings.index, search: Search = None, batch_size: BatchSize = BuildConfig.batch_size,
    precision: Precision = WorkerSettings.precision, channels_last: ChannelsLast = WorkerSettings.channels_last,
    engine: Engine = WorkerSettings.engine,
    camera: Annotated[Optional[str], typer.Option(help="Apply this camera's stored settings (read from --redis-url); "
                                                       "the sensitivity and ROI options go on top.")] = None,
    sensitivity: dict = None, roi_polygon: RoiPolygon = None, roi_mask: RoiMask = None,
    conn: Connection = None,
) -> None:
    """Score images: one JSON line per image with score, threshold and verdict (`anomalous`; under a camera's settings, as a
    worker applies them, with --camera or the sensitivity and ROI options)."""
    compute = compute_config(precision, channels_last, device, engine)
    if heatmaps is not None:  # said before the bank loads, not after the images are scored
        try:
            heatmaps.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            fail(f"--heatmaps {heatmaps}: {exc.strerror or exc} (a folder to write the overlays into)")
    flags = roi_polygon is not None or roi_mask is not None or any(v is not None for v in sensitivity.values())
    settings = stored_settings(conn, camera) if camera is not None else None  # as stored: its version recorded
    if flags:  # options on top: settings of no stored version (0)
        settings = camera_settings(camera or "offline", settings, sensitivity, roi_polygon, roi_mask)
    try:
        scorer = scorer_for(load_bank(bank), device=device, index=index, weights=weights,
                            search=search_config(search, index), compute=compute)
    except (BankError, BackboneError, IndexError_) as exc:
        fail(str(exc))
    threshold = scorer.threshold if settings is None else settings.effective_threshold(scorer.threshold)
    regions = CameraRegions()
    failed = []
    for begin in range(0, len(images), batch_size):
        batch = images[begin:begin + batch_size]
        lines: list[dict] = [{"image": str(path)} for path in batch]  # printed in input order, errors included
        decoded: dict[int, np.ndarray] = {}
        for i, path in enumerate(batch):
            try:
                decoded[i] = load_image(path)
            except ImageDecodeError as exc:
                failed.append(str(path))
                lines[i]["error"] = str(exc)
        if decoded:
            order, pictures = list(decoded), list(decoded.values())
            result = scorer.score(pictures, maps=heatmaps is not None,
                                  regions=[regions.region(settings, *image.shape[:2]) for image in pictures],
                                  # no heatmaps: no patch distances wanted, the scores need only each maximum
                                  grids_over=None if heatmaps is not None else np.full(len(pictures), np.inf))
            verdicts = scorer.verdict(result.image_scores, thresholds([settings] * len(pictures), scorer.threshold))
            for j, i in enumerate(order):
                score = float(result.image_scores[j])
                line = lines[i]
                line.update(score=round(score, 4), threshold=threshold,
                            anomalous=None if threshold is None else bool(verdicts[j]))
                if settings is not None:
                    line["settings_version"] = settings.version
                if heatmaps is not None:
                    target = heatmaps / f"{begin + i:05d}_{batch[i].stem}_heatmap.png"  # unique even for equal names
                    if not cv2.imwrite(str(target), scorer.overlay(pictures[j], result.maps[j], score, threshold)):
                        fail(f"cannot write the heatmap {target}")
                    line["heatmap"] = str(target)
        for line in lines:
            typer.echo(json.dumps(line))
    if failed:
        typer.secho(f"error: {len(failed)} of {len(images)} images could not be read: {', '.join(failed[:5])}"
                    f"{' ...' if len(failed) > 5 else ''}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)


@app.command("export")
def export_command(
    bank: Annotated[Path, typer.Argument(help="Bank file.")],
    out: Annotated[Path, typer.Option(help="Folder to write the export into.")],
    format: Annotated[str, typer.Option(help="onnx: the feature extractor as ONNX; the search runs outside it.")] = "onnx",
    weights: Weights = WorkerSettings.weights,
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = DEFAULT_OPSET,
) -> None:
    """Export a bank to score without PyTorch: features.onnx, the bank, and patchcore_onnx.py (onnxruntime + numpy)."""
    if format != "onnx":
        fail(f"unknown export format {format!r}; choose onnx")
    if MISSING_ONNX is not None:
        fail(f"{MISSING_ONNX}: install the [onnx] extra (pip install 'patchcore-stream[onnx]')")
    try:
        settings = export_onnx(load_bank(bank), out, weights, opset)
    except (BankError, BackboneError, ExportError) as exc:
        fail(str(exc))
    typer.echo(json.dumps({"out": str(out), "onnx": settings["onnx"], "opset": opset, "bank_size": settings["bank_size"],
                           "max_relative_feature_difference": settings["check_max_relative_feature_difference"]}))
