"""Frames through Redis on one device, end to end, beside the backbone-only and search-only ceilings.

    python bench/gpu_pipeline.py --redis-server /usr/bin/redis-server               # a CUDA host
    python bench/gpu_pipeline.py --redis-server $(which redis-server) --device cpu --seconds 5 --batches 8

Self-contained on purpose: it needs torch, torchvision and numpy only (Python 3.11-3.12) and a redis-server
binary; it speaks RESP itself (no redis-py) and imports nothing of the project, so it runs from a bare
checkout on a GPU host. It starts its own redis-server (a free port, no persistence), many synthetic cameras
pushing JPEG frames, and a worker loop built like workers/worker.py: a batch is read (XREADGROUP over all
cameras, at most --batches frames) and decoded (torchvision.io.decode_jpeg, batched, on the device) while the
previous one is scored; results are written (XADD result, XACK, XDEL in one MULTI) by a writer thread, off
the scoring path. Features are the project's (scorer/features.py: taps, 3x3 neighbourhoods, pooling to
1024; tests/test_gpu_pipeline_bench.py checks they are equal), the bank a 10 % greedy coreset of the patches
of --bank-images synthetic images, the search exact (fp32 matrix product, or fp16 with an exact fp32 re-rank
of a shortlist: --search), the score the largest patch distance. Weights are random: speed only.

Per backbone and max batch: frames/s at saturation, then p50/p99 latency (capture to result written) with
the cameras paced at --load (0.7) of that rate; and on the same device, in the same run: backbone-only,
search-only and decode-only images/s at that batch size, so the gap to the limit is visible.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import queue
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg
from torchvision.transforms.v2 import functional as TF

TAPS = {"wide_resnet50_2": ("layer2", "layer3"), "resnet18": ("layer2", "layer3"),
        "mobilenet_v2": ("features.6", "features.13")}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ---- a minimal Redis client (RESP2), so the host needs no redis-py ----------------------------------------
class RespError(Exception):
    pass


class Resp:
    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = self.sock.makefile("rb")

    def _send(self, commands) -> None:
        out = bytearray()
        for args in commands:
            out += b"*%d\r\n" % len(args)
            for arg in args:
                arg = arg if isinstance(arg, bytes) else str(arg).encode()
                out += b"$%d\r\n%s\r\n" % (len(arg), arg)
        self.sock.sendall(out)

    def _read(self):
        line = self.reader.readline()
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest
        if kind == b"-":
            raise RespError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            return None if int(rest) < 0 else self.reader.read(int(rest) + 2)[:-2]
        if kind == b"*":
            return None if int(rest) < 0 else [self._read() for _ in range(int(rest))]
        raise RespError(f"unexpected reply {line!r}")

    def __call__(self, *args):
        self._send([args])
        return self._read()

    def pipeline(self, commands: list) -> list:
        self._send(commands)
        return [self._read() for _ in commands]


def start_redis(binary: str) -> tuple[subprocess.Popen, int, str]:
    folder = tempfile.mkdtemp(prefix="gpu-pipeline-redis-")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                                "--dir", folder, "--protected-mode", "no"], stdout=subprocess.DEVNULL)
    for _ in range(100):
        try:
            if Resp(port)("PING") == b"PONG":
                return process, port, folder
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"{binary} did not start")


# ---- PatchCore features, as scorer/features.py computes them -----------------------------------------------
def _pool_matrix(length: int, out: int) -> torch.Tensor:
    """[length, out]: x @ M is adaptive_avg_pool1d(x, out) (scorer.features.adaptive_pool_matrix)."""
    matrix = torch.zeros(length, out, dtype=torch.float64)
    for i in range(out):
        begin, end = (i * length) // out, math.ceil((i + 1) * length / out)
        matrix[begin:end, i] = 1.0 / (end - begin)
    return matrix


class Features(torch.nn.Module):
    """Backbone stages up to the deepest tap -> 3x3 neighbourhoods -> deeper grids resized to the first ->
    each layer's C*9 values pooled to 1024 -> layers concatenated and pooled to 1024. As the scorer does it:
    neighbourhood and both poolings are one fixed linear map per layer, applied as a 3x3 convolution that
    writes only that layer's columns of the final vector (no C*9-channel patches in memory)."""

    def __init__(self, name: str, dim: int = 1024):
        super().__init__()
        torch.manual_seed(0)
        net = getattr(torchvision.models, name)(weights=None).eval()
        if name.startswith(("resnet", "wide_resnet")):
            names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
            stages = [(n, getattr(net, n)) for n in names]
        else:
            stages = [(f"features.{i}", m) for i, m in enumerate(net.features)]
        taps = TAPS[name]
        last = max(i for i, (n, _) in enumerate(stages) if n in taps)
        self.names = [n for n, _ in stages[:last + 1]]
        self.stages = torch.nn.ModuleList(m for _, m in stages[:last + 1])
        self.taps, self.dim = taps, dim
        self._convs: dict = {}

    def _conv(self, position: int, fmap: torch.Tensor) -> tuple[int, int, torch.Tensor]:
        channels = fmap.shape[1]
        key = (position, channels, fmap.device)
        if key not in self._convs:
            final = _pool_matrix(len(self.taps) * self.dim, self.dim)[position * self.dim:(position + 1) * self.dim]
            weights = _pool_matrix(channels * 9, self.dim) @ final
            fed = torch.nonzero(weights.abs().sum(0))[:, 0]
            first, last = int(fed[0]), int(fed[-1]) + 1
            conv = weights[:, first:last].T.reshape(last - first, channels, 3, 3)  # unfold's (c, ky, kx) order
            self._convs[key] = first, last, conv.to(device=fmap.device, dtype=torch.float32).contiguous()
        return self._convs[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, maps = x.shape[0], {}
        for name, stage in zip(self.names, self.stages):
            x = stage(x)
            if name in self.taps:
                maps[name] = x.float()
        grid = tuple(maps[self.taps[0]].shape[-2:])
        out = None
        for position, name in enumerate(self.taps):
            fmap = maps[name]
            first, last, weight = self._conv(position, fmap)
            part = F.conv2d(fmap, weight, padding=1)
            if tuple(part.shape[-2:]) != grid:
                part = F.interpolate(part, size=grid, mode="bilinear", align_corners=False)
            part = F.pad(part, (0, 0, 0, 0, first, self.dim - last))
            out = part if out is None else out + part
        return out.permute(0, 2, 3, 1).reshape(batch, grid[0] * grid[1], self.dim)


class Scorer:
    def __init__(self, name: str, device: torch.device, precision: str, channels_last: bool, search: str):
        self.device, self.search_kind = device, search
        self.features = Features(name).to(device)
        self.channels_last = channels_last
        if channels_last:
            self.features = self.features.to(memory_format=torch.channels_last)
        self.dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        self.mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(STD, device=device).view(1, 3, 1, 1)

    def preprocess(self, images: list[torch.Tensor]) -> torch.Tensor:
        """uint8 CHW frames on the device -> resize 256, centre crop 224, normalised (equally sized frames)."""
        batch = TF.center_crop(TF.resize(torch.stack(images), [256], antialias=True), [224, 224])
        return (batch.float() / 255.0 - self.mean) / self.std

    @torch.inference_mode()
    def extract(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.dtype is None:
            return self.features(x)
        with torch.autocast(self.device.type, dtype=self.dtype):
            return self.features(x)

    def set_bank(self, bank: torch.Tensor) -> None:
        self.bank = bank.contiguous()
        self.bank_sq = (bank * bank).sum(1)
        self.bank_half = bank.half() if self.search_kind == "fp16" else None

    @torch.inference_mode()
    def search(self, queries: torch.Tensor, shortlist: int = 8) -> torch.Tensor:
        """Exact nearest-neighbour L2 distance of each query [Q, D] (fp16: shortlist, fp32 re-rank)."""
        out = []
        rows = max(1, (256 << 20) // (4 * len(self.bank)))
        for q in queries.split(rows):
            if self.bank_half is not None:
                partial = self.bank_sq[None].half() - 2.0 * (q.half() @ self.bank_half.T)
                candidates = partial.float().topk(min(shortlist, len(self.bank)), dim=1, largest=False).indices
            else:
                candidates = (self.bank_sq[None] - 2.0 * q @ self.bank.T).topk(1, dim=1, largest=False).indices
            out.append(torch.linalg.vector_norm(q[:, None] - self.bank[candidates], dim=2).min(dim=1).values)
        return torch.cat(out)

    @torch.inference_mode()
    def score(self, x: torch.Tensor) -> torch.Tensor:
        features = self.extract(x)
        b, n, d = features.shape
        return self.search(features.reshape(-1, d)).reshape(b, n).max(dim=1).values


def synthetic_frames(n: int, height: int, width: int, seed: int) -> list[torch.Tensor]:
    """uint8 CHW frames: a smooth background with discs and noise (random shapes, compressible like a camera's)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    frames = []
    for _ in range(n):
        image = torch.rand(3, 1, 1, generator=g) * 80 + 40 + 20 * torch.sin(xx / (10 + 30 * torch.rand(1, generator=g)))
        for _ in range(3):
            cy, cx, r = torch.rand(3, generator=g) * torch.tensor([height, width, min(height, width) / 3])
            image = torch.where((yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2, torch.rand(3, 1, 1, generator=g) * 255, image)
        frames.append((image + torch.randn(3, height, width, generator=g) * 6).clamp(0, 255).to(torch.uint8))
    return frames


def greedy_coreset(features: torch.Tensor, fraction: float, seed: int = 0) -> torch.Tensor:
    """The paper's approximate greedy coreset (random projection to 128 dims, farthest-point steps)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    projection = torch.randn(features.shape[1], 128, generator=g).to(features.device) / 128 ** 0.5
    points = features @ projection
    count = max(1, int(len(points) * fraction))
    start = torch.randint(len(points), (10,), generator=g).to(features.device)
    min_distance = torch.cdist(points, points[start]).mean(dim=1)
    chosen = torch.empty(count, dtype=torch.int64, device=features.device)
    for step in range(count):
        pick = torch.argmax(min_distance)
        chosen[step] = pick
        min_distance = torch.minimum(min_distance, torch.linalg.vector_norm(points - points[pick], dim=1))
    return features[chosen]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(fn, device: torch.device, seconds: float, per_call: int) -> float:
    """Items per second of `fn` (called repeatedly for about `seconds`, after one warm-up call)."""
    fn()
    sync(device)
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or calls == 0:
        fn()
        calls += 1
    sync(device)
    return calls * per_call / (time.perf_counter() - started)


# ---- the streaming run -------------------------------------------------------------------------------------
class Run:
    """Cameras -> Redis streams -> a worker loop (reader/decoder thread, scoring loop, writer thread)."""

    def __init__(self, port: int, scorer: Scorer, jpegs: list[bytes], cameras: int, max_batch: int, tag: str):
        self.port, self.scorer, self.jpegs, self.max_batch = port, scorer, jpegs, max_batch
        self.streams = [f"bench:{tag}:frames:{c}" for c in range(cameras)]
        self.results = f"bench:{tag}:results"
        self.sent = self.done = 0
        self.latencies: list[float] = []
        self.stop = threading.Event()
        admin = Resp(port)
        for stream in self.streams:
            admin("XGROUP", "CREATE", stream, "workers", "$", "MKSTREAM")

    def camera(self, fps: float | None, backlog: int) -> None:
        """All cameras from one thread: paced at `fps` frames/s in total, or as fast as the backlog allows."""
        client, i, started = Resp(self.port), 0, time.perf_counter()
        while not self.stop.is_set():
            if fps is None:
                if self.sent - self.done > backlog:
                    time.sleep(0.001)
                    continue
            elif self.sent >= (time.perf_counter() - started) * fps:
                time.sleep(0.0005)
                continue
            commands = []
            for _ in range(min(len(self.streams), 16)):
                commands.append(("XADD", self.streams[i % len(self.streams)], "*", "t", repr(time.time()),
                                 "d", self.jpegs[i % len(self.jpegs)]))
                i += 1
            client.pipeline(commands)
            self.sent += len(commands)

    def reader(self, batches: queue.Queue) -> None:
        """Read at most max_batch frames over all cameras, decode them on the device, queue them (2 ahead)."""
        client = Resp(self.port)
        spare: list = []
        stream = torch.cuda.Stream(self.scorer.device) if self.scorer.device.type == "cuda" else None
        while not self.stop.is_set():
            reply = client("XREADGROUP", "GROUP", "workers", "w", "COUNT", self.max_batch, "BLOCK", 50,
                           "STREAMS", *self.streams, *([">"] * len(self.streams))) or []
            entries = spare + [(name, entry_id, dict(zip(fields[::2], fields[1::2])))
                               for name, items in reply for entry_id, fields in items]
            batch, spare = entries[:self.max_batch], entries[self.max_batch:]
            if not batch:
                continue
            data = [torch.frombuffer(bytearray(f[b"d"]), dtype=torch.uint8) for _, _, f in batch]
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                images = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.scorer.device)
                x = self.scorer.preprocess(images)
            done = None
            if stream is not None:
                done = torch.cuda.Event()
                done.record(stream)
            batches.put((batch, x, done))

    def writer(self, results: queue.Queue) -> None:
        client = Resp(self.port)
        while True:
            item = results.get()
            if item is None:
                return
            batch, scores = item
            commands = [("MULTI",)]
            for (name, entry_id, fields), score in zip(batch, scores):
                commands += [("XADD", self.results, "MAXLEN", "~", 10000, "*", "s", f"{score:.5f}", "id", entry_id),
                             ("XACK", name, "workers", entry_id), ("XDEL", name, entry_id)]
            client.pipeline(commands + [("EXEC",)])  # acknowledged in the transaction that writes the result
            now = time.time()
            self.latencies += [now - float(fields[b"t"]) for _, _, fields in batch]
            self.done += len(batch)

    def go(self, seconds: float, fps: float | None) -> dict:
        batches: queue.Queue = queue.Queue(maxsize=2)
        results: queue.Queue = queue.Queue(maxsize=4)
        threads = [threading.Thread(target=self.camera, args=(fps, 4 * self.max_batch + 64), daemon=True),
                   threading.Thread(target=self.reader, args=(batches,), daemon=True)]
        writer = threading.Thread(target=self.writer, args=(results,), daemon=True)
        for thread in threads + [writer]:
            thread.start()
        warmup, started = min(2.0, seconds / 3), time.perf_counter()
        counted_from, done_at_start = None, 0
        while time.perf_counter() - started < warmup + seconds:
            if counted_from is None and time.perf_counter() - started >= warmup:
                counted_from, done_at_start, self.latencies = time.perf_counter(), self.done, []
            try:
                batch, x, done = batches.get(timeout=0.1)
            except queue.Empty:
                continue
            if done is not None:
                torch.cuda.current_stream(self.scorer.device).wait_event(done)
                x.record_stream(torch.cuda.current_stream(self.scorer.device))
            results.put((batch, self.scorer.score(x).cpu().tolist()))
        elapsed = time.perf_counter() - (counted_from or started)
        self.stop.set()
        results.put(None)
        writer.join()
        latencies = np.array(self.latencies or [float("nan")]) * 1000
        return {"frames_per_s": round((self.done - done_at_start) / elapsed, 1),
                "latency_ms_p50": round(float(np.percentile(latencies, 50)), 1),
                "latency_ms_p99": round(float(np.percentile(latencies, 99)), 1), "frames": self.done - done_at_start}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-server", required=True, help="redis-server binary (>= 6.2; 7.x tested)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backbones", default="wide_resnet50_2,mobilenet_v2")
    parser.add_argument("--batches", default="8,32,64,128", help="max batch sizes, comma-separated")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per phase")
    parser.add_argument("--cameras", type=int, default=64)
    parser.add_argument("--frame", default="320x240", help="camera frame size WxH (JPEG)")
    parser.add_argument("--bank-images", type=int, default=200)
    parser.add_argument("--coreset", type=float, default=0.1)
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "fp16"), help="backbone autocast")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--search", default="fp32", choices=("fp32", "fp16"), help="fp16: shortlist + exact fp32 re-rank")
    parser.add_argument("--load", type=float, default=0.7, help="paced load for the latency phase, share of saturation")
    parser.add_argument("--json", help="write the report here too")
    parser.add_argument("--results", action="store_true",
                        help="also write bench/results/gpu_pipeline-<device>.json (bench/results.py beside this script: "
                             "a checkout; off by default so that a bare copy and the CPU smoke test write nothing there)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    width, height = (int(v) for v in args.frame.split("x"))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    report = {"device": name, "torch": torch.__version__, "torchvision": torchvision.__version__,
              "python": sys.version.split()[0], "settings": vars(args), "runs": []}
    frames = synthetic_frames(32, height, width, seed=1)
    jpegs = [encode_jpeg(f, quality=90).numpy().tobytes() for f in frames]
    process, port, folder = start_redis(args.redis_server)
    try:
        for backbone in args.backbones.split(","):
            scorer = Scorer(backbone, device, args.precision, args.channels_last, args.search)
            train = synthetic_frames(args.bank_images, 256, 256, seed=2)
            started = time.perf_counter()
            with torch.inference_mode():
                patches = torch.cat([scorer.extract(scorer.preprocess([f.to(device) for f in train[b:b + 16]])).reshape(-1, 1024)
                                     for b in range(0, len(train), 16)]).float()
                scorer.set_bank(greedy_coreset(patches, args.coreset))
            sync(device)
            print(f"{backbone}: bank {len(scorer.bank)} of {len(patches)} patches in {time.perf_counter() - started:.1f} s",
                  flush=True)
            for max_batch in (int(b) for b in args.batches.split(",")):
                data = [torch.frombuffer(bytearray(jpegs[i % len(jpegs)]), dtype=torch.uint8) for i in range(max_batch)]
                x = scorer.preprocess(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
                queries = torch.randn(max_batch * 784, 1024, device=device)
                short = min(args.seconds, 3.0)
                row = {"backbone": backbone, "max_batch": max_batch,
                       "backbone_only_images_per_s": round(rate(lambda: scorer.extract(x), device, short, max_batch), 1),
                       "search_only_images_per_s": round(rate(lambda: scorer.search(queries), device, short, max_batch), 1),
                       "decode_only_images_per_s": round(rate(
                           lambda: scorer.preprocess(decode_jpeg(data, mode=ImageReadMode.RGB, device=device)),
                           device, short, max_batch), 1)}
                saturated = Run(port, scorer, jpegs, args.cameras, max_batch, f"{backbone}-{max_batch}-sat").go(args.seconds, None)
                paced = Run(port, scorer, jpegs, args.cameras, max_batch, f"{backbone}-{max_batch}-paced").go(
                    args.seconds, max(1.0, args.load * saturated["frames_per_s"]))
                row.update({"frames_per_s": saturated["frames_per_s"], "saturated_latency_ms_p50": saturated["latency_ms_p50"],
                            "paced_frames_per_s": paced["frames_per_s"], "latency_ms_p50": paced["latency_ms_p50"],
                            "latency_ms_p99": paced["latency_ms_p99"]})
                report["runs"].append(row)
                print(json.dumps(row), flush=True)
    finally:
        process.terminate()
        process.wait(timeout=10)
        shutil.rmtree(folder, ignore_errors=True)
    print(f"\n{name}, torch {torch.__version__}, precision {args.precision}, channels_last {args.channels_last}, "
          f"search {args.search}, {args.cameras} cameras, frames {args.frame} JPEG, paced at {args.load:.0%} of saturation")
    print("| backbone | max batch | frames/s (end to end) | p50 ms | p99 ms (paced) | backbone-only img/s | "
          "search-only img/s | decode-only img/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in report["runs"]:
        print(f"| {r['backbone']} | {r['max_batch']} | {r['frames_per_s']} | {r['latency_ms_p50']} | {r['latency_ms_p99']} | "
              f"{r['backbone_only_images_per_s']} | {r['search_only_images_per_s']} | {r['decode_only_images_per_s']} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
    if args.results:
        from results import write_result  # bench/results.py: only in a checkout, only when asked

        write_result(f"gpu_pipeline-{torch.device(device).type}", {**report, "rows": report["runs"]})
    return report


if __name__ == "__main__":
    main()
