"""The frame codec: the pixels a frame message carries, encoded by ingest and decoded by workers and bank
updates. Plain parameters (bytes, encoding, shape; no message types), its own errors, no torch: a camera
process stays light.

Decoding checks a frame's size against `max_pixels` and, for JPEG/PNG/BMP bytes, the header's size against
the declared shape before any decoder allocates pixels: a decoder allocates what a header declares, so a
small file can claim a huge image (a decompression bomb). `check_header` refuses such bytes from the header
alone: only JPEG, PNG and BMP are accepted, their encoded size must equal the declared one and stay within
the pixel limit.
"""
from __future__ import annotations

import struct
from typing import Callable, Protocol, Sequence

import cv2
import numpy as np

ENCODINGS = ("jpeg", "raw")
DEFAULT_ENCODING = "jpeg"
DEFAULT_JPEG_QUALITY = 90
MAX_PIXELS = 7680 * 4320  # a frame's height x width at most (8K UHD)


class FrameCodecError(ValueError):
    """A frame that cannot be encoded or decoded."""


class FrameEncodeError(FrameCodecError):
    """Pixels that cannot be encoded (bad settings, an encoder failure)."""


class FrameDecodeError(FrameCodecError):
    """Bytes that are not the frame they claim to be (too large, a header that disagrees, undecodable)."""


class EncodedFrame(Protocol):
    """What decoding needs of a frame (contracts.messages.Frame has these fields)."""
    data: bytes
    encoding: str
    shape: tuple[int, int, int]


# decodes checked image bytes to HxWx3 RGB each, an exception in place of a failure (scorer.preprocess.decode_images
# decodes JPEGs together on a GPU); the default decodes one by one with OpenCV on the CPU
BatchDecoder = Callable[[Sequence[bytes]], list]


def encode_frame(image: np.ndarray, encoding: str = DEFAULT_ENCODING, jpeg_quality: int = DEFAULT_JPEG_QUALITY,
                 max_side: int | None = None) -> tuple[bytes, tuple[int, int, int]]:
    """BGR (or grey) uint8 pixels -> (bytes, (height, width, channels)); shrunk first (INTER_AREA) so the
    longer side is at most `max_side` when given."""
    if encoding not in ENCODINGS:
        raise FrameEncodeError(f"encoding must be one of {', '.join(ENCODINGS)}, not {encoding!r}")
    if not 1 <= jpeg_quality <= 100:
        raise FrameEncodeError(f"JPEG quality must be 1-100, not {jpeg_quality}")
    if max_side and max(image.shape[:2]) > max_side:
        scale = max_side / max(image.shape[:2])
        image = cv2.resize(image, (round(image.shape[1] * scale), round(image.shape[0] * scale)),
                           interpolation=cv2.INTER_AREA)
    shape = (image.shape[0], image.shape[1], 1 if image.ndim == 2 else image.shape[2])
    if encoding == "raw":
        return np.ascontiguousarray(image).tobytes(), shape
    ok, buffer = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
    if not ok:
        raise FrameEncodeError("JPEG encoding failed")
    return buffer.tobytes(), shape


def decode_frame(frame: EncodedFrame, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """A frame's pixels as HxWx3 RGB uint8; FrameDecodeError when it is not the frame it claims to be."""
    image = decode_frames([frame], max_pixels)[0]
    if isinstance(image, FrameDecodeError):
        raise image
    return image


def decode_frames(frames: Sequence[EncodedFrame], max_pixels: int = MAX_PIXELS,
                  decode_many: BatchDecoder | None = None) -> list:
    """decode_frame for a batch: every frame's HxWx3 RGB pixels (a numpy array, or whatever `decode_many`
    returns: a tensor on the GPU), or its FrameDecodeError in its place; one bad frame never fails the others."""
    out: list = [None] * len(frames)
    encoded = []
    for i, frame in enumerate(frames):
        height, width, _ = frame.shape
        try:
            if height * width > max_pixels:
                raise FrameDecodeError(f"frame of {height}x{width} pixels, over the {max_pixels}-pixel limit")
            if frame.encoding == "jpeg":
                check_header(frame.data, height, width, max_pixels)
                encoded.append(i)
            else:
                out[i] = _raw_rgb(frame)
        except FrameDecodeError as exc:
            out[i] = exc
    images = (decode_many or _decode_each)([frames[i].data for i in encoded])
    for i, image in zip(encoded, images):
        height, width, _ = frames[i].shape
        if isinstance(image, BaseException):
            image = FrameDecodeError(str(image))
        elif tuple(image.shape[:2]) != (height, width):
            image = FrameDecodeError(f"decoded {tuple(image.shape[:2])}, message says {(height, width)}")
        out[i] = image
    return out


def _raw_rgb(frame: EncodedFrame) -> np.ndarray:
    """Raw BGR/BGRA/grey bytes of the declared shape -> HxWx3 RGB."""
    pixels = np.frombuffer(frame.data, dtype=np.uint8)
    if pixels.size != int(np.prod(frame.shape)):
        raise FrameDecodeError(f"raw frame of {pixels.size} bytes does not fill {tuple(frame.shape)}")
    image = pixels.reshape(frame.shape)
    if image.shape[2] == 1:
        return np.ascontiguousarray(np.repeat(image, 3, axis=2))
    if image.shape[2] not in (3, 4):
        raise FrameDecodeError(f"expected 1, 3 or 4 channels, got shape {tuple(frame.shape)}")
    return np.ascontiguousarray(image[:, :, 2::-1])


def _decode_each(datas: Sequence[bytes]) -> list:
    out = []
    for data in datas:
        decoded = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
        out.append(FrameDecodeError("not a decodable PNG/JPEG/BMP image") if decoded is None
                   else np.ascontiguousarray(decoded[:, :, ::-1]))
    return out


# JPEG start-of-frame markers (baseline, extended, progressive, lossless, arithmetic); not DHT/JPG/DAC
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM and RSTn carry no length field
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def image_size(data: bytes) -> tuple[str, int, int]:
    """(format, height, width) from the header of JPEG, PNG or BMP bytes; anything else is refused."""
    if data[:3] == b"\xff\xd8\xff":
        return ("jpeg", *_jpeg_size(data))
    if data[:8] == _PNG_SIGNATURE:
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise FrameDecodeError("PNG without an IHDR chunk first")
        width, height = struct.unpack(">II", data[16:24])
        return "png", height, width
    if data[:2] == b"BM":
        return ("bmp", *_bmp_size(data))
    raise FrameDecodeError(f"not a JPEG, PNG or BMP image (starts with {data[:8].hex()})")


def check_header(data: bytes, height: int, width: int, max_pixels: int) -> str:
    """Refuse bytes whose encoded size differs from (height, width) or exceeds max_pixels; returns the format."""
    kind, encoded_height, encoded_width = image_size(data)
    if encoded_height * encoded_width > max_pixels:
        raise FrameDecodeError(f"{kind} header declares {encoded_height}x{encoded_width} pixels, "
                               f"over the {max_pixels}-pixel limit")
    if (encoded_height, encoded_width) != (height, width):
        raise FrameDecodeError(f"{kind} header declares {encoded_height}x{encoded_width}, "
                               f"the frame says {height}x{width}")
    return kind


def _jpeg_size(data: bytes) -> tuple[int, int]:
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise FrameDecodeError(f"corrupt JPEG: no marker at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in _STANDALONE:
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image or start of scan before any frame header
            break
        (length,) = struct.unpack(">H", data[pos + 2:pos + 4])
        if length < 2:
            raise FrameDecodeError(f"corrupt JPEG: segment length {length} at byte {pos}")
        if marker in _SOF:
            if pos + 9 > len(data):
                break
            height, width = struct.unpack(">HH", data[pos + 5:pos + 9])
            if height == 0 or width == 0:  # height 0 defers it to a DNL marker: refuse, as with no size
                raise FrameDecodeError(f"JPEG frame header declares {height}x{width}")
            return height, width
        pos += 2 + length
    raise FrameDecodeError("JPEG without a frame header (SOF) before its image data")


def _bmp_size(data: bytes) -> tuple[int, int]:
    if len(data) < 26:
        raise FrameDecodeError("truncated BMP header")
    (header_size,) = struct.unpack("<I", data[14:18])
    if header_size == 12:  # OS/2 BITMAPCOREHEADER: unsigned 16-bit sizes
        width, height = struct.unpack("<HH", data[18:22])
    elif header_size >= 40:
        width, height = struct.unpack("<ii", data[18:26])
        height = abs(height)  # negative: rows stored top-down
    else:
        raise FrameDecodeError(f"BMP with an unknown {header_size}-byte info header")
    return height, width
