"""Uploaded images: their size read from the header, before anything is decoded.

A compressed image says nothing about its decoded size until it is decoded: a PNG of 874 KB can
claim 30000 x 30000 pixels and inflate to 2.7 GB (a pod limited to 1 GiB dies; three at once
took an agent to 4 GB). So ``POST /v1/infer`` reads the width and height from the first bytes
(``probe``: PNG, JPEG, BMP and WebP, whose headers are simple and fixed) and refuses more than
``http.max_image_pixels`` before OpenCV sees the bytes; ``decode`` then decodes, in the infer
thread, an image whose size is known, and checks that the decoder agreed with the header.
Formats whose size cannot be read this cheaply (TIFF with its many pages, the rest of what
OpenCV would try) are refused: an upload is a camera frame, and cameras send these four.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from edge_agent.errors import InputError

#: The formats ``probe`` reads, as named in errors.
FORMATS = "PNG, JPEG, BMP or WebP"
#: JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic): they carry the
#: size. C4 (DHT), C8 (JPG) and CC (DAC) are not frames.
_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE,
                  0xCF})
#: JPEG markers without a length: TEM, RST0-7, SOI.
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD9)})


class UnsupportedImageError(InputError):
    """Bytes that are not one of ``FORMATS`` (415)."""


class TooManyPixelsError(InputError):
    """An image whose header claims more pixels than allowed (413)."""


@dataclass(frozen=True)
class ImageInfo:
    """What an image's header says."""

    format: str
    width: int
    height: int

    @property
    def pixels(self) -> int:
        """Width times height."""
        return self.width * self.height


def _truncated(fmt: str) -> InputError:
    return InputError(f"{fmt} header is truncated or malformed")


def _png(data: bytes) -> ImageInfo:
    # signature, then the IHDR chunk: length, type, width, height (big-endian)
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise _truncated("PNG")
    w, h = struct.unpack(">II", data[16:24])
    return ImageInfo("png", w, h)


def _jpeg(data: bytes) -> ImageInfo:
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            raise _truncated("JPEG")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _STANDALONE:
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2:i + 4])
        if length < 2:
            raise _truncated("JPEG")
        if marker in _SOF:
            if i + 9 > n:
                raise _truncated("JPEG")
            h, w = struct.unpack(">HH", data[i + 5:i + 9])
            if h == 0:  # height given later by a DNL marker: cannot be known up front
                raise InputError("JPEG without its height in the frame header is not accepted")
            return ImageInfo("jpeg", w, h)
        if marker == 0xDA:  # start of scan before any frame header
            break
        i += 2 + length
    raise _truncated("JPEG")


def _bmp(data: bytes) -> ImageInfo:
    if len(data) < 26:
        raise _truncated("BMP")
    (dib,) = struct.unpack("<I", data[14:18])
    if dib == 12:  # OS/2 BITMAPCOREHEADER: 16-bit unsigned sizes
        w, h = struct.unpack("<HH", data[18:22])
        return ImageInfo("bmp", w, h)
    if dib < 40:
        raise _truncated("BMP")
    w, h = struct.unpack("<ii", data[18:26])
    return ImageInfo("bmp", abs(w), abs(h))  # a negative height is a top-down bitmap


def _webp(data: bytes) -> ImageInfo:
    if len(data) < 30:
        raise _truncated("WebP")
    chunk = data[12:16]
    if chunk == b"VP8 ":  # lossy: a key frame's start code, then 14-bit sizes
        if data[23:26] != b"\x9d\x01\x2a":
            raise _truncated("WebP")
        w, h = struct.unpack("<HH", data[26:30])
        return ImageInfo("webp", w & 0x3FFF, h & 0x3FFF)
    if chunk == b"VP8L":  # lossless: signature 0x2f, then 14 bits each of width-1, height-1
        if data[20] != 0x2F:
            raise _truncated("WebP")
        (bits,) = struct.unpack("<I", data[21:25])
        return ImageInfo("webp", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
    if chunk == b"VP8X":  # extended: the canvas, 24 bits each of width-1, height-1
        w = int.from_bytes(data[24:27], "little") + 1
        h = int.from_bytes(data[27:30], "little") + 1
        return ImageInfo("webp", w, h)
    raise _truncated("WebP")


def probe(data: bytes) -> ImageInfo:
    """The format and size an image's header declares; ``UnsupportedImageError`` for bytes
    that are none of ``FORMATS``, ``InputError`` for a header that is cut short."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        info = _png(data)
    elif data.startswith(b"\xff\xd8"):
        info = _jpeg(data)
    elif data.startswith(b"BM"):
        info = _bmp(data)
    elif data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        info = _webp(data)
    else:
        raise UnsupportedImageError(f"not an image this endpoint reads: send {FORMATS}")
    if info.width == 0 or info.height == 0:
        raise InputError(f"{info.format.upper()} header says the image is empty")
    return info


def check(data: bytes, max_pixels: int) -> ImageInfo:
    """``probe``, then ``TooManyPixelsError`` when the image is larger than ``max_pixels``."""
    info = probe(data)
    if info.pixels > max_pixels:
        raise TooManyPixelsError(
            f"{info.format.upper()} of {info.width}x{info.height} = {info.pixels} pixels "
            f"exceeds the limit of {max_pixels} (http.max_image_pixels); nothing was decoded")
    return info


def decode(data: bytes, max_pixels: int) -> np.ndarray:
    """The BGR image in ``data``, after ``check``; ``InputError`` when OpenCV cannot decode it
    or decodes something of another size than the header said (blocking: the infer thread)."""
    import cv2  # noqa: PLC0415 - heavy, and only uploads need it here

    info = check(data, max_pixels)
    img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if img is None or img.size == 0:
        raise InputError(f"body is not a decodable {info.format.upper()} image")
    h, w = img.shape[:2]
    if (w, h) not in ((info.width, info.height), (info.height, info.width)):  # EXIF rotation
        raise InputError(f"{info.format.upper()} decoded to {w}x{h}, its header said "
                         f"{info.width}x{info.height}")
    return img
