"""`patchcore up`: the whole service in one process - Redis (embedded unless given), a bank in the
registry, camera ingest, a worker and the store as threads, alarms printed as they happen."""
from __future__ import annotations

import contextlib
import secrets
import sys
import threading
import time
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Callable, TextIO

import numpy as np
import redis

from runtime import scripts
from runtime.connection import connect, redacted
from runtime.health import both, serve_process
from contracts.keys import Keys
from contracts.messages import Alarm, Result
from workers.banks.registry import BankRegistry
from ingest.camera import CameraIngest, IngestSettings
from ingest.sources import SyntheticLine, parse_source, replay_fps
from scorer import (BuildConfig, CoresetConfig, FeatureConfig, MemoryBank, bank_to_bytes, build_bank, load_bank,
                    load_image)
from scorer.backbones import BackboneError, resolve_backbone
from scorer.calibration import CalibrationConfig
from scorer.features import ComputeConfig
from scorer.bank import bank_size, view_notice
from scorer.evaluate import bank_summary
from scorer.index import SearchConfig
from store.alarms.rules import AlarmRule
from store.service import ResultsStore, StoreSettings
from workers.worker import Worker, WorkerSettings

from .embedded_redis import EmbeddedRedis


def fields_of(cls) -> dict:
    return {f.name: f for f in dataclass_fields(cls)}


@dataclass(frozen=True)
class UpSettings:
    """`patchcore up`'s settings; a field's `metadata["help"]` is its option's help (patchcore/options.py)."""

    source: str = field(default="synthetic", metadata={
        "help": "Any ingest source; default: the synthetic production line."})
    redis_url: str | None = field(default=None, metadata={
        "help": "Use this Redis instead of an embedded one.", "envvar": "REDIS_URL"})
    bank: Path | None = field(default=None, metadata={"help": "Bank file; default: build one."})
    train: Path | None = field(default=None, metadata={"help": "Build the bank from this folder of good images."})
    bank_name: str = field(default="default", metadata={"help": "Registry name the run's bank is published under."})
    camera: str = "cam-1"
    line: str = IngestSettings.line
    # the bank built when no --bank is given: from --train, or the source's first frames (consecutive
    # frames are near-twins, so calibration leaves a frame's neighbours out with it); backbone "auto"
    build: BuildConfig = field(default_factory=lambda: BuildConfig(
        features=FeatureConfig(), coreset=CoresetConfig(),
        calibration=CalibrationConfig(contiguous=True)))
    warmup_frames: int = field(default=60, metadata={  # good frames the bank is built from
        "help": "Without --bank/--train: build the bank from the source's first frames."})
    frames: int | None = field(default=200, metadata={  # the synthetic line never ends: a demo of this many frames
        "min": 1, "help": "Stop after this many frames."})
    seconds: float | None = field(default=None, metadata={"help": "Stop after this many seconds."})
    # None: a camera's rate for recorded and synthetic sources (ingest.sources.replay_fps); 0: unpaced
    fps: float | None = field(default=None, metadata={"min": 0, "help": (
        "Frames per second the camera runs at; default 10 for the synthetic line, files and folders (the latency a "
        "line camera sees), a live source's own rate. 0: unthrottled, for throughput.")})
    # the worker's, defaults its own
    max_batch: int = field(default=WorkerSettings.max_batch, metadata={"help": "Worker batch size at most."})
    max_wait_ms: int = field(default=WorkerSettings.max_wait_ms, metadata={"help": "Worker batching wait."})
    prefetch: bool = field(default=WorkerSettings.prefetch, metadata=fields_of(WorkerSettings)["prefetch"].metadata)
    device: str = field(default=WorkerSettings.device, metadata=fields_of(WorkerSettings)["device"].metadata)
    # the backbone's precision, layout and engine: the bank's build and the worker run the same (as `eval`)
    precision: str = field(default=WorkerSettings.precision, metadata=fields_of(WorkerSettings)["precision"].metadata)
    channels_last: bool | None = field(default=WorkerSettings.channels_last,
                                       metadata=fields_of(WorkerSettings)["channels_last"].metadata)
    engine: str = field(default=WorkerSettings.engine, metadata=fields_of(WorkerSettings)["engine"].metadata)
    search: SearchConfig = WorkerSettings.search  # nearest-neighbour search
    # a demo line alarms sooner and more often than the store's default rule: 3 of 4 frames, 2 s apart
    rule: AlarmRule = AlarmRule(k=3, n=4, cooldown_s=2.0)
    force: bool = field(default=False, metadata={  # publish over (and activate) an existing bank of a foreign Redis
        "help": "With --redis-url: publish over (and activate) an existing bank of that name."})
    bank_key: bytes | None = field(default=None, repr=False)  # signing key; None: a fresh one for this run
    metrics_port: int = field(default=0, metadata={  # of the whole demo
        "help": "Serve Prometheus /metrics, /healthz and /readyz on this port (0: off).",
        "envvar": "PATCHCORE_METRICS_PORT", "min": 0, "max": 65535})
    console_port: int | None = field(default=None, metadata={"min": 1, "max": 65535, "help": (
        "Serve the operator console on 127.0.0.1:PORT (actions: $PATCHCORE_CONSOLE_CREDENTIALS).")})
    console_credentials: dict[str, str] | None = field(default=None, repr=False)  # operators; None: read-only


class UpError(RuntimeError):
    pass


def compute_of(settings: UpSettings) -> ComputeConfig:
    """The backbone's compute settings of the run (resolved per device where the bank is built and scored)."""
    return ComputeConfig(settings.precision, settings.channels_last, settings.engine)


def warmup_images(source_spec: str, count: int, folder: Path) -> list[Path]:
    """The source's first `count` frames as PNG files in `folder` (the synthetic line renders defect-free parts)."""
    import cv2

    source = parse_source(source_spec)
    folder.mkdir(parents=True, exist_ok=True)
    source.open()
    for i in range(count):
        if isinstance(source, SyntheticLine):  # one frame per part: calibration frames show unseen parts
            image = source.render(i * source.period + i % source.period, defect=False)
        else:
            image = source.read()
        if image is None:
            break
        cv2.imwrite(str(folder / f"{i:05d}.png"), image)
    source.close()
    return sorted(folder.glob("*.png"))


def warmup_bank(settings: UpSettings, workdir: Path, progress: bool) -> MemoryBank:
    """A bank from the source's own first frames."""
    paths = warmup_images(settings.source, settings.warmup_frames, workdir / "warmup")
    return build_bank(paths, settings.build, device=settings.device, progress=progress, compute=compute_of(settings))


def build_up_bank(settings: UpSettings, workdir: Path, echo: Callable[[str], None], progress: bool) -> MemoryBank:
    """The run's bank from --train or the source's first frames, with the backbone named ("auto" resolved)."""
    try:
        choice = resolve_backbone(settings.build.features.backbone)
        echo(f"backbone: {choice.name} ({choice.reason})")
        if settings.train is not None:
            from scorer.preprocess import list_images

            bank = build_bank(list_images(settings.train), settings.build, device=settings.device, progress=progress,
                              compute=compute_of(settings))
        else:
            echo(f"building a bank from the first {settings.warmup_frames} frames of {settings.source}")
            bank = warmup_bank(settings, workdir, progress)
    except BackboneError as exc:
        raise UpError(str(exc)) from None
    notice = view_notice(bank)
    if notice:
        echo(notice)
    return bank


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


class LiveLine:
    """One status line rewritten in place on a terminal (stderr by default); silent when that is not a terminal."""

    def __init__(self, enabled: bool = True, stream: TextIO | None = None):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled and self.stream.isatty()

    def show(self, text: str) -> None:
        if self.enabled:
            self.stream.write("\r\x1b[K" + text)
            self.stream.flush()

    def clear(self) -> None:
        self.show("")


class ResultTail:
    """This run's results (captured from `since` on) as they arrive: XRANGE from the last entry read."""

    def __init__(self, client, stream: str, since: float):
        self.client, self.stream, self.since = client, stream, since
        self.last = "-"
        self.results: list[Result] = []

    def poll(self) -> None:
        while entries := self.client.xrange(self.stream, min=self.last if self.last == "-" else f"({self.last}",
                                            count=1000):
            self.last = entries[-1][0].decode()
            results = (Result.unpack(fields[b"m"]) for _, fields in entries)
            self.results += [r for r in results if r.captured_at >= self.since]

    def latencies_ms(self) -> list[float]:
        return [(r.scored_at - r.captured_at) * 1000 for r in self.results]


def run_up(settings: UpSettings, echo: Callable[[str], None] = print, progress: bool = True) -> dict:
    import tempfile

    with contextlib.ExitStack() as stack:
        url = settings.redis_url
        if url is None:
            url = stack.enter_context(EmbeddedRedis()).url
            echo(f"embedded redis-server at {url}")
        client = connect(url)
        try:
            scripts.load_library(client)  # the Redis Functions every service calls (FCALL)
        except redis.exceptions.NoPermissionError as exc:
            raise UpError(f"this Redis user may not load the Redis Functions library: an operator runs "
                          f"`{scripts.LOAD_COMMAND}` first ({exc})") from None
        keys = Keys()
        bank_key = settings.bank_key or secrets.token_bytes(32)  # workers load only banks signed with it
        registry = BankRegistry(client, keys, signing_key=bank_key)
        if settings.redis_url is not None and not settings.force and registry.exists(settings.bank_name):
            raise UpError(f"bank {settings.bank_name!r} already exists on {redacted(url)}, a Redis this command did "
                          "not start: pass --bank-name with a new name to run beside it, or --force to publish over "
                          "it and activate the new version")
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="patchcore-up-")))
        bank = load_bank(settings.bank) if settings.bank is not None else build_up_bank(settings, workdir, echo,
                                                                                       progress)
        version = registry.publish(settings.bank_name, bank_to_bytes(bank),
                                   {"source": "patchcore up", **bank_summary(bank)}, activate=True)
        threshold = bank.calibration.threshold if bank.calibration else None
        echo(f"bank {settings.bank_name} v{version}: {bank_size(bank)} features, threshold "
             f"{'none' if threshold is None else f'{threshold:.4g}'}")
        if settings.console_port is not None:
            from console.app import ConsoleError, ConsoleServer, ConsoleSettings

            console = ConsoleServer(connect(url), keys, ConsoleSettings(port=settings.console_port,
                                                                        credentials=settings.console_credentials))
            try:
                stack.callback(console.start().stop)
            except ConsoleError as exc:
                raise UpError(str(exc)) from None
            echo(f"console at {console.settings.url} ("
                 + ("operators can log in)" if settings.console_credentials else
                    "read-only; set PATCHCORE_CONSOLE_CREDENTIALS to a credentials file for actions)"))

        stop = threading.Event()
        ingest_stop = threading.Event()
        alarms: list[Alarm] = []
        subscriber = client.pubsub(ignore_subscribe_messages=True)
        subscriber.subscribe(keys.alarms_channel)

        source = parse_source(settings.source)
        fps = replay_fps(source, settings.fps)
        mode = "paced" if fps else "live" if source.live else "unthrottled"
        echo(f"camera paced at {fps:g} frames/s: the latency a line camera sees (--fps 0: throughput)" if fps else
             "live source at its camera's own rate" if source.live else
             "camera unthrottled (--fps 0): throughput; latency is that of a full queue")
        ingest = CameraIngest(client, source, IngestSettings(camera=settings.camera, line=settings.line,
                                                             bank=settings.bank_name, fps=fps,
                                                             max_frames=settings.frames), keys, ingest_stop)
        worker = Worker(connect(url), WorkerSettings(name="worker-1", max_batch=settings.max_batch,
                                                     max_wait_ms=settings.max_wait_ms, device=settings.device,
                                                     search=settings.search, prefetch=settings.prefetch,
                                                     precision=settings.precision, channels_last=settings.channels_last,
                                                     engine=settings.engine, bank_key=bank_key), keys, stop)
        # load the bank (and run the network once on a frame of the source) before the camera starts:
        # start-up is not latency
        active = worker.banks.get(settings.bank_name)
        warm = sorted((workdir / "warmup").glob("*.png"))[:1]
        if active is not None and warm:
            active.scorer.score([load_image(warm[0])], maps=False)
        store = ResultsStore(connect(url), StoreSettings(default_rule=settings.rule), keys, stop)
        server = serve_process(settings.metrics_port, client, both(
            worker.readiness, store.readiness, lambda: (ingest.connected.is_set(), {"ingest": ingest.connected.is_set()})),
            keys)
        if server is not None:
            stack.callback(server.server_close)
            stack.callback(server.shutdown)
            echo(f"metrics on http://127.0.0.1:{server.server_port}/metrics (/healthz, /readyz)")
        reports: dict = {}
        threads = [threading.Thread(target=lambda: reports.__setitem__("ingest", ingest.run()), name="ingest"),
                   threading.Thread(target=worker.run, name="worker"),
                   threading.Thread(target=store.run, name="store")]

        def absolute_counters() -> dict[str, int]:
            raw = client.hgetall(keys.camera_stats(settings.camera))
            return {k.decode(): int(v) for k, v in raw.items()
                    if k.decode() in ("ingested", "results", "dropped", "deadlettered")}

        before = absolute_counters()  # a given Redis may hold earlier runs' counts

        def counters() -> dict[str, int]:
            return {k: v - before.get(k, 0) for k, v in absolute_counters().items()}

        started = time.time()
        tail = ResultTail(client, keys.results(settings.camera), started - 1)
        live = LiveLine(progress)
        shown_at = 0.0
        for thread in threads:
            thread.start()
        deadline = started + settings.seconds if settings.seconds else None
        try:
            while True:
                message = subscriber.get_message(timeout=0.2)
                if message is not None:
                    alarm = Alarm.unpack(message["data"])
                    alarms.append(alarm)
                    live.clear()
                    echo(alarm.describe())
                if live.enabled and time.time() - shown_at >= 0.5:
                    shown_at = time.time()
                    tail.poll()
                    now, p50 = counters(), percentile(tail.latencies_ms(), 50)
                    live.show(f"frames in {now.get('ingested', 0)}  out {now.get('results', 0)}  alarms {len(alarms)}"
                              f"  latency p50 {'-' if np.isnan(p50) else f'{p50:.0f}'} ms  {shown_at - started:.0f} s")
                if deadline is not None and time.time() >= deadline:
                    ingest_stop.set()
                now = counters()
                if not threads[0].is_alive() and now.get("results", 0) + now.get("deadlettered", 0) + now.get("dropped", 0) \
                        >= now.get("ingested", 0) \
                        and store.report.results >= now.get("results", 0):
                    break
        except KeyboardInterrupt:
            echo("stopping")
        finally:
            live.clear()
            ingest_stop.set()
            stop.set()
            for thread in threads:
                thread.join(timeout=30)
        elapsed = time.time() - started
        while (message := subscriber.get_message(timeout=0.2)) is not None:  # alarms published just before stop
            alarms.append(Alarm.unpack(message["data"]))
        tail.poll()
        results = tail.results  # this run's frames
        latencies = tail.latencies_ms()
        stats = counters()
        subscriber.close()
        # frames/s from the first capture to the last result: the camera's rate when paced and kept up with,
        # the service's capacity when unthrottled (or when it fell behind the camera)
        span = max(r.scored_at for r in results) - min(r.captured_at for r in results) if results else 0.0
        throughput = round(len(results) / span, 2) if span > 0 else 0.0
        summary = {
            "source": settings.source,
            "mode": mode,
            "fps_target": fps,
            "measured": {"paced": "latency at the camera's rate (throughput is the camera's; --fps 0 measures capacity)",
                         "live": "latency at the live camera's rate",
                         "unthrottled": "throughput (latency is a full queue's; the default --fps measures latency)"}[mode],
            "frames_in": int(stats.get("ingested", 0)),
            "results_out": int(stats.get("results", 0)),  # the results stream keeps only the newest 10 000
            "dropped": int(stats.get("dropped", 0)),
            "deadlettered": int(stats.get("deadlettered", 0)),
            "alarms": len(alarms),
            "anomalous_frames": sum(r.anomalous for r in results),
            "alarm_seqs": [a.seq for a in alarms],
            "latency_ms_p50": round(percentile(latencies, 50), 1),
            "latency_ms_p99": round(percentile(latencies, 99), 1),
            "frames_per_second": throughput,
            "kept_up": None if not fps else throughput >= 0.9 * fps,  # paced: did the service keep the camera's pace
            "seconds": round(elapsed, 2),
            "score_ms_mean": round(float(np.mean([r.timings_ms.get("score", 0.0) for r in results])), 2) if results else 0.0,
            "decode_ms_mean": round(float(np.mean([r.timings_ms.get("decode", 0.0) for r in results])), 2) if results else 0.0,
            "bank_version": version,
            "threshold": threshold,
            "max_batch": settings.max_batch,
            "pipelined": worker.settings.prefetch,
            "compute": None if active is None else active.scorer.extractor.compute.to_dict(),  # as it ran
        }
        return summary
