"""An upload's size from its header: every format OpenCV writes, cut short, lying, or junk."""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.app import images
from edge_agent.errors import InputError


def _encoded(ext: str, w: int, h: int, **params: int) -> bytes:
    flags = [p for kv in params.items() for p in (getattr(cv2, kv[0]), kv[1])]
    ok, buf = cv2.imencode(ext, np.full((h, w, 3), 90, np.uint8), flags)
    assert ok
    return buf.tobytes()


@pytest.mark.parametrize(("ext", "params", "fmt"), [
    (".png", {}, "png"),
    (".jpg", {}, "jpeg"),
    (".jpg", {"IMWRITE_JPEG_PROGRESSIVE": 1}, "jpeg"),
    (".bmp", {}, "bmp"),
    (".webp", {"IMWRITE_WEBP_QUALITY": 80}, "webp"),
    (".webp", {"IMWRITE_WEBP_QUALITY": 101}, "webp"),  # lossless
])
@pytest.mark.parametrize(("w", "h"), [(1, 1), (37, 5), (640, 480), (17, 1031)])
def test_the_header_says_what_opencv_decodes(ext: str, params: dict[str, int], fmt: str,
                                              w: int, h: int) -> None:
    data = _encoded(ext, w, h, **params)
    info = images.probe(data)
    assert (info.format, info.width, info.height) == (fmt, w, h)
    img = images.decode(data, w * h)
    assert img.shape[:2] == (h, w)
    if w * h > 1:
        with pytest.raises(images.TooManyPixelsError):
            images.decode(data, w * h - 1)


def test_a_header_that_lies_is_refused_after_decoding() -> None:
    data = bytearray(_encoded(".png", 40, 30))
    data[16:24] = struct.pack(">II", 20, 30)  # IHDR says 20 wide; the CRC no longer matches
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    with pytest.raises(InputError):
        images.decode(bytes(data), 10_000)


@pytest.mark.parametrize("data", [
    b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8", b"\xff\xd8\xff\xda\x00\x02", b"BM" + b"\0" * 10,
    b"RIFF\0\0\0\0WEBPVP8 " + b"\0" * 20, b"GIF89a" + b"\0" * 20, b"II*\0" + b"\0" * 20,
    b"P6\n30000 30000\n255\n",
])
def test_short_or_unknown_headers_are_input_errors(data: bytes) -> None:
    with pytest.raises(InputError):
        images.probe(data)


@given(st.binary(max_size=64), st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8",
                                                  b"BM", b"RIFF\0\0\0\0WEBP"]))
@settings(max_examples=300, deadline=None)
def test_any_bytes_give_a_size_or_an_input_error(tail: bytes, head: bytes) -> None:
    try:
        info = images.probe(head + tail)
    except InputError:
        return
    assert info.width > 0 and info.height > 0
