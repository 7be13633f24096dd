"""Image headers read before anything is decoded: format by magic bytes, encoded width and height.

A decoder allocates the pixels its header declares, so a small file can claim a huge image (a
decompression bomb). `check_header` refuses such bytes from the header alone: only JPEG, PNG and
BMP are accepted, and their encoded size must equal the size the sender declared and stay within a
pixel limit.
"""
from __future__ import annotations

import struct

from .preprocess import ImageDecodeError

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
            raise ImageDecodeError("PNG without an IHDR chunk first")
        width, height = struct.unpack(">II", data[16:24])
        return "png", height, width
    if data[:2] == b"BM":
        return ("bmp", *_bmp_size(data))
    raise ImageDecodeError(f"not a JPEG, PNG or BMP image (starts with {data[:8].hex()})")


def check_header(data: bytes, height: int, width: int, max_pixels: int) -> str:
    """Refuse bytes whose encoded size differs from (height, width) or exceeds max_pixels; returns the format."""
    kind, encoded_height, encoded_width = image_size(data)
    if encoded_height * encoded_width > max_pixels:
        raise ImageDecodeError(f"{kind} header declares {encoded_height}x{encoded_width} pixels, "
                               f"over the {max_pixels}-pixel limit")
    if (encoded_height, encoded_width) != (height, width):
        raise ImageDecodeError(f"{kind} header declares {encoded_height}x{encoded_width}, "
                               f"the frame says {height}x{width}")
    return kind


def _jpeg_size(data: bytes) -> tuple[int, int]:
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise ImageDecodeError(f"corrupt JPEG: no marker at byte {pos}")
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
            raise ImageDecodeError(f"corrupt JPEG: segment length {length} at byte {pos}")
        if marker in _SOF:
            if pos + 9 > len(data):
                break
            height, width = struct.unpack(">HH", data[pos + 5:pos + 9])
            if height == 0 or width == 0:  # height 0 defers it to a DNL marker: refuse, as with no size
                raise ImageDecodeError(f"JPEG frame header declares {height}x{width}")
            return height, width
        pos += 2 + length
    raise ImageDecodeError("JPEG without a frame header (SOF) before its image data")


def _bmp_size(data: bytes) -> tuple[int, int]:
    if len(data) < 26:
        raise ImageDecodeError("truncated BMP header")
    (header_size,) = struct.unpack("<I", data[14:18])
    if header_size == 12:  # OS/2 BITMAPCOREHEADER: unsigned 16-bit sizes
        width, height = struct.unpack("<HH", data[18:22])
    elif header_size >= 40:
        width, height = struct.unpack("<ii", data[18:26])
        height = abs(height)  # negative: rows stored top-down
    else:
        raise ImageDecodeError(f"BMP with an unknown {header_size}-byte info header")
    return height, width
