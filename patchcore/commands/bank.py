"""`patchcore bank build | info | calibrate | threshold | update`: banks from images (scorer), and a published bank extended
(patchcore.bank_update). The build options are the scorer's settings (scorer.config, views, calibration), so
this module loads torch, and imports everything at the top."""
from __future__ import annotations

import json
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

import cv2
import typer

from contracts.framecodec import FrameCodecError
from ingest.sources import SourceError
from scorer import (BackboneError, BankError, BuildConfig, Calibration, CalibrationConfig, CoresetConfig,
                    FeatureConfig, ImageDecodeError, ViewConfig, ViewError, build_bank, load_bank,
                    save_bank)
from scorer.evaluate import bank_summary, labelled_scores
from scorer.metrics import f1_optimal_threshold
from scorer.preprocess import list_images
from scorer.backbones import BACKBONES, resolve_backbone
from scorer.bank import MemoryBank, check_bank_path, view_notice
from scorer.config import AUTO_BACKBONE, FINE_CORESET_SCALE, FINE_TAPS
from scorer.ensemble import ensemble_of, scorer_for
from scorer.features import ComputeConfig, ComputeError
from scorer.model import resolve_device
from workers.banks.registry import RegistryError
from workers.banks.updates import UpdateError
from workers.settings import WorkerSettings

from ..bank_update import update_published_bank
from ..helptext import Typer
from ..options import field_option, settings_options
from ..up import UpSettings, warmup_images
from .common import Connection, Progress, connection, fail

app = Typer()  # the commands of `patchcore bank` defined here (patchcore/cli.py makes the group)

DEFAULT_TAPS = "; ".join(f"{name} {','.join(spec.default_layers)}" for name, spec in BACKBONES.items())
Layers = Annotated[Optional[str], typer.Option(help=(
    f"Comma-separated taps; default: the backbone's ({DEFAULT_TAPS}). `{FINE_TAPS}`: the backbone's finer taps "
    f"(the stride-4 stage's end as well, a 4x finer grid) with {FINE_CORESET_SCALE:g} x --coreset (the same bank "
    "size), for defects of a few pixels: half the images/s, and worse where defects are large (docs/scorer.md)."))]
Roi = Annotated[Optional[Path], typer.Option(help="Region-of-interest mask image (white = inspect), any resolution, stretched over the frame.")]
Device = field_option(WorkerSettings, "device")
Index = field_option(WorkerSettings, "index")
Weights = field_option(WorkerSettings, "weights")
Precision = field_option(WorkerSettings, "precision")
ChannelsLast = field_option(WorkerSettings, "channels_last")
Engine = field_option(WorkerSettings, "engine")
Combine = field_option(BuildConfig, "combine")
GOOD_ONLY_REFIT = "good-only-gumbel"  # `bank threshold` of a bank whose threshold was F1-optimal: the build's method is gone


def compute_config(precision: str, channels_last: Optional[bool], device: str,
                   engine: str = WorkerSettings.engine) -> ComputeConfig:
    """The backbone's compute settings resolved for the device (refused here, clearly: ComputeError)."""
    try:
        return ComputeConfig(precision, channels_last, engine).resolve(resolve_device(device))
    except ComputeError as exc:
        fail(str(exc))


def build_options(command):
    """The options of a bank build (`bank build`, `eval`), each a field of the scorer's BuildConfig: the command
    gets `features`, `coreset`, `view`, `calibration` and `build` (dicts of field values) and `layers`."""
    for decorate in (settings_options(FeatureConfig, "backbone", into="features"),
                     settings_options(CoresetConfig, "fraction", "seed", into="coreset", rename={"fraction": "coreset"}),
                     settings_options(ViewConfig, "kind", "resize", "crop", "size", "scale", "tile", "overlap",
                                      into="view", rename={"kind": "view"}),
                     settings_options(CalibrationConfig, "folds", "contiguous", "false_alarm_rate", "confidence",
                                      into="calibration"),
                     settings_options(BuildConfig, "reweight_neighbours", "batch_size", "combine", "position_norm",
                                      into="build", rename={"reweight_neighbours": "neighbours"})):
        command = decorate(command)
    return command


def build_config(features: dict, layers: Optional[str], coreset: dict, view: dict, calibration: dict,
                 build: dict) -> BuildConfig:
    """The BuildConfig of a build's options; a value out of range is a clear error."""
    if not 0 < coreset["fraction"] <= 1:
        fail("--coreset must be in (0, 1]")
    taps = tuple(t.strip() for t in layers.split(",") if t.strip()) if layers else ()
    try:
        return BuildConfig(features=FeatureConfig(**features, layers=taps), view=ViewConfig(**view),
                           coreset=CoresetConfig(**coreset), calibration=CalibrationConfig(**calibration), **build)
    except (ViewError, ValueError) as exc:
        fail(str(exc))


def roi_mask(path: Optional[Path]):
    """The region-of-interest mask as booleans (white = inspect), or None."""
    if path is None:
        return None
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        fail(f"cannot read the region-of-interest mask {path}")
    if not (mask > 0).any():
        fail(f"the region-of-interest mask {path} is empty (no white pixels)")
    return mask > 0


def build_from_folder(train: Path, config: BuildConfig, weights: Optional[str], device: str, progress: bool, roi=None,
                      compute: Optional[ComputeConfig] = None):
    if not train.is_dir():
        fail(f"training folder {train} does not exist")
    paths = list_images(train)
    if not paths:
        fail(f"no PNG/JPEG/BMP images in {train}")
    try:
        echo_backbone(config.features.backbone, weights)
        bank = build_bank(paths, config, weights, device, progress, roi=roi,
                          compute=compute or compute_config(WorkerSettings.precision, WorkerSettings.channels_last, device))
    except (BackboneError, ValueError) as exc:
        fail(str(exc))
    echo_view(bank)
    return bank


def echo_view(bank) -> None:
    """Say on stderr when "auto" chose another view than the paper's crop for the training frames
    (ViewConfig.resolve), and why (the bank's info keeps the reason either way)."""
    notice = view_notice(bank)
    if notice:
        typer.echo(notice, err=True)


def echo_advice(bank) -> None:
    """What an operator should know about a bank's threshold (Calibration.advice), on stderr: `threshold: ...`."""
    for sentence in bank.calibration.advice() if bank.calibration else ():
        typer.echo(f"threshold: {sentence}", err=True)


def echo_backbone(name: str, weights: Optional[str]) -> None:
    """Say on stderr which backbone "auto" stands for (scorer.backbones.resolve_backbone) and why."""
    if name == AUTO_BACKBONE:
        choice = resolve_backbone(name, weights)
        typer.echo(f"backbone: {choice.name} ({choice.reason})", err=True)


@app.command("build")
@build_options
def bank_build(
    out: Annotated[Path, typer.Option(help="Bank file to write (.bank, safetensors).")],
    train: Annotated[Optional[Path], typer.Option(help="Folder of good images (e.g. MVTec train/good).")] = None,
    warmup_source: Annotated[Optional[str], typer.Option(
        help="Instead of --train: the first --warmup-frames frames of this ingest source (the synthetic line renders "
             "defect-free parts).")] = None,
    warmup_frames: Annotated[int, typer.Option(help="Frames taken from --warmup-source.")] = UpSettings.warmup_frames,
    features: dict = None, layers: Layers = None, weights: Weights = WorkerSettings.weights, coreset: dict = None,
    view: dict = None, roi: Roi = None, calibration: dict = None, build: dict = None,
    device: Device = WorkerSettings.device, progress: Progress = True,
    precision: Precision = WorkerSettings.precision, channels_last: ChannelsLast = WorkerSettings.channels_last,
    engine: Engine = WorkerSettings.engine,
) -> None:
    """Build a memory bank from good images (features, coreset, threshold calibration)."""
    compute = compute_config(precision, channels_last, device, engine)
    bank_out(out)
    if warmup_source is not None:  # frames of a line: near-twins, so contiguous folds
        calibration = {**calibration, "contiguous": True}
    config = build_config(features, layers, coreset, view, calibration, build)
    if (train is None) == (warmup_source is None):
        fail("give either --train or --warmup-source")
    if warmup_source is not None:
        with tempfile.TemporaryDirectory(prefix="patchcore-warmup-") as folder:
            try:
                warmup_images(warmup_source, warmup_frames, Path(folder))
            except SourceError as exc:
                fail(str(exc))
            bank = build_from_folder(Path(folder), config, weights, device, progress, roi_mask(roi), compute)
    else:
        bank = build_from_folder(train, config, weights, device, progress, roi_mask(roi), compute)
    write_bank(bank, out)
    echo_advice(bank)
    typer.echo(json.dumps({"bank": str(out), **bank_summary(bank)}, indent=2))


def bank_out(path: Path) -> None:
    """Exit 2 saying why unless a bank can be written at `path` (said before any work)."""
    try:
        check_bank_path(path)
    except BankError as exc:
        fail(str(exc))


def write_bank(bank, path: Path) -> None:
    """save_bank, its failure one line (exit 2) instead of a traceback."""
    try:
        save_bank(bank, path)
    except BankError as exc:
        fail(str(exc))


@app.command("combine")
def bank_combine(
    members: Annotated[list[Path], typer.Argument(help="Bank files, one per backbone, built from the same training "
                                                       "images with the same view and settings.")],
    out: Annotated[Path, typer.Option(help="Ensemble bank file to write.")],
    combine: Combine = BuildConfig.combine,
) -> None:
    """An ensemble bank from member banks built separately (as `bank build --backbone a+b` would make it)."""
    bank_out(out)
    try:
        banks = [load_bank(path) for path in members]
        if not all(isinstance(bank, MemoryBank) for bank in banks):
            fail("every member must be a single-backbone bank")
        info = {"n_train_images": banks[0].info.get("n_train_images"),
                "build_seconds": round(sum(float(b.info.get("build_seconds", 0.0)) for b in banks), 2),
                "combined_from": [str(path) for path in members]}
        bank = ensemble_of(banks, combine, info)
    except (BankError, ValueError) as exc:
        fail(str(exc))
    write_bank(bank, out)
    typer.echo(json.dumps({"bank": str(out), **bank_summary(bank)}, indent=2))


@app.command("info")
def bank_info(bank: Annotated[Path, typer.Argument(help="Bank file.")]) -> None:
    """Print a bank's settings, size and calibration."""
    try:
        typer.echo(json.dumps(bank_summary(load_bank(bank)), indent=2))
    except BankError as exc:
        fail(str(exc))


@app.command("calibrate")
def bank_calibrate(
    bank: Annotated[Path, typer.Argument(help="Bank file to calibrate.")],
    data: Annotated[Path, typer.Option(help="Labelled images in the MVTec layout (test/good, test/<defect>).")],
    out: Annotated[Optional[Path], typer.Option(help="Write here instead of overwriting BANK.")] = None,
    weights: Weights = WorkerSettings.weights, device: Device = WorkerSettings.device,
    index: Index = WorkerSettings.index, progress: Progress = True,
) -> None:
    """Set the F1-optimal threshold from labelled validation images (keeps the good-only statistics)."""
    if out is not None:  # said before the images are scored (BANK itself is checked by reading it)
        bank_out(out)
    try:
        loaded = load_bank(bank)
        scorer = scorer_for(loaded, device=device, index=index, weights=weights)
    except BankError as exc:
        fail(str(exc))
    labels, scores = labelled_scores(scorer, data, progress=progress)
    if labels.all() or not labels.any():
        fail("F1 calibration needs both good and defective images")
    threshold, f1 = f1_optimal_threshold(labels, scores)
    previous = loaded.calibration
    calibration = Calibration(threshold=threshold, method="f1", f1=f1,
                              good_scores=previous.good_scores if previous else (),
                              folds=previous.folds if previous else None)
    write_bank(loaded.with_calibration(calibration), out or bank)
    typer.echo(json.dumps({"bank": str(out or bank), "threshold": threshold, "f1": f1,
                           "previous_threshold": previous.threshold if previous else None}, indent=2))


@app.command("threshold")
def bank_threshold(
    bank: Annotated[Path, typer.Argument(help="Bank file whose good-only threshold to refit.")],
    false_alarm_rate: Annotated[Optional[float], typer.Option(
        help="Target share of good images at or over the threshold (default: the bank's).")] = None,
    confidence: Annotated[Optional[float], typer.Option(
        help="How sure the threshold is to hold the rate, in [0.5, 1): 0.5 = as likely over as under, 0.9 = at or "
             "under it in 9 of 10 training sets (default: the bank's; for an F1 threshold the build's default).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Write here instead of overwriting BANK.")] = None,
) -> None:
    """Refit the good-only threshold from the good scores the bank stores, at another false-alarm rate or
    confidence: seconds, no images, no rebuild (the scores do not depend on either)."""
    try:
        loaded = load_bank(bank)
    except BankError as exc:
        fail(str(exc))
    previous = loaded.calibration
    if previous is None or len(previous.good_scores) < 5:
        fail(f"{bank} stores no good scores to fit a threshold to (built with --folds 0?): rebuild it with calibration")
    rate = false_alarm_rate if false_alarm_rate is not None else previous.false_alarm_rate
    if rate is None:
        fail(f"{bank}'s threshold ({previous.method}) has no target false-alarm rate: give --false-alarm-rate for a "
             f"good-only one")
    if confidence is not None:
        level = confidence
    elif previous.false_alarm_rate is None:  # an F1 threshold has no confidence to keep: the build's default
        level = CalibrationConfig().confidence
    else:
        level = previous.confidence  # None (good-only banks from before confidences): the plug-in quantile
    try:
        CalibrationConfig(false_alarm_rate=rate, **({} if level is None else {"confidence": level}))  # range checks
        method = previous.method if previous.false_alarm_rate is not None else GOOD_ONLY_REFIT
        calibration = Calibration.fitted(previous.good_scores, rate, method, previous.folds, level)
    except ValueError as exc:
        fail(str(exc))
    refitted = loaded.with_calibration(calibration)
    write_bank(refitted, out or bank)
    echo_advice(refitted)
    typer.echo(json.dumps({"bank": str(out or bank), "threshold": calibration.threshold,
                           "false_alarm_rate": rate, "confidence": level,
                           "rate_interval": list(calibration.rate_interval),
                           "previous_threshold": previous.threshold}, indent=2))


@app.command("update")
@connection
def bank_update(
    name: Annotated[str, typer.Argument(help="Bank name in the registry; its active version is extended.")],
    images: Annotated[Optional[list[Path]], typer.Option("--image", help="A good image file to add (repeatable).")] = None,
    frames: Annotated[Optional[list[str]], typer.Option("--frame", help="A stored anomalous frame CAMERA:SEQ to add as good (repeatable).")] = None,
    queue: Annotated[bool, typer.Option(help="Also take the frames queued by `patchcore alarm dismiss`.")] = True,
    activate: Annotated[bool, typer.Option(help="Activate the new version at once.")] = True,
    weights: Weights = WorkerSettings.weights, device: Device = WorkerSettings.device, progress: Progress = False,
    conn: Connection = None,
) -> None:
    """Add good images to a published bank (continuing its coreset, no rebuild), re-calibrate, publish."""
    try:
        report = update_published_bank(conn.client(), conn.keys, name, images or [], frames or [], queue, activate,
                                       weights, device, progress)
    except (UpdateError, RegistryError, BankError, BackboneError, ImageDecodeError, FrameCodecError) as exc:
        fail(str(exc))
    typer.echo(json.dumps(asdict(report)))
