"""Image headers are checked before decoding: real files made with cv2, real decompression bombs."""
import struct
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest

from runtime.connection import connect
from runtime.deadletter import DeadLetters
from contracts.keys import FRAME_GROUP, Keys
from contracts.messages import Frame
from contracts.framecodec import FrameDecodeError, check_header, decode_frame, image_size
from workers.outcomes import Entry as _Entry
from workers.worker import Worker, WorkerSettings

from .conftest import ROOT

KEYS = Keys()
IMAGE = np.random.default_rng(0).integers(0, 255, (37, 53, 3), np.uint8)


@pytest.mark.parametrize("ext,params,kind", [
    (".jpg", [], "jpeg"), (".jpg", [cv2.IMWRITE_JPEG_PROGRESSIVE, 1], "jpeg"), (".png", [], "png"), (".bmp", [], "bmp")])
def test_the_header_gives_the_size_cv2_decodes(ext, params, kind):
    for image in (IMAGE, IMAGE[:, :, 0]):  # colour and grey
        data = cv2.imencode(ext, image, params)[1].tobytes()
        assert image_size(data) == (kind, *cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR).shape[:2])


@pytest.mark.parametrize("data,match", [
    (cv2.imencode(".tiff", IMAGE)[1].tobytes(), "not a JPEG, PNG or BMP"),
    (cv2.imencode(".webp", IMAGE)[1].tobytes(), "not a JPEG, PNG or BMP"),
    (b"\xff\xd8\xff\xe0\x00\x10JFIF", "without a frame header"),  # JPEG cut before its SOF
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIDAT", "IHDR"),
    (b"BM" + bytes(12) + struct.pack("<I", 20) + bytes(8), "unknown 20-byte info header"),
    (b"", "not a JPEG, PNG or BMP")])
def test_other_formats_and_broken_headers_are_refused(data, match):
    with pytest.raises(FrameDecodeError, match=match):
        image_size(data)


def bombs() -> dict[str, bytes]:
    """A 12000 x 12000 image in each format: real JPEG and PNG files of a few MB or less; BMP stores
    pixels uncompressed, so its bomb is a real small BMP whose header claims 12000 x 12000."""
    flat = np.zeros((12000, 12000), np.uint8)
    bmp = bytearray(cv2.imencode(".bmp", IMAGE)[1].tobytes())
    bmp[18:26] = struct.pack("<ii", 12000, 12000)
    return {"jpeg": cv2.imencode(".jpg", flat)[1].tobytes(), "png": cv2.imencode(".png", flat)[1].tobytes(),
            "bmp": bytes(bmp)}


def frame(data: bytes, height=320, width=320) -> Frame:
    return Frame(camera="cam-1", line="l", bank="default", seq=0, captured_at=1.0, encoding="jpeg",
                 shape=(height, width, 3), data=data)


def test_decompression_bombs_are_refused_from_their_header():
    for kind, data in bombs().items():
        assert len(data) < 2_200_000
        with pytest.raises(FrameDecodeError, match=f"{kind} header declares 12000x12000, the frame says 320x320"):
            check_header(data, 320, 320, max_pixels=200_000_000)
        with pytest.raises(FrameDecodeError, match="over the 33177600-pixel limit"):
            decode_frame(frame(data), max_pixels=7680 * 4320)
    honest = cv2.imencode(".jpg", np.zeros((3000, 3000, 3), np.uint8))[1].tobytes()  # says what it is, but too big
    with pytest.raises(FrameDecodeError, match="3000x3000 pixels, over the 1000000-pixel limit"):
        decode_frame(frame(honest, 3000, 3000), max_pixels=1_000_000)
    assert decode_frame(frame(honest, 3000, 3000), max_pixels=9_000_000).shape == (3000, 3000, 3)


PEAK = """
import sys
import cv2, numpy as np
from contracts.messages import Frame
from contracts.framecodec import FrameDecodeError, decode_frame

def peak_mb():  # VmHWM: peak resident memory since the last reset
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) // 1024

data = open(sys.argv[1], "rb").read()
open("/proc/self/clear_refs", "w").write("5")  # reset the peak to the current resident size (Linux)
before = peak_mb()
try:
    if sys.argv[2] == "worker":
        decode_frame(Frame(camera="c", line="l", bank="b", seq=0, captured_at=0.0, encoding="jpeg", shape=(320, 320, 3),
                           data=data), 7680 * 4320)
    else:
        print("decoded", cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE).shape, file=sys.stderr)
except Exception as exc:
    print(type(exc).__name__, file=sys.stderr)
print(peak_mb() - before)
"""


def test_the_worker_refuses_a_bomb_without_allocating_its_pixels(tmp_path):
    path = tmp_path / "bomb.jpg"
    path.write_bytes(bombs()["jpeg"])
    growth, stderr = {}, {}
    for how in ("worker", "cv2"):  # peak RSS growth in a fresh process, MB
        done = subprocess.run([sys.executable, "-c", PEAK, str(path), how], capture_output=True, text=True,
                              cwd=ROOT, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        growth[how], stderr[how] = int(done.stdout.split()[-1]), done.stderr[-500:]
        if how == "worker":
            assert "FrameDecodeError" in done.stderr
    assert growth["cv2"] > 100, stderr  # decoding it costs 12000 x 12000 bytes (the measurement can see that) ...
    assert growth["worker"] < 20, growth  # ... the worker's check costs nothing of the kind


def test_a_bomb_frame_is_dead_lettered_once_with_its_reason(redis_server):
    client = connect(redis_server.url)
    stream = KEYS.frames("cam-1")
    payload = frame(bombs()["png"]).pack()
    entry_id = client.xadd(stream, {"m": payload})
    client.xgroup_create(stream, FRAME_GROUP, id="0")
    client.xreadgroup(FRAME_GROUP, "w", {stream: ">"})
    worker = Worker(client, WorkerSettings(name="w", device="cpu"), KEYS)
    worker.process([_Entry(stream, entry_id, payload, time.time())])
    [letter] = DeadLetters(client, KEYS).list("cam-1")
    assert "png header declares 12000x12000" in letter.reason and letter.size == len(payload)
    assert client.xpending(stream, FRAME_GROUP)["pending"] == 0 and client.xlen(stream) == 0  # not reclaimed again
